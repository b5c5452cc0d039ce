#!/usr/bin/env bash
# Wheels of what the GPU image lacks and a step of scripts/gpu_bench.sh needs: the `serve` extra
# (fastapi, uvicorn, pydantic), the `gguf` extra, and the openai client of the server's tests, with
# their requirements less what the image already has (scripts/gpu_image_packages.txt). The folder is
# ignored by git; the GPU run carries it and gpu_bench.sh installs from it offline.
#
#   bash scripts/gpu_wheels.sh                 # Python 3.12 manylinux wheels (the GPU image) into .whl/
#   DEST=DIR PYTHON_VERSION=3.11 bash scripts/gpu_wheels.sh    # another folder, another Python (the rehearsal)
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=${DEST:-.whl}
PYTHON_VERSION=${PYTHON_VERSION:-3.12}
PY=${PY:-python3}
PACKAGES=(fastapi uvicorn pydantic gguf openai)
rm -rf "$DEST" && mkdir -p "$DEST"
platforms=()
for p in manylinux_2_39 manylinux_2_35 manylinux_2_34 manylinux_2_31 manylinux_2_28 manylinux_2_27 manylinux_2_24 \
         manylinux_2_17 manylinux2014 manylinux1; do
  platforms+=(--platform "${p}_x86_64")
done
log=$(mktemp)
$PY -m pip download -q --disable-pip-version-check --only-binary=:all: --implementation cp \
  --python-version "$PYTHON_VERSION" "${platforms[@]}" -d "$DEST" "${PACKAGES[@]}" >"$log" 2>&1 || { cat "$log"; exit 1; }
rm -f "$log"
# keep what the image lacks: a second version of a package it has would stop the offline install
$PY - "$DEST" <<'PY'
import re, sys
from pathlib import Path

def norm(name):
    return re.sub(r"[-_.]+", "-", name).lower()

image = {norm(line) for line in Path("scripts/gpu_image_packages.txt").read_text().splitlines()
         if line.strip() and not line.startswith("#")}
kept = []
for wheel in sorted(Path(sys.argv[1]).glob("*.whl")):
    name = norm(wheel.name.split("-")[0])
    if name in image:
        wheel.unlink()
    else:
        kept.append(wheel.name)
print(f"{len(kept)} wheels in {sys.argv[1]}: {', '.join(kept)}")
PY
du -sh "$DEST"
