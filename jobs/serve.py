"""`ggro serve`: GGRO behind an OpenAI-compatible HTTP API on Ray Serve.

    ggro serve --policy default --port 8000                   (local Ray, 127.0.0.1:8000)
    GGRO_SERVE_ARGS="--policy /models/p --max-queue 32" serve run jobs.serve:app
    serve run jobs.serve:build policy=/models/p max_queue=32  (an application builder)

Routes: POST /v1/chat/completions, POST /v1/completions, GET /v1/models, GET /health.
The same flags configure all three ways; `app` reads them from the env var GGRO_SERVE_ARGS (and the
API key from GGRO_API_KEY), which is what a RayService `import_path: jobs.serve:app` uses.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import shlex
import signal
import sys
import time

from ggro.config import ConfigError, ModelLoadError
from jobs.common import Parser, add_engine_args, add_resource_args, fail, resolve_args, resources_from_args
from jobs.logs import add_log_args, log, log_to_driver, setup_logging
from jobs.plan import add_plan_args
from actors.resources import SERVE_INGRESS_CPUS, plan_auto

ENV_ARGS = "GGRO_SERVE_ARGS"
ENV_KEY = "GGRO_API_KEY"


SERVER_DEFAULTS = {"host": "127.0.0.1", "port": 8000, "api_key": None, "model_name": "ggro",
                   "max_tokens_limit": 512, "max_queue": 64, "request_timeout": 300.0, "address": None}


def add_serve_args(p: argparse.ArgumentParser) -> None:
    d = SERVER_DEFAULTS
    s = p.add_argument_group("server")
    s.add_argument("--host", default=d["host"], help="interface to bind; 0.0.0.0 to expose")
    s.add_argument("--port", type=int, default=d["port"])
    s.add_argument("--api-key", help=f"require `Authorization: Bearer KEY` (or set ${ENV_KEY}) [no key]")
    s.add_argument("--model-name", default=d["model_name"], help="the model id clients pass as `model`")
    s.add_argument("--max-tokens-limit", type=int, default=d["max_tokens_limit"],
                   help="largest max_tokens a request may ask for")
    s.add_argument("--max-queue", type=int, default=d["max_queue"],
                   help="prompts admitted at once (running or waiting); beyond it: 503 + Retry-After")
    s.add_argument("--request-timeout", type=float, default=d["request_timeout"], help="seconds per request before 504")
    s.add_argument("--address", help="Ray cluster address [start a local Ray]")
    # the policy and reward deployments, in align's words (a policy replica is --tp rank actors; > 1 gives a
    # policy-as-judge its own unsharded copy); the ingress is one replica of its own
    add_resource_args(p.add_argument_group("model deployments"), aligners=False)


def add_args(p: argparse.ArgumentParser) -> None:
    add_serve_args(p)
    add_engine_args(p)
    add_plan_args(p)
    add_log_args(p)


def settings_from_args(args: argparse.Namespace):
    """ServeSettings from parsed flags (raises ConfigError)."""
    from pipeline.serve.app import ServeSettings
    gcfg, mcfg, rest = resolve_args(args)
    key = args.api_key or os.environ.get(ENV_KEY) or None
    res = resources_from_args(args, "serve", aligners=1, aligner_cpus=SERVE_INGRESS_CPUS, io_cpus=0)
    mcfg = plan_auto(mcfg, res)
    checks = [(0 < args.port < 65536, "--port must be between 1 and 65535"),
              (args.max_tokens_limit >= 1, "--max-tokens-limit must be >= 1"),
              (args.max_queue >= 1, "--max-queue must be >= 1"),
              (args.request_timeout > 0, "--request-timeout must be > 0")]
    wrong = [msg for ok, msg in checks if not ok] + res.problems()
    if wrong:
        raise ConfigError(wrong[0])
    return ServeSettings(gcfg=gcfg, mcfg=mcfg, model_name=args.model_name, api_key=key,
                         max_tokens_limit=args.max_tokens_limit, max_queue=args.max_queue,
                         request_timeout_s=args.request_timeout, resources=res)


def parse(argv: list[str]) -> argparse.Namespace:
    p = Parser(prog="ggro serve")
    add_args(p)
    return p.parse_args(argv)


def build(args: dict | None = None):
    """Application builder: `serve run jobs.serve:build policy=PATH max_queue=8` (keys are flag names)."""
    argv = shlex.split(os.environ.get(ENV_ARGS, ""))
    for k, v in (args or {}).items():
        flag = "--" + k.replace("_", "-")
        if str(v).lower() in ("true", "1", "yes") and k == "trace":
            argv.append(flag)
        else:
            argv += [flag, str(v)]
    from pipeline.serve.app import build_app
    return build_app(settings_from_args(parse(argv)))


def __getattr__(name: str):
    # `serve run jobs.serve:app` / RayService import_path: built on first access, from the environment.
    if name == "app":
        return build()
    raise AttributeError(name)


def check_vocabulary(settings) -> None:
    """Exit 1 (before Ray starts: here, not in a deployment's log) when the reward model cannot serve the
    server's default method: GGRO with a reward model of another vocabulary."""
    m = settings.mcfg
    if m.reward_model == m.policy:
        return
    from ggro.modelset import ModelSet
    from pipeline.serve.app import serve_refusal
    try:
        problem = ModelSet(m).vocab_problem
    except ModelLoadError as e:
        fail(str(e), 1)
    why = serve_refusal(problem, settings.gcfg.method)
    if why:
        fail(why, 1)


def check_port(host: str, port: int) -> None:
    """Exit 1 before Ray starts when host:port cannot be bound here (in use, or not this machine's address):
    Serve's proxy would otherwise die in its readiness check, after the cluster came up, with an opaque error."""
    import socket
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as e:
        fail(f"--host {host}: cannot resolve it ({e})", 1)
    family, kind, _, _, addr = infos[0]
    with socket.socket(family, kind) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)   # as uvicorn binds: TIME_WAIT does not count
        try:
            sock.bind(addr)
        except OSError as e:
            fail(f"cannot listen on {host}:{port} ({e.strerror or e}): another server holds the port, or the host "
                 "is not an address of this machine; pick another with --port / --host", 1)


def run(args) -> int:
    setup_logging(args)
    try:
        settings = settings_from_args(args)
    except ConfigError as e:
        fail(str(e))
    if getattr(args, "dry_run", False):
        from jobs.plan import dry_run
        return dry_run(args, settings.gcfg, settings.mcfg, settings.resources)
    check_vocabulary(settings)
    if not (args.address or os.environ.get("RAY_ADDRESS")):     # Serve's proxy will listen on this machine
        check_port(args.host, args.port)
    from ray import serve
    from pipeline.batch.ray_align import connect
    from actors.resources import ClusterUnreachable
    from pipeline.serve.app import build_app
    from ray.exceptions import RayError
    try:   # align's connect: an unreachable or token-auth cluster is a clear message, not Ray's traceback
        ray = connect(args.address, log_to_driver=log_to_driver(args))
    except ClusterUnreachable as e:
        fail(str(e), 1)
    try:   # a proxy or replica that does not come up: what failed and what to check, not Ray's traceback
        serve.start(http_options={"host": args.host, "port": args.port})
        log.info("ggro serve: loading %s ...", settings.mcfg.policy)
        serve.run(build_app(settings), name="ggro", route_prefix="/")
    except (RuntimeError, RayError) as e:
        with contextlib.suppress(Exception):      # what did come up goes down; its own errors add nothing
            serve.shutdown()
        ray.shutdown()
        first = (str(e).strip().splitlines() or [""])[0][:300]
        fail(f"Ray Serve did not start ({e.__class__.__name__}: {first}). Check that {args.host}:{args.port} is "
             "free on the node that runs the HTTP proxy, and the replicas' logs (ray logs / the dashboard); an "
             "overloaded machine can also miss Serve's start-up deadlines", 1)
    url = f"http://{args.host}:{args.port}"
    log.info("ggro serve: ready at %s/v1 (model %r%s); Ctrl-C to stop", url, settings.model_name,
             ", API key required" if settings.api_key else "")
    def stop(signum, frame):
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, stop)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        log.info("ggro serve: shutting down")
        serve.shutdown()
        ray.shutdown()
    return 0


def main(argv=None) -> int:
    return run(parse(argv if argv is not None else sys.argv[1:]))


if __name__ == "__main__":
    raise SystemExit(main())
