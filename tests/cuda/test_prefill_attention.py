"""The CUDA prefill attention (`MLA._prefill_sdpa`: kv_b_proj expansion by head groups, SDPA with a
lower-right causal mask, cuDNN first) against an fp32 reference written out here, on DeepSeek-V3's
head widths: a chunk of q queries that are the last q of n context tokens."""

import dataclasses

import pytest
import torch

from nmoe.serve.model import MLA
from nmoe.serve.random_weights import deepseek_v3_config

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

HEADS = 16


def _mla() -> MLA:
    cfg = dataclasses.replace(deepseek_v3_config(4), num_attention_heads=HEADS)
    with torch.device("meta"):
        mla = MLA(cfg, 0, fp8=True)
    g = torch.Generator(device="cuda").manual_seed(0)
    w = torch.randn(HEADS * 256, 512, device="cuda", generator=g) * 512**-0.5
    mla.kv_b_proj.weight = torch.nn.Parameter(w.bfloat16(), requires_grad=False)
    return mla


def _reference(mla: MLA, q_nope, q_pe, c_kv, k_pe) -> torch.Tensor:
    q, n = q_nope.shape[0], c_kv.shape[0]
    kv = (c_kv.float() @ mla.kv_b_proj.weight.float().t()).view(n, HEADS, 256)
    k_nope, v = kv[..., :128], kv[..., 128:]
    scores = torch.einsum("qhd,khd->hqk", q_nope.float(), k_nope) + torch.einsum("qhd,kd->hqk", q_pe.float(), k_pe.float())
    causal = torch.arange(n, device="cuda")[None, :] <= torch.arange(n - q, n, device="cuda")[:, None]
    probs = torch.softmax((scores * mla.scale).masked_fill(~causal, float("-inf")), dim=-1)
    return torch.einsum("hqk,khd->qhd", probs, v)


@pytest.mark.parametrize("backends", ["shipped", ("EFFICIENT_ATTENTION",)])
@pytest.mark.parametrize("q,n,expand", [(1, 1, None), (1, 77, None), (7, 7, None), (33, 500, None),
                                        (256, 4096, None), (2048, 2048, None), (300, 70000, None),
                                        (64, 5000, 1 << 14)])
def test_prefill_sdpa_matches_fp32_reference(q, n, expand, backends, monkeypatch):
    mla = _mla()
    if backends != "shipped":
        monkeypatch.setattr(MLA, "PREFILL_SDPA_BACKENDS", backends)
    if expand is not None:  # a few heads per expansion group: several groups, the last one partial
        monkeypatch.setattr(MLA, "PREFILL_EXPAND_TOKEN_HEADS", expand)
    g = torch.Generator(device="cuda").manual_seed(q * 7 + n)

    def rnd(*shape):
        return torch.randn(*shape, device="cuda", generator=g).bfloat16()

    q_nope, q_pe, c_kv, k_pe = rnd(q, HEADS, 128), rnd(q, HEADS, 64), rnd(n, 512), rnd(n, 64)
    out = torch.full((q, HEADS, 128), float("nan"), device="cuda", dtype=torch.bfloat16)
    out.copy_(mla._prefill_sdpa(q_nope, q_pe, c_kv, k_pe))
    want = _reference(mla, q_nope, q_pe, c_kv, k_pe)
    got = out.float()
    assert torch.isfinite(got).all()
    err = (got - want).abs().max().item()
    cos = torch.nn.functional.cosine_similarity(got.flatten(), want.flatten(), dim=0).item()
    scale = want.abs().max().item()
    print(f"q={q} n={n}: max abs err {err:.3e} (of max |out| {scale:.3f}), cosine {cos:.6f}")
    # BF16 inputs to SDPA (the expanded keys and values rounded to BF16, BF16 probabilities)
    assert err <= 0.03 * scale and cos >= 0.9995
