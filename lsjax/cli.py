"""The `lsjax` command line. Each subcommand is a thin shell over the library API."""

from __future__ import annotations

import argparse
import sys

from lsjax.errors import LsjaxError


def _convert(args) -> None:
    from lsjax.convert import convert_gguf, convert_hf

    if args.hf:
        out = convert_hf(args.hf, args.out, dtype=args.dtype)
    else:
        if args.gguf == "default":
            from lsjax.assets import default_gguf_path
            args.gguf = default_gguf_path()
        out = convert_gguf(args.gguf, args.out, dtype=args.dtype or "float32")
    print(f"wrote {out}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lsjax", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    convert = sub.add_parser("convert", help="convert a Hugging Face folder or a GGUF file to an lsjax checkpoint")
    source = convert.add_mutually_exclusive_group(required=True)
    source.add_argument("--hf", metavar="DIR", help="folder with config.json, *.safetensors, tokenizer.json")
    source.add_argument("--gguf", metavar="FILE", help="GGUF file, or 'default' for the embedded SmolLM2-135M-Instruct")
    convert.add_argument("--out", required=True, metavar="CKPT", help="checkpoint folder to create (must not exist)")
    convert.add_argument("--dtype", default=None, help="stored dtype: float32, bfloat16, float16 (default: the source's)")
    convert.set_defaults(run=_convert)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except LsjaxError as e:
        print(f"lsjax {args.command}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
