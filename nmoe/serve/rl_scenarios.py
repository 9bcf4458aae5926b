"""Phases of lockstep work for the RL torchrun modules: queue requests, run until every rank is idle."""

from __future__ import annotations

from nmoe.serve.orchestrator import CollectOutputs, Orchestrator
from nmoe.serve.request import RequestOutput, SamplingParams


def run_phase(engine, ctx, requests: list[tuple[int, list[int], SamplingParams, list[int] | None]]
              ) -> dict[int, RequestOutput]:
    """Add (rid, prompt_ids, params, forced_ids) on this rank, then step in lockstep until no rank has
    work (ranks with nothing queued run T=0 steps). Every rank must call it the same number of times."""
    for rid, ids, params, forced in requests:
        engine.add_request(ids, params, rid=rid, forced_output_ids=forced)
    hooks = CollectOutputs()
    Orchestrator(engine, ctx, hooks).run()
    return hooks.outputs


def max_drift(a: list[float], b: list[float]) -> float:
    return max((abs(x - y) for x, y in zip(a, b)), default=0.0)
