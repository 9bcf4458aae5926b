"""What the seed's benchmark modules share: their engine (random weights, one rank's simulated
share), measurement helpers, and the JSON / plot output.

The benchmarks' model flags (`add_cli_args`, `build_engine`):
  --random-weights [v3|ckpt]   random weights; shapes of DeepSeek-V3 (default) or of --ckpt's config
  --num-layers L               V3-shaped with L decoder layers (the first `first_k_dense_replace` dense)
  --simulate-world-size N --simulate-rank r
                               one rank's share of an N-rank deployment on this device: its E/N
                               experts, fed by `ep.loopback.LoopbackTransport`
  --placement {contiguous,striped} (and ServeConfig's --weights-format auto|fp32|fp8)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import statistics
import time

import torch

from nmoe.serve.ckpt import load_config, resolve_model_path
from nmoe.serve.config import ModelConfig, ServeConfig
from nmoe.serve.dist import RankInfo
from nmoe.serve.random_weights import deepseek_v3_config, random_weights

# ------------------------------------------------------------------------------------------------
# The benchmarks' engine
# ------------------------------------------------------------------------------------------------


def add_cli_args(parser: argparse.ArgumentParser) -> None:
    """ServeConfig's flags plus the model flags of the module docstring."""
    ServeConfig.add_cli_args(parser)
    parser.add_argument("--random-weights", nargs="?", const="v3", default=None, choices=["v3", "ckpt"],
                        help="random FP8 weights, no files: DeepSeek-V3's shapes (v3) or --ckpt's config")
    parser.add_argument("--num-layers", type=int, default=None, help="decoder layers (V3-shaped at this depth)")
    parser.add_argument("--simulate-world-size", type=int, default=1)
    parser.add_argument("--simulate-rank", type=int, default=0)
    parser.add_argument("--placement", choices=["contiguous", "striped"], default="contiguous")


def model_config(args: argparse.Namespace) -> ModelConfig:
    if args.random_weights == "v3":
        return deepseek_v3_config(args.num_layers)
    cfg = load_config(resolve_model_path(args.ckpt))
    if args.num_layers is not None:
        cfg = dataclasses.replace(cfg, num_hidden_layers=args.num_layers)
    return cfg


def build_engine(args: argparse.Namespace):
    """The Engine the flags describe: this (simulated) rank's experts, random or checkpoint weights,
    the loopback transport attached when `--simulate-world-size` > 1."""
    from nmoe.serve import ep
    from nmoe.serve.engine import Engine
    from nmoe.serve.ep.loopback import LoopbackTransport

    n, r = args.simulate_world_size, args.simulate_rank
    if n < 1 or not 0 <= r < n:
        raise ValueError(f"--simulate-rank {r} is outside [0, --simulate-world-size {n})")
    serve = ServeConfig.from_cli_args(args)
    device = torch.device(serve.device)
    rank = RankInfo(r, n, args.placement)
    cfg = model_config(args)
    experts = rank.local_experts(cfg.n_routed_experts)
    weights = None
    if args.random_weights:
        t0 = time.perf_counter()
        weights = random_weights(cfg, experts, device, seed=serve.seed)
        sync(device)
        print(f"random weights: {len(weights)} tensors, {tensor_bytes(weights.values()) / 1e9:.2f} GB "
              f"on {device} in {time.perf_counter() - t0:.1f} s", flush=True)
    engine = Engine(serve, rank=rank, model_cfg=cfg, weights=weights)
    del weights
    if n > 1:
        ep.attach(engine.model, LoopbackTransport(n, r, cfg.n_routed_experts, args.placement))
    return engine


# ------------------------------------------------------------------------------------------------
# Measuring
# ------------------------------------------------------------------------------------------------


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def decode_weight_bytes(model) -> int:
    """Bytes a decode step reads of the model's weights: all of them but the embedding table
    (only the batch's rows of it are gathered)."""
    return tensor_bytes(p for n, p in model.named_parameters() if n != "embed_tokens.weight")


def measure_bandwidth(device: torch.device, nbytes: int | None = None, iters: int = 10) -> float:
    """Device copy bandwidth in GB/s, counting read + write (the ceiling the floors divide by)."""
    nbytes = nbytes or (2 << 30 if device.type == "cuda" else 64 << 20)
    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    dst.copy_(src)
    sync(device)
    t0 = time.perf_counter()
    for _ in range(iters):
        dst.copy_(src)
    sync(device)
    return 2 * nbytes * iters / (time.perf_counter() - t0) / 1e9


def forward_flops_per_token(cfg, ctx: float) -> float:
    """Matmul FLOPs of one token through every layer (lm_head excluded) at attention context `ctx`:
    the projections, the naive-form attention (QK over the qk head dim, PV over v per head and
    context token), top-k routed + shared experts or the dense MLP. A simulated rank computes about
    top-k expert rows per token of its own (the loopback), so this is its share too."""
    h, heads = cfg.hidden_size, cfg.num_attention_heads
    qk, v = cfg.qk_head_dim, cfg.v_head_dim
    q = h * heads * qk if cfg.q_lora_rank is None else h * cfg.q_lora_rank + cfg.q_lora_rank * heads * qk
    attn = (q + h * cfg.kv_cache_dim + cfg.kv_lora_rank * heads * (cfg.qk_nope_head_dim + v)
            + heads * v * h + ctx * heads * (qk + v))
    moe = 3 * h * cfg.moe_intermediate_size * (cfg.num_experts_per_tok + cfg.n_shared_experts)
    dense = 3 * h * cfg.intermediate_size
    ffn = sum(moe if cfg.is_moe_layer(i) else dense for i in range(cfg.num_hidden_layers))
    return 2.0 * (cfg.num_hidden_layers * attn + ffn)


def measure_fp8_tflops(device: torch.device, n: int = 8192, iters: int = 10) -> float | None:
    """Dense e4m3 matmul rate (torch._scaled_mm, per-tensor scales, BF16 out) in TFLOP/s; None off CUDA."""
    if device.type != "cuda":
        return None
    a = torch.randn(n, n, device=device).to(torch.float8_e4m3fn)
    b = torch.randn(n, n, device=device).to(torch.float8_e4m3fn).t()
    one = torch.ones((), device=device)

    def mm():
        return torch._scaled_mm(a, b, scale_a=one, scale_b=one, out_dtype=torch.bfloat16)

    mm()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(iters):
        mm()
    sync(device)
    return 2 * n**3 * iters / (time.perf_counter() - t0) / 1e12


def percentile(xs: list[float], p: float) -> float:
    """Linear-interpolated percentile `p` in [0, 100]; NaN for no samples."""
    if not xs:
        return math.nan
    s = sorted(xs)
    k = (len(s) - 1) * p / 100
    lo = math.floor(k)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def summary(xs: list[float]) -> dict[str, float]:
    return {"p50": percentile(xs, 50), "p99": percentile(xs, 99), "mean": statistics.fmean(xs) if xs else math.nan}


def emit(result: dict) -> None:
    """The benchmark's figures as its last output line: one JSON object (NaN as null)."""
    clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in result.items()}
    print(json.dumps(clean), flush=True)


def maybe_plot(path: str | None, draw) -> None:
    """`draw(plt)` into a PNG at `path`, when matplotlib imports."""
    if not path:
        return
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"--plot {path}: matplotlib is not installed; no plot written")
        return
    fig = plt.figure(figsize=(7, 4.5))
    draw(plt)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print(f"plot written to {path}")


def random_prompt(gen: torch.Generator, length: int, vocab: int) -> list[int]:
    """Token ids in [2, min(vocab, 30000)) (no BOS / EOS), deterministic from `gen`."""
    return torch.randint(2, min(vocab, 30000), (length,), generator=gen).tolist()
