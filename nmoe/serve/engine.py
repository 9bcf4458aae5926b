"""One rank's engine: model + paged KV pool + scheduler + sampler.

The request loop is one readable `step()`: schedule, run the batch, postprocess the outputs.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass

import torch

from nmoe.serve.ckpt import load_config, load_weights, resolve_model_path
from nmoe.serve.config import ModelConfig, ServeConfig
from nmoe.serve.model import AttnBatch, DeepseekV3
from nmoe.serve.ops.sampling import sample
from nmoe.serve.request import OutputMode, Request, RequestOutput, SamplingParams
from nmoe.serve.scheduler import Batch, Scheduler, SchedulerConfig, Sequence
from nmoe.serve.tokenizer import Tokenizer

log = logging.getLogger("nmoe")


@dataclass
class RankInfo:
    """Where this engine sits in an EP deployment (world_size 1: everything local)."""

    rank: int = 0
    world_size: int = 1
    placement: str = "contiguous"

    def local_experts(self, n_experts: int) -> list[int]:
        if n_experts % self.world_size:
            raise ValueError(f"world_size {self.world_size} does not divide n_routed_experts {n_experts}")
        per = n_experts // self.world_size
        if self.placement == "contiguous":
            return list(range(self.rank * per, (self.rank + 1) * per))
        if self.placement == "striped":
            return list(range(self.rank, n_experts, self.world_size))
        raise ValueError(f"unknown expert placement {self.placement!r} (contiguous, striped)")


class Engine:
    def __init__(self, cfg: ServeConfig, rank: RankInfo | None = None, model_cfg: ModelConfig | None = None,
                 weights: dict[str, torch.Tensor] | None = None):
        self.cfg = cfg
        self.rank = rank or RankInfo()
        self.device = torch.device(cfg.device)
        self.model_dir = resolve_model_path(cfg.ckpt)
        self.model_cfg = model_cfg or load_config(self.model_dir)
        self.tokenizer = Tokenizer(self.model_dir)
        experts = self.rank.local_experts(self.model_cfg.n_routed_experts)
        self.model = DeepseekV3(self.model_cfg, experts)
        if weights is None:
            weights = load_weights(self.model_dir, self.model_cfg, experts=experts, progress=self.rank.rank == 0)
        self.model.load_hf(weights)
        self.model.to(self.device).eval().requires_grad_(False)
        mc = self.model_cfg
        self.kv_caches = [
            torch.zeros(cfg.num_pages, cfg.page_size, mc.kv_cache_dim, dtype=torch.float32, device=self.device)
            for _ in range(mc.num_hidden_layers)
        ]
        self.scheduler = Scheduler(
            SchedulerConfig(
                num_pages=cfg.num_pages,
                page_size=cfg.page_size,
                max_seq_len=cfg.max_seq_len,
                max_batch_size=cfg.max_batch_size,
                max_prefill_tokens=cfg.max_prefill_tokens,
                chunk_size=cfg.chunk_size,
                enable_prefix_cache=not cfg.disable_prefix_cache,
                enable_chunked_prefill=not cfg.disable_chunked_prefill,
                debug_invariants=cfg.debug_invariants,
            )
        )
        self.requests: dict[int, Request] = {}
        self._rng = random.Random(cfg.seed * 1000003 + self.rank.rank)
        self._next_rid = 0
        self.stats = {"prefill_tokens": 0, "decode_tokens": 0, "steps": 0, "cached_tokens": 0}

    # --------------------------------------------------------------------------------------------
    # Admission
    # --------------------------------------------------------------------------------------------

    def validate(self, prompt_ids: list[int], params: SamplingParams) -> None:
        """Raise ValueError naming the limit for a request that cannot be served."""
        if not prompt_ids:
            raise ValueError("prompt is empty: at least one token is required")
        vocab = self.model_cfg.vocab_size
        for t in prompt_ids:
            if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < vocab:
                raise ValueError(f"token id {t!r} is outside the vocabulary [0, {vocab})")
        total = len(prompt_ids) + params.max_tokens
        if total > self.cfg.max_seq_len:
            raise ValueError(
                f"prompt ({len(prompt_ids)} tokens) + max_tokens ({params.max_tokens}) = {total} exceeds "
                f"max_seq_len {self.cfg.max_seq_len}"
            )

    def add_request(self, prompt_ids: list[int], params: SamplingParams, rid: int | None = None) -> int:
        self.validate(prompt_ids, params)
        if rid is None:
            rid = self._next_rid
            self._next_rid += 1
        seed = params.seed if params.seed is not None else self._rng.getrandbits(63)
        req = Request(rid=rid, prompt_ids=list(prompt_ids), params=params, seed=seed)
        req.detok = self.tokenizer.detokenizer()
        req.seq = Sequence(
            rid=rid, token_ids=list(prompt_ids), num_prompt_tokens=len(prompt_ids),
            max_new_tokens=max(params.max_tokens, 1),
        )
        if params.max_tokens == 0:
            req.finish_reason = "length"
            self.requests[rid] = req
            return rid
        self.scheduler.add(req.seq)
        self.requests[rid] = req
        return rid

    def cancel(self, rid: int) -> None:
        req = self.requests.get(rid)
        if req is not None and req.finish_reason is None:
            self._finish(req, "cancelled")

    def pop_finished(self) -> list[RequestOutput]:
        done = [r for r in self.requests.values() if r.finish_reason is not None]
        for r in done:
            del self.requests[r.rid]
        return [r.output() for r in done]

    def has_work(self) -> bool:
        return self.scheduler.has_work()

    # --------------------------------------------------------------------------------------------
    # The loop
    # --------------------------------------------------------------------------------------------

    def step(self) -> list[Request]:
        """Run one scheduled batch; returns the requests that received tokens."""
        batch = self.scheduler.schedule()
        if batch is None:
            return []
        sampled = self.forward_batch(batch)
        self.scheduler.complete(batch)
        self.stats["steps"] += 1
        return self._postprocess(sampled)

    @torch.no_grad()
    def forward_idle(self) -> None:
        """A forward with no tokens (T=0): enters every collective of the MoE layers, as lockstep needs."""
        dev = self.device
        empty = torch.zeros(0, dtype=torch.long, device=dev)
        attn = AttnBatch(
            positions=empty,
            out_loc=empty,
            block_table=torch.zeros(0, 1, dtype=torch.int32, device=dev),
            seq_lens=torch.zeros(0, dtype=torch.int32, device=dev),
            q_lens=[],
            kv_caches=self.kv_caches,
        )
        self.model(empty, attn)

    @torch.no_grad()
    def forward_batch(self, batch: Batch) -> list[tuple[Request, object, int]]:
        """Forward the batch's tokens and sample where a sequence reaches its end.

        Returns (request, SampleOut, row) for each sampled sequence."""
        dev = self.device
        items = batch.items
        ids = torch.tensor(batch.input_ids(), dtype=torch.long, device=dev)
        max_pages = max(len(it.seq.pages) for it in items)
        table = torch.zeros(len(items), max_pages, dtype=torch.int32)
        for i, it in enumerate(items):
            table[i, : len(it.seq.pages)] = torch.tensor(it.seq.pages, dtype=torch.int32)
        attn = AttnBatch(
            positions=torch.tensor(batch.positions(), dtype=torch.long, device=dev),
            out_loc=torch.tensor(batch.out_loc(self.cfg.page_size), dtype=torch.long, device=dev),
            block_table=table.to(dev),
            seq_lens=torch.tensor([it.start + it.num_tokens for it in items], dtype=torch.int32, device=dev),
            q_lens=[it.num_tokens for it in items],
            kv_caches=self.kv_caches,
        )
        for it in items:
            key = "decode_tokens" if it.num_tokens == 1 else "prefill_tokens"
            self.stats[key] += it.num_tokens
        hidden = self.model(ids, attn)
        rows, reqs = [], []
        offset = 0
        for it in items:
            offset += it.num_tokens
            if it.reaches_end:
                rows.append(offset - 1)
                reqs.append(self.requests[it.seq.rid])
        if not rows:
            return []
        logits = self.model.logits(hidden[torch.tensor(rows, device=dev)])
        return self._sample(reqs, logits)

    def _sample(self, reqs: list[Request], logits: torch.Tensor):
        dev = logits.device
        p = [r.params for r in reqs]
        k = max(x.num_top_logprobs for x in p)
        out = sample(
            logits,
            temperature=torch.tensor([x.temperature for x in p], dtype=torch.float32, device=dev),
            top_k=torch.tensor([x.top_k for x in p], dtype=torch.int32, device=dev),
            top_p=torch.tensor([x.top_p for x in p], dtype=torch.float32, device=dev),
            min_p=torch.tensor([x.min_p for x in p], dtype=torch.float32, device=dev),
            seed=torch.tensor([r.seed for r in reqs], dtype=torch.int64, device=dev),
            position=torch.tensor([len(r.seq.token_ids) for r in reqs], dtype=torch.int64, device=dev),
            num_top_logprobs=k,
        )
        return [(r, out, i, logits) for i, r in enumerate(reqs)]

    def _postprocess(self, sampled) -> list[Request]:
        touched = []
        for req, out, i, logits in sampled:
            if req.finish_reason is not None:
                continue
            tok = int(out.tokens[i])
            mode = req.params.mode
            if mode is not OutputMode.TOKENS:
                lp = out.logprobs_processed if req.params.logprobs_mode == "processed" else out.logprobs_raw
                req.logprobs.append(float(lp[i]))
            k = req.params.num_top_logprobs
            if k:
                req.top_logprobs.append(list(zip(out.top_ids[i, :k].tolist(), out.top_logprobs[i, :k].tolist())))
            if mode is OutputMode.LOGITS:
                req.logits.append(logits[i].float().cpu())
            self._append(req, tok)
            touched.append(req)
        return touched

    def _append(self, req: Request, tok: int) -> None:
        req.output_ids.append(tok)
        req.seq.token_ids.append(tok)
        params = req.params
        if not params.ignore_eos and tok in self.model_cfg.eos_token_ids:
            req.text += req.detok.push([])
            return self._finish(req, "stop")
        req.text += req.detok.push([tok])
        if tok in params.stop_token_ids:
            return self._finish(req, "stop")
        if params.stop and self._apply_stop_strings(req):
            return self._finish(req, "stop")
        if len(req.output_ids) >= params.max_tokens or len(req.seq.token_ids) >= self.cfg.max_seq_len:
            return self._finish(req, "length")

    def _apply_stop_strings(self, req: Request) -> bool:
        """Find a stop string in the text produced so far; cut the text before it."""
        longest = max(len(s) for s in req.params.stop)
        start = max(0, req.stop_scan_from - longest + 1)
        hits = [i for i in (req.text.find(s, start) for s in req.params.stop) if i >= 0]
        req.stop_scan_from = len(req.text)
        if not hits:
            return False
        req.text = req.text[: min(hits)]
        return True

    def _finish(self, req: Request, reason: str, error: str | None = None) -> None:
        req.finish_reason = reason
        req.error = error
        self.scheduler.finish(req.seq)

    def fail(self, rid: int, message: str) -> None:
        req = self.requests.get(rid)
        if req is not None and req.finish_reason is None:
            self._finish(req, "error", message)
