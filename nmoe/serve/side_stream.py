"""Independent work of a layer run on a second CUDA stream, beside the caller's.

At decode sizes the layer's kernels are short and mostly wait on one another, so two independent
chains finish sooner side by side than one after the other: the shared experts (gate_up GEMM,
SwiGLU-quant, down GEMM) run beside the router and the routed experts, and their output joins at
the combine that adds it. Under CUDA-graph capture the fork and
the join become the graph's edges.

Memory: the side stream starts each task by waiting for the caller's stream and the caller waits
for the task before it reads the result, so a tensor freed by either stream is reused by the
allocator only after every use of it in device order (no `record_stream` needed). A result never
waited for (a failed step) is the side stream's block, which only the side stream reuses, after its
own earlier work.

`NMOE_SIDE_STREAM` (comma-separated, default "shared"; "none" or "0" runs everything on one
stream) names the tasks that go to the side stream; the results are bit-identical either way (the
same kernels on the same inputs).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch

from nmoe.serve.env import ENV

# shared: the shared experts beside the router and the routed experts, joined at the combine. (The
# KV append beside the queries' absorption was measured too: no gain, 32.43 vs 32.40 ms.)
SIDE_TASKS = ("shared",)

_streams: dict[torch.device, torch.cuda.Stream] = {}


@functools.cache
def _checked(names: tuple[str, ...]) -> None:
    """Each task name known; checked once per set of names (not on every layer's call)."""
    for n in names:
        if n not in SIDE_TASKS:
            raise ValueError(f"unknown side-stream task {n!r} (NMOE_SIDE_STREAM takes: {', '.join(SIDE_TASKS)}, or none)")


def side_task_on(name: str) -> bool:
    """Whether the side-stream task `name` (one of `SIDE_TASKS`) is on in `NMOE_SIDE_STREAM`."""
    _checked((name, *ENV.side_stream))
    return name in ENV.side_stream


class Deferred:
    """A result still being computed on the side stream; `get()` makes the current stream wait for it."""

    def __init__(self, value, event: torch.cuda.Event | None):
        self._value, self._event = value, event

    def get(self):
        if self._event is not None:
            torch.cuda.current_stream().wait_event(self._event)
            self._event = None
        return self._value


def beside(task: str, device: torch.device, fn: Callable, *args):
    """`fn(*args)` on the side stream of `device`, returning a `Deferred`, when `device` is a CUDA
    device and the side-stream task `task` is on; otherwise `fn(*args)` itself, run now."""
    if device.type != "cuda" or not side_task_on(task):
        return fn(*args)
    main = torch.cuda.current_stream(device)
    side = _streams.get(device)
    if side is None:
        side = _streams[device] = torch.cuda.Stream(device)
    side.wait_stream(main)
    with torch.cuda.stream(side):
        value = fn(*args)
        event = torch.cuda.Event()
        event.record(side)
    return Deferred(value, event)


def resolved(x):
    """x itself, or a `Deferred`'s value once the current stream has waited for it."""
    return x.get() if isinstance(x, Deferred) else x
