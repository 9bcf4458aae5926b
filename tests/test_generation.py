"""Offline generation on CPU: the embedded tiny model, batching, paging, validation."""

import pytest
import torch

from nmoe.serve import LLM, SamplingParams
from nmoe.serve.tiny_prompts import FIXED_PROMPTS

GREEDY = SamplingParams(max_tokens=12, temperature=0.0, logprobs=True, ignore_eos=True)


@pytest.fixture(scope="module")
def tiny_llm():
    return LLM(model="tiny", num_pages=96, page_size=16, max_seq_len=1024)


@pytest.fixture(scope="module")
def random_llm(tiny_random_dir):
    return LLM(model=tiny_random_dir, num_pages=96, page_size=16, max_seq_len=1024)


def test_tiny_model_completes_its_fixed_prompts(tiny_llm):
    outs = tiny_llm.generate([p for p, _ in FIXED_PROMPTS], SamplingParams(max_tokens=8, temperature=0.0))
    for (prompt, want), out in zip(FIXED_PROMPTS, outs):
        assert out.text.startswith(want), (prompt, out.text)
        assert out.finish_reason == "stop"  # the model ends the sentence with EOS


def test_generate_accepts_ids_and_text_and_reports_logprobs(tiny_llm):
    out = tiny_llm.generate([[0, 5, 17], "some text"], SamplingParams(max_tokens=5, temperature=0.0, logprobs=True,
                                                                      ignore_eos=True))
    for o in out:
        assert len(o.token_ids) == 5 and len(o.logprobs) == 5
        assert all(lp <= 0 for lp in o.logprobs)
        assert o.finish_reason == "length"


def _prompts():
    g = torch.Generator().manual_seed(3)
    return [torch.randint(2, 500, (n,), generator=g).tolist() for n in (3, 17, 40, 70, 5)]


def test_mixed_length_batch_equals_each_alone(random_llm):
    prompts = _prompts()
    together = random_llm.generate(prompts, GREEDY)
    for p, t in zip(prompts, together):
        alone = random_llm.generate([p], GREEDY)[0]
        assert alone.token_ids == t.token_ids
        assert max(abs(a - b) for a, b in zip(alone.logprobs, t.logprobs)) < 1e-4


def test_paged_decode_across_pages_equals_naive_recompute(random_llm):
    """Decoding through page boundaries (page 16) gives the tokens of a full recompute each step."""
    model = random_llm.engine.model
    prompt = _prompts()[2][:30]
    out = random_llm.generate([prompt], SamplingParams(max_tokens=24, temperature=0.0, logprobs=True, ignore_eos=True))[0]
    ids = list(prompt)
    with torch.no_grad():
        for tok, lp in zip(out.token_ids, out.logprobs):
            ref = torch.log_softmax(model.forward_dense(torch.tensor([ids]))[0, -1].float(), -1)
            assert int(ref.argmax()) == tok
            assert abs(float(ref[tok]) - lp) < 1e-4
            ids.append(tok)


def test_stop_strings_and_stop_token_ids(tiny_llm):
    out = tiny_llm.generate("The capital of France is", SamplingParams(max_tokens=8, temperature=0.0, stop=["ris"]))[0]
    assert out.text == " Pa" and out.finish_reason == "stop"
    full = tiny_llm.generate("The capital of France is", SamplingParams(max_tokens=8, temperature=0.0))[0]
    out = tiny_llm.generate("The capital of France is",
                            SamplingParams(max_tokens=8, temperature=0.0, stop_token_ids=[full.token_ids[0]]))[0]
    assert out.token_ids == full.token_ids[:1] and out.finish_reason == "stop"


@pytest.mark.parametrize(
    "prompt, params, message",
    [
        ([], SamplingParams(max_tokens=4), "empty"),
        ([0, 10**6], SamplingParams(max_tokens=4), "outside the vocabulary [0, 512)"),
        ([-1], SamplingParams(max_tokens=4), "outside the vocabulary"),
        ([1, 2, 3], SamplingParams(max_tokens=1022), "exceeds max_seq_len 1024"),
    ],
)
def test_invalid_requests_raise_value_error_naming_the_limit(tiny_llm, prompt, params, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace(")", r"\)").replace("(", r"\(")):
        tiny_llm.generate([prompt], params)


def test_sampling_params_validation():
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0.0)
    with pytest.raises(ValueError, match="max_tokens"):
        SamplingParams(max_tokens=-1)
    with pytest.raises(TypeError, match="unknown ServeConfig field"):
        LLM(model="tiny", num_pagez=4)
