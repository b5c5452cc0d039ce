"""`auto` by measurement (lsjax.autotune): the candidates, the cache file, pinning, and a Decoder's
auto choice on a tiny model, each against real timings (or a candidate made slow on purpose)."""

import json
import time
from collections import Counter

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from lsjax import autotune, native
from lsjax.adapters import Adapter, AdapterConfig
from lsjax.autotune import candidates
from lsjax.cli import main
from lsjax.config import ModelConfig
from lsjax.decoder import Decoder
from lsjax.errors import ConfigError
from lsjax.generate import Generator
from lsjax.model import Llama
from lsjax.serve import Engine, EngineConfig
from lsjax.strategies import Strategy

CONFIG = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4, num_kv_heads=2,
                     head_dim=8)
SWITCH = AdapterConfig(method="switch", num_experts=4, top_k=2, rank=4)
needs_native = pytest.mark.skipif(not native.available(), reason=f"lsjax.native: {native.unavailable_reason()}")


@pytest.fixture(autouse=True)
def cache_file(tmp_path, monkeypatch):
    path = tmp_path / "autotune.json"
    monkeypatch.setenv(autotune.CACHE_ENV, str(path))
    return path


@pytest.fixture(scope="module")
def model():
    return Llama(CONFIG, rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def switch():
    return Adapter(CONFIG, SWITCH, rngs=nnx.Rngs(1))


def labels(found) -> list[str]:
    return [c.label for c in found]


def counting(built: list):
    """A Decoder factory that records each Decoder autotune builds to time a candidate."""
    def make(*args, **kwargs):
        built.append((kwargs["backend"], kwargs["strategy"]))
        return Decoder(*args, **kwargs)
    return make


def test_candidates_are_each_backend_here_by_each_strategy_the_adapter_allows(monkeypatch):
    monkeypatch.setattr(native, "unavailable_reason", lambda: None)  # as if built, on any machine
    assert labels(candidates(None, 1)) == ["xla/base", "native/base"]
    lora = AdapterConfig(method="lora", rank=4)
    assert labels(candidates(lora, 8)) == ["xla/unmerged", "xla/fused", "xla/merged", "native/unmerged",
                                           "native/fused", "native/merged", "hybrid/fused"]  # the mixed ones:
    # native/unmerged (native base product, XLA's term) and hybrid/fused (XLA's product, native term)
    assert labels(candidates(SWITCH, 1, backend="xla")) == ["xla/unmerged", "xla/fused", "xla/merged"]
    assert labels(candidates(SWITCH, 2, backend="xla")) == ["xla/unmerged", "xla/fused"]  # merged: one row a step
    no_qkv = AdapterConfig(method="switch", num_experts=4, top_k=2, rank=4, targets=("o", "down"))
    assert labels(candidates(no_qkv, 1, backend="xla")) == ["xla/unmerged", "xla/fused", "xla/merged"]  # any targets
    assert labels(candidates(no_qkv, 2, backend="xla")) == ["xla/unmerged", "xla/fused"]  # one route per step
    for method in ("layerwise", "blockwise"):
        config = AdapterConfig(method=method, num_experts=4, top_k=2, rank=4)
        assert labels(candidates(config, 1, backend="native")) == ["native/unmerged", "native/fused"]
    # native: fp32 on one device only
    assert labels(candidates(None, 1, jnp.bfloat16)) == ["xla/base"]
    assert labels(candidates(None, 1, sharded=True)) == ["xla/base"]
    # a fixed part restricts the rest
    assert labels(candidates(SWITCH, 1, strategy="fused")) == ["xla/fused", "native/fused", "hybrid/fused"]
    assert candidates(SWITCH, 2, strategy="merged") == []
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert labels(candidates(None, 1)) == ["xla/base", "native/base", "pallas/base"]
    monkeypatch.setattr(native, "unavailable_reason", lambda: "not built")
    assert labels(candidates(None, 1)) == ["xla/base", "pallas/base"]


def test_a_second_choice_reads_the_cache_and_measures_nothing(model, switch, cache_file):
    built = []
    first = autotune.choose(counting(built), model, switch, 1)
    options = labels(candidates(SWITCH, 1))
    assert first.source == "measured" and sorted(first.ms_per_step) == sorted(options)
    assert len(built) == len(options)  # one Decoder per candidate
    assert first.pick.label == min(first.ms_per_step, key=first.ms_per_step.get)
    entry, = json.loads(cache_file.read_text())["entries"]
    assert entry["key"]["rows"] == 1 and entry["key"]["adapter"]["method"] == "switch"
    assert entry["key"]["machine"] == autotune.machine() and entry["pick"] == first.pick.label
    assert entry["ms_per_step"] == first.ms_per_step and entry["pinned"] is False

    again = autotune.choose(counting(built), model, switch, 1)
    assert len(built) == len(options)  # nothing built, nothing timed
    assert (again.source, again.pick, again.ms_per_step) == ("cached", first.pick, first.ms_per_step)
    other = autotune.choose(counting(built), model, switch, 2)  # another batch: another key, measured
    assert other.source == "measured" and len(json.loads(cache_file.read_text())["entries"]) == 2


def test_bfloat16_experts_are_timed_under_their_own_key(model, switch, cache_file):
    """Half the experts' bytes can change the pick: an adapter in bfloat16 beside float32 weights is
    another entry, and one in the weights' type keeps the key it always had."""
    built = []
    autotune.choose(counting(built), model, switch, 1)
    assert autotune.choose(counting(built), model, switch.astype(jnp.float32), 1).source == "cached"
    half = autotune.choose(counting(built), model, switch.astype(jnp.bfloat16), 1)
    assert half.source == "measured"
    first, second = json.loads(cache_file.read_text())["entries"]
    assert "dtype" not in first["key"]["adapter"] and second["key"]["adapter"]["dtype"] == "bfloat16"
    assert {k: v for k, v in second["key"]["adapter"].items() if k != "dtype"} == first["key"]["adapter"]


@pytest.mark.parametrize("text, what", [
    ("{not json", "not valid JSON"),
    ("[]", "expected a JSON object"),
    ('{"entries": []}', "expected {\"format\": 1"),
    ('{"format": 1, "entries": [{"key": {}}]}', "entry 0 is not an object with exactly the fields"),
    ('{"format": 1, "entries": [{"key": {}, "ms_per_step": {"xla/base": "fast"}, "pick": "xla/base", '
     '"pinned": false, "date": "2025-01-01"}]}', "ms_per_step holds a value that is not a number"),
    ('{"format": 1, "entries": [{"key": {}, "ms_per_step": {}, "pick": "cuda/base", "pinned": false, '
     '"date": "2025-01-01"}]}', "pick 'cuda/base' is not a candidate"),
])
def test_a_corrupt_cache_file_is_a_config_error_naming_it(model, switch, cache_file, text, what):
    cache_file.write_text(text)
    with pytest.raises(ConfigError) as caught:
        Decoder(model, switch, backend="xla")  # three candidates: auto reads the cache
    message = str(caught.value)
    assert str(cache_file) in message and what in message and "delete it" in message


def test_explicit_backend_and_strategy_win(model, switch, cache_file):
    built = []
    autotune.pin(CONFIG, jnp.float32, None, 1, candidates(None, 1)[-1])  # native/base where it can run
    decoder = Decoder(model, backend="xla")
    assert decoder.backend.name == "xla" and decoder.tuning is None  # nothing auto: nothing read or timed
    # a fixed backend: only the strategy is tuned, over that backend's candidates (an entry of its own)
    decoder = Decoder(model, switch, backend="xla")
    assert decoder.backend.name == "xla" and decoder.tuning.source == "measured"
    assert sorted(decoder.tuning.ms_per_step) == ["xla/fused", "xla/merged", "xla/unmerged"]
    choice = autotune.choose(counting(built), model, switch, 1, backend="xla")
    assert choice.source == "cached" and built == []
    # a fixed strategy: only the backend is tuned
    decoder = Decoder(model, switch, strategy="fused")
    assert decoder.strategy == "fused"
    if native.available():
        assert sorted(decoder.tuning.ms_per_step) == ["hybrid/fused", "native/fused", "xla/fused"]
    with pytest.raises(ConfigError, match="routes one sequence per step"):  # a fixed part that cannot run is refused
        autotune.choose(Decoder, model, switch, 2, strategy="merged")


def test_a_pinned_cache_entry_is_auto_s_pick_until_measured_again(tmp_path, model, cache_file):
    from lsjax.convert import convert_hf
    from tiny import make_hf_model

    make_hf_model(tmp_path / "hf")
    ckpt = str(tmp_path / "ckpt")
    convert_hf(tmp_path / "hf", ckpt, progress=False)
    tune = ["tune", "decode", "--ckpt", ckpt, "--methods", "base", "--batch", "1"]
    assert main([*tune, "--pin", "xla/base"]) == 0
    entry, = json.loads(cache_file.read_text())["entries"]
    assert (entry["pick"], entry["pinned"]) == ("xla/base", True)
    import lsjax

    loaded, _ = lsjax.load(ckpt)
    built = []
    choice = autotune.choose(counting(built), loaded, None, 1)
    assert (choice.pick.label, choice.source, built) == ("xla/base", "pinned", [])
    assert Decoder(loaded).backend.name == "xla"
    assert main([*tune, "--pin", "xla/fused"]) == 2  # not a candidate for the base: refused, nothing written
    assert json.loads(cache_file.read_text())["entries"] == [entry]
    if len(candidates(None, 1)) > 1:  # measuring again replaces the pin
        assert main(tune) == 0
        entry, = json.loads(cache_file.read_text())["entries"]
        assert entry["pinned"] is False and sorted(entry["ms_per_step"]) == sorted(labels(candidates(None, 1)))


@pytest.mark.parametrize("fast", ["unmerged", "fused", "merged"])
def test_auto_picks_the_one_candidate_that_is_not_slowed_down(model, switch, monkeypatch, fast):
    """Every candidate but one sleeps 40 ms a step (far more than a tiny model's step): that one is
    picked, and the others, more than `PRUNE` times slower at their first timed step, stop there."""
    step = Decoder.step
    calls = Counter()

    def slow(self, tokens, cache):
        calls[str(self.strategy)] += 1
        if self.strategy != fast:
            time.sleep(0.04)
        return step(self, tokens, cache)

    monkeypatch.setattr(Decoder, "step", slow)
    decoder = Decoder(model, switch, backend="xla")
    assert decoder.strategy == fast and decoder.tuning.source == "measured"
    assert all(ms > 40 for label, ms in decoder.tuning.ms_per_step.items() if label != f"xla/{fast}")
    warm_and_first = autotune.WARM_STEPS + 2  # warming, then one untimed and one timed step
    assert calls == {s: warm_and_first + (autotune.ROUNDS * (1 + autotune.STEPS) if s == fast else 0)
                     for s in ("unmerged", "fused", "merged")}


@needs_native
@pytest.mark.parametrize("fast", ["xla", "native"])
def test_auto_picks_the_backend_that_is_not_slowed_down(model, monkeypatch, fast):
    step = Decoder.step

    def slow(self, tokens, cache):
        if self.backend.name != fast:
            time.sleep(0.04)
        return step(self, tokens, cache)

    monkeypatch.setattr(Decoder, "step", slow)
    assert Decoder(model).backend.name == fast


def test_a_decoder_s_auto_choice_is_a_measured_candidate(model, switch, cache_file):
    decoder = Decoder(model, switch, rows=2)
    tuning = decoder.tuning
    assert tuning.source == "measured"
    assert sorted(tuning.ms_per_step) == sorted(labels(candidates(SWITCH, 2)))  # no merged at 2 rows
    assert f"{decoder.backend.name}/{decoder.strategy}" == tuning.pick.label
    assert tuning.pick.label == min(tuning.ms_per_step, key=tuning.ms_per_step.get)
    assert decoder.strategy in (Strategy.UNMERGED, Strategy.FUSED)
    # drivers say their batch: a Generator its rows, an engine its slots
    gen = Generator(model, None, switch, rows=2)
    assert (gen.decoder.tuning.source, gen.decoder.tuning.pick) == ("cached", tuning.pick)
    engine = Engine.for_model(model, None, None, EngineConfig(slots=3, max_len=64, prefill_chunk=16))
    assert engine.decoder.tuning.source in ("measured", "only")
    rows = {e["key"]["rows"] for e in json.loads(cache_file.read_text())["entries"]}
    assert rows == ({2, 3} if len(candidates(None, 3)) > 1 else {2})


def test_rows_must_be_a_positive_integer(model):
    for rows in (0, 1.5, True):
        with pytest.raises(ConfigError, match="rows="):
            Decoder(model, rows=rows)


def test_only_concrete_arrays_on_one_device_are_timed():
    assert autotune.measurable({"w": jnp.ones(3)}, None)
    assert not autotune.measurable({"w": jax.ShapeDtypeStruct((3,), jnp.float32)})
    seen = []
    jax.jit(lambda x: seen.append(autotune.measurable(x)) or x)(jnp.ones(3))
    assert seen == [False]  # traced: the static rule decides


def test_the_machine_key_tells_apart_cpus_of_one_name_and_native_builds(monkeypatch, tmp_path):
    """Two VMs both named "AMD EPYC", one with AVX-512: their measurements must not be shared; nor
    those of a rebuilt native library."""
    def cpu(flags):
        monkeypatch.setattr(autotune, "_cpu_info", lambda field: "AMD EPYC" if field == "model name" else flags)
        return autotune.machine()

    avx2, avx512 = cpu("fpu sse2 avx2 fma"), cpu("fpu sse2 avx2 fma avx512f")
    assert avx2["cpu"] == avx512["cpu"] and avx2 != avx512
    if native.available():
        other = tmp_path / "_matvec.so"
        other.write_bytes(native.LIBRARY.read_bytes() + b"\0")
        monkeypatch.setattr(native, "LIBRARY", other)
        assert cpu("fpu sse2 avx2 fma")["native"] != avx2["native"]
