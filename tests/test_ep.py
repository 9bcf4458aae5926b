"""The seed's EP torchrun modules on CPU at world sizes 1, 2 and 8, and the fault-injection case."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODULES = [
    "nmoe.serve.test_moe_deepep_vs_localmask",
    "nmoe.serve.test_zero_token_dispatch",
    "nmoe.serve.test_dynamic_disagg_advanced",
    "nmoe.serve.test_generation_multi",
]
GUARD_S = 150  # each module's own wall-clock guard (NMOE_TEST_TIMEOUT_S); the launch gets a bit more


def torchrun(module: str, nproc: int, **env) -> tuple[subprocess.CompletedProcess, float]:
    full_env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "NMOE_TEST_TIMEOUT_S": str(GUARD_S),
        "NMOE_DIST_TIMEOUT_S": "60",
        **env,
    }
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "-m", module]
    start = time.time()
    proc = subprocess.run(cmd, cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=GUARD_S + 60)
    return proc, time.time() - start


def _check_ok(proc: subprocess.CompletedProcess, module: str, nproc: int) -> None:
    name = module.rsplit(".", 1)[1]
    ok = {int(r) for r in re.findall(rf"{name} rank (\d+)/{nproc}: OK", proc.stdout)}  # lines may interleave
    assert proc.returncode == 0 and ok == set(range(nproc)), (
        f"{module} at {nproc} ranks: rc={proc.returncode}\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    )


# N=2 runs with striped placement (and the generation module with the low-latency layout for its
# decode steps), N=1 and N=8 with contiguous placement: both placements without more launches.
VARIANT = {
    1: {},
    2: {"NMOE_EP_PLACEMENT": "striped", "NMOE_DEEPEP_LOW_LATENCY": "1"},
    8: {},
}


@pytest.mark.parametrize("nproc", [1, 2, 8])
@pytest.mark.parametrize("module", MODULES)
def test_module(module, nproc):
    proc, wall = torchrun(module, nproc, **VARIANT[nproc])
    _check_ok(proc, module, nproc)
    print(f"{module} nproc={nproc}: {wall:.1f}s")


def test_fault_injection_stops_every_rank():
    """Rank 1 raises inside the forward of step 2: every rank prints who failed and exits non-zero."""
    nproc = 8
    proc, wall = torchrun("nmoe.serve.test_generation_multi", nproc, NMOE_FAULT_INJECT="1:2")
    assert proc.returncode != 0
    want = "rank 1 failed at step 2: FaultInjected: injected fault (NMOE_FAULT_INJECT=1:2)"
    for r in range(nproc):
        assert f"nmoe rank {r}: stopping: {want}" in proc.stderr, proc.stderr[-4000:]
    assert "Timeout" not in proc.stderr  # stopped by the protocol, not by the wall-clock guard
    print(f"fault injection nproc={nproc}: {wall:.1f}s")


def test_generation_from_ep_shards(tmp_path):
    from nmoe.serve import shards
    from nmoe.serve.ckpt import TINY_DIR

    out = tmp_path / "tiny-ep2-tp1"
    shards.convert(TINY_DIR, str(out), 2, "contiguous", progress=False)
    proc, _ = torchrun("nmoe.serve.test_generation_multi", 2, NMOE_MODEL_PATH=str(out))
    _check_ok(proc, "nmoe.serve.test_generation_multi", 2)


def test_generation_random_model(tiny_random_dir):
    """Equality with world size 1 holds for any model, not only the trained tiny one."""
    proc, _ = torchrun("nmoe.serve.test_generation_multi", 2, NMOE_MODEL_PATH=tiny_random_dir)
    _check_ok(proc, "nmoe.serve.test_generation_multi", 2)
