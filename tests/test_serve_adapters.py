"""Many adapters in one decode batch (`lsjax.adapters.table`): every row against `Generator` on that
request with its adapter alone, and the table's refusals."""

import dataclasses
import threading

import numpy as np
import pytest

from lsjax.adapters import AdapterError
from lsjax.adapters.table import AdapterTable, TableRoom
from lsjax.config import ModelConfig
from lsjax.decoder import Decoder
from lsjax.errors import ConfigError
from lsjax.generate import Generator
from lsjax.serve import AdapterInUse, Engine, EngineConfig, Request, UnknownAdapter
from test_generate import BACKEND, random_adapter

SMALL = EngineConfig(slots=4, max_len=64, prefill_chunk=16)
NAMES = ("s1", "s2", "s3", "l1", None)  # three switch adapters of different shapes, a LoRA, the base


@pytest.fixture(scope="module")
def adapters(tiny_llama):
    _, model, _ = tiny_llama
    return {"s1": random_adapter(model, "switch"),
            "s2": random_adapter(model, "switch", num_experts=4, top_k=1, rank=2),
            "s3": random_adapter(model, "switch", targets=["q", "v", "down"], num_experts=6, top_k=3),
            "l1": random_adapter(model, "lora", targets=["q", "k", "v", "o", "gate", "down"]),
            "l2": random_adapter(model, "lora", targets=["q", "v"], rank=3)}


@pytest.fixture(scope="module")
def references(tiny_llama, adapters):
    """Each adapter alone (and the base), as `Generator` decodes it."""
    _, model, tok = tiny_llama
    cache = {}

    def alone(name, request, text=False):
        """Its token ids, or (`text`) its text with the model's own stops, as a server answers."""
        if name not in cache:
            cache[name] = Generator(model, tok, None if name is None else adapters[name], strategy="unmerged",
                                    backend=BACKEND)
        if text:
            return cache[name].generate([list(request.prompt)], max_new_tokens=request.max_tokens).texts[0]
        return cache[name].generate([list(request.prompt)], max_new_tokens=request.max_tokens,
                                    stop_token_ids=()).token_ids[0]
    return alone


def requests(n: int, names, seed: int = 0, longest: int = 20):
    rng = np.random.default_rng(seed)
    return [Request(tuple(int(t) for t in rng.integers(3, 120, size=int(rng.integers(1, 30)))),
                    max_tokens=int(rng.integers(4, longest)), stop_ids=(), adapter=names[i % len(names)])
            for i in range(n)]


def staggered(engine, batch, burst: int = 2):
    handles = []
    for i in range(0, len(batch), burst):
        with engine.wake:  # queued together: prefilled together where their padded lengths match
            handles += [engine.submit(r) for r in batch[i:i + burst]]
        threading.Event().wait(0.01)
    return handles


@pytest.mark.parametrize("strategy", ["unmerged", "fused"])
def test_rows_of_different_adapters_decode_as_each_alone(tiny_llama, adapters, references, strategy):
    """16 staggered requests over 3 switch adapters, a LoRA and the base, through 4 slots: each greedy
    output equals its adapter alone, token for token, and nothing compiles after the warm-up."""
    _, model, tok = tiny_llama
    table = AdapterTable.of(model.config, {n: adapters[n] for n in NAMES if n})
    engine = Engine(Decoder(model, table, strategy=strategy, backend=BACKEND, rows=SMALL.slots), tok, SMALL).start()
    try:
        engine.warmup()
        compiled = engine.compile_count()
        batch = requests(16, NAMES)
        got = [h.result(timeout=300) for h in staggered(engine, batch)]
        assert engine.stats["grouped"] > 0  # prompts of different adapters shared prefill calls
        for request, completion in zip(batch, got):
            assert completion.token_ids == references(request.adapter, request), request
        assert engine.compile_count() == compiled
    finally:
        engine.stop()


def test_load_and_unload_while_others_stream(tiny_llama, adapters, references):
    """An adapter loaded into free room while requests stream, used, and unloaded: no streaming
    request's tokens change, nothing compiles; an unload of an adapter in use is refused."""
    _, model, tok = tiny_llama
    room = TableRoom.fitting([a.config for a in adapters.values()], adapters=3)
    table = AdapterTable.of(model.config, {"s1": adapters["s1"], "l1": adapters["l1"]}, room)
    engine = Engine(Decoder(model, table, strategy="unmerged", backend=BACKEND, rows=SMALL.slots), tok, SMALL).start()
    try:
        engine.warmup()
        compiled = engine.compile_count()
        first = requests(8, ("s1", "l1", None), seed=1, longest=30)
        handles = staggered(engine, first)
        engine.load_adapter("s2", adapters["s2"])  # while the first requests stream
        second = requests(4, ("s2",), seed=2)
        handles += staggered(engine, second)
        with pytest.raises(AdapterInUse, match="'s2' is in use"):
            engine.unload_adapter("s2")
        results = [h.result(timeout=300) for h in handles]
        engine.unload_adapter("s2")
        engine.load_adapter("l2", adapters["l2"])  # into the room s2 left
        third = requests(4, ("l2", "s1"), seed=3)
        results += [h.result(timeout=300) for h in staggered(engine, third)]
        for request, completion in zip(first + second + third, results):
            assert completion.token_ids == references(request.adapter, request), request
        assert engine.compile_count() == compiled
        with pytest.raises(UnknownAdapter, match="'s2' is not loaded"):
            engine.submit(Request((5, 6), adapter="s2"))
    finally:
        engine.stop()


def test_what_a_table_refuses(tiny_llama, adapters):
    _, model, _ = tiny_llama
    room = TableRoom(adapters=2, experts=4, top_k=2, rank=2, targets=["q", "k", "v", "gate", "up", "down"])
    table = AdapterTable(model.config, room)
    with pytest.raises(AdapterError, match="'s1' has 8 experts; the table has room for 4"):
        table.load("s1", adapters["s1"])
    with pytest.raises(AdapterError, match="'l1' has rank 4; the table's largest rank is 2"):
        table.load("l1", adapters["l1"])
    lora = random_adapter(model, "lora", rank=2, targets=["q", "o"])
    with pytest.raises(AdapterError, match=r"targets \['o'\]; the table holds"):
        table.load("lora", lora)
    with pytest.raises(AdapterError, match="'lw' is 'layerwise'.*served alone"):
        table.load("lw", random_adapter(model, "layerwise", rank=2, num_experts=4))
    switch = random_adapter(model, "switch", targets=["gate", "up"], num_experts=4, rank=2)
    with pytest.raises(AdapterError, match="routes on the input of 'gate_up'; the table's router reads 'qkv'"):
        table.load("ffn", switch)
    other = dataclasses.replace(model.config, vocab_size=model.config.vocab_size + 1)
    assert isinstance(other, ModelConfig)
    stranger = random_adapter(model, "lora", rank=2, targets=["q"])
    stranger.model_config = other
    with pytest.raises(AdapterError, match="made for another base model"):
        table.load("stranger", stranger)
    fits = random_adapter(model, "switch", num_experts=4, rank=2, targets=["q", "v", "down"])
    table.load("a", fits)
    with pytest.raises(AdapterError, match="'a' is already loaded"):
        table.load("a", fits)
    table.load("b", random_adapter(model, "lora", rank=2, targets=["q"]))
    with pytest.raises(AdapterError, match="all 2 adapter slots are in use"):
        table.load("c", random_adapter(model, "lora", rank=2, targets=["q"]))
    with pytest.raises(AdapterError, match="'c' is not loaded"):
        table.unload("c")
    with pytest.raises(ConfigError, match="strategy 'merged'"):
        Decoder(model, table, strategy="merged", backend="xla")


def test_what_a_server_serves(tiny_llama, adapters):
    """A lone layer-wise adapter is served on its own; beside others, or with run-time loading, it is
    refused at start-up naming it; switch and LoRA adapters share a table with the base."""
    from lsjax.adapters.table import served

    _, model, _ = tiny_llama
    lw = random_adapter(model, "layerwise")
    assert served(model.config, {}) is None
    assert served(model.config, {"lw": lw}) is lw
    with pytest.raises(AdapterError, match="'lw' is 'layerwise'.*cannot share a batch"):
        served(model.config, {"lw": lw, "s1": adapters["s1"]})
    with pytest.raises(AdapterError, match="'lw' is 'layerwise'"):
        served(model.config, {"lw": lw}, runtime=True)
    with pytest.raises(AdapterError, match="max_adapters=1 has no room for the 2 adapters"):
        served(model.config, {"s1": adapters["s1"], "l1": adapters["l1"]}, room={"adapters": 1})
    table = served(model.config, {"s1": adapters["s1"]}, runtime=True, room={"adapters": 3, "rank": 8})
    assert isinstance(table, AdapterTable) and table.room.adapters == 3 and table.room.rank == 8
    assert sorted(table.names) == ["s1"]


@pytest.fixture(scope="module")
def live(tiny_llama, adapters, tmp_path_factory):
    """Two servers over one engine of a table (s1 and l1 loaded, room for 3): one loads adapters at
    run time, one does not; and s2 and a mismatched adapter saved to folders."""
    from lsjax.adapters import save_adapter
    from lsjax.serve.server import server

    _, model, tok = tiny_llama
    room = TableRoom.fitting([a.config for a in adapters.values()], adapters=3)
    table = AdapterTable.of(model.config, {"s1": adapters["s1"], "l1": adapters["l1"]}, room)
    engine = Engine(Decoder(model, table, strategy="unmerged", backend=BACKEND, rows=4), tok,
                    EngineConfig(slots=4, max_len=128, prefill_chunk=16)).start()
    engine.warmup()
    folders = tmp_path_factory.mktemp("adapters")
    save_adapter(folders / "s2", adapters["s2"])
    save_adapter(folders / "l2", adapters["l2"])
    urls, servers = [], []
    for runtime in (True, False):
        srv = server(engine, "base", "127.0.0.1", 0, allow_runtime_adapters=runtime)
        threading.Thread(target=srv.run, daemon=True).start()
        while not srv.started:
            threading.Event().wait(0.01)
        servers.append(srv)
        urls.append(f"http://127.0.0.1:{srv.servers[0].sockets[0].getsockname()[1]}")
    yield engine, urls, folders
    for srv in servers:
        srv.should_exit = True
    engine.stop()


def test_server_routes_each_request_to_its_model(live, references):
    import httpx
    import openai

    engine, (url, _), folders = live
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
    models = {m.id: m for m in client.models.list().data}
    assert list(models) == ["base", "l1", "s1"]
    assert models["s1"].parent == "base" and models["s1"].method == "switch" and models["base"].parent is None
    prompt = [7, 30, 31, 90, 4]
    for model, name in (("base", None), ("s1", "s1"), ("l1", "l1")):
        got = client.completions.create(model=model, prompt=prompt, max_tokens=6, temperature=0)
        assert got.choices[0].text == references(name, Request(tuple(prompt), 6), text=True)
        assert got.model == model
    assert httpx.post(url + "/v1/load_lora_adapter", json={"lora_name": "s2", "lora_path": str(folders / "s2")}
                      ).status_code == 200
    got = client.completions.create(model="s2", prompt=prompt, max_tokens=6, temperature=0)
    assert got.choices[0].text == references("s2", Request(tuple(prompt), 6), text=True)
    assert httpx.post(url + "/v1/unload_lora_adapter", json={"lora_name": "s2"}).status_code == 200
    assert "s2" not in [m.id for m in client.models.list().data]


def test_adapter_requests_refused_naming_the_adapter(live, tiny_llama, tmp_path):
    """Each bad adapter request is a 4xx naming the field or the adapter; the server serves on."""
    import httpx

    from lsjax.adapters import save_adapter

    engine, (url, closed), folders = live
    _, model, _ = tiny_llama
    from flax import nnx

    from lsjax.adapters import Adapter, AdapterConfig

    fewer_layers = dataclasses.replace(model.config, num_layers=model.config.num_layers - 1)
    save_adapter(tmp_path / "other", Adapter(fewer_layers, AdapterConfig(method="lora", targets=["q"]),
                                             rngs=nnx.Rngs(0)))
    big = random_adapter(model, "lora", rank=9, targets=["q"])
    save_adapter(tmp_path / "big", big)
    load, unload = url + "/v1/load_lora_adapter", url + "/v1/unload_lora_adapter"
    cases = [  # (url, body, status, what the message names)
        (url + "/v1/completions", {"model": "nope", "prompt": "ab", "max_tokens": 2}, 404, "'nope'"),
        (url + "/v1/chat/completions", {"model": "gone", "messages": [{"role": "user", "content": "a"}]}, 404,
         "'gone'"),
        (load, {"lora_name": "x", "lora_path": str(tmp_path / "missing")}, 400, "missing"),
        (load, {"lora_name": "x", "lora_path": str(tmp_path / "other")}, 400, "num_layers"),
        (load, {"lora_name": "x", "lora_path": str(tmp_path / "big")}, 400, "rank 9"),
        (load, {"lora_name": "s1", "lora_path": str(folders / "s2")}, 400, "'s1' is already loaded"),
        (load, {"lora_name": "base", "lora_path": str(folders / "s2")}, 400, "base model's name"),
        (load, {"lora_name": "x"}, 400, "lora_path"),
        (load, {"lora_name": "x", "lora_path": "p", "extra": 1}, 400, "extra"),
        (unload, {"lora_name": "nope"}, 404, "'nope' is not loaded"),
        (closed + "/v1/load_lora_adapter", {"lora_name": "x", "lora_path": str(folders / "s2")}, 404,
         "--allow-runtime-adapters"),
    ]
    for target, body, status, named in cases:
        response = httpx.post(target, json=body, timeout=60)
        assert response.status_code == status, (body, response.text)
        assert named in response.json()["error"]["message"] + str(response.json()["error"]["param"]), response.text
    # the table full: s2 into the third slot, then one more
    assert httpx.post(load, json={"lora_name": "s2", "lora_path": str(folders / "s2")}).status_code == 200
    full = httpx.post(load, json={"lora_name": "l2", "lora_path": str(folders / "l2")})
    assert full.status_code == 400 and "all 3 adapter slots are in use" in full.json()["error"]["message"]
    # an unload of an adapter a request still decodes with (held at its first token)
    release = threading.Event()
    held = engine.submit(Request((5, 6, 7), max_tokens=4, adapter="s2"), listener=lambda event: release.wait(60))
    busy = httpx.post(unload, json={"lora_name": "s2"})
    release.set()
    assert busy.status_code == 409 and "'s2' is in use by 1 request" in busy.json()["error"]["message"]
    held.done.wait(60)
    assert httpx.post(unload, json={"lora_name": "s2"}).status_code == 200
    ok = httpx.post(url + "/v1/completions", json={"model": "s1", "prompt": "ab", "max_tokens": 2})
    assert ok.status_code == 200


def test_serve_command_refuses_bad_adapter_and_device_flags(tmp_path, capsys):
    from lsjax.cli import main

    for args, named in ((["--adapter", "=x"], "expected NAME=DIR or DIR"),
                        (["--adapter", f"a={tmp_path}", "--adapter", f"a={tmp_path}"], "two adapters share a name"),
                        (["--tensor-parallel", "64"], "tensor parallel 64: this process sees")):
        assert main(["serve", "--ckpt", str(tmp_path), *args]) == 2
        assert named in capsys.readouterr().err
