"""Profiles: named combinations of output mode and sampling behaviour, selectable per request.

The table below is the only place profiles are defined. Every field changes behaviour:
  output_mode      what each generated (or forced) position returns (engine `_record`)
  top_logprobs     k of TOPK_LOGPROBS (the sampler's top-k rows)
  logprobs_mode    "raw" (model distribution) or "processed" (after temperature/top-k/top-p/min-p)
  seeded           the request's seed must be given (no engine-drawn seed): reruns reproduce it
  solo_forward     fixed batching: the request's tokens are forwarded in a batch of their own and
                   never taken from the prefix cache, so its logits do not depend on what else runs
                   or ran before (world size 1; under EP the experts batch across ranks, see docs/rl.md)
"""

from __future__ import annotations

from dataclasses import dataclass

from nmoe.serve.request import OutputMode, SamplingParams


@dataclass(frozen=True)
class Profile:
    name: str
    output_mode: OutputMode
    top_logprobs: int = 0
    logprobs_mode: str = "raw"
    seeded: bool = False
    solo_forward: bool = False


PROFILES: dict[str, Profile] = {
    p.name: p
    for p in (
        Profile("production_generate", OutputMode.TOKENS),
        Profile("online_distill", OutputMode.TOPK_LOGPROBS, top_logprobs=10),
        Profile("rl_sample", OutputMode.LOGPROBS, logprobs_mode="processed", seeded=True),
        Profile("eval_exact", OutputMode.LOGITS, solo_forward=True),
        Profile("offline_distill", OutputMode.LOGITS),
    )
}


def get_profile(name: str) -> Profile:
    try:
        return PROFILES[name]
    except KeyError:
        raise ValueError(f"unknown profile {name!r}; known: {', '.join(PROFILES)}") from None


def enforce(params: SamplingParams) -> None:
    """Set the fields of `params.profile` on `params` (called by SamplingParams on construction)."""
    p = get_profile(params.profile)
    if p.seeded and params.seed is None:
        raise ValueError(f"profile {p.name!r} needs a seed: pass `seed` so the sample can be reproduced")
    params.output_mode = p.output_mode
    if p.top_logprobs:
        params.logprobs = p.top_logprobs
    elif p.output_mode is not OutputMode.TOKENS:
        params.logprobs = True if not params.num_top_logprobs else params.logprobs
    params.logprobs_mode = p.logprobs_mode
    params.solo_forward = p.solo_forward


def resolve_profile(name: str) -> dict:
    """SamplingParams keyword overrides for a profile (for callers that build params from a request)."""
    get_profile(name)
    return {"profile": name}
