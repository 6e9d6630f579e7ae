"""The GPU path. Tests marked `gpu` are skipped without CUDA (tests/conftest.py).

- identical tokens CPU vs GPU in fp32 on a tiny model (ggro.policy.SegmentDecoder: greedy, entropy
  stops, forced nudges, top-k candidates, prefix-cache extension, seeded sampling);
- reward scores (reward + input-gradient candidate scores) CPU vs GPU;
- a tp=1 policy replica on CUDA inside a Ray actor (Ray's CUDA_VISIBLE_DEVICES), a reward actor on its
  own GPU, and tp=2 over NCCL when there are two GPUs; on one GPU, DeepSpeed's AutoTP at tp=2 over gloo
  (benchmarks/gpu_tp2.py: the sharding and its all-reduces on CUDA, without NCCL);
- the GGRO search end to end on CUDA (fp32 and bf16);
- `--compile`: the static decoder captured as CUDA graphs decodes what the eager one does;
- the throughput benchmark (benchmarks/gpu_throughput.py, random-weight Llama-3.2-1B shape).
The CPU smoke tests of both benchmarks (tiny shapes) run everywhere, so the GPU check
(benchmarks/gpu_check.sh, docs/gpu.md) cannot rot; its methods benchmark (benchmarks/gpu_methods.py)
runs at full size there.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ggro import models
from ggro.config import GGROConfig, ModelConfig
from ggro.policy import SegmentDecoder
from ggro.reward import RewardModel
from ggro.search import Prompt, run
from ggro.seam import RewardQuery, Sampling, SegmentRequest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks" / "gpu_throughput.py"
TP2 = ROOT / "benchmarks" / "gpu_tp2.py"
METHODS_BENCH = ROOT / "benchmarks" / "gpu_methods.py"
PROMPTS = ["how do you make water ?", "what is the time", "write a long word", "I like people",
           "tell me about the first day", "can you find my water", "a", "go now"]
gpu = pytest.mark.gpu


@pytest.fixture(autouse=True)
def exact_fp32():
    """fp32 means fp32: no TF32 matmuls, which differ from the CPU in the 3rd decimal."""
    if not torch.cuda.is_available():
        yield
        return
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def encode(tok, text: str) -> list[int]:
    return tok.encode(tok.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                              add_generation_prompt=True), add_special_tokens=False)


def decoder(path: str, device: str, dtype: str = "float32") -> SegmentDecoder:
    tok = models.load_tokenizer(path)
    model = models.load_model(path, "causal", dtype, device)
    return SegmentDecoder(model, models.eos_ids(tok, model), max_cached=64)


def requests(tok, tag: str, sampling: bool = False) -> list[SegmentRequest]:
    the = tok.convert_tokens_to_ids("the")
    reqs = []
    for i, text in enumerate(PROMPTS):
        ids = encode(tok, text)
        if sampling:
            reqs.append(SegmentRequest(f"{tag}-s{i}", ids, 24, sampling=Sampling(0.7, 0.95, seed=100 + i)))
            continue
        reqs += [SegmentRequest(f"{tag}-g{i}", ids, 24),                                    # plain greedy
                 SegmentRequest(f"{tag}-e{i}", ids, 24, entropy_threshold=1.5, min_segment_tokens=2, top_k=5),
                 SegmentRequest(f"{tag}-f{i}", ids, 24, forced=the, insert_at=2, entropy_threshold=1.5,
                                min_segment_tokens=4, top_k=5)]
    return reqs


def assert_same_segments(got, want):
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert (g.tokens, g.stop, g.candidates, g.decoded) == (w.tokens, w.stop, w.candidates, w.decoded)
        assert g.stop_entropy == pytest.approx(w.stop_entropy, rel=1e-4, abs=1e-4)


def extended(reqs, results):
    """The same sequences one accepted segment later: exercises the prefix-cache extension path."""
    return [SegmentRequest(r.seq_id, r.prefix + res.tokens, 16, entropy_threshold=1.5, min_segment_tokens=2, top_k=5)
            for r, res in zip(reqs, results) if res.stop != "eos" and res.tokens]


# -- SegmentDecoder: CPU vs GPU ---------------------------------------------------------------------
@gpu
def test_identical_tokens_cpu_vs_gpu_fp32(tiny_models):
    tok = models.load_tokenizer(tiny_models["policy"])
    cpu, cuda = decoder(tiny_models["policy"], "cpu"), decoder(tiny_models["policy"], "cuda")
    assert cuda.device.type == "cuda"
    reqs = requests(tok, "r")
    want, got = cpu.decode(reqs), cuda.decode(reqs)
    assert_same_segments(got, want)
    assert {r.stop for r in want} >= {"entropy", "length"}          # the cases really differ
    nxt = extended(reqs, want)
    assert nxt
    assert_same_segments(cuda.decode(nxt), cpu.decode(nxt))


@gpu
def test_captured_static_decoder_decodes_what_eager_does_on_cuda(tiny_models):
    """`--compile` on CUDA: persistent slabs, the model's step compiled whole and captured as CUDA graphs
    (mode reduce-overhead); the same fp32 segments as the eager CUDA decoder, on two calls (graphs replayed)."""
    tok = models.load_tokenizer(tiny_models["policy"])
    eager = decoder(tiny_models["policy"], "cuda")
    captured = SegmentDecoder(eager.model, eager.eos, static=True, compile_options={"mode": "reduce-overhead"})
    for tag in ("c1", "c2"):
        reqs = requests(tok, tag)
        want = eager.decode(reqs)
        assert_same_segments(captured.decode(reqs), want)
        nxt = extended(reqs, want)
        assert_same_segments(captured.decode(nxt), eager.decode(nxt))


@gpu
def test_identical_sampled_tokens_cpu_vs_gpu_fp32(tiny_models):
    """Seeded best-of-n samples are the same on either device (the generator must follow the logits' device)."""
    tok = models.load_tokenizer(tiny_models["policy"])
    cpu, cuda = decoder(tiny_models["policy"], "cpu"), decoder(tiny_models["policy"], "cuda")
    reqs = requests(tok, "s", sampling=True)
    assert_same_segments(cuda.decode(reqs), cpu.decode(reqs))


@gpu
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_decodes_on_cuda(tiny_models, dtype):
    tok = models.load_tokenizer(tiny_models["policy"])
    dec = decoder(tiny_models["policy"], "cuda", dtype)
    assert next(dec.model.parameters()).dtype == models.DTYPES[dtype]
    out = dec.decode(requests(tok, dtype))
    for r in out:
        assert r.stop in ("eos", "length", "entropy") and all(0 <= t < len(tok) for t in r.tokens)
        assert r.stop_entropy == r.stop_entropy          # not NaN (entropy is computed in fp32)


@gpu
@pytest.mark.parametrize("kind", ["classifier", "judge"])
def test_reward_scores_cpu_vs_gpu_fp32(tiny_models, kind):
    tok = models.load_tokenizer(tiny_models["policy"])
    path = tiny_models[kind]
    rms = {dev: RewardModel(models.load_model(path, "classifier" if kind == "classifier" else "causal", "float32", dev),
                            tok, kind, rubric="is it good ? Yes or No", eos_ids=[tok.eos_token_id])
           for dev in ("cpu", "cuda")}
    queries = []
    for i, text in enumerate(PROMPTS):
        ids = encode(tok, text) + tok.encode("the water is hot", add_special_tokens=False)
        queries.append(RewardQuery(ids, position=len(ids) - 2, candidates=list(range(4, 14))) if i % 2 else
                       RewardQuery(ids))
    want, got = rms["cpu"].score(queries), rms["cuda"].score(queries)
    for g, w in zip(got, want):
        assert g.reward == pytest.approx(w.reward, rel=1e-4, abs=1e-4)
        if w.scores is None:
            assert g.scores is None
        else:
            assert g.scores == pytest.approx(w.scores, rel=1e-3, abs=1e-4)


# -- GGRO end to end on CUDA --------------------------------------------------------------------------
def _search(tiny_models, device, dtype, method="ggro"):
    tok = models.load_tokenizer(tiny_models["policy"])
    dec = decoder(tiny_models["policy"], device, dtype)
    rm = RewardModel(models.load_model(tiny_models["classifier"], "classifier", dtype, device), tok, "classifier")
    prompts = [Prompt(f"p{i}", encode(tok, t)) for i, t in enumerate(PROMPTS)]
    cfg = GGROConfig(method=method, max_new_tokens=24, num_refinements=3, top_k=5)
    return {r.id: r for r in run(prompts, dec, rm, cfg, 4)}


@gpu
def test_greedy_search_identical_cpu_vs_gpu_fp32(tiny_models):
    want, got = _search(tiny_models, "cpu", "float32", "greedy"), _search(tiny_models, "cuda", "float32", "greedy")
    assert {k: r.tokens for k, r in got.items()} == {k: r.tokens for k, r in want.items()}


@gpu
def test_ggro_search_on_cuda(tiny_models):
    """fp32 GGRO on the GPU follows the CPU run (nudges are argmaxes of float scores: allow a rare tie flip);
    bf16 runs and returns finite rewards."""
    want, got = _search(tiny_models, "cpu", "float32"), _search(tiny_models, "cuda", "float32")
    same = [k for k in want if got[k].tokens == want[k].tokens]
    assert len(same) >= len(want) - 1, (len(same), len(want))
    for k in same:
        assert got[k].reward == pytest.approx(want[k].reward, rel=1e-3, abs=1e-3)
    half = _search(tiny_models, "cuda", "bfloat16")
    assert len(half) == len(PROMPTS) and all(r.reward == r.reward for r in half.values())


# -- Ray actors on GPUs ----------------------------------------------------------------------------------
def _device_of(actor, attr: str) -> str:
    import ray
    return ray.get(actor.__ray_call__.remote(lambda self: str(getattr(self, attr).device)))


@gpu
def test_tp1_policy_replica_on_cuda(ray_cluster, tiny_models):
    from actors.policy import start_policy_replica
    if ray_cluster.cluster_resources().get("GPU", 0) < 1:
        pytest.skip("the Ray cluster sees no GPU")
    tok = models.load_tokenizer(tiny_models["policy"])
    mcfg = ModelConfig(policy=tiny_models["policy"], device="cuda", dtype="float32", batch_size=4)
    rep = start_policy_replica(mcfg, tp=1, gpus_per_rank=1, cpus_per_rank=0.5, timeout_s=120)
    try:
        assert _device_of(rep.ranks[0], "decoder").startswith("cuda")
        gpu_ids = ray_cluster.get(rep.ranks[0].__ray_call__.remote(lambda self: __import__("ray").get_gpu_ids()))
        assert len(gpu_ids) == 1                     # Ray gave the rank exactly one GPU
        reqs = requests(tok, "tp1")
        want = decoder(tiny_models["policy"], "cpu").decode(reqs)
        assert_same_segments(rep.decode(reqs), want)
    finally:
        rep.shutdown()


@gpu
def test_reward_actor_on_its_own_gpu(ray_cluster, tiny_models):
    from actors.reward import start_reward_pool
    if ray_cluster.cluster_resources().get("GPU", 0) < 1:
        pytest.skip("the Ray cluster sees no GPU")
    tok = models.load_tokenizer(tiny_models["policy"])
    mcfg = ModelConfig(policy=tiny_models["policy"], reward=tiny_models["classifier"], reward_kind="classifier",
                       device="cuda", dtype="float32")
    pool = start_reward_pool(mcfg, replicas=1, gpus=1, cpus=0.5)
    try:
        ids = encode(tok, "what is the time") + tok.encode("the water", add_special_tokens=False)
        q = [RewardQuery(ids, position=len(ids) - 1, candidates=[4, 5, 6])]
        want = RewardModel(models.load_model(tiny_models["classifier"], "classifier", "float32"), tok,
                           "classifier").score(q)
        got = pool.score(q)
        assert got[0].reward == pytest.approx(want[0].reward, rel=1e-4, abs=1e-4)
        assert got[0].scores == pytest.approx(want[0].scores, rel=1e-3, abs=1e-4)
    finally:
        pool.shutdown()


@gpu
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_tp2_nccl_policy_replica_matches_unsharded(ray_cluster, tiny_models):
    """Two ranks, one GPU each (Ray sets CUDA_VISIBLE_DEVICES per actor: each sees its GPU as cuda:0),
    one NCCL world; greedy tokens equal the unsharded CPU decoder's."""
    from actors.policy import start_policy_replica
    tok = models.load_tokenizer(tiny_models["policy"])
    mcfg = ModelConfig(policy=tiny_models["policy"], device="cuda", dtype="float32", batch_size=4)
    rep = start_policy_replica(mcfg, tp=2, gpus_per_rank=1, cpus_per_rank=0.5, timeout_s=300)
    try:
        reqs = [r for r in requests(tok, "tp2") if r.entropy_threshold == float("inf")]   # plain greedy
        want = decoder(tiny_models["policy"], "cpu").decode(reqs)
        got = rep.decode(reqs)
        assert [g.tokens for g in got] == [w.tokens for w in want]
    finally:
        rep.shutdown()


# -- the throughput benchmark ----------------------------------------------------------------------------
def _bench(tmp_path, *args, timeout=600, script=BENCH):
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, str(script), *args, "--json", str(out)], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text()), proc.stdout


def _bench_here(tmp_path, capsys, *args, script=BENCH):
    """The CPU smoke runs: the script's main() in this process, which has torch and transformers imported
    already (a fresh interpreter spends most of a tiny run importing them). RNG and TF32 state are restored."""
    import importlib.util
    spec = importlib.util.spec_from_file_location(f"bench_{script.stem}", script)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out, tf32 = tmp_path / "bench.json", torch.backends.cuda.matmul.allow_tf32
    try:
        with torch.random.fork_rng():
            assert mod.main([*args, "--json", str(out)]) in (0, None)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    return json.loads(out.read_text()), capsys.readouterr().out


def test_benchmark_script_smoke_on_cpu(tmp_path, capsys):
    res, table = _bench_here(tmp_path, capsys, "--preset", "tiny", "--device", "cpu", "--dtype", "float32", "--batch-sizes", "1,2",
                             "--prompt-tokens", "16", "--new-tokens", "4")
    assert [r["batch"] for r in res["rows"]] == [1, 2]
    assert all(r["decode_tok_s"] > 0 and r["reward_seq_s"] > 0 for r in res["rows"])
    assert table.startswith("| batch |")


def test_methods_benchmark_tiny_on_cpu(tmp_path, capsys):
    """gpu_methods.py's tiny CPU mode: every method and batch measured, fp32 tokens checked, targets read."""
    res, table = _bench_here(tmp_path, capsys, "--tiny", "--device", "cpu", "--batch-sizes", "1,4", "--prompt-tokens", "8",
                        "--new-tokens", "6", "--refinements", "2", "--csv", str(tmp_path / "m.csv"),
                             "--repeats", "2", script=METHODS_BENCH)
    methods = ["hf-generate", "decoder", "greedy", "best-of-4", "ggro", "lookahead"]
    rows = res["rows"]
    assert [(r["model"], r["batch"], r["method"]) for r in rows] == [
        (v, b, m) for v in ("random", "peaked") for b in (1, 4) for m in methods]
    assert all(r["tokens"] == 6 * r["batch"] and r["wall_s"] > 0 and r["tok_s"] > 0 for r in rows)
    by = {(r["batch"], r["method"]): r for r in rows if r["model"] == "random"}
    for b in (1, 4):
        assert by[b, "decoder"]["same_tokens_as_hf"] == f"{b}/{b}"       # fp32: our greedy == HF generate's
        assert by[b, "greedy"]["rm_calls"] == b and by[b, "best-of-4"]["rm_calls"] == 4 * b
        assert by[b, "ggro"]["rm_calls"] > b and by[b, "greedy"]["x_greedy_wall"] == 1.0
        assert by[b, "lookahead"]["rm_calls"] > b                  # the point's probe plus S scored responses
    assert all(len(r["walls"]) == 2 and sorted(r["walls"])[1] == round(r["wall_s"], 3) for r in rows)
    assert res["fp32_identical_tokens"] == {"decoder": "8/8", "ggro": "8/8"}
    assert [t["met"] in (True, False) for t in res["targets"]] == [True] * 5   # 3, and 2 on the peaked model
    assert len((tmp_path / "m.csv").read_text().splitlines()) == 1 + len(rows)
    assert table.startswith("| model | batch | method |") and "| target | measured | met |" in table


@gpu
def test_benchmark_llama_1b_on_gpu(tmp_path):
    res, table = _bench(tmp_path, "--preset", "llama-1b", "--device", "cuda", "--dtype", "bfloat16",
                        "--batch-sizes", "1,8", "--prompt-tokens", "128", "--new-tokens", "16")
    assert 1.2e9 < res["params"] < 1.3e9             # Llama-3.2-1B's 1.24B
    for r in res["rows"]:
        assert r["decode_tok_s"] > 0 and r["policy_peak_gib"] > 2.0
    print(table)


@pytest.mark.parametrize("device", [pytest.param("cuda", marks=gpu), pytest.param("cpu", marks=pytest.mark.slow)])
def test_deepspeed_tp2_on_one_device_matches_the_plain_policy(tmp_path, device):
    """benchmarks/gpu_tp2.py: two DeepSpeed AutoTP ranks (actors.worker.ModelWorker, as Ray runs them) on one
    device over gloo decode the same greedy tokens as the unsharded policy, fp32. On the CPU it keeps the
    script from rotting between lent GPUs."""
    pytest.importorskip("deepspeed")
    out = tmp_path / "tp2.json"
    proc = subprocess.run([sys.executable, str(TP2), "--device", device, "--json", str(out)], capture_output=True,
                          text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    row = json.loads(out.read_text())
    assert (row["rows"], row["equal_rows"], row["first_difference"]) == (8, 8, None)
    assert "| 8/8 |" in proc.stdout
