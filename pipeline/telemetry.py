"""Prometheus metrics of `ggro serve` and `ggro align` on Ray, through Ray's metrics API.

Every metric is defined once here (`SPECS`); the Serve ingress and the batch Aligner call the small
`record_*` functions below. Ray's per-node metrics agent exports them in Prometheus text on the node's
metrics export port, named `ray_<name>` (counters end in `_total`); docs/metrics.md lists them.

Recording never fails the caller: the metrics are created lazily in the process that records (Ray
metrics are per process and cannot travel inside pickled actors), and a metric that cannot be created
or recorded (no metrics agent, an unusual Ray build) is logged once and skipped. Outside Ray the
calls cost a dictionary lookup and record nothing an agent would read.
"""
from __future__ import annotations

import logging
import math
import threading

log = logging.getLogger(__name__)

SECONDS = [0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600]
COUNTS = [0.5, 1.5, 2.5, 3.5, 4.5, 6.5, 8.5, 12.5, 16.5, 32.5, 64.5]   # integer k lands in bucket le=k+0.5
# Ray's Histogram takes positive boundaries only: a negative reward (a classifier's logit) counts in the
# lowest bucket, and the mean reward (`_sum / _count`) stays exact whatever the sign.
REWARDS = [0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 1, 2, 5, 10]

# name: (kind, description, tag keys, histogram boundaries)
SPECS: dict[str, tuple[str, str, tuple[str, ...], list | None]] = {
    "ggro_serve_requests": ("counter", "HTTP completion requests answered, by endpoint and status (499: the "
                            "client disconnected)", ("app", "endpoint", "status"), None),
    "ggro_serve_errors": ("counter", "Completion requests answered with an error status (>= 400)",
                          ("app", "endpoint", "status"), None),
    "ggro_serve_request_seconds": ("histogram", "Seconds from a request's arrival to its last byte",
                                   ("app", "endpoint"), SECONDS),
    "ggro_serve_first_token_seconds": ("histogram", "Streams: seconds from arrival to the first text chunk",
                                       ("app", "endpoint"), SECONDS),
    "ggro_serve_queue_depth": ("gauge", "Prompts (choices) admitted now, running or waiting", ("app",), None),
    "ggro_serve_prompt_tokens": ("counter", "Prompt tokens of answered requests", ("app",), None),
    "ggro_serve_completion_tokens": ("counter", "Completion tokens of answered requests", ("app",), None),
    "ggro_serve_cancelled_prompts": ("counter", "Prompts withdrawn before their answer: the client "
                                     "disconnected or the request timed out", ("app",), None),
    "ggro_responses": ("counter", "Responses a search produced", ("source", "method"), None),
    "ggro_reward_calls": ("counter", "Reward-model calls (one per scored candidate)", ("source", "method"), None),
    "ggro_nudges": ("histogram", "Refinements accepted (nudges kept) per response", ("source", "method"), COUNTS),
    "ggro_reward": ("histogram", "Reward of the kept response", ("source", "method"), REWARDS),
    "ggro_batch_rows": ("counter", "Output rows the batch aligners produced, by status (ok, error)",
                        ("status",), None),
}

_lock = threading.Lock()
_metrics: dict = {}
_broken: set[str] = set()


def _metric(name: str):
    """The process's metric `name`, created on first use; None when it cannot be created here."""
    m = _metrics.get(name)
    if m is not None or name in _broken:
        return m
    with _lock:
        if name in _metrics or name in _broken:
            return _metrics.get(name)
        kind, desc, tags, bounds = SPECS[name]
        try:
            from ray.util import metrics as rm
            if kind == "counter":
                m = rm.Counter(name, description=desc, tag_keys=tags)
            elif kind == "gauge":
                m = rm.Gauge(name, description=desc, tag_keys=tags)
            else:
                m = rm.Histogram(name, description=desc, boundaries=bounds, tag_keys=tags)
        except Exception as e:   # metrics are optional: never fail the request or the batch over them
            log.warning("ggro metrics: cannot create %s (%s: %s); not recording it", name, type(e).__name__, e)
            _broken.add(name)
            return None
        _metrics[name] = m
        return m


def _record(name: str, value: float, tags: dict) -> None:
    m = _metric(name)
    if m is None:
        return
    kind = SPECS[name][0]
    try:
        if kind == "counter":
            if value > 0:           # Ray's Counter.inc rejects 0
                m.inc(value, tags=tags)
        elif kind == "gauge":
            m.set(value, tags=tags)
        else:
            m.observe(value, tags=tags)
    except Exception as e:
        if name not in _broken:
            log.warning("ggro metrics: cannot record %s (%s: %s); not recording it", name, type(e).__name__, e)
            _broken.add(name)
            _metrics.pop(name, None)


def _str(v) -> str:
    return "" if v is None else str(v)


# -- Serve ------------------------------------------------------------------------------------------------
def record_request(app: str, endpoint: str, status: int, seconds: float, prompt_tokens: int = 0,
                   completion_tokens: int = 0) -> None:
    """One completion request answered (or abandoned by its client: status 499)."""
    tags = {"app": _str(app), "endpoint": endpoint, "status": str(status)}
    _record("ggro_serve_requests", 1, tags)
    if status >= 400:
        _record("ggro_serve_errors", 1, tags)
    _record("ggro_serve_request_seconds", seconds, {"app": _str(app), "endpoint": endpoint})
    _record("ggro_serve_prompt_tokens", prompt_tokens, {"app": _str(app)})
    _record("ggro_serve_completion_tokens", completion_tokens, {"app": _str(app)})


def record_first_token(app: str, endpoint: str, seconds: float) -> None:
    _record("ggro_serve_first_token_seconds", seconds, {"app": _str(app), "endpoint": endpoint})


def record_queue_depth(app: str, admitted: int) -> None:
    _record("ggro_serve_queue_depth", admitted, {"app": _str(app)})


def record_cancelled(app: str, prompts: int) -> None:
    _record("ggro_serve_cancelled_prompts", prompts, {"app": _str(app)})


def serve_app_name() -> str:
    """The Serve application this replica belongs to ("" outside a replica)."""
    try:
        from ray import serve
        return serve.get_replica_context().app_name
    except Exception:
        return ""


# -- search results (Serve and batch) -----------------------------------------------------------------------
def record_response(source: str, method: str, reward, nudges, reward_calls) -> None:
    """One response a search produced: `reward` None or NaN when there is none."""
    tags = {"source": source, "method": _str(method)}
    _record("ggro_responses", 1, tags)
    _record("ggro_reward_calls", reward_calls or 0, tags)
    if nudges is not None:
        _record("ggro_nudges", nudges, tags)
    if reward is not None and not math.isnan(reward):
        _record("ggro_reward", reward, tags)


def record_rows(records: list[dict]) -> None:
    """Batch: the output rows (OUTPUT_SCHEMA dicts) of one Aligner call."""
    errors = sum(r.get("error") is not None for r in records)
    _record("ggro_batch_rows", len(records) - errors, {"status": "ok"})
    _record("ggro_batch_rows", errors, {"status": "error"})
    for r in records:
        if r.get("error") is None:
            record_response("batch", r.get("method"), r.get("reward"), r.get("num_nudges"), r.get("reward_calls"))
