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


def greedy_agreement(xs, ys) -> tuple[int, float]:
    """Two runs' outputs of the same requests: (how many token sequences are identical, the largest
    |logprob difference| over each pair's common prefix of tokens)."""
    same, worst = 0, 0.0
    for a, b in zip(xs, ys):
        same += a.token_ids == b.token_ids
        n = 0
        while n < len(a.token_ids) and a.token_ids[n] == b.token_ids[n]:
            n += 1
        worst = max([worst] + [abs(x - y) for x, y in zip(a.logprobs[:n], b.logprobs[:n])])
    return same, worst
