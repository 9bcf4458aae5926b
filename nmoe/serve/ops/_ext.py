"""Loads the optional CUDA extension `nmoe._C` once; reports its absence once."""

from __future__ import annotations

import functools
import logging

import torch

log = logging.getLogger("nmoe")


@functools.cache
def cuda_ops_available() -> bool:
    """True when `nmoe._C` is importable and a CUDA device exists; its ops are then `torch.ops.nmoe.*`."""
    if not torch.cuda.is_available():
        return False
    try:
        import nmoe._C  # noqa: F401
    except ImportError as e:
        log.warning("nmoe._C (CUDA kernels) is not built (%s); using the torch reference ops", e)
        return False
    return True


def use_cuda(*tensors: torch.Tensor) -> bool:
    """Whether an op on these tensors should run the CUDA kernel rather than the torch reference."""
    return all(t.is_cuda for t in tensors) and cuda_ops_available()
