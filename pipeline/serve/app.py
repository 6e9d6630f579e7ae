"""The Ray Serve application behind `ggro serve`: model deployments, seam adapters, the ingress.

    GGROIngress (FastAPI, no weights: tokenizer + search loops)
        |-- handle --> ModelServer role=policy  (SegmentDecoder; decode/release, @serve.batch)
        '-- handle --> ModelServer role=reward  (RewardModel; score, @serve.batch)
    (one ModelServer with both roles when the reward is the policy itself as a judge: one copy of the weights)
    (a reward model of another vocabulary: its replica holds it in its own ids, the ingress's search loops ask
     it through ggro.retokenize, and the server runs greedy and best-of-n only: see serve_refusal)

The model side (ModelServer over actors.worker.ModelWorker, the seam over its handles) is
pipeline/serve/models.py, the search loops pipeline/serve/hub.py; this module is the front: settings, the HTTP
ingress, build_app.

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
import time
import weakref
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from ray import serve

from actors.resources import shares_weights
from ggro.config import GGROConfig, ModelConfig, ModelLoadError
from ggro.retokenize import vocab_refusal
from ggro.search import Prompt
from pipeline.serve import api
from pipeline import telemetry
from pipeline.serve.hub import Job, SearchHub
from pipeline.serve.models import ModelServer
from actors.resources import Resources

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


def serve_refusal(vocab_problem: str | None, method: str) -> str | None:
    """Why a server whose default method is `method` cannot start with this reward model (None: it can).
    `vocab_problem`: how its vocabulary differs from the policy's (ggro.modelset.ModelSet.vocab_problem). Such a reward
    model serves greedy and best-of-n (scored in its own tokens) but never GGRO: the server's own default
    must be one of those, and GGRO requests get a 400 (serve_api.parse_request). jobs/serve.py asks this
    before Ray starts, the ingress again (for `serve run` and RayService, which skip jobs/serve.py's run)."""
    why = vocab_refusal(vocab_problem, method)
    if why:
        return (f"{why}; pass --method best-of-n or --method greedy to serve this reward model (GGRO requests "
                "then get a 400)")
    return None


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
        from ggro.engine import Engine
        from ggro.modelset import ModelSet
        self.s = settings
        models = ModelSet(settings.mcfg)    # tokenizers, the vocabulary decision, EOS ids, context
        self.tok, self.vocab_problem = models.tokenizer, models.vocab_problem
        why = serve_refusal(self.vocab_problem, settings.gcfg.method)
        if why:
            raise ModelLoadError(why)
        # the front door over the model deployments: each search loop runs it over its own handles (in one thread:
        # Serve overlaps requests by loops, not --local's cohorts)
        self.engine = Engine(models, None, None, models.context(), dataclasses.replace(settings.mcfg, cohorts=1))
        self.context = self.engine.context
        self.telemetry_app = telemetry.serve_app_name()
        self.hub = SearchHub(self.engine, policy_handle, reward_handle or policy_handle, settings.mcfg.batch_size,
                             settings.max_queue, self.telemetry_app)
        self.model_names = (settings.model_name,)

    def _format(self, kind: str) -> str:
        """How the policy reads a request's prompt: the completions endpoint takes a raw string."""
        return self.s.mcfg.prompt_format if kind == "chat" else "raw"

    # -- helpers ----------------------------------------------------------------------------------------
    def _auth(self, request: Request) -> None:
        key = self.s.api_key
        if not key:
            return
        got = request.headers.get("authorization", "")
        if not hmac.compare_digest(got.encode(), f"Bearer {key}".encode()):
            raise api.ApiError(401, "missing or wrong API key: send `Authorization: Bearer <key>`",
                               type_="authentication_error", code="invalid_api_key")

    @staticmethod
    async def _body(request: Request) -> bytes:
        """The request body, refused (413) as soon as it passes the limit: by its declared length, or, for a
        chunked body that declares none, by the bytes read so far; never buffered whole first."""
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > api.MAX_BODY_BYTES:
            raise api.request_too_large(int(declared))
        raw = bytearray()
        async for chunk in request.stream():
            raw += chunk
            if len(raw) > api.MAX_BODY_BYTES:
                raise api.request_too_large(len(raw), more=True)
        return bytes(raw)

    async def _parse(self, request: Request, kind: str) -> tuple[api.ApiRequest, list[Prompt]]:
        self._auth(request)
        body = api.parse_json(await self._body(request))
        req = api.parse_request(body, kind, self.s.gcfg, model_names=self.model_names,
                                max_tokens_limit=self.s.max_tokens_limit, vocab_problem=self.vocab_problem)
        if req.n > self.s.max_queue:
            raise api.ApiError(400, f"n={req.n} is more than this server ever admits at once (--max-queue "
                               f"{self.s.max_queue}): it could never run", param="n", code="invalid_value")
        fmt = self._format(kind)
        try:   # in a worker thread: a long prompt must not stall every other request's event loop (/health too)
            x = await asyncio.to_thread(self.engine.prompt, req.row, req.cfg.max_new_tokens, fmt)
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
        jobs = [Job(p, i, emit, stream=req.stream, row=req.row, prompt_format=self._format(req.kind))
                for i, p in enumerate(prompts)]
        for job in jobs:
            self.hub.submit(req.cfg, job)
        return events, jobs

    def _text(self, tokens: list[int], stops: list[str]) -> tuple[str, bool]:
        return api.apply_stop(self.tok.decode(tokens, skip_special_tokens=True), stops)

    def _choice(self, req: api.ApiRequest, res) -> dict:
        text, _ = self._text(res.tokens, req.stop)   # the search ended at the stop string: finish_reason "stop"
        telemetry.record_response("serve", res.method, res.reward, res.num_nudges, res.reward_calls)
        return {"text": text, "finish_reason": res.finish_reason, "tokens": len(res.tokens), "stats": api.stats(res)}

    def _failure(self, kind: str, msg: str) -> api.ApiError:
        if kind == "unavailable":   # a model replica died mid-request: Serve starts another, the client retries
            return api.ApiError(503, f"a model replica failed during this request and is being replaced; retry "
                                f"after {self.s.retry_after_s}s ({msg})", type_="server_error",
                                code="model_unavailable", headers={"Retry-After": str(self.s.retry_after_s)})
        return api.ApiError(500, f"search failed: {msg}", type_="server_error", code="internal")

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
                elif kind_ in ("error", "unavailable"):
                    raise self._failure(kind_, payload)
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
            self._settle(jobs, endpoint, status, t0, prompts, sum(c["tokens"] for c in choices if c is not None))

    def _settle(self, jobs: list[Job], endpoint: str, status: int, t0: float, prompts: list[Prompt],
                completion_tokens: int) -> None:
        """A request ends (answered, failed, timed out or abandoned): its prompts still searching are withdrawn
        and their slots freed, and it is counted."""
        self.hub.cancel(jobs)
        telemetry.record_request(self.telemetry_app, endpoint, status, time.monotonic() - t0, len(prompts[0].ids),
                                 completion_tokens)

    def _sendable(self, req: api.ApiRequest, y: list[int], sent: str, hold: int) -> tuple[str, bool]:
        """A streamed choice's text so far that may be sent (`sent` when nothing more may), and whether it hit a
        stop string: up to the stop string, else all but the `hold` chars that might start one, never half a
        multi-byte character."""
        text, hit = self._text(y, req.stop)
        upto = len(text) if hit else len(text) - hold
        while upto > 0 and text[upto - 1] == "\ufffd":   # an incomplete multi-byte character
            upto -= 1
        return (text[:upto] if text.startswith(sent) and upto > len(sent) else sent), hit

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
                if kind_ in ("error", "unavailable"):   # an error event ends the stream (never a dropped one)
                    err = self._failure(kind_, payload)
                    status = err.status
                    yield api.sse(err.body())
                    return
                if kind_ == "segment":
                    now, hit = self._sendable(req, payload, sent[i], hold)
                    if len(now) > len(sent[i]):
                        if first:
                            first = False
                            telemetry.record_first_token(self.telemetry_app, endpoint, time.monotonic() - t0)
                        yield api.sse(api.chunk_body(req, i, now[len(sent[i]):]))
                        sent[i] = now
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
            self._settle(jobs, endpoint, status, t0, prompts, completion_tokens)

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
