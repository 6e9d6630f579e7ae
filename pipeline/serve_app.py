"""The Ray Serve application behind `ggro serve`: model deployments, seam adapters, the ingress.

    GGROIngress (FastAPI, no weights: tokenizer + search loops)
        |-- handle --> ModelServer role=policy  (SegmentDecoder; decode/release, @serve.batch)
        '-- handle --> ModelServer role=reward  (RewardModel; score, @serve.batch)
    (one ModelServer with both roles when the reward is the policy itself as a judge: one copy of the weights)

Concurrency: the ingress keeps one background search loop per distinct search config (requests whose
settings are equal after `serve_api.normalize`). A loop runs `ggro.search.run` over a feed that pulls
newly admitted prompts between rounds (the search's continuous batching), so concurrent users join
shared rounds: one Policy.decode / Reward.score call per round for all of them. Loops with different
configs still share model calls: the model deployments merge concurrent calls with `@serve.batch`.
"""
import asyncio
import dataclasses
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

from ggro.config import GGROConfig, ModelConfig
from ggro.search import Prompt, run as run_search
from pipeline import serve_api as api
from pipeline import telemetry

log = logging.getLogger("ray.serve")

CALL_TIMEOUT_S = 600.0     # one policy/reward call; a dead replica must not hang a loop forever
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
    replica_cpus: float = 0.5                # each model replica (fractional: whole CPUs deadlock 2-core boxes)
    replica_gpus: float = 0.0
    ingress_cpus: float = 0.1
    model_replicas: int = 1
    tp: int = 1                              # > 1: each policy replica is an actors.policy tensor-parallel group

    @property
    def shared_weights(self) -> bool:
        m = self.mcfg
        # a tp-sharded policy cannot be differentiated (AutoTP has no backward): the judge gets its own copy
        return m.shares_policy_weights and self.tp == 1


# -- model deployments ---------------------------------------------------------------------------------
@serve.deployment(max_ongoing_requests=256)
class ModelServer:
    """Holds the weights: the policy (SegmentDecoder), the reward (RewardModel), or both (shared judge)."""

    def __init__(self, mcfg: ModelConfig, roles: tuple[str, ...], tp: int = 1, rank_cpus: float = 0.5,
                 rank_gpus: float = 0.0):
        from ggro import models
        from ggro.engine import load_reward
        from ggro.policy import SegmentDecoder
        from ggro.threads import torch_threads
        torch_threads()
        self.roles = roles
        tok = models.load_tokenizer(mcfg.policy, **mcfg.source(mcfg.policy))
        policy_model = None
        self.group = None
        if "policy" in roles and tp > 1:
            # the weights live in `tp` rank actors (DeepSpeed AutoTP), started and owned by this replica
            from actors.policy import start_policy_replica
            self.group = start_policy_replica(mcfg, tp=tp, gpus_per_rank=rank_gpus, cpus_per_rank=rank_cpus,
                                              name=f"ggro-serve-policy-{uuid.uuid4().hex[:8]}")
            self.policy = self.group
        elif "policy" in roles:
            policy_model = models.load_model(mcfg.policy, "causal", mcfg.dtype, mcfg.device, **mcfg.source(mcfg.policy))
            self.policy = SegmentDecoder(policy_model, models.eos_ids(tok, policy_model),
                                         max_cached=4 * mcfg.batch_size)
        if "reward" in roles:
            self.reward = load_reward(mcfg, tok, policy_model)
        self._lock = asyncio.Lock()          # one model computation at a time per replica

    async def _compute(self, fn, arg):
        async with self._lock:
            return await asyncio.to_thread(fn, arg)

    async def _merged(self, fn, calls: list[list]) -> list[list]:
        """One model call for the requests of every caller Serve batched together, split back per caller."""
        out = await self._compute(fn, [item for c in calls for item in c])
        res, k = [], 0
        for c in calls:
            res.append(out[k:k + len(c)])
            k += len(c)
        return res

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.003)
    async def decode(self, calls: list[list]) -> list[list]:
        return await self._merged(self.policy.decode, calls)

    async def release(self, seq_ids: list[str]) -> None:
        await self._compute(self.policy.release, seq_ids)

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.003)
    async def score(self, calls: list[list]) -> list[list]:
        return await self._merged(self.reward.score, calls)

    def ready(self) -> bool:
        return True

    def __del__(self):
        if getattr(self, "group", None) is not None:
            try:
                self.group.shutdown()
            except Exception:
                pass


# -- the seam over deployment handles -------------------------------------------------------------------
class HandlePolicy:
    """The Policy side of the seam over a ModelServer handle. Sequence ids are namespaced per search
    loop (`token/`) so loops never share prefix caches; `watch(seq_id, prefix)` sees every request,
    which is how streaming observes accepted segments (a segment's prefix grows by the accepted one)."""

    def __init__(self, handle, token: str, watch=None):
        self.handle, self.token, self.watch = handle, token, watch

    def decode(self, requests):
        if self.watch is not None:
            for r in requests:
                self.watch(r.seq_id, r.prefix)
        reqs = [dataclasses.replace(r, seq_id=f"{self.token}/{r.seq_id}") for r in requests]
        return self.handle.decode.remote(reqs).result(timeout_s=CALL_TIMEOUT_S)

    def release(self, seq_ids):
        self.handle.release.remote([f"{self.token}/{s}" for s in seq_ids]).result(timeout_s=CALL_TIMEOUT_S)


class HandleReward:
    """The Reward side of the seam over a ModelServer handle; reward-side cache keys (RewardQuery.seq_id,
    where the seam has them) are namespaced per search loop like the policy's."""

    def __init__(self, handle, token: str = ""):
        self.handle, self.token = handle, token

    def score(self, queries):
        if self.token:
            queries = [dataclasses.replace(q, seq_id=f"{self.token}/{q.seq_id}")
                       if getattr(q, "seq_id", None) is not None else q for q in queries]
        return self.handle.score.remote(queries).result(timeout_s=CALL_TIMEOUT_S)


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
        prompts = [Prompt(f"choice-{i}" if req.seeded else f"{req.id}-{i}", x.ids, x.has_prefill)
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
    actor = {"num_cpus": settings.replica_cpus}
    if settings.replica_gpus:
        actor["num_gpus"] = settings.replica_gpus
    model_opts = dict(num_replicas=settings.model_replicas, ray_actor_options=actor)
    if settings.tp > 1:
        # the policy deployment only forwards to its rank actors, which hold the CPUs/GPUs
        policy = ModelServer.options(name="GGROPolicy", num_replicas=settings.model_replicas,
                                     ray_actor_options={"num_cpus": settings.ingress_cpus}).bind(
            settings.mcfg, ("policy",), settings.tp, settings.replica_cpus, settings.replica_gpus)
        reward = ModelServer.options(name="GGROReward", **model_opts).bind(settings.mcfg, ("reward",))
    elif settings.shared_weights:
        models = ModelServer.options(name="GGROModels", **model_opts).bind(settings.mcfg, ("policy", "reward"))
        policy, reward = models, None
    else:
        policy = ModelServer.options(name="GGROPolicy", **model_opts).bind(settings.mcfg, ("policy",))
        reward = ModelServer.options(name="GGROReward", **model_opts).bind(settings.mcfg, ("reward",))
    n = max(1024, 4 * settings.max_queue)
    return GGROIngress.options(ray_actor_options={"num_cpus": settings.ingress_cpus}, max_ongoing_requests=n,
                               max_queued_requests=n).bind(policy, reward, settings)
