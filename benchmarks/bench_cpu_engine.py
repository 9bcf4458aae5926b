"""The engine against transformers' `generate` on the same tiny model, in one process, on CPU.

64 concurrent prompts of mixed lengths, greedy, each wanting its own number of new tokens (EOS
ignored), as real requests do. The engine batches continuously (a finished request leaves, its pages
return); `generate` pads the prompts and runs the whole batch until the longest request is done.
Tokens/s counts the tokens the requests asked for. Also checks that both produce the same tokens
for a sample of prompts (transformers run unpadded, one at a time).

    python benchmarks/bench_cpu_engine.py [--model tiny] [--prompts 64] [--new-tokens 32]
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch

from nmoe.serve import LLM, SamplingParams
from nmoe.serve.ckpt import resolve_model_path, write_dequantized


def prompts(n: int, vocab: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(8, 120, (n,), generator=g).tolist()
    return [[0] + torch.randint(2, vocab, (m,), generator=g).tolist() for m in lengths]


def run_engine(model: str, ps: list[list[int]], new: list[int]) -> tuple[float, list[list[int]]]:
    llm = LLM(model=model, num_pages=512, page_size=64, max_seq_len=1024, max_batch_size=256)
    llm.generate(ps[:2], SamplingParams(max_tokens=2, temperature=0.0))  # warm-up
    t = time.perf_counter()
    outs = llm.generate(ps, [SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True) for n in new])
    return time.perf_counter() - t, [o.token_ids for o in outs]


def load_transformers(model: str):
    from transformers import DeepseekV3ForCausalLM

    with tempfile.TemporaryDirectory() as d:
        write_dequantized(resolve_model_path(model), d)
        return DeepseekV3ForCausalLM.from_pretrained(d, dtype=torch.float32).eval()


def run_transformers(hf, ps: list[list[int]], new: int, eos: int, exact: bool = True) -> tuple[float, list[list[int]]]:
    """Batched greedy generate; `exact` forces `new` tokens (EOS suppressed) as ignore_eos would."""
    width = max(map(len, ps))
    ids = torch.full((len(ps), width), eos, dtype=torch.long)
    mask = torch.zeros(len(ps), width, dtype=torch.long)
    for i, p in enumerate(ps):  # left padding, as batched generation needs
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    kw = dict(max_new_tokens=new, min_new_tokens=new if exact else 0, do_sample=False, pad_token_id=eos)
    with torch.no_grad():
        hf.generate(ids[:2], attention_mask=mask[:2], **{**kw, "max_new_tokens": 2, "min_new_tokens": 2})
        t = time.perf_counter()
        out = hf.generate(ids, attention_mask=mask, **kw)
    return time.perf_counter() - t, out[:, width:].tolist()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=32, help="mean new tokens per request")
    args = ap.parse_args()
    torch.manual_seed(0)
    ps = prompts(args.prompts, 500)
    g = torch.Generator().manual_seed(1)
    new = torch.randint(args.new_tokens // 4, 2 * args.new_tokens - args.new_tokens // 4, (len(ps),), generator=g).tolist()
    n = sum(new)
    t_engine, ours = run_engine(args.model, ps, new)
    hf = load_transformers(args.model)
    t_hf, _ = run_transformers(hf, ps, max(new), eos=1)
    # EOS suppression changes greedy choices, so compare with a plain run up to its first EOS
    check = [run_transformers(hf, [p], k, eos=1, exact=False)[1][0] for p, k in zip(ps[:4], new[:4])]
    same = sum(a[: len(b)] == b for a, b in zip(ours, check))
    print(f"{len(ps)} prompts of 8-120 tokens, {min(new)}-{max(new)} new tokens each, {n} in all, CPU fp32")
    print(f"{'':24s}{'seconds':>10s}{'tokens/s':>12s}")
    print(f"{'nmoe engine':24s}{t_engine:10.2f}{n / t_engine:12.1f}")
    print(f"{'transformers generate':24s}{t_hf:10.2f}{n / t_hf:12.1f}")
    print(f"ratio (engine / transformers): {t_hf / t_engine:.2f}x; same greedy tokens as transformers "
          f"(unpadded) on {same}/{len(check)} sampled prompts")


if __name__ == "__main__":
    main()
