"""Throughput of a running `ggro serve`: N requests one after another, then the same N at once.

    python benchmarks/serve_bench.py --base-url http://127.0.0.1:8000/v1 --requests 16 --max-tokens 32

Prints wall time, requests/s and completion tokens/s for both, their ratio, and how many answers came
out identical (greedy GGRO is deterministic; batching must not change answers).
"""
from __future__ import annotations

import argparse
import json
import time
from concurrent.futures import ThreadPoolExecutor

PROMPTS = [
    "How do I bake a simple chocolate cake?", "What is 17 + 25? Answer briefly.",
    "Give me three tips for sleeping better.", "Explain what a prime number is.",
    "Write a haiku about autumn.", "How do plants make food?", "What causes the seasons?",
    "Suggest a name for a pet turtle.", "Why is the sky blue?", "How do I boil an egg?",
    "What is the capital of France?", "Describe a cat in one sentence.", "How far is the Moon?",
    "Give me a synonym for happy.", "What does a compiler do?", "How can I learn to swim?",
]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="benchmarks/serve_bench.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    p.add_argument("--api-key", default="none")
    p.add_argument("--model", default="ggro")
    p.add_argument("--requests", type=int, default=16)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--phase", choices=("both", "sequential", "concurrent"), default="both")
    p.add_argument("--ggro", default="{}", help='JSON for the request\'s `ggro` object, e.g. \'{"num_refinements": 2}\'')
    args = p.parse_args(argv)
    from openai import OpenAI
    client = OpenAI(base_url=args.base_url, api_key=args.api_key, max_retries=0, timeout=3600)
    knobs = json.loads(args.ggro)
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(args.requests)]

    def one(text):
        r = client.chat.completions.create(model=args.model, messages=[{"role": "user", "content": text}],
                                           max_tokens=args.max_tokens, extra_body={"ggro": knobs})
        return r.choices[0].message.content, r.usage.completion_tokens

    def report(name, out, t):
        ok = [o for o in out if o[0] is not None]
        print(f"{name}: {args.requests} requests in {t:.1f} s = {len(ok) / t:.2f} req/s, "
              f"{sum(n for _, n in ok) / t:.1f} completion tok/s ({len(out) - len(ok)} failed)", flush=True)

    def safe(text):
        try:
            return one(text)
        except Exception as e:   # e.g. 504 past --request-timeout: count it, keep measuring
            print(f"  request failed: {e}", flush=True)
            return None, 0

    one(prompts[0])   # warm-up: prefix caches, lazy imports
    seq = conc = None
    if args.phase in ("both", "sequential"):
        t0 = time.perf_counter()
        seq = [safe(t) for t in prompts]
        t_seq = time.perf_counter() - t0
        report("sequential", seq, t_seq)
    if args.phase in ("both", "concurrent"):
        t0 = time.perf_counter()
        with ThreadPoolExecutor(len(prompts)) as ex:
            conc = list(ex.map(safe, prompts))
        t_conc = time.perf_counter() - t0
        report("concurrent", conc, t_conc)
    if seq and conc:
        same = sum(a[0] == b[0] for a, b in zip(seq, conc))
        print(f"throughput ratio (concurrent / sequential): {t_seq / t_conc:.2f}x; identical answers: "
              f"{same}/{args.requests}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
