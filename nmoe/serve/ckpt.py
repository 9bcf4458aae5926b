"""Checkpoints: the HF release reader, the tiny-checkpoint maker, and (EP) shard conversion.

HF release layout: `config.json`, `model.safetensors.index.json` (weight_map: tensor -> shard file),
shards. Linear weights are `float8_e4m3fn` with `<name>.weight_scale_inv` `[ceil(out/128),
ceil(in/128)]` fp32; embeddings, norms and `lm_head` are BF16; the router `gate.weight` is BF16 and
`gate.e_score_correction_bias` fp32. The MTP layer (index `num_hidden_layers`) is skipped.

CLI:
    python -m nmoe.serve.ckpt tiny --out DIR [--seed S] [--num-layers L] ...
    python -m nmoe.serve.ckpt convert --hf DIR --out DIR-ep{N}-tp1 --world-size N [--placement ...]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from nmoe.serve.config import ConfigError, ModelConfig
from nmoe.serve.ops.fp8 import FP8, quant_block_fp8

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json")


class CheckpointError(RuntimeError):
    """A checkpoint file or tensor is missing, mis-shaped, or of an unsupported format."""


# ------------------------------------------------------------------------------------------------
# What a checkpoint holds
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TensorSpec:
    shape: tuple[int, ...]
    kind: str  # "fp8" (a linear weight with weight_scale_inv), "bf16", "fp32"


def _linear(out: int, inp: int, quantized: bool) -> TensorSpec:
    return TensorSpec((out, inp), "fp8" if quantized else "bf16")


def layer_specs(cfg: ModelConfig, layer: int, experts: Iterable[int] | None = None) -> dict[str, TensorSpec]:
    """Tensors of one decoder layer, by HF name (without the `.weight_scale_inv` companions).

    `experts`: which routed experts to include (None = all)."""
    q = cfg.quantization_config is not None
    h, nh = cfg.hidden_size, cfg.num_attention_heads
    p = f"model.layers.{layer}."
    s: dict[str, TensorSpec] = {
        p + "input_layernorm.weight": TensorSpec((h,), "bf16"),
        p + "post_attention_layernorm.weight": TensorSpec((h,), "bf16"),
        p + "self_attn.kv_a_proj_with_mqa.weight": _linear(cfg.kv_cache_dim, h, q),
        p + "self_attn.kv_a_layernorm.weight": TensorSpec((cfg.kv_lora_rank,), "bf16"),
        p + "self_attn.kv_b_proj.weight": _linear(nh * (cfg.qk_nope_head_dim + cfg.v_head_dim), cfg.kv_lora_rank, q),
        p + "self_attn.o_proj.weight": _linear(h, nh * cfg.v_head_dim, q),
    }
    if cfg.q_lora_rank is None:
        s[p + "self_attn.q_proj.weight"] = _linear(nh * cfg.qk_head_dim, h, q)
    else:
        s[p + "self_attn.q_a_proj.weight"] = _linear(cfg.q_lora_rank, h, q)
        s[p + "self_attn.q_a_layernorm.weight"] = TensorSpec((cfg.q_lora_rank,), "bf16")
        s[p + "self_attn.q_b_proj.weight"] = _linear(nh * cfg.qk_head_dim, cfg.q_lora_rank, q)
    if cfg.is_moe_layer(layer):
        s[p + "mlp.gate.weight"] = TensorSpec((cfg.n_routed_experts, h), "bf16")
        s[p + "mlp.gate.e_score_correction_bias"] = TensorSpec((cfg.n_routed_experts,), "fp32")
        mi = cfg.moe_intermediate_size
        for e in range(cfg.n_routed_experts) if experts is None else experts:
            s.update(_mlp_specs(f"{p}mlp.experts.{e}.", h, mi, q))
        if cfg.n_shared_experts:
            s.update(_mlp_specs(p + "mlp.shared_experts.", h, mi * cfg.n_shared_experts, q))
    else:
        s.update(_mlp_specs(p + "mlp.", h, cfg.intermediate_size, q))
    return s


def _mlp_specs(prefix: str, h: int, inter: int, q: bool) -> dict[str, TensorSpec]:
    return {
        prefix + "gate_proj.weight": _linear(inter, h, q),
        prefix + "up_proj.weight": _linear(inter, h, q),
        prefix + "down_proj.weight": _linear(h, inter, q),
    }


def model_specs(cfg: ModelConfig, experts: Iterable[int] | None = None) -> dict[str, TensorSpec]:
    """Every tensor inference reads (the MTP layer excluded)."""
    v, h = cfg.vocab_size, cfg.hidden_size
    s = {"model.embed_tokens.weight": TensorSpec((v, h), "bf16")}
    experts = None if experts is None else sorted(experts)
    for layer in range(cfg.num_hidden_layers):
        s.update(layer_specs(cfg, layer, experts))
    s["model.norm.weight"] = TensorSpec((h,), "bf16")
    if not cfg.tie_word_embeddings:
        s["lm_head.weight"] = TensorSpec((v, h), "bf16")
    return s


def mtp_specs(cfg: ModelConfig) -> dict[str, TensorSpec]:
    """The MTP module at layer index num_hidden_layers (written by the tiny maker, skipped by inference)."""
    layer = cfg.num_hidden_layers
    h, v = cfg.hidden_size, cfg.vocab_size
    p = f"model.layers.{layer}."
    q = cfg.quantization_config is not None
    s = layer_specs(cfg, layer)
    s.update({
        p + "enorm.weight": TensorSpec((h,), "bf16"),
        p + "hnorm.weight": TensorSpec((h,), "bf16"),
        p + "eh_proj.weight": _linear(h, 2 * h, q),
        p + "shared_head.norm.weight": TensorSpec((h,), "bf16"),
        p + "shared_head.head.weight": TensorSpec((v, h), "bf16"),
    })
    return s


def scale_shape(shape: tuple[int, int], block: int = 128) -> tuple[int, int]:
    return (-(-shape[0] // block), -(-shape[1] // block))


# ------------------------------------------------------------------------------------------------
# Reading
# ------------------------------------------------------------------------------------------------


class HFCheckpoint:
    """Random access to the tensors of an HF-layout checkpoint folder (index + shards, or one file)."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        index = os.path.join(self.path, INDEX)
        if os.path.exists(index):
            with open(index) as f:
                self.weight_map: dict[str, str] = json.load(f)["weight_map"]
        elif os.path.exists(os.path.join(self.path, SINGLE)):
            with safe_open(os.path.join(self.path, SINGLE), "pt") as f:
                self.weight_map = {k: SINGLE for k in f.keys()}
        else:
            raise CheckpointError(f"{self.path}: neither {INDEX} nor {SINGLE} found")
        self._handles: dict[str, object] = {}

    def has(self, name: str) -> bool:
        return name in self.weight_map

    def _file(self, name: str):
        shard = self.weight_map.get(name)
        if shard is None:
            raise CheckpointError(f"{self.path}: tensor '{name}' is missing (not in the index)")
        if shard not in self._handles:
            full = os.path.join(self.path, shard)
            if not os.path.exists(full):
                raise CheckpointError(f"{full}: shard file is missing (needed for tensor '{name}')")
            self._handles[shard] = safe_open(full, "pt")
        return shard, self._handles[shard]

    def get(self, name: str) -> torch.Tensor:
        shard, f = self._file(name)
        try:
            return f.get_tensor(name)
        except Exception as e:  # safetensors raises its own error types
            raise CheckpointError(f"{os.path.join(self.path, shard)}: tensor '{name}' could not be read: {e}") from e

    def read(self, name: str, spec: TensorSpec) -> dict[str, torch.Tensor]:
        """Read and check one tensor (and its scale for FP8): returns {name: t[, name_scale_inv: s]}."""
        t = self.get(name)
        shard = os.path.join(self.path, self.weight_map[name])
        if tuple(t.shape) != spec.shape:
            raise CheckpointError(f"{shard}: tensor '{name}' has shape {tuple(t.shape)}, expected {spec.shape}")
        out = {name: t}
        if spec.kind == "fp8":
            if t.dtype != FP8:
                raise CheckpointError(f"{shard}: tensor '{name}' has dtype {t.dtype}, expected float8_e4m3fn")
            sname = name + "_scale_inv"
            s = self.get(sname)
            want = scale_shape(spec.shape)
            if tuple(s.shape) != want:
                raise CheckpointError(
                    f"{os.path.join(self.path, self.weight_map[sname])}: tensor '{sname}' has shape "
                    f"{tuple(s.shape)}, expected {want}"
                )
            out[sname] = s.float()
        elif t.dtype == FP8:
            raise CheckpointError(f"{shard}: tensor '{name}' is float8 but this model expects it unquantized")
        return out


def load_weights(
    path: str | os.PathLike,
    cfg: ModelConfig,
    *,
    experts: Iterable[int] | None = None,
    progress: bool = True,
) -> dict[str, torch.Tensor]:
    """All tensors inference needs (routed experts limited to `experts`), checked against the config."""
    ckpt = HFCheckpoint(path)
    specs = model_specs(cfg, experts)
    out: dict[str, torch.Tensor] = {}
    items = specs.items()
    if progress:
        from tqdm import tqdm

        items = tqdm(items, desc=f"loading {os.path.basename(os.fspath(path).rstrip('/'))}", unit="tensor", file=sys.stderr)
    for name, spec in items:
        out.update(ckpt.read(name, spec))
    return out


def load_config(path: str | os.PathLike) -> ModelConfig:
    try:
        return ModelConfig.from_hf(path)
    except ConfigError as e:
        raise CheckpointError(str(e)) from e


# ------------------------------------------------------------------------------------------------
# Writing (HF release layout)
# ------------------------------------------------------------------------------------------------


def write_hf_checkpoint(
    out_dir: str | os.PathLike,
    cfg: ModelConfig,
    tensors: dict[str, torch.Tensor],
    specs: dict[str, TensorSpec],
    *,
    tokenizer_dir: str | os.PathLike | None = None,
    num_shards: int = 2,
) -> None:
    """Write `tensors` (fp32/bf16, by HF name) in the release layout, FP8-quantizing the "fp8" specs."""
    os.makedirs(out_dir, exist_ok=True)
    names = list(specs)
    shards: list[dict[str, torch.Tensor]] = [{} for _ in range(num_shards)]
    per = -(-len(names) // num_shards)
    for i, name in enumerate(names):
        spec, t = specs[name], tensors[name]
        if tuple(t.shape) != spec.shape:
            raise ValueError(f"tensor '{name}' has shape {tuple(t.shape)}, spec says {spec.shape}")
        shard = shards[i // per]
        if spec.kind == "fp8":
            q, s = quant_block_fp8(t)
            shard[name], shard[name + "_scale_inv"] = q, s
        elif spec.kind == "fp32":
            shard[name] = t.float().contiguous()
        else:
            shard[name] = t.to(torch.bfloat16).contiguous()
    weight_map = {}
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{num_shards:05d}.safetensors"
        save_file(shard, os.path.join(out_dir, fname), metadata={"format": "pt"})
        weight_map.update({k: fname for k in shard})
    total = sum(t.numel() * t.element_size() for s in shards for t in s.values())
    with open(os.path.join(out_dir, INDEX), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(cfg.to_hf(), f, indent=2)
    if tokenizer_dir is not None:
        copy_tokenizer(tokenizer_dir, out_dir)


def write_dequantized(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """The checkpoint at `src` with every FP8 weight dequantized to fp32, no quantization_config and no
    MTP layer, as one `model.safetensors` (what transformers loads on CPU for reference runs)."""
    from nmoe.serve.ops.fp8 import dequant_block_fp8

    ckpt = HFCheckpoint(src)
    with open(os.path.join(src, "config.json")) as f:
        cfg = json.load(f)
    mtp = f"model.layers.{cfg['num_hidden_layers']}."
    tensors = {}
    for name in ckpt.weight_map:
        if name.endswith("_scale_inv") or name.startswith(mtp):
            continue
        t = ckpt.get(name)
        if ckpt.has(name + "_scale_inv"):
            t = dequant_block_fp8(t, ckpt.get(name + "_scale_inv"))
        tensors[name] = t.float().contiguous()
    os.makedirs(dst, exist_ok=True)
    save_file(tensors, os.path.join(dst, SINGLE))
    cfg.pop("quantization_config", None)
    cfg["torch_dtype"] = "float32"
    with open(os.path.join(dst, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    copy_tokenizer(src, dst)


def copy_tokenizer(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    for name in TOKENIZER_FILES:
        p = os.path.join(src, name)
        if os.path.exists(p):
            shutil.copy(p, os.path.join(dst, name))


# ------------------------------------------------------------------------------------------------
# Tiny checkpoints
# ------------------------------------------------------------------------------------------------

TINY_DIR = os.path.join(os.path.dirname(__file__), "tiny")


def tiny_config(vocab_size: int, **overrides) -> ModelConfig:
    """Small DeepSeek-V3 shapes with partial 128-blocks and non-power-of-two sizes everywhere."""
    base = dict(
        vocab_size=vocab_size,
        hidden_size=320,
        intermediate_size=704,
        moe_intermediate_size=192,
        num_hidden_layers=3,
        num_nextn_predict_layers=1,
        num_attention_heads=4,
        num_key_value_heads=4,
        n_shared_experts=1,
        n_routed_experts=16,
        routed_scaling_factor=2.5,
        kv_lora_rank=160,
        q_lora_rank=192,
        qk_rope_head_dim=32,
        v_head_dim=48,
        qk_nope_head_dim=48,
        topk_method="noaux_tc",
        n_group=4,
        topk_group=2,
        num_experts_per_tok=4,
        first_k_dense_replace=1,
        norm_topk_prob=True,
        max_position_embeddings=16384,
        rms_norm_eps=1e-6,
        rope_theta=10000.0,
        rope_scaling={
            "type": "yarn",
            "factor": 4.0,
            "original_max_position_embeddings": 4096,
            "beta_fast": 32,
            "beta_slow": 1,
            "mscale": 1.0,
            "mscale_all_dim": 1.0,
        },
        bos_token_id=0,
        eos_token_id=1,
        tie_word_embeddings=False,
        quantization_config={
            "quant_method": "fp8",
            "fmt": "e4m3",
            "activation_scheme": "dynamic",
            "weight_block_size": [128, 128],
        },
    )
    base.update(overrides)
    cfg = ModelConfig(**base)
    cfg.validate("tiny config")
    return cfg


def random_tensors(cfg: ModelConfig, specs: dict[str, TensorSpec], seed: int) -> dict[str, torch.Tensor]:
    """Deterministic random weights: unit norms, small linears, a non-zero router bias."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, spec in specs.items():
        if name.endswith("norm.weight"):
            out[name] = 1.0 + 0.1 * torch.randn(spec.shape, generator=g)
        elif name.endswith("e_score_correction_bias"):
            out[name] = 0.05 * torch.randn(spec.shape, generator=g)
        else:
            fan_in = spec.shape[-1]
            std = 1.0 if "embed_tokens" in name else fan_in**-0.5
            out[name] = std * torch.randn(spec.shape, generator=g)
    return out


def make_tiny(out_dir: str, seed: int = 0, tokenizer_dir: str | None = None, **overrides) -> ModelConfig:
    """Write a random tiny DeepSeek-V3 checkpoint in the HF release layout, MTP layer included."""
    tokenizer_dir = tokenizer_dir or TINY_DIR
    from tokenizers import Tokenizer

    vocab = Tokenizer.from_file(os.path.join(tokenizer_dir, "tokenizer.json")).get_vocab_size()
    cfg = tiny_config(vocab, **overrides)
    specs = {**model_specs(cfg), **mtp_specs(cfg)}
    write_hf_checkpoint(out_dir, cfg, random_tensors(cfg, specs, seed), specs, tokenizer_dir=tokenizer_dir)
    return cfg


def resolve_model_path(model: str) -> str:
    """'tiny' names the embedded trained model; anything else is a folder."""
    if model == "tiny":
        return TINY_DIR
    if not os.path.isdir(model):
        raise CheckpointError(f"{model}: model folder not found")
    return model


def _main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m nmoe.serve.ckpt")
    sub = ap.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("tiny", help="write a random tiny DeepSeek-V3 checkpoint (HF release layout)")
    t.add_argument("--out", required=True)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--num-layers", type=int, default=None)
    t.add_argument("--num-experts", type=int, default=None)
    t.add_argument("--hidden-size", type=int, default=None)
    c = sub.add_parser("convert", help="split an HF checkpoint into per-rank EP shards")
    c.add_argument("--hf", required=True, help="HF release folder")
    c.add_argument("--out", required=True, help="output folder, e.g. DIR-ep8-tp1")
    c.add_argument("--world-size", type=int, required=True)
    c.add_argument("--placement", choices=["contiguous", "striped"], default="contiguous")
    args = ap.parse_args(argv)
    if args.cmd == "convert":
        from nmoe.serve.shards import convert

        convert(args.hf, args.out, args.world_size, args.placement)
        print(f"wrote {args.world_size} EP shards to {args.out}")
    if args.cmd == "tiny":
        over = {}
        if args.num_layers is not None:
            over["num_hidden_layers"] = args.num_layers
        if args.num_experts is not None:
            over["n_routed_experts"] = args.num_experts
        if args.hidden_size is not None:
            over["hidden_size"] = args.hidden_size
        cfg = make_tiny(args.out, seed=args.seed, **over)
        print(f"wrote tiny checkpoint to {args.out}: {cfg.num_hidden_layers} layers, {cfg.n_routed_experts} experts")
    return 0


if __name__ == "__main__":
    sys.exit(_main())
