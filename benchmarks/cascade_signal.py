"""Is the mean token log-probability a useful cascade signal? Measured on SmolLM2.

Usage: .venv/bin/python benchmarks/cascade_signal.py [--cheap q4_k_m] [--out results.json]

The cheap precision answers the labelled set's 400 match items greedily (asked as `wattops
quality` asks them) through the llama.cpp worker's own generation loop, with log-probabilities;
the base's (f16) answers come from the quality cache (`wattops quality MODEL` first). For each
threshold the cascade keeps the cheap answer when its mean token log-probability is at least
the threshold, else takes the base's answer: reported are the share escalated, the cascade's
task accuracy and its agreement with the base's answers (exact match, chrF drop), next to those
of always-cheap and of a random escalation of the same share (what a useless signal would
give).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import time
from pathlib import Path

from wattops.engines.llamacpp_worker import Worker
from wattops.engines.variants import VariantStore, model_identity
from wattops.quality import labelled_set, request_body
from wattops.quality.table import item_key
from wattops.vocabulary import cache_dir
from wattops.vocabulary.agreement import agreement

THRESHOLDS = (-0.25, -0.5, -0.75, -1.0, -1.25, -1.5)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path,
                        default=Path("models/smollm2-135m-instruct.f16.gguf"))  # fmt: skip
    parser.add_argument("--cheap", default="q4_k_m")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    cache = json.loads((cache_dir() / "quality" / f"{model_identity(args.model)}.json").read_text())
    items = [item for item in labelled_set() if item.matched]
    base_answers = [cache["answers"]["f16"][item_key(item)] for item in items]
    import asyncio

    cheap_file = asyncio.run(
        VariantStore(cache_dir() / "variants").ensure(args.model, args.cheap, os.cpu_count() or 1)
    )
    worker = Worker(argparse.Namespace(
        name="m", precision=args.cheap, default_max_tokens=48, prefix_cache=False,
        model=str(cheap_file), ctx=512, threads=os.cpu_count(), seed=0,
    ))  # fmt: skip
    prompts = [item.prompt for item in items]
    started = time.perf_counter()
    answers, confidence = [], []
    for item in items:
        params = worker._params({**request_body(item), "logprobs": True}, chat=True)
        result = worker.complete(params, chat=True)
        choice = result["choices"][0]
        answers.append(choice["message"]["content"] or "")
        values = [t["logprob"] for t in (choice["logprobs"] or {}).get("content") or []]
        confidence.append(sum(values) / len(values) if values else 0.0)
    elapsed = time.perf_counter() - started
    always = agreement(base_answers, answers)

    def accuracy(given: list[str]) -> float:
        return sum(item.right(a) for item, a in zip(items, given, strict=True)) / len(items)

    rows = []
    rng = random.Random(0)
    for threshold in THRESHOLDS:
        escalate = [c < threshold for c in confidence]
        mixed = [b if e else a for a, b, e in zip(answers, base_answers, escalate, strict=True)]
        share = sum(escalate) / len(escalate)
        picked = set(rng.sample(range(len(prompts)), round(share * len(prompts))))
        blind = [b if i in picked else a
                 for i, (a, b) in enumerate(zip(answers, base_answers, strict=True))]  # fmt: skip
        got, chance = agreement(base_answers, mixed), agreement(base_answers, blind)
        rows.append({
            "threshold": threshold, "escalated": share,
            "accuracy": accuracy(mixed), "random_accuracy": accuracy(blind),
            "exact_match": got.exact_match, "chrf_drop": got.chrf_drop,
            "random_exact_match": chance.exact_match, "random_chrf_drop": chance.chrf_drop,
        })  # fmt: skip
    report = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.python_version()}",
        "model": args.model.name,
        "cheap": args.cheap,
        "prompts": len(prompts),
        "seconds": elapsed,
        "base_accuracy": accuracy(base_answers),
        "always_cheap": {
            "accuracy": accuracy(answers),
            "exact_match": always.exact_match,
            "chrf_drop": always.chrf_drop,
        },
        "thresholds": rows,
    }
    print(json.dumps(report, indent=2))
    if args.out:
        args.out.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
