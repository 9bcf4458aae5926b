"""One rank's engine: model + paged KV pool + scheduler + sampler.

The request loop is one readable `step()`: schedule, run the batch, postprocess the outputs.
"""

from __future__ import annotations

import contextlib
import random
from dataclasses import dataclass, field

import torch

from nmoe.serve import shards
from nmoe.serve.ckpt import load_config, load_weights, resolve_model_path
from nmoe.serve.config import ModelConfig, ServeConfig
from nmoe.serve.dist import RankInfo
from nmoe.serve.env import ENV
from nmoe.serve.host_copy import to_device
from nmoe.serve.model import AttnBatch, DeepseekV3
from nmoe.serve.ops.sampling import sample, score_tokens
from nmoe.serve.request import OutputMode, Request, RequestOutput, SamplingParams
from nmoe.serve.scheduler import Batch, Scheduler, SchedulerConfig, Sequence
from nmoe.serve.step_graphs import StepGraphs, exchanging_transport, not_capturable
from nmoe.serve.tokenizer import Tokenizer

PLACEHOLDER = -1  # a sampled token not yet on the host (overlap); its value lives on the device


@dataclass
class _Launched:
    """One forward's sampling results, on their way to the host."""

    wants: list  # (request, forced target or None) per logits row
    out: object  # SampleOut, fields copied to the host (non-blocking) at launch
    tokens: torch.Tensor  # [rows] sampled tokens on the device: the next step's placeholder inputs
    logits: dict[int, torch.Tensor]  # row -> host logits, for LOGITS-mode rows
    ready: torch.cuda.Event | None  # recorded after the copies (None on CPU)
    slots: dict[int, int] = field(default_factory=dict)  # row -> index of its placeholder in token_ids


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
        self.model = DeepseekV3(self.model_cfg, experts, weights_format=self._weights_format())
        if weights is None and shards.is_shard_dir(self.model_dir):  # EP shards: this rank's file only
            weights = shards.load_rank_weights(self.model_dir, self.model_cfg, self.rank, progress=self.rank.rank == 0)
        elif weights is None:  # the HF layout: this rank reads only the tensors it needs
            weights = load_weights(self.model_dir, self.model_cfg, experts=experts, progress=self.rank.rank == 0)
        self.model.load_hf(weights)
        self.model.to(self.device).eval().requires_grad_(False)
        mc = self.model_cfg
        kv_dtype = self._kv_dtype()
        self.kv_caches = [
            torch.zeros(cfg.num_pages, cfg.page_size, mc.kv_cache_dim, dtype=kv_dtype, device=self.device)
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
                enable_mixed_steps=not cfg.disable_mixed_steps,
                mixed_prefill_tokens=cfg.mixed_prefill_tokens,
                debug_invariants=cfg.debug_invariants,
            )
        )
        # CUDA: the engine's work goes on its own stream (graphs are captured there, and other
        # streams' work on the same device does not serialize behind a step), at the device's
        # highest priority by default (NMOE_ENGINE_STREAM_PRIORITY: lower is higher, torch clamps
        # it to the device's range). Above the side stream's 0, the lowest, the layer's main chain
        # (router, routed experts) takes free SMs before the shared experts beside it: 31.80 against
        # 32.05 ms per decode step on the H200 (docs/benchmarks.md). Captured kernels keep their
        # stream's priority (torch instantiates graphs with per-node priorities).
        self.stream = None
        if self.device.type == "cuda":
            priority = ENV.engine_stream_priority
            if priority is None:
                priority = torch.cuda.Stream.priority_range()[1]
            self.stream = torch.cuda.Stream(self.device, priority=priority)
            self.stream.wait_stream(torch.cuda.current_stream(self.device))  # the caches' zero-fill
        self._graphs: StepGraphs | None = None  # built at the first step that can use them
        # overlap (CUDA): step k+1 is scheduled and launched before step k's tokens reach the host;
        # the host then delivers step k while the device runs step k+1
        self.overlap = self.stream is not None and not cfg.disable_overlap
        self._pending: list[_Launched] = []
        self._placeholders: dict[int, tuple[torch.Tensor, int, int]] = {}  # rid -> (tokens, row, index)
        self._forced_in_flight: dict[int, int] = {}  # rid -> forced rows launched, not yet delivered
        self.requests: dict[int, Request] = {}
        self._rng = random.Random(cfg.seed * 1000003 + self.rank.rank)
        self._next_rid = 0
        self.stats = {"prefill_tokens": 0, "decode_tokens": 0, "steps": 0, "cached_tokens": 0}

    def _weights_format(self) -> str:
        """`--weights-format auto`: FP8 weights with BF16 activations on CUDA for an FP8 checkpoint
        (the `nmoe._C` GEMMs), fp32 dequantized weights otherwise (the CPU path)."""
        choice = self.cfg.weights_format
        if choice == "auto":
            fp8 = self.device.type == "cuda" and self.model_cfg.quantization_config is not None
            choice = "fp8" if fp8 else "fp32"
        if choice not in ("fp8", "fp32"):
            raise ValueError(f"--weights-format {choice!r} is not supported (auto, fp8, fp32)")
        return choice

    def _kv_dtype(self) -> torch.dtype:
        """`--kv-cache-dtype auto`: BF16 on GPU where the MLA decode kernel applies (DeepSeek-V3's
        512 + 64 latent), fp32 otherwise (CPU, and small test models, whose CUDA runs then match CPU)."""
        choice = self.cfg.kv_cache_dtype
        if choice == "auto":
            kernel = self.model_cfg.kv_lora_rank == 512 and self.model_cfg.qk_rope_head_dim == 64
            choice = "bfloat16" if self.device.type == "cuda" and kernel else "float32"
        if choice not in ("bfloat16", "float32"):
            raise ValueError(f"--kv-cache-dtype {choice!r} is not supported (auto, bfloat16, float32)")
        return getattr(torch, choice)

    # --------------------------------------------------------------------------------------------
    # Admission
    # --------------------------------------------------------------------------------------------

    def validate(self, prompt_ids: list[int], params: SamplingParams, forced_output_ids: list[int] | None = None) -> None:
        """Raise ValueError naming the limit for a request that cannot be served."""
        if not prompt_ids:
            raise ValueError("prompt is empty: at least one token is required")
        vocab = self.model_cfg.vocab_size
        for t in list(prompt_ids) + list(forced_output_ids or []):
            if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < vocab:
                raise ValueError(f"token id {t!r} is outside the vocabulary [0, {vocab})")
        if forced_output_ids is not None:
            total, what = len(prompt_ids) + len(forced_output_ids), f"forced tokens ({len(forced_output_ids)})"
        else:
            total, what = len(prompt_ids) + params.max_tokens, f"max_tokens ({params.max_tokens})"
        if total > self.cfg.max_seq_len:
            raise ValueError(
                f"prompt ({len(prompt_ids)} tokens) + {what} = {total} exceeds max_seq_len {self.cfg.max_seq_len}"
            )

    def add_request(self, prompt_ids: list[int], params: SamplingParams, rid: int | None = None,
                    forced_output_ids: list[int] | None = None) -> int:
        """Queue a request. With `forced_output_ids` it is teacher-forced: each forced token is scored
        (logprob, top-k, logits per the output mode) instead of sampled, and it finishes after the last."""
        self.validate(prompt_ids, params, forced_output_ids)
        if rid is None:
            rid = self._next_rid
            self._next_rid += 1
        seed = params.seed if params.seed is not None else self._rng.getrandbits(63)
        req = Request(rid=rid, prompt_ids=list(prompt_ids), params=params, seed=seed)
        req.detok = self.tokenizer.detokenizer()
        tokens = list(prompt_ids)
        if forced_output_ids is not None:
            req.forced = list(forced_output_ids)
            tokens += req.forced
        req.seq = Sequence(
            rid=rid, token_ids=tokens, num_prompt_tokens=len(prompt_ids),
            max_new_tokens=0 if req.forced is not None else max(params.max_tokens, 1),
            # scored positions must be computed; a solo (fixed-batching) request recomputes everything
            prefix_match_limit=0 if params.solo_forward else len(prompt_ids) - 1,
        )
        if (req.forced is None and params.max_tokens == 0) or req.forced == []:
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
        return self.scheduler.has_work() or bool(self._pending)

    # --------------------------------------------------------------------------------------------
    # The loop
    # --------------------------------------------------------------------------------------------

    def step(self) -> list[Request]:
        """Run one scheduled batch; returns the requests that received tokens (or scores).

        With overlap the tokens delivered are the previous step's: this step is launched first, so
        the host's delivery (detokenizing, stop checks) runs while the device computes."""
        batch = self.scheduler.schedule()
        if batch is None:
            return self._deliver_pending()
        launched: list[_Launched] = []
        try:
            with self._on_stream():
                for items in self._forward_groups(batch):
                    launched += self._launch(*self.forward_batch(items))
                touched = self._deliver_pending()  # the previous step's, while the device runs this one
                # EP lockstep needs every rank to run the same forwards: no step may end without
                # its outputs there, so the overlap is off when the MoE layers exchange with peers
                if self.overlap and exchanging_transport(self.model) is None:
                    for lau in launched:
                        self._hold(lau)
                    self._pending = launched
                else:
                    for lau in launched:
                        touched += self._deliver(lau)
        except BaseException:
            self.scheduler.abort(batch)  # nothing of this batch counts as computed
            self._drop(launched)
            raise
        self.scheduler.complete(batch)
        self.stats["steps"] += 1
        return touched

    @torch.no_grad()
    def forward_idle(self) -> None:
        """A forward with no tokens (T=0): enters every collective of the MoE layers, as lockstep needs."""
        dev = self.device
        empty = torch.zeros(0, dtype=torch.long, device=dev)
        with self._on_stream():
            attn = AttnBatch(
                positions=empty,
                out_loc=empty,
                block_table=torch.zeros(0, 1, dtype=torch.int32, device=dev),
                seq_lens=torch.zeros(0, dtype=torch.int32, device=dev),
                q_lens=[],
                kv_caches=self.kv_caches,
            )
            self.model(empty, attn)

    def _on_stream(self):
        return torch.cuda.stream(self.stream) if self.stream is not None else contextlib.nullcontext()

    def step_graphs(self) -> StepGraphs | None:
        """The CUDA-graph runner for decode steps and steps of at most `--cuda-graph-prefill-tokens`
        prefill tokens, or None where graphs are off (CPU, `--disable-cuda-graph`, or a forward that
        cannot be captured: see `not_capturable`)."""
        if self.stream is None or self.cfg.disable_cuda_graph or not_capturable(self.model) is not None:
            return None
        if self._graphs is None:
            max_pages = -(-self.cfg.max_seq_len // self.cfg.page_size)
            self._graphs = StepGraphs(self.model, self.kv_caches, self.cfg.max_batch_size, max_pages,
                                      self.cfg.cuda_graph_prefill_tokens)
        return self._graphs

    def _forward_groups(self, batch: Batch) -> list[list]:
        """The batch's items as forwards: one shared, plus one per `solo_forward` request.

        Under EP every rank must run the same forwards, so there the batch stays whole."""
        if self.rank.world_size > 1:
            return [batch.items]
        shared = [it for it in batch.items if not self.requests[it.seq.rid].params.solo_forward]
        solo = [[it] for it in batch.items if self.requests[it.seq.rid].params.solo_forward]
        return ([shared] if shared else []) + solo

    def _host_batch(self, items: list) -> dict[str, torch.Tensor]:
        """The items' token ids, positions, cache slots, block table and lengths, as host tensors."""
        page_size = self.cfg.page_size
        table = torch.zeros(len(items), max(len(it.seq.pages) for it in items), dtype=torch.int32)
        ids, positions, out_loc = [], [], []
        for i, it in enumerate(items):
            table[i, : len(it.seq.pages)] = torch.tensor(it.seq.pages, dtype=torch.int32)
            ids.extend(it.input_ids())
            positions.extend(it.positions())
            out_loc.extend(it.out_loc(page_size))
        return dict(
            ids=torch.tensor(ids, dtype=torch.long),
            positions=torch.tensor(positions, dtype=torch.long),
            out_loc=torch.tensor(out_loc, dtype=torch.long),
            block_table=table,
            seq_lens=torch.tensor([it.start + it.num_tokens for it in items], dtype=torch.int32),
        )

    @torch.no_grad()
    def forward_batch(self, items: list) -> tuple[list[tuple[Request, int | None]], torch.Tensor]:
        """Forward the items' tokens; logits only at the positions a request needs.

        Returns, per logits row, (request, forced target or None to sample), and the logits `[R, V]`."""
        for it in items:
            self.stats["decode_tokens" if it.num_tokens == 1 else "prefill_tokens"] += it.num_tokens
        host = self._host_batch(items)
        rows, wants = [], []
        offset = 0
        for it in items:
            req = self.requests[it.seq.rid]
            for pos, target in self._logit_positions(req, it):
                rows.append(offset + pos - it.start)
                wants.append((req, target))
            offset += it.num_tokens
        dev = self.device
        ids = self._device_ids(items, host.pop("ids"))
        q_lens = [it.num_tokens for it in items]
        graphs = self.step_graphs()
        if graphs is not None and graphs.fits(q_lens, host["block_table"].shape[1]):
            with self._on_stream():  # a capture must not run on the default stream
                return wants, graphs.run(ids, q_lens=q_lens, rows=rows, **host)
        attn = AttnBatch(
            positions=to_device(host["positions"], dev),
            out_loc=to_device(host["out_loc"], dev),
            block_table=to_device(host["block_table"], dev),
            seq_lens=to_device(host["seq_lens"], dev),
            q_lens=q_lens,
            kv_caches=self.kv_caches,
            seq_lens_host=host["seq_lens"].tolist(),
        )
        hidden = self.model(ids, attn)
        if not rows:
            return [], hidden.new_zeros(0, self.model_cfg.vocab_size)
        return wants, self.model.logits(hidden[to_device(rows, dev, torch.long)])

    def _device_ids(self, items: list, ids: torch.Tensor) -> torch.Tensor:
        """The items' input ids on the device, placeholders replaced by the sampled tokens that are
        still there (overlap): no host round trip between consecutive steps."""
        out = to_device(ids, self.device)
        subs: dict[int, tuple[torch.Tensor, list[int], list[int]]] = {}
        offset = 0
        for it in items:
            ph = self._placeholders.get(it.seq.rid)
            if ph is not None and it.start <= ph[2] < it.start + it.num_tokens:
                tokens, row, index = ph
                entry = subs.setdefault(id(tokens), (tokens, [], []))
                entry[1].append(offset + index - it.start)
                entry[2].append(row)
            offset += it.num_tokens
        for tokens, pos, rows in subs.values():
            out[to_device(pos, self.device, torch.long)] = tokens[to_device(rows, tokens.device, torch.long)]
        return out

    def _logit_positions(self, req: Request, it) -> list[tuple[int, int | None]]:
        """(position, target) pairs in this chunk: forced tokens to score, or the end to sample from."""
        if req.forced is None:
            return [(it.start + it.num_tokens - 1, None)] if it.reaches_end else []
        # next forced token not yet scored (nor launched for scoring)
        first = len(req.prompt_ids) - 1 + len(req.output_ids) + self._forced_in_flight.get(req.rid, 0)
        last = len(req.prompt_ids) + len(req.forced) - 2
        hi = min(last, it.start + it.num_tokens - 1)
        return [(p, req.forced[p + 1 - len(req.prompt_ids)]) for p in range(max(first, it.start), hi + 1)]

    def _launch(self, wants: list[tuple[Request, int | None]], logits: torch.Tensor) -> list[_Launched]:
        """Sample or score every logits row on the device and start copying the results to the host."""
        if not wants:
            return []
        out = self._sample_or_score([r for r, _ in wants], [t for _, t in wants], logits)
        tokens = out.tokens
        for f in ("tokens", "logprobs_raw", "logprobs_processed", "top_ids", "top_logprobs"):
            t = getattr(out, f)
            if t is not None:
                setattr(out, f, t.to("cpu", non_blocking=True))
        rows = [i for i, (r, _) in enumerate(wants) if r.params.mode is OutputMode.LOGITS]
        host_logits = {}
        if rows:  # copied beside the sampled tokens, without waiting for them
            picked = logits[to_device(rows, logits.device, torch.long)].float().to("cpu", non_blocking=True)
            host_logits = dict(zip(rows, picked.unbind(0)))
        ready = None
        if self.stream is not None:
            ready = torch.cuda.Event()
            ready.record(torch.cuda.current_stream(self.device))
        return [_Launched(wants, out, tokens, host_logits, ready)]

    def _hold(self, lau: _Launched) -> None:
        """Overlap: give every sampled row that will surely be followed by another step a placeholder
        token now, so the scheduler can feed it before its value is on the host."""
        for i, (req, target) in enumerate(lau.wants):
            if target is not None:
                self._forced_in_flight[req.rid] = self._forced_in_flight.get(req.rid, 0) + 1
                continue
            seq = req.seq
            more = (len(req.output_ids) + 1 < req.params.max_tokens
                    and len(seq.token_ids) + 1 < self.cfg.max_seq_len)
            if req.finish_reason is None and more:
                seq.token_ids.append(PLACEHOLDER)
                lau.slots[i] = len(seq.token_ids) - 1
                self._placeholders[req.rid] = (lau.tokens, i, lau.slots[i])

    def _deliver_pending(self) -> list[Request]:
        pending, self._pending = self._pending, []
        touched: list[Request] = []
        for lau in pending:
            touched += self._deliver(lau)
        return touched

    def _drop(self, launched: list[_Launched]) -> None:
        """Undo `_hold` for launches whose step failed (their placeholders are never filled)."""
        for lau in launched:
            for i, index in lau.slots.items():
                req = lau.wants[i][0]
                if self._release_placeholder(req, index):
                    del req.seq.token_ids[index:]

    def _release_placeholder(self, req: Request, index: int) -> bool:
        """Forget `req`'s placeholder at `index` (if it is still the one recorded); True if it was."""
        ph = self._placeholders.get(req.rid)
        if ph is None or ph[2] != index:
            return False
        del self._placeholders[req.rid]
        return True

    def _deliver(self, lau: _Launched) -> list[Request]:
        """Append each row's token (and logprobs, top-k, logits per its output mode) to its request,
        in position order."""
        if lau.ready is not None:
            lau.ready.synchronize()
        out = lau.out
        touched: dict[int, Request] = {}
        for i, (req, target) in enumerate(lau.wants):
            if target is not None:
                left = self._forced_in_flight.get(req.rid, 0) - 1
                if left > 0:
                    self._forced_in_flight[req.rid] = left
                else:
                    self._forced_in_flight.pop(req.rid, None)
            index = lau.slots.get(i)
            if index is not None:
                self._release_placeholder(req, index)
            if req.finish_reason is not None:
                continue
            p = req.params
            if p.mode is not OutputMode.TOKENS:
                lp = out.logprobs_processed if p.logprobs_mode == "processed" else out.logprobs_raw
                req.logprobs.append(float(lp[i]))
            if p.num_top_logprobs:
                k = p.num_top_logprobs
                req.top_logprobs.append(list(zip(out.top_ids[i, :k].tolist(), out.top_logprobs[i, :k].tolist())))
            if p.mode is OutputMode.LOGITS:
                req.logits.append(lau.logits[i])
            if target is not None:
                self._append_forced(req, target)
            else:
                self._append(req, int(out.tokens[i]), index)
            touched[req.rid] = req
        return list(touched.values())

    def _sample_or_score(self, reqs: list[Request], targets: list[int | None], logits: torch.Tensor):
        dev = logits.device
        p = [r.params for r in reqs]
        k = max(x.num_top_logprobs for x in p)
        processed_top = any(x.logprobs_mode == "processed" for x in p)
        kw = dict(
            temperature=to_device([x.temperature for x in p], dev, torch.float32),
            top_k=to_device([x.top_k for x in p], dev, torch.int32),
            top_p=to_device([x.top_p for x in p], dev, torch.float32),
            min_p=to_device([x.min_p for x in p], dev, torch.float32),
            num_top_logprobs=k,
            top_from_processed=processed_top,
        )
        sampled = sample(
            logits,
            seed=to_device([r.seed for r in reqs], dev, torch.int64),
            position=to_device([len(r.seq.token_ids) for r in reqs], dev, torch.int64),
            **kw,
        )
        if all(t is None for t in targets):
            return sampled
        given = to_device([t if t is not None else 0 for t in targets], dev, torch.long)
        scored = score_tokens(logits, given, **kw)
        is_forced = to_device([t is not None for t in targets], dev, torch.bool)
        for f in ("tokens", "logprobs_raw", "logprobs_processed"):
            setattr(sampled, f, torch.where(is_forced, getattr(scored, f), getattr(sampled, f)))
        if k:
            sampled.top_ids = torch.where(is_forced[:, None], scored.top_ids, sampled.top_ids)
            sampled.top_logprobs = torch.where(is_forced[:, None], scored.top_logprobs, sampled.top_logprobs)
        return sampled

    def _append_forced(self, req: Request, tok: int) -> None:
        req.output_ids.append(tok)
        req.text += req.detok.push([tok])
        if len(req.output_ids) == len(req.forced):
            self._finish(req, "length")

    def _append(self, req: Request, tok: int, index: int | None = None) -> None:
        """A sampled token: appended to the sequence, or written over its placeholder at `index`."""
        req.output_ids.append(tok)
        if index is None:
            req.seq.token_ids.append(tok)
        else:
            req.seq.token_ids[index] = tok
        length = len(req.seq.token_ids) if index is None else index + 1
        params = req.params
        if not params.ignore_eos and tok in self.model_cfg.eos_token_ids:
            req.text += req.detok.push([])
            return self._finish(req, "stop")
        req.text += req.detok.push([tok])
        if tok in params.stop_token_ids:
            return self._finish(req, "stop")
        if params.stop and self._apply_stop_strings(req):
            return self._finish(req, "stop")
        if len(req.output_ids) >= params.max_tokens or length >= self.cfg.max_seq_len:
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
