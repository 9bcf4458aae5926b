"""Train the embedded tiny DeepSeek-V3 model (`--model tiny`) on the small texts the repo ships.

Deterministic (fixed seeds, deterministic algorithms); a few minutes on 2 CPU cores. Writes the
tokenizer and an FP8 checkpoint in the HF release layout to nmoe/serve/tiny/, then checks that greedy
decoding of the dequantized FP8 weights completes every fixed prompt.

    python scripts/train_tiny_model.py [--steps 300] [--out nmoe/serve/tiny]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
import torch.nn.functional as F
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from nmoe.serve.ckpt import TINY_DIR, load_weights, model_specs, tiny_config, write_hf_checkpoint
from nmoe.serve.model import DeepseekV3
from nmoe.serve.tiny_prompts import FIXED_PROMPTS

BOS, EOS, USER, ASSISTANT = "<|begin▁of▁sentence|>", "<|end▁of▁sentence|>", "<|User|>", "<|Assistant|>"
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['role'] == 'system' %}{{ m['content'] }}"
    "{% elif m['role'] == 'user' %}" + USER + "{{ m['content'] }}"
    "{% elif m['role'] == 'assistant' %}" + ASSISTANT + "{{ m['content'] }}" + EOS + "{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}" + ASSISTANT + "{% endif %}"
)


def texts(src: str) -> tuple[list[str], list[tuple[str, str]]]:
    with open(os.path.join(src, "corpus.txt")) as f:
        lines = [ln.strip() for ln in f if ln.strip()]
    with open(os.path.join(src, "chat.txt")) as f:
        chats = [tuple(ln.rstrip("\n").split("\t")) for ln in f if ln.strip()]
    return lines, chats


def train_tokenizer(lines: list[str], chats: list[tuple[str, str]], vocab_size: int) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[BOS, EOS, USER, ASSISTANT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(lines + [q for q, _ in chats] + [a for _, a in chats], trainer)
    return tok


def examples(tok: Tokenizer, lines, chats) -> list[list[int]]:
    bos, eos = tok.token_to_id(BOS), tok.token_to_id(EOS)
    enc = lambda s: tok.encode(s, add_special_tokens=False).ids  # noqa: E731
    out = [[bos] + enc(s) + [eos] for s in lines]
    out += [[bos] + enc(USER + q + ASSISTANT) + enc(a) + [eos] for q, a in chats]
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--vocab-size", type=int, default=512)
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--out", default=TINY_DIR)
    args = ap.parse_args()
    torch.manual_seed(args.seed)
    torch.use_deterministic_algorithms(True)
    t0 = time.time()

    lines, chats = texts(TINY_DIR)
    tok = train_tokenizer(lines, chats, args.vocab_size)
    os.makedirs(args.out, exist_ok=True)
    tok.save(os.path.join(args.out, "tokenizer.json"))
    with open(os.path.join(args.out, "tokenizer_config.json"), "w") as f:
        json.dump(
            {"bos_token": BOS, "eos_token": EOS, "add_bos_token": True, "chat_template": CHAT_TEMPLATE,
             "model_max_length": 16384, "tokenizer_class": "PreTrainedTokenizerFast"},
            f, indent=2, ensure_ascii=False,
        )

    cfg = tiny_config(tok.get_vocab_size(), num_nextn_predict_layers=0)
    model = DeepseekV3(cfg)
    data = examples(tok, lines, chats)
    s = max(map(len, data))
    ids = torch.full((len(data), s), tok.token_to_id(EOS), dtype=torch.long)
    mask = torch.zeros(len(data), s, dtype=torch.bool)
    for i, ex in enumerate(data):
        ids[i, : len(ex)] = torch.tensor(ex)
        mask[i, 1 : len(ex)] = True
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=args.steps, pct_start=0.1)
    for step in range(args.steps):
        logits = model.forward_dense(ids[:, :-1])
        loss = F.cross_entropy(logits[mask[:, 1:]], ids[:, 1:][mask[:, 1:]])
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if step % 50 == 0 or step == args.steps - 1:
            print(f"step {step:4d} loss {loss.item():.4f} ({time.time() - t0:.0f}s)", flush=True)

    specs = model_specs(cfg)
    write_hf_checkpoint(args.out, cfg, model.hf_tensors(), specs, num_shards=2)
    print(f"wrote {args.out} in {time.time() - t0:.0f}s")
    return check(args.out, cfg, tok)


def check(path: str, cfg, tok: Tokenizer) -> int:
    """Greedy completion of the fixed prompts with the FP8 weights as written."""
    model = DeepseekV3(cfg)
    model.load_hf(load_weights(path, cfg, progress=False))
    bad = 0
    for prompt, want in FIXED_PROMPTS:
        ids = [tok.token_to_id(BOS)] + tok.encode(prompt, add_special_tokens=False).ids
        with torch.no_grad():
            for _ in range(8):
                nxt = int(model.forward_dense(torch.tensor([ids]))[0, -1].argmax())
                ids.append(nxt)
                if nxt == tok.token_to_id(EOS):
                    break
        text = tok.decode(ids, skip_special_tokens=True)[len(prompt):]
        ok = text.startswith(want)
        bad += not ok
        print(f"{'ok ' if ok else 'BAD'} {prompt!r} -> {text!r}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
