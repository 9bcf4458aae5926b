"""Random weights at real scale, and the benchmark engine built on them (no checkpoint files).

`random_weights(cfg, experts, device)` returns exactly the dict `ckpt.load_weights` would (HF names,
FP8 e4m3 linear weights with 128x128 `weight_scale_inv`, BF16 embeddings / norms / router /
`lm_head`, fp32 router bias), for the routed experts of one rank only, generated on `device`.

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

from nmoe.serve.ckpt import load_config, model_specs, resolve_model_path, scale_shape
from nmoe.serve.config import ModelConfig, ServeConfig
from nmoe.serve.dist import RankInfo
from nmoe.serve.ops.fp8 import FP8, FP8_MAX

# ------------------------------------------------------------------------------------------------
# DeepSeek-V3's config and random tensors
# ------------------------------------------------------------------------------------------------

FP8_QUANT = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [128, 128]}


def deepseek_v3_config(num_layers: int | None = None) -> ModelConfig:
    """DeepSeek-V3's `config.json` (V3 / V3-0324 / R1 share it); `num_layers` keeps its shape at another depth."""
    cfg = ModelConfig(
        vocab_size=129280, hidden_size=7168, intermediate_size=18432, moe_intermediate_size=2048,
        num_hidden_layers=61, num_attention_heads=128, num_key_value_heads=128, n_routed_experts=256,
        n_shared_experts=1, num_experts_per_tok=8, n_group=8, topk_group=4, kv_lora_rank=512,
        q_lora_rank=1536, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
        first_k_dense_replace=3, num_nextn_predict_layers=1, routed_scaling_factor=2.5, norm_topk_prob=True,
        max_position_embeddings=163840, rms_norm_eps=1e-6, rope_theta=10000.0,
        rope_scaling={"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096, "beta_fast": 32,
                      "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0},
        bos_token_id=0, eos_token_id=1, tie_word_embeddings=False, quantization_config=dict(FP8_QUANT),
    )
    if num_layers is not None:
        cfg = dataclasses.replace(cfg, num_hidden_layers=num_layers)
    cfg.validate("deepseek_v3_config")
    return cfg


# FP8 codes are drawn N(0, CODE_STD) (clipped to +-448) and every block scale is std / CODE_STD, so a
# dequantized weight is about N(0, std) with std = fan_in^-1/2, as trained layers roughly are.
CODE_STD = 32.0


def random_weights(cfg: ModelConfig, experts=None, device: str | torch.device = "cpu",
                   seed: int = 0) -> dict[str, torch.Tensor]:
    """Every tensor inference reads (routed experts limited to `experts`), generated on `device`.

    FP8 specs come as e4m3 codes + fp32 `weight_scale_inv` (each block scale varied by +-10%), which
    needs `cfg.quantization_config`; without it linear weights are BF16."""
    device = torch.device(device)
    g = torch.Generator(device=device).manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    for name, spec in model_specs(cfg, experts).items():
        shape = spec.shape
        if name.endswith("norm.weight"):
            out[name] = (1.0 + 0.1 * torch.randn(shape, generator=g, device=device)).to(torch.bfloat16)
        elif name.endswith("e_score_correction_bias"):
            out[name] = 0.05 * torch.randn(shape, generator=g, device=device)
        elif spec.kind == "fp8":
            std = shape[1] ** -0.5
            codes = torch.randn(shape, generator=g, device=device, dtype=torch.bfloat16) * CODE_STD
            out[name] = codes.clamp_(-FP8_MAX, FP8_MAX).to(FP8)
            jitter = 1.0 + 0.1 * (2 * torch.rand(scale_shape(shape), generator=g, device=device) - 1)
            out[name + "_scale_inv"] = jitter * (std / CODE_STD)
        else:
            std = 1.0 if "embed_tokens" in name else shape[-1] ** -0.5
            out[name] = (torch.randn(shape, generator=g, device=device, dtype=torch.bfloat16) * std)
    return out


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
