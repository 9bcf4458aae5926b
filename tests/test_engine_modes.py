"""The engine gives identical results with prefix caching, chunked prefill and mixed steps on or off."""

import pytest
import torch

from nmoe.serve import LLM, SamplingParams

GREEDY = SamplingParams(max_tokens=8, temperature=0.0, logprobs=True, ignore_eos=True)


def _prompts():
    g = torch.Generator().manual_seed(21)
    shared = torch.randint(2, 500, (100,), generator=g).tolist()  # a prefix several prompts share
    return [shared + torch.randint(2, 500, (n,), generator=g).tolist() for n in (5, 30, 77)] + [
        torch.randint(2, 500, (n,), generator=g).tolist() for n in (3, 140)
    ]


def _run(model_dir, **kw):
    llm = LLM(model=model_dir, num_pages=128, page_size=16, max_seq_len=1024, debug_invariants=True, **kw)
    prompts = _prompts()
    first = llm.generate(prompts[:1], GREEDY)  # warms the prefix cache with the shared prefix
    rest = llm.generate(prompts[1:], GREEDY)
    return first + rest, llm.engine.stats


MODES = {
    "default": {},
    "no_prefix_cache": {"disable_prefix_cache": True},
    "unchunked": {"disable_chunked_prefill": True, "max_prefill_tokens": 1024},
    "small_chunks": {"chunk_size": 16, "max_prefill_tokens": 40},
    "no_mixed_steps": {"disable_mixed_steps": True},
}


@pytest.fixture(scope="module")
def reference(tiny_random_dir):
    return _run(tiny_random_dir, disable_prefix_cache=True, disable_chunked_prefill=True, max_prefill_tokens=1024)


@pytest.mark.parametrize("mode", list(MODES))
def test_results_identical_across_modes(tiny_random_dir, reference, mode):
    ref, _ = reference
    outs, _ = _run(tiny_random_dir, **MODES[mode])
    for a, b in zip(ref, outs):
        assert a.token_ids == b.token_ids
        assert max(abs(x - y) for x, y in zip(a.logprobs, b.logprobs)) < 1e-4


def test_prefix_reuse_cuts_prefill_tokens(tiny_random_dir, reference):
    _, cold = reference
    _, warm = _run(tiny_random_dir)
    print(f"prefill tokens: {cold['prefill_tokens']} without prefix cache, {warm['prefill_tokens']} with")
    assert warm["prefill_tokens"] <= cold["prefill_tokens"] - 2 * 96  # two prompts reuse 6 pages of 16


def test_many_chunk_prompt_matches_unchunked():
    g = torch.Generator().manual_seed(5)
    prompt = torch.randint(2, 500, (4096,), generator=g).tolist()
    params = SamplingParams(max_tokens=4, temperature=0.0, logprobs=True, ignore_eos=True)
    chunked = LLM(model="tiny", num_pages=80, page_size=64, max_seq_len=8192, chunk_size=256)
    a = chunked.generate([prompt], params)[0]
    assert chunked.engine.stats["steps"] >= 16 + 3  # 16 prefill chunks, then decodes
    whole = LLM(model="tiny", num_pages=80, page_size=64, max_seq_len=8192, disable_chunked_prefill=True,
                max_prefill_tokens=8192)
    b = whole.generate([prompt], params)[0]
    assert a.token_ids == b.token_ids
    assert max(abs(x - y) for x, y in zip(a.logprobs, b.logprobs)) < 1e-4


@pytest.mark.parametrize("n_prompts,prefill_rows", [(3, 0), (5, 0), (5, 64)])
def test_padded_static_step_matches_eager(tiny_random_dir, n_prompts, prefill_rows):
    """The CUDA-graph step path (static buffers, padded buckets, no host reads), run eagerly on CPU:
    the same tokens and logprobs as the ordinary path. Decode buckets of 4 and 8 give padded rows
    of length 0; with `prefill_rows` the prefill chunks (alone, and beside decodes in mixed steps)
    take the piecewise path too, their attention between the static stretches."""
    from nmoe.serve.step_graphs import StepGraphs

    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(2, 500, (n,), generator=g).tolist() for n in (4, 19, 33, 2, 60)[:n_prompts]]
    params = [SamplingParams(max_tokens=6 + i, temperature=0.0, logprobs=True, ignore_eos=True) for i in range(n_prompts)]
    kw = dict(model=tiny_random_dir, num_pages=64, page_size=16, max_seq_len=256, max_batch_size=16,
              chunk_size=32, max_prefill_tokens=48)
    eager = LLM(**kw).generate(prompts, params)
    llm = LLM(**kw)
    eng = llm.engine
    runner = StepGraphs(eng.model, eng.kv_caches, 16, 256 // 16, max_prefill_tokens=prefill_rows, capture=False)
    shapes = []
    forward = runner._forward
    runner._forward = lambda nd, np_, attend: shapes.append((nd, np_)) or forward(nd, np_, attend)
    eng.step_graphs = lambda: runner
    static = llm.generate(prompts, params)
    assert any(p == 0 for _, p in shapes), "the decode steps did not take the static path"
    if prefill_rows:
        assert any(d and p for d, p in shapes), "no mixed step took the static path"
        assert any(d == 0 and p for d, p in shapes), "no prefill-only step took the static path"
    else:
        assert all(p == 0 for _, p in shapes)
    for a, b in zip(eager, static):
        assert a.token_ids == b.token_ids
        assert max(abs(x - y) for x, y in zip(a.logprobs, b.logprobs)) < 1e-4


def _overlapped(llm: LLM, on: bool) -> LLM:
    """Force the overlap (step k+1 launched before step k is delivered) on or off; it is a CUDA
    feature, but its bookkeeping is device-independent, so the CPU checks it."""
    llm.engine.overlap = on
    return llm


def _outputs(outs):
    return [(o.token_ids, o.text, o.finish_reason, o.logprobs, o.top_logprobs) for o in outs]


@pytest.mark.parametrize("case", ["greedy_prefix_chunks", "stops_and_eos", "seeded_topk", "preemption"])
def test_overlap_matches_sequential(tiny_random_dir, case):
    g = torch.Generator().manual_seed(11)
    rnd = [torch.randint(2, 500, (n,), generator=g).tolist() for n in (5, 40, 90, 17)]
    if case == "greedy_prefix_chunks":
        kw = dict(model=tiny_random_dir, num_pages=128, page_size=16, max_seq_len=1024, chunk_size=32,
                  max_prefill_tokens=48)
        prompts, params = [rnd[2] + rnd[0], rnd[2] + rnd[1]] + rnd, [GREEDY] * 6
    elif case == "stops_and_eos":  # the trained model ends its answers: EOS and stop strings finish early
        kw = dict(model="tiny", num_pages=64, page_size=16, max_seq_len=256)
        prompts = ["The capital of France is", "The capital of Japan is", "Two plus two is", "The largest planet is"]
        params = [SamplingParams(max_tokens=12, temperature=0.0, logprobs=True),
                  SamplingParams(max_tokens=12, temperature=0.0, stop=[" Tok"]),
                  SamplingParams(max_tokens=1, temperature=0.0),
                  SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True)]
    elif case == "seeded_topk":
        kw = dict(model=tiny_random_dir, num_pages=64, page_size=16, max_seq_len=512)
        prompts = rnd
        params = [SamplingParams(max_tokens=7 + i, temperature=0.9, top_k=20, seed=5 + i, logprobs=3, ignore_eos=True)
                  for i in range(4)]
    else:  # a pool too small for all four: the newest are preempted and recomputed mid-decode
        kw = dict(model=tiny_random_dir, num_pages=12, page_size=16, max_seq_len=256)
        prompts, params = rnd, [SamplingParams(max_tokens=30, temperature=0.0, logprobs=True, ignore_eos=True)] * 4
    want = _outputs(_overlapped(LLM(**kw), False).generate(prompts, params))
    llm = _overlapped(LLM(**kw), True)
    assert _outputs(llm.generate(prompts, params)) == want
    while llm.engine.has_work():  # a row launched for a request that finished meanwhile is dropped
        llm.engine.step()
    assert not llm.engine._placeholders and not llm.engine._pending


def test_overlap_teacher_forcing_matches(tiny_random_dir):
    g = torch.Generator().manual_seed(12)
    prompts = [torch.randint(2, 500, (n,), generator=g).tolist() for n in (9, 50)]
    forced = [torch.randint(2, 500, (n,), generator=g).tolist() for n in (20, 45)]
    kw = dict(model=tiny_random_dir, num_pages=64, page_size=16, max_seq_len=512, chunk_size=16, max_prefill_tokens=24)
    a = _overlapped(LLM(**kw), False).score(prompts, forced)
    b = _overlapped(LLM(**kw), True).score(prompts, forced)
    assert [(x.token_ids, x.logprobs) for x in a] == [(x.token_ids, x.logprobs) for x in b]
