"""Shared by the CUDA kernel tests: `torch.ops.nmoe`, or a skip naming what is missing."""

from __future__ import annotations

import pytest
import torch


def nmoe_ops(name: str):
    """`torch.ops.nmoe` when a CUDA device is present and `nmoe._C` registers `name`, else skip."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    try:
        import nmoe._C  # noqa: F401
    except ImportError:
        pass
    if not hasattr(torch.ops.nmoe, name):
        pytest.skip("nmoe._C (CUDA kernels) is not built")
    return torch.ops.nmoe
