"""The continuous-batching engine against `Generator` on each request alone (the reference)."""

import threading
import time

import numpy as np
import pytest

from lsjax.decoder import Decoder
from lsjax.errors import ConfigError
from lsjax.generate import Generator
from lsjax.sampling import SamplingConfig
from lsjax.serve import Engine, EngineConfig, Request
from test_generate import BACKEND, random_adapter

# 4 slots of 64 columns, prompts prefilled in 16-token chunks: requests wait for slots, and every
# slot serves several requests
SMALL = EngineConfig(slots=4, max_len=64, prefill_chunk=16)


def workload(n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    return [Request(tuple(int(t) for t in rng.integers(3, 120, size=int(rng.integers(1, 30)))),
                    max_tokens=int(rng.integers(1, 20)), stop_ids=()) for _ in range(n)]


def alone(generator, request: Request, **kwargs):
    return generator.generate([list(request.prompt)], max_new_tokens=request.max_tokens,
                              stop_token_ids=request.stop_ids, **kwargs)


def submit_staggered(engine, requests, gap: float = 0.01, burst: int = 1):
    """Submit `burst` requests at once (queued together: prefilled together where their padded
    lengths match), then wait `gap`."""
    handles = []
    for i in range(0, len(requests), burst):
        with engine.wake:
            handles += [engine.submit(r) for r in requests[i:i + burst]]
        time.sleep(gap)
    return [h.result(timeout=300) for h in handles]



def reference(engine) -> Generator:
    """A `Generator` over the engine's own decoder: each request decoded alone, the reference."""
    return Generator.of(engine.decoder, engine.tokenizer)

@pytest.fixture(scope="module", params=["base", "switch", "lora", "layerwise", "blockwise"])
def engine(request, tiny_llama):
    _, model, tok = tiny_llama
    adapter = None if request.param == "base" else random_adapter(model, request.param)
    generator = Generator(model, tok, adapter, strategy="unmerged" if request.param != "lora" else "auto",
                          backend=BACKEND)
    engine = Engine(generator.decoder, generator.tokenizer, SMALL).start()
    engine.warmup()
    yield engine
    engine.stop()


@pytest.mark.parametrize("burst", [1, 4])
def test_each_request_decodes_as_it_would_alone(engine, burst):
    """16 requests of different lengths arriving at different times (one by one, or four at a time:
    prefilled together), 4 slots: every greedy output equals `Generator.generate` on that request
    alone, and nothing compiles after the warm-up."""
    compiled = engine.compile_count()
    requests = workload(16)
    grouped = engine.stats["grouped"]
    got = submit_staggered(engine, requests, burst=burst)
    assert burst == 1 or engine.stats["grouped"] > grouped  # some prompts shared a prefill call
    for request, completion in zip(requests, got):
        want = alone(reference(engine), request)
        assert completion.token_ids == want.token_ids[0], request
        assert completion.finish_reason == "length"
    assert engine.compile_count() == compiled
    assert engine.active() == 0


def test_sampling_depends_only_on_the_request(engine):
    """A sampled request gives the same tokens alone and in a crowd (its seed and index make its key);
    top_k=1 sampling is greedy decoding."""
    sampled = Request((5, 6, 7, 8), max_tokens=12, stop_ids=(),
                      sampling=SamplingConfig(temperature=1.0, top_p=0.9, seed=3))
    solo = engine.generate(sampled).token_ids
    crowd = submit_staggered(engine, workload(6, seed=1)[:3] + [sampled] + workload(6, seed=2)[:3], gap=0)
    assert crowd[3].token_ids == solo
    other_seed = Request(sampled.prompt, max_tokens=12, stop_ids=(),
                         sampling=SamplingConfig(temperature=1.0, top_p=0.9, seed=4))
    assert engine.generate(other_seed).token_ids != solo
    top1 = Request(sampled.prompt, max_tokens=12, stop_ids=(), sampling=SamplingConfig(temperature=1.0, top_k=1))
    assert engine.generate(top1).token_ids == alone(reference(engine), top1).token_ids[0]


def test_logprobs_stops_and_text(engine):
    """Logprobs (asked by one row of a crowd), stop ids and stop strings as `Generator` gives them;
    alternatives are the likeliest tokens."""
    request = Request((9, 10, 11), max_tokens=10, stop_ids=(), logprobs=3)
    with engine.wake:  # queued with two requests that want no logprobs
        got = engine.submit(request)
        others = [engine.submit(Request((12, 13, 14), max_tokens=10, stop_ids=())) for _ in range(2)]
    events = list(got)
    assert all(o.result(timeout=60).logprobs is None for o in others)
    want = alone(reference(engine), request, logprobs=True)
    np.testing.assert_allclose([e.logprob for e in events], want.logprobs[0], atol=1e-4)
    for e in events:
        assert len(e.top_logprobs) == 3 and e.top_logprobs[0][1] >= e.logprob - 1e-5
        assert [p for _, p in e.top_logprobs] == sorted((p for _, p in e.top_logprobs), reverse=True)

    plain = engine.generate(Request((9, 10, 11), max_tokens=10, stop_ids=()))
    stop_id = plain.token_ids[3]
    stopped = engine.generate(Request((9, 10, 11), max_tokens=10, stop_ids=(stop_id,)))
    assert stopped.token_ids == plain.token_ids[:plain.token_ids.index(stop_id) + 1]
    assert stopped.finish_reason == "stop"

    # a stop string: a character first seen after the start of some prompt's greedy text
    for prompt in [(9, 10, 11), (20, 21, 22), (40, 41, 42, 43), (5, 6, 7), (60, 61)]:
        text = engine.generate(Request(prompt, max_tokens=16, stop_ids=())).text
        needle = next((c for i, c in enumerate(text) if c.isascii() and c.isprintable() and text.find(c) == i > 0),
                      None)
        if needle:
            break
    assert needle, "no prompt gave text to cut"
    cut = engine.generate(Request(prompt, max_tokens=16, stop_ids=(), stop_strings=(needle,)))
    want = alone(reference(engine), Request(prompt, max_tokens=16, stop_ids=()), stop_strings=[needle])
    assert cut.text == want.texts[0] == text[:text.find(needle)]
    assert cut.finish_reason == "stop"


def test_prompts_are_scored_on_the_prefill_path(engine):
    """`prompt_logprobs`: every prompt token after the first gets the log-probability a whole-sequence
    forward (no cache, no chunks) gives it, with the likeliest alternatives; a 40-token prompt crosses
    three 16-token prefill chunks. With max_tokens 0 nothing is generated and no slot is taken; with
    tokens to generate, they are those of the same request unscored. Nothing compiles after warm-up."""
    import jax

    from lsjax.adapters import adapted_forward
    from lsjax.model import forward

    compiled = engine.compile_count()
    decoder = engine.decoder
    rng = np.random.default_rng(7)
    prompt = tuple(int(t) for t in rng.integers(3, 120, size=40))
    short = (9, 10, 11)
    with engine.wake:  # two scored prompts of different lengths, queued with an unscored one
        handles = [engine.submit(Request(p, max_tokens=0, prompt_logprobs=2)) for p in (prompt, short)]
        plain = engine.submit(Request(prompt, max_tokens=5, stop_ids=()))
    ids = np.asarray([prompt], np.int32)
    base, arrays = decoder.bundle["base"], decoder.bundle["adapter"]  # (lora merged: the merged weights alone)
    if arrays is None:
        logits = forward(decoder.config, base, ids)
    else:
        logits = adapted_forward(decoder.config, base, decoder.adapter_config, arrays, ids)[0]
    logp = np.asarray(jax.nn.log_softmax(logits[0], axis=-1))
    for handle, p in zip(handles, (prompt, short)):
        done = handle.result(timeout=120)
        assert done.token_ids == [] and done.finish_reason == "length"
        scores = handle.prompt_scores
        assert len(scores) == len(p) and scores[0] is None
        for k, (lp, alternatives) in enumerate(scores[1:], 1):
            (_, best), (_, second) = alternatives
            assert best >= second and best >= lp - 1e-5
            if p is prompt:
                np.testing.assert_allclose(lp, logp[k - 1, p[k]], atol=2e-4)
                assert alternatives[0][0] == int(np.argmax(logp[k - 1]))
    scored = engine.generate(Request(prompt, max_tokens=5, stop_ids=(), prompt_logprobs=0))
    assert scored.token_ids == plain.result(timeout=120).token_ids
    assert engine.compile_count() == compiled and engine.active() == 0


def test_cancel_frees_the_slot(engine):
    """A cancelled request ends at once as `cancelled`; its slot serves the next request correctly."""
    long = Request((3, 4, 5), max_tokens=40, stop_ids=())
    handles = [engine.submit(long) for _ in range(SMALL.slots)]
    seen = threading.Event()
    waiting = engine.submit(Request((7, 8), max_tokens=5, stop_ids=()))
    for h in handles:
        for event in h:
            seen.set()
            break
        h.cancel()
    results = [h.result(timeout=60) for h in handles]
    assert seen.is_set() and all(r.finish_reason == "cancelled" and len(r.token_ids) < 40 for r in results)
    assert waiting.result(timeout=60).token_ids == alone(reference(engine), waiting.request).token_ids[0]
    deadline = time.time() + 10
    while engine.active() and time.time() < deadline:
        time.sleep(0.01)
    assert engine.active() == 0


def test_bad_requests_name_the_field(tiny_llama):
    _, model, tok = tiny_llama
    cases = [(dict(prompt=()), "prompt"), (dict(prompt=(1,), max_tokens=0), "max_tokens"),
             (dict(prompt=(1,), logprobs=9), "logprobs"), (dict(prompt=(1, -2)), "prompt"),
             (dict(prompt=(1,), stop_strings=(3,)), "stop")]
    for fields, field in cases:
        with pytest.raises(ConfigError) as e:
            Request(**fields)
        assert e.value.field == field and field in str(e.value)
    engine = Engine(Decoder(model), tok, SMALL)
    with pytest.raises(ConfigError, match="past the context of 64") as e:
        engine.check(Request(tuple(range(3, 40)), max_tokens=40))
    assert e.value.field == "max_tokens"
    with pytest.raises(ConfigError, match="vocabulary") as e:
        engine.check(Request((1, 500)))
    with pytest.raises(ConfigError, match="slots") as e:
        EngineConfig(slots=0)
    with pytest.raises(ConfigError, match="max_len"):
        EngineConfig(max_len=100, prefill_chunk=64)
    with pytest.raises(ConfigError, match="prefill_rows=3 is invalid; expected a power of two"):
        EngineConfig(prefill_rows=3)
    assert EngineConfig(slots=3, prefill_rows=8).group_sizes() == (1, 2)  # no group larger than the slots


def test_cancel_while_prefilled_with_another(tiny_llama):
    """Two prompts prefilled together, one cancelled between its chunks: it ends as cancelled, the
    other decodes as it would alone. (The loop is stepped by hand to cancel mid-prefill.)"""
    _, model, tok = tiny_llama
    generator = Generator(model, tok)
    engine = Engine(generator.decoder, generator.tokenizer,
                    EngineConfig(slots=4, max_len=64, prefill_chunk=16, prefill_chunks_per_step=1))
    first, second = (engine.submit(Request(tuple(range(s, s + 40)), max_tokens=6, stop_ids=())) for s in (3, 50))
    engine._intake()  # both taken in
    engine._admit()  # the first of three chunks of both prompts
    assert engine.prefilling.handles == [first, second] and not engine.waiting
    first.cancel()
    engine.start()
    assert first.result(timeout=60).finish_reason == "cancelled" and first.result().token_ids == []
    assert second.result(timeout=60).token_ids == alone(generator, second.request).token_ids[0]
    engine.stop()
    assert engine.stats["inserted"] == 1


def test_stop_ends_everything_in_flight(tiny_llama):
    _, model, tok = tiny_llama
    engine = Engine(Decoder(model), tok, SMALL).start()
    handles = [engine.submit(Request((3, 4, 5), max_tokens=40, stop_ids=())) for _ in range(6)]
    next(iter(handles[0]))
    engine.stop()
    assert all(h.result(timeout=10).finish_reason in ("cancelled", "length") for h in handles)
    assert any(h.result().finish_reason == "cancelled" for h in handles)


def test_bench_serve_counts_every_requested_token(tmp_path):
    """`lsjax bench serve` end to end on a tiny model: each level serves every request of the
    workload to its full length, and the ratios come from the same run's figures."""
    import json

    from lsjax.cli import main
    from lsjax.convert import convert_hf
    from lsjax.eval.serving import workload
    from tiny import make_hf_model

    make_hf_model(tmp_path / "hf", vocab_size=256)
    convert_hf(tmp_path / "hf", tmp_path / "ckpt", progress=False)
    out = tmp_path / "serve.json"
    assert main(["bench", "serve", "--ckpt", str(tmp_path / "ckpt"), "--clients", "2", "--per-client", "2",
                 "--max-prompt", "20", "--max-output", "12", "--max-len", "64", "--prefill-chunk", "16",
                 "--stagger-ms", "0", "--experts", "4", "--rank", "4", "--adapters", "3", "--json", str(out),
                 "--plot", str(tmp_path / "serve.png")]) == 0
    saved = json.loads(out.read_text())
    records = saved["records"]
    assert sorted((r["method"], r["clients"]) for r in records) == [("base", 2), ("switch", 2), ("switch x 3", 2)]
    # each level's decoder is chosen for the rows its engine steps
    assert sorted(saved["meta"]["backend"]) == ["base @ 2", "switch @ 2", "switch x 3 @ 2"]
    for r in records:
        requests = workload(r["clients"] * 2, 256, 20, 12, seed=r["clients"])
        assert r["requests"] == len(requests) and r["tokens"] == sum(q.max_tokens for q in requests)
        assert r["ratio_to_base"] > 0
        assert r["itl_p99_ms"] >= r["itl_p50_ms"] > 0 and r["ttft_p99_ms"] >= r["ttft_p50_ms"] > 0
        assert r["tokens_per_s"] > 0 and r["end_to_end_tokens_per_s"] > 0
        assert (r["static_tokens_per_s"] > 0) == (r["method"] != "switch x 3")  # no static batch mixes adapters
    single, table = (next(r for r in records if r["method"] == m) for m in ("switch", "switch x 3"))
    assert table["ratio_to_single"] == pytest.approx(table["tokens_per_s"] / single["tokens_per_s"])
    assert (tmp_path / "serve.png").stat().st_size > 0


def test_serve_ratios_are_to_the_base_with_as_many_clients():
    import math

    from lsjax.eval.serving import ServeRecord, set_ratios_to_base

    def record(method, clients, tokens_per_s):
        return ServeRecord(method, clients, 4, 40, tokens_per_s, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0)

    records = [record("switch", 2, 80.0), record("base", 2, 100.0), record("base", 8, 50.0), record("switch", 8, 45.0),
               record("switch", 32, 10.0), record("switch x 4", 8, 36.0), record("lora x 4", 8, 30.0)]
    set_ratios_to_base(records)
    assert [r.ratio_to_base for r in records[:4]] == pytest.approx([0.8, 1.0, 1.0, 0.9])
    assert math.isnan(records[4].ratio_to_base)  # no base at 32 clients
    assert records[5].ratio_to_single == pytest.approx(0.8)  # over switch's single adapter at 8 clients
    assert math.isnan(records[6].ratio_to_single) and math.isnan(records[3].ratio_to_single)


def test_decoder_insert_places_prefilled_rows_into_slots(tiny_llama):
    """The decode API the engine drives: two prompts prefilled on their own and inserted into slots
    2 and 0 of an empty 3-slot state decode the next token with the logits of the two prompts
    prefilled and stepped as one batch (a switch adapter: each row routed on its own)."""
    import jax.numpy as jnp

    from lsjax.decode import left_pad

    _, model, _ = tiny_llama
    decoder = Decoder(model, random_adapter(model, "switch", num_experts=4, top_k=2), strategy="unmerged",
                      backend=BACKEND)
    prompts = [[5, 6, 7, 8], [9, 10, 11, 12]]
    ids, mask = left_pad(prompts)
    logits, cache = decoder.prefill(ids, mask, decoder.empty_cache(2, 32))
    tokens = jnp.argmax(logits, -1).astype(jnp.int32)
    want, _ = decoder.step(tokens, cache)
    slots = decoder.empty_cache(3, 32, row_lengths=True)
    for slot, prompt in zip((2, 0), prompts):
        one_ids, one_mask = left_pad([prompt])
        _, one = decoder.prefill(one_ids, one_mask, decoder.empty_cache(1, 32))
        slots = decoder.insert(slots, one, jnp.int32(slot), jnp.int32(0))
    got, _ = decoder.step(jnp.asarray([tokens[1], 0, tokens[0]], jnp.int32), slots)
    np.testing.assert_allclose(np.asarray(got)[[2, 0]], np.asarray(want), rtol=1e-5, atol=1e-5)


def test_merged_switch_serves_one_slot_only(tiny_llama):
    _, model, tok = tiny_llama
    decoder = Decoder(model, random_adapter(model, "switch", num_experts=4, top_k=2), strategy="merged")
    with pytest.raises(ConfigError, match="one sequence at a time .* slots of 2") as error:
        Engine(decoder, tok, EngineConfig(slots=2, max_len=64, prefill_chunk=16))
    assert error.value.field == "slots"
    Engine(decoder, tok, EngineConfig(slots=1, max_len=64, prefill_chunk=16))  # one slot is fine


def test_a_lockstep_link_needs_processes_and_carries_requests_whole():
    """A lockstep engine's link refuses a single-process runtime by name; a request crosses it as JSON
    and comes back equal (sampling, stops, logprobs, adapter)."""
    import json

    from lsjax.serve import Lockstep

    with pytest.raises(ConfigError, match="jax.distributed.initialize"):
        Lockstep()
    request = Request((5, 6, 7), max_tokens=9, sampling=SamplingConfig(temperature=0.7, top_k=3, top_p=0.9, seed=4),
                      stop_ids=(2,), stop_strings=("\n\n",), logprobs=2, prompt_logprobs=1, adapter="sw")
    assert Request.from_dict(json.loads(json.dumps(request.to_dict()))) == request
    plain = Request((1,))
    assert Request.from_dict(json.loads(json.dumps(plain.to_dict()))) == plain
