"""Training (lsjax.train): configs, data, sharded / pmap step equivalence, kill-and-resume, multi-host.

Everything runs on a tiny random model (tests/tiny.py) converted once per module; the multi-device
and multi-process checks run in subprocesses (8 forced CPU devices; two `jax.distributed` processes).
"""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from lsjax.errors import CheckpointError, ConfigError

ROOT = Path(__file__).resolve().parents[1]
COMMON = ["batch_size=4", "data.max_length=32", "data.eval_docs=4", "adapter.rank=4", "adapter.num_experts=4",
          "progress=false"]


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    from tiny import make_hf_model

    from lsjax.convert import convert_hf

    folder = tmp_path_factory.mktemp("tiny_train")
    make_hf_model(folder / "hf")
    return convert_hf(folder / "hf", folder / "ckpt", progress=False)


@pytest.fixture(scope="module")
def jax_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("jax_cache")


def _env(jax_cache, devices: int | None = None) -> dict:
    env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=str(jax_cache),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
    if devices:  # added to the flags conftest set
        env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={devices}"
    return env


def _cli(args: list[str]) -> list[str]:
    return [sys.executable, "-m", "lsjax.train.cli", "--no-progress", *args]


# -- 1. configs --------------------------------------------------------------------------------
def test_config_yaml_overrides_and_validation(tmp_path):
    from lsjax.train.config import load_config

    for name in ("lora", "switch", "layerwise", "blockwise"):
        c = load_config(ROOT / "lsjax" / "train" / "configs" / f"smollm2_{name}.yaml")
        assert c.adapter.method == name
    c = load_config(ROOT / "lsjax/train/configs/smollm2_switch.yaml",
                    ["steps=7", "optim.lr=3e-4", "data.tasks=[arc_easy,piqa]", "adapter.router.jitter=0.01"])
    assert (c.steps, c.optim.lr, c.data.tasks, c.adapter.router.jitter) == (7, 3e-4, ("arc_easy", "piqa"), 0.01)
    with pytest.raises(ConfigError, match="unknown task|data.tasks"):
        load_config(None, ["model=x", "data.tasks=[nope]"])
    with pytest.raises(ConfigError, match="unknown train config field"):
        load_config(None, ["model=x", "stepz=3"])
    with pytest.raises(ConfigError, match="optim.lr"):
        load_config(None, ["model=x", "optim.lr=-1"])
    with pytest.raises(ConfigError, match="not divisible"):
        load_config(None, ["model=x", "batch_size=6", "mesh.data=4"])
    with pytest.raises(ConfigError, match="key=value"):
        load_config(None, ["model"])
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    # the fingerprint ignores paths / mesh / intervals, not what changes the numbers
    a = load_config(None, ["model=x"])
    assert a.fingerprint() == a.replace(run_dir="elsewhere", checkpoint_every=3).fingerprint()
    assert a.fingerprint() != a.replace(seed=1).fingerprint()


def test_cli_parser_reads_config_and_overrides():
    import argparse

    from lsjax.train.cli import add_train_parser
    from lsjax.train.config import load_config

    parser = argparse.ArgumentParser()
    add_train_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["train", "--config", str(ROOT / "lsjax/train/configs/smollm2_lora.yaml"), "--resume",
                              "steps=3", "mesh.data=2", "--process-id", "1"])
    assert args.resume and args.process_id == 1 and args.overrides == ["steps=3", "mesh.data=2"]
    config = load_config(args.config, args.overrides)
    assert (config.steps, config.mesh.data, config.adapter.method) == (3, 2, "lora")


def test_distributed_flags_are_checked(monkeypatch):
    from lsjax.sharding import init_distributed

    monkeypatch.delenv("LSJAX_COORDINATOR", raising=False)
    assert init_distributed() is False  # single process: nothing to do
    monkeypatch.setenv("LSJAX_COORDINATOR", "localhost:1")
    monkeypatch.delenv("LSJAX_NUM_PROCESSES", raising=False)
    with pytest.raises(ConfigError, match="LSJAX_NUM_PROCESSES"):
        init_distributed()
    with pytest.raises(ConfigError, match="process_id=2"):
        init_distributed("localhost:1", 2, 2)


def test_mesh_and_empty_split_errors():
    from lsjax.data import load_task
    from lsjax.train.config import MeshConfig
    from lsjax.train.loop import make_mesh

    with pytest.raises(ConfigError, match="only 1 are available"):
        make_mesh(MeshConfig(data=4, fsdp=2))
    with pytest.raises(ConfigError, match="empty"):
        load_task("arc_easy", "heldout", heldout_fraction=1e-9)


# -- 2. data -----------------------------------------------------------------------------------
def test_examples_mask_answer_tokens_and_iterator_resumes(tiny_ckpt):
    from lsjax.data import load_task
    from lsjax.tokenizer import load_tokenizer
    from lsjax.train.batches import BatchIterator, encode_docs, make_batch

    tok = load_tokenizer(Path(tiny_ckpt) / "tokenizer")
    docs = load_task("arc_easy", "train")[:16]
    ex = encode_docs(tok, docs, 200)
    b = make_batch(ex[:1])
    doc = docs[0]
    answer = doc.continuations[doc.gold]
    targets = b["targets"][0][b["weights"][0] > 0]
    assert targets[-1] == tok.eos_token_id
    assert tok.decode(targets[:-1]).strip() == answer.strip()
    assert b["mask"][0].sum() == len(tok(doc.contexts[doc.gold].rstrip() + " " + answer.strip())["input_ids"]) \
        or b["mask"][0].sum() > len(targets)  # prompt tokens are attended, not scored
    assert b["ids"].shape == (1, 200) and b["weights"].dtype == np.float32

    it = BatchIterator(ex, 4, seed=3)
    for _ in range(5):  # crosses an epoch boundary (16 examples, 4 per batch)
        next(it)
    saved = it.state()
    want = [next(it)["ids"] for _ in range(3)]
    again = BatchIterator(ex, 4, seed=3)
    again.restore(saved)
    assert saved == {"epoch": 1, "index": 4}
    for w in want:
        np.testing.assert_array_equal(next(again)["ids"], w)
    with pytest.raises(ConfigError, match="fewer than batch_size"):
        BatchIterator(ex[:2], 4, seed=0)


# -- 3. one step on 8 devices == on 1 device (and the pmap form) --------------------------------
EQUIV = textwrap.dedent("""
    import json, sys
    import jax, numpy as np
    from lsjax.train.config import load_config
    from lsjax.train.loop import Run
    from lsjax.train.step import make_pmap_train_step
    common = json.loads(sys.argv[1])
    def rel(a, b):  # ||a - b|| / ||b|| over the whole tree, and the worst leaf
        la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
        tree = np.sqrt(sum(np.sum((x - y) ** 2) for x, y in zip(la, lb)) / sum(np.sum(y ** 2) for y in lb))
        leaf = max(np.linalg.norm(x - y) / (np.linalg.norm(y) + 1e-30) for x, y in zip(la, lb))
        return float(tree), float(leaf)
    def step(extra):
        run = Run(load_config(None, common + extra))
        batch = next(run.iterator)
        m = run.train_step(batch)
        return run, batch, float(m["loss"]), jax.device_get(run.state["params"])
    out = {"devices": len(jax.devices())}
    _, _, out["loss_1"], p1 = step([])
    run8, _, out["loss_8"], p8 = step(["mesh.data=4", "mesh.fsdp=2"])
    out["spec_8"] = str(run8.state["params"]["experts"]["qkv"]["a"].sharding.spec)
    out["rel_8"] = rel(p8, p1)
    _, _, out["loss_t"], pt = step(["mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"])
    out["rel_t"] = rel(pt, p1)
    ref, batch, out["loss_ref"], q1 = step(["adapter.router.aux_loss_coef=0.0"])
    n = len(jax.devices())
    cfg = ref.config
    fresh = Run(cfg)
    pstep = jax.pmap(make_pmap_train_step(fresh.model_config, cfg.adapter, fresh.tx, fresh.schedule), axis_name="batch")
    rep = lambda t: jax.tree.map(lambda x: np.stack([np.asarray(x)] * n), jax.device_get(t))
    state, m = pstep(rep(fresh.state), rep(fresh.base), jax.tree.map(lambda x: x.reshape(n, -1, *x.shape[1:]), batch))
    out["loss_pmap"] = float(m["loss"][0])
    out["rel_pmap"] = rel(jax.tree.map(lambda x: np.asarray(x[0]), jax.device_get(state["params"])), q1)
    quantized = [f"model={sys.argv[2]}"]  # a 4-bit base: its integers and scales replicated, the experts split
    _, _, out["loss_q1"], pq1 = step(quantized)
    _, _, out["loss_q8"], pq8 = step(quantized + ["mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"])
    out["rel_q"] = rel(pq8, pq1)
    print("RESULT" + json.dumps(out))
""")


def test_one_step_8_devices_and_pmap_match_1_device(tiny_ckpt, tmp_path, jax_cache):
    """One training step on 8 devices (data x fsdp, and with tensor parallelism), as pmap, and over a
    4-bit base on 8 devices, each equal to the same step on one device. Packed rows (several
    examples, segment ids) split over the devices like any other batch array."""
    from lsjax.convert import convert_hf

    quantized = convert_hf(tiny_ckpt.parent / "hf", tmp_path / "q", progress=False, quantize="int4:32")
    common = [f"model={tiny_ckpt}", f"run_dir={tmp_path}/unused", "batch_size=8", "data.max_length=64",
              "data.eval_docs=0", "adapter.rank=4", "adapter.num_experts=4", "adapter.method=switch",
              "optim.warmup_steps=0", "optim.lr=0.01", "progress=false"]
    proc = subprocess.run([sys.executable, "-c", EQUIV, json.dumps(common), str(quantized)], env=_env(jax_cache, 8),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.split("RESULT")[-1])
    assert out["devices"] == 8 and "fsdp" in out["spec_8"]
    assert abs(out["loss_8"] - out["loss_1"]) <= 1e-5 * abs(out["loss_1"])
    assert abs(out["loss_t"] - out["loss_1"]) <= 1e-5 * abs(out["loss_1"])  # 2 x 2 x 2 with tensor parallelism
    assert abs(out["loss_pmap"] - out["loss_ref"]) <= 1e-5 * abs(out["loss_ref"])
    # whole adapter tree within 1e-5; single leaves (Adam's first step divides tiny gradients by their own
    # magnitude, which amplifies fp32 reduction-order noise) within 1e-4
    assert abs(out["loss_q8"] - out["loss_q1"]) <= 1e-5 * abs(out["loss_q1"])
    assert abs(out["loss_q1"] - out["loss_1"]) > 1e-4  # the 4-bit base really is another model
    for tree, leaf in (out["rel_8"], out["rel_t"], out["rel_pmap"], out["rel_q"]):
        assert tree <= 1e-5 and leaf <= 1e-4, out


# -- 4. kill -9 at random points, resume: bit-equal to an uninterrupted run ---------------------
def _final_params(run_dir: Path, step: int):
    import orbax.checkpoint as ocp

    with ocp.StandardCheckpointer() as ckptr:
        state = ckptr.restore(run_dir / "checkpoints" / str(step) / "state")
    return state["params"], state["opt_state"]


def _assert_adapter_folder_holds(folder: Path, ckpt: Path, params) -> None:
    """The run's exported adapter (`run_dir/adapter`) loads and holds exactly the final checkpoint's params."""
    import jax

    from lsjax.adapters.files import load_adapter_arrays
    from lsjax.checkpoint import read_config

    cfg, loaded = load_adapter_arrays(folder, read_config(ckpt))
    assert cfg.method == "switch" and cfg.dropout == 0.1 and not (folder.parent / "adapter.partial").exists()
    got, want = jax.tree.leaves(loaded), jax.tree.leaves(params)
    assert len(got) == len(want) > 0
    for x, y in zip(got, want):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_kill_and_resume_is_bit_exact(tiny_ckpt, tmp_path, jax_cache):
    import jax

    steps = 12
    args = [f"model={tiny_ckpt}", *COMMON, f"steps={steps}", "checkpoint_every=1", "keep_checkpoints=2",
            "data.eval_docs=0", "adapter.router.jitter=0.1", "adapter.dropout=0.1", "optim.accumulation=2"]
    env = _env(jax_cache)
    ref_dir = tmp_path / "ref"
    subprocess.run(_cli([*args, f"run_dir={ref_dir}"]), env=env, check=True, capture_output=True, timeout=120)
    want = _final_params(ref_dir, steps)
    _assert_adapter_folder_holds(ref_dir / "adapter", tiny_ckpt, want[0])
    rng = random.Random(0)
    killed_at = []
    for trial in range(2):  # killed as soon as the first checkpoint is saved (mid-run), then at a random time
        run_dir = tmp_path / f"trial{trial}"
        proc = subprocess.Popen(_cli([*args, f"run_dir={run_dir}"]), env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        ckpts = run_dir / "checkpoints"
        deadline = time.time() + 60
        while not (ckpts.is_dir() and any(ckpts.iterdir())) and proc.poll() is None and time.time() < deadline:
            time.sleep(0.02)  # training has started once the first save appears
        time.sleep(rng.uniform(0.0, 1.0) if trial else 0.0)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        killed_at.append(sorted(p.name for p in ckpts.iterdir()) if ckpts.is_dir() else [])
        subprocess.run(_cli([*args, f"run_dir={run_dir}", "--resume"]), env=env, check=True, capture_output=True,
                       timeout=120)
        got = _final_params(run_dir, steps)
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    print("checkpoint folders when killed:", killed_at)
    assert any(str(steps) not in k for k in killed_at), killed_at  # at least one kill landed mid-run


def test_resume_refuses_another_config_and_existing_run(tiny_ckpt, tmp_path):
    from lsjax.train.config import load_config
    from lsjax.train.loop import train

    args = [f"model={tiny_ckpt}", *COMMON, "steps=2", f"run_dir={tmp_path}/r", "adapter.method=lora",
            "adapter.num_experts=1", "eval_every=1", "dtype=bfloat16", "data.eval_accuracy_docs=2"]
    last = train(load_config(None, args))
    assert last["step"] == 2 and np.isfinite(last["eval_loss"]) and np.isfinite(last["loss"])
    assert last["eval_n"] == 2 and 0 <= last["eval_acc"] <= 1  # held-out accuracy through lsjax.eval.harness
    data, *lines = [json.loads(x) for x in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert data["event"] == "data" and data["packing"] and data["rows"] <= data["examples"] - data["dropped"]
    assert lines[0]["step"] == 0 and np.isfinite(lines[0]["eval_loss"])  # the starting held-out loss
    assert {"loss", "aux", "lr", "grad_norm", "tokens", "load", "entropy"} <= set(lines[1])
    assert (tmp_path / "r" / "config.yaml").is_file()
    with pytest.raises(CheckpointError, match="--resume"):
        train(load_config(None, args))
    with pytest.raises(CheckpointError, match=r"another config.*adapter.rank"):
        train(load_config(None, args + ["adapter.rank=8"]), resume=True)


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tiny_ckpt, tmp_path, monkeypatch):
    from lsjax.train import loop
    from lsjax.train.config import load_config

    calls = {"n": 0}
    real = loop.Run.train_step

    def poisoned(self, batch):
        calls["n"] += 1
        metrics = real(self, batch)
        return {**metrics, "loss": np.float32("nan")} if calls["n"] == 3 else metrics

    monkeypatch.setattr(loop.Run, "train_step", poisoned)
    config = load_config(None, [f"model={tiny_ckpt}", *COMMON, "steps=5", "checkpoint_every=2",
                                f"run_dir={tmp_path}/r", "adapter.method=lora", "adapter.num_experts=1",
                                "data.eval_docs=0", "tensorboard=true"])
    with pytest.raises(loop.TrainingError, match="non-finite loss.*step 3.*Last good checkpoint: step 2"):
        loop.train(config)
    assert sorted(p.name for p in (tmp_path / "r" / "checkpoints").iterdir() if p.name.isdigit()) == ["2"]
    assert list((tmp_path / "r" / "tb").glob("events.out.tfevents.*"))  # TensorBoard scalars (tensorboardX)


# -- 5. two processes (jax.distributed on localhost) == one process -----------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_two_processes_match_one(tiny_ckpt, tmp_path, jax_cache):
    args = [f"model={tiny_ckpt}", *COMMON, "steps=2", "checkpoint_every=0", "data.eval_docs=0"]
    env = _env(jax_cache)
    one = subprocess.run(_cli([*args, f"run_dir={tmp_path}/one"]), env=env, capture_output=True, text=True,
                         timeout=120)
    assert one.returncode == 0, one.stderr[-2000:]
    port = _free_port()
    procs = [subprocess.Popen(_cli([*args, f"run_dir={tmp_path}/two", "mesh.data=2", "--coordinator",
                                    f"localhost:{port}", "--num-processes", "2", "--process-id", str(i)]),
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    outs = [p.communicate(timeout=180) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    want = json.loads(one.stdout.strip().splitlines()[-1])
    for stdout, _ in outs:
        got = json.loads(stdout.strip().splitlines()[-1])
        assert abs(got["loss"] - want["loss"]) <= 1e-5 * abs(want["loss"])
        assert got["tokens"] == want["tokens"] and got["target_tokens"] == want["target_tokens"]
    # the adapter folder the two processes wrote (gathered across them) holds the one-process result
    from safetensors.numpy import load_file

    one_arrays, two_arrays = (load_file(tmp_path / run / "adapter" / "adapter_model.safetensors")
                              for run in ("one", "two"))
    assert one_arrays.keys() == two_arrays.keys()
    for key in one_arrays:
        np.testing.assert_allclose(two_arrays[key], one_arrays[key], rtol=1e-4, atol=1e-6)


def test_jsonl_text_data(tiny_ckpt, tmp_path):
    """Plain-text JSONL: loss on every token after a window's first, hash split, clear errors, trains."""
    from lsjax.datafiles import read_examples
    from lsjax.tokenizer import load_tokenizer
    from lsjax.train.batches import build_rows, make_batch
    from lsjax.train.config import load_config
    from lsjax.train.loop import train

    path = tmp_path / "lm.jsonl"
    texts = [f"document {i}: " + "the quick brown fox jumps over the lazy dog. " * (1 + i % 3) for i in range(40)]
    path.write_text("\n".join(json.dumps({"text": t}) for t in texts) + "\n")
    (_, train_docs), (_, held) = read_examples(path, "train"), read_examples(path, "heldout")
    assert not {d.id for d in train_docs} & {d.id for d in held} and len(train_docs) + len(held) == 40

    tok = load_tokenizer(tiny_ckpt / "tokenizer")
    rows = build_rows(tok, read_examples(path)[1][:3], max_length=16, packing=False).rows
    ids = [tok.bos_token_id] + tok(texts[0], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert rows[0, 0].tolist() == ids[:17] and rows[1, 0, 0] == ids[16]  # windows share one boundary token
    batch = make_batch(rows[:2])
    assert batch["weights"][0].sum() == 16 and np.array_equal(batch["targets"][0], ids[1:17])

    last = train(load_config(None, [f"model={tiny_ckpt}", *COMMON, "steps=2", f"run_dir={tmp_path}/r",
                                    "data.tasks=[]", f"data.files=[{path}]", "adapter.method=lora",
                                    "adapter.num_experts=1"]))
    assert last["step"] == 2 and np.isfinite(last["loss"]) and np.isfinite(last["eval_loss"])


@pytest.mark.parametrize("quantize", [None, "int4:32"])
def test_a_short_run_lowers_the_heldout_loss(tiny_ckpt, tmp_path, quantize):
    """Twenty switch-adapter steps on a repetitive text: the held-out loss (documents the run never
    trained on) falls well below where it started; a step that climbed the gradient would raise it.
    Over a 4-bit base too: the adapter learns through the dequantized products, the base stays frozen."""
    from lsjax.convert import convert_hf
    from lsjax.train.config import load_config
    from lsjax.train.loop import train

    ckpt = tiny_ckpt if quantize is None else convert_hf(tiny_ckpt.parent / "hf", tmp_path / "q", progress=False,
                                                         quantize=quantize)
    path = tmp_path / "lm.jsonl"
    path.write_text("\n".join(json.dumps({"text": f"{i}: " + "a cat sat on the mat. " * 4}) for i in range(60)) + "\n")
    train(load_config(None, [f"model={ckpt}", *COMMON, "steps=20", f"run_dir={tmp_path}/r", "data.tasks=[]",
                             f"data.files=[{path}]", "adapter.method=switch", "optim.lr=0.01",
                             "optim.warmup_steps=0", "eval_every=20", "data.eval_docs=8"]))
    losses = [x["eval_loss"] for x in map(json.loads, (tmp_path / "r" / "metrics.jsonl").read_text().splitlines())
              if "eval_loss" in x]
    start, end = losses[0], losses[-1]
    assert len(losses) == 2 and end < start - 0.4, losses  # nats per token; it starts near log(vocab)


TINY_SHAPE = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                  head_dim=8, max_position_embeddings=64)


def test_train_bench_times_every_method_from_a_checkpoint_or_a_shape(tiny_ckpt, tmp_path, monkeypatch, capsys):
    import itertools

    import jax

    from lsjax.config import ModelConfig
    from lsjax.eval import latency
    from lsjax.train import bench
    from lsjax.train.bench import main, random_base, random_batch
    from lsjax.train.config import MeshConfig
    from lsjax.train.loop import make_mesh

    # each timed call really runs once; its time is given: the base forward 0.5 s, a lora step 2 s,
    # a switch step 4 s (then 1 s for anything else)
    times = itertools.chain([0.5, 2.0, 4.0], itertools.repeat(1.0))

    def timer(fn, args, *rest, **options):
        jax.block_until_ready(fn(*args))
        return next(times)

    monkeypatch.setattr(bench, "queued_seconds", timer)
    out = tmp_path / "train_bench.json"
    assert main(["--model", str(tiny_ckpt), "--batch", "2", "--length", "8", "--steps", "1",
                 "--methods", "lora,switch", "--json", str(out)]) == 0
    records = json.loads(out.read_text())["records"]
    assert [r["method"] for r in records] == ["lora", "switch"] and {r["source"] for r in records} == {str(tiny_ckpt)}
    # 2 x 8 tokens a step
    assert [(r["step_s"], r["forward_s"], r["tokens_per_s"], r["step_over_forward"]) for r in records] == [
        (2.0, 0.5, 8.0, 4.0), (4.0, 0.5, 4.0, 8.0)]
    assert "| switch | 4.000 | 4 | 0.500 | 8.0 |" in capsys.readouterr().out

    # random weights of a named shape: every parameter of that shape, norms 1, the rest N(0, 0.02)
    monkeypatch.setitem(latency.SHAPES, "tiny-test", TINY_SHAPE)
    config = ModelConfig.from_dict(TINY_SHAPE)
    base = random_base(config, np.float32, make_mesh(MeshConfig()))
    L, d, f = config.num_layers, config.hidden_size, config.intermediate_size  # stacked, as training scans them
    assert base["layers"].stacked and {k: tuple(v.shape) for k, v in base["layers"].tree.items()} == {
        "qkv": (L, d, config.q_size + 2 * config.kv_size), "o": (L, config.q_size, d), "gate_up": (L, d, 2 * f),
        "down": (L, f, d), "attn_norm": (L, d), "mlp_norm": (L, d)}
    assert base["embed"].shape == (config.vocab_size, d)
    assert np.all(np.asarray(base["norm"]) == 1) and abs(float(np.std(np.asarray(base["embed"]))) - 0.02) < 0.003
    batch = random_batch(config.vocab_size, 3, 8)  # answer = the second half: targets of positions 4..7
    assert batch["ids"].shape == (3, 8) and batch["mask"].all()
    assert (batch["weights"] == np.array([0, 0, 0, 0, 1, 1, 1, 1], np.float32)).all()
    assert main(["--shape", "tiny-test", "--batch", "2", "--length", "8", "--steps", "1", "--methods", "blockwise",
                 "--json", str(out)]) == 0
    assert json.loads(out.read_text())["records"][0]["source"] == "random tiny-test"


def test_train_bench_on_a_data_file_counts_real_tokens_with_and_without_packing(tiny_ckpt, tmp_path, monkeypatch):
    """Every step is given 2 s: real and answer tokens/s are then the rows' own counts per batch / 2 s."""
    import jax

    from lsjax.train import bench
    from lsjax.train.bench import main

    def timer(fn, args, *rest, **options):
        jax.block_until_ready(fn(*args))
        return 2.0

    monkeypatch.setattr(bench, "queued_seconds", timer)
    data = tmp_path / "qa.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Q{i}: " + "x" * (i % 9), "completion": " yes" * (1 + i % 3)}) + "\n"
                            for i in range(64)))
    out = tmp_path / "packing.json"
    assert main(["--model", str(tiny_ckpt), "--data", str(data), "--batch", "4", "--length", "48", "--steps", "1",
                 "--methods", "lora", "--json", str(out)]) == 0
    one, packed = json.loads(out.read_text())["records"]
    assert (one["layout"], packed["layout"]) == ("one per row", "packed")
    assert packed["rows"] < one["rows"] == one["examples"] - one["dropped"] and packed["padding"] < one["padding"]
    for r in (one, packed):  # non-padding positions of an average batch of 4 rows of 48 inputs, per 2 s
        assert r["real_tokens_per_s"] == pytest.approx((1 - r["padding"]) * 4 * 48 / 2.0, rel=1e-3)
    # each example's answer tokens (completion + EOS) are counted once whichever the layout
    assert packed["answer_tokens_per_s"] * packed["rows"] == pytest.approx(one["answer_tokens_per_s"] * one["rows"])


@pytest.mark.parametrize("args, message", [
    (["--shape", "gpt5"], "--shape 'gpt5' is not known"),
    (["--shape", "smollm2-135m", "--data", "x.jsonl"], "--data needs --model"),
    (["--shape", "smollm2-135m", "--methods", "lora,moe"], "--methods: unknown ['moe']"),
    (["--shape", "smollm2-135m", "--dtype", "float16"], "--dtype 'float16': expected float32 or bfloat16"),
    (["--shape", "smollm2-135m", "--batch", "0"], "--batch 0: expected a positive integer"),
    (["--model", "/nonexistent/ckpt"], "/nonexistent/ckpt: not an lsjax checkpoint"),
])
def test_train_bench_refuses_bad_flags_before_any_work(args, message, tmp_path, capsys):
    from lsjax.train.bench import main

    out = tmp_path / "never.json"
    with pytest.raises(SystemExit) as exit_info:
        main([*args, "--json", str(out)])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err and not out.exists()


def test_the_router_aux_loss_reaches_the_training_gradient():
    """A train step's gradient with aux_loss_coef c, less the same step's with 0, is c times the
    gradient of the load-balance loss, taken here straight from the adapted forward (SGD with rate
    1, so the update is the gradient)."""
    import jax
    import jax.numpy as jnp
    import optax
    from flax import nnx

    from lsjax.adapters import AdapterConfig, RouterConfig, adapted_forward
    from lsjax.config import ModelConfig
    from lsjax.model import Llama
    from lsjax.train.step import init_state, make_train_step

    mc = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4, num_kv_heads=2,
                     head_dim=8)
    base = Llama(mc, rngs=nnx.Rngs(0)).params()
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 64, (4, 12)).astype(np.int32)
    batch = {"ids": ids, "mask": np.ones_like(ids, bool), "segments": np.ones_like(ids, np.int32),
             "targets": np.roll(ids, -1, 1),
             "weights": np.ones(ids.shape, np.float32)}
    tx = optax.sgd(1.0)

    def gradient(coef):
        cfg = AdapterConfig(method="switch", num_experts=4, top_k=2, rank=4,
                            router=RouterConfig(aux_loss_coef=coef, z_loss_coef=0.0))
        state = init_state(mc, cfg, tx, seed=0)
        new, _ = jax.jit(make_train_step(mc, cfg, tx, lambda step: 1.0))(state, base, batch)
        return cfg, state["params"], jax.tree.map(jnp.subtract, state["params"], new["params"])

    cfg, params, with_aux = gradient(0.5)
    _, _, without = gradient(0.0)

    def load_balance(p):
        return adapted_forward(mc, base, cfg, p, batch["ids"], batch["mask"])[1].load_balance

    want = jax.grad(load_balance)(params)
    got = jax.tree.map(lambda a, b: (a - b) / 0.5, with_aux, without)
    router = np.asarray(want["routers"]["switch"])
    assert np.abs(router).max() > 1e-4  # the load balance really depends on the router
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-3, atol=1e-6)
