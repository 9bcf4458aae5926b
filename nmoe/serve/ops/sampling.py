"""Sampling from logits with per-row temperature, top-k, top-p, min-p and seed (torch reference).

Seeded sampling is Gumbel-max with noise from a counter-based hash of (seed, position, token id), so a
row's token depends on nothing but its own logits, seed and position: not on the batch, the rank or
the step. Temperature 0 is greedy (exact argmax of the raw logits, lowest id on ties).

The hash (also implemented by the CUDA kernel, bit for bit), all arithmetic on uint32:
    mix(x)   = x ^= x >> 16; x *= 0x7FEB352D; x ^= x >> 15; x *= 0x846CA68B; x ^= x >> 16
    key      = mix(mix(mix(seed_lo) ^ seed_hi) ^ position)
    h        = mix(key ^ mix(token + 0x9E3779B9))
    u        = ((h >> 8) + 0.5) / 2^24                   in (0, 1)
    gumbel   = -log(-log(u))
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from nmoe.serve.ops._ext import use_cuda

_M32 = 0xFFFFFFFF


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """(x * c) mod 2^32 for uint32 values held in int64, without int64 overflow."""
    lo = x * (c & 0xFFFF)
    hi = ((x * (c >> 16)) & 0xFFFF) << 16
    return (lo + hi) & _M32


def _mix32(x: torch.Tensor) -> torch.Tensor:
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def gumbel_noise(seed: torch.Tensor, position: torch.Tensor, vocab: int) -> torch.Tensor:
    """Gumbel noise `[B, V]` fp32 from int64 seeds `[B]` and positions `[B]`."""
    seed = seed.long()
    lo, hi = seed & _M32, (seed >> 32) & _M32
    key = _mix32(_mix32(_mix32(lo) ^ hi) ^ (position.long() & _M32))
    tok = torch.arange(vocab, device=seed.device, dtype=torch.int64)
    h = _mix32(key[:, None] ^ _mix32((tok + 0x9E3779B9) & _M32)[None, :])
    u = ((h >> 8).double() + 0.5) / float(1 << 24)
    return (-torch.log(-torch.log(u))).float()


@dataclass
class SampleOut:
    tokens: torch.Tensor  # [B] int64
    logprobs_raw: torch.Tensor  # [B] fp32: log_softmax(logits)[token]
    logprobs_processed: torch.Tensor  # [B] fp32: under temperature / top-k / top-p / min-p
    top_ids: torch.Tensor | None  # [B, k] int64
    top_logprobs: torch.Tensor | None  # [B, k] fp32


def process_logits(
    logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, min_p: torch.Tensor
) -> torch.Tensor:
    """The logits transforms sampling applies, in order: temperature, top-k, top-p, min-p.

    Removed entries become -inf. Rows with temperature 0 are left unscaled (greedy uses the raw argmax).
    Top-p keeps the smallest set of highest-probability tokens whose mass reaches p (ties by lower id).
    """
    x = logits.float()
    t = torch.where(temperature > 0, temperature, torch.ones_like(temperature)).float()
    x = x / t[:, None]
    v = x.shape[-1]
    order = torch.sort(x, dim=-1, descending=True, stable=True)
    sorted_x, idx = order.values, order.indices
    rank = torch.arange(v, device=x.device)[None, :]
    k = torch.where(top_k > 0, top_k.clamp(max=v), torch.full_like(top_k, v)).long()
    keep = rank < k[:, None]
    probs = torch.softmax(sorted_x.masked_fill(~keep, float("-inf")), dim=-1)
    mass_before = probs.cumsum(-1) - probs
    # top_p >= 1 is off: an fp32 cumulative sum can reach 1.0 before the tail and would cut it
    keep &= (mass_before < top_p.float()[:, None]) | (top_p >= 1)[:, None]
    keep[:, 0] = True
    pmax = probs[:, :1]
    keep &= probs >= min_p.float()[:, None] * pmax
    keep[:, 0] = True
    out = torch.full_like(x, float("-inf"))
    return out.scatter(1, idx, sorted_x.masked_fill(~keep, float("-inf")))


def sample_ref(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    top_k: torch.Tensor,
    top_p: torch.Tensor,
    min_p: torch.Tensor,
    seed: torch.Tensor,
    position: torch.Tensor,
    num_top_logprobs: int = 0,
    top_from_processed: bool = False,
) -> SampleOut:
    """logits `[B, V]`; per-row params `[B]`; position = the index the sampled token will have."""
    processed_logits = process_logits(logits, temperature, top_k, top_p, min_p)
    greedy = temperature <= 0
    noisy = processed_logits + gumbel_noise(seed, position, logits.shape[-1])
    tokens = torch.where(greedy, _argmax_low(logits.float()), _argmax_low(noisy))
    return _logprobs_of(logits, processed_logits, greedy, tokens, num_top_logprobs, top_from_processed)


def score_tokens(
    logits: torch.Tensor,
    tokens: torch.Tensor,
    temperature: torch.Tensor,
    top_k: torch.Tensor,
    top_p: torch.Tensor,
    min_p: torch.Tensor,
    num_top_logprobs: int = 0,
    top_from_processed: bool = False,
) -> SampleOut:
    """Teacher forcing: the logprobs of given `tokens` `[B]` under the same transforms sampling uses."""
    processed_logits = process_logits(logits, temperature, top_k, top_p, min_p)
    return _logprobs_of(logits, processed_logits, temperature <= 0, tokens.long(), num_top_logprobs,
                        top_from_processed)


def _logprobs_of(logits, processed_logits, greedy, tokens, num_top_logprobs, top_from_processed) -> SampleOut:
    """Raw and processed logprobs of `tokens`; greedy rows' processed distribution is the raw one."""
    raw = torch.log_softmax(logits.float(), dim=-1)
    processed = torch.where(greedy[:, None], raw, torch.log_softmax(processed_logits, dim=-1))
    out = SampleOut(
        tokens=tokens,
        logprobs_raw=raw.gather(1, tokens[:, None])[:, 0],
        logprobs_processed=processed.gather(1, tokens[:, None])[:, 0],
        top_ids=None,
        top_logprobs=None,
    )
    if num_top_logprobs > 0:
        src = processed if top_from_processed else raw
        top = torch.topk(src, num_top_logprobs, dim=-1)
        out.top_ids, out.top_logprobs = top.indices, top.values
    return out


def _argmax_low(x: torch.Tensor) -> torch.Tensor:
    """Argmax with ties to the lowest index (torch.argmax does not promise which)."""
    m = x.max(dim=-1, keepdim=True).values
    v = x.shape[-1]
    idx = torch.arange(v, device=x.device).expand_as(x)
    return torch.where(x == m, idx, torch.full_like(idx, v)).min(dim=-1).values


def sample(logits, temperature, top_k, top_p, min_p, seed, position, num_top_logprobs=0, top_from_processed=False):
    if use_cuda(logits, temperature, top_k, top_p, min_p, seed, position):
        tok, lr, lp, ti, tl = torch.ops.nmoe.sample(
            logits.float().contiguous(), temperature.float(), top_k.int(), top_p.float(), min_p.float(),
            seed.long(), position.long(), int(num_top_logprobs), bool(top_from_processed),
        )
        k = num_top_logprobs > 0
        return SampleOut(tok.long(), lr, lp, ti.long() if k else None, tl if k else None)
    return sample_ref(logits, temperature, top_k, top_p, min_p, seed, position, num_top_logprobs, top_from_processed)
