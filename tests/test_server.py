"""`fastcodegen serve`: the HTTP server, over real HTTP on 127.0.0.1, with the official `openai` client and httpx.

The server runs in-process (uvicorn in a thread) over codegen-tiny-py on the
CPU. What it answers is checked against the same engine called directly
(`Engine.generate`: texts, logprobs, best_of's ranking), against the
`tokenizers` library reading the model's tokenizer.json (token counts and
token texts), and against stops and CodeGen's patterns applied here by hand.
Every bad input gets its status and OpenAI's error object, and leaves the
server answering and the engine with nothing running; clients that go away
leave every KV block free; stopping the server ends a stream cleanly.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client as http_client
import json
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import defaultdict
from dataclasses import dataclass

import httpx
import openai
import pytest
import tokenizers
from prometheus_client.parser import text_string_to_metric_families

from fastcodegen import Engine, SamplingParams
from fastcodegen.registry import bundled_path
from fastcodegen.server import create_app, listen, make_server

MODEL = "tiny-py"
KEY = "test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
TINY = bundled_path("codegen-tiny-py")
PROMPTS = [
    "def fibonacci(n):\n",
    "import os\n\n\ndef list_python_files(root):\n",
    "class Stack:\n    def __init__(self):\n        self.items = []\n\n    def push(self, item):\n",
]
# CodeGen's own `truncate_before_pattern` (its sampling script), written out here.
CODEGEN_REFERENCE_PATTERNS = [r"^#", re.escape("<|endoftext|>"), r"^'''", r'^"""', r"\n\n\n"]
ERROR_FIELDS = {"message", "type", "param", "code"}


@dataclass
class Running:
    url: str
    app: object
    server: object
    thread: threading.Thread

    def stop(self, timeout: float = 30) -> None:
        self.server.should_exit = True
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "the server did not stop"


@contextlib.contextmanager
def running_server(engine: Engine, **kwargs):
    """The app of `create_app(engine, ...)` served by uvicorn on a free port of 127.0.0.1, in a thread."""
    app = create_app(engine, model_name=MODEL, **kwargs)
    server = make_server(app, log_level="warning", access_log=False)
    sock = listen("127.0.0.1", 0)
    running = Running(f"http://127.0.0.1:{sock.getsockname()[1]}", app, server, None)
    running.thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    running.thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert running.thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.02)
    try:
        yield running
    finally:
        running.stop()


@pytest.fixture(scope="module")
def engine():
    with Engine("codegen-tiny-py", device="cpu", progress=False, kv_cache_tokens=8192, max_num_seqs=128) as e:
        yield e


@pytest.fixture(scope="module")
def server(engine):
    with running_server(engine, api_key=KEY) as s:
        yield s


@pytest.fixture(scope="module")
def small_engine():
    """One sequence at a time: a second request waits."""
    with Engine("codegen-tiny-py", device="cpu", progress=False, kv_cache_tokens=2048, max_num_seqs=1) as e:
        yield e


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, headers=AUTH, timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def ref_tok():
    """The model's tokenizer read by the `tokenizers` library itself."""
    return tokenizers.Tokenizer.from_file(str(TINY / "tokenizer.json"))


def generate(engine: Engine, prompt, **params):
    """The engine's own completions of one prompt (the reference), called directly."""
    return engine.generate(prompt, SamplingParams(**params))[0]


def metrics(http_client) -> dict[str, float]:
    """/metrics' unlabelled samples by name."""
    r = http_client.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    return parse_metrics(r.text)


def parse_metrics(text: str) -> dict[str, float]:
    return {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples if not s.labels}


def wait_quiet(engine: Engine, http_client, timeout: float = 15) -> dict[str, float]:
    """Waits until nothing runs and every KV block is free (as /metrics reports it); returns the metrics."""
    deadline = time.monotonic() + timeout
    while True:
        m = metrics(http_client)
        quiet = m["fastcodegen_num_sequences_running"] == 0 and m["fastcodegen_num_requests_waiting"] == 0
        if quiet and m["fastcodegen_kv_cache_free_blocks"] == m["fastcodegen_kv_cache_blocks"]:
            assert not engine.has_unfinished_requests()
            assert m["fastcodegen_kv_cache_usage"] == 0
            return m
        assert time.monotonic() < deadline, f"requests still running or KV blocks held: {m}"
        time.sleep(0.05)


def sse_events(lines) -> list:
    """The `data:` payloads of a server-sent event stream, JSON-decoded, `[DONE]` kept as the string."""
    out = []
    for line in lines:
        if line.startswith("data: "):
            data = line[len("data: ") :]
            out.append(data if data == "[DONE]" else json.loads(data))
        else:
            assert line == "", line
    return out


def assert_error(r: httpx.Response, status: int, param=None) -> dict:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == ERROR_FIELDS, body
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    assert body["error"]["param"] == param, body
    return body["error"]


def first_match(text: str):
    starts = [m.start() for p in CODEGEN_REFERENCE_PATTERNS if (m := re.compile(p, re.MULTILINE).search(text))]
    return min(starts) if starts else None


# ----------------------------------------------------------------------------- completions


def test_greedy_completions_are_the_engines(engine, client, ref_tok):
    ref = engine.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=24))
    got = client.completions.create(model=MODEL, prompt=PROMPTS, temperature=0, max_tokens=24)
    assert got.object == "text_completion" and got.model == MODEL and got.id.startswith("cmpl-")
    assert [c.index for c in got.choices] == [0, 1, 2]
    assert [c.text for c in got.choices] == [r.outputs[0].text for r in ref]
    assert [c.finish_reason for c in got.choices] == [r.outputs[0].finish_reason for r in ref]
    assert got.usage.prompt_tokens == sum(len(ref_tok.encode(p).ids) for p in PROMPTS)
    assert got.usage.completion_tokens == sum(len(r.outputs[0].token_ids) for r in ref)
    assert got.usage.total_tokens == got.usage.prompt_tokens + got.usage.completion_tokens

    ids = [ref_tok.encode(p).ids for p in PROMPTS]
    as_ids = client.completions.create(model=MODEL, prompt=ids, temperature=0, max_tokens=24)
    assert [c.text for c in as_ids.choices] == [c.text for c in got.choices]
    one = client.completions.create(model=MODEL, prompt=ids[1], temperature=0, max_tokens=24)
    assert [c.text for c in one.choices] == [got.choices[1].text]

    # OpenAI's default: 16 tokens
    default = client.completions.create(model=MODEL, prompt=PROMPTS[0], extra_body={"ignore_eos": True})
    assert default.usage.completion_tokens == 16 and default.choices[0].finish_reason == "length"


def test_streamed_chunks_add_up_to_the_whole_completion(client, fresh_seed):
    kwargs = dict(
        model=MODEL, prompt=PROMPTS[:2], n=2, temperature=0.8, top_p=0.95, max_tokens=20, seed=fresh_seed, logprobs=1
    )
    whole = client.completions.create(**kwargs)
    texts, finishes, tokens, token_logprobs = defaultdict(str), defaultdict(list), defaultdict(list), defaultdict(list)
    usage = None
    for chunk in client.completions.create(**kwargs, stream=True, stream_options={"include_usage": True}):
        if not chunk.choices:
            usage = chunk.usage
            continue
        assert len(chunk.choices) == 1 and chunk.usage is None
        c = chunk.choices[0]
        texts[c.index] += c.text
        finishes[c.index].append(c.finish_reason)
        tokens[c.index] += c.logprobs.tokens
        token_logprobs[c.index] += c.logprobs.token_logprobs
    assert sorted(texts) == [0, 1, 2, 3] == [c.index for c in whole.choices]
    for c in whole.choices:
        assert texts[c.index] == c.text
        assert finishes[c.index][-1] == c.finish_reason and not any(finishes[c.index][:-1])
        assert tokens[c.index] == c.logprobs.tokens
        assert token_logprobs[c.index] == pytest.approx(c.logprobs.token_logprobs, abs=1e-4)
    assert usage.model_dump() == whole.usage.model_dump()


def test_seed_reproduces_samples(client, fresh_seed):
    def texts(seed):
        got = client.completions.create(model=MODEL, prompt=PROMPTS[0], n=3, temperature=1.0, max_tokens=16, seed=seed)
        return [c.text for c in got.choices]

    first = texts(fresh_seed)
    assert texts(fresh_seed) == first
    assert texts(fresh_seed + 1) != first


def test_best_of_returns_the_most_likely_samples(engine, client, fresh_seed):
    got = client.completions.create(
        model=MODEL, prompt=PROMPTS[1], n=2, best_of=5, temperature=1.0, max_tokens=12, seed=fresh_seed
    )
    samples = generate(engine, PROMPTS[1], n=5, temperature=1.0, max_tokens=12, seed=fresh_seed, logprobs=0).outputs
    total = {c.index: sum(lp[t] for lp, t in zip(c.logprobs, c.token_ids)) for c in samples}  # by hand
    best = sorted(samples, key=lambda c: -total[c.index])[:2]
    assert [c.index for c in got.choices] == [0, 1]
    assert [c.text for c in got.choices] == [c.text for c in best]
    assert all(c.logprobs is None for c in got.choices)
    assert got.usage.completion_tokens == sum(len(c.token_ids) for c in samples)  # every sample was generated


def test_logprobs_are_the_engines(engine, client, ref_tok):
    got = client.completions.create(model=MODEL, prompt=PROMPTS[2], temperature=0, max_tokens=16, logprobs=3)
    ref = generate(engine, PROMPTS[2], temperature=0, max_tokens=16, logprobs=3).outputs[0]
    choice = got.choices[0]
    lp = choice.logprobs
    texts = [ref_tok.decode([t], skip_special_tokens=False) for t in ref.token_ids]
    assert lp.tokens == texts
    assert lp.token_logprobs == pytest.approx([d[t] for d, t in zip(ref.logprobs, ref.token_ids)], abs=1e-4)
    for top, d in zip(lp.top_logprobs, ref.logprobs):
        assert top == pytest.approx({ref_tok.decode([t], skip_special_tokens=False): v for t, v in d.items()}, abs=1e-4)
        assert len(top) == 3
    assert lp.token_logprobs == pytest.approx([max(top.values()) for top in lp.top_logprobs])  # greedy
    assert lp.text_offset == [len("".join(texts[:k])) for k in range(len(texts))]
    assert choice.text == "".join(texts)


def test_echo_prepends_the_prompt(client, http, ref_tok):
    plain = client.completions.create(model=MODEL, prompt=PROMPTS[0], temperature=0, max_tokens=8)
    echo = client.completions.create(model=MODEL, prompt=PROMPTS[0], temperature=0, max_tokens=8, echo=True)
    assert echo.choices[0].text == PROMPTS[0] + plain.choices[0].text
    assert echo.usage.model_dump() == plain.usage.model_dump()
    ids = ref_tok.encode(PROMPTS[0]).ids
    as_ids = client.completions.create(model=MODEL, prompt=ids, temperature=0, max_tokens=8, echo=True)
    assert as_ids.choices[0].text == ref_tok.decode(ids) + plain.choices[0].text
    streamed = client.completions.create(
        model=MODEL, prompt=PROMPTS[0], temperature=0, max_tokens=8, echo=True, stream=True
    )
    assert "".join(chunk.choices[0].text for chunk in streamed) == echo.choices[0].text


def _joined_logprobs(chunks) -> dict:
    out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for chunk in chunks:
        for k in out:
            out[k] += getattr(chunk.choices[0].logprobs, k)
    return out


def assert_same_logprobs(got: dict, want: dict) -> None:
    """Legacy logprobs equal up to float rounding (a prompt scored in other batches), None where None."""
    assert (got["tokens"], got["text_offset"]) == (want["tokens"], want["text_offset"])
    for g, w in zip(got["token_logprobs"], want["token_logprobs"], strict=True):
        assert g == w if w is None else g == pytest.approx(w, abs=1e-4)
    for g, w in zip(got["top_logprobs"], want["top_logprobs"], strict=True):
        assert g == w if w is None else g == pytest.approx(w, abs=1e-4)


def test_echo_with_logprobs_scores_the_prompt(engine, client, ref_tok):
    prompt = PROMPTS[2]
    got = client.completions.create(model=MODEL, prompt=prompt, temperature=0, max_tokens=8, echo=True, logprobs=2)
    ref = generate(engine, prompt, temperature=0, max_tokens=8, logprobs=2, prompt_logprobs=2)
    ids = ref_tok.encode(prompt).ids
    assert ref.prompt_token_ids == ids
    choice, lp = got.choices[0], got.choices[0].logprobs
    texts = [ref_tok.decode([t], skip_special_tokens=False) for t in ids + ref.outputs[0].token_ids]
    assert lp.tokens == texts
    assert choice.text == "".join(texts) == prompt + ref.outputs[0].text
    assert lp.text_offset == [len("".join(texts[:k])) for k in range(len(texts))]
    # The prompt's first token has nothing before it; every other token is scored given the ones before.
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    scored = ref.prompt_logprobs[1:] + ref.outputs[0].logprobs
    want = [d[t] for d, t in zip(scored, ids[1:] + ref.outputs[0].token_ids)]
    assert lp.token_logprobs[1:] == pytest.approx(want, abs=1e-4)
    for top, d in zip(lp.top_logprobs[1:], scored, strict=True):
        assert top == pytest.approx({ref_tok.decode([t], skip_special_tokens=False): v for t, v in d.items()}, abs=1e-4)
    streamed = list(
        client.completions.create(
            model=MODEL, prompt=prompt, temperature=0, max_tokens=8, echo=True, logprobs=2, stream=True
        )
    )
    assert "".join(chunk.choices[0].text for chunk in streamed) == choice.text
    assert streamed[0].choices[0].text == prompt  # the echo chunk, with the prompt's logprobs
    assert_same_logprobs(_joined_logprobs(streamed), lp.model_dump())


def test_max_tokens_zero_with_echo_scores_the_prompt_alone(engine, client, http, ref_tok):
    prompts = [PROMPTS[0], PROMPTS[1]]
    got = client.completions.create(model=MODEL, prompt=prompts, max_tokens=0, echo=True, logprobs=0, n=2)
    assert len(got.choices) == 4
    for choice in got.choices:
        prompt = prompts[choice.index // 2]
        ids = ref_tok.encode(prompt).ids
        ref = generate(engine, prompt, max_tokens=1, prompt_logprobs=0)
        assert (choice.text, choice.finish_reason) == (prompt, "length")
        assert choice.logprobs.tokens == [ref_tok.decode([t]) for t in ids]
        want = [d[t] for d, t in zip(ref.prompt_logprobs[1:], ids[1:], strict=True)]
        assert choice.logprobs.token_logprobs[1:] == pytest.approx(want, abs=1e-4)
    assert got.usage.completion_tokens == 0
    assert got.usage.prompt_tokens == sum(len(ref_tok.encode(p).ids) for p in prompts)
    streamed = list(
        client.completions.create(model=MODEL, prompt=prompts[0], max_tokens=0, echo=True, logprobs=0, stream=True)
    )
    assert "".join(c.choices[0].text for c in streamed) == prompts[0]
    assert streamed[-1].choices[0].finish_reason == "length"
    assert_same_logprobs(_joined_logprobs(streamed), got.choices[0].logprobs.model_dump())
    plain = client.completions.create(model=MODEL, prompt=prompts[0], max_tokens=0, echo=True)
    assert (plain.choices[0].text, plain.choices[0].logprobs) == (prompts[0], None)
    r = http.post("/v1/completions", json={"prompt": prompts[0], "max_tokens": 0, "logprobs": 1})
    assert "echo" in assert_error(r, 400, "max_tokens")["message"]


def test_stop_strings_and_patterns_cut_the_text(engine, client):
    full = generate(engine, PROMPTS[2], temperature=0, max_tokens=40).outputs[0].text
    middle = len(full) // 2
    stop = full[middle : middle + 3]
    expected = full[: full.index(stop)]
    common = dict(model=MODEL, prompt=PROMPTS[2], temperature=0, max_tokens=40)
    got = client.completions.create(**common, stop=[stop, "never in the text"])
    assert (got.choices[0].text, got.choices[0].finish_reason) == (expected, "stop")
    got = client.completions.create(**common, stop=stop)
    assert (got.choices[0].text, got.choices[0].finish_reason) == (expected, "stop")
    got = client.completions.create(**common, extra_body={"stop_patterns": [re.escape(stop)]})
    assert (got.choices[0].text, got.choices[0].finish_reason) == (expected, "stop")


def test_logit_bias_forces_and_bans_tokens(engine, client, ref_tok):
    forced = ref_tok.encode(" x").ids[-1]
    got = client.completions.create(
        model=MODEL, prompt=PROMPTS[0], temperature=0, max_tokens=6, logprobs=1, logit_bias={str(forced): 100}
    )
    assert got.choices[0].logprobs.tokens == [ref_tok.decode([forced])] * 6  # +100 forces it, even greedy
    plain = generate(engine, PROMPTS[0], temperature=0, max_tokens=1).outputs[0].token_ids[0]
    banned = client.completions.create(
        model=MODEL, prompt=PROMPTS[0], temperature=0, max_tokens=1, logit_bias={str(plain): -100}
    )
    ref = generate(engine, PROMPTS[0], temperature=0, max_tokens=1, logit_bias={plain: -100})
    assert banned.choices[0].text == ref.outputs[0].text and ref.outputs[0].token_ids[0] != plain


def test_penalties_are_the_engines(engine, client):
    """The engine's penalties are checked against transformers (test_penalties.py); the server passes them on."""
    for penalties in (
        dict(presence_penalty=1.5),
        dict(frequency_penalty=2.0),
        dict(presence_penalty=-0.5, frequency_penalty=0.7),
    ):
        ref = generate(engine, PROMPTS[1], temperature=0, max_tokens=24, **penalties).outputs[0]
        got = client.completions.create(model=MODEL, prompt=PROMPTS[1], temperature=0, max_tokens=24, **penalties)
        assert (got.choices[0].text, got.usage.completion_tokens) == (ref.text, len(ref.token_ids)), penalties
    plain = generate(engine, PROMPTS[1], temperature=0, max_tokens=24).outputs[0].text
    assert any(
        generate(engine, PROMPTS[1], temperature=0, max_tokens=24, **p).outputs[0].text != plain
        for p in (dict(presence_penalty=2.0), dict(frequency_penalty=2.0))
    ), "the penalties must change this completion for the comparison to mean something"


def test_codegen_stops_cut_like_codegen(engine, client):
    prompt = "import os\n"
    full = generate(engine, prompt, temperature=0, max_tokens=64).outputs[0].text
    cut = first_match(full)
    assert cut is not None, f"the reference completion meets none of CodeGen's patterns: {full!r}"
    common = dict(model=MODEL, prompt=prompt, temperature=0, max_tokens=64, extra_body={"codegen_stops": True})
    got = client.completions.create(**common)
    assert (got.choices[0].text, got.choices[0].finish_reason) == (full[:cut], "stop")
    streamed = client.completions.create(**common, stream=True)
    assert "".join(chunk.choices[0].text for chunk in streamed) == full[:cut]


def test_copilot_route(engine, http):
    prompt = "def add(a, b):\n"
    ref = generate(engine, prompt, temperature=0, max_tokens=500, stop=["\n"]).outputs[0]
    body = {
        "model": "whatever-the-client-says",
        "prompt": prompt,
        "suffix": "",
        "max_tokens": 500,
        "temperature": 0,
        "top_p": 1,
        "n": 3,
        "stop": ["\n"],
        "stream": True,
        "nwo": "octo/repo",
        "extra": {"language": "python", "next_indent": 4, "trim_by_indentation": True, "prompt_tokens": 5},
    }
    for name in ("codegen", "copilot-codex", MODEL):
        with http.stream("POST", f"/v1/engines/{name}/completions", json=body) as r:
            assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
            events = sse_events(r.iter_lines())
        assert events[-1] == "[DONE]"
        texts, finishes = defaultdict(str), {}
        for e in events[:-1]:
            [c] = e["choices"]
            texts[c["index"]] += c["text"]
            if c["finish_reason"] is not None:
                finishes[c["index"]] = c["finish_reason"]
        assert dict(texts) == {i: ref.text for i in range(3)} and finishes == {i: ref.finish_reason for i in range(3)}
    whole = http.post("/v1/engines/codegen/completions", json={**body, "stream": False, "n": 1})
    assert [c["text"] for c in whole.json()["choices"]] == [ref.text]
    r = http.post("/v1/engines/davinci/completions", json=body)
    assert_error(r, 404, "engine")


def test_models_health_and_metrics(engine, server, client, http, ref_tok):
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL
    assert_error(http.get("/v1/models/gpt-4"), 404, "model")
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}  # no key needed

    # A prompt of several full KV blocks (16 tokens each), twice: the second finds them in the prefix cache.
    prompt = "".join(PROMPTS)
    assert len(ref_tok.encode(prompt).ids) >= 32
    before = wait_quiet(engine, http)
    got = client.completions.create(
        model=MODEL, prompt=prompt, temperature=0, max_tokens=10, extra_body={"ignore_eos": True}
    )
    after = wait_quiet(engine, http)
    delta = {k: after[k] - before.get(k, 0) for k in after}
    assert delta["fastcodegen_prompt_tokens_total"] == got.usage.prompt_tokens == len(ref_tok.encode(prompt).ids)
    assert delta["fastcodegen_generation_tokens_total"] == got.usage.completion_tokens == 10
    assert delta["fastcodegen_time_to_first_token_seconds_count"] == 1
    assert delta["fastcodegen_inter_token_latency_seconds_count"] == 9
    assert delta["fastcodegen_computed_tokens_total"] >= got.usage.prompt_tokens + 9
    client.completions.create(model=MODEL, prompt=prompt, temperature=0, max_tokens=2)
    again = wait_quiet(engine, http)
    assert again["fastcodegen_prefix_cache_hit_tokens_total"] - after["fastcodegen_prefix_cache_hit_tokens_total"] >= 16
    assert again["fastcodegen_preemptions_total"] >= 0


def test_a_speculating_server_answers_like_the_plain_one(engine):
    """Prompt lookup behind the server: the same greedy texts and streams, and its counters on /metrics."""
    prompt = PROMPTS[2] + PROMPTS[2]  # text that repeats: proposals to verify
    with Engine("codegen-tiny-py", device="cpu", progress=False, speculative_model="[ngram]") as spec:
        with running_server(spec) as s, httpx.Client(base_url=s.url, timeout=60) as h:
            body = {"prompt": prompt, "temperature": 0, "max_tokens": 40, "ignore_eos": True}
            got = h.post("/v1/completions", json=body).json()["choices"][0]["text"]
            assert got == generate(engine, prompt, temperature=0, max_tokens=40, ignore_eos=True).outputs[0].text
            with h.stream("POST", "/v1/completions", json=body | {"stream": True}) as r:
                chunks = [e["choices"][0]["text"] for e in sse_events(r.iter_lines()) if e != "[DONE]"]
            assert "".join(chunks) == got
            m = metrics(h)
            assert m["fastcodegen_spec_proposed_tokens_total"] >= m["fastcodegen_spec_accepted_tokens_total"] > 0
            assert 0 < m["fastcodegen_spec_acceptance_rate"] <= 1
            assert m["fastcodegen_spec_mean_accepted_length"] > 0


# ----------------------------------------------------------------------------- bad requests

BAD_REQUESTS = [
    # (what, body: a dict merged into a good one, or raw bytes; status; param)
    ("malformed JSON", b'{"prompt": "def f(x):",', 400, None),
    ("not an object", b'["def f(x):"]', 400, None),
    ("NaN", b'{"prompt": "def f(x):", "temperature": NaN}', 400, "temperature"),
    ("no prompt", {"prompt": None}, 400, "prompt"),
    ("prompt of the wrong type", {"prompt": {"text": "x"}}, 400, "prompt"),
    ("mixed prompt list", {"prompt": [1, "x"]}, 400, "prompt"),
    ("empty prompt", {"prompt": ""}, 400, "prompt"),
    ("empty prompt streamed", {"prompt": "", "stream": True}, 400, "prompt"),
    ("empty prompt list", {"prompt": []}, 400, "prompt"),
    ("empty token prompt", {"prompt": [[]]}, 400, "prompt"),
    ("prompt too long", {"prompt": "x = 1\n" * 1200}, 400, "prompt"),
    ("prompt too long streamed", {"prompt": "x = 1\n" * 1200, "stream": True}, 400, "prompt"),
    ("unknown token id", {"prompt": [5, 10**6]}, 400, "prompt"),
    ("negative token id", {"prompt": [-1]}, 400, "prompt"),
    ("bad second prompt", {"prompt": ["def f(x):", "def g(y):", ""]}, 400, "prompt"),
    ("temperature", {"temperature": -1}, 400, "temperature"),
    ("temperature as a string", {"temperature": "hot"}, 400, "temperature"),
    ("top_p", {"top_p": 0}, 400, "top_p"),
    ("top_k", {"top_k": -2}, 400, "top_k"),
    ("max_tokens", {"max_tokens": 0}, 400, "max_tokens"),
    ("max_tokens huge", {"max_tokens": 2**40}, 400, "max_tokens"),
    ("n", {"n": 0}, 400, "n"),
    ("n as a bool", {"n": True}, 400, "n"),
    ("n above max_num_seqs", {"n": 1000}, 400, "n"),
    ("best_of below n", {"n": 3, "best_of": 2}, 400, "best_of"),
    ("best_of above max_num_seqs", {"best_of": 1000}, 400, "best_of"),
    ("best_of streamed", {"n": 1, "best_of": 2, "stream": True}, 400, "best_of"),
    ("logprobs", {"logprobs": 6}, 400, "logprobs"),
    ("empty stop string", {"stop": [""]}, 400, "stop"),
    ("stop of the wrong type", {"stop": 5}, 400, "stop"),
    ("invalid stop pattern", {"stop_patterns": ["("]}, 400, "stop_patterns"),
    ("stop pattern matching the empty string", {"stop_patterns": "^"}, 400, "stop_patterns"),
    ("stop token outside the vocabulary", {"stop_token_ids": [10**6]}, 400, "stop_token_ids"),
    ("seed", {"seed": -1}, 400, "seed"),
    ("suffix", {"suffix": "    return x\n"}, 400, "suffix"),
    ("stream_options without stream", {"stream_options": {"include_usage": True}}, 400, "stream_options"),
    ("unknown model", {"model": "gpt-4"}, 404, "model"),
]


@pytest.mark.parametrize("what, body, status, param", BAD_REQUESTS, ids=[b[0] for b in BAD_REQUESTS])
def test_bad_requests_are_refused(engine, http, what, body, status, param):
    if isinstance(body, dict):
        body = json.dumps({k: v for k, v in {"prompt": "def f(x):", "max_tokens": 4, **body}.items() if v is not None})
    r = http.post("/v1/completions", content=body, headers={"Content-Type": "application/json"})
    error = assert_error(r, status, param)
    if what == "bad second prompt":
        assert error["message"].startswith("prompt 2 is empty")
    assert not engine.has_unfinished_requests()  # the prompts before the bad one were taken back
    good = http.post("/v1/completions", json={"prompt": "def f(x):", "max_tokens": 2})
    assert good.status_code == 200 and good.json()["usage"]["completion_tokens"] >= 1


def test_accepted_and_ignored(http):
    body = {"prompt": "def f(x):", "max_tokens": 2, "suffix": "", "user": "someone", "nwo": "a/b", "extra": {}}
    assert http.post("/v1/completions", json=body).status_code == 200


def test_routes_and_methods(http):
    assert_error(http.get("/nowhere"), 404)
    assert_error(http.post("/v1/chat/completions", json={}), 404)
    assert_error(http.get("/v1/completions"), 405)


def test_api_key(server, http):
    url = server.url + "/v1/completions"
    body = {"prompt": "def f(x):", "max_tokens": 2}
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}, {"Authorization": f"Basic {KEY}"}):
        r = httpx.post(url, json=body, headers=headers)
        assert assert_error(r, 401)["code"] == "invalid_api_key"
        assert r.headers["www-authenticate"] == "Bearer"
    assert_error(httpx.get(server.url + "/v1/models"), 401)
    assert httpx.post(url, json=body, headers={"Authorization": f"bearer {KEY}"}).status_code == 200
    assert httpx.get(server.url + "/metrics").status_code == 200
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0).models.list()


# ----------------------------------------------------------------------------- load, disconnects, limits


def test_64_concurrent_streams(engine, server, http, ref_tok):
    prompts = [f"def function_{i}(x):\n" for i in range(64)]
    ref = engine.generate(prompts, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))
    body = {"max_tokens": 12, "temperature": 0, "ignore_eos": True, "stream": True}
    body["stream_options"] = {"include_usage": True}

    async def one(c: httpx.AsyncClient, prompt: str):
        async with c.stream("POST", "/v1/completions", json={**body, "prompt": prompt}) as r:
            assert r.status_code == 200
            events = sse_events([line async for line in r.aiter_lines()])
        assert events[-1] == "[DONE]"
        text = "".join(e["choices"][0]["text"] for e in events[:-2])
        return text, events[-2]["usage"], events[-3]["choices"][0]["finish_reason"]

    async def all_of_them():
        limits = httpx.Limits(max_connections=64)
        async with httpx.AsyncClient(base_url=server.url, headers=AUTH, timeout=120, limits=limits) as c:
            return await asyncio.gather(*(one(c, p) for p in prompts))

    results = asyncio.run(all_of_them())
    for prompt, r, (text, usage, finish) in zip(prompts, ref, results):
        assert usage["completion_tokens"] == 12 and usage["prompt_tokens"] == len(ref_tok.encode(prompt).ids)
        assert finish == "length"
        assert text == r.outputs[0].text
    wait_quiet(engine, http)


def test_clients_that_go_away_free_their_requests(engine, server, http):
    before = wait_quiet(engine, http)
    body = {"prompt": "def f(x):", "max_tokens": 900, "temperature": 0, "ignore_eos": True}

    async def leave_early():
        async with httpx.AsyncClient(base_url=server.url, headers=AUTH, timeout=60) as c:
            streams = [c.stream("POST", "/v1/completions", json={**body, "stream": True}) for _ in range(6)]
            responses = [await s.__aenter__() for s in streams]
            for r in responses:  # each one running
                assert r.status_code == 200
                lines = r.aiter_lines()
                assert (await anext(lines)).startswith("data: ")
            for s in streams:  # the streams closed mid-way
                await s.__aexit__(None, None, None)
            with pytest.raises(httpx.ReadTimeout):  # a non-streamed request whose client gives up
                await c.post("/v1/completions", json=body, timeout=0.5)

    asyncio.run(leave_early())
    after = wait_quiet(engine, http)
    # 7 requests of 900 tokens each, aborted long before their end
    assert after["fastcodegen_generation_tokens_total"] - before["fastcodegen_generation_tokens_total"] < 7 * 900 / 3


def test_body_limit_and_overload(small_engine):
    server = running_server(small_engine, max_waiting=1, max_body_bytes=2048)
    with server as s, httpx.Client(base_url=s.url, timeout=60) as http:
        # A body announced over the limit: refused before it is read.
        with socket.create_connection(("127.0.0.1", int(s.url.rsplit(":", 1)[1]))) as sock:
            sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000\r\n\r\n")
            reply = http_client.HTTPResponse(sock)
            reply.begin()
            assert reply.status == 413
            assert set(json.loads(reply.read())["error"]) == ERROR_FIELDS
        # A chunked body that grows past the limit.
        chunks = iter([b'{"prompt": "', b"x" * 1500, b"y" * 1500, b'"}'])
        assert_error(http.post("/v1/completions", content=chunks), 413)
        assert http.post("/v1/completions", json={"prompt": "def f(x):" + " " * 1500, "max_tokens": 2}).is_success

        # More prompts than may ever wait at once: a request that could never run.
        too_many = http.post("/v1/completions", json={"prompt": ["def f(x):", "def g(x):"], "max_tokens": 2})
        assert "more than this server lets wait" in assert_error(too_many, 400, "prompt")["message"]

        # One sequence runs, one request waits: the next is refused with 503 and Retry-After.
        async def overload():
            long = {"prompt": "def f(x):", "max_tokens": 900, "temperature": 0, "ignore_eos": True, "stream": True}
            async with httpx.AsyncClient(base_url=s.url, timeout=60) as c:
                async with c.stream("POST", "/v1/completions", json=long) as a:
                    lines = a.aiter_lines()  # kept: a dropped line iterator closes the response
                    assert (await anext(lines)).startswith("data: ")  # running
                    waiting = asyncio.create_task(c.post("/v1/completions", json={"prompt": "x", "max_tokens": 2}))
                    deadline = time.monotonic() + 15
                    while True:  # until the first one runs while the second waits
                        await asyncio.sleep(0.02)
                        m = parse_metrics((await c.get("/metrics")).text)
                        if m["fastcodegen_num_sequences_running"] == m["fastcodegen_num_requests_waiting"] == 1:
                            break
                        assert time.monotonic() < deadline, m
                    r = await c.post("/v1/completions", json={"prompt": "y", "max_tokens": 2})
                    assert assert_error(r, 503)["type"] == "server_error"
                    assert int(r.headers["retry-after"]) >= 1
                # the long stream closed: the waiting request runs
                assert (await waiting).status_code == 200

        asyncio.run(overload())
        wait_quiet(small_engine, http)


def test_stopping_the_server_ends_streams(small_engine):
    with running_server(small_engine) as s:
        body = {"prompt": "def f(x):", "max_tokens": 900, "temperature": 0, "ignore_eos": True, "stream": True}
        with httpx.stream("POST", s.url + "/v1/completions", json=body, timeout=60) as r:
            lines = r.iter_lines()
            assert next(lines).startswith("data: ")
            s.server.should_exit = True
            events = sse_events(lines)
        s.thread.join(30)
        assert not s.thread.is_alive()
        engine_loop = s.app.state.engine_loop
        assert not engine_loop.thread.is_alive() and not engine_loop.running
        assert events[-1] == "[DONE]" and events[-2]["choices"][0]["finish_reason"] == "abort"
        assert not small_engine.has_unfinished_requests()
        assert small_engine.num_free_kv_blocks == small_engine.stats.num_blocks


def test_a_failed_step_fails_its_requests_not_the_server(small_engine, monkeypatch):
    with running_server(small_engine) as s, httpx.Client(base_url=s.url, timeout=60) as http:
        real_step = small_engine.step
        failures = []

        def failing_step():
            if len(failures) < 2:
                failures.append(1)
                raise RuntimeError("injected failure")
            return real_step()

        monkeypatch.setattr(small_engine, "step", failing_step)
        body = {"prompt": "def f(x):", "max_tokens": 4}
        error = assert_error(http.post("/v1/completions", json=body), 500)
        assert error["type"] == "server_error" and "injected failure" in error["message"]
        with http.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
            events = sse_events(r.iter_lines())
        assert events[-1] == "[DONE]" and "injected failure" in events[-2]["error"]["message"]
        assert events[-3]["choices"][0]["finish_reason"] == "error"
        assert not small_engine.has_unfinished_requests()
        assert http.post("/v1/completions", json=body).json()["usage"]["completion_tokens"] == 4
        assert http.get("/health").json() == {"status": "ok"}


# ----------------------------------------------------------------------------- the command


def _default_sigint() -> None:
    """In the child: Ctrl-C's default action, even where the suite runs with SIGINT ignored (a background job)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.mark.parametrize("stop_signal", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_serve_command_stops_cleanly_on_a_signal(stop_signal):
    proc = subprocess.Popen(
        [sys.executable, "-m", "fastcodegen", "serve", "--port", "0", "--device", "cpu", "--kv-cache-tokens", "2048",
         "--served-model-name", MODEL, "--api-key", KEY],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, preexec_fn=_default_sigint,
    )  # fmt: skip
    try:
        err_lines: list[str] = []
        reader = threading.Thread(target=lambda: err_lines.extend(line.decode() for line in proc.stderr), daemon=True)
        reader.start()
        deadline = time.monotonic() + 180
        while not any("serving" in line for line in err_lines):
            assert proc.poll() is None and time.monotonic() < deadline, "".join(err_lines)
            time.sleep(0.1)
        url = re.search(r"http://127\.0\.0\.1:\d+", "".join(err_lines)).group()
        body = {"prompt": "def f(x):", "max_tokens": 900, "ignore_eos": True, "stream": True, "model": MODEL}
        with httpx.stream("POST", url + "/v1/completions", json=body, headers=AUTH, timeout=60) as r:
            lines = r.iter_lines()
            assert next(lines).startswith("data: ")
            proc.send_signal(stop_signal)
            events = sse_events(lines)
        assert events[-1] == "[DONE]" and events[-2]["choices"][0]["finish_reason"] == "abort"
        assert proc.wait(timeout=60) == 0
        reader.join(10)
        assert "Traceback" not in "".join(err_lines), "".join(err_lines)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_serve_without_the_server_extra():
    # `import fastcodegen` (and the engine) never loads FastAPI; without it, `serve` says what to install.
    code = (
        "import sys\n"
        "import fastcodegen, fastcodegen.cli\n"
        "from fastcodegen import Engine\n"
        "assert not {'fastapi', 'uvicorn', 'starlette'} & set(sys.modules), sorted(sys.modules)\n"
        "sys.modules['fastapi'] = None\n"
        "sys.exit(fastcodegen.cli.main(['serve']))\n"
    )
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=120, stdin=subprocess.DEVNULL)
    err = p.stderr.decode()
    assert p.returncode == 2, err
    assert err.count("\n") == 1 and err.startswith("error: ") and 'pip install "fastcodegen[server]"' in err, err
