"""The HTTP server end to end: `torchrun --nproc_per_node=2 -m nmoe.serve.test_api_streaming` (or plain
`python -m`, one rank).

Every rank runs the orchestrator with the control plane; rank 0 also runs uvicorn on a free loopback
port and, as a client, the official `openai` package: streamed and non-streamed completions and chat
agree, several concurrent streams complete with usage, requests are owned by ranks other than 0, and
no KV page is left behind. Exits non-zero on any failure; `NMOE_TEST_TIMEOUT_S` bounds the wall clock.
"""

from __future__ import annotations

import faulthandler
import re
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import torch

from nmoe.serve.config import ServeConfig
from nmoe.serve.control_plane import ControlPlane, run_with_driver
from nmoe.serve.dist import RankInfo, init_dist
from nmoe.serve.engine import Engine
from nmoe.serve.env import ENV
from nmoe.serve.orchestrator import Orchestrator
from nmoe.serve.tiny_prompts import FIXED_PROMPTS

CONCURRENT = 8


def check(cond: bool, msg: str) -> None:
    if not cond:
        raise AssertionError(msg)


def start_http(app) -> tuple[object, threading.Thread, str]:
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, name="uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        check(thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start")
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    return server, thread, f"http://127.0.0.1:{port}"


def client_checks(url: str, world: int) -> None:
    import httpx
    import openai

    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)
    for prompt, want in FIXED_PROMPTS[:3]:
        full = client.completions.create(model="tiny", prompt=prompt, max_tokens=10, temperature=0.0)
        text = full.choices[0].text
        check(text.startswith(want), f"{prompt!r} -> {text!r}, expected it to start with {want!r}")
        chunks = list(client.completions.create(model="tiny", prompt=prompt, max_tokens=10, temperature=0.0,
                                                stream=True, stream_options={"include_usage": True}))
        streamed = "".join(c.choices[0].text for c in chunks if c.choices)
        check(streamed == text, f"streamed {streamed!r} != non-streamed {text!r}")
        check(len(chunks) > 2, f"{len(chunks)} chunks: not streamed")
        check(chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == full.usage.completion_tokens,
              f"usage of the stream {chunks[-1].usage} != {full.usage}")

    msgs = [{"role": "user", "content": FIXED_PROMPTS[0][0]}]
    full = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=10, temperature=0.0)
    chunks = list(client.chat.completions.create(model="tiny", messages=msgs, max_tokens=10, temperature=0.0,
                                                 stream=True, stream_options={"include_usage": True}))
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    check(streamed == full.choices[0].message.content, f"chat streamed {streamed!r} != {full.choices[0]}")
    check(chunks[-1].usage.total_tokens == full.usage.total_tokens, "chat usage differs")

    def one(i: int) -> str:
        prompt, want = FIXED_PROMPTS[i % len(FIXED_PROMPTS)]
        stream = client.completions.create(model="tiny", prompt=prompt, max_tokens=8, temperature=0.0, stream=True,
                                           stream_options={"include_usage": True})
        text, usage = "", None
        for c in stream:
            text += c.choices[0].text if c.choices else ""
            usage = c.usage or usage
        check(text.startswith(want), f"concurrent stream {i}: {text!r} does not start with {want!r}")
        check(usage is not None and usage.completion_tokens > 0, f"concurrent stream {i}: no usage")
        return text

    with ThreadPoolExecutor(CONCURRENT) as pool:
        list(pool.map(one, range(CONCURRENT)))

    deadline = time.monotonic() + 30
    while True:
        m = _metrics(httpx.get(url + "/metrics").text)
        if m["nmoe_requests_running"] == m["nmoe_requests_waiting"] == m["nmoe_requests_pending"] == 0:
            break
        check(time.monotonic() < deadline, f"not idle: {m}")
        time.sleep(0.05)
    check(m["nmoe_kv_pages_free"] + m["nmoe_kv_pages_cached"] == m["nmoe_kv_pages_total"], f"pages leaked: {m}")
    assigned = [m[f'nmoe_rank_requests_assigned{{rank="{r}"}}'] for r in range(world)]
    check(world == 1 or all(a > 0 for a in assigned), f"every rank owns requests: assigned {assigned}")
    print(f"nmoe: api streaming ok at world size {world}: assigned per rank {assigned}", flush=True)


def _metrics(text: str) -> dict[str, float]:
    return {m.group(1): float(m.group(2)) for m in re.finditer(r"^(nmoe_\w+(?:\{[^}]*\})?) (\S+)$", text, re.M)}


def main() -> int:
    torch.set_num_threads(1)
    ctx = init_dist("cpu")
    timeout = ENV.test_timeout_s
    faulthandler.dump_traceback_later(timeout, exit=True)  # a hang dumps every stack and fails
    engine = Engine(ServeConfig(ckpt=ENV.model_path, max_seq_len=512), rank=RankInfo(ctx.rank, ctx.world_size))
    cp = ControlPlane(ctx.rank, ctx.world_size, ctx.cpu_group)
    orch = Orchestrator(engine, ctx, hooks=cp)
    app = None
    if ctx.rank == 0:
        from nmoe.serve.api import build_app

        app = build_app(engine, cp, "tiny")

    def drive():
        server, thread, url = start_http(app)
        app.state.server.ready = True
        try:
            client_checks(url, ctx.world_size)
        finally:
            server.should_exit = True
            thread.join(30)

    return run_with_driver(ctx, orch, cp, drive)


if __name__ == "__main__":
    sys.exit(main())
