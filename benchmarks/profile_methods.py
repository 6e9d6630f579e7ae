"""Where a method's CPU time goes: faithful GGRO vs best-of-8 (or lookahead) on a few prompts, the wall split
by part (exclusive times, by wrapping the engine's functions in this process), with call counts, and the wall
against its roofline floor: every pass over the model's Linear layers costs at least the time to read their
weights once (this machine's read bandwidth) or to run their 2 x tokens x weights FLOPs (the packed fp32
kernel's throughput on 2 048 rows), whichever is more; a backward with the input gradient costs as much again.
Attention and the small ops count as zero, so wall / floor is how far the engine is from this CPU.

    GGRO_THREADS=1 python benchmarks/profile_methods.py PROMPTS.jsonl MAX_NEW_TOKENS [METHODS]

METHODS: comma-separated of best-of-8, faithful, lookahead, parallel, s2 (GGRO S=2: `ggro bench`'s scaling run),
each optionally @B for B prompts in flight (default 8, which the engine fills to best-of-8's rows; s2@1 runs one
prompt at a time, as the bench's batch 1 does). Default best-of-8,faithful.

Used for docs/performance.md "Where faithful GGRO's time goes" and "The CPU engine against its roofline"; run it alone
on the machine."""
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
from ggro.packed import pack_linears
from ggro.search import Prompt, run
from pipeline.eval import bench as B


def fastest(f, n=3) -> float:
    f()
    out = []
    for _ in range(n):
        t0 = time.perf_counter(); f(); out.append(time.perf_counter() - t0)
    return min(out)


big = torch.ones(256 * 2**20)                        # 1 GiB: no cache holds it
BW = big.numel() * 4 / fastest(big.sum)              # bytes/s read
del big
lin = torch.nn.Sequential(torch.nn.Linear(576, 1536, bias=False)).requires_grad_(False)
pack_linears(lin)
xs = torch.randn(2048, 576)
with torch.no_grad():
    PEAK = 2 * 2048 * 576 * 1536 * 10 / fastest(lambda: [lin(xs) for _ in range(10)])   # FLOP/s
print(f"roofline: read {BW / 1e9:.1f} GB/s, packed fp32 Linear {PEAK / 1e9:.0f} GFLOP/s at 2 048 rows, "
      f"{torch.get_num_threads()} threads, CPU capability {torch.backends.cpu.get_cpu_capability()}")

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
floor = defaultdict(float)


def roof(tokens: int, params: int, nbytes: int) -> float:
    return max(nbytes / BW, 2 * tokens * params / PEAK)


def floored(module, name):
    lins = [m.weight for m in module.modules() if isinstance(m, torch.nn.Linear)] or [module.weight]
    params, nbytes = sum(w.numel() for w in lins), sum(w.numel() * w.element_size() for w in lins)
    fwd = module.forward
    def f(*a, **k):
        x = k.get("input_ids", k.get("inputs_embeds"))
        x = a[0] if x is None else x
        tokens = x.shape[0] * x.shape[1] if x.dim() > 1 else x.shape[0]
        if name == "backbone" and x.dim() > 1 and x.dtype == torch.long:
            kind = "policy decode steps" if x.shape[1] == 1 else "prefill (prefix caches)"
        else:
            kind = "RM forward" if name == "backbone" else "lm_head"
        if name == "lm_head":
            tokens = x.shape[:-1].numel()
        floor[kind] += roof(tokens, params, nbytes)
        if torch.is_grad_enabled() and x.requires_grad:
            floor["RM backward"] += roof(tokens, params, nbytes)
        return fwd(*a, **k)
    module.forward = f


floored(pm.model, "backbone")      # the guide runs on the policy's backbone (the shipped default): one model
floored(pm.lm_head, "lm_head")
_grad = torch.autograd.grad
torch.autograd.grad = timed("RM backward", _grad)
P.SegmentDecoder.decode = timed("host: decode loop (rest)", P.SegmentDecoder.decode)
R.RewardModel.score = timed("host: reward score (rest)", R.RewardModel.score)
# forward inside prefill is the model's forward too: split by stack position handled by exclusive time
gcfg = GGROConfig(max_new_tokens=tokens, seed=0)
cfgs = {"best-of-8": replace(gcfg, method="best-of-n", n=8), "faithful": replace(gcfg, method="ggro", num_refinements=4),
        "lookahead": replace(gcfg, method="ggro", num_refinements=8, search_mode="lookahead", max_refined_segments=1),
        "parallel": replace(gcfg, method="ggro", num_refinements=4, search_mode="parallel"),
        "s2": replace(gcfg, method="ggro", num_refinements=2)}
B.warm_up(eng, rows, gcfg)
for m in methods:
    T.clear(); N.clear(); steps.clear(); floor.clear()
    name, _, batch = m.partition("@")
    t0 = time.perf_counter()
    if batch == "1":     # one prompt at a time, unfilled: what `ggro bench`'s scaling run calls batch 1
        enc = B.encode_rows(eng, rows, tokens)
        res = list(run([Prompt(x.id, x.ids, x.has_prefill) for x in enc], eng.policy, eng.reward, cfgs[name], 1))
        eng.policy.release([x.id for x in enc])
        r = {"records": [{"policy_tokens": x.policy_tokens, "reward_calls": x.reward_calls, "reward": x.reward}
                         for x in res]}
    else:
        r = B.time_method(eng, rows, cfgs[name], int(batch or 8))
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
    total = sum(floor.values())
    print(f"   roofline floor {total:.2f}s (wall / floor {wall / total:.2f}): "
          + ", ".join(f"{k} {v:.2f}s" for k, v in sorted(floor.items(), key=lambda kv: -kv[1])))
    if os.environ.get("DUMP"):
        json.dump([(x["id"], x["response"], x["reward"]) for x in recs], open(os.environ["DUMP"] + f".{m}.json", "w"))
