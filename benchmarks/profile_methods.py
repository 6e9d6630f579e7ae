"""Where a method's CPU time goes: faithful GGRO vs best-of-8 (or lookahead) on a few prompts, the wall split
by part (exclusive times, by wrapping the engine's functions in this process), with call counts.

    GGRO_THREADS=1 python benchmarks/profile_methods.py PROMPTS.jsonl MAX_NEW_TOKENS [METHODS]

METHODS: comma-separated of best-of-8, faithful, lookahead, parallel (default best-of-8,faithful).

Used for docs/performance.md "Where faithful GGRO's time goes"; run it alone on the machine."""
import sys, time, json, os
from collections import defaultdict
from dataclasses import replace
os.environ.setdefault("GGRO_THREADS", "1")
import torch
torch.set_num_threads(int(os.environ["GGRO_THREADS"]))
from ggro.config import ModelConfig, GGROConfig
from ggro.engine import Engine
from pipeline.batch.driver import read_input
import ggro.policy as P, ggro.reward as R, ggro.kvcache as K
from pipeline.eval import bench as B

path, tokens = sys.argv[1], int(sys.argv[2])
methods = sys.argv[3].split(",") if len(sys.argv) > 3 else ["best-of-8", "faithful"]
rows = read_input(path, None)
eng = Engine.load(ModelConfig())
T = defaultdict(float); N = defaultdict(int); stack = []
def timed(name, f):
    def w(*a, **k):
        t0 = time.perf_counter(); stack.append(0.0)
        try:
            return f(*a, **k)
        finally:
            dt = time.perf_counter() - t0; inner = stack.pop()
            T[name] += dt - inner; N[name] += 1
            if stack: stack[-1] += dt
    return w
dec = eng.policy
pm = dec.model
steps = defaultdict(int)
orig_step = dec.step
def step(logits, *a, **k):
    steps["steps"] += 1; steps["rows"] += logits.shape[0]
    return orig_step(logits, *a, **k)
dec.step = timed("host: decode_step (token/stop test)", step)
_pf = pm.forward
def pfwd(*a, **k):
    ids = k.get("input_ids")
    if ids is not None and ids.shape[1] == 1:
        return timed_dec(*a, **k)
    return timed_pre(*a, **k)
timed_dec = timed("policy forward: decode steps", _pf)
timed_pre = timed("policy forward: prefill", _pf)
pm.forward = pfwd
K.PrefixCache._extend = timed("prefill (prefix caches, policy+RM)", K.PrefixCache._extend)
K.left_pad_kv = timed("cache assembly (left_pad_kv)", K.left_pad_kv); P.left_pad_kv = K.left_pad_kv; R.left_pad_kv = K.left_pad_kv
def counted(_rr):
    def rr(self, embeds, *a, **k):
        steps["rm_tok"] += embeds.shape[0] * embeds.shape[1]
        if embeds.requires_grad:
            steps["rm_grad_tok"] += embeds.shape[0] * embeds.shape[1]
        return _rr(self, embeds, *a, **k)
    return timed("RM forward", rr)
for cls in (R.RewardModel, R.HeadAndJudge):    # the shipped guide is a HeadAndJudge
    cls._reward = counted(cls.__dict__["_reward"])
R.torch.autograd.grad  # same torch module
_grad = torch.autograd.grad
torch.autograd.grad = timed("RM backward", _grad)
P.SegmentDecoder.decode = timed("host: decode loop (rest)", P.SegmentDecoder.decode)
R.RewardModel.score = timed("host: reward score (rest)", R.RewardModel.score)
# forward inside prefill is the model's forward too: split by stack position handled by exclusive time
gcfg = GGROConfig(max_new_tokens=tokens, seed=0)
cfgs = {"best-of-8": replace(gcfg, method="best-of-n", n=8), "faithful": replace(gcfg, method="ggro", num_refinements=4),
        "lookahead": replace(gcfg, method="ggro", num_refinements=8, search_mode="lookahead", max_refined_segments=1),
        "parallel": replace(gcfg, method="ggro", num_refinements=4, search_mode="parallel")}
B.warm_up(eng, rows, gcfg)
for m in methods:
    T.clear(); N.clear(); steps.clear()
    t0 = time.perf_counter()
    r = B.time_method(eng, rows, cfgs[m], 8)
    wall = time.perf_counter() - t0
    recs = r["records"]
    print(f"== {m}: wall {wall:.2f}s  policy tokens {sum(x['policy_tokens'] for x in recs)}  RM calls "
          f"{sum(x['reward_calls'] for x in recs)}  mean reward {sum(x['reward'] for x in recs)/len(recs):.4f}  "
          f"decode steps {steps['steps']} mean rows/step {steps['rows']/max(1,steps['steps']):.1f}  "
          f"RM tokens run (padding incl.) {steps['rm_tok']}, with grad {steps['rm_grad_tok']}")
    acc = 0
    for k, v in sorted(T.items(), key=lambda kv: -kv[1]):
        acc += v
        print(f"   {k:40s} {v:7.2f}s {100*v/wall:5.1f}%  calls {N[k]}")
    print(f"   {'other (search, encode, text)':40s} {wall-acc:7.2f}s {100*(wall-acc)/wall:5.1f}%")
    if os.environ.get("DUMP"):
        json.dump([(x["id"], x["response"], x["reward"]) for x in recs], open(os.environ["DUMP"] + f".{m}.json", "w"))
