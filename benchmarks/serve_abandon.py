"""Latency of a short request right after abandoned streams, against a running `ggro serve`.

    python benchmarks/serve_abandon.py --base-url http://127.0.0.1:8000/v1 --streams 12 --max-tokens 256

Times a 4-token chat request on the idle server (median of 3), then, 3 times: opens `--streams` long
streams, reads each one's first chunk, closes them all and at once times the same 4-token request. The
abandoned streams' rows leave the model's decode batch at its next step, so the short request should take
about its idle latency (the target: within 2x), not the abandoned decodes' length.
"""
from __future__ import annotations

import argparse
import statistics
import time


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="benchmarks/serve_abandon.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    p.add_argument("--api-key", default="none")
    p.add_argument("--model", default="ggro")
    p.add_argument("--streams", type=int, default=12)
    p.add_argument("--max-tokens", type=int, default=256, help="of each abandoned stream")
    p.add_argument("--method", default=None, help="the requests' ggro.method (the server's default if unset)")
    args = p.parse_args(argv)
    from openai import OpenAI
    client = OpenAI(base_url=args.base_url, api_key=args.api_key, max_retries=0, timeout=3600)
    extra = {"ggro": {"method": args.method}} if args.method else {}
    msgs = [{"role": "user", "content": "Write a long story about a lighthouse keeper."}]

    def short() -> float:
        t = time.perf_counter()
        client.chat.completions.create(model=args.model, messages=msgs, max_tokens=4, extra_body=extra)
        return time.perf_counter() - t

    short()   # warm
    idle = statistics.median(short() for _ in range(3))
    after = []
    for _ in range(3):
        streams = [client.chat.completions.create(model=args.model, messages=msgs, max_tokens=args.max_tokens,
                                                  stream=True, extra_body=extra) for _ in range(args.streams)]
        for s in streams:
            next(iter(s))
        for s in streams:
            s.close()
        after.append(short())
    print(f"idle 4-token request: {idle:.3f}s (median of 3)")
    print(f"after {args.streams} abandoned streams: " + ", ".join(f"{a:.3f}s" for a in after)
          + f"; worst {max(after) / idle:.1f}x idle")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
