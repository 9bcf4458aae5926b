"""`host_copy.to_device` queues its copy without waiting for the stream's earlier work (a blocking
`.to(cuda)` does wait: the premise of using it in the engine's step path)."""

import pytest
import torch

from nmoe.serve.host_copy import to_device

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

SPIN = int(1e9)  # cycles of torch.cuda._sleep: about half a second of device time


def _busy_stream() -> torch.cuda.Event:
    torch.cuda._sleep(SPIN)
    done = torch.cuda.Event()
    done.record()
    return done


def test_to_device_does_not_wait_for_the_stream():
    done = _busy_stream()
    t = to_device([3, 1, 4], "cuda", torch.long)
    u = to_device(torch.arange(5, dtype=torch.int32), torch.device("cuda"))
    assert not done.query(), "to_device waited for the kernel queued before it"
    torch.cuda.synchronize()
    assert t.dtype == torch.long and t.tolist() == [3, 1, 4]
    assert u.dtype == torch.int32 and u.tolist() == list(range(5))


def test_blocking_copy_waits_for_the_stream():
    done = _busy_stream()
    torch.tensor([1, 2], device="cuda")
    assert done.query(), "a blocking host-to-device copy no longer waits for the stream"

