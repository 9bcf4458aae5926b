"""The HTTP server on one rank: a real `python -m nmoe.serve` on a loopback port, driven by the
official `openai` client and httpx. One server for the module (startup dominates on CPU)."""

from __future__ import annotations

import asyncio
import json
import re
import time

import httpx
import pytest

openai = pytest.importorskip("openai")

from nmoe.serve.api import ServerProcess  # noqa: E402
from nmoe.serve.request import SamplingParams  # noqa: E402
from nmoe.serve.tiny_prompts import FIXED_PROMPTS  # noqa: E402

KEY = "test-key"
MAX_SEQ_LEN = 96
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def server():
    srv = ServerProcess(["--model", "tiny", "--api-key", KEY, "--max-seq-len", str(MAX_SEQ_LEN),
                         "--max-pending", "256"])
    yield srv
    rc = srv.stop()
    assert rc == 0, f"server exited {rc} on SIGTERM:\n{srv.output[-3000:]}"
    assert "nmoe: stopped" in srv.output


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, headers=AUTH, timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def offline():
    from nmoe.serve.llm import LLM

    return LLM("tiny", max_seq_len=MAX_SEQ_LEN)


def metrics(http) -> dict[str, float]:
    out = {}
    for line in http.get("/metrics").text.splitlines():
        m = re.match(r"^(nmoe_\w+(?:\{[^}]*\})?) (\S+)$", line)
        if m:
            out[m.group(1)] = float(m.group(2))
    return out


def wait_idle(http, timeout: float = 30.0) -> dict[str, float]:
    """Wait until nothing runs anywhere; then every page is free or held by the prefix cache only."""
    deadline = time.monotonic() + timeout
    while True:
        m = metrics(http)
        if m["nmoe_requests_running"] == 0 and m["nmoe_requests_waiting"] == 0 and m["nmoe_requests_pending"] == 0:
            return m
        assert time.monotonic() < deadline, f"server not idle after {timeout} s: {m}"
        time.sleep(0.05)


def assert_no_leak(m: dict[str, float]) -> None:
    assert m["nmoe_kv_pages_total"] > 0
    assert m["nmoe_kv_pages_free"] + m["nmoe_kv_pages_cached"] == m["nmoe_kv_pages_total"], m


# ------------------------------------------------------------------------------------------------


def test_routes_and_api_key(server, http):
    with httpx.Client(base_url=server.url, timeout=10) as anon:
        assert anon.get("/health").status_code == 200
        for path in ("/ready", "/v1/models", "/metrics", "/openapi.json"):
            r = anon.get(path)
            assert r.status_code == 401, path
            assert r.json()["error"]["code"] == "invalid_api_key"
        r = anon.post("/v1/completions", json={"prompt": "x"}, headers={"Authorization": "Bearer wrong"})
        assert r.status_code == 401
    assert http.get("/ready").json()["status"] == "ready"
    models = http.get("/v1/models").json()
    assert models["data"][0]["id"] == "tiny"
    assert "nmoe_kv_pages_total" in http.get("/metrics").text


def test_stream_nonstream_offline_equal(client, offline):
    prompts = [p for p, _ in FIXED_PROMPTS[:3]]
    cases = [dict(temperature=0.0), dict(temperature=0.8, seed=1234)]
    for kw in cases:
        want = offline.generate(prompts, SamplingParams(max_tokens=12, **kw))
        for prompt, w in zip(prompts, want):
            extra = {"seed": kw["seed"]} if "seed" in kw else {}
            r = client.completions.create(model="tiny", prompt=prompt, max_tokens=12,
                                          temperature=kw["temperature"], **extra)
            assert r.choices[0].text == w.text, (prompt, kw)
            assert r.choices[0].finish_reason == w.finish_reason
            assert r.usage.completion_tokens == len(w.token_ids)
            assert r.usage.prompt_tokens == len(w.prompt_token_ids)
            chunks = list(client.completions.create(model="tiny", prompt=prompt, max_tokens=12, stream=True,
                                                    temperature=kw["temperature"],
                                                    stream_options={"include_usage": True}, **extra))
            assert "".join(c.choices[0].text for c in chunks if c.choices) == w.text
            assert chunks[-1].usage.completion_tokens == len(w.token_ids)
            assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == w.finish_reason
    # chat: the template from the tokenizer config, streamed and not
    msgs = [{"role": "user", "content": FIXED_PROMPTS[0][0]}]
    ids = offline.tokenizer.encode(offline.tokenizer.apply_chat_template(msgs))
    want = offline.generate([ids], SamplingParams(max_tokens=10, temperature=0.0))[0]
    r = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=10, temperature=0.0)
    assert r.choices[0].message.content == want.text
    assert r.choices[0].message.role == "assistant"
    chunks = list(client.chat.completions.create(model="tiny", messages=msgs, max_tokens=10, temperature=0.0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want.text
    assert chunks[-1].usage.total_tokens == len(ids) + len(want.token_ids)


def test_stop_string_across_chunks(client, offline):
    prompt = FIXED_PROMPTS[0][0]
    full = offline.generate([prompt], SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True))[0]
    pieces = [offline.tokenizer.decode([t]) for t in full.token_ids]
    # a stop string made of the end of one token and the start of a later one
    k = next(i for i in range(2, len(pieces) - 1) if len(pieces[i]) > 1 and pieces[i + 1])
    stop = pieces[k][-2:] + pieces[k + 1][:1]
    expected = full.text[: full.text.find(stop)]
    assert expected, stop
    chunks = list(client.completions.create(model="tiny", prompt=prompt, max_tokens=24, temperature=0.0,
                                            extra_body={"ignore_eos": True}, stop=[stop], stream=True))
    texts = [c.choices[0].text for c in chunks]
    assert "".join(texts) == expected
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert all(stop not in t for t in texts)
    r = client.completions.create(model="tiny", prompt=prompt, max_tokens=24, temperature=0.0,
                                  extra_body={"ignore_eos": True}, stop=stop)
    assert r.choices[0].text == expected


def test_generate_native(http, offline):
    ids = offline.tokenizer.encode(FIXED_PROMPTS[1][0])
    want = offline.generate([ids], SamplingParams(max_tokens=6, temperature=0.0, logprobs=3))[0]
    r = http.post("/generate", json={"input_ids": ids, "max_tokens": 6, "temperature": 0.0,
                                     "logprobs": True, "top_logprobs": 3})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["output_ids"] == want.token_ids
    assert body["text"] == want.text
    assert len(body["logprobs"]) == len(body["output_ids"])
    assert [len(row) for row in body["top_logprobs"]] == [3] * len(want.token_ids)
    assert body["logprobs"] == pytest.approx(want.logprobs, abs=1e-5)
    assert body["usage"]["completion_tokens"] == len(want.token_ids)
    with http.stream("POST", "/generate", json={"input_ids": ids, "max_tokens": 6, "temperature": 0.0,
                                                "stream": True}) as s:
        events = [json.loads(line[6:]) for line in s.iter_lines() if line.startswith("data: {")]
    assert sum((e["output_ids"] for e in events), []) == want.token_ids
    assert events[-1]["finish_reason"] == want.finish_reason and "usage" in events[-1]
    logits = http.post("/generate", json={"input_ids": ids, "max_tokens": 2, "output_mode": "logits"}).json()
    assert len(logits["logits"]) == 2 and len(logits["logits"][0]) == offline.engine.model_cfg.vocab_size
    # teacher forcing scores given tokens: forcing the greedy output gives back its logprobs
    forced = http.post("/generate", json={"input_ids": ids, "forced_output_ids": want.token_ids,
                                          "logprobs": True}).json()
    assert forced["output_ids"] == want.token_ids
    assert forced["logprobs"] == pytest.approx(want.logprobs, abs=1e-4)
    r = http.post("/generate", json={"input_ids": ids, "max_tokens": 3, "profile": "rl_sample", "seed": 5})
    assert r.status_code == 200 and len(r.json()["logprobs"]) == len(r.json()["output_ids"]), r.text
    assert http.post("/generate", json={"input_ids": ids, "profile": "rl_sample"}).status_code == 400  # no seed
    r = http.post("/generate", json={"input_ids": ids, "profile": "no_such_profile"})
    assert r.status_code == 400 and "no_such_profile" in r.json()["error"]["message"]


BAD = [
    ("/v1/completions", b"{not json", 400),
    ("/v1/completions", {"prompt": 5}, 400),
    ("/v1/completions", {"prompt": "x", "max_tokens": "5"}, 400),
    ("/v1/completions", {"prompt": "x", "max_tokens": -1}, 400),
    ("/v1/completions", {"prompt": "x", "max_tokens": 10**12}, 400),
    ("/v1/completions", {"prompt": "x", "max_tokens": MAX_SEQ_LEN}, 400),  # prompt + max_tokens > max_seq_len
    ("/v1/completions", {"prompt": [1, 2, 10**6]}, 400),
    ("/v1/completions", {"prompt": [-1]}, 400),
    ("/v1/completions", {"prompt": ""}, 400),
    ("/v1/completions", {"prompt": []}, 400),
    ("/v1/completions", {"prompt": [[]]}, 400),
    ("/v1/completions", {"prompt": "x", "model": "gpt-4"}, 404),
    ("/v1/completions", {"prompt": "x", "top_p": 0}, 400),
    ("/v1/completions", {"prompt": "x", "top_p": 1.5}, 400),
    ("/v1/completions", {"prompt": "x", "n": 1000}, 400),
    ("/v1/completions", {"prompt": "x", "n": 0}, 400),
    ("/v1/completions", {"prompt": "x", "temperature": -1}, 400),
    ("/v1/completions", {"prompt": "x", "top_k": 10**12}, 400),
    ("/v1/completions", {"prompt": "x", "seed": 2**70}, 400),
    ("/v1/completions", {"prompt": "x", "logprobs": 99}, 400),
    ("/v1/completions", {"prompt": "x", "stop": [""]}, 400),
    ("/v1/completions", {"prompt": "x", "max_token": 5}, 400),  # unknown (misspelt) field
    ("/v1/completions", {"prompt": "x", "frequency_penalty": 1.0}, 400),
    ("/v1/completions", {"prompt": "x", "stream_options": {"include_usage": True}}, 400),
    ("/v1/chat/completions", {"messages": []}, 400),
    ("/v1/chat/completions", {"messages": [{"role": "robot", "content": "hi"}]}, 400),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2}, 400),
    ("/v1/chat/completions", {"messages": "hi"}, 400),
    ("/generate", {"input_ids": []}, 400),
    ("/generate", {"input_ids": [1, 512]}, 400),
    ("/generate", {"input_ids": [1], "output_mode": "bogus"}, 400),
    ("/generate", {"input_ids": [1], "stop_token_ids": [99999]}, 400),
    ("/nope", {}, 404),
]


@pytest.mark.parametrize("path,body,status", BAD, ids=[f"{p}:{i}" for i, (p, _, _) in enumerate(BAD)])
def test_bad_input(http, path, body, status):
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = http.post(path, content=content, headers={"Content-Type": "application/json"})
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["message"] and err["type"]


def test_still_serves_after_bad_input(client):
    r = client.completions.create(model="tiny", prompt=FIXED_PROMPTS[0][0], max_tokens=4, temperature=0.0)
    assert r.choices[0].text.startswith(FIXED_PROMPTS[0][1])


def test_disconnect_frees_pages(server, http):
    before = metrics(http).get('nmoe_requests_total{finish_reason="cancelled"}', 0.0)
    body = {"prompt": FIXED_PROMPTS[2][0], "max_tokens": 80, "ignore_eos": True, "stream": True}
    with httpx.Client(base_url=server.url, headers=AUTH, timeout=30) as c, c.stream("POST", "/v1/completions",
                                                                                      json=body) as s:
        got = 0
        for line in s.iter_lines():
            got += line.startswith("data: {")
            if got == 3:
                break  # leave mid-stream: closing the connection must cancel the request
    m = wait_idle(http)
    assert m['nmoe_requests_total{finish_reason="cancelled"}'] == before + 1
    assert_no_leak(m)


def test_64_concurrent_streams(server, http):
    async def one(c: openai.AsyncOpenAI, i: int) -> tuple[str, int]:
        prompt = FIXED_PROMPTS[i % len(FIXED_PROMPTS)][0]
        stream = await c.completions.create(model="tiny", prompt=prompt, max_tokens=8, temperature=0.0,
                                            stream=True, stream_options={"include_usage": True})
        text, usage = "", None
        async for chunk in stream:
            if chunk.choices:
                text += chunk.choices[0].text
            if chunk.usage:
                usage = chunk.usage.completion_tokens
        return text, usage

    async def run():
        async with openai.AsyncOpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=120,
                                      http_client=httpx.AsyncClient(limits=httpx.Limits(max_connections=100),
                                                                    timeout=120)) as c:
            return await asyncio.gather(*(one(c, i) for i in range(64)))

    results = asyncio.run(run())
    for i, (text, usage) in enumerate(results):
        assert text.startswith(FIXED_PROMPTS[i % len(FIXED_PROMPTS)][1]), (i, text)
        assert usage is not None and usage > 0
    assert_no_leak(wait_idle(http))


def test_n_and_echo(client):
    prompt = FIXED_PROMPTS[3][0]
    r = client.completions.create(model="tiny", prompt=[prompt, prompt], n=2, max_tokens=4, temperature=0.0,
                                  echo=True)
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    assert all(c.text.startswith(prompt) for c in r.choices)
    r = client.completions.create(model="tiny", prompt=prompt, max_tokens=3, temperature=0.0, logprobs=2)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == r.usage.completion_tokens
    r = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": prompt}], max_tokens=3,
                                       temperature=0.0, logprobs=True, top_logprobs=2)
    assert len(r.choices[0].logprobs.content) == r.usage.completion_tokens
    assert len(r.choices[0].logprobs.content[0].top_logprobs) == 2


def test_prompt_logprobs_by_echo(client, http, offline):
    """OpenAI's convention: echo + logprobs + max_tokens 0 scores the prompt (teacher forcing)."""
    prompt = FIXED_PROMPTS[0][0] + " Paris."
    ids = offline.tokenizer.encode(prompt)
    want = offline.score(ids[:1], ids[1:])
    r = client.completions.create(model="tiny", prompt=prompt, max_tokens=0, echo=True, logprobs=2)
    lp = r.choices[0].logprobs
    assert r.choices[0].text == prompt
    assert lp.token_logprobs[0] is None and lp.token_logprobs[1:] == pytest.approx(want.logprobs, abs=1e-4)
    assert len(lp.tokens) == len(ids) and all(len(row) == 2 for row in lp.top_logprobs[1:])
    assert r.usage.prompt_tokens == len(ids) and r.usage.completion_tokens == 0
    bad = http.post("/v1/completions", json={"prompt": prompt, "max_tokens": 3, "echo": True, "logprobs": 1})
    assert bad.status_code == 400 and "max_tokens 0" in bad.json()["error"]["message"]
    # processed scoring of a token that top-k excludes: -inf, sent as -9999 (JSON has no infinity)
    out = http.post("/generate", json={"input_ids": ids[:3], "forced_output_ids": [ids[3], 7], "logprobs": True,
                                       "top_k": 1, "profile": "rl_sample", "seed": 1})
    assert out.status_code == 200, out.text
    body = out.json()
    assert body["logprobs_mode"] == "processed" and body["logprobs"][-1] == -9999.0


def test_queue_full_answers_429(offline):
    """A bounded queue (here 1 pending request, with no loop draining it) answers 429 + Retry-After."""
    from nmoe.serve.api import build_app
    from nmoe.serve.control_plane import ControlPlane

    cp = ControlPlane(max_pending=1)
    app = build_app(offline.engine, cp, "tiny")
    app.state.server.ready = True
    cp.submit([1, 2, 3], SamplingParams(max_tokens=1), sink=lambda u: None)

    async def go():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
            return await c.post("/v1/completions", json={"prompt": "x", "max_tokens": 1})

    r = asyncio.run(go())
    assert r.status_code == 429 and r.headers["retry-after"] == "1"
    assert r.json()["error"]["type"] == "rate_limit_error"


def test_schemathesis_no_500(server, http):
    schemathesis = pytest.importorskip("schemathesis")
    from hypothesis import HealthCheck, given, settings

    schema = schemathesis.openapi.from_dict(http.get("/openapi.json").json())
    failures, statuses = [], []
    for result in schema.get_all_operations():
        op = result.ok()
        modes = [schemathesis.GenerationMode.POSITIVE]
        if op.method.upper() == "POST":  # a GET without parameters has no negative cases
            modes.append(schemathesis.GenerationMode.NEGATIVE)
        for mode in modes:
            @settings(max_examples=12, deadline=None, database=None, derandomize=True,
                      suppress_health_check=list(HealthCheck))
            @given(case=op.as_strategy(generation_mode=mode))
            def check(case):
                resp = case.call(base_url=server.url, headers=AUTH, timeout=60)
                statuses.append(resp.status_code)
                if resp.status_code >= 500:
                    failures.append((case.operation.label, resp.status_code, case.as_curl_command(), resp.text[:300]))

            check()
    assert not failures, failures[:5]
    assert 200 in statuses and 400 in statuses, sorted(set(statuses))
    assert_no_leak(wait_idle(http))


def test_repeated_signals_still_drain_and_stop():
    """SIGTERM after SIGTERM (a supervisor and `timeout` both signalling, an impatient operator):
    the server still drains and exits 0. The handler takes no lock - a second signal landing inside
    the first one's `Event.set` used to deadlock the main thread on its own lock."""
    import signal

    srv = ServerProcess(["--model", "tiny", "--max-seq-len", str(MAX_SEQ_LEN)])
    try:
        assert httpx.get(srv.url + "/ready", timeout=30).status_code == 200
        for _ in range(300):
            if srv.proc.poll() is not None:
                break
            srv.proc.send_signal(signal.SIGTERM)
        rc = srv.proc.wait(60)
    finally:
        if srv.proc.poll() is None:
            srv.kill()
    assert rc == 0, f"server exited {rc}:\n{srv.output[-3000:]}"
    assert "nmoe: stopped" in srv.output


def test_shutdown_from_a_signal_takes_no_lock():
    """The SIGTERM handler calls into the control plane on the main thread, between two of that
    thread's bytecodes, possibly while it holds the control plane's lock (a `submit`) or its wake
    event's (an `Event.set`, the handler's own on a second signal): `shutdown_signalled` completes
    there, and new requests are refused after it (`request_shutdown` would wait for itself)."""
    import threading

    from nmoe.serve.control_plane import ControlPlane

    cp = ControlPlane()
    done = threading.Event()

    def interrupted():
        with cp._lock, cp._wake._cond:  # what an interrupted submit or Event.set holds
            cp.shutdown_signalled()
        done.set()

    threading.Thread(target=interrupted, daemon=True).start()
    assert done.wait(5), "shutdown_signalled waited on a lock its own thread holds"
    with pytest.raises(RuntimeError, match="shutting down"):
        cp.submit([1, 2], SamplingParams(max_tokens=1), lambda update: None)
