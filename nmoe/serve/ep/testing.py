"""Scenario helpers shared by the seed's EP torchrun modules (`nmoe.serve.test_*`).

Each module is `testing.main(scenario, name)`: join the job, arm a wall-clock guard
(NMOE_TEST_TIMEOUT_S), run `scenario(ctx) -> dict of measurements`, print them on one `OK` line per
rank, exit non-zero on any failure. NMOE_DEVICE (default cuda when available) picks the device,
NMOE_EP_PLACEMENT (contiguous | striped) the expert placement.
"""

from __future__ import annotations

import faulthandler
import os
import sys
import time
import traceback

import torch
import torch.distributed as dist
from torch import nn

from nmoe.serve.dist import DistContext, init_dist, shutdown
from nmoe.serve.env import ENV


def main(scenario, name: str) -> None:
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    ctx = init_dist(ENV.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    # A deadlock must fail: dump every thread's stack and exit 1 after the guard's time.
    faulthandler.dump_traceback_later(ENV.test_timeout_s, exit=True)
    start = time.time()
    code = 0
    try:
        results = scenario(ctx) or {}
        line = " ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in results.items())
        print(f"{name} rank {ctx.rank}/{ctx.world_size}: OK {line} wall={time.time() - start:.2f}s", flush=True)
    except Exception as e:
        traceback.print_exc()
        print(f"{name} rank {ctx.rank}/{ctx.world_size}: FAIL {type(e).__name__}: {e}", file=sys.stderr, flush=True)
        code = 1
    faulthandler.cancel_dump_traceback_later()
    if code == 0:
        shutdown(ctx)
    sys.exit(code)


def placement() -> str:
    """NMOE_EP_PLACEMENT: contiguous (default) | striped, for the modules' engines and layers."""
    return ENV.ep_placement


def small_serve_kwargs(**overrides) -> dict:
    """ServeConfig fields for a small KV pool (the modules run many ranks on few cores)."""
    kw = dict(ckpt=ENV.model_path, num_pages=64, page_size=16, max_seq_len=512, max_batch_size=16,
              max_prefill_tokens=512, chunk_size=256)
    kw.update(overrides)
    return kw


def build_engine(ctx: DistContext, **overrides):
    """This rank's engine (its experts only) for NMOE_MODEL_PATH; the orchestrator attaches the transport."""
    from nmoe.serve.config import ServeConfig
    from nmoe.serve.dist import RankInfo
    from nmoe.serve.engine import Engine

    cfg = ServeConfig(**small_serve_kwargs(device=str(ctx.device), **overrides))
    return Engine(cfg, rank=RankInfo(ctx.rank, ctx.world_size, placement()))


def reference_model_path(engine) -> str:
    """The HF-layout checkpoint behind the engine's model (the source of an EP shard set)."""
    from nmoe.serve import shards

    if shards.is_shard_dir(engine.model_dir):
        return shards.read_manifest(engine.model_dir)["source"]
    return engine.cfg.ckpt


def is_tiny(engine) -> bool:
    """Whether the engine serves the embedded tiny model (directly or as EP shards of it)."""
    from nmoe.serve.ckpt import TINY_DIR, resolve_model_path

    return os.path.realpath(resolve_model_path(reference_model_path(engine))) == os.path.realpath(TINY_DIR)


def all_max(ctx: DistContext, value: float) -> float:
    """The largest `value` over all ranks (the number each module reports)."""
    if not ctx.distributed:
        return value
    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=ctx.cpu_group)
    return float(t)


def all_ok(ctx: DistContext, ok: bool) -> bool:
    """True when `ok` holds on every rank (so all ranks fail together)."""
    if not ctx.distributed:
        return ok
    t = torch.tensor([int(ok)])
    dist.all_reduce(t, op=dist.ReduceOp.MIN, group=ctx.cpu_group)
    return bool(t)


def random_routing(t: int, n_experts: int, k: int, gen: torch.Generator, device="cpu"):
    """Weights `[t, k]` fp32 in (0.1, 1.1) and k distinct expert ids `[t, k]` per token."""
    ids = torch.rand(t, n_experts, generator=gen).argsort(dim=1)[:, :k]
    weights = 0.1 + torch.rand(t, k, generator=gen)
    return weights.to(device), ids.to(device)


class ScaledIdentity(nn.Module):
    """`Experts`-like: expert g returns `scale(g) * x` times the row weight (scale(g) = 1 + g / E, or 1).

    With `scaled=False` combine(dispatch(x)) must equal x times the sum of its weights; with
    scaled experts a row sent to the wrong expert shows up too."""

    def __init__(self, expert_ids: list[int], n_experts: int, scaled: bool = True):
        super().__init__()
        self.expert_ids = list(expert_ids)
        g = torch.tensor(self.expert_ids, dtype=torch.float32)
        self.register_buffer("scale", 1 + g / n_experts if scaled else torch.ones_like(g))
        self.dummy = nn.Parameter(torch.zeros(1))  # dtype / device for `Transport.drain`

    def forward(self, x, local_ids, weights):
        return x * (self.scale[local_ids] * weights)[:, None].to(x.dtype)


def check_close(what: str, got: torch.Tensor, want: torch.Tensor, tol: float) -> float:
    """Max |got - want|; raises AssertionError naming `what` when shapes differ or it exceeds tol."""
    if got.shape != want.shape:
        raise AssertionError(f"{what}: shape {tuple(got.shape)}, expected {tuple(want.shape)}")
    diff = (got.float() - want.float()).abs().max().item() if got.numel() else 0.0
    if not diff <= tol:
        raise AssertionError(f"{what}: max |diff| {diff:.3g} > tol {tol:.3g}")
    return diff


def model_config():
    """The config of NMOE_MODEL_PATH (the modules take E, k and hidden size from it)."""
    from nmoe.serve.ckpt import load_config, resolve_model_path

    return load_config(resolve_model_path(ENV.model_path))


def transport_for(ctx: DistContext, n_experts: int, capacity: int, low_latency: str = "0"):
    """A transport for synthetic layers (no model attached), in `placement()`."""
    from nmoe.serve.ep import make_transport

    return make_transport(ctx, n_experts, placement=placement(), max_tokens_per_rank=capacity, low_latency=low_latency)


def global_counts(ctx: DistContext, ids: torch.Tensor, n_experts: int) -> torch.Tensor:
    """Rows routed to each expert, summed over all ranks `[E]`."""
    c = torch.bincount(ids.flatten().cpu(), minlength=n_experts)
    if ctx.distributed:
        dist.all_reduce(c, group=ctx.cpu_group)
    return c


def roundtrip(ctx: DistContext, transport, x, weights, ids, scaled: bool) -> tuple[float, int]:
    """dispatch -> scaled-identity experts -> combine, checking the received rows per expert, the
    padding of the low-latency layout, and the combined values. Returns (max |diff|, rows received)."""
    n = transport.n_experts
    experts = ScaledIdentity(transport.expert_ids, n, scaled).to(x.device)
    want_counts = global_counts(ctx, ids, n)[transport.expert_ids]
    d = transport.dispatch(x, ids)
    if d.counts.cpu().tolist() != want_counts.tolist():
        raise AssertionError(f"rank {ctx.rank}: received rows per expert {d.counts.tolist()}, expected {want_counts.tolist()}")
    if d.low_latency:
        cap = transport.world_size * transport.max_tokens_per_rank
        if tuple(d.x.shape) != (transport.n_local, cap, x.shape[-1]):
            raise AssertionError(f"rank {ctx.rank}: low-latency buffer {tuple(d.x.shape)}")
        pad = torch.arange(cap, device=x.device)[None, :] >= d.counts[:, None]
        if d.x[pad].abs().sum() != 0:
            raise AssertionError(f"rank {ctx.rank}: low-latency padding rows are not zero")
    elif d.x.shape[0] != int(want_counts.sum()):
        raise AssertionError(f"rank {ctx.rank}: received {d.x.shape[0]} rows, expected {int(want_counts.sum())}")
    from nmoe.serve.ep import run_experts

    y = transport.combine(d, run_experts(experts, d), weights)
    want = expected_scaled_identity(x, weights, ids, n, scaled)
    return check_close(f"rank {ctx.rank} combine(dispatch(x)) T={x.shape[0]}", y, want, 1e-5), int(want_counts.sum())


def expected_scaled_identity(x, weights, ids, n_experts: int, scaled: bool) -> torch.Tensor:
    s = 1 + ids.float() / n_experts if scaled else torch.ones_like(weights)
    return x * (weights * s).sum(-1, keepdim=True).to(x.dtype)
