"""Decode steps replayed from CUDA graphs, one graph per batch-size bucket.

A decode step's forward is hundreds of small kernels per layer; launched one by one from Python the
host, not the GPU, sets the step time at small batches. A graph captured once per bucket replays
them with one launch. What makes the forward capturable:

* static inputs: ids, positions, cache slots (`out_loc`), block table and lengths live in buffers
  sized for the largest bucket; a step copies its rows in and pads the bucket's remaining rows
  with length 0 and slot -1 (the cache append skips them, attention gives them zeros);
* `AttnBatch.static`: the model takes the pure-decode path, which reads nothing on the host (the
  block table's full width `ceil(max_seq_len / page)` bounds every context);
* the MoE path is device-only: FP8 weights (the grouped GEMM reads expert offsets on the device)
  and no transport, or one that says `graph_safe` (the loopback of a simulated rank). The a2a
  transport exchanges counts through the host, so real EP runs eagerly for now.

The first step of a bucket runs eagerly on the static buffers (its result is that step's output,
and it warms up every kernel), then the bucket is captured; later steps of that bucket replay it.
Sampling stays outside the graph: its parameters change per step and it is one kernel.
"""

from __future__ import annotations

import torch

from nmoe.serve.model import AttnBatch, DeepseekV3, MoE

BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 224, 256)


def graph_buckets(max_batch_size: int) -> list[int]:
    """The capture sizes up to `max_batch_size` (which is always one)."""
    return [b for b in BUCKETS if b < max_batch_size] + [max_batch_size]


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
    """Why `model`'s decode forward cannot be captured, or None when it can."""
    if model.weights_format != "fp8":
        return f"weights_format {model.weights_format!r} (the dense expert path counts rows on the host)"
    name = exchanging_transport(model)
    return f"the {name} transport exchanges counts through the host" if name else None


class DecodeGraphs:
    """Padded static decode forwards of `model` over `kv_caches`; `capture=False` runs them eagerly
    (the same padding and code path, for CPU tests and `--disable-cuda-graph` comparisons)."""

    def __init__(self, model: DeepseekV3, kv_caches: list[torch.Tensor], max_batch_size: int, max_pages: int,
                 capture: bool = True):
        self.model, self.kv_caches, self.capture = model, kv_caches, capture
        self.buckets = graph_buckets(max_batch_size)
        dev = kv_caches[0].device
        n = self.buckets[-1]
        self.ids = torch.zeros(n, dtype=torch.long, device=dev)
        self.positions = torch.zeros(n, dtype=torch.long, device=dev)
        self.out_loc = torch.full((n,), -1, dtype=torch.long, device=dev)
        self.block_table = torch.zeros(n, max_pages, dtype=torch.int32, device=dev)
        self.seq_lens = torch.zeros(n, dtype=torch.int32, device=dev)
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self._pool = None

    @property
    def max_pages(self) -> int:
        return self.block_table.shape[1]

    def bucket(self, batch: int) -> int:
        return next(b for b in self.buckets if b >= batch)

    def fits(self, batch: int, pages: int) -> bool:
        return 0 < batch <= self.buckets[-1] and pages <= self.max_pages

    def run(self, ids: torch.Tensor, positions: torch.Tensor, out_loc: torch.Tensor, block_table: torch.Tensor,
            seq_lens: torch.Tensor) -> torch.Tensor:
        """One decode token per sequence (host or device tensors of `batch` rows; `block_table` may be
        narrower than `max_pages`) -> logits `[batch, vocab]` fp32, valid until the next `run`."""
        b, w = block_table.shape
        nb = self.bucket(b)
        for buf, src, pad in ((self.ids, ids, 0), (self.positions, positions, 0), (self.out_loc, out_loc, -1),
                              (self.seq_lens, seq_lens, 0)):
            buf[:b].copy_(src, non_blocking=True)
            buf[b:nb].fill_(pad)
        self.block_table[:nb].zero_()  # entries past a row's pages and the padded rows: page 0, unread
        self.block_table[:b, :w].copy_(block_table, non_blocking=True)
        if nb in self.graphs:
            graph, logits = self.graphs[nb]
            graph.replay()
            return logits[:b]
        logits = self._forward(nb)
        if self.capture:
            self.graphs[nb] = self._capture(nb)
        return logits[:b]

    def _forward(self, nb: int) -> torch.Tensor:
        attn = AttnBatch(
            positions=self.positions[:nb],
            out_loc=self.out_loc[:nb],
            block_table=self.block_table[:nb],
            seq_lens=self.seq_lens[:nb],
            q_lens=[1] * nb,
            kv_caches=self.kv_caches,
            static=True,
        )
        return self.model.logits(self.model(self.ids[:nb], attn))

    def _capture(self, nb: int) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        graph = torch.cuda.CUDAGraph()
        # capture records without executing, so the cache is not written twice for this step
        with torch.cuda.graph(graph, pool=self._pool, stream=torch.cuda.current_stream()):
            logits = self._forward(nb)
        self._pool = graph.pool()
        return graph, logits
