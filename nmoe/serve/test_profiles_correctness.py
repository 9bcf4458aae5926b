"""Each profile's contract, with rank 0 driving and the other ranks running T=0 steps:
finish_reason set, outputs non-empty and finite, logprobs aligned with tokens, top-k rows of length
k, LOGITS argmax equal to the greedy tokens, a 1024-token prompt through paged prefill; and
`rl_sample` at temperature 1 with a fixed seed rerun in a different batch mix gives identical tokens
with logprob drift <= NMOE_RL_LOGPROB_TOL (default 0.2).

    torchrun --nproc_per_node=N -m nmoe.serve.test_profiles_correctness   (also NMOE_DEEPEP_LOW_LATENCY=1)
"""

from __future__ import annotations

import math

import torch

from nmoe.serve.env import ENV
from nmoe.serve.ep import testing
from nmoe.serve.profiles import PROFILES
from nmoe.serve.request import OutputMode, SamplingParams
from nmoe.serve.rl_scenarios import max_drift, run_phase

NEW = 6


def _prompts(vocab: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(0)
    short = [[0] + torch.randint(2, vocab, (n,), generator=g).tolist() for n in (9, 23)]
    return short + [[0] + torch.randint(2, vocab, (1023,), generator=g).tolist()]


def check_profile(name: str, outs, params) -> list[str]:
    bad = []
    for out in outs:
        tag = f"{name} rid {out.request_id}"
        if out.finish_reason not in ("stop", "length"):
            bad.append(f"{tag}: finish_reason {out.finish_reason!r}")
        if not out.token_ids:
            bad.append(f"{tag}: no tokens")
        mode = params.mode
        if mode is OutputMode.TOKENS:
            continue
        if len(out.logprobs) != len(out.token_ids) or not all(math.isfinite(x) for x in out.logprobs):
            bad.append(f"{tag}: {len(out.logprobs)} logprobs for {len(out.token_ids)} tokens, or not finite")
        k = params.num_top_logprobs
        if k and (len(out.top_logprobs) != len(out.token_ids) or any(len(r) != k for r in out.top_logprobs)):
            bad.append(f"{tag}: top-k rows not all of length {k}")
        if mode is OutputMode.LOGITS:
            if out.logits is None or out.logits.shape[0] != len(out.token_ids) or not torch.isfinite(out.logits).all():
                bad.append(f"{tag}: logits missing, misaligned or not finite")
            elif out.logits.argmax(-1).tolist() != out.token_ids:
                bad.append(f"{tag}: LOGITS argmax differs from the greedy tokens")
    return bad


def scenario(ctx):
    engine = testing.build_engine(ctx, max_seq_len=1536, num_pages=256, chunk_size=256, max_prefill_tokens=512)
    prompts = _prompts(engine.model_cfg.vocab_size)
    drive = ctx.rank == 0
    problems: list[str] = []
    rid = 0
    for name in PROFILES:
        params = SamplingParams(max_tokens=NEW, temperature=0.0, profile=name, seed=5, ignore_eos=True)
        reqs = [(rid + i, p, params, None) for i, p in enumerate(prompts)] if drive else []
        rid += len(prompts)
        outs = run_phase(engine, ctx, reqs)
        if drive:
            problems += check_profile(name, [outs[r] for r, *_ in reqs], params)
    # rl_sample, temperature 1, fixed seed: alone, then among other requests
    rl = SamplingParams(max_tokens=12, temperature=1.0, profile="rl_sample", seed=77, ignore_eos=True)
    filler = SamplingParams(max_tokens=8, temperature=1.0, ignore_eos=True)
    alone = run_phase(engine, ctx, [(1000, prompts[1], rl, None)] if drive else [])
    crowd = [(1001 + i, p[: 5 + 7 * i], filler, None) for i, p in enumerate(prompts * 2)]
    mixed = run_phase(engine, ctx, (crowd[:3] + [(1100, prompts[1], rl, None)] + crowd[3:]) if drive else [])
    drift = 0.0
    if drive:
        a, b = alone[1000], mixed[1100]
        if a.token_ids != b.token_ids:
            problems.append(f"rl_sample rerun in another batch mix: tokens {b.token_ids} != {a.token_ids}")
        drift = max_drift(a.logprobs, b.logprobs)
        if drift > ENV.rl_logprob_tol:
            problems.append(f"rl_sample rerun drift {drift:.3g} > NMOE_RL_LOGPROB_TOL {ENV.rl_logprob_tol}")
    drift = testing.all_max(ctx, drift)
    if not testing.all_ok(ctx, not problems):
        raise AssertionError("; ".join(problems) or "rank 0 failed")
    return {"profiles": len(PROFILES), "rl_rerun_drift": drift}


if __name__ == "__main__":
    testing.main(scenario, "test_profiles_correctness")
