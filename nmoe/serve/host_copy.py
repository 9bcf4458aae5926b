"""Host data onto the device without stalling the host.

torch's blocking host-to-device copy (`torch.tensor(..., device=cuda)`, `.to(cuda)`) synchronizes the
current stream after queueing the copy, so the host waits for every kernel already queued: in the
engine, for the step in flight, which is the very work the overlap means to hide. A non-blocking
copy from a freshly built host tensor returns once CUDA has staged the bytes and runs in stream
order, so the kernels that follow still see them.
"""

from __future__ import annotations

import torch


def to_device(data, device: torch.device | str, dtype: torch.dtype | None = None) -> torch.Tensor:
    """`data` (a list or a CPU tensor) as a tensor on `device`; on CUDA without waiting for the stream."""
    t = data if isinstance(data, torch.Tensor) else torch.tensor(data, dtype=dtype)
    if dtype is not None and t.dtype != dtype:
        t = t.to(dtype)
    device = torch.device(device)
    if device.type != "cuda":
        return t.to(device)
    # pinned: the copy is a true DMA queued on the stream (torch keeps the block until it is done)
    return t.pin_memory().to(device, non_blocking=True)
