"""HTTP API (rank 0 only): OpenAI-compatible completions and chat, the native /generate, metrics.

Requests are validated here (schema, limits, the engine's `validate`), then handed to the control
plane, which assigns an owner rank and streams updates back. Every error is an OpenAI-style object
`{"error": {"message", "type", "param", "code"}}` with a 4xx for bad input; a 500 means a bug.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import math
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from pydantic import BaseModel, ConfigDict
from starlette.exceptions import HTTPException as StarletteHTTPException

from nmoe.serve.control_plane import INVALID, ControlPlane, QueueFull, Update
from nmoe.serve.request import OutputMode, SamplingParams

log = logging.getLogger("nmoe.api")

MAX_N = 16  # choices per request
MAX_STOP = 16  # stop strings per request
MAX_SEED = 2**63
DISCONNECT_POLL_S = 0.5  # how often a non-streaming request checks that its client is still there


# ------------------------------------------------------------------------------------------------
# Errors
# ------------------------------------------------------------------------------------------------


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str = INVALID, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type
        self.headers = headers


def _error_body(message: str, type: str = INVALID, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def _error_response(e: ApiError) -> JSONResponse:
    return JSONResponse(_error_body(e.message, e.type, e.param, e.code), status_code=e.status, headers=e.headers)


def bad(message: str, param: str | None = None) -> ApiError:
    return ApiError(400, message, param)


# ------------------------------------------------------------------------------------------------
# Schemas (unknown fields are rejected: a misspelt knob must not be silently ignored)
# ------------------------------------------------------------------------------------------------


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(_Body):
    include_usage: bool = False


class _OpenAISampling(_Body):
    model: str | None = None
    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = 1
    ignore_eos: bool = False
    user: str | None = None
    # Accepted for client compatibility; anything but the neutral value is refused.
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None


class CompletionRequest(_OpenAISampling):
    prompt: str | list[int] | list[str] | list[list[int]]
    echo: bool = False
    logprobs: int | None = None
    suffix: str | None = None
    best_of: int | None = None


class TextPart(_Body):
    type: Literal["text"]
    text: str


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None
    name: str | None = None


class ChatRequest(_OpenAISampling):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None


class GenerateRequest(_Body):
    input_ids: list[int]
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    logprobs: bool = False
    top_logprobs: int = 0
    output_mode: str | None = None
    forced_output_ids: list[int] | None = None
    profile: str | None = None
    stream: bool = False


# ------------------------------------------------------------------------------------------------
# Metrics
# ------------------------------------------------------------------------------------------------

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class Metrics:
    """Prometheus metrics of one server (its own registry, so several apps can live in a process)."""

    def __init__(self):
        r = self.registry = CollectorRegistry()
        self.requests = Counter("nmoe_requests", "Finished requests (choices)", ["finish_reason"], registry=r)
        self.prompt_tokens = Counter("nmoe_prompt_tokens", "Prompt tokens of finished requests", registry=r)
        self.generation_tokens = Counter("nmoe_generation_tokens", "Generated tokens", registry=r)
        self.rejected = Counter("nmoe_requests_rejected", "Requests refused before admission", ["status"], registry=r)
        self.ttft = Histogram("nmoe_time_to_first_token_seconds", "Arrival to first token", buckets=_LATENCY_BUCKETS,
                              registry=r)
        self.itl = Histogram("nmoe_inter_token_latency_seconds", "Time between output tokens",
                             buckets=_LATENCY_BUCKETS, registry=r)
        self.e2e = Histogram("nmoe_e2e_request_latency_seconds", "Arrival to finish", buckets=_LATENCY_BUCKETS,
                             registry=r)
        self.running = Gauge("nmoe_requests_running", "Running requests, all ranks", registry=r)
        self.waiting = Gauge("nmoe_requests_waiting", "Waiting requests, all ranks", registry=r)
        self.pending = Gauge("nmoe_requests_pending", "Requests accepted and not finished", registry=r)
        self.pages_free = Gauge("nmoe_kv_pages_free", "Free KV pages, summed over ranks", registry=r)
        self.pages_total = Gauge("nmoe_kv_pages_total", "KV pages, summed over ranks", registry=r)
        self.pages_cached = Gauge("nmoe_kv_pages_cached", "KV pages held only by the prefix cache (evictable)",
                                  registry=r)
        self.rank_free = Gauge("nmoe_rank_kv_pages_free", "Free KV pages of one rank", ["rank"], registry=r)
        self.rank_tokens = Gauge("nmoe_rank_running_tokens", "Live tokens of one rank", ["rank"], registry=r)
        self.rank_assigned = Gauge("nmoe_rank_requests_assigned", "Requests ever assigned to one rank", ["rank"],
                                   registry=r)

    def render(self, cp: ControlPlane) -> bytes:
        gauges = list(cp.gauges)
        self.running.set(sum(g.running for g in gauges))
        self.waiting.set(sum(g.waiting for g in gauges))
        self.pending.set(cp.num_pending)
        self.pages_free.set(sum(g.free_pages for g in gauges))
        self.pages_total.set(sum(g.total_pages for g in gauges))
        self.pages_cached.set(sum(g.cached_pages for g in gauges))
        for g in gauges:
            self.rank_free.labels(str(g.rank)).set(g.free_pages)
            self.rank_tokens.labels(str(g.rank)).set(g.running_tokens)
            self.rank_assigned.labels(str(g.rank)).set(cp.assigned[g.rank])
        return generate_latest(self.registry)


# ------------------------------------------------------------------------------------------------
# One HTTP request's choices, merged into one event queue
# ------------------------------------------------------------------------------------------------


@dataclass
class Choice:
    prompt_ids: list[int]
    params: SamplingParams
    forced_output_ids: list[int] | None = None
    prefix: str = ""  # echoed prompt text
    # accumulated output
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    top_logprobs: list = field(default_factory=list)
    logits: list = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    error: str | None = None
    error_type: str | None = None
    uid: int | None = None
    last_token_at: float | None = None
    echoed: bool = False  # streaming: the prefix went out with the first chunk


class Job:
    """Submits every choice of one HTTP request and yields (index, update) in arrival order.
    Closing the iterator early (client gone) cancels the unfinished choices on their owners."""

    def __init__(self, server: Server, choices: list[Choice]):
        self.server, self.choices = server, choices
        self.queue: asyncio.Queue = asyncio.Queue()
        self.arrival = time.monotonic()

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        cp = self.server.cp
        for i, c in enumerate(self.choices):
            def sink(u: Update, i=i) -> None:
                try:
                    loop.call_soon_threadsafe(self.queue.put_nowait, (i, u))
                except RuntimeError:
                    pass  # the event loop is closed: nobody is listening any more
            try:
                c.uid = cp.submit(c.prompt_ids, c.params, sink, c.forced_output_ids)
            except QueueFull as e:
                self.cancel()
                self.server.metrics.rejected.labels("429").inc()
                raise ApiError(429, f"server busy: {e}; retry later", code="queue_full", type="rate_limit_error",
                               headers={"Retry-After": "1"}) from None
            except RuntimeError as e:
                self.cancel()
                raise ApiError(503, str(e), code="unavailable", type="server_error") from None

    def cancel(self) -> None:
        """Cancel the unfinished choices (the client left, or a sibling failed)."""
        for c in self.choices:
            if c.uid is not None and c.finish_reason is None:
                self.server.cp.cancel(c.uid)
                c.finish_reason = "cancelled"
                self.server.metrics.requests.labels("cancelled").inc()

    async def events(self, http: Request | None = None) -> AsyncIterator[tuple[int, Update]]:
        """`http`: poll it for a client that left (a non-streaming request has no write to fail)."""
        left = len(self.choices)
        polled = time.monotonic()
        try:
            while left:
                if http is not None and time.monotonic() - polled >= DISCONNECT_POLL_S:
                    if await http.is_disconnected():
                        return
                    polled = time.monotonic()
                try:
                    i, u = await asyncio.wait_for(self.queue.get(), DISCONNECT_POLL_S) if http else \
                        await self.queue.get()
                except asyncio.TimeoutError:
                    continue
                self._record(self.choices[i], u)
                if u.finish_reason is not None:
                    left -= 1
                yield i, u
        finally:
            self.cancel()

    def _record(self, c: Choice, u: Update) -> None:
        now = time.monotonic()
        m = self.server.metrics
        if u.token_ids:
            if c.last_token_at is None:
                m.ttft.observe(now - self.arrival)
            else:
                per = (now - c.last_token_at) / len(u.token_ids)
                for _ in u.token_ids:
                    m.itl.observe(per)
            c.last_token_at = now
            m.generation_tokens.inc(len(u.token_ids))
        c.token_ids += u.token_ids
        c.logprobs += u.logprobs
        c.top_logprobs += u.top_logprobs
        if u.logits is not None:
            c.logits += u.logits.tolist()
        c.text += u.text
        if u.finish_reason is not None:
            c.finish_reason, c.error, c.error_type = u.finish_reason, u.error, u.error_type
            m.requests.labels(u.finish_reason).inc()
            m.prompt_tokens.inc(len(c.prompt_ids))
            m.e2e.observe(now - self.arrival)

    async def run_to_end(self, http: Request) -> None:
        async for _ in self.events(http):
            pass
        self.raise_error()

    def raise_error(self) -> None:
        for c in self.choices:
            if c.finish_reason == "error":
                raise _owner_error(c)


def _owner_error(c: Choice) -> ApiError:
    if c.error_type == INVALID:
        return ApiError(400, c.error or "invalid request")
    return ApiError(500, c.error or "the request failed", type="server_error", code="request_failed")


# A logprob of -inf (a token the sampling transforms exclude, under logprobs_mode "processed") is
# not JSON; it is sent as OpenAI's "essentially impossible" value.
IMPOSSIBLE_LOGPROB = -9999.0


def _json_safe(obj):
    if isinstance(obj, float) and not math.isfinite(obj):
        return IMPOSSIBLE_LOGPROB if obj < 0 or obj != obj else -IMPOSSIBLE_LOGPROB
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_json_safe(v) for v in obj]
    return obj


class SafeJSONResponse(JSONResponse):
    def render(self, content) -> bytes:
        return super().render(_json_safe(content))


def _sse(obj) -> str:
    return f"data: {json.dumps(_json_safe(obj), separators=(',', ':'))}\n\n"


# ------------------------------------------------------------------------------------------------
# The server
# ------------------------------------------------------------------------------------------------


class Server:
    """Request translation between the HTTP schemas and the engine's (prompt ids, SamplingParams)."""

    def __init__(self, engine, cp: ControlPlane, model_name: str):
        self.engine, self.cp, self.model_name = engine, cp, model_name
        self.tokenizer = engine.tokenizer
        self.vocab = engine.model_cfg.vocab_size
        self.max_seq_len = engine.cfg.max_seq_len
        self.metrics = Metrics()
        self.created = int(time.time())
        self.ready = False

    # --- validation helpers ---------------------------------------------------------------------
    def check_model(self, model: str | None) -> None:
        if model is not None and model != self.model_name:
            raise ApiError(404, f"model {model!r} does not exist; this server serves {self.model_name!r}",
                           param="model", code="model_not_found")

    def check_ids(self, ids: list[int], param: str) -> None:
        for t in ids:
            if not 0 <= t < self.vocab:
                raise bad(f"{param}: token id {t} is outside the vocabulary [0, {self.vocab})", param)

    def params(self, **kw) -> SamplingParams:
        seed = kw.get("seed")
        if seed is not None and not 0 <= seed < MAX_SEED:
            raise bad(f"seed must be in [0, 2**63), got {seed}", "seed")
        top_k = kw.get("top_k", 0)
        if top_k > self.vocab:
            raise bad(f"top_k {top_k} exceeds the vocabulary size {self.vocab} (0 or -1: off)", "top_k")
        stop = kw.get("stop")
        if isinstance(stop, str):
            stop = kw["stop"] = [stop]
        if stop is not None:
            if len(stop) > MAX_STOP:
                raise bad(f"at most {MAX_STOP} stop strings, got {len(stop)}", "stop")
            if any(s == "" for s in stop):
                raise bad("stop strings must not be empty", "stop")
        if kw.get("stop_token_ids"):
            self.check_ids(kw["stop_token_ids"], "stop_token_ids")
        try:
            return SamplingParams(**kw)
        except (ValueError, TypeError) as e:
            raise bad(str(e)) from None

    def validate(self, prompt_ids: list[int], params: SamplingParams, param: str = "prompt",
                 forced_output_ids: list[int] | None = None) -> None:
        if not prompt_ids:
            raise bad("the prompt is empty: at least one token is required", param)
        self.check_ids(prompt_ids, param)
        try:
            self.engine.validate(prompt_ids, params, forced_output_ids)
        except ValueError as e:
            raise bad(str(e), param) from None

    def check_openai(self, req: _OpenAISampling) -> None:
        self.check_model(req.model)
        if not 1 <= req.n <= MAX_N:
            raise bad(f"n must be in [1, {MAX_N}], got {req.n}", "n")
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(req, name) != 0:
                raise bad(f"{name} is not supported (only 0)", name)
        if req.logit_bias:
            raise bad("logit_bias is not supported", "logit_bias")
        if req.stream_options is not None and not req.stream:
            raise bad("stream_options is only allowed with stream: true", "stream_options")

    def sampling_kwargs(self, req: _OpenAISampling, max_tokens: int) -> dict:
        return dict(max_tokens=max_tokens, temperature=req.temperature, top_p=req.top_p, top_k=req.top_k,
                    min_p=req.min_p, seed=req.seed, stop=req.stop, stop_token_ids=req.stop_token_ids,
                    ignore_eos=req.ignore_eos)

    def expand(self, prompts: list[list[int]], kw: dict, n: int, prefixes: list[str] | None = None) -> list[Choice]:
        """n choices per prompt (index = prompt * n + i); choice i > 0 of a seeded request gets seed + i."""
        choices = []
        for p, ids in enumerate(prompts):
            for i in range(n):
                seeded = dict(kw, seed=(kw["seed"] + i) % MAX_SEED) if kw.get("seed") is not None and i else kw
                params = self.params(**seeded)
                self.validate(ids, params)
                choices.append(Choice(ids, params, prefix=prefixes[p] if prefixes else ""))
        return choices

    def token_str(self, t: int) -> str:
        return self.tokenizer.decode([t], skip_special_tokens=False)

    def usage(self, choices: list[Choice], n: int) -> dict:
        prompt = sum(len(c.prompt_ids) for c in choices[::n])
        completion = sum(len(c.token_ids) for c in choices)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def start(self, choices: list[Choice]) -> Job:
        if not self.ready:
            raise ApiError(503, "the server is not ready", code="unavailable", type="server_error")
        job = Job(self, choices)
        job.start()
        return job

    # --- completions ----------------------------------------------------------------------------
    async def completions(self, req: CompletionRequest, http: Request):
        self.check_openai(req)
        if req.suffix is not None:
            raise bad("suffix is not supported", "suffix")
        if req.best_of is not None and req.best_of != req.n:
            raise bad("best_of is not supported (it must equal n)", "best_of")
        prompts = self.completion_prompts(req.prompt)
        if req.echo and req.logprobs is not None:
            return await self.prompt_logprobs(req, prompts, http)
        kw = self.sampling_kwargs(req, 16 if req.max_tokens is None else req.max_tokens)
        if req.logprobs is not None:
            kw["logprobs"] = req.logprobs
        prefixes = [self.tokenizer.decode(p) for p in prompts] if req.echo else None
        choices = self.expand(prompts, kw, req.n, prefixes)
        job = self.start(choices)
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        head = {"id": rid, "object": "text_completion", "created": created, "model": self.model_name}
        if req.stream:
            return await self.stream(job, lambda i, u: self.completion_chunk(head, i, u, job),
                                     head, req.stream_options, req.n)
        await job.run_to_end(http)
        body = dict(head, choices=[
            {"index": i, "text": c.prefix + c.text, "finish_reason": c.finish_reason,
             "logprobs": self.completion_logprobs(c.token_ids, c.logprobs, c.top_logprobs, len(c.prefix))
             if req.logprobs is not None else None}
            for i, c in enumerate(choices)
        ], usage=self.usage(choices, req.n))
        return SafeJSONResponse(body)

    async def prompt_logprobs(self, req: CompletionRequest, prompts: list[list[int]], http: Request):
        """OpenAI's prompt-logprobs convention (`echo: true, logprobs: k, max_tokens: 0`): each prompt
        token after the first is teacher-forced and scored; the first has no logprob (None)."""
        if req.max_tokens not in (0, None) or req.stream or req.n != 1:
            raise bad("echo with logprobs scores the prompt: it needs max_tokens 0, n 1 and no streaming", "echo")
        kw = dict(self.sampling_kwargs(req, 0), logprobs=req.logprobs or True)
        choices = []
        for ids in prompts:
            params = self.params(**kw)
            self.validate(ids[:1], params, forced_output_ids=ids[1:])
            choices.append(Choice(ids[:1], params, forced_output_ids=ids[1:], prefix=self.tokenizer.decode(ids)))
        job = self.start(choices)
        await job.run_to_end(http)
        out = []
        for i, (ids, c) in enumerate(zip(prompts, choices)):
            lp = self.completion_logprobs(ids, [None] + list(c.logprobs), [None] + list(c.top_logprobs), 0)
            if not req.logprobs:
                lp["top_logprobs"] = None
            out.append({"index": i, "text": c.prefix, "finish_reason": "length", "logprobs": lp})
        prompt_tokens = sum(map(len, prompts))
        return SafeJSONResponse({"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                             "model": self.model_name, "choices": out,
                             "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": 0,
                                       "total_tokens": prompt_tokens}})

    def completion_prompts(self, prompt) -> list[list[int]]:
        if isinstance(prompt, str):
            prompt = [prompt]
        elif prompt and isinstance(prompt[0], int):
            prompt = [prompt]
        if not prompt:
            raise bad("the prompt is empty: at least one token is required", "prompt")
        out = []
        for p in prompt:
            if isinstance(p, str):
                if p == "":
                    raise bad("the prompt is empty: at least one token is required", "prompt")
                p = self.tokenizer.encode(p)
            if not p:
                raise bad("the prompt is empty: at least one token is required", "prompt")
            self.check_ids(p, "prompt")
            out.append(list(p))
        return out

    def completion_logprobs(self, ids, logprobs, top, offset: int) -> dict:
        tokens = [self.token_str(t) for t in ids]
        offsets = []
        for s in tokens:
            offsets.append(offset)
            offset += len(s)
        return {
            "tokens": tokens,
            "token_logprobs": list(logprobs) if logprobs else [None] * len(ids),
            "top_logprobs": [None if row is None else {self.token_str(t): lp for t, lp in row} for row in top]
            if top else None,
            "text_offset": offsets,
        }

    def completion_chunk(self, head, i: int, u: Update, job: Job) -> dict | None:
        c = job.choices[i]
        text = u.text
        if c.prefix and not c.echoed:
            text, c.echoed = c.prefix + text, True
        lp = None
        if c.params.logprobs is not None:
            lp = self.completion_logprobs(u.token_ids, u.logprobs, u.top_logprobs, 0)
        elif not text and u.finish_reason is None:
            return None  # text held back (a partial character or stop string): nothing to say yet
        return dict(head, choices=[{"index": i, "text": text, "logprobs": lp, "finish_reason": u.finish_reason}])

    # --- chat -----------------------------------------------------------------------------------
    async def chat(self, req: ChatRequest, http: Request):
        self.check_openai(req)
        if not req.messages:
            raise bad("messages must not be empty", "messages")
        if req.top_logprobs is not None and not req.logprobs:
            raise bad("top_logprobs needs logprobs: true", "top_logprobs")
        messages = [{"role": m.role if m.role != "developer" else "system",
                     "content": m.content if isinstance(m.content, str) or m.content is None
                     else "".join(p.text for p in m.content)} for m in req.messages]
        try:
            text = self.tokenizer.apply_chat_template(messages)
        except Exception as e:  # a template may raise anything (jinja2 errors, its own raise_exception)
            raise bad(f"messages: the chat template failed: {e}", "messages") from None
        ids = self.tokenizer.encode(text)
        max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        if max_tokens is None:
            max_tokens = max(0, self.max_seq_len - len(ids))
        kw = self.sampling_kwargs(req, max_tokens)
        if req.logprobs:
            kw["logprobs"] = req.top_logprobs or True
        choices = self.expand([ids], kw, req.n)
        job = self.start(choices)
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        head = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": self.model_name}
        if req.stream:
            return await self.stream(job, lambda i, u: self.chat_chunk(head, i, u, job),
                                     head, req.stream_options, req.n, first=self.chat_role_chunks(head, req.n))
        await job.run_to_end(http)
        body = dict(head, object="chat.completion", choices=[
            {"index": i, "message": {"role": "assistant", "content": c.text},
             "logprobs": self.chat_logprobs(c.token_ids, c.logprobs, c.top_logprobs) if req.logprobs else None,
             "finish_reason": c.finish_reason}
            for i, c in enumerate(choices)
        ], usage=self.usage(choices, req.n))
        return SafeJSONResponse(body)

    def chat_logprobs(self, ids, logprobs, top) -> dict:
        def entry(t, lp):
            s = self.token_str(t)
            return {"token": s, "logprob": lp, "bytes": list(s.encode("utf-8"))}

        content = []
        for k, t in enumerate(ids):
            e = entry(t, logprobs[k] if k < len(logprobs) else None)
            e["top_logprobs"] = [entry(a, b) for a, b in top[k]] if k < len(top) else []
            content.append(e)
        return {"content": content}

    def chat_role_chunks(self, head, n: int) -> list[dict]:
        return [dict(head, choices=[{"index": i, "delta": {"role": "assistant", "content": ""},
                                     "logprobs": None, "finish_reason": None}]) for i in range(n)]

    def chat_chunk(self, head, i: int, u: Update, job: Job) -> dict | None:
        c = job.choices[i]
        delta = {"content": u.text} if u.text or u.finish_reason is None else {}
        lp = self.chat_logprobs(u.token_ids, u.logprobs, u.top_logprobs) if c.params.logprobs else None
        if not u.text and lp is None and u.finish_reason is None:
            return None
        return dict(head, choices=[{"index": i, "delta": delta, "logprobs": lp, "finish_reason": u.finish_reason}])

    # --- SSE ------------------------------------------------------------------------------------
    async def stream(self, job: Job, chunk, head, options: StreamOptions | None, n: int,
                     first: list[dict] | None = None) -> Response:
        """SSE in OpenAI's chunk format. The first update is awaited before the response starts, so
        a request its owner rejects still gets a 4xx status rather than an error event."""
        include_usage = bool(options and options.include_usage)
        events = job.events()
        try:
            head_event = await events.__anext__()
        except BaseException:
            await events.aclose()
            raise
        if head_event[1].finish_reason == "error":
            await events.aclose()
            raise _owner_error(job.choices[head_event[0]])

        async def body():
            try:
                for obj in first or []:
                    yield _sse(_with_usage(obj, include_usage))
                pending = [head_event]
                while True:
                    for i, u in pending:
                        if u.finish_reason == "error":
                            err = _owner_error(job.choices[i])
                            yield _sse(_error_body(err.message, err.type, code=err.code))
                            yield "data: [DONE]\n\n"
                            return
                        obj = chunk(i, u)
                        if obj is not None:
                            yield _sse(_with_usage(obj, include_usage))
                    try:
                        pending = [await events.__anext__()]
                    except StopAsyncIteration:
                        break
                if include_usage:
                    yield _sse(dict(head, choices=[], usage=self.usage(job.choices, n)))
                yield "data: [DONE]\n\n"
            finally:
                await events.aclose()

        return StreamingResponse(body(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    # --- native ---------------------------------------------------------------------------------
    async def generate(self, req: GenerateRequest, http: Request):
        kw = dict(max_tokens=req.max_tokens, temperature=req.temperature, top_p=req.top_p, top_k=req.top_k,
                  min_p=req.min_p, seed=req.seed, stop_token_ids=req.stop_token_ids, ignore_eos=req.ignore_eos,
                  output_mode=req.output_mode)
        if req.top_logprobs:
            kw["logprobs"] = req.top_logprobs
        elif req.logprobs:
            kw["logprobs"] = True
        if req.profile is not None:
            kw.update(self.profile(req.profile))
        if req.forced_output_ids is not None:
            self.check_ids(req.forced_output_ids, "forced_output_ids")
        params = self.params(**kw)
        self.validate(req.input_ids, params, "input_ids", req.forced_output_ids)
        job = self.start([Choice(list(req.input_ids), params, req.forced_output_ids)])
        c = job.choices[0]
        if req.stream:
            def chunk(i, u: Update) -> dict:
                out = {"output_ids": u.token_ids, "logprobs": u.logprobs or None,
                       "top_logprobs": u.top_logprobs or None, "text": u.text, "finish_reason": u.finish_reason,
                       "logprobs_mode": params.logprobs_mode if params.mode is not OutputMode.TOKENS else None}
                if u.logits is not None:
                    out["logits"] = u.logits.tolist()
                if u.finish_reason is not None:
                    out["usage"] = self.usage(job.choices, 1)
                return out

            return await self.stream(job, chunk, {}, None, 1)
        await job.run_to_end(http)
        body = {"output_ids": c.token_ids, "logprobs": c.logprobs or None, "top_logprobs": c.top_logprobs or None,
                "finish_reason": c.finish_reason, "text": c.text, "usage": self.usage(job.choices, 1),
                "logprobs_mode": params.logprobs_mode if params.mode is not OutputMode.TOKENS else None}
        if c.logits:
            body["logits"] = c.logits
        return SafeJSONResponse(body)

    def profile(self, name: str) -> dict:
        from nmoe.serve.profiles import resolve_profile

        try:
            return resolve_profile(name)
        except (ValueError, KeyError) as e:
            raise bad(f"profile {name!r}: {e}", "profile") from None


def _with_usage(obj: dict, include_usage: bool) -> dict:
    return dict(obj, usage=None) if include_usage else obj


# ------------------------------------------------------------------------------------------------
# The app
# ------------------------------------------------------------------------------------------------


class ApiKeyMiddleware:
    """Requires `Authorization: Bearer KEY` on every route but /health (pure ASGI: streams untouched)."""

    def __init__(self, app, api_key: str):
        self.app = app
        self.expected = f"Bearer {api_key}".encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] == "/health":
            return await self.app(scope, receive, send)
        got = dict(scope["headers"]).get(b"authorization", b"")
        if hmac.compare_digest(got, self.expected):
            return await self.app(scope, receive, send)
        resp = JSONResponse(_error_body("invalid or missing API key (Authorization: Bearer KEY)",
                                        code="invalid_api_key"), status_code=401)
        await resp(scope, receive, send)


class JsonBodyMiddleware:
    """Reads every POST body as JSON whatever its Content-Type (curl -d sends form encoding), so a
    body is validated by its schema, never silently read as an empty form."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["method"] == "POST":
            headers = [(k, v) for k, v in scope["headers"] if k != b"content-type"]
            scope = dict(scope, headers=headers + [(b"content-type", b"application/json")])
        return await self.app(scope, receive, send)


def build_app(engine, cp: ControlPlane, model_name: str, api_key: str = "") -> FastAPI:
    """The FastAPI app of rank 0. `app.state.server.ready` turns True once the loop runs."""
    server = Server(engine, cp, model_name)
    app = FastAPI(title="nmoe", version="0.1.0", docs_url=None, redoc_url=None)
    app.state.server = server
    app.add_middleware(JsonBodyMiddleware)
    if api_key:
        app.add_middleware(ApiKeyMiddleware, api_key=api_key)

    @app.exception_handler(ApiError)
    async def _api_error(request, e: ApiError):
        return _error_response(e)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request, e: RequestValidationError):
        errs = e.errors()
        first = errs[0] if errs else {}
        loc = [str(x) for x in first.get("loc", ()) if x != "body"]
        where = ".".join(loc)
        msg = first.get("msg", "invalid request")
        if first.get("type") == "json_invalid":
            msg = f"the body is not valid JSON: {first.get('ctx', {}).get('error', msg)}"
        return _error_response(bad(f"{where}: {msg}" if where else msg, where or None))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, e: StarletteHTTPException):
        return JSONResponse(_error_body(str(e.detail), code=str(e.status_code)), status_code=e.status_code,
                            headers=getattr(e, "headers", None))

    @app.exception_handler(Exception)
    async def _internal_error(request, e: Exception):
        log.exception("internal error on %s", request.url.path)
        return JSONResponse(_error_body(f"internal error: {type(e).__name__}: {e}", "server_error"),
                            status_code=500)

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/ready")
    async def ready():
        if not server.ready:
            return JSONResponse({"status": "starting"}, status_code=503)
        return {"status": "ready", "world_size": cp.world_size}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": server.created,
                                            "owned_by": "nmoe", "max_model_len": server.max_seq_len}]}

    @app.get("/metrics")
    async def metrics():
        return Response(server.metrics.render(cp), media_type=CONTENT_TYPE_LATEST)

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, http: Request):
        return await server.completions(req, http)

    @app.post("/v1/chat/completions")
    async def chat(req: ChatRequest, http: Request):
        return await server.chat(req, http)

    @app.post("/generate")
    async def generate(req: GenerateRequest, http: Request):
        return await server.generate(req, http)

    return app


# ------------------------------------------------------------------------------------------------
# Launching a server process (tests, benchmarks, the torchrun modules)
# ------------------------------------------------------------------------------------------------


class ServerProcess:
    """`python -m nmoe.serve ARGS` (or under torchrun with `nproc` ranks) on a free loopback port.

    Use as a context manager; `url` is set once the server printed it. `stop()` sends SIGTERM (a
    drain) and returns the exit code; the whole process group is killed if it does not exit."""

    def __init__(self, args: list[str], nproc: int = 1, env: dict | None = None, start_timeout: float = 180.0):
        cmd = [sys.executable, "-m", "nmoe.serve", "--host", "127.0.0.1", "--port", "0", *args]
        if nproc > 1:
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
                   "--master_addr=127.0.0.1", f"--master_port={port}", "-m", "nmoe.serve",
                   "--host", "127.0.0.1", "--port", "0", *args]
        full_env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", **(env or {}))
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     env=full_env, start_new_session=True)
        self.lines: list[str] = []
        self.url: str | None = None
        started = threading.Event()

        def pump():
            for line in self.proc.stdout:
                self.lines.append(line)
                if self.url is None and "nmoe: serving" in line and " at http://" in line:
                    self.url = line.split(" at ")[1].split()[0]
                    started.set()
            started.set()

        threading.Thread(target=pump, daemon=True).start()
        if not started.wait(start_timeout) or self.url is None:
            self.kill()
            raise RuntimeError(f"server did not start within {start_timeout:.0f} s:\n{self.output[-4000:]}")

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def stop(self, timeout: float = 60.0) -> int:

        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            return -9

    def kill(self) -> None:

        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
        self.kill()
