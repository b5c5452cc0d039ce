"""The real SmolLM2-135M-Instruct, converted from its GGUF, against transformers' GGUF loading."""

import numpy as np
import torch

import lsjax
from lsjax.generate import Generator

MESSAGES = [[{"role": "user", "content": "What is the capital of France?"}],
            [{"role": "user", "content": "Name three primary colours."}],
            [{"role": "user", "content": "Write a haiku about the sea."}]]


def chat_ids(tokenizer, messages):
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    return list(getattr(ids, "input_ids", ids))


def test_logits_match_transformers(smollm2_ckpt, reference_model):
    model, tokenizer = lsjax.load(smollm2_ckpt, dtype="float32")
    prompts = [chat_ids(tokenizer, m) for m in MESSAGES]
    width = max(map(len, prompts))
    ids = np.zeros((len(prompts), width), np.int32)
    mask = np.zeros_like(ids)
    for row, p in enumerate(prompts):
        ids[row, : len(p)], mask[row, : len(p)] = p, 1
    logits = np.asarray(model(ids, attention_mask=mask))
    for row, p in enumerate(prompts):
        with torch.no_grad():
            want = reference_model(torch.tensor([p])).logits[0].numpy()
        assert np.abs(logits[row, : len(p)] - want).max() <= 1e-3


def test_greedy_continuation_matches_transformers(smollm2_ckpt, reference_model):
    model, tokenizer = lsjax.load(smollm2_ckpt, dtype="float32")
    prompts = [chat_ids(tokenizer, m) for m in MESSAGES]
    got = Generator(model, tokenizer).generate(prompts, max_new_tokens=32).token_ids  # one batch, ragged
    for prompt, tokens in zip(prompts, got):
        with torch.no_grad():
            want = reference_model.generate(torch.tensor([prompt]), max_new_tokens=32, do_sample=False,
                                            pad_token_id=tokenizer.pad_token_id)
        assert tokens == want[0, len(prompt):].tolist()
    assert "Paris" in tokenizer.decode(got[0])
    assert max(map(len, got)) == 32  # at least one answer runs the full 32 tokens
