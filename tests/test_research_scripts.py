"""The research scripts in the top-level `train/` and `eval/` folders, each run at tiny size."""

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    from tiny import make_hf_model

    from lsjax.convert import convert_hf

    folder = tmp_path_factory.mktemp("research")
    make_hf_model(folder / "hf")
    return convert_hf(folder / "hf", folder / "ckpt", progress=False)


def script(path: str, *args) -> str:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
    done = subprocess.run([sys.executable, str(ROOT / path), *map(str, args)], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_train_then_evaluate_a_switch_adapter(tiny_ckpt, tmp_path):
    from lsjax.adapters import load_adapter_arrays
    from lsjax.checkpoint import read_config

    config = yaml.safe_load((ROOT / "train/configs/switch.yaml").read_text())
    config.update(tasks=["arc_easy"], max_length=48, batch_size=4, lr=1e-2, warmup=1, log_every=1)
    config["adapter"].update(num_experts=4, rank=4)
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(config))
    out = script("train/train_switch.py", "--ckpt", tiny_ckpt, "--config", tmp_path / "tiny.yaml",
                 "--out", tmp_path / "adapter", "--steps", 12)
    losses = [float(x) for x in re.findall(r"answer loss (\d+\.\d+)", out)]
    assert len(losses) == 12 and np.mean(losses[-4:]) < np.mean(losses[:4])  # it learns
    adapter_config, arrays = load_adapter_arrays(tmp_path / "adapter", read_config(tiny_ckpt))
    assert adapter_config.method == "switch" and adapter_config.num_experts == 4
    assert np.abs(np.asarray(arrays["experts"]["qkv"]["b"])).max() > 0  # B starts at zero: it was trained

    out = script("eval/accuracy.py", "--ckpt", tiny_ckpt, "--adapter", tmp_path / "adapter", "--tasks", "arc_easy",
                 "--limit", 6, "--max-length", 128)
    assert out.count("| arc_easy |") == 2 and "base:" in out and "adapter:" in out
    assert len(re.findall(r"^\| arc_easy \| [\d.]+ \| [\d.]+ \| 6 \|$", out, re.M)) == 2  # 6 documents each


def test_instruction_script_trains_a_switch_adapter_on_a_chat_file(tiny_ckpt, tmp_path):
    import json

    from lsjax.adapters import load_adapter_arrays
    from lsjax.checkpoint import read_config

    chats = [{"messages": [{"role": "user", "content": f"say {w}"}, {"role": "assistant", "content": f"{w} {w}!"}]}
             for w in ["sun", "rain", "tea", "map", "road", "blue"] * 6]
    data = tmp_path / "chats.jsonl"
    data.write_text("".join(json.dumps(c) + "\n" for c in chats))
    out = script("train/train_instructions.py", "--ckpt", tiny_ckpt, "--data", data, "--out", tmp_path / "adapter",
                 "--steps", 12, "--batch-size", 2, "--max-length", 64, "--lr", 0.01)
    assert re.search(r"^\d+ examples in \d+ rows \(\d+% padding, 0 too long\)$", out, re.M)
    losses = [float(x) for x in re.findall(r"answer loss (\d+\.\d+)", out)]
    assert len(losses) == 12 and np.mean(losses[-4:]) < np.mean(losses[:4])  # it learns
    adapter_config, arrays = load_adapter_arrays(tmp_path / "adapter", read_config(tiny_ckpt))
    assert adapter_config.method == "switch" and np.abs(np.asarray(arrays["experts"]["qkv"]["b"])).max() > 0


def test_latency_script_times_switch_against_the_base(tiny_ckpt):
    out = script("eval/latency.py", "--ckpt", tiny_ckpt, "--tokens", 4, "--rounds", 1)
    base, switch = (float(re.search(rf"^{n}: (\d+\.\d+) ms/token", out, re.M).group(1)) for n in ("base", "switch"))
    ratio = float(re.search(r"switch / base, batch 1: (\d+\.\d+)x", out).group(1))
    assert ratio == pytest.approx(switch / base, rel=0.05)  # the printed figures are rounded



def test_quantized_latency_script_times_int8_and_4bit_against_fp32(tiny_ckpt, tmp_path):
    import json

    out = script("eval/quantized_latency.py", "--ckpt", tiny_ckpt, "--batch", 1, "--tokens", 4, "--rounds", 1,
                 "--json", tmp_path / "q.json")
    data = json.loads((tmp_path / "q.json").read_text())
    records = data["records"]
    assert data["meta"]["complete"] and [r["weights"] for r in records] == ["fp32", "int8", "4-bit"]
    fp32 = records[0]
    for r in records:
        assert r["base_vs_float"] == pytest.approx(r["base_ms"] / fp32["base_ms"])
        assert r["switch_vs_base"] == pytest.approx(r["switch_ms"] / r["base_ms"])
        assert f"batch 1 {r['weights']:>5}: weights {r['weight_mb']:.1f} MB" in out
    assert records[2]["bytes_vs_float"] < records[1]["bytes_vs_float"] < 0.5  # 4-bit < int8 < half of fp32
    # batch 1 reads top-2 experts: rank 16 on every projection of the tiny Llama (hidden 64, 4 heads
    # of 16, 2 kv heads, MLP 96, 2 layers), A [in, 16] and B [16, out] each, in fp32
    projections = [(64, 64), (64, 32), (64, 32), (64, 64), (64, 96), (64, 96), (96, 64)]
    expert = 2 * sum(16 * (k + n) * 4 for k, n in projections)
    for r in records:
        assert r["expert_mb"] * 2**20 == pytest.approx(2 * expert)
        assert r["switch_bytes_vs_base"] == pytest.approx((r["weight_mb"] + r["expert_mb"]) / r["weight_mb"])
