"""RL and distillation primitives: output modes, teacher forcing, seeded sampling, profiles."""

import math

import pytest
import torch

from nmoe.serve import LLM, OutputMode, SamplingParams
from nmoe.serve.profiles import PROFILES


@pytest.fixture(scope="module")
def llm(tiny_random_dir):
    return LLM(model=tiny_random_dir, num_pages=160, page_size=16, max_seq_len=2048, chunk_size=64,
               max_prefill_tokens=256)


def _prompt(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(2, 500, (n,), generator=g).tolist()


def test_output_modes_mixed_in_one_batch(llm):
    p = _prompt(20)
    params = [
        SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True),
        SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True, logprobs=True),
        SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True, logprobs=5),
        SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True, output_mode="logits"),
    ]
    tok, lp, topk, logits = llm.generate([p] * 4, params)
    assert tok.logprobs is None and tok.logits is None
    assert tok.token_ids == lp.token_ids == topk.token_ids == logits.token_ids
    assert len(lp.logprobs) == 6 and all(math.isfinite(x) for x in lp.logprobs)
    assert len(topk.top_logprobs) == 6 and all(len(row) == 5 for row in topk.top_logprobs)
    assert [row[0][0] for row in topk.top_logprobs] == topk.token_ids  # greedy: best is chosen
    assert logits.logits.shape == (6, llm.engine.model_cfg.vocab_size) and logits.logits.dtype == torch.float32
    assert logits.logits.argmax(-1).tolist() == logits.token_ids
    ref = torch.log_softmax(logits.logits, -1).gather(1, torch.tensor(lp.token_ids)[:, None])[:, 0]
    assert torch.allclose(ref, torch.tensor(lp.logprobs), atol=1e-5)


def test_teacher_forcing_equals_sampled_logprobs_exactly(llm):
    p = _prompt(30, seed=1)
    out = llm.generate([p], SamplingParams(max_tokens=16, temperature=0.0, logprobs=True, ignore_eos=True))[0]
    sc = llm.score(p, out.token_ids)
    assert sc.token_ids == out.token_ids and sc.logprobs_mode == "raw"
    drift = max(abs(a - b) for a, b in zip(sc.logprobs, out.logprobs))
    print(f"teacher-forcing drift (CPU, 1 rank): {drift:.3e}")
    assert drift < 1e-5


@pytest.mark.parametrize("disable_prefix_cache", [False, True])
def test_forced_longer_than_a_chunk_and_across_pages(tiny_random_dir, disable_prefix_cache):
    llm = LLM(model=tiny_random_dir, num_pages=64, page_size=16, max_seq_len=1024, chunk_size=32,
              max_prefill_tokens=48, disable_prefix_cache=disable_prefix_cache)
    p, forced = _prompt(40, seed=2), _prompt(150, seed=3)
    a = llm.score(p, forced)
    b = llm.score(p, forced)  # second time the prompt's pages may come from the prefix cache
    ref = llm.engine.model.forward_dense(torch.tensor([p + forced]))[0].float().log_softmax(-1)
    want = [float(ref[len(p) - 1 + j, t]) for j, t in enumerate(forced)]
    assert len(a.logprobs) == len(forced) == len(b.logprobs)
    assert max(abs(x - y) for x, y in zip(a.logprobs, want)) < 1e-4
    assert max(abs(x - y) for x, y in zip(a.logprobs, b.logprobs)) < 1e-5


def test_processed_scoring_applies_the_sampling_transforms(llm):
    p = _prompt(12, seed=4)
    params = SamplingParams(temperature=0.7, top_k=5)
    out = llm.generate([p], SamplingParams(max_tokens=4, temperature=0.0, logprobs=10, ignore_eos=True))[0]
    raw = llm.score(p, out.token_ids)
    proc = llm.score(p, out.token_ids, params)
    assert proc.logprobs_mode == "processed"
    assert all(b >= a for a, b in zip(raw.logprobs, proc.logprobs))  # top-k renormalizes upwards
    # a token outside the top 5 has probability 0 under the processed distribution
    sixth = out.top_logprobs[0][6][0]
    assert llm.score(p, [sixth], params).logprobs[0] == float("-inf")
    assert math.isfinite(llm.score(p, [sixth]).logprobs[0])


def test_seeded_sampling_is_invariant_to_batch_mix(llm):
    p = _prompt(25, seed=5)
    params = SamplingParams(max_tokens=12, temperature=1.0, seed=1234, logprobs=True, ignore_eos=True)
    alone = llm.generate([p], params)[0]
    others = [_prompt(5 + 3 * i, seed=100 + i) for i in range(31)]
    mix = llm.generate(others[:13] + [p] + others[13:], [SamplingParams(max_tokens=8, temperature=1.0,
                                                                         ignore_eos=True)] * 13 + [params] +
                       [SamplingParams(max_tokens=8, temperature=1.0, ignore_eos=True)] * 18)[13]
    assert mix.token_ids == alone.token_ids
    drift = max(abs(a - b) for a, b in zip(mix.logprobs, alone.logprobs))
    print(f"seeded rerun in a batch of 32: logprob drift {drift:.3e}")
    assert drift < 1e-4
    other_seed = llm.generate([p], SamplingParams(max_tokens=12, temperature=1.0, seed=99, ignore_eos=True))[0]
    assert other_seed.token_ids != alone.token_ids


def test_profiles_change_behaviour(llm):
    p = _prompt(10, seed=6)
    assert set(PROFILES) == {"production_generate", "online_distill", "rl_sample", "eval_exact", "offline_distill"}
    prod = llm.generate([p], SamplingParams(max_tokens=3, profile="production_generate", ignore_eos=True))[0]
    assert prod.logprobs is None
    od = llm.generate([p], SamplingParams(max_tokens=3, profile="online_distill", ignore_eos=True))[0]
    assert all(len(r) == 10 for r in od.top_logprobs)
    with pytest.raises(ValueError, match="needs a seed"):
        SamplingParams(profile="rl_sample")
    rl = SamplingParams(max_tokens=5, profile="rl_sample", seed=7, top_k=3, ignore_eos=True)
    assert rl.logprobs_mode == "processed" and rl.mode is OutputMode.LOGPROBS
    a, b = llm.generate([p, p], [rl, rl])
    # same tokens; logprobs equal up to the batch-row reduction order of the CPU GEMM (docs/rl.md)
    assert a.token_ids == b.token_ids and max(abs(x - y) for x, y in zip(a.logprobs, b.logprobs)) < 1e-5
    ev = llm.generate([p], SamplingParams(max_tokens=3, temperature=0.0, profile="eval_exact", ignore_eos=True))[0]
    off = llm.generate([p], SamplingParams(max_tokens=3, temperature=0.0, profile="offline_distill", ignore_eos=True))[0]
    assert ev.logits.shape == off.logits.shape == (3, llm.engine.model_cfg.vocab_size)
    assert SamplingParams(profile="eval_exact").solo_forward and not SamplingParams(profile="offline_distill").solo_forward
    with pytest.raises(ValueError, match="unknown profile"):
        SamplingParams(profile="nope")


def test_eval_exact_logits_do_not_depend_on_the_batch(llm):
    p = _prompt(33, seed=8)
    ev = SamplingParams(max_tokens=4, temperature=0.0, profile="eval_exact", ignore_eos=True)
    alone = llm.generate([p], ev)[0]
    crowd = [_prompt(20 + i, seed=200 + i) for i in range(7)]
    mixed = llm.generate(crowd + [p], [SamplingParams(max_tokens=4, ignore_eos=True)] * 7 + [ev])[-1]
    assert torch.equal(alone.logits, mixed.logits)
