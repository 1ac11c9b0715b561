"""Streaming benchmark: tokens/s of a streamed answer against the same answer unstreamed.

Usage: .venv/bin/python benchmarks/streaming.py --model models/test.gguf [--tokens 600]
       [--runs 3] [--worker path/to/llamacpp_worker.py]

Starts one llama.cpp replica (the worker the agent runs, or another version of it given by
`--worker`, to compare), then asks it for the same completion (fixed seed, temperature 0.7)
unstreamed and streamed, `--runs` times each, alternating. Reported per mode: completion
tokens, wall seconds from request to last byte, tokens/s; and whether the streamed text equals
the unstreamed one. The prompt asks for a long answer (a count); a model that ends it early
reports fewer tokens, and tokens/s is taken over what it produced.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

PROMPT = "Count from one to one thousand in words, one number per line:\none\ntwo\nthree\n"


def start_worker(model: Path, worker: Path | None, ctx: int) -> tuple[subprocess.Popen[bytes], str]:
    program = [str(worker)] if worker else ["-m", "wattops.engines.llamacpp_worker"]
    argv = [sys.executable, *program, "--model", str(model), "--name", "bench", "--ctx", str(ctx)]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    assert proc.stdout is not None
    line = proc.stdout.readline().decode().split()
    if len(line) < 2 or line[0] != "LISTENING":
        raise SystemExit(f"the worker did not start: {line}")
    return proc, f"http://127.0.0.1:{int(line[1])}"


def unstreamed(http: httpx.Client, url: str, body: dict[str, Any]) -> tuple[float, int, str]:
    started = time.perf_counter()
    answer = http.post(url + "/v1/completions", json=body).json()
    return (
        time.perf_counter() - started,
        answer["usage"]["completion_tokens"],
        answer["choices"][0]["text"],
    )


def streamed(http: httpx.Client, url: str, body: dict[str, Any]) -> tuple[float, int, str]:
    started = time.perf_counter()
    parts: list[str] = []
    tokens = 0
    stream_body = {**body, "stream": True, "stream_options": {"include_usage": True}}
    with http.stream("POST", url + "/v1/completions", json=stream_body) as resp:
        for line in resp.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            for choice in chunk["choices"]:
                parts.append(choice.get("text") or "")
    return time.perf_counter() - started, tokens, "".join(parts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--tokens", type=int, default=600)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--worker", type=Path, help="another llamacpp_worker.py to measure")
    args = parser.parse_args()
    proc, url = start_worker(args.model, args.worker, ctx=max(2048, args.tokens + 256))
    body = {"model": "bench", "prompt": PROMPT, "max_tokens": args.tokens, "temperature": 0.7,
            "seed": 7}  # fmt: skip
    results: dict[str, list[tuple[float, int, str]]] = {"unstreamed": [], "streamed": []}
    try:
        with httpx.Client(timeout=1800) as http:
            for _ in range(args.runs):
                results["unstreamed"].append(unstreamed(http, url, body))
                results["streamed"].append(streamed(http, url, body))
    finally:
        proc.terminate()
        proc.wait(30)
    report: dict[str, Any] = {
        "machine": f"{platform.machine()}, {len(__import__('os').sched_getaffinity(0))} cores, "
        f"Python {platform.python_version()}",
        "model": args.model.name,
        "worker": str(args.worker or "wattops.engines.llamacpp_worker"),
        "max_tokens": args.tokens,
    }
    for mode, runs in results.items():
        seconds = [s for s, _, _ in runs]
        tokens = runs[0][1]
        report[mode] = {
            "completion_tokens": tokens,
            "seconds_median": round(statistics.median(seconds), 2),
            "tokens_per_s": round(tokens / statistics.median(seconds), 1),
        }
    texts = {text for runs in results.values() for _, _, text in runs}
    report["streamed_equals_unstreamed"] = len(texts) == 1
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
