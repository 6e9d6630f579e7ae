"""`ggro serve`: the real Serve app on the tiny models, called over HTTP with the `openai` client.

Two applications share one Serve instance on a free port:
  /      tiny policy + tiny classifier RM (two model deployments), float64, generous queue
  /small the policy as its own judge (one shared-weights deployment), API key, max_queue=2
  /slow  like /small without a key, with a request timeout too short for any answer
"""
from __future__ import annotations

import functools
import json
import math
import socket
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import pytest

openai = pytest.importorskip("openai")
slow = pytest.mark.slow      # the tests that start the real Serve app

KEY = "sekrit-test-key"
PROMPTS = ["how do you make water ?", "what is the time", "write a long word", "I like people",
           "tell me about the first day", "can you find my water", "the number of people who call",
           "a", "why is the sound so long ?", "go now"]
SEARCH = dict(max_new_tokens=16, num_refinements=4, entropy_threshold=2.4)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def settings(policy, reward, kind, **kw):
    from ggro.config import GGROConfig, ModelConfig
    from actors.resources import Resources
    from pipeline.serve.app import ServeSettings
    mcfg = ModelConfig(policy=policy, reward=reward, reward_kind=kind, dtype="float64", batch_size=8,
                       rubric="is it good ? Yes or No")
    base = dict(gcfg=GGROConfig(**SEARCH), mcfg=mcfg, model_name="tiny", max_tokens_limit=64,
                resources=Resources(policy_cpus=0.2, reward_cpus=0.2, tp=kw.pop("tp", 1), mode="serve"),
                ingress_cpus=0.05)
    return ServeSettings(**{**base, **kw})


@pytest.fixture(scope="module")
def server(ray_cluster, tiny_models):
    from ray import serve
    from pipeline.serve.app import build_app
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    main = settings(tiny_models["policy"], tiny_models["classifier"], "classifier", max_queue=32)
    small = settings(tiny_models["policy"], None, "judge", max_queue=2, api_key=KEY)
    serve.run(build_app(main), name="ggro-test", route_prefix="/")
    serve.run(build_app(small), name="ggro-test-small", route_prefix="/small")
    slow = settings(tiny_models["policy"], None, "judge", request_timeout_s=0.01)
    serve.run(build_app(slow), name="ggro-test-slow", route_prefix="/slow")
    url = f"http://127.0.0.1:{port}"
    yield {"url": url, "main": main, "small": small}
    for name in ("ggro-test", "ggro-test-small", "ggro-test-slow"):
        serve.delete(name)
    serve.shutdown()


@pytest.fixture(scope="module")
def other_rm(tmp_path_factory):
    """A tiny classifier RM of another vocabulary (the policy's words, other ids)."""
    from tests.conftest import save_other_vocab_rm
    return save_other_vocab_rm(tmp_path_factory.mktemp("other-vocab") / "rm")


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server["url"] + "/v1", api_key="unused", max_retries=0, timeout=120)


def post(url: str, body, headers=None):
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method="POST",
                                 headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, json.loads(r.read()), r.headers
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read()), e.headers


def align_local(tiny_models, row: dict, reward: str, kind: str, prompt_format: str = "chat", **over) -> dict:
    """What `ggro align --local` writes for this row with the same settings."""
    from ggro.config import GGROConfig, ModelConfig
    from ggro.engine import Engine
    from ggro.rows import parse_row
    mcfg = ModelConfig(policy=tiny_models["policy"], reward=reward, reward_kind=kind, dtype="float64",
                       rubric="is it good ? Yes or No", prompt_format=prompt_format)
    gcfg = GGROConfig(**{**SEARCH, **over})
    eng = Engine.load(mcfg, gradient=gcfg.method == "ggro")
    return next(eng.align([parse_row(row, "r")], gcfg))


@slow
def test_models_and_health(server, client):
    assert [m.id for m in client.models.list().data] == ["tiny"]
    with urllib.request.urlopen(server["url"] + "/health") as r:
        assert json.loads(r.read())["status"] == "ok"


@slow
def test_chat_equals_local_align(client, tiny_models):
    msgs = [{"role": "user", "content": "can you find my water"}]
    r = client.chat.completions.create(model="tiny", messages=msgs)
    want = align_local(tiny_models, {"messages": msgs}, tiny_models["classifier"], "classifier")
    assert r.choices[0].message.content == want["response"]
    g = r.model_extra["ggro"]
    assert g["reward"] == pytest.approx(want["reward"], rel=1e-9)
    assert (g["num_nudges"], g["num_segments"], g["reward_calls"]) == (
        want["num_nudges"], want["num_segments"], want["reward_calls"])
    assert g["num_segments"] > 1 and g["num_nudges"] > 0      # the search really ran and nudged
    assert r.usage.completion_tokens == g["segment_boundaries"][-1]
    assert r.choices[0].finish_reason in ("stop", "length")


@slow
def test_completions_and_ggro_knobs(client, tiny_models):
    r = client.completions.create(model="tiny", prompt="the number of people who call", max_tokens=10,
                                  extra_body={"ggro": {"num_refinements": 2, "top_k": 5}})
    assert r.object == "text_completion" and r.usage.completion_tokens <= 10
    g = r.model_extra["ggro"]
    assert g["method"] == "ggro" and g["reward_calls"] <= 2 * g["num_segments"]
    greedy = client.completions.create(model="tiny", prompt="the number of people who call", max_tokens=10,
                                       extra_body={"ggro": {"method": "greedy"}})
    assert greedy.model_extra["ggro"]["method"] == "greedy"
    assert greedy.model_extra["ggro"]["refinements"] == 1


@slow
def test_streaming_chunks_are_segments(client):
    msgs = [{"role": "user", "content": "go now"}]
    full = client.chat.completions.create(model="tiny", messages=msgs)
    chunks = list(client.chat.completions.create(model="tiny", messages=msgs, stream=True,
                                                 stream_options={"include_usage": True}))
    texts = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert "".join(texts) == full.choices[0].message.content
    segs = full.model_extra["ggro"]["num_segments"]
    assert len(texts) >= min(segs, 2)            # one content chunk per accepted segment (empty ones skipped)
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finals) == 1 and finals[0].choices[0].model_extra["ggro"]["num_segments"] == segs
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens


@slow
def test_sixteen_concurrent_requests(client, tiny_models):
    prompts = (PROMPTS * 2)[:16]

    def one(p):
        return client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": p}])
    with ThreadPoolExecutor(16) as ex:
        out = list(ex.map(one, prompts))
    assert len(out) == 16 and all(o.choices[0].message.content is not None for o in out)
    # batching never changes answers: every prompt gives the same text alone and in a crowd (the ingress encodes
    # requests in threads: a shared tokenizer's state once changed a crowd's prompts, so check every one)
    alone = {p: one(p) for p in dict.fromkeys(prompts)}
    assert [o.choices[0].message.content for o in out] == [alone[p].choices[0].message.content for p in prompts]
    assert [o.usage.prompt_tokens for o in out] == [alone[p].usage.prompt_tokens for p in prompts]


@slow
def test_concurrent_requests_with_different_settings(client):
    """Different settings run in different search loops whose model calls @serve.batch merges."""
    reqs = [(6, {}), (12, {"num_refinements": 2}), (9, {"method": "greedy"}), (12, {"top_k": 3}),
            (10, {"search_mode": "lookahead", "max_refined_segments": 1, "num_refinements": 3})]

    def one(r):
        return client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "go now"}],
                                              max_tokens=r[0], extra_body={"ggro": r[1]}).choices[0].message.content
    with ThreadPoolExecutor(4) as ex:
        together = list(ex.map(one, reqs))
    assert together == [one(r) for r in reqs]


BAD = [
    (b"{not json", 400, "invalid_json"),
    (b"[1, 2]", 400, "invalid_json"),
    (b"[" * 100000 + b"]" * 100000, 400, "invalid_json"),           # json.loads' RecursionError was a 500
    (b'{"model": "tiny", "n": 1' + b"0" * 5000 + b"}", 400, "invalid_json"),   # beyond int's 4300 digits: a 500
    ({"model": "tiny", "messages": "hi"}, 400, "invalid_type"),
    ({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": "5"}, 400, "invalid_type"),
    ({"model": "tiny", "messages": []}, 400, "invalid_value"),
    ({"model": "tiny"}, 400, "missing_field"),
    ({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 65}, 400, "max_tokens_exceeded"),
    ({"model": "tiny", "messages": [{"role": "user", "content": "the " * 250}]}, 400, "context_length_exceeded"),
    ({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "ggro": {"top_k": 0}}, 400, "invalid_value"),
    ({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "ggro": {"bogus": 1}}, 400, "invalid_value"),
    ({"model": "nope", "messages": [{"role": "user", "content": "hi"}]}, 404, "model_not_found"),
    ({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "logprobs": True}, 400, "unsupported_parameter"),
]


@slow
def test_bad_requests_get_4xx(server, client):
    for body, status, code in BAD:
        got, err, _ = post(server["url"] + "/v1/chat/completions", body)
        assert (got, err["error"]["code"]) == (status, code), (body, err)
        assert err["error"]["message"]
    for path, status, code in [("/v1/nope", 404, "not_found"), ("/v1/models", 405, "method_not_allowed")]:
        got, err, _ = post(server["url"] + path, {"model": "tiny"})     # OpenAI's error shape on every status
        assert (got, err["error"]["code"], err["error"]["type"]) == (status, code, "invalid_request_error"), err
    with pytest.raises(openai.BadRequestError, match="limit of 64"):
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=100)
    r = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=4)
    assert r.choices[0].message.content is not None     # still healthy


@slow
def test_api_key(server):
    small = openai.OpenAI(base_url=server["url"] + "/small/v1", api_key="wrong", max_retries=0, timeout=120)
    with pytest.raises(openai.AuthenticationError):
        small.models.list()
    status, err, _ = post(server["url"] + "/small/v1/completions", {"prompt": "hi"})
    assert status == 401 and err["error"]["type"] == "authentication_error"
    ok = openai.OpenAI(base_url=server["url"] + "/small/v1", api_key=KEY, max_retries=0, timeout=120)
    assert ok.models.list().data[0].id == "tiny"


@slow
def test_overload_503_then_recovery(server):
    url, hdr = server["url"] + "/small/v1/chat/completions", {"Authorization": f"Bearer {KEY}"}
    body = {"model": "tiny", "messages": [{"role": "user", "content": "write a long word"}], "max_tokens": 64,
            "ggro": {"num_refinements": 8, "entropy_threshold": 0.5}}
    barrier = threading.Barrier(10)

    def one(_):
        barrier.wait()
        return post(url, body, hdr)
    with ThreadPoolExecutor(10) as ex:
        out = list(ex.map(one, range(10)))
    codes = sorted(s for s, _, _ in out)
    assert codes.count(200) >= 2 and 503 in codes and set(codes) <= {200, 503}, codes
    busy = next((b, h) for s, b, h in out if s == 503)
    assert busy[0]["error"]["code"] == "overloaded" and int(busy[1].get("Retry-After")) >= 1
    time.sleep(0.5)
    status, resp, _ = post(url, {**body, "max_tokens": 4}, hdr)
    assert status == 200 and resp["choices"][0]["message"]["content"] is not None
    # more choices than the queue ever admits is the request's fault (400), not a busy server's (503)
    status, err, _ = post(url, {**body, "n": 3}, hdr)
    assert (status, err["error"]["param"]) == (400, "n"), err
    # a body over the size limit is refused before it is parsed or tokenized
    status, err, _ = post(url, b'{"model": "tiny", "prompt": "' + b"a " * (2 * 1024 * 1024) + b'"}', hdr)
    assert (status, err["error"]["code"]) == (413, "request_too_large"), err


@slow
def test_request_timeout_504(server):
    body = {"model": "tiny", "messages": [{"role": "user", "content": "write a long word"}], "max_tokens": 64}
    status, err, _ = post(server["url"] + "/slow/v1/chat/completions", body)
    assert status == 504 and err["error"]["code"] == "timeout"
    with urllib.request.urlopen(server["url"] + "/slow/health") as r:   # the timed-out search was withdrawn
        assert json.loads(r.read())["status"] == "ok"


@slow
def test_serve_and_batch_run_one_worker_class(server):
    """Serve's model replicas and batch's actors hold their weights in the same class, as the running
    processes report it; a self-judging policy is one worker with both roles in each."""
    import ray
    from ray import serve
    from actors.cluster import Resources, start_workers
    from actors.worker import class_path
    deployments = [("ggro-test", "GGROPolicy"), ("ggro-test", "GGROReward"), ("ggro-test-small", "GGROModels")]
    served = {serve.get_deployment_handle(d, app).worker_class.remote().result() for app, d in deployments}
    workers = start_workers(server["small"].mcfg, Resources(policy_cpus=0.2, reward_cpus=0.2, aligner_cpus=0.1))
    try:
        actors = workers.policies[0].ranks + workers.reward.workers
        batch = set(ray.get([a.__ray_call__.remote(class_path) for a in actors]))
        pids = set(ray.get([a.pid.remote() for a in actors]))
    finally:
        workers.shutdown()
    assert served == batch == {"actors.worker.ModelWorker"}
    assert len(pids) == 1          # the policy replica is also the whole reward pool: one copy of the weights


def health(server, prefix: str) -> dict:
    with urllib.request.urlopen(server["url"] + prefix + "/health", timeout=60) as r:
        return json.loads(r.read())


def wait_until(get, pred, tries: int = 300) -> dict:
    """Poll `get()` (bounded) until `pred` holds; the last answer, which the caller asserts on."""
    for _ in range(tries):
        h = get()
        if pred(h):
            break
        time.sleep(0.2)
    return h


def wait_health(server, prefix: str, pred, tries: int = 300) -> dict:
    """Poll /health (bounded) until `pred` holds; the last answer, which the caller asserts on."""
    return wait_until(lambda: health(server, prefix), pred, tries)


# a search of many short segments with many refinements each: far longer than a disconnect takes to arrive
LONG = {"model": "tiny", "messages": [{"role": "user", "content": "write a long word"}], "max_tokens": 64, "n": 2}
LONG_KNOBS = {"num_refinements": 32, "entropy_threshold": 0.5}


def freed(server, before: dict) -> None:
    """Both slots of /small are back, a prompt left its search unfinished, and both slots admit again."""
    h = wait_health(server, "/small", lambda h: h["outstanding"] == 0 and h["search_loops"] == 0)
    assert (h["outstanding"], h["search_loops"]) == (0, 0), h
    # it left the search between rounds (withdrawn) or a running decode (cut)
    left = h["withdrawn"] + h["cut"] - before["withdrawn"] - before["cut"]
    assert h["cancelled"] > before["cancelled"] and left > 0, (before, h)
    small = openai.OpenAI(base_url=server["url"] + "/small/v1", api_key=KEY, max_retries=0, timeout=120)
    r = small.chat.completions.create(**{**LONG, "max_tokens": 4})     # n=2: the whole queue of /small
    assert len(r.choices) == 2 and all(c.message.content is not None for c in r.choices)


@slow
def test_disconnected_stream_frees_its_slots(server):
    small = openai.OpenAI(base_url=server["url"] + "/small/v1", api_key=KEY, max_retries=0, timeout=120)
    before = health(server, "/small")
    stream = small.chat.completions.create(**LONG, stream=True, extra_body={"ggro": LONG_KNOBS})
    for chunk in stream:      # role chunks first; the first text chunk once a segment is accepted
        if chunk.choices and chunk.choices[0].delta.content:
            break
    stream.close()
    freed(server, before)


@slow
def test_disconnected_request_frees_its_slots(server):
    before = health(server, "/small")
    body = json.dumps({**LONG, "ggro": LONG_KNOBS}).encode()
    host, port = server["url"].removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=60) as sock:
        sock.sendall(b"POST /small/v1/chat/completions HTTP/1.1\r\nHost: ggro\r\nContent-Type: application/json\r\n"
                     + f"Authorization: Bearer {KEY}\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
        wait_health(server, "/small", lambda h: h["outstanding"] == 2)     # admitted: its search runs
    freed(server, before)           # the socket closed without reading an answer


@slow
def test_metrics_on_rays_endpoint(client):
    """One chat request and one stream: the ggro_ metrics reach the node's Prometheus endpoint."""
    from tests.conftest import metric_present, metric_total, wait_for_metrics
    msgs = [{"role": "user", "content": "go now"}]
    client.chat.completions.create(model="tiny", messages=msgs)
    list(client.chat.completions.create(model="tiny", messages=msgs, stream=True))
    ok = {"app": "ggro-test", "endpoint": "chat/completions", "status": "200"}
    serve = {"source": "serve", "method": "ggro"}
    want = [("ray_ggro_serve_requests_total", ok), ("ray_ggro_serve_request_seconds_count", {"app": "ggro-test"}),
            ("ray_ggro_serve_first_token_seconds_count", {"app": "ggro-test"}),
            ("ray_ggro_serve_prompt_tokens_total", {"app": "ggro-test"}),
            ("ray_ggro_serve_completion_tokens_total", {"app": "ggro-test"}),
            ("ray_ggro_responses_total", serve), ("ray_ggro_reward_calls_total", serve),
            ("ray_ggro_nudges_count", serve), ("ray_ggro_reward_count", serve)]
    gauge = [("ray_ggro_serve_queue_depth", {"app": "ggro-test"})]   # back to 0 by now: it need only be there
    samples = wait_for_metrics(want, present=gauge)
    for name, labels in want:
        assert metric_total(samples, name, **labels) > 0, (name, sorted({s.name for s in samples}))
    name, labels = gauge[0]
    assert metric_present(samples, name, **labels), sorted({s.name for s in samples})


@slow
def test_reward_model_of_another_vocabulary(server, tiny_models, other_rm):
    """A reward model of another vocabulary serves the baselines (here the server's default, best-of-n): its
    replica holds it plain and the ingress asks it in its own tokens and chat template, so every answer and
    reward is batch's; a GGRO request is a 400 in OpenAI's shape, before any search."""
    from ray import serve
    from ggro.config import GGROConfig
    from pipeline.serve.app import build_app
    st = settings(tiny_models["policy"], other_rm, "classifier", gcfg=GGROConfig(**SEARCH, method="best-of-n", n=2))
    serve.run(build_app(st), name="ggro-test-vocab", route_prefix="/vocab")
    msgs, prompt, greedy = [{"role": "user", "content": "can you find my water"}], "the number of people who call", \
        {"ggro": {"method": "greedy"}}
    try:
        c = openai.OpenAI(base_url=server["url"] + "/vocab/v1", api_key="x", max_retries=0, timeout=120)
        with pytest.raises(openai.BadRequestError) as refused:
            c.chat.completions.create(model="tiny", messages=msgs, extra_body={"ggro": {"method": "ggro"}})
        chat = c.chat.completions.create(model="tiny", messages=msgs, extra_body=greedy)
        raw = c.completions.create(model="tiny", prompt=prompt, extra_body=greedy)    # read raw, by both models
        best = c.chat.completions.create(model="tiny", messages=msgs, seed=3)        # the default: best-of-n
    finally:
        serve.delete("ggro-test-vocab")
    err = refused.value.body
    assert (refused.value.status_code, err["type"], err["param"], err["code"]) == (
        400, "invalid_request_error", "ggro.method", "invalid_value"), err
    assert "one shared vocabulary" in err["message"] and "'greedy' or 'best-of-n'" in err["message"]
    local = functools.partial(align_local, tiny_models, reward=other_rm, kind="classifier")
    for got, text, want in [
            (chat, chat.choices[0].message.content, local({"messages": msgs}, method="greedy")),
            (raw, raw.choices[0].text, local({"prompt": prompt}, prompt_format="raw", method="greedy")),
            # a seeded request's choice i is prompt "choice-i", whose id seeds its samples
            (best, best.choices[0].message.content, local({"id": "choice-0", "messages": msgs}, method="best-of-n",
                                                            n=2, seed=3))]:
        g = got.model_extra["ggro"]
        assert text == want["response"] and text
        assert g["method"] == want["method"] and g["reward_calls"] == want["reward_calls"]
        assert g["reward"] == pytest.approx(want["reward"], rel=1e-9)


# -- fast: no Ray ------------------------------------------------------------------------------------
def test_parse_request_validation_and_config_sharing():
    from ggro.config import GGROConfig
    from pipeline.serve.api import ApiError, parse_request
    base = GGROConfig(max_new_tokens=1000)
    kw = dict(model_names=("ggro",), max_tokens_limit=256)
    msgs = [{"role": "user", "content": [{"type": "text", "text": "hi "}, {"type": "text", "text": "there"}]}]
    r = parse_request({"messages": msgs, "temperature": 0.3, "seed": 4}, "chat", base, **kw)
    assert r.row.messages[0]["content"] == "hi there"
    assert r.cfg.max_new_tokens == 256          # the server default is clamped to the limit
    assert not r.seeded and r.cfg.seed == 0     # greedy GGRO: seed and temperature do not split loops
    plain = parse_request({"messages": msgs}, "chat", base, **kw)
    assert plain.cfg == r.cfg
    b = parse_request({"prompt": ["x"], "seed": 4, "temperature": 0.3, "ggro": {"method": "best-of-n", "n": 2}},
                      "completion", base, **kw)
    assert b.seeded and (b.cfg.seed, b.cfg.temperature, b.cfg.n) == (4, 0.3, 2)
    quiet = parse_request({"messages": msgs, "logprobs": False, "user": "u", "frequency_penalty": 0,
                           "response_format": {"type": "text"}}, "chat", base, **kw)    # "not used" values pass
    assert quiet.cfg == plain.cfg
    look = parse_request({"messages": msgs, "ggro": {"search_mode": "lookahead", "max_refined_segments": 1}},
                         "chat", base, **kw)
    assert (look.cfg.search_mode, look.cfg.max_refined_segments) == ("lookahead", 1)
    for body, status in [({"messages": msgs, "n": 9}, 400), ({"messages": msgs, "stop": 3}, 400),
                         ({"messages": msgs, "stream": "yes"}, 400), ({"messages": msgs, "ggro": {"top_k": "5"}}, 400),
                         ({"messages": msgs, "ggro": {"method": "beam"}}, 400),
                         ({"messages": msgs, "ggro": {"num_refinements": 33}}, 400),
                         ({"messages": msgs, "tools": [{"type": "function"}]}, 400),
                         ({"messages": msgs, "response_format": {"type": "json_object"}}, 400),
                         ({"messages": msgs, "presence_penalty": 0.5}, 400),
                         ({"messages": msgs, "ggro": {"search_mode": "beam"}}, 400),
                         ({"messages": [{"role": "robot", "content": "x"}]}, 400),
                         ({"prompt": ["a", "b"]}, 400), ({"messages": msgs, "temperature": 3}, 400)]:
        kind = "completion" if "prompt" in body else "chat"
        with pytest.raises(ApiError) as e:
            parse_request(body, kind, base, **kw)
        assert e.value.status == status, body


def test_app_builders_and_cli_flags(tiny_models, monkeypatch):
    from ray.serve import Application
    import jobs.serve as js
    monkeypatch.setenv("GGRO_SERVE_ARGS", f"--policy {tiny_models['policy']} --max-queue 3")
    monkeypatch.setenv("GGRO_API_KEY", "k")
    assert isinstance(js.app, Application)
    assert isinstance(js.build({"reward": tiny_models["classifier"], "reward_kind": "classifier"}), Application)
    s = js.settings_from_args(js.parse(["--policy", tiny_models["policy"], "--max-queue", "3"]))
    assert (s.max_queue, s.api_key, s.mcfg.policy, s.shared_weights) == (3, "k", tiny_models["policy"], True)
    from ggro.config import ConfigError
    with pytest.raises(ConfigError, match="max-queue"):
        js.settings_from_args(js.parse(["--max-queue", "0"]))


@slow
def test_tensor_parallel_policy_replica(server, tiny_models):
    """--tp 2: the policy deployment forwards to an actors.policy rank group (DeepSpeed AutoTP over gloo)."""
    from ray import serve
    from pipeline.serve.app import build_app
    st = settings(tiny_models["policy"], tiny_models["classifier"], "classifier", tp=2)
    st = type(st)(**{**st.__dict__, "mcfg": type(st.mcfg)(**{**st.mcfg.__dict__, "dtype": "float32"})})
    serve.run(build_app(st), name="ggro-test-tp", route_prefix="/tp")
    try:
        c = openai.OpenAI(base_url=server["url"] + "/tp/v1", api_key="x", max_retries=0, timeout=120)
        msgs = [{"role": "user", "content": "can you find my water"}]
        got = c.chat.completions.create(model="tiny", messages=msgs).choices[0].message.content
        ranks = serve.get_deployment_handle("GGROPolicy", "ggro-test-tp").worker_class.remote().result()
    finally:
        serve.delete("ggro-test-tp")
    from ggro.config import GGROConfig, ModelConfig
    from ggro.engine import Engine
    from ggro.rows import parse_row
    eng = Engine.load(ModelConfig(policy=tiny_models["policy"], reward=tiny_models["classifier"],
                                  reward_kind="classifier"))
    assert got == next(eng.align([parse_row({"messages": msgs}, "r")], GGROConfig(**SEARCH)))["response"]
    assert ranks == "actors.worker.ModelWorker"      # the rank group runs batch's worker class too


@slow
def test_stop_ends_decoding_where_it_appears(client):
    """`stop` is checked while decoding: the response ends at the stop string's first appearance (cut before it, as
    OpenAI does), finish_reason is stop, and usage counts only the tokens decoded up to it."""
    def ask(prompt):
        return dict(model="tiny", prompt=prompt, max_tokens=16, extra_body={"ggro": {"method": "greedy"}})
    for prompt in PROMPTS:     # one whose greedy answer is long enough to stop in the middle
        free = client.completions.create(**ask(prompt))
        words = free.choices[0].text.split()
        if len(words) >= 6 and words[4] not in " ".join(words[:4]):
            break
    stop = words[4]
    ask = ask(prompt)
    cut = client.completions.create(**ask, stop=[stop])
    assert cut.choices[0].finish_reason == "stop"
    assert cut.choices[0].text == free.choices[0].text[:free.choices[0].text.index(stop)]
    assert cut.usage.completion_tokens < free.usage.completion_tokens


class RayStarted(Exception):
    """Raised by a stand-in for ray.init: the command got past every check that runs before Ray starts."""


def test_serve_refuses_a_reward_model_of_another_vocabulary_for_ggro(tiny_models, other_rm, capsys, monkeypatch):
    """The default method ggro needs one vocabulary: `ggro serve` says which methods serve this reward model and
    exits before it starts Ray; with --method greedy it gets as far as starting Ray."""
    from jobs.serve import main

    def start(*a, **kw):
        raise RayStarted
    monkeypatch.setattr("pipeline.batch.ray_align.connect", start)
    flags = ["--policy", tiny_models["policy"], "--reward", other_rm, "--reward-kind", "classifier",
             "--port", str(free_port())]
    with pytest.raises(SystemExit) as e:
        main(flags)
    err = capsys.readouterr().err
    assert e.value.code == 1 and "one shared vocabulary" in err and "pass --method best-of-n or --method greedy" in err
    with pytest.raises(RayStarted):
        main(flags + ["--method", "greedy"])


def test_serve_says_when_its_port_is_taken(tiny_models, capsys, monkeypatch):
    """A port another server holds: exit 1 with what to change, before Ray starts (Serve's proxy would die in its
    readiness check with an opaque ActorDiedError after the cluster came up)."""
    from jobs.serve import main

    def start(*a, **kw):
        raise RayStarted
    monkeypatch.setattr("pipeline.batch.ray_align.connect", start)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        with pytest.raises(SystemExit) as e:
            main(["--policy", tiny_models["policy"], "--port", str(held.getsockname()[1])])
    assert e.value.code == 1 and "pick another with --port" in capsys.readouterr().err
    with pytest.raises(RayStarted):          # the port free again: on to Ray
        main(["--policy", tiny_models["policy"], "--port", str(free_port())])


def test_serve_says_why_it_cannot_reach_the_cluster(tiny_models, tmp_path):
    """`ggro serve --address` of a cluster it cannot join: align's clear message (pipeline.batch.ray_align.connect) and
    exit 1, not Ray's traceback. Real: nobody listens at the address, and RAY_AUTH_MODE=token with no token
    anywhere makes ray.init raise its AuthenticationError at once (without it Ray retries for minutes)."""
    import os
    import subprocess
    import sys
    address = f"127.0.0.1:{free_port()}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH_TOKEN") and k != "RAY_ADDRESS"}
    env.update(RAY_AUTH_MODE="token", HOME=str(tmp_path), PYTHONPATH=os.getcwd())    # no ~/.ray/auth_token
    run = subprocess.run([sys.executable, "-m", "jobs.serve", "--address", address, "--policy", tiny_models["policy"],
                          "--reward", tiny_models["policy"], "--reward-kind", "judge", "--port", str(free_port())],
                         capture_output=True, text=True, timeout=120, env=env)
    assert run.returncode == 1, run.stderr[-3000:]
    assert f"cannot connect to the Ray cluster at '{address}'" in run.stderr and "RAY_AUTH_MODE=token" in run.stderr
    assert "Traceback" not in run.stderr, run.stderr[-3000:]


def test_a_reward_model_of_another_vocabulary_serves_the_baselines_only():
    """One decision (ggro.retokenize.vocab_refusal) at start and per request: GGRO is refused, the baselines pass."""
    from ggro.config import GGROConfig
    from pipeline.serve.api import ApiError, parse_request
    from pipeline.serve.app import serve_refusal
    problem = "policy 'p' has 40 tokens but reward model 'r' has 41"
    assert serve_refusal(None, "ggro") is None
    assert serve_refusal(problem, "greedy") is None and serve_refusal(problem, "best-of-n") is None
    assert serve_refusal(problem, "ggro").startswith(problem)
    kw = dict(model_names=("ggro",), max_tokens_limit=256, vocab_problem=problem)
    msgs = [{"role": "user", "content": "hi"}]
    base = GGROConfig(method="best-of-n")
    assert parse_request({"messages": msgs}, "chat", base, **kw).cfg.method == "best-of-n"
    assert parse_request({"messages": msgs, "ggro": {"method": "greedy"}}, "chat", base, **kw).cfg.method == "greedy"
    with pytest.raises(ApiError) as e:
        parse_request({"messages": msgs, "ggro": {"method": "ggro", "top_k": 5}}, "chat", base, **kw)
    assert (e.value.status, e.value.param, e.value.code) == (400, "ggro.method", "invalid_value")
    assert problem in e.value.message and "'greedy' or 'best-of-n'" in e.value.message
    assert parse_request({"messages": msgs, "ggro": {"method": "ggro"}}, "chat", base,
                         **{**kw, "vocab_problem": None}).cfg.method == "ggro"


class InProcess:
    """A deployment handle's call shape (`handle.fn.remote(arg).result(timeout_s=...)`) over an in-process
    ModelWorker: the hub's real search loops and seam, without Serve's transport."""

    def __init__(self, worker):
        self.worker = worker

    def __getattr__(self, name):
        fn = getattr(self.worker, name)
        return SimpleNamespace(remote=lambda arg: SimpleNamespace(result=lambda timeout_s=None: fn(arg)))


def test_search_loops_forget_the_rows_a_retokenizing_reward_read(tiny_models, other_rm):
    """A long-lived ingress must not grow with requests: a loop's Retokenized forgets a prompt's row once its
    result is out, or once the prompt is withdrawn (its request stopped waiting)."""
    import queue
    from actors.worker import ModelWorker
    from ggro.config import GGROConfig, ModelConfig
    from ggro.engine import Engine
    from ggro.rows import parse_row
    from ggro.search import Prompt
    from pipeline.serve.hub import Job, SearchHub
    mcfg = ModelConfig(policy=tiny_models["policy"], reward=other_rm, reward_kind="classifier", dtype="float64",
                       batch_size=2)
    policy, reward = ModelWorker(mcfg, ("policy",)), ModelWorker(mcfg, ("reward",))
    seams = []

    class Recording(Engine):     # the real Engine; it notes each loop's reward seam
        def over(self, policy=None, reward=None):
            engine = super().over(policy, reward)
            seams.append(engine.reward)
            return engine
    engine = Recording.remote(mcfg, policy.context)
    hub = SearchHub(engine, InProcess(policy), InProcess(reward), mcfg.batch_size, max_queue=16)
    cfg, events, jobs = GGROConfig(method="greedy", max_new_tokens=6), queue.Queue(), []
    for i, text in enumerate(PROMPTS[:6]):
        row = parse_row({"messages": [{"role": "user", "content": text}]}, "request")
        x = engine.prompt(row, cfg.max_new_tokens)
        jobs.append(Job(Prompt(f"req{i}-0", x.ids), 0, events.put, row=row))
        assert hub.admit(1)
        hub.submit(cfg, jobs[-1])
    assert hub.cancel(jobs[4:]) <= 2
    answers = [events.get(timeout=120) for _ in jobs[:4]]
    assert all(kind == "done" and math.isfinite(res.reward) for kind, _, res in answers), answers
    h = wait_until(hub.stats, lambda h: h["search_loops"] == 0)
    assert (h["outstanding"], h["search_loops"]) == (0, 0), h
    from ggro.retokenize import Retokenized
    assert seams and all(isinstance(s, Retokenized) and not s.rows for s in seams), [s.rows for s in seams]
