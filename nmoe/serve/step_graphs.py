"""Steps replayed from CUDA graphs: decode steps whole, steps with a little prefill piecewise.

A step's forward is hundreds of small kernels per layer; launched one by one from Python the host,
not the GPU, sets the step time at small batches. A graph captured once per shape replays them with
one launch. What makes the forward capturable:

* static inputs: ids, positions, cache slots (`out_loc`), block table and lengths live in buffers
  sized for the largest shape; a step copies its rows in (decode rows first, then prefill rows) and
  pads each part to its bucket with rows of length 0 and slot -1 (the cache append skips them,
  attention gives them zeros);
* `AttnBatch.static`: the model takes the static path, which reads nothing on the host (the block
  table's full width `ceil(max_seq_len / page)` bounds every decode context);
* the MoE path is device-only: FP8 weights (the grouped GEMM reads expert offsets on the device)
  and no transport, or one that says `graph_safe` (the loopback of a simulated rank). The a2a
  transport exchanges counts through the host, so real EP runs eagerly for now.

A step with prefill rows (a mixed step, or a short prefill alone) is captured piecewise, as vLLM
does: each layer's prefill attention - whose work depends on each sequence's context length, known
on the host - runs eagerly between graphs. Every other kernel (projections, cache append, decode
attention, the MoE, norms) is in the graphs, so an L-layer step is L + 1 replays and L small eager
attentions instead of thousands of launches. The q and output buffers of the eager attention are
static, shared by every layer.

The first step of a shape runs eagerly on the static buffers (its result is that step's output, and
it warms up every kernel), then the shape is captured; later steps of that shape replay it. The
graphs end at the final hidden states: the logits rows a step needs are taken outside, and sampling
follows (its parameters change per step).
"""

from __future__ import annotations

import torch

from nmoe.serve.host_copy import to_device
from nmoe.serve.model import MLA, AttnBatch, DeepseekV3, MoE, cached_causal_mask, row_starts

DECODE_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 224, 256)
PREFILL_BUCKETS = (16, 32, 64, 128, 256, 512, 1024, 2048)


def graph_buckets(max_batch_size: int) -> list[int]:
    """The decode capture sizes up to `max_batch_size` (which is always one)."""
    return [b for b in DECODE_BUCKETS if b < max_batch_size] + [max_batch_size]


def prefill_buckets(max_tokens: int) -> list[int]:
    """The prefill-row capture sizes up to `max_tokens` (which is always one; none for 0)."""
    if max_tokens <= 0:
        return []
    return [b for b in PREFILL_BUCKETS if b < max_tokens] + [max_tokens]


def exchanging_transport(model: DeepseekV3) -> str | None:
    """The name of a transport through which `model`'s MoE layers exchange with peers (counts
    through the host, collectives every rank must enter), or None when every layer is local or on
    a device-only transport that says `graph_safe` (the loopback)."""
    for layer in model.layers:
        t = layer.mlp.transport if isinstance(layer.mlp, MoE) else None
        if t is not None and not getattr(t, "graph_safe", False):
            return t.name
    return None


def not_capturable(model: DeepseekV3) -> str | None:
    """Why `model`'s forward cannot be captured, or None when it can."""
    if model.weights_format != "fp8":
        return f"weights_format {model.weights_format!r} (the dense expert path counts rows on the host)"
    name = exchanging_transport(model)
    return f"the {name} transport exchanges counts through the host" if name else None


def _bucket(buckets: list[int], n: int) -> int:
    return 0 if n == 0 else next(b for b in buckets if b >= n)


class StepGraphs:
    """Padded static forwards of `model` over `kv_caches`, keyed by (decode rows, prefill rows)
    buckets; `capture=False` runs them eagerly (the same padding and code path, for CPU tests and
    `--disable-cuda-graph` comparisons). `max_prefill_tokens` 0: pure decode steps only."""

    def __init__(self, model: DeepseekV3, kv_caches: list[torch.Tensor], max_batch_size: int, max_pages: int,
                 max_prefill_tokens: int = 0, capture: bool = True):
        self.model, self.kv_caches, self.capture = model, kv_caches, capture
        self.decode_buckets = graph_buckets(max_batch_size)
        self.prefill_buckets = prefill_buckets(max_prefill_tokens)
        dev = kv_caches[0].device
        nd, np_ = self.decode_buckets[-1], (self.prefill_buckets or [0])[-1]
        cfg = model.cfg
        self.ids = torch.zeros(nd + np_, dtype=torch.long, device=dev)
        self.positions = torch.zeros(nd + np_, dtype=torch.long, device=dev)
        self.out_loc = torch.full((nd + np_,), -1, dtype=torch.long, device=dev)
        self.block_table = torch.zeros(nd, max_pages, dtype=torch.int32, device=dev)
        self.seq_lens = torch.zeros(nd, dtype=torch.int32, device=dev)
        # the prefill rows' attention, between graphs: its inputs and output, shared by all layers
        dtype = model.embed_tokens.weight.dtype
        h = cfg.num_attention_heads
        self.q_nope = torch.zeros(np_, h, cfg.qk_nope_head_dim, dtype=dtype, device=dev)
        self.q_pe = torch.zeros(np_, h, cfg.qk_rope_head_dim, dtype=dtype, device=dev)
        self.attn_out = torch.zeros(np_, h, cfg.v_head_dim, dtype=dtype, device=dev)
        self._prefill: list[tuple[int, int, int, torch.Tensor]] = []  # (row, q_len, context, table row)
        self._masks: dict[tuple[int, int], torch.Tensor | None] = {}  # this step's prefill masks
        # (decode bucket, prefill bucket) -> (graphs, the MLA of each break between them, hidden)
        self.graphs: dict[tuple[int, int], tuple[list[torch.cuda.CUDAGraph], list[MLA], torch.Tensor]] = {}
        self._pool = None

    @property
    def max_pages(self) -> int:
        return self.block_table.shape[1]

    def fits(self, q_lens: list[int], pages: int) -> bool:
        """Whether a step of these per-sequence token counts (and block-table width) has a shape."""
        d = sum(1 for q in q_lens if q == 1)
        p = sum(q for q in q_lens if q > 1)
        if d > self.decode_buckets[-1] or pages > self.max_pages or d + p == 0:
            return False
        return p == 0 or (bool(self.prefill_buckets) and p <= self.prefill_buckets[-1])

    def run(self, ids: torch.Tensor, positions: torch.Tensor, out_loc: torch.Tensor, block_table: torch.Tensor,
            seq_lens: torch.Tensor, q_lens: list[int], rows: list[int]) -> torch.Tensor:
        """One step: `ids` on the device, the rest host tensors in the caller's row order (sequences
        in order, `q_lens` tokens each; `block_table` may be narrower than `max_pages`) -> logits
        `[len(rows), vocab]` fp32 of the caller's rows `rows`."""
        starts = row_starts(q_lens)
        decode = [i for i, q in enumerate(q_lens) if q == 1]
        prefill = [i for i, q in enumerate(q_lens) if q > 1]
        d, p = len(decode), starts[-1] - len(decode)
        nd, np_ = _bucket(self.decode_buckets, d), _bucket(self.prefill_buckets, p)
        # the static row of each caller row: decode rows first, then the prefill rows
        dst = [0] * starts[-1]
        for j, i in enumerate(decode):
            dst[starts[i]] = j
        row, spans = nd, []
        for i in prefill:
            dst[starts[i] : starts[i + 1]] = range(row, row + q_lens[i])
            spans.append((row - nd, q_lens[i], int(seq_lens[i])))
            row += q_lens[i]
        t = nd + np_
        dst_t = torch.tensor(dst, dtype=torch.long)
        for buf, src, pad in ((self.positions, positions, 0), (self.out_loc, out_loc, -1)):
            staged = torch.full((t,), pad, dtype=torch.long)
            staged[dst_t] = src
            buf[:t].copy_(staged, non_blocking=True)
        self.ids[:t].zero_()
        self.ids.index_copy_(0, to_device(dst_t, self.ids.device), ids)
        dec = torch.tensor(decode, dtype=torch.long)
        self.seq_lens[:nd].zero_()
        self.seq_lens[:d].copy_(seq_lens[dec], non_blocking=True)
        self.block_table[:nd].zero_()  # entries past a row's pages and the padded rows: page 0, unread
        self.block_table[:d, : block_table.shape[1]].copy_(block_table[dec], non_blocking=True)
        self._prefill, self._masks = [], {}
        if prefill:
            tables = to_device(block_table[torch.tensor(prefill, dtype=torch.long)], self.ids.device)
            self._prefill = [(r, q, n, tables[k]) for k, (r, q, n) in enumerate(spans)]
        key = (nd, np_)
        if key in self.graphs:
            hidden = self._replay(key)
        else:
            hidden = self._forward(nd, np_, self._attend)
            if self.capture:
                self.graphs[key] = self._capture(nd, np_)
        pick = [dst[r] for r in rows]
        if not pick:
            return hidden.new_zeros(0, self.model.cfg.vocab_size, dtype=torch.float32)
        return self.model.logits(hidden[to_device(pick, hidden.device, torch.long)])

    def _stage(self, q_nope: torch.Tensor, q_pe: torch.Tensor) -> torch.Tensor:
        """The prefill rows' queries into the static buffers; returns the static output rows."""
        n = q_nope.shape[0]
        self.q_nope[:n].copy_(q_nope)
        self.q_pe[:n].copy_(q_pe)
        return self.attn_out[:n]

    def _attend(self, mla: MLA, q_nope: torch.Tensor, q_pe: torch.Tensor, cache: torch.Tensor) -> torch.Tensor:
        """The prefill rows' attention of one layer, through the static buffers (eager)."""
        out = self._stage(q_nope, q_pe)
        self._attend_static(mla, cache)
        return out

    def _attend_static(self, mla: MLA, cache: torch.Tensor) -> None:
        for row, q, n, table in self._prefill:
            sl = slice(row, row + q)
            self.attn_out[sl] = mla.prefill_attention(self.q_nope[sl], self.q_pe[sl], cache, table, n, masks=self)

    def prefill_mask(self, q: int, n: int) -> torch.Tensor | None:
        """The step's `lower_right_causal_mask(q, n)`, built once and shared by every layer."""
        return cached_causal_mask(self._masks, q, n, self.ids.device)

    def _forward(self, nd: int, np_: int, prefill_attention) -> torch.Tensor:
        attn = AttnBatch(
            positions=self.positions[: nd + np_],
            out_loc=self.out_loc[: nd + np_],
            block_table=self.block_table[:nd],
            seq_lens=self.seq_lens[:nd],
            q_lens=[1] * nd + ([np_] if np_ else []),
            kv_caches=self.kv_caches,
            static=True,
            num_decode=nd,
            prefill_attention=prefill_attention if np_ else None,
        )
        return self.model(self.ids[: nd + np_], attn)

    def _capture(self, nd: int, np_: int):
        """Capture the (nd, np_) forward: one graph, or, with prefill rows, one graph per stretch
        between two layers' prefill attentions."""
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        torch.cuda.synchronize()
        graphs, breaks = [torch.cuda.CUDAGraph()], []

        def split(mla: MLA, q_nope: torch.Tensor, q_pe: torch.Tensor, cache: torch.Tensor) -> torch.Tensor:
            out = self._stage(q_nope, q_pe)
            graphs[-1].capture_end()  # capture records without executing: the eager part runs at replay
            breaks.append(mla)
            graphs.append(torch.cuda.CUDAGraph())
            graphs[-1].capture_begin(pool=self._pool)
            return out

        graphs[0].capture_begin(pool=self._pool)
        try:
            hidden = self._forward(nd, np_, split)
        finally:
            graphs[-1].capture_end()
        return graphs, breaks, hidden

    def _replay(self, key: tuple[int, int]) -> torch.Tensor:
        graphs, breaks, hidden = self.graphs[key]
        for k, graph in enumerate(graphs):
            graph.replay()
            if k < len(breaks):
                self._attend_static(breaks[k], self.kv_caches[breaks[k].layer])
        return hidden
