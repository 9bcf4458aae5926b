"""The CUDA prefill attention (`MLA._prefill_sdpa`: kv_b_proj expansion by head groups, SDPA with a
lower-right causal mask, cuDNN first) against an fp32 reference written out here, on DeepSeek-V3's
head widths: a chunk of q queries that are the last q of n context tokens. The same call on CPU
(torch's own SDPA kernels) for a few small shapes, so CI runs its code too."""

import dataclasses

import pytest
import torch

from nmoe.serve.model import MLA, lower_right_causal_mask
from nmoe.serve.random_weights import deepseek_v3_config

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

HEADS = 16


def _mla(device: str) -> MLA:
    cfg = dataclasses.replace(deepseek_v3_config(4), num_attention_heads=HEADS)
    with torch.device("meta"):
        mla = MLA(cfg, 0, fp8=True)
    g = torch.Generator(device=device).manual_seed(0)
    w = torch.randn(HEADS * 256, 512, device=device, generator=g) * 512**-0.5
    mla.kv_b_proj.weight = torch.nn.Parameter(w.bfloat16(), requires_grad=False)
    return mla


def _reference(mla: MLA, q_nope, q_pe, c_kv, k_pe) -> torch.Tensor:
    q, n = q_nope.shape[0], c_kv.shape[0]
    kv = (c_kv.float() @ mla.kv_b_proj.weight.float().t()).view(n, HEADS, 256)
    k_nope, v = kv[..., :128], kv[..., 128:]
    scores = torch.einsum("qhd,khd->hqk", q_nope.float(), k_nope) + torch.einsum("qhd,kd->hqk", q_pe.float(), k_pe.float())
    dev = q_nope.device
    causal = torch.arange(n, device=dev)[None, :] <= torch.arange(n - q, n, device=dev)[:, None]
    probs = torch.softmax((scores * mla.scale).masked_fill(~causal, float("-inf")), dim=-1)
    return torch.einsum("hqk,khd->qhd", probs, v)


def _check(device: str, q: int, n: int) -> None:
    mla = _mla(device)
    g = torch.Generator(device=device).manual_seed(q * 7 + n)

    def rnd(*shape):
        return torch.randn(*shape, device=device, generator=g).bfloat16()

    q_nope, q_pe, c_kv, k_pe = rnd(q, HEADS, 128), rnd(q, HEADS, 64), rnd(n, 512), rnd(n, 64)
    out = torch.full((q, HEADS, 128), float("nan"), device=device, dtype=torch.bfloat16)
    out.copy_(mla._prefill_sdpa(q_nope, q_pe, c_kv, k_pe, lower_right_causal_mask(q, n, c_kv.device)))
    want = _reference(mla, q_nope, q_pe, c_kv, k_pe)
    got = out.float()
    assert torch.isfinite(got).all()
    err = (got - want).abs().max().item()
    cos = torch.nn.functional.cosine_similarity(got.flatten(), want.flatten(), dim=0).item()
    scale = want.abs().max().item()
    print(f"q={q} n={n}: max abs err {err:.3e} (of max |out| {scale:.3f}), cosine {cos:.6f}")
    # BF16 inputs to SDPA (the expanded keys and values rounded to BF16, BF16 probabilities)
    assert err <= 0.03 * scale and cos >= 0.9995


@needs_cuda
@pytest.mark.parametrize("backends", ["shipped", ("EFFICIENT_ATTENTION",)])
@pytest.mark.parametrize("q,n,expand", [(1, 1, None), (1, 77, None), (7, 7, None), (33, 500, None),
                                        (256, 4096, None), (2048, 2048, None), (300, 70000, None),
                                        (64, 5000, 1 << 14)])
def test_prefill_sdpa_matches_fp32_reference(q, n, expand, backends, monkeypatch):
    if backends != "shipped":
        monkeypatch.setattr(MLA, "PREFILL_SDPA_BACKENDS", backends)
    if expand is not None:  # a few heads per expansion group: several groups, the last one partial
        monkeypatch.setattr(MLA, "PREFILL_EXPAND_TOKEN_HEADS", expand)
    _check("cuda", q, n)


@pytest.mark.parametrize("q,n,expand", [(1, 1, None), (7, 7, None), (5, 40, None), (9, 300, 1 << 10)])
def test_prefill_sdpa_on_cpu(q, n, expand, monkeypatch):
    if expand is not None:
        monkeypatch.setattr(MLA, "PREFILL_EXPAND_TOKEN_HEADS", expand)
    _check("cpu", q, n)
