"""The OpenAI-compatible server, live on 127.0.0.1, called with the official `openai` client and httpx."""

import json
import threading
import time

import httpx
import numpy as np
import openai
import pytest

import lsjax
from lsjax.decoder import Decoder
from lsjax.generate import Generator
from lsjax.serve import Engine, EngineConfig
from lsjax.serve.server import server
from test_generate import BACKEND, random_adapter

NAME = "tiny-switch"



def reference(engine) -> Generator:
    """A `Generator` over the engine's own decoder: each request decoded alone, the reference."""
    return Generator.of(engine.decoder, engine.tokenizer)

@pytest.fixture(scope="module")
def live(tiny_llama):
    """A running server over a switch adapter (8 slots), its engine, and the base URL."""
    _, model, tok = tiny_llama
    generator = Generator(model, tok, random_adapter(model, "switch"), strategy="unmerged", backend=BACKEND)
    engine = Engine(generator.decoder, generator.tokenizer, EngineConfig(slots=8, max_len=128, prefill_chunk=16))
    engine.start()
    engine.warmup()
    srv = server(engine, NAME, "127.0.0.1", 0)
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    while not srv.started:
        time.sleep(0.01)
    port = srv.servers[0].sockets[0].getsockname()[1]
    yield engine, f"http://127.0.0.1:{port}"
    srv.should_exit = True
    thread.join(timeout=10)
    engine.stop()


@pytest.fixture
def client(live):
    return openai.OpenAI(base_url=live[1] + "/v1", api_key="unused", max_retries=0)


def greedy(engine, prompt, max_tokens, chat=False):
    """`Generator.generate` on this request alone: the reference text."""
    return reference(engine).generate([prompt], max_new_tokens=max_tokens, chat=chat)


def test_completions_whole_and_streamed(live, client):
    engine, _ = live
    want = greedy(engine, "abc def", 12)
    got = client.completions.create(model=NAME, prompt="abc def", max_tokens=12, temperature=0)
    assert got.choices[0].text == want.texts[0]
    assert got.choices[0].finish_reason == ("stop" if want.finish_reasons[0] == "stop" else "length")
    assert got.usage.prompt_tokens == want.prompt_tokens[0] and got.usage.completion_tokens == len(want.token_ids[0])
    chunks = list(client.completions.create(model=NAME, prompt="abc def", max_tokens=12, temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == want.texts[0]
    assert chunks[-1].choices[0].finish_reason is not None


def test_chat_whole_and_streamed_with_logprobs(live, client):
    engine, _ = live
    want = reference(engine).generate(["Hi there"], max_new_tokens=10, chat=True, logprobs=True)
    messages = [{"role": "user", "content": "Hi there"}]
    got = client.chat.completions.create(model=NAME, messages=messages, max_tokens=10, temperature=0,
                                         logprobs=True, top_logprobs=2)
    assert got.choices[0].message.content == want.texts[0] and got.choices[0].message.role == "assistant"
    scores = [e.logprob for e in got.choices[0].logprobs.content]
    np.testing.assert_allclose(scores, want.logprobs[0], atol=1e-4)
    assert all(len(e.top_logprobs) == 2 for e in got.choices[0].logprobs.content)
    stream = client.chat.completions.create(model=NAME, messages=messages, max_tokens=10, temperature=0, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want.texts[0]
    assert chunks[-1].usage.completion_tokens == len(want.token_ids[0])


def test_models_health_metrics(live, client):
    engine, url = live
    assert [m.id for m in client.models.list().data] == [NAME]
    unknown = httpx.post(url + "/v1/completions", json={"model": "other", "prompt": "a"})
    assert unknown.status_code == 404 and unknown.json()["error"]["param"] == "model"  # as OpenAI answers it
    assert httpx.get(url + "/health").json() == {"status": "ok"}
    before = engine.stats["tokens"]
    client.completions.create(model=NAME, prompt="xyz", max_tokens=5, temperature=0, stop=None)
    text = httpx.get(url + "/metrics").text
    values = dict(line.split() for line in text.splitlines() if not line.startswith("#"))
    assert int(values["lsjax_generated_tokens_total"]) >= before + 1
    assert values["lsjax_active_slots"] == "0" and values["lsjax_slots"] == "8"
    assert float(values["lsjax_step_seconds_mean"]) > 0


BAD = [  # (body, the field the error must name); every one a 400
    ({"model": NAME}, "prompt"),
    ({"model": NAME, "prompt": ""}, "prompt"),
    ({"model": NAME, "prompt": "a", "max_tokens": 0}, "max_tokens"),
    ({"model": NAME, "prompt": "a", "max_tokens": 500}, "max_tokens"),
    ({"model": NAME, "prompt": "a" * 200, "max_tokens": 4}, "prompt"),
    ({"model": NAME, "prompt": "a", "temperature": -1}, "temperature"),
    ({"model": NAME, "prompt": "a", "top_p": 0}, "top_p"),
    ({"model": NAME, "prompt": "a", "top_p": 1.5}, "top_p"),
    ({"model": NAME, "prompt": "a", "top_k": -1}, "top_k"),
    ({"model": NAME, "prompt": "a", "n": 2}, "n"),
    ({"model": NAME, "prompt": "a", "best_of": 3}, "best_of"),
    ({"model": NAME, "prompt": "a", "max_tokens": "7"}, "max_tokens"),
    ({"model": NAME, "prompt": "a", "temperature": "hot"}, "temperature"),
    ({"model": NAME, "prompt": "a", "frobnicate": 1}, "frobnicate"),
    ({"model": NAME, "prompt": "a", "logprobs": 9}, "logprobs"),
    ({"model": NAME, "prompt": [1, 9999]}, "prompt"),
    # scoring and the prompt's four forms
    ({"model": NAME, "prompt": "a", "max_tokens": 0, "echo": True}, "max_tokens"),  # 0 tokens: scoring only
    ({"model": NAME, "prompt": "a", "max_tokens": -1}, "max_tokens"),
    ({"model": NAME, "prompt": "a", "echo": True, "stream": True}, "echo"),
    ({"model": NAME, "prompt": "a", "echo": True, "logprobs": 6}, "logprobs"),
    ({"model": NAME, "prompt": []}, "prompt"),
    ({"model": NAME, "prompt": [[1, 2], []]}, "prompt"),
    ({"model": NAME, "prompt": [[1, 2], [3, 99999]]}, "prompt"),
    ({"model": NAME, "prompt": [1, "a"]}, "prompt"),
    ({"model": NAME, "prompt": "\ud800"}, "prompt"),  # a lone surrogate: the tokenizer would raise
    ({"model": NAME, "prompt": ["ok", "a\ud800b"]}, "prompt.1"),
    ({"model": NAME, "prompt": "a", "stop": "\udfff"}, "stop"),
    ({"model": NAME, "prompt": "a" * 200_000}, "prompt"),  # cannot fit the context: refused untokenized
    ({"model": NAME, "prompt": "a", "presence_penalty": 0.5}, "presence_penalty"),
]
BAD_CHAT = [
    ({"model": NAME, "messages": []}, "messages"),
    ({"model": NAME}, "messages"),
    ({"model": NAME, "messages": [{"role": "wizard", "content": "hi"}]}, "messages.0.role"),
    ({"model": NAME, "messages": [{"role": "user"}]}, "messages.0.content"),
    ({"model": NAME, "messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function"}]}, "tools"),
    ({"model": NAME, "messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2}, "top_logprobs"),
    ({"model": NAME, "messages": [{"role": "user", "content": "hi"}], "echo": True}, "echo"),
    ({"model": NAME, "messages": [{"role": "user", "content": "\ud800"}]}, "messages.0.content"),
    ({"model": NAME, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}, "max_tokens"),
]


def test_bad_requests_are_400s_naming_the_field(live):
    engine, url = live
    cases = [("/v1/completions", b, f) for b, f in BAD] + [("/v1/chat/completions", b, f) for b, f in BAD_CHAT]
    with httpx.Client(base_url=url) as http:
        for path, body, field in cases:  # json.dumps escapes a lone surrogate, as a client's JSON may hold it
            r = http.post(path, content=json.dumps(body), headers={"content-type": "application/json"})
            assert r.status_code == 400, (body, r.status_code, r.text)
            error = r.json()["error"]
            assert error["param"] == field and error["type"] == "invalid_request_error", (body, error)
            assert error["message"]
        for raw in (b"{not json", b"[1, 2]", b""):
            r = http.post("/v1/completions", content=raw, headers={"content-type": "application/json"})
            assert r.status_code == 400 and r.json()["error"]["message"], raw
        assert http.get("/v1/nothing").status_code == 404
        ok = http.post("/v1/completions", json={"model": NAME, "prompt": "abc def", "max_tokens": 12, "temperature": 0})
    assert ok.status_code == 200 and ok.json()["choices"][0]["text"] == greedy(engine, "abc def", 12).texts[0]


def test_a_prompt_in_each_of_the_four_forms_gets_one_choice_each(live, client):
    """A string, strings, token ids, lists of token ids: each prompt its own choice (by index), equal
    to the greedy text of that prompt alone; streamed chunks carry their choice's index."""
    engine, _ = live
    tok = engine.tokenizer
    texts = ["abc def", "xyz", "hello there"]
    want = [greedy(engine, t, 8).texts[0] for t in texts]
    ids = [tok.encode(t, add_special_tokens=False) for t in texts]
    for prompt, expect in (("abc def", want[:1]), (texts, want), (ids[2], want[2:]), (ids, want)):
        got = client.completions.create(model=NAME, prompt=prompt, max_tokens=8, temperature=0)
        assert [c.index for c in got.choices] == list(range(len(expect)))
        assert [c.text for c in got.choices] == expect, prompt
    chunks = list(client.completions.create(model=NAME, prompt=texts, max_tokens=8, temperature=0, stream=True))
    streamed = ["".join(c.choices[0].text for c in chunks if c.choices and c.choices[0].index == i) for i in range(3)]
    assert streamed == want and len({c.id for c in chunks}) == 1


def test_echoed_logprobs_score_multiple_choice_as_lsjax_eval_does(live, client):
    """An evaluation harness's request (echo, logprobs, max_tokens 0, the choices as token-id lists)
    gives each choice the log-likelihood `lsjax eval` computes, so the same accuracy on the same
    documents; the openai client's legacy call works as such a harness makes it."""
    import jax

    from lsjax.adapters import adapted_forward
    from lsjax.data import MCDoc
    from lsjax.eval.harness import doc_requests, evaluate, score_requests

    engine, _ = live
    decoder, tok = engine.decoder, engine.tokenizer
    rng = np.random.default_rng(0)
    words = ["red", "sun", "cold", "tea", "map", "road", "blue", "left", "stone", "river"]
    docs = {"arc_easy": [MCDoc("arc_easy", f"q{i}", (f"Question: which is {words[i]}?\nAnswer:",) * 4,
                               tuple(" " + " ".join(rng.choice(words, int(rng.integers(1, 4)))) for _ in range(4)),
                               int(rng.integers(4))) for i in range(8)]}
    fn = jax.jit(lambda ids, positions, visibility, last: adapted_forward(
        decoder.config, decoder.bundle["base"], decoder.adapter_config, decoder.bundle["adapter"], ids,
        positions=positions, visibility=visibility, last=last)[0], static_argnums=3)
    requests = doc_requests(tok, docs["arc_easy"], max_length=100)
    want_loglik, _ = score_requests(fn, requests, max_length=100, progress=False)
    want = evaluate(fn, tok, docs, max_length=100, progress=False)["tasks"]["arc_easy"]

    got_loglik, at = [], 0
    for doc in docs["arc_easy"]:
        mine = requests[at:at + doc.num_choices]
        at += doc.num_choices
        out = client.completions.create(model=NAME, prompt=[list(r.tokens) for r in mine], echo=True, logprobs=1,
                                        max_tokens=0)
        assert [c.index for c in out.choices] == list(range(len(mine)))
        for r, choice in zip(mine, out.choices):
            lp = choice.logprobs
            assert lp.token_logprobs[0] is None and len(lp.tokens) == len(r.tokens) == len(lp.text_offset)
            assert choice.text == tok.decode(list(r.tokens)) and lp.text_offset[0] == 0
            assert all(len(top) == 1 for top in lp.top_logprobs[1:])
            got_loglik.append(sum(lp.token_logprobs[-r.n_score:]))
    np.testing.assert_allclose(got_loglik, want_loglik, atol=2e-3)
    at, correct = 0, []
    for doc in docs["arc_easy"]:
        correct.append(int(np.argmax(got_loglik[at:at + doc.num_choices])) == doc.gold)
        at += doc.num_choices
    assert correct == [bool(x) for x in want["docs"]["acc"]] and np.mean(correct) == want["acc"]


@pytest.fixture(scope="module")
def guarded(tiny_llama):
    """A server with an API key, one slot and a queue of one, and a small body limit."""
    _, model, tok = tiny_llama
    engine = Engine(Decoder(model), tok, EngineConfig(slots=1, max_len=512, prefill_chunk=16, max_queue=1)).start()
    engine.warmup()
    srv = server(engine, NAME, "127.0.0.1", 0, api_key="s3cret", max_body_bytes=1 << 20)
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    while not srv.started:
        time.sleep(0.01)
    yield engine, f"http://127.0.0.1:{srv.servers[0].sockets[0].getsockname()[1]}"
    srv.should_exit = True
    thread.join(timeout=10)
    engine.stop()


def test_api_key_body_limit_and_a_full_queue(guarded):
    engine, url = guarded
    key = {"Authorization": "Bearer s3cret"}
    body = {"model": NAME, "prompt": "abc", "max_tokens": 4, "temperature": 0}
    with httpx.Client(base_url=url, timeout=60) as http:
        assert http.get("/health").status_code == 200  # probes need no key
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
            for method, path in (("GET", "/v1/models"), ("POST", "/v1/completions"), ("GET", "/metrics")):
                r = http.request(method, path, json=body, headers=headers)
                assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key", (path, headers)
        assert http.post("/v1/completions", json=body, headers=key).status_code == 200
        ok = openai.OpenAI(base_url=url + "/v1", api_key="s3cret", max_retries=0)
        assert ok.completions.create(**body).choices[0].text == greedy(engine, "abc", 4).texts[0]
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=url + "/v1", api_key="nope", max_retries=0).models.list()

        huge = b'{"model": "' + NAME.encode() + b'", "prompt": "' + b"a" * (20 << 20) + b'"}'
        r = http.post("/v1/completions", content=huge, headers={**key, "content-type": "application/json"})
        assert r.status_code == 413 and "larger than 1048576 bytes" in r.json()["error"]["message"]

        # one slot busy, one request waiting: the next is turned away with a 503 and Retry-After
        long = {**body, "max_tokens": 490, "stop_token_ids": [], "prompt": "a"}  # hundreds of decode steps
        results = {}

        def send(name):
            results[name] = http.post("/v1/completions", json=long, headers=key)

        first = threading.Thread(target=send, args=("first",))
        first.start()
        deadline = time.time() + 60
        while engine.active() == 0 and time.time() < deadline:
            time.sleep(0.002)
        second = threading.Thread(target=send, args=("second",))
        second.start()
        while not engine.waiting and time.time() < deadline:
            time.sleep(0.002)
        assert engine.active() == 1 and len(engine.waiting) == 1
        r = http.post("/v1/completions", json=body, headers=key)
        assert r.status_code == 503 and r.headers["retry-after"] == "1", r.text
        assert "max_queue" in r.json()["error"]["message"]
        first.join()
        second.join()
        assert results["first"].status_code == results["second"].status_code == 200


def test_load_with_disconnects(live):
    """64 requests through 8 slots, random arrivals, every fourth client leaving mid-stream: all the
    others get their own greedy tokens, the slots all come back, the server stays up."""
    engine, url = live
    rng = np.random.default_rng(0)
    prompts = ["".join(chr(c) for c in rng.integers(97, 123, size=int(rng.integers(1, 40)))) for _ in range(64)]
    lengths = [int(rng.integers(4, 24)) for _ in range(64)]
    for i in range(3, 64, 4):  # the leavers ask for long outputs: unless their slots are freed, they run on
        prompts[i], lengths[i] = prompts[i][:8], 100
    before = engine.stats["tokens"]
    results: dict[int, str] = {}
    left = []

    def client(i):
        time.sleep(float(rng.uniform(0, 2)) if i else 0)
        body = {"model": NAME, "prompt": prompts[i], "max_tokens": lengths[i], "temperature": 0, "stream": True,
                "stop_token_ids": []}
        with httpx.Client(base_url=url, timeout=120) as http, http.stream("POST", "/v1/completions", json=body) as r:
            text, chunks = "", 0
            for line in r.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                text += json.loads(line[6:])["choices"][0]["text"]
                chunks += 1
                if i % 4 == 3 and chunks == 2:
                    left.append(i)
                    return  # leaves mid-stream: closing the connection must free the slot
            results[i] = text

    threads = [threading.Thread(target=client, args=(i,)) for i in range(64)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert len(left) == 16 and len(results) == 48
    for i, text in results.items():
        want = reference(engine).generate([prompts[i]], max_new_tokens=lengths[i], stop_token_ids=[])
        assert text == want.texts[0], i
    # each leaver's request ended within a few steps of its client going
    assert engine.stats["tokens"] - before < sum(lengths[i] for i in results) + 16 * 20
    deadline = time.time() + 10
    while engine.active() and time.time() < deadline:
        time.sleep(0.05)
    assert engine.active() == 0 and not engine.waiting
    assert httpx.get(url + "/health").status_code == 200


def test_shutdown_ends_streams_cleanly(tiny_llama):
    _, model, tok = tiny_llama
    engine = Engine(Decoder(model), tok, EngineConfig(slots=2, max_len=128, prefill_chunk=16)).start()
    srv = server(engine, NAME, "127.0.0.1", 0)
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    while not srv.started:
        time.sleep(0.01)
    url = f"http://127.0.0.1:{srv.servers[0].sockets[0].getsockname()[1]}"
    lines = []
    body = {"model": NAME, "prompt": "a", "max_tokens": 100, "temperature": 0, "stream": True,
            "stop_token_ids": []}
    with httpx.Client(base_url=url, timeout=30) as http, http.stream("POST", "/v1/completions", json=body) as r:
        for line in r.iter_lines():
            if line:
                lines.append(line)
            if len(lines) == 2:
                srv.handle_exit(None, None)
    thread.join(timeout=15)
    assert not thread.is_alive() and lines[-1] == "data: [DONE]"
    assert json.loads(lines[-2][6:])["choices"][0]["finish_reason"] == "cancelled"


def test_lsjax_serve_command(tmp_path):
    """`lsjax serve` as a user starts it, with two adapters (one named, one after its folder) and
    adapters at run time: it comes up on the port asked for, lists the base and both adapters,
    answers the openai client with each one's own greedy text, unloads one and loads it again under
    another name (the same text), refuses a fourth adapter past --max-adapters 3, and exits cleanly
    on Ctrl-C (SIGINT). Its experts are bfloat16 (--expert-dtype) beside float32 weights: the texts
    are those of the adapters rounded so, the ones loaded at run time too."""
    import os
    import signal
    import subprocess
    import sys

    from lsjax.convert import convert_hf
    from tiny import make_hf_model

    from lsjax.adapters import save_adapter

    make_hf_model(tmp_path / "hf")
    convert_hf(tmp_path / "hf", tmp_path / "ckpt", progress=False)
    model, tok = lsjax.load(tmp_path / "ckpt")
    adapters = {"sw": random_adapter(model, "switch"), "plain": random_adapter(model, "lora", targets=["q", "v"])}
    for name, adapter in adapters.items():
        save_adapter(tmp_path / name, adapter)
    # each model's own text, from the saved folders, in a process of its own (as a user would check it)
    reference = ("import json, sys, lsjax\n"
                 "from lsjax.adapters import open_adapter\n"
                 "from lsjax.generate import Generator\n"
                 "model, tok = lsjax.load(sys.argv[1])\n"
                 "texts = {n: Generator(model, tok, open_adapter(f, model.config).astype('bfloat16') if f else None,"
                 " strategy='unmerged')"
                 ".generate(['abc'], max_new_tokens=6).texts[0] for n, f in json.loads(sys.argv[2]).items()}\n"
                 "print('RESULT' + json.dumps(texts))\n")
    folders = {"tiny": None, "sw": str(tmp_path / "sw"), "plain": str(tmp_path / "plain")}
    done = subprocess.run([sys.executable, "-c", reference, str(tmp_path / "ckpt"), json.dumps(folders)],
                          capture_output=True, text=True, timeout=300, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert done.returncode == 0, done.stderr[-2000:]
    want = json.loads(done.stdout.split("RESULT")[-1])
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "lsjax.cli", "serve", "--ckpt", str(tmp_path / "ckpt"),
                             "--slots", "2", "--max-len", "128", "--port", str(port), "--model-name", "tiny",
                             "--adapter", f"sw={tmp_path / 'sw'}", "--adapter", str(tmp_path / "plain"),
                             "--allow-runtime-adapters", "--max-adapters", "3", "--expert-dtype", "bfloat16"],
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0)
        assert [m.id for m in client.models.list().data] == ["tiny", "plain", "sw"]
        for name in ("tiny", "sw", "plain"):
            got = client.completions.create(model=name, prompt="abc", max_tokens=6, temperature=0)
            assert got.choices[0].text == want[name], name
        url = f"http://127.0.0.1:{port}/v1"
        assert httpx.post(f"{url}/unload_lora_adapter", json={"lora_name": "plain"}).status_code == 200
        for name in ("again", "third"):
            body = {"lora_name": name, "lora_path": str(tmp_path / "plain")}
            loaded = httpx.post(f"{url}/load_lora_adapter", json=body)
            assert loaded.status_code == 200, loaded.text
        full = httpx.post(f"{url}/load_lora_adapter", json={"lora_name": "fourth", "lora_path": str(tmp_path / "sw")})
        assert full.status_code == 400 and "no room for adapter 'fourth'" in full.json()["error"]["message"]
        assert [m.id for m in client.models.list().data] == ["tiny", "again", "sw", "third"]
        got = client.completions.create(model="again", prompt="abc", max_tokens=6, temperature=0)
        assert got.choices[0].text == want["plain"]
    finally:
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0 and "Traceback" not in err, err
    assert f"serving 'tiny', 'sw', 'plain' on http://127.0.0.1:{port}/v1" in err and "experts bfloat16;" in err


def test_chat_without_a_chat_template_is_a_400(live):
    engine, url = live
    template, engine.tokenizer.chat_template = engine.tokenizer.chat_template, None
    try:
        r = httpx.post(url + "/v1/chat/completions",
                       json={"model": NAME, "messages": [{"role": "user", "content": "hi"}]})
    finally:
        engine.tokenizer.chat_template = template
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages", r.text
    assert "no chat template" in r.json()["error"]["message"]


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _two_processes(ckpt, port: int, *args: str) -> list:
    """`lsjax serve` as processes 0 and 1 of one `jax.distributed` runtime on localhost (one CPU device
    each), once process 0 answers /health (or one of them ended)."""
    import os
    import subprocess
    import sys

    coordinator = _free_port()
    procs = [subprocess.Popen([sys.executable, "-m", "lsjax.cli", "serve", "--ckpt", str(ckpt), "--port", str(port),
                               "--tensor-parallel", "2", "--coordinator", f"localhost:{coordinator}",
                               "--num-processes", "2", "--process-id", str(i), *args],
                              stderr=subprocess.PIPE, text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"})
             for i in range(2)]
    deadline = time.time() + 240
    while time.time() < deadline and all(p.poll() is None for p in procs):
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200:
                break
        except httpx.TransportError:
            time.sleep(0.3)
    return procs


def test_two_processes_serve_as_one(tmp_path):
    """`lsjax serve` over two `jax.distributed` processes on localhost (one device each, the weights,
    experts and cache split over both): process 0 answers HTTP and the other steps the same batch.
    Concurrent greedy requests to the base and to a switch adapter, while a streamed one is dropped
    by its client, give one process's texts; of two LoRA adapters loaded at once into the one free slot,
    one is refused and the other (each process opening its folder between the same two steps) gives
    its own text; the switch adapter unloaded is gone;
    stopping process 0 ends both cleanly."""
    import signal

    from lsjax.adapters import save_adapter
    from lsjax.convert import convert_hf
    from tiny import make_hf_model

    make_hf_model(tmp_path / "hf")
    convert_hf(tmp_path / "hf", tmp_path / "ckpt", progress=False)
    model, tok = lsjax.load(tmp_path / "ckpt")
    adapter, lora = random_adapter(model, "switch"), random_adapter(model, "lora")
    save_adapter(tmp_path / "sw", adapter)
    save_adapter(tmp_path / "lora", lora)
    asks = [("tiny", "abc", 6), ("sw", "hello there", 9), ("tiny", "the quick brown fox jumps over", 4),
            ("sw", "x", 7), ("tiny", "a b c d e f g h i j k", 8)]
    generators = {"tiny": Generator(model, tok, strategy="unmerged"),
                  "sw": Generator(model, tok, adapter, strategy="unmerged")}
    want = [generators[name].generate([prompt], max_new_tokens=n).texts[0] for name, prompt, n in asks]
    want_lora, want_base = (Generator(model, tok, a, strategy="unmerged").generate(["hello there"], max_new_tokens=6)
                            .texts[0] for a in (lora, None))

    port = _free_port()
    procs = _two_processes(tmp_path / "ckpt", port, "--model-name", "tiny", "--adapter", f"sw={tmp_path / 'sw'}",
                           "--slots", "2", "--max-len", "128", "--strategy", "unmerged", "--allow-runtime-adapters",
                           "--max-adapters", "2")
    url = f"http://127.0.0.1:{port}/v1"
    try:
        got = [None] * len(asks)

        def ask(i):
            name, prompt, n = asks[i]
            r = httpx.post(f"{url}/completions", json={"model": name, "prompt": prompt, "max_tokens": n,
                                                       "temperature": 0}, timeout=120)
            got[i] = r.json()["choices"][0]["text"]

        threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(asks))]
        with httpx.stream("POST", f"{url}/completions", timeout=120,
                          json={"model": "sw", "prompt": "abc", "max_tokens": 100, "stream": True}) as dropped:
            for t in threads:
                t.start()
            next(dropped.iter_lines())  # then the client goes away mid-stream
        for t in threads:
            t.join()
        assert got == want

        def load(name, folder):
            body = {"lora_name": name, "lora_path": str(folder)}
            return httpx.post(f"{url}/load_lora_adapter", json=body, timeout=60)

        def complete(name):
            return httpx.post(f"{url}/completions", json={"model": name, "prompt": "hello there", "max_tokens": 6,
                                                          "temperature": 0}, timeout=60)

        missing = load("lora", tmp_path / "nowhere")  # refused at process 0: no process tries it
        assert missing.status_code == 400 and "nowhere" in missing.json()["error"]["message"], missing.text
        loads = {}  # two at once for the one free slot: one loads, the other is refused, the engine serves on
        racing = [threading.Thread(target=lambda n: loads.setdefault(n, load(n, tmp_path / "lora")), args=(n,))
                  for n in ("lora", "more")]
        for t in racing:
            t.start()
        for t in racing:
            t.join()
        assert sorted(r.status_code for r in loads.values()) == [200, 400], {n: r.text for n, r in loads.items()}
        loaded, refused = sorted(loads, key=lambda n: loads[n].status_code)
        assert f"no room for adapter {refused!r}" in loads[refused].text, loads[refused].text
        assert complete(loaded).json()["choices"][0]["text"] == want_lora
        assert httpx.post(f"{url}/unload_lora_adapter", json={"lora_name": "sw"}, timeout=60).status_code == 200
        gone = complete("sw")
        assert gone.status_code == 404 and "model 'sw' is not served here" in gone.text, gone.text
        assert complete("tiny").json()["choices"][0]["text"] == want_base
    finally:
        procs[0].send_signal(signal.SIGINT)
        try:
            errs = [p.communicate(timeout=60)[1] for p in procs]
        finally:  # processes out of step would wait on each other for ever
            for p in procs:
                p.kill()
    assert [p.returncode for p in procs] == [0, 0], errs[0][-2000:] + errs[1][-2000:]
    assert "over 2 devices of 2 processes" in errs[0] and "following process 0's engine" in errs[1]


def test_a_process_that_ends_ends_the_other(tmp_path):
    """Killing one process of a two-process server fails the other's next collective (an idle process
    0 sends one every second): it ends its requests and exits at once with one line naming the cause,
    instead of serving 503s or waiting out the ended process's heartbeat."""
    from lsjax.convert import convert_hf
    from tiny import make_hf_model

    make_hf_model(tmp_path / "hf")
    convert_hf(tmp_path / "hf", tmp_path / "ckpt", progress=False)
    procs = _two_processes(tmp_path / "ckpt", _free_port(), "--slots", "1", "--max-len", "128")
    try:
        assert all(p.poll() is None for p in procs), procs[0].stderr.read()[-2000:]
        procs[1].kill()
        start = time.time()
        err = procs[0].communicate(timeout=60)[1]
        assert procs[0].returncode == 2 and time.time() - start < 30, err[-2000:]
        assert "lsjax serve: error: process 0: the engine of 2 processes stopped: " in err
        assert "did another process end? start them all again" in err
    finally:
        for p in procs:
            p.kill()
