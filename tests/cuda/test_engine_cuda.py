"""The engine on CUDA against the CPU path on the tiny models: greedy tokens equal, logprob gap reported."""

import pytest
import torch
from cuda_support import greedy_agreement

from nmoe.serve import LLM, SamplingParams
from nmoe.serve.tiny_prompts import FIXED_PROMPTS

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _llm(device: str, model: str, kv_cache_dtype: str = "auto", **kw) -> LLM:
    return LLM(model=model, device=device, num_pages=128, page_size=64, max_seq_len=2048, kv_cache_dtype=kv_cache_dtype,
               **kw)


def _run(device: str, model: str, prompts, kv_cache_dtype: str = "auto"):
    # fp32 weights on both sides: the comparison isolates the CUDA ops from FP8 rounding (the FP8
    # path is compared in tests/test_benchmarks.py::test_fp8_engine_cuda_matches_cpu)
    return _llm(device, model, kv_cache_dtype, weights_format="fp32").generate(
        prompts, SamplingParams(max_tokens=12, temperature=0.0, logprobs=True, ignore_eos=True)
    )


@pytest.mark.parametrize("kv", ["auto", "bfloat16"])
@pytest.mark.parametrize("model", ["tiny", "random"])
def test_cuda_engine_matches_cpu(model, kv, tiny_random_dir):
    path = "tiny" if model == "tiny" else tiny_random_dir
    g = torch.Generator().manual_seed(0)
    prompts = [p for p, _ in FIXED_PROMPTS] + [torch.randint(2, 500, (n,), generator=g).tolist() for n in (5, 70, 300)]
    cpu, gpu = _run("cpu", path, prompts), _run("cuda", path, prompts, kv)
    same, worst = greedy_agreement(cpu, gpu)
    print(f"{model}, kv cache {kv}: identical greedy tokens {same}/{len(prompts)}, max |logprob diff| {worst:.3e}")
    if model == "tiny":
        for (prompt, want), out in zip(FIXED_PROMPTS, gpu):
            assert out.text.startswith(want), (prompt, out.text)
    if kv == "auto":  # fp32 cache at these widths: the CUDA path must agree with the CPU path
        assert same == len(prompts) and worst < 1e-3
    else:  # a BF16 cache rounds every latent; near-ties may flip
        assert same >= len(prompts) - 3 and worst < 0.5


@pytest.mark.parametrize("steps", ["decode", "mixed"])
@pytest.mark.parametrize("model", ["tiny", "random"])
def test_cuda_graph_steps_match_eager(model, steps, tiny_random_dir):
    """Steps replayed from CUDA graphs (several buckets, padded rows) with the overlap on: bitwise
    the same as the same static padded forward run eagerly, and the same tokens as
    `--disable-cuda-graph --disable-overlap`. "mixed": 64-token prefill steps, so the long prompts
    prefill in chunks beside the short ones' decodes, replayed piecewise."""
    from nmoe.serve.step_graphs import StepGraphs

    path = "tiny" if model == "tiny" else tiny_random_dir
    kw = dict(max_prefill_tokens=64, chunk_size=32) if steps == "mixed" else {}
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(2, 500, (n,), generator=g).tolist() for n in (3, 9, 40, 120, 7, 66, 250)]
    params = [SamplingParams(max_tokens=4 + 3 * i, temperature=0.0, logprobs=True, ignore_eos=True)
              for i in range(len(prompts))]  # the batch shrinks: buckets 8, 4, 2, 1
    eager = _llm("cuda", path, disable_cuda_graph=True, disable_overlap=True, **kw).generate(prompts, params)
    llm = _llm("cuda", path, **kw)
    graphed = llm.generate(prompts, params)
    runner = llm.engine._graphs
    assert runner is not None and len([k for k in runner.graphs if k[1] == 0]) >= 3, "decode steps were not captured"
    if steps == "mixed":
        assert any(d and p for d, p in runner.graphs), "mixed steps were not captured"
        assert all(len(g) == llm.engine.model_cfg.num_hidden_layers + 1 for g, _, _ in
                   (runner.graphs[k] for k in runner.graphs if k[1])), "a step with prefill rows is one graph per layer + 1"

    static_llm = _llm("cuda", path, **kw)
    eng = static_llm.engine
    static_runner = StepGraphs(eng.model, eng.kv_caches, eng.cfg.max_batch_size, runner.max_pages,
                               eng.cfg.cuda_graph_prefill_tokens, capture=False)
    eng.step_graphs = lambda: static_runner
    static = static_llm.generate(prompts, params)

    for b, c in zip(graphed, static):
        assert b.token_ids == c.token_ids and b.logprobs == c.logprobs  # replay == the captured forward, bitwise
    same, worst = greedy_agreement(eager, graphed)
    diverged = len(prompts) - same
    print(f"{model}: graph buckets {sorted(runner.graphs)}, max |logprob diff| vs --disable-cuda-graph {worst:.3e}, "
          f"{diverged}/{len(prompts)} sequences diverge")
    # The eager run is a different forward: the MLA reference (these widths have no kernel) reduces
    # over each context's length instead of the table's width, and the GEMM libraries see the real
    # row count instead of the bucket's. The trained model's greedy choices are clear, so its tokens
    # must agree; the random model's logits are near-ties, where those last bits may pick another
    # token (and the sequence then continues differently): at most one such sequence.
    assert diverged == 0 if model == "tiny" else diverged <= 1
    # the static path attends over the block table's full width: longer fp32 reductions, whose last
    # bits BF16 activations can turn into visible (but token-preserving) logprob differences
    assert worst < 0.1


def test_engine_stream_priority(monkeypatch):
    """NMOE_ENGINE_STREAM_PRIORITY sets the engine stream's CUDA priority (unset: the device's
    highest; torch clamps it to the range); the engine serves the same tokens at either end."""
    import dataclasses

    from nmoe.serve import engine as engine_mod

    lowest, highest = torch.cuda.Stream.priority_range()
    outs = {}
    for setting, want in ((None, highest), (lowest, lowest), (-1000, highest)):  # None: the default
        monkeypatch.setattr(engine_mod, "ENV", dataclasses.replace(engine_mod.ENV, engine_stream_priority=setting))
        llm = _llm("cuda", "tiny", weights_format="fp32")
        assert llm.engine.stream.priority == want, setting
        outs[setting] = llm.generate([FIXED_PROMPTS[0][0]], SamplingParams(max_tokens=4, temperature=0.0))[0].token_ids
    assert outs[None] == outs[lowest] == outs[-1000]
