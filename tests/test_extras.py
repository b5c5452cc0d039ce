"""The core runs without the optional packages, and reaching for a missing one names its extra.

A child interpreter is made blind to the optional packages (an import hook at the head of
sys.meta_path), as on an image that lacks them; scripts/gpu_rehearsal.sh does the same with a venv.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OPTIONAL = ["gguf", "fastapi", "uvicorn", "pydantic", "starlette", "matplotlib", "tensorboardX", "peft", "openai"]
BLIND = f"""
import importlib.abc, sys
class Blind(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in {OPTIONAL!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
sys.meta_path.insert(0, Blind())
"""


def run_blind(code: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
    return subprocess.run([sys.executable, "-c", BLIND + code], capture_output=True, text=True, env=env, cwd=ROOT,
                          timeout=120)


def test_the_core_imports_without_optional_packages():
    done = run_blind("""
import json, sys
import lsjax, lsjax.cli, lsjax.generate, lsjax.strategies, lsjax.backends, lsjax.convert, lsjax.assets
import lsjax.eval.latency, lsjax.eval.serving, lsjax.eval.harness, lsjax.train.loop, lsjax.serve, pallas_kernels
print(json.dumps(sorted({m.split(".")[0] for m in sys.modules})))
""")
    assert done.returncode == 0, done.stderr[-2000:]
    loaded = set(json.loads(done.stdout.splitlines()[-1]))
    assert "lsjax" in loaded and "jax" in loaded and not loaded & set(OPTIONAL)


def test_a_missing_extra_is_a_clear_error_naming_it(tmp_path):
    out = tmp_path / "ckpt"
    done = run_blind(f"""
import sys
from lsjax.cli import main
from lsjax.extras import MissingExtraError, pyplot
codes = [main(["serve", "--ckpt", "nowhere"]), main(["convert", "--gguf", "model.gguf", "--out", {str(out)!r}])]
try:
    pyplot("a plot")
except MissingExtraError as e:
    print("plot:", e, file=sys.stderr)
print(codes)
""")
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split()[-2:] == ["[2,", "2]"]
    lines = done.stderr.strip().splitlines()
    assert "lsjax serve: error: the HTTP server (lsjax serve) needs the optional package" in lines[0]
    assert "pip install 'lsjax[serve]'" in lines[0]
    assert "lsjax convert: error: reading GGUF files needs the optional package 'gguf'" in lines[1]
    assert "pip install 'lsjax[gguf]'" in lines[1] and not out.exists()
    assert lines[2] == ("plot: a plot needs the optional package 'matplotlib', which is not installed: "
                        "pip install 'lsjax[plots]'")
    assert "Traceback" not in done.stderr
