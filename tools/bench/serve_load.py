"""Completion tokens per second of an OpenAI-compatible server (`python -m tools.serve`), one request at a time
and with several at once.

    python -m tools.serve --run runs/quickstart --port 8000 --quiet &
    python -m tools.bench.serve_load --url http://127.0.0.1:8000/v1 --concurrency 1 8 --max-tokens 64

Every request asks for --max-tokens tokens with `ignore_eos` (so each produces exactly that many, greedily) after
one of a few fixed prompts. A warm-up round at each concurrency compiles the server's programs first and is not
counted; then --rounds rounds of `concurrency` simultaneous requests are timed from the first sent to the last
answered. Prints one line per concurrency: requests, completion tokens, seconds, tokens/s, mean latency.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import time
import urllib.request
from collections.abc import Sequence

PROMPTS = ("def ", "import os\n", "class Config:\n", "for i in range(", "    return ", "# Helpers\n", "with open(",
           "if __name__ == ")


def complete(url: str, prompt: str, max_tokens: int) -> tuple[int, float]:
    """(completion tokens, seconds) of one request."""
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}
    request = urllib.request.Request(url.rstrip("/") + "/completions", json.dumps(body).encode(),
                                     {"Content-Type": "application/json"})
    start = time.perf_counter()
    with urllib.request.urlopen(request, timeout=600) as response:
        out = json.loads(response.read())
    return out["usage"]["completion_tokens"], time.perf_counter() - start


def measure(url: str, concurrency: int, rounds: int, max_tokens: int) -> dict:
    with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
        def round_of_requests() -> list[tuple[int, float]]:
            prompts = [PROMPTS[i % len(PROMPTS)] for i in range(concurrency)]
            return list(pool.map(lambda p: complete(url, p, max_tokens), prompts))

        round_of_requests()  # compiles
        results, start = [], time.perf_counter()
        for _ in range(rounds):
            results += round_of_requests()
        seconds = time.perf_counter() - start
    tokens = sum(t for t, _ in results)
    return {"concurrency": concurrency, "requests": len(results), "tokens": tokens, "seconds": seconds,
            "tokens_per_s": tokens / seconds, "mean_latency_s": sum(s for _, s in results) / len(results)}


def main(argv: Sequence[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(prog="python -m tools.bench.serve_load", description=__doc__.split("\n\n")[0])
    p.add_argument("--url", default="http://127.0.0.1:8000/v1")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--max-tokens", type=int, default=64)
    args = p.parse_args(argv)
    rows = []
    for concurrency in args.concurrency:
        row = measure(args.url, concurrency, args.rounds, args.max_tokens)
        rows.append(row)
        print(f"concurrency {concurrency}: {row['requests']} requests, {row['tokens']} tokens in "
              f"{row['seconds']:.2f} s: {row['tokens_per_s']:.1f} tokens/s (mean latency {row['mean_latency_s']:.2f} s)",
              flush=True)
    return rows


if __name__ == "__main__":
    main()
