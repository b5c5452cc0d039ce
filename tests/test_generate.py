"""Generation: greedy parity with transformers, cached steps vs full forward, strategies agree,
no recompiles, stop handling, streaming, and a clear error for each bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from tiny import make_hf_model

import lsjax
from lsjax import native
from lsjax.adapters import Adapter, AdapterConfig, AdapterError
from lsjax.config import ModelConfig
from lsjax.convert import convert_hf
from lsjax.decode import decode_step, init_cache, left_pad, prefill
from lsjax.errors import ConfigError
from lsjax.generate import Generator
from lsjax.model import forward, stack_layers
from lsjax.sampling import SamplingConfig

PROMPTS = [[5, 6, 7, 8, 9, 10, 11, 12, 13], [20, 21, 22], [40, 41, 42, 43, 44]]
# What tests of strategies (not of `auto`, which test_autotune.py tests) decode on: one backend,
# named, so they run the same products on every run instead of the one timed faster this time.
BACKEND = "native" if native.available() else "xla"


@pytest.fixture(scope="module", params=["llama", "mistral"])
def tiny(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(request.param)
    extra = {"sliding_window": 12} if request.param == "mistral" else {}
    hf = make_hf_model(root / "hf", model_type=request.param, **extra)
    convert_hf(root / "hf", root / "ckpt", progress=False)
    model, tok = lsjax.load(root / "ckpt")
    return hf, model, tok


def random_adapter(model, method, **kwargs):
    """An adapter with every tensor random (B nonzero), so the routed term matters."""
    cfg = AdapterConfig(method=method, **{"rank": 4, "targets": "all-linear", **kwargs})
    adapter = Adapter(model.config, cfg, rngs=nnx.Rngs(1))
    leaves, treedef = jax.tree.flatten(adapter.arrays())
    keys = jax.random.split(jax.random.key(7), len(leaves))
    noisy = [x + 0.1 * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)]
    return Adapter.from_arrays(model.config, cfg, jax.tree.unflatten(treedef, noisy))


def test_greedy_matches_transformers(tiny):
    hf, model, tok = tiny
    out = Generator(model, tok).generate(PROMPTS, max_new_tokens=32, stop_token_ids=())
    for prompt, got in zip(PROMPTS, out.token_ids):
        want = hf.generate(torch.tensor([prompt]), max_new_tokens=32, do_sample=False, eos_token_id=None,
                           pad_token_id=0)[0, len(prompt):].tolist()
        assert got == want
    assert out.finish_reasons == ["length"] * 3


def greedy_steps(step, state, logits, cache, n):
    """`n` greedy decode steps from prefill's `logits`: (every step's logits, prefill's included;
    the tokens fed, one array per step; the final cache)."""
    seen, generated = [logits], []
    for _ in range(n):
        tokens = jnp.argmax(logits, -1).astype(jnp.int32)
        generated.append(np.asarray(tokens))
        logits, cache = step(state, tokens, cache)
        seen.append(logits)
    return seen, generated, cache


def finished_batch(prompts, continuations):
    """Right-padded ids and mask of each prompt followed by its row of `continuations` (token lists)."""
    seqs = [list(p) + list(c) for p, c in zip(prompts, continuations)]
    width = max(map(len, seqs))
    ids = np.array([s + [0] * (width - len(s)) for s in seqs])
    return ids, np.array([[1] * len(s) + [0] * (width - len(s)) for s in seqs])


def assert_steps_match(prompts, seen, full):
    """Step i's logits of each row equal the full forward at that row's position len(prompt) - 1 + i."""
    for row, prompt in enumerate(prompts):
        for i, step_logits in enumerate(seen):
            assert np.abs(np.asarray(step_logits[row]) - full[row, len(prompt) - 1 + i]).max() <= 1e-4, (row, i)


@pytest.mark.parametrize("layout", ["stacked", "per-layer"])
def test_decode_steps_match_full_forward(tiny, layout):
    """Every step's logits against one full forward over the finished sequences (causal: same thing).

    `stacked`: scanned layers and a `[L, ...]` cache; `per-layer`: the held params and a cache of one
    buffer per layer (the Generator's decode layout), whose layout must survive every step.
    """
    _, model, _ = tiny
    cfg, params = model.config, model.params()
    full_params = params
    per_layer = layout == "per-layer"
    if not per_layer:
        params = stack_layers(params)
    ids, mask = left_pad(PROMPTS)
    logits, cache = prefill(cfg, params, ids, mask, init_cache(cfg, len(PROMPTS), 32, stacked=not per_layer))
    assert cache.k.stacked != per_layer and len(jax.tree.leaves(cache.k)) == (1 if not per_layer else cfg.num_layers)
    assert cache.capacity == 32
    step = jax.jit(lambda p, t, c: decode_step(cfg, p, t, c), donate_argnums=2)
    seen, generated, cache = greedy_steps(step, params, logits, cache, 8)
    assert cache.k.stacked != per_layer and len(jax.tree.leaves(cache.k)) == (1 if not per_layer else cfg.num_layers)
    assert int(cache.length) == ids.shape[1] + 8
    assert_steps_match(PROMPTS, seen,
                       np.asarray(forward(cfg, full_params, *finished_batch(PROMPTS, np.stack(generated, 1).tolist()))))


@pytest.mark.parametrize("method", ["switch", "lora", "switch-ffn"])
def test_strategies_agree(tiny_llama, method):
    """`switch-ffn`: the router reads the input of layer 0's first adapted group (gate|up), which
    the merged step computes with the plain attention of layer 0 before merging."""
    _, model, tok = tiny_llama
    method, _, ffn = method.partition("-")
    kwargs = {"num_experts": 4, "top_k": 2} if method == "switch" else {}
    adapter = random_adapter(model, method, **kwargs, **({"targets": ("gate", "up", "down")} if ffn else {}))
    got = {s: Generator(model, tok, adapter, strategy=s, backend=BACKEND).generate(
        [PROMPTS[0]], max_new_tokens=16, stop_token_ids=()).token_ids for s in ("unmerged", "fused", "merged")}
    assert len({str(v) for v in got.values()}) == 1, got
    base = Generator(model, tok, backend=BACKEND).generate([PROMPTS[0]], max_new_tokens=16,
                                                           stop_token_ids=()).token_ids
    assert got["unmerged"] != base  # the adapter really changes the output
    batched = Generator(model, tok, adapter, strategy="fused", backend=BACKEND).generate(PROMPTS, max_new_tokens=8,
                                                                                         stop_token_ids=())
    unmerged = Generator(model, tok, adapter, strategy="unmerged", backend=BACKEND).generate(
        PROMPTS, max_new_tokens=8, stop_token_ids=())
    assert batched.token_ids == unmerged.token_ids


@pytest.mark.parametrize("method", ["switch", "layerwise"])
def test_unmerged_steps_match_the_full_adapted_forward(tiny_llama, method):
    """`unmerged` gathers the chosen experts for one row and masks all of them from E / k rows on
    (`term_form`); either way each step's logits equal one full adapted forward over the finished
    sequences, computed the other way."""
    from lsjax.adapters.methods import adapted_forward
    from lsjax.adapters.routing import Computation, TermForm
    from lsjax.backends import XLA
    from lsjax.strategies import build, prepare_bundle, term_form

    _, model, _ = tiny_llama
    cfg, params = model.config, model.params()
    adapter = random_adapter(model, method, num_experts=4, top_k=2)
    acfg, arrays = adapter.config, adapter.arrays()
    prefill_fn, step_fn = build(cfg, acfg, "unmerged")
    bundle = prepare_bundle(cfg, params, acfg, arrays, "unmerged")
    step = jax.jit(step_fn, donate_argnums=2)
    for prompts, form in [(PROMPTS[:1], Computation.GATHERED), (PROMPTS, Computation.DENSE)]:
        assert term_form("unmerged", acfg, XLA, len(prompts), prefill=False).computation == form
        ids, mask = left_pad(prompts)
        logits, cache = prefill_fn(bundle, ids, mask, init_cache(cfg, len(prompts), 32))
        seen, generated, _ = greedy_steps(step, bundle, logits, cache, 6)
        other = TermForm(Computation.DENSE if form == Computation.GATHERED else Computation.GATHERED)
        full = adapted_forward(cfg, params, acfg, arrays, *finished_batch(prompts, np.stack(generated, 1).tolist()),
                               form=other)[0]
        assert_steps_match(prompts, seen, np.asarray(full))


def test_generators_decode_from_the_models_own_arrays(tiny_llama):
    """Unmerged and fused decoding copy no weights: the bundle holds the model's and the adapter's
    own buffers; only the merged strategies hold arrays of their own (merged lora its adapted groups)."""
    _, model, tok = tiny_llama

    def buffers(tree):
        return {x.unsafe_buffer_pointer() for x in jax.tree.leaves(tree)}

    weights = buffers(model.params())
    for method, strategy in [("switch", "unmerged"), ("switch", "fused"), (None, "auto"), ("lora", "merged")]:
        adapter = None if method is None else random_adapter(
            model, method, **({"num_experts": 4, "top_k": 2} if method == "switch" else {}))
        gen = Generator(model, tok, adapter, strategy=strategy, backend=BACKEND)
        held = buffers(gen.bundle["base"])
        if strategy == "merged":  # the adapted groups merged, norms and embeddings shared
            assert held - weights and held & weights
            continue
        assert held == weights
        assert buffers(gen.bundle["adapter"]) == (set() if adapter is None else buffers(adapter.arrays()))


def test_baselines_decode(tiny_llama):
    _, model, tok = tiny_llama
    for method in ("layerwise", "blockwise"):
        adapter = random_adapter(model, method, num_experts=4, top_k=2)
        a = Generator(model, tok, adapter, strategy="unmerged", backend=BACKEND).generate(
            PROMPTS, max_new_tokens=8, stop_token_ids=())
        b = Generator(model, tok, adapter, strategy="fused", backend=BACKEND).generate(
            PROMPTS, max_new_tokens=8, stop_token_ids=())
        assert a.token_ids == b.token_ids


def test_no_recompilation_within_a_bucket(tiny_llama):
    _, model, tok = tiny_llama
    gen = Generator(model, tok)
    gen.generate([[1, 2, 3], [4, 5, 6, 7]], max_new_tokens=5)
    count = gen.compile_count()
    later = [gen.generate([[9, 8, 7, 6, 5, 4], [3]], max_new_tokens=5,
                          sampling=SamplingConfig(temperature=0.7, top_k=5, seed=3)),
             gen.generate([[11, 12], [13, 14, 15, 16, 17, 18, 19, 20, 21]], max_new_tokens=3)]
    assert gen.compile_count() == count
    assert [r.timings["compiled"] for r in later] == [0.0, 0.0]  # the timings say they include no compiling
    fresh = gen.generate([[1] * 5] * 5, max_new_tokens=5)  # batch 5: a shape no other test decodes
    assert fresh.timings["compiled"] == 1.0 and gen.compile_count() > count


def test_streaming_compiles_its_step_once(tiny_llama):
    _, model, tok = tiny_llama
    gen = Generator(model, tok)
    before = gen.compile_count()
    prompt = list(range(3, 103))  # 100 tokens: a bucket (128) no other test streams
    events = list(gen.stream(prompt, max_new_tokens=6, stop_token_ids=()))
    assert len(events) == 6 and gen.compile_count() - before == 2  # this bucket's prefill and its step, once each
    assert [e.token_id for e in gen.stream(prompt, max_new_tokens=6, stop_token_ids=())] == \
        [e.token_id for e in events] and gen.compile_count() - before == 2


def test_logprobs_are_the_models_log_probabilities(tiny_llama):
    """`logprobs=True`: each generated token's log-softmax under the model (before the sampling
    filters), against one full forward of the finished sequences; streaming gives the same ones."""
    _, model, tok = tiny_llama
    gen = Generator(model, tok)
    sampling = SamplingConfig(temperature=0.8, top_k=5, seed=3)
    out = gen.generate(PROMPTS, max_new_tokens=7, stop_token_ids=(), sampling=sampling, logprobs=True)
    plain = gen.generate(PROMPTS, max_new_tokens=7, stop_token_ids=(), sampling=sampling)
    assert plain.logprobs is None and plain.token_ids == out.token_ids
    full = forward(model.config, model.params(), *finished_batch(PROMPTS, out.token_ids))
    logp = np.asarray(jax.nn.log_softmax(full, axis=-1))
    for row, prompt in enumerate(PROMPTS):
        assert len(out.logprobs[row]) == len(out.token_ids[row]) == 7
        want = [logp[row, len(prompt) - 1 + i, t] for i, t in enumerate(out.token_ids[row])]
        np.testing.assert_allclose(out.logprobs[row], want, atol=1e-4)
    events = list(gen.stream(PROMPTS[0], max_new_tokens=7, stop_token_ids=(), sampling=sampling, logprobs=True))
    np.testing.assert_allclose([e.logprob for e in events], out.logprobs[0], atol=1e-5)
    # a row that stops early keeps one logprob per kept token
    stop = out.token_ids[1][2]
    early = gen.generate(PROMPTS, max_new_tokens=7, stop_token_ids=(stop,), sampling=sampling, logprobs=True)
    assert [len(x) for x in early.logprobs] == [len(x) for x in early.token_ids]
    assert early.logprobs[1] == out.logprobs[1][:len(early.token_ids[1])]


def test_bf16_generation_tracks_the_fp32_model(tiny_llama):
    """A bf16 model and switch adapter decode on bf16 weights and cache (no fp32 copy anywhere), and
    each generated token's log-probability stays within bf16 error of the fp32 model's, one full
    fp32 adapted forward over the same tokens."""
    from lsjax.adapters import adapted_forward
    from lsjax.model import model_from_params

    _, model, tok = tiny_llama
    adapter = random_adapter(model, "switch", num_experts=4, top_k=2)
    half = lambda tree: jax.tree.map(lambda x: x.astype(jnp.bfloat16), tree)  # noqa: E731
    model16 = model_from_params(model.config, half(model.params()))
    adapter16 = Adapter.from_arrays(model.config, adapter.config, half(adapter.arrays()))
    gen = Generator(model16, tok, adapter16, strategy="unmerged")
    assert gen.backend.name == "xla" and gen.decoder.tuning.source == "only"  # the native kernels are fp32 only
    assert {x.dtype for x in jax.tree.leaves(gen.bundle)} == {jnp.dtype(jnp.bfloat16)}
    _, _, _, cache, *_ = gen._setup(PROMPTS, False, 8, None, ())
    assert cache.k.layer(0).dtype == jnp.bfloat16
    out = gen.generate(PROMPTS, max_new_tokens=8, stop_token_ids=(), logprobs=True)
    full, _ = adapted_forward(model.config, model.params(), adapter.config, adapter.arrays(),
                              *finished_batch(PROMPTS, out.token_ids))
    logp = np.asarray(jax.nn.log_softmax(full, axis=-1))
    for row, prompt in enumerate(PROMPTS):
        want = [logp[row, len(prompt) - 1 + i, t] for i, t in enumerate(out.token_ids[row])]
        np.testing.assert_allclose(out.logprobs[row], want, atol=0.05)
        assert max(abs(a - b) for a, b in zip(out.logprobs[row], want)) > 1e-5  # it really ran in bf16


def test_stops_streaming_and_seeds(tiny_llama):
    _, model, tok = tiny_llama
    gen = Generator(model, tok)
    free = gen.generate([PROMPTS[0]], max_new_tokens=12, stop_token_ids=())
    ids = free.token_ids[0]
    stopped = gen.generate([PROMPTS[0]], max_new_tokens=12, stop_token_ids=[ids[4]])
    first = ids.index(ids[4])
    assert stopped.token_ids[0] == ids[: first + 1] and stopped.finish_reasons == ["stop"]
    text = free.texts[0]
    needle = text[len(text) // 2: len(text) // 2 + 2]
    by_string = gen.generate([PROMPTS[0]], max_new_tokens=12, stop_token_ids=(), stop_strings=[needle])
    assert by_string.texts[0] == text[: text.find(needle)] and by_string.finish_reasons == ["stop_string"]
    events = list(gen.stream(PROMPTS[0], max_new_tokens=12, stop_token_ids=()))
    assert [e.token_id for e in events] == ids and events[-1].finish_reason == "length"
    assert "".join(e.text for e in events) == text
    hot = SamplingConfig(temperature=1.5, seed=1)
    a = gen.generate([PROMPTS[0]], max_new_tokens=12, sampling=hot, stop_token_ids=()).token_ids
    b = gen.generate([PROMPTS[0]], max_new_tokens=12, sampling=hot, stop_token_ids=()).token_ids
    c = gen.generate([PROMPTS[0]], max_new_tokens=12, sampling=SamplingConfig(temperature=1.5, seed=2),
                     stop_token_ids=()).token_ids
    assert a == b and a != c


def test_streamed_text_is_generated_text_and_never_shows_part_of_a_stop_string(tiny_llama):
    _, model, tok = tiny_llama
    gen = Generator(model, tok)
    free = list(gen.stream(PROMPTS[0], max_new_tokens=16, stop_token_ids=()))
    pieces = [e.text for e in free]
    text = "".join(pieces)
    # the end of one token's text and the start of the next: its start comes a token before it completes
    i = next(i for i in range(len(pieces) - 1) if pieces[i] and pieces[i + 1] and pieces[i][-1] != pieces[i + 1][0])
    spanning = pieces[i][-1] + pieces[i + 1][0]
    never = spanning[:1] + "\x00"  # begins like a stop string, never completes: held back, shown at the end
    for needle in (spanning, never, text[-2:]):
        want = gen.generate([PROMPTS[0]], max_new_tokens=16, stop_token_ids=(), stop_strings=[needle])
        events = list(gen.stream(PROMPTS[0], max_new_tokens=16, stop_token_ids=(), stop_strings=[needle]))
        shown = ""
        for e in events:
            shown += e.text
            assert len(shown) <= (text.find(needle) if needle in text else len(text)), (needle, shown)
        assert shown == want.texts[0] and events[-1].finish_reason == want.finish_reasons[0], needle
    assert [e.finish_reason for e in events][-1] == "stop_string"


def test_without_a_tokenizer_ids_work_and_text_features_say_what_they_need(tiny_llama):
    _, model, tok = tiny_llama
    gen = Generator(model, None)
    want = Generator(model, tok).generate([PROMPTS[0]], max_new_tokens=5, stop_token_ids=())
    got = gen.generate([PROMPTS[0]], max_new_tokens=5, stop_token_ids=())
    assert got.token_ids == want.token_ids and got.texts == [""]
    events = list(gen.stream(PROMPTS[0], max_new_tokens=5, stop_token_ids=()))
    assert [e.token_id for e in events] == want.token_ids[0] and all(e.text == "" for e in events)
    with pytest.raises(ConfigError, match=r"prompt 1 is text, which needs a tokenizer"):
        gen.generate([PROMPTS[0], "hello"])
    with pytest.raises(ConfigError, match=r"stop_strings needs a tokenizer"):
        gen.generate([PROMPTS[0]], stop_strings=["x"])
    with pytest.raises(ConfigError, match=r"chat=True .* needs a tokenizer"):
        list(gen.stream(PROMPTS[0], chat=True))


def test_bad_input(tiny_llama):
    _, model, tok = tiny_llama
    gen = Generator(model, tok, max_cache_len=64)
    with pytest.raises(ConfigError, match=r"prompt of 60 tokens \(bucket 64\) \+ max_new_tokens=8 exceeds the cache"):
        gen.generate([[3] * 60], max_new_tokens=8)
    with pytest.raises(ConfigError, match=r"prompt 1 is empty"):
        gen.generate([[3, 4], []])
    with pytest.raises(ConfigError, match=r"prompt 0 is empty"):
        gen.generate([""])
    with pytest.raises(ConfigError, match=r"empty batch"):
        gen.generate([])
    with pytest.raises(ConfigError, match=r"temperature=-1 is invalid"):
        gen.generate([[3]], sampling=SamplingConfig(temperature=-1))
    with pytest.raises(ConfigError, match=r"top_p=0 is invalid"):
        SamplingConfig(top_p=0)
    with pytest.raises(ConfigError, match=r"top_k=-2 is invalid"):
        SamplingConfig(top_k=-2)
    with pytest.raises(ConfigError, match=r"strategy 'greedy' is not supported"):
        Generator(model, tok, strategy="greedy")
    with pytest.raises(ConfigError, match=r"backend='cuda' is not supported; expected one of"):
        Generator(model, tok, backend="cuda")
    switch = random_adapter(model, "switch", num_experts=4, top_k=2)
    with pytest.raises(ConfigError, match=r"'merged' with a switch adapter decodes one sequence .* a batch of 3"):
        Generator(model, tok, switch, strategy="merged", backend=BACKEND).generate(PROMPTS)
    with pytest.raises(ConfigError, match=r"strategy 'merged' is for methods 'lora' and 'switch', not 'layerwise'"):
        Generator(model, tok, random_adapter(model, "layerwise", num_experts=4, top_k=2), strategy="merged")
    other = ModelConfig.from_dict({**model.config.to_dict(), "num_layers": 3})
    foreign = Adapter(other, switch.config, rngs=nnx.Rngs(0))
    with pytest.raises(AdapterError, match=r"adapter was made for another base model: .*layers=3"):
        Generator(model, tok, foreign)
    with pytest.raises(ConfigError, match=r"max_new_tokens=0 is invalid"):
        gen.generate([[3]], max_new_tokens=0)
    with pytest.raises(ConfigError, match=r"chat=True applies the chat template to text prompts, "
                                          r"but prompt 0 is token"):
        gen.generate([[3]], chat=True)
    with pytest.raises(ConfigError, match=r"stop_strings='x' must be a list of strings"):
        gen.generate([[3]], stop_strings="x")
