"""The Ray Serve application behind `ggro serve`: model deployments, seam adapters, the ingress.

    GGROIngress (FastAPI, no weights: tokenizer + search loops)
        |-- handle --> ModelServer role=policy  (SegmentDecoder; decode/release, @serve.batch)
        '-- handle --> ModelServer role=reward  (RewardModel; score, @serve.batch)
    (one ModelServer with both roles when the reward is the policy itself as a judge: one copy of the weights)

The model side (ModelServer over actors.worker.ModelWorker, the seam over its handles) is
pipeline/serve_models.py; this module is the front: settings, search loops, the HTTP ingress, build_app.

Concurrency: the ingress keeps one background search loop per distinct search config (requests whose
settings are equal after `serve_api.normalize`). A loop runs `ggro.search.run` over a feed that pulls
newly admitted prompts between rounds (the search's continuous batching), so concurrent users join
shared rounds: one Policy.decode / Reward.score call per round for all of them. Loops with different
configs still share model calls: the model deployments merge concurrent calls with `@serve.batch`.
"""
import asyncio
import hmac
import logging
import queue
import threading
import time
import uuid
import weakref
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from ray import serve

from actors.worker import shares_weights
from ggro.config import GGROConfig, ModelConfig
from ggro.search import Prompt, run as run_search
from pipeline import serve_api as api
from pipeline import telemetry
from pipeline.serve_models import HandlePolicy, HandleReward, ModelServer
from pipeline.resources import Resources

log = logging.getLogger("ray.serve")

ENDPOINTS = {"chat": "chat/completions", "completion": "completions"}   # the metrics' endpoint label


@dataclass(frozen=True)
class ServeSettings:
    gcfg: GGROConfig = GGROConfig()          # the server's defaults; requests override some fields
    mcfg: ModelConfig = ModelConfig()
    model_name: str = "ggro"
    api_key: str | None = None
    max_tokens_limit: int = 512
    max_queue: int = 64                      # prompts (choices) admitted at once, running or waiting
    request_timeout_s: float = 300.0
    retry_after_s: int = 2
    # the model deployments' replicas, CPUs and GPUs (fractional CPUs: whole ones deadlock 2-core boxes);
    # tp > 1: each policy replica is an actors.policy tensor-parallel group
    resources: Resources = Resources(mode="serve")
    ingress_cpus: float = 0.1

    @property
    def shared_weights(self) -> bool:
        # the same rule as batch (actors.cluster.start_workers): at tp > 1 the judge gets its own copy
        return shares_weights(self.mcfg, self.resources.tp)


# -- search loops ----------------------------------------------------------------------------------------
@dataclass
class Job:
    """One choice of one request, as it travels through a search loop. `emit(event)` is thread-safe."""
    prompt: Prompt
    index: int
    emit: object                         # callable(tuple): ("segment", index, y) | ("done", index, Result) | ("error", index, msg)
    stream: bool = False
    sent: int = 0                        # tokens of y already reported as segments
    settled: bool = False                # its admission slot is given back (answered, failed or cancelled)
    cancelled: bool = False              # its request stopped waiting: the search drops it (guarded by hub.lock)


class _Loop(threading.Thread):
    def __init__(self, hub: "SearchHub", cfg: GGROConfig):
        super().__init__(daemon=True, name=f"ggro-search-{cfg.method}")
        self.hub, self.cfg = hub, cfg
        self.q: queue.Queue[Job] = queue.Queue()
        self.jobs: dict[str, Job] = {}      # queued or active in this loop, by prompt id (guarded by hub.lock)
        self.token = uuid.uuid4().hex[:8]
        self.policy = HandlePolicy(hub.policy_handle, self.token, self._watch)
        self.reward = HandleReward(hub.reward_handle, self.token)

    def _watch(self, seq_id: str, prefix: list[int]) -> None:
        job = self.jobs.get(seq_id)
        if job is None or not job.stream:
            return
        y = prefix[len(job.prompt.ids):]
        if len(y) > job.sent:
            job.sent = len(y)
            job.emit(("segment", job.index, list(y)))

    def _feed(self):
        """Newly admitted prompts, one per `next`; None (not StopIteration) when none are waiting, so the
        search keeps its active prompts going and asks again next round."""
        while True:
            try:
                job = self.q.get_nowait()
            except queue.Empty:
                yield None
                continue
            if not self._withdrawn(job.prompt.id):
                yield job.prompt

    def _drain(self) -> list[Prompt]:
        out = []
        while True:
            try:
                job = self.q.get_nowait()
            except queue.Empty:
                return out
            if not self._withdrawn(job.prompt.id):
                out.append(job.prompt)

    def _withdrawn(self, prompt_id: str) -> bool:
        """ggro.search's hook, asked between rounds: True drops a cancelled job's prompt from the search for
        good, so the loop forgets the job (its id may then join this loop again, from a later request)."""
        with self.hub.lock:
            job = self.jobs.get(prompt_id)
            if job is None or not job.cancelled:
                return False
            del self.jobs[prompt_id]
            self.hub.withdrawn += 1
            return True

    def run(self):
        hub = self.hub
        while True:
            with hub.lock:
                if self.q.empty():
                    hub.loops[self.cfg].remove(self)
                    if not hub.loops[self.cfg]:
                        del hub.loops[self.cfg]
                    # jobs still listed here were failed or delivered already
                    return
            try:
                prompts = self._feed() if self.cfg.method == "ggro" else self._drain()
                for res in run_search(prompts, self.policy, self.reward, self.cfg, hub.batch_size,
                                      withdrawn=self._withdrawn):
                    with hub.lock:
                        job = self.jobs.pop(res.id, None)
                        live = job is not None and not job.settled   # a cancelled job's slot is back already
                        if live:
                            job.settled = True
                    if live:
                        hub.finished(1)
                        job.emit(("done", job.index, res))
            except Exception as e:   # a model replica failed: fail what this loop holds, keep serving
                log.exception("GGRO search loop failed")
                with hub.lock:
                    held = list(self.jobs.values())
                    failed = [j for j in held if not j.settled]
                    for j in failed:
                        j.settled = True
                    self.jobs.clear()
                    while not self.q.empty():
                        self.q.get_nowait()
                hub.finished(len(failed))
                for job in failed:
                    job.emit(("error", job.index, f"{type(e).__name__}: {e}"))
                try:
                    self.policy.release([j.prompt.id for j in held])
                except Exception:
                    pass


class SearchHub:
    """Admission (bounded), and the map from search config to the loops running it."""

    def __init__(self, policy_handle, reward_handle, batch_size: int, max_queue: int, app: str = ""):
        self.policy_handle, self.reward_handle = policy_handle, reward_handle
        self.batch_size, self.max_queue, self.app = batch_size, max_queue, app
        self.lock = threading.Lock()
        self.loops: dict[GGROConfig, list[_Loop]] = {}
        self.outstanding = 0
        self.cancelled = 0                   # prompts whose request stopped waiting before their answer
        self.withdrawn = 0                   # ... of them, dropped from the search before it finished them

    def admit(self, k: int) -> bool:
        with self.lock:
            if self.outstanding + k > self.max_queue:
                return False
            self.outstanding += k
            telemetry.record_queue_depth(self.app, self.outstanding)   # under the lock: never a stale value last
            return True

    def finished(self, k: int) -> None:
        with self.lock:
            self.outstanding -= k
            telemetry.record_queue_depth(self.app, self.outstanding)

    def cancel(self, jobs: list[Job]) -> int:
        """Give back the slots of `jobs` not answered yet (their client left, the request timed out or a sibling
        choice failed) and mark them so their search loop drops them; returns how many were cancelled."""
        with self.lock:
            live = [j for j in jobs if not j.settled]
            for j in live:
                j.settled = j.cancelled = True
            self.outstanding -= len(live)
            self.cancelled += len(live)
            if live:
                telemetry.record_queue_depth(self.app, self.outstanding)
        if live:
            telemetry.record_cancelled(self.app, len(live))
        return len(live)

    def submit(self, cfg: GGROConfig, job: Job) -> None:
        """Queue a job on a loop for `cfg` that does not hold its prompt id yet (starting one if needed)."""
        with self.lock:
            loops = self.loops.setdefault(cfg, [])
            loop = next((lp for lp in loops if job.prompt.id not in lp.jobs), None)
            start = loop is None
            if start:
                loop = _Loop(self, cfg)
                loops.append(loop)
            loop.jobs[job.prompt.id] = job
            loop.q.put(job)
        if start:
            loop.start()

    def stats(self) -> dict:
        with self.lock:
            return {"outstanding": self.outstanding, "max_queue": self.max_queue,
                    "search_loops": sum(len(v) for v in self.loops.values()), "cancelled": self.cancelled,
                    "withdrawn": self.withdrawn}


# -- the ingress -------------------------------------------------------------------------------------------
fastapi_app = FastAPI(title="GGRO", description="Gradient-Guided Reward Optimization, OpenAI-compatible")


def _error_response(e: api.ApiError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


@fastapi_app.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    """Unknown paths (404) and wrong methods (405) answer in OpenAI's error shape too, not FastAPI's."""
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
    return _error_response(api.ApiError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}",
                                        code=code, headers=getattr(exc, "headers", None)))


@serve.deployment(max_ongoing_requests=1024, max_queued_requests=1024)
@serve.ingress(fastapi_app)
class GGROIngress:
    def __init__(self, policy_handle, reward_handle, settings: ServeSettings):
        from transformers import AutoConfig, GenerationConfig
        from ggro import models
        from ggro.engine import context_window
        self.s = settings
        self.tok = models.load_tokenizer(settings.mcfg.policy, **settings.mcfg.source(settings.mcfg.policy))
        where, kw = models.resolve(settings.mcfg.policy)
        self.context = context_window(AutoConfig.from_pretrained(where, **kw))
        eos = {self.tok.eos_token_id} if self.tok.eos_token_id is not None else set()
        try:
            extra = GenerationConfig.from_pretrained(where, **kw).eos_token_id
            eos.update([extra] if isinstance(extra, int) else (extra or []))
        except (OSError, ValueError):
            pass
        self.eos = eos
        self.telemetry_app = telemetry.serve_app_name()
        self.hub = SearchHub(policy_handle, reward_handle or policy_handle, settings.mcfg.batch_size,
                             settings.max_queue, self.telemetry_app)
        self.model_names = (settings.model_name,)

    # -- helpers ----------------------------------------------------------------------------------------
    def _auth(self, request: Request) -> None:
        key = self.s.api_key
        if not key:
            return
        got = request.headers.get("authorization", "")
        if not hmac.compare_digest(got.encode(), f"Bearer {key}".encode()):
            raise api.ApiError(401, "missing or wrong API key: send `Authorization: Bearer <key>`",
                               type_="authentication_error", code="invalid_api_key")

    async def _parse(self, request: Request, kind: str) -> tuple[api.ApiRequest, list[Prompt]]:
        from ggro.rows import encode
        self._auth(request)
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > api.MAX_BODY_BYTES:
            raise api.request_too_large(int(declared))
        raw = await request.body()
        if len(raw) > api.MAX_BODY_BYTES:
            raise api.request_too_large(len(raw))
        body = api.parse_json(raw)
        req = api.parse_request(body, kind, self.s.gcfg, model_names=self.model_names,
                                max_tokens_limit=self.s.max_tokens_limit)
        if req.n > self.s.max_queue:
            raise api.ApiError(400, f"n={req.n} is more than this server ever admits at once (--max-queue "
                               f"{self.s.max_queue}): it could never run", param="n", code="invalid_value")
        fmt = self.s.mcfg.prompt_format if kind == "chat" else "raw"
        try:   # in a worker thread: a long prompt must not stall every other request's event loop (/health too)
            x = await asyncio.to_thread(encode, req.row, self.tok, fmt, req.cfg.max_new_tokens, self.context)
        except ValueError as e:
            raise api.ApiError(400, str(e), param="messages" if kind == "chat" else "prompt",
                               code="context_length_exceeded") from None
        # Prompt ids: sampled methods derive their per-row seed from the id, so a seeded request uses
        # fixed ids (reproducible); otherwise ids are unique and every request can share one loop.
        # `stop` ends decoding where it appears (the text is still cut at it: a string ending inside a token)
        prompts = [Prompt(f"choice-{i}" if req.seeded else f"{req.id}-{i}", x.ids, x.has_prefill, tuple(req.stop))
                   for i in range(req.n)]
        return req, prompts

    def _start(self, req: api.ApiRequest, prompts: list[Prompt]) -> tuple[asyncio.Queue, list[Job]]:
        if not self.hub.admit(len(prompts)):
            raise api.ApiError(503, f"server overloaded: {self.s.max_queue} prompts already admitted; retry "
                               f"after {self.s.retry_after_s}s", type_="server_error", code="overloaded",
                               headers={"Retry-After": str(self.s.retry_after_s)})
        events: asyncio.Queue = asyncio.Queue()
        loop = asyncio.get_running_loop()

        def emit(ev):
            loop.call_soon_threadsafe(events.put_nowait, ev)
        jobs = [Job(p, i, emit, stream=req.stream) for i, p in enumerate(prompts)]
        for job in jobs:
            self.hub.submit(req.cfg, job)
        return events, jobs

    def _text(self, tokens: list[int], stops: list[str]) -> tuple[str, bool]:
        return api.apply_stop(self.tok.decode(tokens, skip_special_tokens=True), stops)

    def _choice(self, req: api.ApiRequest, res) -> dict:
        text, hit = self._text(res.tokens, req.stop)
        ended = bool(res.tokens) and res.tokens[-1] in self.eos
        finish = "stop" if hit or ended or len(res.tokens) < req.cfg.max_new_tokens else "length"
        telemetry.record_response("serve", res.method, res.reward, res.num_nudges, res.reward_calls)
        return {"text": text, "finish_reason": finish, "tokens": len(res.tokens), "stats": api.stats(res)}

    def _timeout(self) -> api.ApiError:
        return api.ApiError(504, f"request timed out after {self.s.request_timeout_s}s", type_="timeout_error",
                            code="timeout")

    async def _complete(self, kind: str, request: Request):
        t0 = time.monotonic()
        endpoint = ENDPOINTS[kind]
        try:
            req, prompts = await self._parse(request, kind)
            events, jobs = self._start(req, prompts)
        except api.ApiError as e:
            telemetry.record_request(self.telemetry_app, endpoint, e.status, time.monotonic() - t0)
            return _error_response(e)
        deadline = time.monotonic() + self.s.request_timeout_s
        if req.stream:
            body = self._stream(req, prompts, events, deadline, jobs, t0)
            # A client gone before the body starts leaves the generator unstarted, so its `finally` never runs:
            # free the slots when it is collected (cancel is idempotent; on the event loop, since a collection
            # may happen in a thread that holds hub.lock).
            loop = asyncio.get_running_loop()
            weakref.finalize(body, loop.call_soon_threadsafe, self.hub.cancel, jobs).atexit = False
            return StreamingResponse(body, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        choices: list[dict | None] = [None] * len(prompts)
        # Serve cancels this coroutine when the client disconnects (CancelledError at the await): the
        # status stays 499 (nginx's "client closed request") and `finally` frees the unanswered prompts.
        status = 499
        try:
            while any(c is None for c in choices):
                kind_, i, payload = await asyncio.wait_for(events.get(), max(0.0, deadline - time.monotonic()))
                if kind_ == "done":
                    choices[i] = self._choice(req, payload)
                elif kind_ == "error":
                    raise api.ApiError(500, f"search failed: {payload}", type_="server_error", code="internal")
            status = 200
            return JSONResponse(api.completion_body(req, choices, len(prompts[0].ids)))
        except asyncio.TimeoutError:
            status = 504
            return _error_response(self._timeout())
        except api.ApiError as e:
            status = e.status
            return _error_response(e)
        except Exception:
            status = 500
            raise
        finally:
            self.hub.cancel(jobs)
            telemetry.record_request(self.telemetry_app, endpoint, status, time.monotonic() - t0, len(prompts[0].ids),
                                     sum(c["tokens"] for c in choices if c is not None))

    async def _stream(self, req: api.ApiRequest, prompts: list[Prompt], events: asyncio.Queue, deadline: float,
                      jobs: list[Job], t0: float):
        hold = max((len(s) for s in req.stop), default=1) - 1   # chars that might start a stop string
        sent = [""] * len(prompts)
        done = [False] * len(prompts)
        completion_tokens = 0
        endpoint, first = ENDPOINTS[req.kind], True
        # A client that disconnects closes this generator at a `yield` or cancels it at the await (Starlette
        # and Serve both do): the status stays 499 and `finally` frees the prompts still searching, as it does
        # for choices that ended at a stop string before their search did.
        status = 499
        try:
            for i in range(len(prompts)):
                yield api.sse(api.chunk_body(req, i, "" if req.kind == "chat" else None, role=True))
            while not all(done):
                try:
                    kind_, i, payload = await asyncio.wait_for(events.get(), max(0.0, deadline - time.monotonic()))
                except asyncio.TimeoutError:
                    status = 504
                    yield api.sse(self._timeout().body())
                    return
                if done[i]:
                    continue
                if kind_ == "error":
                    err = api.ApiError(500, f"search failed: {payload}", type_="server_error", code="internal")
                    status = 500
                    yield api.sse(err.body())
                    return
                if kind_ == "segment":
                    text, hit = self._text(payload, req.stop)
                    upto = len(text) if hit else len(text) - hold
                    while upto > 0 and text[upto - 1] == "\ufffd":   # an incomplete multi-byte character
                        upto -= 1
                    if text.startswith(sent[i]) and upto > len(sent[i]):
                        if first:
                            first = False
                            telemetry.record_first_token(self.telemetry_app, endpoint, time.monotonic() - t0)
                        yield api.sse(api.chunk_body(req, i, text[len(sent[i]):upto]))
                        sent[i] = text[:upto]
                    if hit:
                        done[i] = True
                        yield api.sse(api.chunk_body(req, i, finish_reason="stop"))
                    continue
                c = self._choice(req, payload)
                completion_tokens += c["tokens"]
                done[i] = True
                rest = c["text"][len(sent[i]):] if c["text"].startswith(sent[i]) else ""
                if first and rest:     # the baselines' text comes whole, in the final chunk
                    first = False
                    telemetry.record_first_token(self.telemetry_app, endpoint, time.monotonic() - t0)
                yield api.sse(api.chunk_body(req, i, rest or None, finish_reason=c["finish_reason"],
                                             extra={"ggro": c["stats"]}))
            if req.include_usage:
                yield api.sse(api.usage_chunk(req, len(prompts[0].ids), completion_tokens))
            yield api.sse("[DONE]")
            status = 200
        except Exception:
            status = 500
            raise
        finally:
            self.hub.cancel(jobs)
            telemetry.record_request(self.telemetry_app, endpoint, status, time.monotonic() - t0, len(prompts[0].ids),
                                     completion_tokens)

    # -- routes ----------------------------------------------------------------------------------------------
    @fastapi_app.post("/v1/chat/completions")
    async def chat_completions(self, request: Request):
        return await self._complete("chat", request)

    @fastapi_app.post("/v1/completions")
    async def completions(self, request: Request):
        return await self._complete("completion", request)

    @fastapi_app.get("/v1/models")
    async def list_models(self, request: Request):
        try:
            self._auth(request)
        except api.ApiError as e:
            return _error_response(e)
        return {"object": "list", "data": [
            {"id": name, "object": "model", "created": 0, "owned_by": "ggro",
             "policy": self.s.mcfg.policy, "reward_model": self.s.mcfg.reward_model,
             "reward_kind": self.s.mcfg.reward_kind, "method": self.s.gcfg.method,
             "max_tokens_limit": self.s.max_tokens_limit, "context_window": self.context}
            for name in self.model_names]}

    @fastapi_app.get("/health")
    async def health(self):
        return {"status": "ok", **self.hub.stats()}


def build_app(settings: ServeSettings):
    """The bound Serve application for `settings` (cheap: nothing loads until deployed)."""
    res = settings.resources

    def opts(replicas: int, cpus: float, gpus: float) -> dict:
        return dict(num_replicas=replicas, ray_actor_options={"num_cpus": cpus, **({"num_gpus": gpus} if gpus else {})})
    policy_opts = opts(res.policy_replicas, res.policy_cpus, res.policy_gpus_per_replica)
    reward_opts = opts(res.reward_replicas, res.reward_cpus, res.reward_gpus)
    if res.tp > 1:
        # the policy deployment only forwards to its rank actors, which hold the CPUs/GPUs
        policy = ModelServer.options(name="GGROPolicy", **opts(res.policy_replicas, settings.ingress_cpus, 0)).bind(
            settings.mcfg, ("policy",), res.tp, res.policy_cpus, res.policy_gpus_per_replica)
        reward = ModelServer.options(name="GGROReward", **reward_opts).bind(settings.mcfg, ("reward",))
    elif settings.shared_weights:
        models = ModelServer.options(name="GGROModels", **policy_opts).bind(settings.mcfg, ("policy", "reward"))
        policy, reward = models, None
    else:
        policy = ModelServer.options(name="GGROPolicy", **policy_opts).bind(settings.mcfg, ("policy",))
        reward = ModelServer.options(name="GGROReward", **reward_opts).bind(settings.mcfg, ("reward",))
    n = max(1024, 4 * settings.max_queue)
    return GGROIngress.options(ray_actor_options={"num_cpus": settings.ingress_cpus}, max_ongoing_requests=n,
                               max_queued_requests=n).bind(policy, reward, settings)
