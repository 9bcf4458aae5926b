"""Checkpoint reader: layout, FP8 blocks with partial edges, and errors that name the file and tensor."""

import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from nmoe.serve.ckpt import CheckpointError, HFCheckpoint, _main, load_config, load_weights, scale_shape
from nmoe.serve.config import ConfigError, ModelConfig
from nmoe.serve.ops.fp8 import FP8, dequant_block_fp8, quant_block_fp8


def _copy(src, tmp_path):
    dst = tmp_path / "ckpt"
    shutil.copytree(src, dst)
    return str(dst)


def test_tiny_checkpoint_layout(tiny_random_dir):
    cfg = load_config(tiny_random_dir)
    ck = HFCheckpoint(tiny_random_dir)
    kv_a = ck.get("model.layers.0.self_attn.kv_a_proj_with_mqa.weight")
    assert kv_a.dtype == FP8 and kv_a.shape == (cfg.kv_cache_dim, cfg.hidden_size)
    assert ck.get("model.layers.0.self_attn.kv_a_proj_with_mqa.weight_scale_inv").shape == scale_shape(kv_a.shape)
    assert cfg.hidden_size % 128 and cfg.kv_cache_dim % 128  # partial blocks present
    assert ck.get("model.layers.1.mlp.gate.e_score_correction_bias").dtype == torch.float32
    assert ck.get("model.layers.1.mlp.gate.weight").dtype == torch.bfloat16
    assert ck.has(f"model.layers.{cfg.num_hidden_layers}.eh_proj.weight")  # MTP layer written...
    w = load_weights(tiny_random_dir, cfg, progress=False)
    assert not any(k.startswith(f"model.layers.{cfg.num_hidden_layers}.") for k in w)  # ...and skipped
    assert cfg.max_position_embeddings >= 16384
    for f in ("tokenizer.json", "tokenizer_config.json", "config.json", "model.safetensors.index.json"):
        assert os.path.exists(os.path.join(tiny_random_dir, f))
    assert "chat_template" in json.load(open(os.path.join(tiny_random_dir, "tokenizer_config.json")))


def test_expert_subset_loading(tiny_random_dir):
    cfg = load_config(tiny_random_dir)
    w = load_weights(tiny_random_dir, cfg, experts=[2, 3], progress=False)
    assert "model.layers.1.mlp.experts.2.gate_proj.weight" in w
    assert "model.layers.1.mlp.experts.4.gate_proj.weight" not in w


def test_fp8_block_round_trip_partial_blocks():
    w = torch.randn(300, 200)
    q, s = quant_block_fp8(w)
    assert q.dtype == FP8 and s.shape == (3, 2)
    back = dequant_block_fp8(q, s)
    assert ((back - w).abs() / w.abs().clamp(min=1e-2)).median() < 0.05


def test_missing_shard_names_the_file(tiny_random_dir, tmp_path):
    d = _copy(tiny_random_dir, tmp_path)
    os.remove(os.path.join(d, "model-00002-of-00002.safetensors"))
    with pytest.raises(CheckpointError, match=r"model-00002-of-00002\.safetensors: shard file is missing .*tensor '"):
        load_weights(d, load_config(d), progress=False)


def test_missing_tensor_is_named(tiny_random_dir, tmp_path):
    d = _copy(tiny_random_dir, tmp_path)
    idx_path = os.path.join(d, "model.safetensors.index.json")
    idx = json.load(open(idx_path))
    del idx["weight_map"]["model.layers.0.self_attn.o_proj.weight"]
    json.dump(idx, open(idx_path, "w"))
    with pytest.raises(CheckpointError, match=r"tensor 'model\.layers\.0\.self_attn\.o_proj\.weight' is missing"):
        load_weights(d, load_config(d), progress=False)


def test_wrong_shape_names_file_and_tensor(tiny_random_dir, tmp_path):
    d = _copy(tiny_random_dir, tmp_path)
    idx = json.load(open(os.path.join(d, "model.safetensors.index.json")))
    name = "model.norm.weight"
    shard = os.path.join(d, idx["weight_map"][name])
    tensors = load_file(shard)
    tensors[name] = torch.ones(7, dtype=torch.bfloat16)
    save_file(tensors, shard)
    with pytest.raises(CheckpointError, match=r"safetensors: tensor 'model\.norm\.weight' has shape \(7,\), expected"):
        load_weights(d, load_config(d), progress=False)


def test_unknown_quantization_is_rejected_naming_the_field(tiny_random_dir, tmp_path):
    d = _copy(tiny_random_dir, tmp_path)
    p = os.path.join(d, "config.json")
    cfg = json.load(open(p))
    cfg["quantization_config"]["quant_method"] = "gptq"
    json.dump(cfg, open(p, "w"))
    with pytest.raises(CheckpointError, match=r"config\.json: field 'quantization_config\.quant_method' 'gptq'"):
        load_config(d)


def test_config_errors_name_the_field(tiny_random_dir):
    raw = json.load(open(os.path.join(tiny_random_dir, "config.json")))
    bad = dict(raw)
    del bad["hidden_size"]
    with pytest.raises(ConfigError, match="'hidden_size' is missing"):
        ModelConfig.from_hf(bad)
    bad = dict(raw, n_group=5)
    with pytest.raises(ConfigError, match="'n_group'"):
        ModelConfig.from_hf(bad)
    bad = dict(raw, num_attention_heads=-3)
    with pytest.raises(ConfigError, match="'num_attention_heads' must be a positive integer"):
        ModelConfig.from_hf(bad)


def test_tiny_cli_writes_a_loadable_checkpoint(tmp_path):
    out = str(tmp_path / "t")
    assert _main(["tiny", "--out", out, "--seed", "3", "--num-layers", "2"]) == 0
    cfg = load_config(out)
    assert cfg.num_hidden_layers == 2
    load_weights(out, cfg, progress=False)
