"""The RL torchrun modules on CPU at world sizes 1, 2 and 8 (and the low-latency EP layout)."""

import pytest
from test_ep import _check_ok, torchrun

MODULES = ["nmoe.serve.test_teacher_forcing_logprobs", "nmoe.serve.test_profiles_correctness"]


@pytest.mark.parametrize("nproc", [1, 2, 8])
@pytest.mark.parametrize("module", MODULES)
def test_rl_module(module, nproc):
    proc, wall = torchrun(module, nproc)
    _check_ok(proc, module, nproc)
    print(f"{module} nproc={nproc}: {wall:.1f}s")
    print("\n".join(line for line in proc.stdout.splitlines() if " OK " in line))


def test_profiles_low_latency_layout():
    module = "nmoe.serve.test_profiles_correctness"
    proc, _ = torchrun(module, 2, NMOE_DEEPEP_LOW_LATENCY="1")
    _check_ok(proc, module, 2)
