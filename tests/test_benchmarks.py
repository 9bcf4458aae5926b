"""The seed's benchmarks in their CPU smoke modes, random weights, the loopback transport, the FP8 format."""

import json
import math
import os
import subprocess
import sys

import pytest
import torch
from cuda_support import greedy_agreement

from nmoe.serve import ep
from nmoe.serve.ckpt import TINY_DIR, load_config, model_specs, scale_shape
from nmoe.serve.dist import RankInfo
from nmoe.serve.ep.loopback import LoopbackTransport
from nmoe.serve.model import DeepseekV3, MoE
from nmoe.serve.ops.fp8 import FP8
from nmoe.serve.random_weights import deepseek_v3_config, random_weights

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CPU = ["--device", "cpu", "--ckpt", "tiny"]

SMOKES = {
    "lmsys": (
        "nmoe.serve.benchmark_lmsys_e2e",
        ["--prefill-lens", "32,64", "--prefill-requests", "2", "--decode-batch", "4", "--decode-ctx", "40",
         "--decode-tokens", "3", "--warmup-steps", "1"],
        ("prefill_tok_s", "decode_tok_s", "decode_step_ms", "decode_floor_ms"),
    ),
    "lmsys_simulated": (
        "nmoe.serve.benchmark_lmsys_e2e",
        ["--random-weights", "ckpt", "--simulate-world-size", "4", "--simulate-rank", "1", "--prefill-lens", "32",
         "--prefill-requests", "1", "--decode-batch", "8", "--decode-ctx", "24", "--decode-tokens", "2",
         "--warmup-steps", "1"],
        ("prefill_tok_s", "decode_tok_s", "decode_step_ms", "decode_floor_ms"),
    ),
    "mixed": (
        "nmoe.serve.benchmark_mixed_latency",
        ["--concurrency", "3", "--prompt-len", "24", "--output-len", "5", "--duration", "1.0", "--backlog", "1",
         "--backlog-prompt-len", "160", "--chunk-size", "64", "--probe-rate", "2"],
        ("ttft_p50_ms", "ttft_p99_ms", "itl_p50_ms", "itl_p99_ms", "decode_tok_s"),
    ),
    # under the prefill cap of mixed steps the baseline (steps where all 3 sessions decode) still exists
    "mixed_capped": (
        "nmoe.serve.benchmark_mixed_latency",
        ["--concurrency", "3", "--prompt-len", "24", "--output-len", "5", "--duration", "1.0", "--backlog", "1",
         "--backlog-prompt-len", "160", "--chunk-size", "64", "--max-prefill-tokens", "32",
         "--mixed-prefill-tokens", "8", "--baseline-steps", "4"],
        ("itl_p50_ms", "baseline_decode_step_p50_ms", "itl_inflation_p50"),
    ),
    "long_context": (
        "nmoe.serve.benchmark_long_context_smoke",
        ["--prompt-len", "400", "--chunk-size", "128", "--output-len", "4"],
        ("passed", "prefill_s", "ttft_s", "itl_ms"),
    ),
}


@pytest.mark.parametrize("name", list(SMOKES))
def test_benchmark_cpu_smoke(name, tmp_path):
    module, flags, keys = SMOKES[name]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    proc = subprocess.run([sys.executable, "-m", module, *CPU, *flags, "--plot", str(tmp_path / "p.png")],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    for key in keys:
        assert key in result, (key, result)
        value = result[key]
        assert value is True or (isinstance(value, float) and math.isfinite(value) and value > 0), (key, value)


def test_ab_env_compares_settings_in_fresh_processes():
    """benchmarks/ab_env.py: every setting runs in its own process (NMOE_SIDE_STREAM read there), and
    the last line holds each setting's figure per round; a bad setting is refused by name."""
    module, flags, _ = SMOKES["lmsys"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    script = os.path.join(ROOT, "benchmarks", "ab_env.py")
    proc = subprocess.run([sys.executable, script, "--set", "", "--set", "NMOE_SIDE_STREAM=none", "--rounds", "1",
                           "--keys", "decode_step_ms", "--", *CPU, *flags], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert set(result) == {"", "NMOE_SIDE_STREAM=none"}
    assert all(len(r["decode_step_ms"]) == 1 and r["decode_step_ms"][0] > 0 for r in result.values())
    bad = subprocess.run([sys.executable, script, "--set", "NMOE_X", "--set", "", "--", *CPU], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode != 0 and "'NMOE_X' is not NAME=VALUE" in bad.stderr


def test_random_weights_match_specs():
    cfg = load_config(TINY_DIR)
    experts = RankInfo(1, 4).local_experts(cfg.n_routed_experts)
    w = random_weights(cfg, experts, "cpu", seed=3)
    specs = model_specs(cfg, experts)
    assert set(w) == set(specs) | {n + "_scale_inv" for n, s in specs.items() if s.kind == "fp8"}
    want = {"fp8": FP8, "bf16": torch.bfloat16, "fp32": torch.float32}
    for name, spec in specs.items():
        assert tuple(w[name].shape) == spec.shape and w[name].dtype == want[spec.kind], name
        if spec.kind == "fp8":
            s = w[name + "_scale_inv"]
            assert tuple(s.shape) == scale_shape(spec.shape) and s.dtype == torch.float32 and bool((s > 0).all())
        assert torch.isfinite(w[name].float()).all(), name
    assert not any(f".experts.{e}." in n for n in w for e in (0, 15))  # only rank 1's experts
    assert torch.equal(w[name], random_weights(cfg, experts, "cpu", seed=3)[name])  # deterministic
    v3 = model_specs(deepseek_v3_config(num_layers=4), RankInfo(0, 8).local_experts(256))
    assert v3["model.layers.3.mlp.experts.31.gate_proj.weight"].shape == (2048, 7168)
    assert "model.layers.3.mlp.experts.32.gate_proj.weight" not in v3 and "model.layers.4.input_layernorm.weight" not in v3
    # the model loads them in both formats
    for fmt in ("fp32", "fp8"):
        DeepseekV3(cfg, experts, weights_format=fmt).load_hf(dict(w))


def _moe_inputs(model, t=48, seed=0):
    moe = next(layer.mlp for layer in model.layers if isinstance(layer.mlp, MoE))
    x = torch.randn(t, model.cfg.hidden_size, generator=torch.Generator().manual_seed(seed))
    weights, ids = moe.route(x)
    return moe, x, weights, ids


def test_loopback_world_size_one_is_the_local_path():
    cfg = load_config(TINY_DIR)
    model = DeepseekV3(cfg).eval()
    moe, x, weights, ids = _moe_inputs(model)
    with torch.no_grad():
        want = moe.local_experts(x, weights, ids)
        ep.attach(model, LoopbackTransport(1, 0, cfg.n_routed_experts))
        got = moe.transport.moe(x, weights, ids, moe.experts)
    assert torch.equal(got, want)


def test_loopback_feeds_local_experts_the_deployed_load():
    cfg = load_config(TINY_DIR)
    n, rank = 4, 2
    experts = RankInfo(rank, n).local_experts(cfg.n_routed_experts)
    model = DeepseekV3(cfg, experts).eval()
    transport = ep.attach(model, LoopbackTransport(n, rank, cfg.n_routed_experts))
    moe, x, weights, ids = _moe_inputs(model, t=256)
    got = transport.local_ids(ids)
    mine = transport.owner[ids] == rank
    assert torch.equal(got[mine], torch.tensor([experts.index(int(g)) for g in ids[mine]]))  # own slots stay
    assert torch.equal(got, transport.local[ids])  # every slot: its expert's local index
    with torch.no_grad():
        y = moe(x)
    assert y.shape == x.shape and torch.isfinite(y).all() and transport.calls == 1


def test_loopback_idle_experts_match_the_deployment():
    """At the seed's decode point (32 tokens per rank, top-8, 256 experts over 8 ranks) and balanced
    routing, a deployed expert receives the rows of 8 ranks' tokens (about Poisson(8): idle with
    probability ~3e-4). The loopback must give the simulated rank's experts the same statistics."""
    n, t, k, e = 8, 32, 8, 256
    transport = LoopbackTransport(n, 0, e)
    gen = torch.Generator().manual_seed(0)
    idle_loop = idle_deployed = 0
    trials = 50
    for _ in range(trials):
        ids = torch.stack([torch.randperm(e, generator=gen)[:k] for _ in range(n * t)])  # all ranks' tokens
        deployed = torch.bincount(ids[transport.owner[ids] == 0].flatten(), minlength=e)[:e // n]
        loop = torch.bincount(transport.local_ids(ids[:t]).flatten(), minlength=e // n)  # rank 0's tokens
        assert int(loop.sum()) == t * k  # every slot computed once, here
        idle_loop += int((loop == 0).sum())
        idle_deployed += int((deployed == 0).sum())
    # both about 32 * 50 * e^-8 ~ 0.5 idle experts over all trials; the earlier quota rule gave ~600
    assert idle_loop <= 5 and idle_deployed <= 5, (idle_loop, idle_deployed)


def test_fp8_format_follows_the_fp32_path():
    """The CUDA path's math through the torch references: FP8 weights, BF16 activations."""
    cfg = load_config(TINY_DIR)
    from nmoe.serve.ckpt import load_weights

    w = load_weights(TINY_DIR, cfg, progress=False)
    ref, fp8 = DeepseekV3(cfg), DeepseekV3(cfg, weights_format="fp8")
    ref.load_hf(dict(w))
    fp8.load_hf(w)
    assert not w  # consumed
    assert fp8.layers[1].mlp.experts.gate_up.dtype == FP8 and fp8.layers[0].self_attn.o_proj.weight.dtype == FP8
    ids = torch.randint(2, 500, (1, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a, b = ref.forward_dense(ids), fp8.forward_dense(ids).float()
    # each FP8 GEMM / expert block agrees to cosine ~0.999; 3 layers of a sharp trained model compound it
    cos = torch.nn.functional.cosine_similarity(a.flatten(1), b.flatten(1)).min()
    assert cos > 0.97, float(cos)


def _greedy_tiny(device, fmt, max_tokens=12, ckpt="tiny"):
    """The fixed prompts' greedy outputs of the engine on the trained tiny model (or `ckpt`)."""
    import argparse

    from nmoe.serve.benchmarking import add_cli_args, build_engine
    from nmoe.serve.request import SamplingParams
    from nmoe.serve.tiny_prompts import FIXED_PROMPTS

    ap = argparse.ArgumentParser()
    add_cli_args(ap)
    engine = build_engine(ap.parse_args(["--device", device, "--ckpt", ckpt, "--weights-format", fmt,
                                         "--num-pages", "64", "--max-seq-len", "1024"]))
    assert engine.model.weights_format == fmt
    for prompt, _ in FIXED_PROMPTS:
        ids = engine.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        engine.add_request(ids, SamplingParams(max_tokens=max_tokens, temperature=0.0, logprobs=True,
                                               ignore_eos=True))
    while engine.has_work():
        engine.step()
    return sorted(engine.pop_finished(), key=lambda o: o.request_id)


def test_fp8_norm_quant_fusion_is_exact_on_cpu(monkeypatch, tmp_path):
    """Serving under FP8: the norms that quantize their output for the next projection (model.py
    _add_norm / _norm_project) give bitwise the outputs of quantizing in the projections. Widths
    of whole 128-blocks, so that qkv_a and gate_up are fused and every such norm quantizes."""
    from nmoe.serve import model as model_mod
    from nmoe.serve.ckpt import make_tiny

    make_tiny(str(tmp_path), seed=3, hidden_size=256, q_lora_rank=128, intermediate_size=384,
              moe_intermediate_size=128)
    calls = []
    real = model_mod.add_rms_norm_quant
    monkeypatch.setattr(model_mod, "add_rms_norm_quant", lambda *a: calls.append(1) or real(*a))
    fused = _greedy_tiny("cpu", "fp8", max_tokens=4, ckpt=str(tmp_path))
    assert calls, "the fused norm + quantization was not used"
    monkeypatch.setattr(model_mod, "add_rms_norm_quant", real)
    for cls in (model_mod.MLA, model_mod.MLP, model_mod.MoE):
        monkeypatch.setattr(cls, "takes_fp8", property(lambda self: False))
    monkeypatch.setattr(model_mod, "_norm_project", lambda norm, proj, x: proj(norm(x)))
    plain = _greedy_tiny("cpu", "fp8", max_tokens=4, ckpt=str(tmp_path))
    assert [o.token_ids for o in fused] == [o.token_ids for o in plain]
    assert [o.logprobs for o in fused] == [o.logprobs for o in plain]


def test_side_stream_tasks_parse_and_reject_unknown(monkeypatch):
    """NMOE_SIDE_STREAM: a comma list, "none"/"0" empty; an unknown task name is an error naming it."""
    import dataclasses

    from nmoe.serve import side_stream
    from nmoe.serve.env import Env

    for value, want in (("", ("shared",)), ("none", ()), ("0", ()), (" shared , x ", ("shared", "x"))):
        monkeypatch.setenv("NMOE_SIDE_STREAM", value)
        assert Env.read().side_stream == want, value
    monkeypatch.setattr(side_stream, "ENV", dataclasses.replace(side_stream.ENV, side_stream=()))
    assert not side_stream.side_task_on("shared")
    monkeypatch.setattr(side_stream, "ENV", dataclasses.replace(side_stream.ENV, side_stream=("shared",)))
    assert side_stream.side_task_on("shared")
    # off the GPU a task runs inline and its value is returned as is
    assert side_stream.beside("shared", torch.device("cpu"), lambda a: a + 1, 1) == 2
    with pytest.raises(ValueError, match="'kv'"):
        side_stream.side_task_on("kv")
    monkeypatch.setattr(side_stream, "ENV", dataclasses.replace(side_stream.ENV, side_stream=("sharde",)))
    with pytest.raises(ValueError, match="'sharde'"):
        side_stream.side_task_on("shared")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_side_stream_is_bitwise_the_single_stream(monkeypatch, tmp_path):
    """FP8 engine on CUDA (decode CUDA graphs, piecewise prefill graphs) with the shared experts on
    the side stream: the same tokens and logprobs, bitwise, as on one stream."""
    import dataclasses

    from nmoe.serve import side_stream
    from nmoe.serve.ckpt import make_tiny

    make_tiny(str(tmp_path), seed=3, hidden_size=256, q_lora_rank=128, intermediate_size=384,
              moe_intermediate_size=128)
    forks = []

    class Counted(side_stream.Deferred):
        def __init__(self, *a):
            forks.append(1)
            super().__init__(*a)

    monkeypatch.setattr(side_stream, "Deferred", Counted)
    runs = {}
    for tasks in (("shared",), ()):
        monkeypatch.setattr(side_stream, "ENV", dataclasses.replace(side_stream.ENV, side_stream=tasks))
        before = len(forks)
        runs[tasks] = _greedy_tiny("cuda", "fp8", max_tokens=8, ckpt=str(tmp_path))
        assert (len(forks) > before) == bool(tasks), (tasks, len(forks) - before)
    on, off = runs[("shared",)], runs[()]
    assert [o.token_ids for o in on] == [o.token_ids for o in off]
    assert [o.logprobs for o in on] == [o.logprobs for o in off]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_absorb_kernels_match_batched_matmuls_in_the_engine(monkeypatch, tmp_path):
    """An FP8 engine with DeepSeek-V3's MLA widths (nope = v = 128, latent 512, rope 64) on CUDA:
    the fused absorption kernels (mla_absorb_q / mla_absorb_out, o_proj's input quantized by the
    latter in decode-only steps) against cuBLAS batched matmuls + mla_decode_q + quant_fp8_act.
    The sums are ordered differently, so logprobs agree closely, not bitwise."""
    from nmoe.serve.ckpt import make_tiny
    from nmoe.serve.ops import attention

    make_tiny(str(tmp_path), seed=4, hidden_size=256, q_lora_rank=128, intermediate_size=384,
              moe_intermediate_size=128, kv_lora_rank=512, qk_rope_head_dim=64, qk_nope_head_dim=128,
              v_head_dim=128)
    taken = []
    real = attention._absorb_kernel
    monkeypatch.setattr(attention, "_absorb_kernel", lambda *t: taken.append(real(*t)) or taken[-1])
    fused = _greedy_tiny("cuda", "fp8", max_tokens=8, ckpt=str(tmp_path))
    assert taken and all(taken), "the absorption kernels were not used"
    monkeypatch.setattr(attention, "_absorb_kernel", lambda *t: False)
    plain = _greedy_tiny("cuda", "fp8", max_tokens=8, ckpt=str(tmp_path))
    same, worst = greedy_agreement(fused, plain)
    print(f"absorb kernels vs batched matmuls: identical greedy sequences {same}/{len(plain)}, "
          f"max |logprob diff| over the common prefixes {worst:.3e}")
    assert same >= len(plain) - 1 and worst < 0.02


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_fp8_engine_cuda_matches_cpu():
    """The FP8 format on CUDA (nmoe._C kernels) against the fp32 CPU engine on the trained tiny model."""
    cpu, gpu = _greedy_tiny("cpu", "fp32"), _greedy_tiny("cuda", "fp8")
    same = sum(a.token_ids == b.token_ids for a, b in zip(cpu, gpu))
    first = [abs(a.logprobs[0] - b.logprobs[0]) for a, b in zip(cpu, gpu)]
    print(f"fp8 CUDA vs fp32 CPU: identical greedy sequences {same}/{len(cpu)}, max |first logprob diff| {max(first):.3e}")
    assert all(len(b.token_ids) == 12 and all(math.isfinite(x) for x in b.logprobs) for b in gpu)
    assert same >= len(cpu) // 2


def test_prefill_flops_count_matches_deepseek_active_parameters():
    """The prefill floor's FLOP count: at zero context it is 2 x the parameters a token meets in the
    layers, which with the embedding row and the head is DeepSeek-V3's published 37B activated."""
    from nmoe.serve.benchmarking import forward_flops_per_token
    from nmoe.serve.random_weights import deepseek_v3_config

    cfg = deepseek_v3_config()
    layer_params = forward_flops_per_token(cfg, 0) / 2
    activated = layer_params + 2 * cfg.vocab_size * cfg.hidden_size  # embedding table and lm_head
    assert abs(activated / 37e9 - 1) < 0.03, activated
    # attention adds 2 x heads x (qk + v head dims) per context token and layer
    extra = forward_flops_per_token(cfg, 1000) - forward_flops_per_token(cfg, 0)
    assert extra == 2 * 1000 * cfg.num_hidden_layers * cfg.num_attention_heads * (cfg.qk_head_dim + cfg.v_head_dim)


def test_engine_stream_priority_parses(monkeypatch):
    """NMOE_ENGINE_STREAM_PRIORITY: unset or empty is None (the engine takes the device's highest),
    an integer is taken as is, anything else is an error naming the variable."""
    from nmoe.serve.env import Env

    for value, want in (("", None), ("0", 0), ("-2", -2)):
        monkeypatch.setenv("NMOE_ENGINE_STREAM_PRIORITY", value)
        assert Env.read().engine_stream_priority == want
    monkeypatch.delenv("NMOE_ENGINE_STREAM_PRIORITY")
    assert Env.read().engine_stream_priority is None
    monkeypatch.setenv("NMOE_ENGINE_STREAM_PRIORITY", "high")
    with pytest.raises(ValueError, match="NMOE_ENGINE_STREAM_PRIORITY"):
        Env.read()
