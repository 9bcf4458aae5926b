"""A greedy `rl_sample` run of 16 tokens, then a teacher-forced run of the sampled ids: the ids and
lengths must be equal and the logprobs drift at most NMOE_TF_LOGPROB_TOL (default 0.25). Every rank
drives its own prompt (the tiny model's fixed prompts, one per rank), under EP in lockstep.

    torchrun --nproc_per_node=N -m nmoe.serve.test_teacher_forcing_logprobs
"""

from __future__ import annotations

from nmoe.serve.env import ENV
from nmoe.serve.ep import testing
from nmoe.serve.request import SamplingParams
from nmoe.serve.rl_scenarios import max_drift, run_phase
from nmoe.serve.tiny_prompts import FIXED_PROMPTS

NEW_TOKENS = 16


def scenario(ctx):
    engine = testing.build_engine(ctx)
    prompt, _ = FIXED_PROMPTS[ctx.rank % len(FIXED_PROMPTS)]
    ids = engine.tokenizer.encode(prompt + " and so on, ")
    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, profile="rl_sample", seed=1000 + ctx.rank,
                            ignore_eos=True)
    sampled = run_phase(engine, ctx, [(0, ids, params, None)])[0]
    forced = run_phase(engine, ctx, [(1, ids, params, sampled.token_ids)])[1]
    problems = []
    if forced.token_ids != sampled.token_ids:
        problems.append(f"forced ids {forced.token_ids} != sampled {sampled.token_ids}")
    if not (len(sampled.logprobs) == len(forced.logprobs) == len(sampled.token_ids) == NEW_TOKENS):
        problems.append(f"lengths: {len(sampled.token_ids)} tokens, {len(sampled.logprobs)} sampled logprobs, "
                        f"{len(forced.logprobs)} forced logprobs (want {NEW_TOKENS})")
    drift = testing.all_max(ctx, max_drift(sampled.logprobs, forced.logprobs))
    if drift > ENV.tf_logprob_tol:
        problems.append(f"max |logprob drift| {drift:.3g} > NMOE_TF_LOGPROB_TOL {ENV.tf_logprob_tol}")
    if not testing.all_ok(ctx, not problems):
        raise AssertionError("; ".join(problems) or "another rank failed")
    return {"tokens": len(sampled.token_ids), "max_logprob_drift": drift}


if __name__ == "__main__":
    testing.main(scenario, "test_teacher_forcing_logprobs")
