"""Parity with transformers' DeepseekV3ForCausalLM on weights dequantized from the same FP8 checkpoint."""

import pytest
import torch

from nmoe.serve import LLM, SamplingParams
from nmoe.serve.ckpt import load_config, load_weights, write_dequantized
from nmoe.serve.model import DeepseekV3

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def hf_model(tiny_random_dir, tmp_path_factory):
    dst = str(tmp_path_factory.mktemp("dequant"))
    write_dequantized(tiny_random_dir, dst)
    m = transformers.DeepseekV3ForCausalLM.from_pretrained(dst, dtype=torch.float32, attn_implementation="eager")
    return m.eval()


PROMPTS = [
    [0, 5, 17, 42, 99, 3],
    list(range(2, 40)),
    [0] + [(i * 37 + 11) % 500 + 2 for i in range(90)],  # longer than a page of 64
]


def _hf_greedy(model, ids: list[int], n: int) -> tuple[list[int], list[float]]:
    ids = list(ids)
    toks, lps = [], []
    with torch.no_grad():
        for _ in range(n):
            logits = model(torch.tensor([ids])).logits[0, -1].float()
            lp = torch.log_softmax(logits, -1)
            t = int(torch.argmax(lp))
            toks.append(t)
            lps.append(float(lp[t]))
            ids.append(t)
    return toks, lps


def test_prefill_logits_match_transformers(tiny_random_dir, hf_model):
    cfg = load_config(tiny_random_dir)
    ours = DeepseekV3(cfg)
    ours.load_hf(load_weights(tiny_random_dir, cfg, progress=False))
    with torch.no_grad():
        for ids in PROMPTS:
            a = torch.log_softmax(ours.forward_dense(torch.tensor([ids]))[0].float(), -1)
            b = torch.log_softmax(hf_model(torch.tensor([ids])).logits[0].float(), -1)
            diff = (a - b).abs().max().item()
            print(f"prefill len {len(ids)}: max |logprob diff| {diff:.2e}")
            assert diff < 1e-4


def test_greedy_generation_matches_transformers(tiny_random_dir, hf_model):
    llm = LLM(model=tiny_random_dir, num_pages=64, page_size=64, max_seq_len=512)
    params = SamplingParams(max_tokens=32, temperature=0.0, logprobs=True, ignore_eos=True)
    outs = llm.generate(PROMPTS, params)
    worst = 0.0
    for ids, out in zip(PROMPTS, outs):
        toks, lps = _hf_greedy(hf_model, ids, 32)
        assert out.token_ids == toks
        worst = max(worst, max(abs(a - b) for a, b in zip(out.logprobs, lps)))
    print(f"32 greedy tokens x {len(PROMPTS)} prompts: max |logprob diff| {worst:.2e}")
    assert worst < 1e-4


def test_teacher_forced_scores_match_transformers(tiny_random_dir, hf_model):
    llm = LLM(model=tiny_random_dir, num_pages=64, page_size=16, max_seq_len=512, chunk_size=32)
    g = torch.Generator().manual_seed(11)
    prompt = PROMPTS[1]
    forced = torch.randint(2, 500, (70,), generator=g).tolist()  # not the model's choices; > 2 chunks
    ours = llm.score(prompt, forced)
    with torch.no_grad():
        ref = torch.log_softmax(hf_model(torch.tensor([prompt + forced])).logits[0].float(), -1)
    want = [float(ref[len(prompt) - 1 + j, t]) for j, t in enumerate(forced)]
    diff = max(abs(a - b) for a, b in zip(ours.logprobs, want))
    print(f"teacher-forced scores vs transformers: max |diff| {diff:.2e}")
    assert diff < 1e-4
