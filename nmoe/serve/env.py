"""Every `NMOE_*` environment variable nmoe reads, typed, read once, in one place."""

from __future__ import annotations

import os
from dataclasses import dataclass


def _int(name: str, default: int | None) -> int | None:
    v = os.environ.get(name)
    if v is None or v == "":
        return default
    try:
        return int(v)
    except ValueError as e:
        raise ValueError(f"{name}={v!r} is not an integer") from e


def _float(name: str, default: float) -> float:
    v = os.environ.get(name)
    if v is None or v == "":
        return default
    try:
        return float(v)
    except ValueError as e:
        raise ValueError(f"{name}={v!r} is not a number") from e


def _str(name: str, default: str) -> str:
    v = os.environ.get(name)
    return default if v is None or v == "" else v


def _names(name: str, default: str) -> tuple[str, ...]:
    """A comma-separated list; "none" or "0" is the empty one."""
    v = _str(name, default).strip()
    return () if v in ("none", "0") else tuple(n.strip() for n in v.split(",") if n.strip())


@dataclass(frozen=True)
class Env:
    model_path: str  # NMOE_MODEL_PATH: model for the torchrun modules ("tiny" = the embedded model)
    ep_transport: str  # NMOE_EP_TRANSPORT: a2a | deepep | local
    deepep_low_latency: str  # NMOE_DEEPEP_LOW_LATENCY: 0 | 1 | auto
    fault_inject: str  # NMOE_FAULT_INJECT: "<rank>:<step>"
    test_tol: float  # NMOE_TEST_TOL
    test_tokens: int  # NMOE_TEST_TOKENS
    tf_logprob_tol: float  # NMOE_TF_LOGPROB_TOL
    rl_logprob_tol: float  # NMOE_RL_LOGPROB_TOL
    test_timeout_s: float  # NMOE_TEST_TIMEOUT_S: wall-clock guard of the torchrun modules
    dist_timeout_s: float  # NMOE_DIST_TIMEOUT_S: gloo/NCCL collective timeout (a dead peer's backstop)
    ep_placement: str  # NMOE_EP_PLACEMENT: contiguous | striped (the torchrun modules' engines)
    device: str  # NMOE_DEVICE: the torchrun modules' device ("" = cuda when available, else cpu)
    api_key: str  # NMOE_API_KEY
    cache_dir: str  # NMOE_CACHE_DIR
    side_stream: tuple[str, ...]  # NMOE_SIDE_STREAM: the tasks run on a second CUDA stream (side_stream.py)
    engine_stream_priority: int | None  # NMOE_ENGINE_STREAM_PRIORITY: the engine stream's CUDA priority (None: highest)

    @classmethod
    def read(cls) -> Env:
        return cls(
            model_path=_str("NMOE_MODEL_PATH", "tiny"),
            ep_transport=_str("NMOE_EP_TRANSPORT", "a2a"),
            deepep_low_latency=_str("NMOE_DEEPEP_LOW_LATENCY", "auto"),
            fault_inject=_str("NMOE_FAULT_INJECT", ""),
            test_tol=_float("NMOE_TEST_TOL", 1e-4),
            test_tokens=_int("NMOE_TEST_TOKENS", 256),
            tf_logprob_tol=_float("NMOE_TF_LOGPROB_TOL", 0.25),
            rl_logprob_tol=_float("NMOE_RL_LOGPROB_TOL", 0.2),
            test_timeout_s=_float("NMOE_TEST_TIMEOUT_S", 300.0),
            dist_timeout_s=_float("NMOE_DIST_TIMEOUT_S", 600.0),
            ep_placement=_str("NMOE_EP_PLACEMENT", "contiguous"),
            device=_str("NMOE_DEVICE", ""),
            api_key=_str("NMOE_API_KEY", ""),
            cache_dir=_str("NMOE_CACHE_DIR", os.path.join(os.path.expanduser("~"), ".cache", "nmoe")),
            side_stream=_names("NMOE_SIDE_STREAM", "shared"),
            engine_stream_priority=_int("NMOE_ENGINE_STREAM_PRIORITY", None),
        )


ENV = Env.read()
