"""DeepSeek-V3 in reading order: embeddings, MLA, dense MLP / MoE, final norm, head.

Two ways through the same weights:
  * `forward_dense(ids [B, S])` - plain causal attention over the sequence, no cache (training and
    reference checks);
  * `forward(ids [T], batch: AttnBatch)` - the serving path over the paged latent cache: new tokens
    of many sequences flattened into T rows; prefill rows use the naive MLA form over their whole
    context, decode rows the absorbed form (`ops.attention.mla_decode_paged`).

Two weight formats (`DeepseekV3(cfg, experts, weights_format=...)`):
  * "fp32" (the CPU path): every weight dequantized to fp32 once at load; fp32 compute;
  * "fp8" (the CUDA path for FP8 checkpoints): linear and expert weights stay e4m3 with their
    128x128 `weight_scale_inv`; activations are BF16, quantized per token per 128 channels before each
    FP8 GEMM (`ops.fp8`, `ops.moe_gemm`); embeddings, norms, `lm_head` and the router weight BF16
    (the router's logits fp32, from exact BF16 products).
    The modules are built on the meta device and `load_hf` moves the checkpoint's tensors in (no
    second copy, no init), so a real-scale rank loads straight from tensors already on the GPU.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from nmoe.serve.config import ModelConfig
from nmoe.serve.host_copy import to_device
from nmoe.serve.ops.attention import mla_absorb_out, mla_absorb_q, mla_decode_paged
from nmoe.serve.ops.fp8 import FP8, dequant_block_fp8, fp8_gemm, quant_fp8_act
from nmoe.serve.ops.kv import gather_context, kv_norm_rope_append
from nmoe.serve.ops.moe import moe_align, moe_combine
from nmoe.serve.ops.moe_gemm import grouped_fp8_gemm_contiguous, silu_mul_quant_fp8
from nmoe.serve.ops.norm import add_rms_norm, add_rms_norm_quant, rms_norm, rms_norm_quant
from nmoe.serve.ops.rope import apply_rope
from nmoe.serve.ops.router import moe_gate_route
from nmoe.serve.side_stream import beside, resolved

WEIGHTS_FORMATS = ("fp32", "fp8")


def _blocks(n: int, block: int = 128) -> int:
    return -(-n // block)

# ------------------------------------------------------------------------------------------------
# Building blocks
# ------------------------------------------------------------------------------------------------


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


class Linear(nn.Module):
    """y = x W^T without bias.

    Unquantized (default): `weight [out, in]` in the compute dtype (fp32 dequantized on CPU).
    `fp8=True`: `weight [out, in]` e4m3 and `weight_scale_inv [ceil(out/128), ceil(in/128)]` fp32, built
    on the meta device for `load_hf` to fill; x is quantized per token per 128 channels and the FP8
    GEMM returns BF16."""

    def __init__(self, in_features: int, out_features: int, fp8: bool = False):
        super().__init__()
        if fp8:
            self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=FP8), requires_grad=False)
            self.weight_scale_inv = nn.Parameter(
                torch.empty(_blocks(out_features), _blocks(in_features)), requires_grad=False
            )
            return
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        if self.weight.device.type != "meta":
            nn.init.normal_(self.weight, std=in_features**-0.5)

    @classmethod
    def fp8_of(cls, weight: torch.Tensor, scale_inv: torch.Tensor) -> Linear:
        """An FP8 Linear holding `weight` `[out, in]` e4m3 and its `scale_inv` as they are."""
        lin = cls.__new__(cls)
        nn.Module.__init__(lin)
        lin.weight = nn.Parameter(weight, requires_grad=False)
        lin.weight_scale_inv = nn.Parameter(scale_inv, requires_grad=False)
        return lin

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight.dtype != FP8:
            return F.linear(x, self.weight)
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        if x2.shape[0] == 0:
            return x.new_zeros(*shape[:-1], self.weight.shape[0])
        return self.forward_quantized(*quant_fp8_act(x2.contiguous())).view(*shape[:-1], -1)

    def forward_quantized(self, xq: torch.Tensor, xs: torch.Tensor) -> torch.Tensor:
        """FP8: `[M, in]` activations already quantized per token per 128 channels -> BF16 `[M, out]`."""
        return fp8_gemm(xq, xs, self.weight, self.weight_scale_inv)


Quantized = tuple[torch.Tensor, torch.Tensor]  # FP8 activations: e4m3 [T, K] and fp32 scales [T, K / 128]


def _norm_project(norm: RMSNorm, proj: Linear, x: torch.Tensor) -> torch.Tensor:
    """proj(norm(x)); under FP8 with x `[T, K]` the norm's kernel also quantizes its output for proj."""
    if proj.weight.dtype == FP8 and x.dim() == 2 and x.shape[0] > 0:
        _, q, s = rms_norm_quant(x, norm.weight, norm.eps)
        return proj.forward_quantized(q, s)
    return proj(norm(x))


def _add_norm(
    norm: RMSNorm, x: torch.Tensor, residual: torch.Tensor | None, quantize: bool
) -> tuple[torch.Tensor, torch.Tensor, Quantized | None]:
    """(`norm(x + residual)`, `x + residual`, the first's FP8 quantization or None): x itself is the
    stream without a residual (the embedding); quantized when `quantize` and x is `[T, K]`, T > 0."""
    quantize = quantize and x.dim() == 2 and x.shape[0] > 0
    if residual is None:
        if not quantize:
            return norm(x), x, None
        out, q, s = rms_norm_quant(x, norm.weight, norm.eps)
        return out, x, (q, s)
    if not quantize:
        return (*add_rms_norm(x, residual, norm.weight, norm.eps), None)
    out, summed, q, s = add_rms_norm_quant(x, residual, norm.weight, norm.eps)
    return out, summed, (q, s)


def rope_frequencies(cfg: ModelConfig) -> torch.Tensor:
    """Inverse frequencies `[rope_dim / 2]`, YaRN-corrected when `rope_scaling.type == yarn`."""
    dim, base = cfg.qk_rope_head_dim, cfg.rope_theta
    freqs = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    rs = cfg.rope_scaling or {}
    if rs.get("type", rs.get("rope_type")) != "yarn":
        return freqs.float()
    factor = float(rs["factor"])
    orig = rs.get("original_max_position_embeddings", 4096)
    beta_fast, beta_slow = rs.get("beta_fast", 32), rs.get("beta_slow", 1)

    def correction_dim(num_rotations: float) -> float:
        return dim * math.log(orig / (num_rotations * 2 * math.pi)) / (2 * math.log(base))

    low = max(math.floor(correction_dim(beta_fast)), 0)
    high = min(math.ceil(correction_dim(beta_slow)), dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float64) - low) / (high - low)).clamp(0, 1)
    extrapolate = 1 - ramp  # 1: keep the original frequency; 0: interpolate by `factor`
    return (freqs / factor * (1 - extrapolate) + freqs * extrapolate).float()


def row_starts(q_lens: list[int]) -> list[int]:
    """Row of each sequence's first new token when `q_lens` tokens each are laid end to end, and
    the total at the end."""
    out = [0]
    for q in q_lens:
        out.append(out[-1] + q)
    return out


def lower_right_causal_mask(q: int, n: int, device: torch.device) -> torch.Tensor | None:
    """The causal mask of q queries that are the last q of n tokens: `[q, n]` bool, query i
    (position n - q + i) seeing keys 0 ..= n - q + i; None when q == n (plain `is_causal`)."""
    if q == n:
        return None
    return torch.arange(n, device=device)[None, :] <= torch.arange(n - q, n, device=device)[:, None]


def cached_causal_mask(masks: dict, q: int, n: int, device: torch.device) -> torch.Tensor | None:
    """`lower_right_causal_mask(q, n)` from `masks`, one step's, built there on first use: so the
    step's layers share one mask per (q, n)."""
    if (q, n) not in masks:
        masks[(q, n)] = lower_right_causal_mask(q, n, device)
    return masks[(q, n)]


@dataclass
class AttnBatch:
    """What one serving step's attention needs, built by the engine from the scheduler's batch.

    Rows of the flattened token dimension T are grouped by sequence, in `seqs` order."""

    positions: torch.Tensor  # [T] int64
    out_loc: torch.Tensor  # [T] int64 cache slot of each new token
    block_table: torch.Tensor  # [B, max_pages] int32
    seq_lens: torch.Tensor  # [B] int32 context length after this step
    q_lens: list[int]  # new tokens per sequence
    kv_caches: list[torch.Tensor]  # per layer [num_pages, page_size, kv_lora_rank + rope_dim]
    cos: torch.Tensor | None = None  # [T, rope_dim / 2], filled by the model
    sin: torch.Tensor | None = None
    # True for a CUDA-graph step: shapes are static (padded rows have length 0 and out_loc -1) and
    # nothing may read a device value on the host. Rows [0, num_decode) are one decode token per
    # sequence (`block_table`, `seq_lens` are theirs); the rows after them are prefill tokens, whose
    # attention the graph runner computes between graphs through `prefill_attention`
    static: bool = False
    num_decode: int | None = None  # static: the decode rows (None: every row)
    # static: (mla, q_nope [P, H, nope], q_pe [P, H, rope] rotated, cache) -> [P, H, v]
    prefill_attention: Callable | None = None
    # seq_lens as the host knows them (the engine passes them): no layer has to read the device
    # tensor back, which would stall the host until the device catches up, every layer
    seq_lens_host: list[int] | None = None
    _decode_inputs: tuple[torch.Tensor, ...] | None = field(default=None, repr=False)
    _masks: dict[tuple[int, int], torch.Tensor | None] = field(default_factory=dict, repr=False)

    @property
    def decode_rows(self) -> list[int]:
        return [i for i, q in enumerate(self.q_lens) if q == 1]

    @property
    def starts(self) -> list[int]:
        """Row of each sequence's first new token, and T at the end."""
        return row_starts(self.q_lens)

    def prefill_mask(self, q: int, n: int) -> torch.Tensor | None:
        """`lower_right_causal_mask(q, n)`, built once per step and shared by every layer."""
        return cached_causal_mask(self._masks, q, n, self.positions.device)

    def context_len(self, i: int) -> int:
        return self.seq_lens_host[i] if self.seq_lens_host is not None else int(self.seq_lens[i])

    def decode_inputs(self) -> tuple[torch.Tensor, ...]:
        """The decode sequences' (token rows, cos, sin, block table rows, lengths): gathered once
        per step (after the model has set cos/sin) and shared by every layer."""
        if self._decode_inputs is None:
            decode, starts, dev = self.decode_rows, self.starts, self.positions.device
            rows = to_device([starts[i] for i in decode], dev, torch.long)
            seqs = to_device(decode, dev, torch.long)
            self._decode_inputs = (rows, self.cos[rows], self.sin[rows], self.block_table[seqs], self.seq_lens[seqs])
        return self._decode_inputs


# ------------------------------------------------------------------------------------------------
# Attention: MLA
# ------------------------------------------------------------------------------------------------


class MLA(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int, fp8: bool = False):
        super().__init__()
        self.cfg, self.layer = cfg, layer
        h, nh = cfg.hidden_size, cfg.num_attention_heads
        self.n_heads = nh
        if cfg.q_lora_rank is None:
            self.q_proj = Linear(h, nh * cfg.qk_head_dim, fp8)
        else:
            self.q_a_proj = Linear(h, cfg.q_lora_rank, fp8)
            self.q_a_layernorm = RMSNorm(cfg.q_lora_rank, cfg.rms_norm_eps)
            self.q_b_proj = Linear(cfg.q_lora_rank, nh * cfg.qk_head_dim, fp8)
        self.kv_a_proj_with_mqa = Linear(h, cfg.kv_cache_dim, fp8)
        self.kv_a_layernorm = RMSNorm(cfg.kv_lora_rank, cfg.rms_norm_eps)
        # kept unquantized (BF16 under fp8): decode reads it per head as W_UK / W_UV for absorption
        self.kv_b_proj = Linear(cfg.kv_lora_rank, nh * (cfg.qk_nope_head_dim + cfg.v_head_dim))
        self.o_proj = Linear(nh * cfg.v_head_dim, h, fp8)
        self.scale = cfg.softmax_scale
        self.qkv_a_proj: Linear | None = None  # FP8: q_a_proj and kv_a_proj_with_mqa fused by `fuse_qkv_a`

    def fuse_qkv_a(self) -> None:
        """FP8 with whole 128-row scale blocks in q_a_proj: q_a_proj and kv_a_proj_with_mqa read the
        same x, so they become one GEMM `[q_lora_rank + R + D, hidden]` (one quantization of x, one
        weight stream) whose output columns split back into the two; kv_a's scale blocks then start
        on a block boundary of the fused weight, so its scales stack as they are."""
        if self.cfg.q_lora_rank is None:
            return
        qa, kva = self.q_a_proj, self.kv_a_proj_with_mqa
        if qa.weight.dtype != FP8 or qa.weight.shape[0] % 128:
            return
        self.qkv_a_proj = Linear.fp8_of(_cat([qa.weight.data, kva.weight.data]),
                                        torch.cat([qa.weight_scale_inv.data, kva.weight_scale_inv.data]))
        del self.q_a_proj, self.kv_a_proj_with_mqa

    @property
    def takes_fp8(self) -> bool:
        """Whether `forward` takes x's FP8 quantization too (the fused qkv_a projection's input)."""
        return self.qkv_a_proj is not None

    def _project(self, x: torch.Tensor, xq: Quantized | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """x `[.., hidden]` -> queries `[.., H, qk_head_dim]` (rope part not yet rotated) and
        kv_a_proj's output `[.., R + D]` (latent not yet normalized, rope key not yet rotated).
        `xq`: x `[T, hidden]` already quantized (`takes_fp8`), so the fused projection reads that."""
        cfg = self.cfg
        if cfg.q_lora_rank is None:
            q, kv = self.q_proj(x), self.kv_a_proj_with_mqa(x)
        else:
            if self.qkv_a_proj is not None:
                qkv_a = self.qkv_a_proj(x) if xq is None else self.qkv_a_proj.forward_quantized(*xq)
                q_a, kv = qkv_a.split([cfg.q_lora_rank, cfg.kv_cache_dim], dim=-1)
            else:
                q_a, kv = self.q_a_proj(x), self.kv_a_proj_with_mqa(x)
            q = _norm_project(self.q_a_layernorm, self.q_b_proj, q_a)
        return q.view(*x.shape[:-1], self.n_heads, cfg.qk_head_dim), kv

    def _expand(self, c_kv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Latents `[.., L, R]` -> per-head k_nope `[.., L, H, nope]` and v `[.., L, H, v]` (naive form)."""
        kv = self.kv_b_proj(c_kv).view(*c_kv.shape[:-1], self.n_heads, -1)
        return kv.split([self.cfg.qk_nope_head_dim, self.cfg.v_head_dim], dim=-1)

    def _split_q(self, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return q.split([self.cfg.qk_nope_head_dim, self.cfg.qk_rope_head_dim], dim=-1)

    def forward_dense(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x `[B, S, hidden]`, causal over S."""
        b, s, _ = x.shape
        q, kv = self._project(x)
        q_nope, q_pe = self._split_q(q)
        q_pe = apply_rope(q_pe, cos, sin)
        c_kv, k_pe = kv.split([self.cfg.kv_lora_rank, self.cfg.qk_rope_head_dim], dim=-1)
        k_pe = apply_rope(k_pe.unsqueeze(-2), cos, sin).squeeze(-2)
        k_nope, v = self._expand(self.kv_a_layernorm(c_kv))
        scores = torch.einsum("bshd,bthd->bhst", q_nope, k_nope) + torch.einsum("bshd,btd->bhst", q_pe, k_pe)
        mask = torch.ones(s, s, dtype=torch.bool, device=x.device).tril()
        scores = (scores * self.scale).masked_fill(~mask, float("-inf"))
        out = torch.einsum("bhst,bthd->bshd", torch.softmax(scores.float(), dim=-1).to(v.dtype), v)
        return self.o_proj(out.reshape(b, s, -1))

    def forward(self, x: torch.Tensor, batch: AttnBatch, xq: Quantized | None = None) -> torch.Tensor:
        """x `[T, hidden]` new tokens of the batch's sequences; writes their latents to the cache first.
        `xq`: x's FP8 quantization, where the norm before made it (`takes_fp8`)."""
        cache = batch.kv_caches[self.layer]
        q, kv = self._project(x, xq)
        norm = self.kv_a_layernorm
        kv_norm_rope_append(cache, batch.out_loc, kv, norm.weight, norm.eps, batch.cos, batch.sin)
        q_nope, q_pe = self._split_q(q)
        if batch.static:  # decode rows first, one per sequence, then prefill rows: no row bookkeeping
            d = x.shape[0] if batch.num_decode is None else batch.num_decode
            if d == x.shape[0] and d and self.o_proj.weight.dtype == FP8:  # decode only: o_proj's input quantized
                oq = self._decode_absorbed(q_nope, q_pe, batch.cos, batch.sin, cache, batch.block_table,
                                           batch.seq_lens, static=True, quantize=True)
                return self.o_proj.forward_quantized(*oq)
            parts = []
            if d:
                parts.append(self._decode_absorbed(q_nope[:d], q_pe[:d], batch.cos[:d], batch.sin[:d], cache,
                                                   batch.block_table, batch.seq_lens, static=True))
            if d < x.shape[0]:
                q_pe_p = apply_rope(q_pe[d:], batch.cos[d:], batch.sin[d:])
                parts.append(batch.prefill_attention(self, q_nope[d:], q_pe_p, cache))
            return self._out_proj(parts[0] if len(parts) == 1 else torch.cat(parts))
        out = x.new_empty(x.shape[0], self.n_heads, self.cfg.v_head_dim)
        starts = batch.starts
        if batch.decode_rows:
            rows, cos, sin, block_table, seq_lens = batch.decode_inputs()
            out[rows] = self._decode_absorbed(q_nope[rows], q_pe[rows], cos, sin, cache, block_table, seq_lens)
        for i, q_len in enumerate(batch.q_lens):
            if q_len > 1:
                sl = slice(starts[i], starts[i] + q_len)
                q_pe_i = apply_rope(q_pe[sl], batch.cos[sl], batch.sin[sl])
                out[sl] = self.prefill_attention(q_nope[sl], q_pe_i, cache, batch.block_table[i],
                                                 batch.context_len(i), masks=batch)
        return self._out_proj(out)

    def _out_proj(self, o: torch.Tensor) -> torch.Tensor:
        """Per-head outputs `[T, H, v]` (any strides) -> `[T, hidden]`. Under FP8 the quantization reads
        the heads in place (no copy into `[T, H * v]` first)."""
        if self.o_proj.weight.dtype == FP8 and o.shape[0] > 0:
            return self.o_proj.forward_quantized(*quant_fp8_act(o))
        return self.o_proj(o.flatten(1))

    def prefill_attention(self, q_nope, q_pe, cache, table_row: torch.Tensor, n: int, masks=None,
                          block: int = 1024) -> torch.Tensor:
        """Queries of one sequence's chunk `[q, H, .]` (q_pe rotated) over its whole cached context of
        `n` tokens (pages `table_row`), the chunk's own latents already appended; naive MLA form.
        `masks`: what holds the step's masks (`.prefill_mask(q, n)`, so that a step's layers share
        one), asked only on the SDPA path; None builds the mask here.

        Queries go in blocks so a long chunk's score matrix stays `[H, block, context]`."""
        ctx = gather_context(cache, table_row, n).to(q_nope.dtype)
        c_kv, k_pe = ctx.split([self.cfg.kv_lora_rank, self.cfg.qk_rope_head_dim], dim=-1)
        q = q_nope.shape[0]
        if q_nope.is_cuda:
            mask = masks.prefill_mask(q, n) if masks is not None else lower_right_causal_mask(q, n, c_kv.device)
            return self._prefill_sdpa(q_nope, q_pe, c_kv, k_pe, mask)
        k_nope, v = self._expand(c_kv)
        out = []
        for b0 in range(0, q, block):
            qn, qp = q_nope[b0 : b0 + block], q_pe[b0 : b0 + block]
            first = n - q + b0  # position of this block's first query
            keys = first + qn.shape[0]  # causal: nothing past the block's last query is needed
            scores = torch.einsum("qhd,khd->hqk", qn, k_nope[:keys]) + torch.einsum("qhd,kd->hqk", qp, k_pe[:keys])
            pos = torch.arange(first, keys, device=qn.device)[:, None]
            causal = torch.arange(keys, device=qn.device)[None, :] <= pos
            scores = (scores * self.scale).masked_fill(~causal, float("-inf"))
            out.append(torch.einsum("hqk,khd->qhd", torch.softmax(scores.float(), dim=-1).to(v.dtype), v[:keys]))
        return torch.cat(out)

    # context tokens x heads expanded at once in the SDPA prefill: bounds its transient memory
    # (a 128k-token context expands 32 heads at a time, about 2 GB in BF16)
    PREFILL_EXPAND_TOKEN_HEADS = 1 << 22
    # SDPA kernels for the prefill, in priority order. cuDNN first: on the H200 it ran a 2048-query
    # chunk over a 128k context at 278 TFLOP/s against 120 for the memory-efficient kernel (flash
    # takes no mask and needs v as wide as q and k); benchmarks/bench_prefill_attention.py
    PREFILL_SDPA_BACKENDS = ("CUDNN_ATTENTION", "EFFICIENT_ATTENTION", "MATH")

    def _prefill_sdpa(self, q_nope, q_pe, c_kv, k_pe, mask: torch.Tensor | None) -> torch.Tensor:
        """The same attention through torch's fused SDPA (CUDA): the chunk's queries are the last
        `q` of the `n` context tokens, hence `mask`, the chunk's `lower_right_causal_mask`. No
        `[H, q, n]` score matrix is materialized and the context is expanded through `kv_b_proj` a
        group of heads at a time, which is what lets a 128k-token prompt prefill.

        The mask is a boolean tensor (or `is_causal` when q == n): torch's `causal_lower_right`
        bias dispatches itself to the flash or memory-efficient kernels only, never to cuDNN."""
        from torch.nn.attention import SDPBackend, sdpa_kernel

        cfg, heads = self.cfg, self.n_heads
        q_len, n = q_nope.shape[0], c_kv.shape[0]
        nope = cfg.qk_nope_head_dim
        w = self.kv_b_proj.weight.view(heads, nope + cfg.v_head_dim, cfg.kv_lora_rank)
        group = max(1, min(heads, self.PREFILL_EXPAND_TOKEN_HEADS // n))
        out = q_nope.new_empty(q_len, heads, cfg.v_head_dim)
        with sdpa_kernel([getattr(SDPBackend, b) for b in self.PREFILL_SDPA_BACKENDS], set_priority=True):
            for h0 in range(0, heads, group):
                h1 = min(heads, h0 + group)
                kv = F.linear(c_kv, w[h0:h1].reshape(-1, cfg.kv_lora_rank)).view(n, h1 - h0, -1)
                k = torch.cat([kv[..., :nope], k_pe[:, None, :].expand(n, h1 - h0, -1)], dim=-1)
                q = torch.cat([q_nope[:, h0:h1], q_pe[:, h0:h1]], dim=-1)
                o = F.scaled_dot_product_attention(
                    q.transpose(0, 1)[None], k.transpose(0, 1)[None], kv[..., nope:].transpose(0, 1)[None],
                    attn_mask=mask, is_causal=mask is None, scale=self.scale,
                )
                out[:, h0:h1] = o[0].transpose(0, 1)
        return out

    def _decode_absorbed(self, q_nope, q_pe, cos, sin, cache, block_table, seq_lens, static: bool = False,
                         quantize: bool = False):
        """One query per sequence (q_pe not yet rotated): W_UK folded into the query, W_UV applied
        after attention; returns `[B, H, v]`, or with `quantize` its FP8 quantization for o_proj
        (`mla_absorb_out`). `static`: no host read of `seq_lens` (the block table's width bounds
        every context)."""
        cfg = self.cfg
        w = self.kv_b_proj.weight.view(self.n_heads, cfg.qk_nope_head_dim + cfg.v_head_dim, cfg.kv_lora_rank)
        w_uk, w_uv = w[:, : cfg.qk_nope_head_dim], w[:, cfg.qk_nope_head_dim :]
        q = mla_absorb_q(q_nope, w_uk, q_pe, cos, sin).to(cache.dtype)
        o_lat, _ = mla_decode_paged(q, cache, block_table, seq_lens, self.scale, cfg.kv_lora_rank, static=static)
        return mla_absorb_out(o_lat, w_uv, quantize)


# ------------------------------------------------------------------------------------------------
# Feed-forward: dense MLP and MoE
# ------------------------------------------------------------------------------------------------


class MLP(nn.Module):
    def __init__(self, hidden: int, inter: int, fp8: bool = False):
        super().__init__()
        self.gate_proj = Linear(hidden, inter, fp8)
        self.up_proj = Linear(hidden, inter, fp8)
        self.down_proj = Linear(inter, hidden, fp8)

        self.gate_up: Linear | None = None  # FP8: gate and up fused by `fuse_gate_up`

    def fuse_gate_up(self) -> None:
        """FP8 with whole 128-row scale blocks: gate and up become one GEMM `[2I, hidden]` whose BF16
        output the fused SwiGLU-quant turns into the down GEMM's input (one quantization of x, one
        GEMM and one kernel instead of two quantizations, two GEMMs, silu, mul and a quantization)."""
        g, u = self.gate_proj, self.up_proj
        if g.weight.dtype != FP8 or g.weight.shape[0] % 128:
            return
        self.gate_up = Linear.fp8_of(_cat([g.weight.data, u.weight.data]),
                                     torch.cat([g.weight_scale_inv.data, u.weight_scale_inv.data]))
        del self.gate_proj, self.up_proj

    @property
    def takes_fp8(self) -> bool:
        """Whether `forward` takes x's FP8 quantization too (the fused gate_up projection's input)."""
        return self.gate_up is not None

    def forward(self, x: torch.Tensor, xq: Quantized | None = None) -> torch.Tensor:
        """`xq`: x `[T, hidden]` already quantized (`takes_fp8`), read instead of quantizing x here."""
        if self.gate_up is None:
            return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        if x2.shape[0] == 0:
            return x.new_zeros(shape)
        h = self.gate_up.forward_quantized(*(quant_fp8_act(x2.contiguous()) if xq is None else xq))
        return self.down_proj.forward_quantized(*silu_mul_quant_fp8(h)).view(shape)


class Experts(nn.Module):
    """This rank's routed experts, stacked: gate_up `[E_local, 2I, hidden]`, down `[E_local, hidden, I]`.

    `expert_ids[j]` is the global id of local expert j. With `fp8=True` both are e4m3 with stacked
    scales `gate_up_scale_inv [E_local, 2 ceil(I/128), ceil(hidden/128)]` (gate's block rows, then
    up's) and `down_scale_inv [E_local, ceil(hidden/128), ceil(I/128)]`."""

    def __init__(self, hidden: int, inter: int, expert_ids: list[int], fp8: bool = False):
        super().__init__()
        self.expert_ids = list(expert_ids)
        e = len(expert_ids)
        if fp8:
            def param(*shape, dtype=torch.float32):
                return nn.Parameter(torch.empty(*shape, dtype=dtype), requires_grad=False)

            self.gate_up = param(e, 2 * inter, hidden, dtype=FP8)
            self.gate_up_scale_inv = param(e, 2 * _blocks(inter), _blocks(hidden))
            self.down = param(e, hidden, inter, dtype=FP8)
            self.down_scale_inv = param(e, _blocks(hidden), _blocks(inter))
            return
        self.gate_up = nn.Parameter(torch.randn(e, 2 * inter, hidden) * hidden**-0.5)
        self.down = nn.Parameter(torch.randn(e, hidden, inter) * inter**-0.5)

    def forward(self, x: torch.Tensor, local_ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Tokens `[N, hidden]` each going to local expert `local_ids[n]` with weight `weights[n]`;
        returns the weighted expert outputs `[N, hidden]` (row n for token n)."""
        return combine_experts(self, x, weights.view(-1, 1), local_ids.view(-1, 1))

    def sorted(self, x: torch.Tensor, src_rows: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        """Unweighted outputs for the rows `x[src_rows]`, grouped by expert: rows offsets[j]:offsets[j+1]
        go to local expert j (`moe_align`'s layout, the contiguous grouped GEMM's)."""
        if self.gate_up.dtype != FP8:
            return self._sorted_dense(x[src_rows], offsets.diff().tolist())
        xq, xsc = quant_fp8_act(x, src_rows)  # the gather happens in the quantization's loads
        inter = self.down.shape[-1]
        if inter % 128 == 0:  # gate's and up's scale blocks tile the fused [2I] rows exactly
            h = grouped_fp8_gemm_contiguous(xq, xsc, self.gate_up, self.gate_up_scale_inv, offsets)
        else:  # a partial block at the seam (small test models): two GEMMs on contiguous halves
            nb = self.gate_up_scale_inv.shape[1] // 2
            halves = [
                grouped_fp8_gemm_contiguous(xq, xsc, w.contiguous(), s.contiguous(), offsets)
                for w, s in (
                    (self.gate_up[:, :inter], self.gate_up_scale_inv[:, :nb]),
                    (self.gate_up[:, inter:], self.gate_up_scale_inv[:, nb:]),
                )
            ]
            h = torch.cat(halves, dim=-1)
        hq, hs = silu_mul_quant_fp8(h)
        return grouped_fp8_gemm_contiguous(hq, hs, self.down, self.down_scale_inv, offsets)

    def _sorted_dense(self, xs: torch.Tensor, counts: list[int]) -> torch.Tensor:
        ys = torch.empty_like(xs)
        start = 0
        for j, n in enumerate(counts):
            if n:
                g, u = F.linear(xs[start : start + n], self.gate_up[j]).chunk(2, dim=-1)
                ys[start : start + n] = F.linear(F.silu(g) * u, self.down[j])
                start += n
        return ys


def combine_experts(experts: Experts, x: torch.Tensor, weights: torch.Tensor, local_ids: torch.Tensor,
                    add: torch.Tensor | None = None, expert_map: torch.Tensor | None = None) -> torch.Tensor:
    """y[t] = sum_j w[t,j] * expert_{local_ids[t,j]}(x[t]) (+ add[t]), summed over j in order in fp32
    (the identity for fp32 activations), returned in x's dtype. `add` may be a side stream's
    `Deferred`: it is waited for only at the combine. `expert_map`: `local_ids` are ids mapped to
    local experts by it, inside the sort (`moe_align`). The (token, k) slots are sorted by
    expert (`moe_align`), run as grouped GEMMs, and combined back (`moe_combine`)."""
    if x.shape[0] == 0:
        return x.new_zeros(x.shape) if add is None else resolved(add).clone()
    src_rows, pos, offsets = moe_align(local_ids, len(experts.expert_ids), expert_map)
    ys = experts.sorted(x, src_rows, offsets)
    return moe_combine(ys, pos, weights, resolved(add))


class MoE(nn.Module):
    def __init__(self, cfg: ModelConfig, expert_ids: list[int], fp8: bool = False):
        super().__init__()
        self.cfg = cfg
        self.gate_weight = nn.Parameter(torch.randn(cfg.n_routed_experts, cfg.hidden_size) * 0.02)
        self.register_buffer("gate_bias", torch.zeros(cfg.n_routed_experts))
        self.experts = Experts(cfg.hidden_size, cfg.moe_intermediate_size, expert_ids, fp8)
        inter = cfg.moe_intermediate_size * cfg.n_shared_experts
        self.shared_experts = MLP(cfg.hidden_size, inter, fp8) if cfg.n_shared_experts else None
        self.transport = None  # set by the engine for EP; None: every expert is local

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cfg = self.cfg
        # x @ gate_weight^T then the router; decode-sized BF16 batches on CUDA in one fused op (ops/router.py)
        return moe_gate_route(
            x,
            self.gate_weight,
            self.gate_bias,
            n_group=cfg.n_group,
            topk_group=cfg.topk_group,
            top_k=cfg.num_experts_per_tok,
            norm_topk_prob=cfg.norm_topk_prob,
            routed_scaling_factor=cfg.routed_scaling_factor,
        )

    @property
    def takes_fp8(self) -> bool:
        """Whether `forward` takes x's FP8 quantization too (for the shared experts)."""
        return self.shared_experts is not None and self.shared_experts.takes_fp8

    def forward(self, x: torch.Tensor, xq: Quantized | None = None) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        shared = None
        if self.shared_experts is not None:  # waited for where the combine adds it
            shared = beside("shared", x.device, self.shared_experts, x, xq)
        weights, ids = self.route(x)
        if self.transport is None:
            y = self.local_experts(x, weights, ids, add=shared)
        else:
            y = self.transport.moe(x, weights, ids, self.experts, add=shared)
        return y.view(shape)

    def local_experts(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor,
                      add: torch.Tensor | None = None) -> torch.Tensor:
        """All experts on this rank: y[t] = sum_k w[t,k] * expert_{ids[t,k]}(x[t]) (+ add[t])."""
        return combine_experts(self.experts, x, weights, ids, add)


# ------------------------------------------------------------------------------------------------
# The model
# ------------------------------------------------------------------------------------------------


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int, expert_ids: list[int], fp8: bool = False):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = MLA(cfg, layer, fp8)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        if cfg.is_moe_layer(layer):
            self.mlp = MoE(cfg, expert_ids, fp8)
        else:
            self.mlp = MLP(cfg.hidden_size, cfg.intermediate_size, fp8)

    def forward_dense(self, x, cos, sin):
        x = x + self.self_attn.forward_dense(self.input_layernorm(x), cos, sin)
        return x + self.mlp(self.post_attention_layernorm(x))

    def forward(self, x, batch: AttnBatch, residual: torch.Tensor | None = None):
        """Serving: `x` is the previous layer's output not yet added to the residual stream
        `residual` (None: x is the embedding, the stream itself); returns this layer's output and
        the stream before it. Each residual add is fused into the norm that follows it, and so is
        the quantization of the norm's output where the FP8 projection after it reads that."""
        h, residual, hq = _add_norm(self.input_layernorm, x, residual, self.self_attn.takes_fp8)
        a = self.self_attn(h, batch, hq)
        h, residual, hq = _add_norm(self.post_attention_layernorm, a, residual, self.mlp.takes_fp8)
        return self.mlp(h, hq), residual


class DeepseekV3(nn.Module):
    """`weights_format`: "fp32" (dequantized, the CPU path) or "fp8" (FP8 checkpoints; see the module
    docstring). Under "fp8" the parameters are meta tensors until `load_hf`."""

    def __init__(self, cfg: ModelConfig, expert_ids: list[int] | None = None, weights_format: str = "fp32"):
        super().__init__()
        if weights_format not in WEIGHTS_FORMATS:
            raise ValueError(f"weights_format {weights_format!r}: expected one of {', '.join(WEIGHTS_FORMATS)}")
        if weights_format == "fp8" and cfg.quantization_config is None:
            raise ValueError("weights_format 'fp8' needs an FP8 checkpoint (config.json has no quantization_config)")
        self.cfg, self.weights_format = cfg, weights_format
        fp8 = weights_format == "fp8"
        expert_ids = list(range(cfg.n_routed_experts)) if expert_ids is None else list(expert_ids)
        with torch.device("meta") if fp8 else contextlib.nullcontext():
            self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
            self.layers = nn.ModuleList(Block(cfg, i, expert_ids, fp8) for i in range(cfg.num_hidden_layers))
            self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
            self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size)
        self.register_buffer("inv_freq", rope_frequencies(cfg), persistent=False)

    def rope(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        angles = positions.double()[..., None] * self.inv_freq.double()
        return angles.cos().float(), angles.sin().float()

    def forward_dense(self, input_ids: torch.Tensor) -> torch.Tensor:
        """ids `[B, S]` -> logits `[B, S, vocab]` (training / reference; every position)."""
        cos, sin = self.rope(torch.arange(input_ids.shape[1], device=input_ids.device))
        x = self.embed_tokens(input_ids)
        for layer in self.layers:
            x = layer.forward_dense(x, cos, sin)
        return self.lm_head(self.norm(x))

    def forward(self, input_ids: torch.Tensor, batch: AttnBatch) -> torch.Tensor:
        """ids `[T]` -> final hidden states `[T, hidden]` (normed); call `logits` on the rows needed."""
        batch.cos, batch.sin = self.rope(batch.positions)
        x, residual = self.embed_tokens(input_ids), None
        for layer in self.layers:
            x, residual = layer(x, batch, residual)
        return self.norm(x) if residual is None else add_rms_norm(x, residual, self.norm.weight, self.norm.eps)[0]

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()

    # --------------------------------------------------------------------------------------------
    # Weights, by HF name
    # --------------------------------------------------------------------------------------------

    def load_hf(self, tensors: dict[str, torch.Tensor]) -> None:
        """Fill from HF-named tensors (FP8 weights with their `weight_scale_inv` are dequantized).

        Under weights_format "fp8" the tensors are moved in instead, and `tensors` is consumed (each
        entry is removed once used) so a real-scale load never holds two copies."""
        if self.weights_format == "fp8":
            return self._load_fp8(tensors)

        def get(name: str) -> torch.Tensor:
            t = tensors[name]
            s = tensors.get(name + "_scale_inv")
            return dequant_block_fp8(t, s) if s is not None else t.float()

        with torch.no_grad():
            for name, p in self.named_parameters():
                p.copy_(self._hf_param(name, get))
            for i, layer in enumerate(self.layers):
                if isinstance(layer.mlp, MoE):
                    layer.mlp.gate_bias.copy_(get(f"model.layers.{i}.mlp.gate.e_score_correction_bias"))

    def _load_fp8(self, tensors: dict[str, torch.Tensor]) -> None:
        """Move the checkpoint's tensors into the meta parameters: FP8 weights and their scales as
        they are, BF16 elsewhere (`kv_b_proj` dequantized to BF16, the router as released)."""

        def take(name: str, dtype: torch.dtype) -> torch.Tensor:
            if name not in tensors:
                raise KeyError(f"tensor '{name}' is missing from the weights")
            t = tensors.pop(name)
            if dtype == FP8:
                if t.dtype != FP8:
                    raise ValueError(f"tensor '{name}' has dtype {t.dtype}, expected float8_e4m3fn")
                return t
            if t.dtype == FP8:
                t = dequant_block_fp8(t, tensors.pop(name + "_scale_inv"))
            return t.to(dtype)

        with torch.no_grad():
            for name, p in list(self.named_parameters()):
                # FP8 weights and their scales as they are, everything else in BF16
                dtype = p.dtype if p.dtype == FP8 or name.endswith("_scale_inv") else torch.bfloat16
                t = self._hf_param(name, lambda n, dtype=dtype: take(n, dtype))
                if tuple(t.shape) != tuple(p.shape):
                    raise ValueError(f"weight for '{name}' has shape {tuple(t.shape)}, the model expects {tuple(p.shape)}")
                module_name, _, attr = name.rpartition(".")
                setattr(self.get_submodule(module_name), attr, nn.Parameter(t.contiguous(), requires_grad=False))
            for i, layer in enumerate(self.layers):
                if isinstance(layer.mlp, MoE):
                    bias = take(f"model.layers.{i}.mlp.gate.e_score_correction_bias", torch.float32)
                    layer.mlp.gate_bias = bias
            for m in self.modules():
                if isinstance(m, MLP):
                    m.fuse_gate_up()
                elif isinstance(m, MLA):
                    m.fuse_qkv_a()

    def _hf_param(self, name: str, get) -> torch.Tensor:
        if name == "embed_tokens.weight":
            return get("model.embed_tokens.weight")
        if name in ("norm.weight", "lm_head.weight"):
            return get(("model." if name.startswith("norm") else "") + name)
        # layers.{i}.<...>
        _, i, rest = name.split(".", 2)
        p = f"model.layers.{i}."
        mlp = self.layers[int(i)].mlp
        if rest == "mlp.gate_weight":
            return get(p + "mlp.gate.weight")
        base = rest.removesuffix("_scale_inv")
        if base in ("mlp.experts.gate_up", "mlp.experts.down"):
            ids, sfx = mlp.experts.expert_ids, rest[len(base):]  # sfx: "_scale_inv" for the FP8 scales
            if base.endswith("gate_up"):
                return _stack([
                    _cat([get(f"{p}mlp.experts.{e}.gate_proj.weight{sfx}"), get(f"{p}mlp.experts.{e}.up_proj.weight{sfx}")])
                    for e in ids
                ])
            return _stack([get(f"{p}mlp.experts.{e}.down_proj.weight{sfx}") for e in ids])
        return get(p + rest)

    def hf_tensors(self) -> dict[str, torch.Tensor]:
        """The weights under their HF names (fp32, unquantized), the inverse of `load_hf` (fp32 format)."""
        if self.weights_format != "fp32":
            raise ValueError(f"hf_tensors needs weights_format 'fp32', this model holds {self.weights_format!r}")
        out: dict[str, torch.Tensor] = {}
        for name, p in self.named_parameters():
            t = p.detach().float()
            if name == "embed_tokens.weight":
                out["model.embed_tokens.weight"] = t
            elif name == "norm.weight":
                out["model.norm.weight"] = t
            elif name == "lm_head.weight":
                out["lm_head.weight"] = t
            else:
                _, i, rest = name.split(".", 2)
                pre = f"model.layers.{i}."
                experts = self.layers[int(i)].mlp.experts if rest.startswith("mlp.experts") else None
                if rest == "mlp.gate_weight":
                    out[pre + "mlp.gate.weight"] = t
                elif rest == "mlp.experts.gate_up":
                    for j, e in enumerate(experts.expert_ids):
                        g, u = t[j].chunk(2)
                        out[f"{pre}mlp.experts.{e}.gate_proj.weight"] = g
                        out[f"{pre}mlp.experts.{e}.up_proj.weight"] = u
                elif rest == "mlp.experts.down":
                    for j, e in enumerate(experts.expert_ids):
                        out[f"{pre}mlp.experts.{e}.down_proj.weight"] = t[j]
                else:
                    out[pre + rest] = t
        for i, layer in enumerate(self.layers):
            if isinstance(layer.mlp, MoE):
                out[f"model.layers.{i}.mlp.gate.e_score_correction_bias"] = layer.mlp.gate_bias.detach().float()
        return out


def _cat(ts: list[torch.Tensor]) -> torch.Tensor:
    """torch.cat along dim 0 that also takes e4m3 (through its bytes: exact)."""
    if ts[0].dtype == FP8:
        return torch.cat([t.view(torch.uint8) for t in ts]).view(FP8)
    return torch.cat(ts)


def _stack(ts: list[torch.Tensor]) -> torch.Tensor:
    if ts[0].dtype == FP8:
        return torch.stack([t.view(torch.uint8) for t in ts]).view(FP8)
    return torch.stack(ts)
