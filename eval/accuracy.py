"""Held-out accuracy of a base model and of the same model with an adapter, on benchmark tasks.

    python eval/accuracy.py --ckpt CKPT --adapter runs/my-switch --tasks arc_easy,openbookqa --limit 100

Each document's choices are scored by the log-likelihood of their tokens (acc) and per character
(acc_norm), on the held-out split (a hash of the document id; `lsjax.data`). The adapter's logits
come from the pure `adapted_forward`: swap in your own function of (ids, mask) to score anything.
"""

import argparse
import functools

import jax

import lsjax
from lsjax.adapters import adapted_forward, open_adapter
from lsjax.eval.harness import evaluate, format_table, load_docs, model_logits_fn


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ckpt", required=True)
    parser.add_argument("--adapter", help="adapter folder (lsjax or PEFT)")
    parser.add_argument("--tasks", default="arc_easy,arc_challenge,openbookqa")
    parser.add_argument("--limit", type=int, help="documents per task")
    parser.add_argument("--max-length", type=int, default=512)
    args = parser.parse_args(argv)

    model, tokenizer = lsjax.load(args.ckpt)
    docs = load_docs(args.tasks, "heldout", args.limit)
    scored = {"base": model_logits_fn(model)}
    if args.adapter:
        adapter = open_adapter(args.adapter, model.config)
        base, arrays, config = model.params(), adapter.arrays(), adapter.config

        @functools.partial(jax.jit, static_argnums=5)  # the arrays as arguments: not baked into the program
        def adapted(base, arrays, ids, positions, visibility, last):
            return adapted_forward(model.config, base, config, arrays, ids, positions=positions,
                                   visibility=visibility, last=last)[0]

        scored["adapter"] = lambda *inputs: adapted(base, arrays, *inputs)
    for name, logits_fn in scored.items():
        results = evaluate(logits_fn, tokenizer, docs, max_length=args.max_length, progress=False)
        print(f"{name}:\n{format_table(results, 'heldout')}\n")


if __name__ == "__main__":
    main()
