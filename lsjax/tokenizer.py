"""Tokenizers are transformers' fast tokenizers, built from the files a checkpoint carries."""

from __future__ import annotations

from pathlib import Path

from lsjax.errors import CheckpointError


def load_tokenizer(folder: str | Path):
    """A `PreTrainedTokenizerFast` (encode/decode, chat template) from `tokenizer.json` and friends."""
    from transformers import PreTrainedTokenizerFast

    folder = Path(folder)
    if not (folder / "tokenizer.json").is_file():
        raise CheckpointError(f"{folder}: missing tokenizer.json")
    return PreTrainedTokenizerFast.from_pretrained(str(folder), local_files_only=True)
