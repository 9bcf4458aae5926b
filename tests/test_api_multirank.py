"""The server under torchrun with 2 and 8 CPU ranks (loopback only), and the seed's torchrun modules
for the control plane and the streaming API."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from nmoe.serve.api import ServerProcess
from nmoe.serve.tiny_prompts import FIXED_PROMPTS

NUM_PAGES, PAGE_SIZE = 16, 16  # a request may fit max_seq_len and still not fit one rank: the owner says so


def metrics(c: httpx.Client) -> dict[str, float]:
    return {m.group(1): float(m.group(2))
            for m in re.finditer(r"^(nmoe_\w+(?:\{[^}]*\})?) (\S+)$", c.get("/metrics").text, re.M)}


def wait_idle(c: httpx.Client, timeout: float = 60.0) -> dict[str, float]:
    deadline = time.monotonic() + timeout
    while True:
        m = metrics(c)
        if m["nmoe_requests_running"] == m["nmoe_requests_waiting"] == m["nmoe_requests_pending"] == 0:
            return m
        assert time.monotonic() < deadline, f"not idle after {timeout} s: {m}"
        time.sleep(0.05)


@pytest.mark.parametrize("nproc", [2, 8])
def test_serve_multirank(nproc):
    args = ["--model", "tiny", "--num-pages", str(NUM_PAGES), "--page-size", str(PAGE_SIZE), "--max-seq-len", "1024"]
    with ServerProcess(args, nproc=nproc, start_timeout=240) as srv, httpx.Client(base_url=srv.url, timeout=120) as c:
        def complete(i: int) -> str:
            prompt, want = FIXED_PROMPTS[i % len(FIXED_PROMPTS)]
            r = c.post("/v1/completions", json={"prompt": prompt, "max_tokens": 8, "temperature": 0.0})
            assert r.status_code == 200, r.text
            text = r.json()["choices"][0]["text"]
            assert text.startswith(want), (prompt, text)
            return text

        with ThreadPoolExecutor(nproc) as pool:  # concurrent: the owners spread over every rank
            texts = list(pool.map(complete, range(nproc)))
        body = {"prompt": FIXED_PROMPTS[0][0], "max_tokens": 8, "temperature": 0.0, "stream": True}
        with c.stream("POST", "/v1/completions", json=body) as s:
            pieces = [json.loads(line[6:])["choices"][0]["text"] for line in s.iter_lines()
                      if line.startswith("data: {")]
        assert "".join(pieces) == texts[0]
        m = metrics(c)
        assigned = [m[f'nmoe_rank_requests_assigned{{rank="{r}"}}'] for r in range(nproc)]
        assert all(a > 0 for a in assigned), assigned
        assert m["nmoe_kv_pages_total"] == nproc * NUM_PAGES

        # a client that leaves mid-stream: its owner cancels and frees the pages
        long = {"prompt": FIXED_PROMPTS[1][0], "max_tokens": 150, "ignore_eos": True, "stream": True}
        with httpx.Client(base_url=srv.url, timeout=60) as c2, c2.stream("POST", "/v1/completions", json=long) as s:
            for n, _ in enumerate(s.iter_lines()):
                if n >= 4:
                    break
        # and one that gives up on a non-streamed answer
        with pytest.raises(httpx.TimeoutException):
            httpx.post(srv.url + "/v1/completions", timeout=0.3,
                       json={"prompt": FIXED_PROMPTS[1][0], "max_tokens": 200, "ignore_eos": True})
        m = wait_idle(c)
        assert m['nmoe_requests_total{finish_reason="cancelled"}'] == 2, m
        assert m.get('nmoe_requests_total{finish_reason="length"}', 0) == 0, m
        assert m["nmoe_kv_pages_free"] + m["nmoe_kv_pages_cached"] == m["nmoe_kv_pages_total"], m

        # fits max_seq_len (checked on rank 0) but needs more pages than a rank has (only the owner knows)
        big = {"prompt": FIXED_PROMPTS[2][0], "max_tokens": NUM_PAGES * PAGE_SIZE + 8}
        for stream in (False, True):
            r = c.post("/v1/completions", json=dict(big, stream=stream))
            assert r.status_code == 400, r.text
            msg = r.json()["error"]["message"]
            assert re.match(r"rank \d: ", msg) and "num_pages" in msg, msg
        assert complete(3)  # the server still serves
        srv.stop()  # torchrun itself exits 1 on SIGTERM; the ranks must have drained and left together
        assert "nmoe: stopped" in srv.output and "terminate called" not in srv.output, srv.output[-3000:]


def _torchrun(module: str, nproc: int, timeout: float) -> subprocess.CompletedProcess:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--master_addr=127.0.0.1",
           f"--master_port={port}", "-m", module]
    env = dict(os.environ, OMP_NUM_THREADS="1", NMOE_TEST_TIMEOUT_S=str(timeout - 10))
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)


@pytest.mark.parametrize("module,nproc,ok", [
    ("nmoe.serve.test_control_plane_dp8", 4, "control plane ok at world size 4"),
    ("nmoe.serve.test_api_streaming", 2, "api streaming ok at world size 2"),
])
def test_torchrun_module(module, nproc, ok):
    r = _torchrun(module, nproc, timeout=240)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-4000:]
    assert ok in out, out[-4000:]
