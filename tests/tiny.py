"""Tiny random Hugging Face models written to disk, the independent reference for parity tests."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

VOCAB = 128


def tiny_tokenizer_files(folder: Path) -> None:
    """A small byte-level BPE tokenizer.json (+ config with a chat template) for tiny test models."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    specials = ["<unk>", "<s>", "</s>"]
    printable = ["\u0120", "\u010a"] + [chr(c) for c in range(33, 127)]  # space, newline, ASCII
    rest = sorted(set(alphabet) - set(printable))
    vocab = {tok: i for i, tok in enumerate((specials + printable + rest)[:VOCAB])}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token="</s>")
    fast.chat_template = "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>{% endfor %}" \
                         "{% if add_generation_prompt %}<s>assistant:{% endif %}"
    fast.save_pretrained(str(folder))


def make_hf_model(folder: Path, model_type: str = "llama", seed: int = 0, shard_size: str | None = None, **overrides):
    """Save a random transformers model (fp32 safetensors) + tokenizer into `folder`; return the model."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM

    torch.manual_seed(seed)
    kwargs = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=256, rms_norm_eps=1e-5,
                  bos_token_id=1, eos_token_id=2, pad_token_id=2)
    kwargs.update(overrides)
    if model_type == "mistral":
        config, cls = MistralConfig(**kwargs), MistralForCausalLM
    else:
        config, cls = LlamaConfig(**kwargs), LlamaForCausalLM
    config._attn_implementation = "eager"
    model = cls(config).eval()
    with torch.no_grad():  # norms are ones at init: randomise them so a swapped norm would show
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(folder), max_shard_size=shard_size or "10GB")
    tiny_tokenizer_files(folder)
    return model


def hf_logits(model, ids: np.ndarray) -> np.ndarray:
    import torch

    with torch.no_grad():
        return model(torch.tensor(np.asarray(ids)[None], dtype=torch.long)).logits[0].numpy()


def ragged_batch(lengths, vocab=VOCAB, seed=0, pad_side="right", pad_id=0):
    """Token ids `[B, max_len]`, attention mask, and the unpadded sequences."""
    rng = np.random.default_rng(seed)
    seqs = [rng.integers(3, vocab, size=n) for n in lengths]
    width = max(lengths)
    ids = np.full((len(seqs), width), pad_id, np.int32)
    mask = np.zeros((len(seqs), width), np.int32)
    for i, s in enumerate(seqs):
        sl = slice(0, len(s)) if pad_side == "right" else slice(width - len(s), width)
        ids[i, sl], mask[i, sl] = s, 1
    return ids, mask, seqs


def read_json(path: Path) -> dict:
    return json.loads(Path(path).read_text())
