"""cluster/ configs and the `--dry-run` resource planner (CPU only, no Ray needed except one `slow` test).

- Every YAML in cluster/ parses (and the YAML embedded in runtimeEnvYAML / serveConfigV2 too).
- Every `ggro ...` / `python -m jobs.X ...` command line in them, comments included, and every
  GGRO_SERVE_ARGS is accepted by the real `ggro` argparse parser.
- The shipped RayJobs' plans fit the clusters their manifests describe.
- `--dry-run` prints a plan that fits and plans that do not (with what to change), and loads no weights.
"""
from __future__ import annotations

import hashlib
import importlib
import json
import re
import shlex
from pathlib import Path

import pytest
import yaml

from jobs.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"
YAMLS = sorted(p for p in CLUSTER.iterdir() if p.suffix in (".yaml", ".yml"))
EMBEDDED_YAML_KEYS = ("runtimeEnvYAML", "serveConfigV2")
# `ggro SUB` where a command starts (line start, after &&, ;, $ or `--`); `python -m jobs.X` anywhere.
COMMAND = re.compile(r"(?:^|(?:&&|;|\$|\s--)\s+)(ggro\s+[a-z]+)\b(.*)|(python3?\s+-m\s+jobs\.[a-z_]+)\b(.*)")

LLAMA_8B = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
            "intermediate_size": 14336, "num_attention_heads": 32, "num_hidden_layers": 32,
            "num_key_value_heads": 8, "vocab_size": 128256, "tie_word_embeddings": False,
            "max_position_embeddings": 131072, "torch_dtype": "bfloat16"}
LLAMA_70B = {**LLAMA_8B, "hidden_size": 8192, "intermediate_size": 28672, "num_attention_heads": 64,
             "num_hidden_layers": 80}
RM_8B = {**LLAMA_8B, "architectures": ["LlamaForSequenceClassification"], "num_labels": 1}


# -- helpers ---------------------------------------------------------------------------------------
def _nodes(node):
    """Every node of a parsed YAML tree, depth first."""
    yield node
    children = node.values() if isinstance(node, dict) else node if isinstance(node, list) else ()
    for v in children:
        yield from _nodes(v)


def _strings(node):
    return (n for n in _nodes(node) if isinstance(n, str))


def _docs(path: Path) -> list:
    """The file's YAML documents plus those embedded as strings (KubeRay's runtimeEnvYAML, serveConfigV2)."""
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    out = list(docs)

    def walk(node):
        if isinstance(node, dict):
            for k, v in node.items():
                if k in EMBEDDED_YAML_KEYS and isinstance(v, str):
                    out.append(yaml.safe_load(v))
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)
    for d in docs:
        walk(d)
    return out


def _logical_lines(text: str):
    """Lines with backslash continuations joined (comment markers removed from continued comment lines)."""
    buf = ""
    for line in text.splitlines():
        piece = line.strip()
        if buf:
            piece = piece.lstrip("#").strip()
        if piece.endswith("\\"):
            buf += piece[:-1] + " "
            continue
        yield buf + piece
        buf = ""
    if buf:
        yield buf


def commands_in(path: Path) -> list[list[str]]:
    """argv lists for the `ggro` parser: every command line in the file's values and comments."""
    # usage examples in comments, then every string value (a folded entrypoint is one string there)
    texts = ["\n".join(ln for ln in path.read_text().splitlines() if ln.lstrip().startswith("#"))]
    for d in _docs(path):
        texts.extend(_strings(d))
    found = []
    for text in texts:
        for line in _logical_lines(text):
            line = line.lstrip("#-").strip()
            m = COMMAND.search(line)
            if not m:
                continue
            head, tail = (m.group(1), m.group(2)) if m.group(1) else (m.group(3), m.group(4))
            tail = re.split(r"\s(?:&&|\|\||;|\|)\s", tail)[0]
            tail = tail.rstrip("\"'")
            sub = head.split()[1] if head.startswith("ggro") else head.rsplit(".", 1)[1]
            found.append([sub] + shlex.split(tail))
    for d in _docs(path):
        for node in _walk_dicts(d):
            env = node.get("env_vars") if isinstance(node, dict) else None
            if isinstance(env, dict) and "GGRO_SERVE_ARGS" in env:
                found.append(["serve"] + shlex.split(env["GGRO_SERVE_ARGS"]))
    unique = []
    for argv in found:
        if argv not in unique:
            unique.append(argv)
    return unique


def _walk_dicts(node):
    return (n for n in _nodes(node) if isinstance(n, dict))


ALL_COMMANDS = [(p.name, argv) for p in YAMLS for argv in commands_in(p)]


def _param(name, argv):
    digest = hashlib.sha1(" ".join(argv).encode()).hexdigest()[:6]     # stable across runs, unlike hash()
    return pytest.param(argv, id=f"{name}:{argv[0]}:{digest}")


@pytest.fixture(scope="module")
def parser():
    return build_parser()


# -- configs ---------------------------------------------------------------------------------------
def test_cluster_has_every_config():
    names = {p.name for p in YAMLS}
    assert {"ray-cluster.yaml", "rayjob-align.yaml", "rayjob-dpo.yaml", "rayservice.yaml",
            "runtime_env.yaml"} <= names
    kinds = {d.get("kind") for p in YAMLS for d in _docs(p) if isinstance(d, dict)}
    assert {"RayJob", "RayService"} <= kinds


@pytest.mark.parametrize("path", YAMLS, ids=lambda p: p.name)
def test_yaml_parses(path):
    docs = _docs(path)
    assert docs and all(isinstance(d, dict) for d in docs), path


def test_commands_were_found():
    per_file = {p.name: commands_in(p) for p in YAMLS}
    assert any(a[0] == "align" for a in per_file["rayjob-align.yaml"])
    assert any(a[0] == "dpo" for a in per_file["rayjob-dpo.yaml"])
    assert any(a[0] == "serve" for a in per_file["rayservice.yaml"])
    assert per_file["ray-cluster.yaml"] and per_file["runtime_env.yaml"]


@pytest.mark.parametrize("argv", [_param(n, a) for n, a in ALL_COMMANDS])
def test_command_lines_parse(parser, argv):
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:
        pytest.fail(f"`ggro {' '.join(argv)}` rejected by the ggro parser (exit {e.code})")
    assert args.command == argv[0]


def test_launcher_installs_the_project_with_setup_sh():
    cfg = yaml.safe_load((CLUSTER / "ray-cluster.yaml").read_text())
    assert cfg["head_node_type"] in cfg["available_node_types"]
    assert any("setup.sh" in c for c in cfg["setup_commands"])
    assert (ROOT / "setup.sh").exists()
    gpu_types = [t for t in cfg["available_node_types"].values() if "p4" in str(t["node_config"]) or
                 "g5" in str(t["node_config"]) or "g6" in str(t["node_config"])]
    assert gpu_types, "no GPU worker group"
    assert "." in cfg["file_mounts"].values()


def test_launcher_config_passes_rays_own_validation():
    """The autoscaler's schema (ray-schema.json) after Ray fills in the provider defaults, as `ray up` does."""
    pytest.importorskip("jsonschema")
    from ray.autoscaler._private.util import prepare_config, validate_config
    cfg = yaml.safe_load((CLUSTER / "ray-cluster.yaml").read_text())
    validate_config(prepare_config(cfg))
    with pytest.raises(Exception):
        validate_config(prepare_config({**cfg, "setup_comands": []}))     # a typo is caught


def test_rayjobs_and_rayservice_are_well_formed():
    for name in ("rayjob-align.yaml", "rayjob-dpo.yaml"):
        job = yaml.safe_load((CLUSTER / name).read_text())
        assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
        spec = job["spec"]
        assert spec["entrypoint"].startswith("python -m jobs.")
        yaml.safe_load(spec["runtimeEnvYAML"])
        workers = spec["rayClusterSpec"]["workerGroupSpecs"]
        gpus = sum(int(c["resources"]["limits"].get("nvidia.com/gpu", 0)) * w["replicas"]
                   for w in workers for c in w["template"]["spec"]["containers"])
        assert gpus >= 1
    svc = yaml.safe_load((CLUSTER / "rayservice.yaml").read_text())
    assert svc["kind"] == "RayService"
    apps = yaml.safe_load(svc["spec"]["serveConfigV2"])["applications"]
    assert [a["import_path"] for a in apps] == ["jobs.serve:app"]


def test_rayservice_import_path_is_the_serve_app(monkeypatch):
    """import_path resolves to a Serve application built from the manifest's own GGRO_SERVE_ARGS."""
    svc = yaml.safe_load((CLUSTER / "rayservice.yaml").read_text())
    app_cfg = yaml.safe_load(svc["spec"]["serveConfigV2"])["applications"][0]
    module, attr = app_cfg["import_path"].split(":")
    for k, v in app_cfg["runtime_env"]["env_vars"].items():
        monkeypatch.setenv(k, str(v))
    mod = importlib.import_module(module)
    from ray.serve import Application
    assert isinstance(getattr(mod, attr), Application)


# -- the planner on the shipped manifests -------------------------------------------------------------
def _config_only(root: Path, name: str, cfg: dict) -> str:
    d = root / name
    d.mkdir(parents=True, exist_ok=True)
    (d / "config.json").write_text(json.dumps(cfg))
    return str(d)


def _run(argv, capsys) -> tuple[int, str]:
    args = build_parser().parse_args(argv)
    rc = args.func(args)
    out = capsys.readouterr()
    return rc, out.out + out.err


@pytest.fixture
def no_weights(monkeypatch):
    """Any attempt to load weights fails the test."""
    import transformers

    import ggro.models

    def boom(*a, **k):
        raise AssertionError("--dry-run loaded weights")
    for cls in (transformers.AutoModelForCausalLM, transformers.AutoModelForSequenceClassification,
                transformers.LlamaForCausalLM, transformers.LlamaForSequenceClassification):
        monkeypatch.setattr(cls, "from_pretrained", boom)
    monkeypatch.setattr(ggro.models, "load_model", boom)
    monkeypatch.setattr(ggro.models, "default_model_dir", boom)
    import safetensors.torch
    monkeypatch.setattr(safetensors.torch, "load_file", boom)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)


def _plan_shipped(sub, args, cluster_spec, tmp_path, capsys) -> tuple[int, str]:
    """--dry-run a manifest's own command line (model paths swapped for config.json-only stand-ins of the
    same shapes) against the cluster the manifest itself describes."""
    stand_ins = {"policy": _config_only(tmp_path, "policy", LLAMA_8B), "reward": _config_only(tmp_path, "rm", RM_8B)}
    args = list(args)
    for flag in ("--policy", "--reward"):
        args[args.index(flag) + 1] = stand_ins[flag[2:]]
    limits = [(w["replicas"], c["resources"]["limits"]) for w in cluster_spec["workerGroupSpecs"]
              for c in w["template"]["spec"]["containers"]]
    gpus = sum(n * int(lim.get("nvidia.com/gpu", 0)) for n, lim in limits)
    cpus = sum(n * float(lim["cpu"]) for n, lim in limits)
    per_node = max(int(lim.get("nvidia.com/gpu", 0)) for _, lim in limits)
    return _run([sub] + args + ["--dry-run", "--cluster-gpus", str(gpus), "--cluster-cpus", str(cpus),
                                "--gpus-per-node", str(per_node), "--gpu-memory-gb", "48"], capsys)


@pytest.mark.parametrize("name", ["rayjob-align.yaml", "rayjob-dpo.yaml"])
def test_shipped_rayjob_plan_fits_its_cluster(name, tmp_path, capsys, no_weights):
    job = yaml.safe_load((CLUSTER / name).read_text())
    argv = shlex.split(job["spec"]["entrypoint"])
    sub = argv[2].rsplit(".", 1)[1]
    rc, out = _plan_shipped(sub, argv[3:], job["spec"]["rayClusterSpec"], tmp_path, capsys)
    assert rc == 0, out
    assert "FITS" in out and "8.03B params (config.json shapes" in out


def test_shipped_rayservice_plan_fits_its_cluster(tmp_path, capsys, no_weights):
    svc = yaml.safe_load((CLUSTER / "rayservice.yaml").read_text())
    env = yaml.safe_load(svc["spec"]["serveConfigV2"])["applications"][0]["runtime_env"]["env_vars"]
    rc, out = _plan_shipped("serve", shlex.split(env["GGRO_SERVE_ARGS"]), svc["spec"]["rayClusterConfig"],
                            tmp_path, capsys)
    assert rc == 0, out
    assert "ggro serve --dry-run" in out and "2 replica(s) x tp 1 rank(s) x 1 GPU" in out


# -- --dry-run ---------------------------------------------------------------------------------------
GPU_FLAGS = ["--device", "cuda", "--dtype", "bfloat16", "--policy-gpus-per-replica", "1", "--reward-gpus", "1"]


def test_dry_run_fits_on_a_described_cluster(tiny_models, capsys, no_weights):
    rc, out = _run(["align", "--dry-run", "--policy", tiny_models["policy"], "--reward", tiny_models["classifier"],
                    "--reward-kind", "classifier", *GPU_FLAGS, "--tp", "2", "--policy-replicas", "2",
                    "--reward-replicas", "2", "--cluster-gpus", "8"], capsys)
    assert rc == 0, out
    assert "2 replica(s) x tp 2 rank(s) x 1 GPU = 4 GPUs" in out
    assert "2 actor(s) x 1 GPU = 2 GPUs" in out
    assert "total   6 GPUs" in out and "described: 8 GPUs" in out
    assert "FITS" in out and "DOES NOT FIT" not in out


def test_dry_run_too_many_gpus_says_what_to_change(tiny_models, capsys, no_weights):
    rc, out = _run(["align", "--dry-run", "--policy", tiny_models["policy"], *GPU_FLAGS, "--tp", "4",
                    "--policy-replicas", "3", "--reward-replicas", "2", "--cluster-gpus", "8"], capsys)
    assert rc == 1, out
    assert "DOES NOT FIT" in out
    assert "needs 14 GPUs, the cluster has 8" in out
    assert "change: --policy-replicas 1" in out


def test_dry_run_tp_larger_than_a_node(tiny_models, capsys, no_weights):
    rc, out = _run(["align", "--dry-run", "--policy", tiny_models["policy"], *GPU_FLAGS, "--tp", "4",
                    "--cluster-gpus", "8", "--gpus-per-node", "2"], capsys)
    assert rc == 1, out
    assert "STRICT_PACK" in out and "--tp 2" in out


def test_dry_run_memory_does_not_fit_and_the_fix_works(tmp_path, capsys, no_weights):
    """A config.json-only 70B folder (no weight files at all): sized from its shapes alone."""
    big = _config_only(tmp_path, "llama70b", LLAMA_70B)
    rm = _config_only(tmp_path, "rm8b", RM_8B)
    base = ["align", "--dry-run", "--policy", big, "--reward", rm, "--reward-kind", "classifier", *GPU_FLAGS,
            "--reward-replicas", "2", "--cluster-gpus", "8", "--gpu-memory-gb", "80"]
    rc, out = _run(base + ["--tp", "1"], capsys)
    assert rc == 1, out
    assert "70.55B params (config.json shapes" in out
    assert "policy: " in out and "per GPU exceeds 80 GiB" in out
    fix = re.search(r"change: .*?--tp (\d+)", out)
    assert fix, out
    rc, out = _run(base + ["--tp", fix.group(1)], capsys)
    assert rc == 0, out


def test_dry_run_checks_host_ram_for_loading_tp_ranks(tmp_path, capsys, no_weights):
    """GPU tp ranks load the whole policy on the host before sharding: 4 x 131.4 GiB for a 70B at tp 4."""
    base = ["align", "--dry-run", "--policy", _config_only(tmp_path, "llama70b", LLAMA_70B),
            "--reward", _config_only(tmp_path, "rm8b", RM_8B), "--reward-kind", "classifier", *GPU_FLAGS,
            "--tp", "4", "--cluster-gpus", "8", "--gpu-memory-gb", "80"]
    rc, out = _run(base + ["--cluster-memory-gb", "400"], capsys)
    assert rc == 1, out
    assert "525.7 GiB of host RAM needed (525.7 GiB while a replica's 4 GPU ranks load the policy)" in out
    assert "each tp rank holds a full copy until it is sharded" in out
    rc, out = _run(base + ["--cluster-memory-gb", "1024"], capsys)
    assert rc == 0, out


def test_dry_run_rejects_float64_with_tp(tiny_models, capsys, no_weights):
    rc, out = _run(["align", "--dry-run", "--policy", tiny_models["policy"], "--dtype", "float64", "--tp", "2"], capsys)
    assert rc == 2, out
    assert "--tp 2 shards the policy with DeepSpeed" in out and "not --dtype float64" in out


def test_dry_run_serve_suggests_tp_and_the_fix_fits(tmp_path, capsys, no_weights):
    base = ["serve", "--dry-run", "--policy", _config_only(tmp_path, "llama70b", LLAMA_70B),
            "--reward", _config_only(tmp_path, "rm8b", RM_8B), "--reward-kind", "classifier", "--device", "cuda",
            "--dtype", "bfloat16", "--replica-gpus", "1", "--cluster-gpus", "8", "--gpu-memory-gb", "80"]
    rc, out = _run(base + ["--tp", "1"], capsys)
    assert rc == 1, out
    fix = re.search(r"change: .*?--tp (\d+)", out)
    assert fix, out
    rc, out = _run(base + ["--tp", fix.group(1)], capsys)
    assert rc == 0, out


def test_dry_run_reward_too_big_for_one_gpu(tmp_path, capsys, no_weights):
    big = _config_only(tmp_path, "llama70b", LLAMA_70B)
    rc, out = _run(["align", "--dry-run", "--policy", big, *GPU_FLAGS, "--tp", "4", "--cluster-gpus", "8",
                    "--gpu-memory-gb", "80"], capsys)
    assert rc == 1
    assert "reward: " in out and "unsharded" in out


def test_dry_run_cpu_shares(tiny_models, capsys, no_weights):
    rc, out = _run(["align", "--dry-run", "--policy", tiny_models["policy"], "--aligners", "8",
                    "--aligner-cpus", "1", "--cluster-gpus", "0", "--cluster-cpus", "2"], capsys)
    assert rc == 1, out
    assert "CPUs, the cluster has 2" in out and "--aligner-cpus" in out


def test_dry_run_rejects_inconsistent_config(tiny_models, capsys, no_weights):
    rc, out = _run(["align", "--dry-run", "--policy", tiny_models["policy"], "--device", "cuda",
                    "--policy-gpus-per-replica", "0", "--cluster-gpus", "8"], capsys)
    assert rc == 2 and "--policy-gpus-per-replica 1" in out
    rc, out = _run(["align", "--dry-run", "--policy", tiny_models["policy"], "--reward", tiny_models["judge"],
                    "--reward-kind", "classifier", "--cluster-gpus", "0"], capsys)
    assert rc == 2 and "not a *ForSequenceClassification" in out
    rc, out = _run(["align", "--dry-run", "--policy", tiny_models["policy"], *GPU_FLAGS, "--tp", "2",
                    "--policy-gpus-per-replica", "0.5", "--cluster-gpus", "8"], capsys)
    assert rc == 2 and "NCCL cannot run two ranks" in out
    rc, out = _run(["align", "--dry-run", "--policy", "/nonexistent/model", "--cluster-gpus", "0"], capsys)
    assert rc == 2 and "not found" in out


@pytest.mark.parametrize("config, weights, says", [
    ('[1, 2]', None, "holds a list, not a JSON object"),
    ('{"hidden_size": "big", "num_attention_heads": 2, "num_hidden_layers": 2}', None, "hidden is 'big'"),
    ('{"hidden_size": 64, "num_attention_heads": 2, "num_hidden_layers": 2, "vocab_size": "x"}', None, "vocab is 'x'"),
    ('{"hidden_size": 64, "num_attention_heads": 2, "num_hidden_layers": 2, "max_position_embeddings": "n"}', None,
     "context window is not an integer"),
    ('{"hidden_size": 64, "num_attention_heads": 2, "num_hidden_layers": 2}', b"", "not a readable safetensors"),
    ('{"hidden_size": 64, "num_attention_heads": 2, "num_hidden_layers": 2}', b"\xff" * 16, "header claims"),
    ('{"hidden_size": 64, "num_attention_heads": 2, "num_hidden_layers": 2}', b"\x02" + b"\x00" * 7 + b"[]",
     "its header is a list"),
])
def test_dry_run_broken_model_folder_is_a_clear_error(tmp_path, capsys, no_weights, config, weights, says):
    """A broken or hostile config.json or safetensors header: exit 2 with what is wrong, never a traceback (nor a
    MemoryError from a header length read off garbage)."""
    (tmp_path / "config.json").write_text(config)
    if weights is not None:
        (tmp_path / "model.safetensors").write_bytes(weights)
    rc, out = _run(["align", "--dry-run", "--policy", str(tmp_path), "--cluster-gpus", "0"], capsys)
    assert rc == 2 and says in out and "Traceback" not in out, out


def test_dry_run_needs_no_output_and_writes_nothing(tiny_models, tmp_path, capsys, no_weights):
    out_dir = tmp_path / "out"
    rc, out = _run(["align", "--dry-run", "--policy", tiny_models["policy"], "--output", str(out_dir),
                    "--cluster-gpus", "0"], capsys)
    assert rc == 0, out
    assert not out_dir.exists()


def test_dry_run_default_model_uses_known_size(tmp_path, monkeypatch, capsys, no_weights):
    monkeypatch.setenv("GGRO_CACHE", str(tmp_path / "empty-cache"))
    rc, out = _run(["align", "--dry-run", "--cluster-gpus", "0"], capsys)
    assert rc == 0, out
    assert "134.5M params (known size" in out


def test_dry_run_local_one_process(tiny_models, tmp_path, capsys, no_weights):
    rc, out = _run(["align", "--local", "--dry-run", "--policy", tiny_models["policy"], "--cluster-gpus", "0"], capsys)
    assert rc == 0, out
    assert "--local: this process" in out and "judge (shared weights)" in out
    # the run's one CPU process fills GGRO's calls to 8 x batch rows (ModelConfig.in_one_process), and the
    # plan counts them, its backward cut into chunks
    assert re.search(r"backward activations [\d.]+ GiB \((\d+) of 64 seqs per backward", out), out
    big = _config_only(tmp_path, "llama70b", LLAMA_70B)
    rc, out = _run(["align", "--local", "--dry-run", "--policy", big, "--device", "cuda", "--dtype", "float32",
                    "--cluster-gpus", "1", "--gpu-memory-gb", "80"], capsys)
    assert rc == 1, out
    assert "exceeds the 80 GiB GPU" in out and "--dtype bfloat16" in out and "--tp" in out


def test_dry_run_serve(tiny_models, capsys, no_weights):
    rc, out = _run(["serve", "--dry-run", "--policy", tiny_models["policy"], "--model-replicas", "2",
                    "--replica-cpus", "2", "--cluster-gpus", "0", "--cluster-cpus", "16"], capsys)
    assert rc == 0, out
    assert "judge on shared weights" in out



def _serve_options() -> set[str]:
    """Every option string `ggro serve` accepts, from the real parser."""
    return set(build_parser()._subparsers._group_actions[0].choices["serve"]._option_string_actions)


def test_dry_run_serve_messages_name_only_serve_flags(tiny_models, tmp_path, capsys, no_weights):
    """Serve's errors, warnings and fixes name only flags ggro serve accepts (align's resource names; the old
    --replica-gpus / --replica-cpus / --model-replicas still work as deprecated aliases)."""
    policy = ["--policy", tiny_models["policy"]]
    big = ["--policy", _config_only(tmp_path, "llama70b", LLAMA_70B), "--reward", _config_only(tmp_path, "rm", RM_8B),
           "--reward-kind", "classifier"]
    cuda = ["--device", "cuda", "--dtype", "bfloat16"]
    cases = [   # (argv, exit status, what shows the intended message was reached)
        (policy + ["--replica-gpus", "1", "--cluster-gpus", "8"], 2, "would sit idle"),
        (policy + cuda + ["--cluster-gpus", "8"], 2, "no GPU from Ray"),
        (policy + cuda + ["--tp", "2", "--replica-gpus", "0.5", "--cluster-gpus", "8"], 2, "NCCL cannot run"),
        (policy + cuda + ["--replica-gpus", "2", "--model-replicas", "5", "--cluster-gpus", "8"], 1,
         "only reserves idle GPUs"),
        (policy + ["--model-replicas", "4", "--replica-cpus", "4", "--cluster-gpus", "0", "--cluster-cpus", "2"], 1,
         "smaller --policy-cpus / --reward-cpus (fractions are fine)\n"),
        (big + cuda + ["--replica-gpus", "0.5", "--cluster-gpus", "8", "--gpu-memory-gb", "80"], 1,
         "whole GPUs per policy actor"),
        (big + ["--cluster-gpus", "0", "--cluster-memory-gb", "16"], 1, "of host RAM needed"),
    ]
    accepted = _serve_options()
    for argv, want_rc, reached in cases:
        rc, out = _run(["serve", "--dry-run", *argv], capsys)
        assert rc == want_rc and reached in out, out
        rejected = set(re.findall(r"--[a-z][a-z-]*", out)) - accepted
        assert not rejected, f"ggro serve does not accept {sorted(rejected)}:\n{out}"


def test_dry_run_serve_replica_fix_fits(tiny_models, capsys, no_weights):
    """The deprecated --model-replicas sets the policy's and the reward's replicas; the suggested
    --policy-replicas count must fit."""
    base = ["serve", "--dry-run", "--policy", tiny_models["policy"], "--reward", tiny_models["classifier"],
            "--reward-kind", "classifier", "--device", "cuda", "--dtype", "bfloat16", "--replica-gpus", "1",
            "--cluster-gpus", "8"]
    rc, out = _run(base + ["--model-replicas", "5"], capsys)
    assert rc == 1 and "needs 10 GPUs, the cluster has 8" in out, out
    assert "--model-replicas is deprecated, use --policy-replicas and --reward-replicas" in out, out
    fix = re.search(r"change: --policy-replicas (\d+) or", out)
    assert fix and fix.group(1) == "3", out
    rc, out = _run(base + ["--policy-replicas", fix.group(1), "--reward-replicas", "5"], capsys)
    assert rc == 0, out


def test_dry_run_replica_minimums_are_the_modes_own(tiny_models, capsys, no_weights):
    """The resource rule is one (`Resources.problems`, on the flags as given): no reward actors start where the
    policy judges itself, and the planner does not count that as an error; the message names only what the
    mode lets the user set."""
    import dataclasses

    from jobs.common import resolve_args
    from pipeline.plan.planner import validate
    from actors.resources import Resources
    from pipeline.plan.sizing import model_info
    args = build_parser().parse_args(["align", "--local", "--dry-run", "--policy", tiny_models["policy"]])
    gcfg, mcfg, _ = resolve_args(args)
    pol = model_info(mcfg.policy)
    res = Resources.local(mcfg)
    assert res.started(mcfg).reward_replicas == 0 and res.problems() == []
    errors, _ = validate(pol, pol, res.started(mcfg), gcfg, mcfg, 512)
    assert errors == []
    serve = dataclasses.replace(res, mode="serve", reward_replicas=0, policy_cpus=0.5, reward_cpus=0.5,
                                aligner_cpus=0.1)
    assert serve.problems() == ["--reward-replicas must be >= 1"]
    odd = dataclasses.replace(serve, reward_replicas=1, policy_cpus=float("nan"), reward_gpus=float("inf"))
    assert [p.split(" must")[0] for p in odd.problems()] == ["--reward-gpus", "--policy-cpus"]   # NaN compares false
    # serve rejects --policy-replicas < 1 itself; the planner, called past that check, must agree with it
    from jobs.plan import dry_run
    from jobs.serve import settings_from_args
    args = build_parser().parse_args(["serve", "--dry-run", "--policy", tiny_models["policy"], "--reward",
                                      tiny_models["classifier"], "--reward-kind", "classifier", "--cluster-gpus", "0"])
    settings = settings_from_args(args)
    rc = dry_run(args, settings.gcfg, settings.mcfg, dataclasses.replace(settings.resources, policy_replicas=-1))
    out = capsys.readouterr().out
    assert rc == 2 and out.count("must be >=") == 1 and "--policy-replicas must be >= 1" in out, out


def test_gpu_memory_read_from_the_device_is_not_credited_to_the_flag():
    """this_machine() passes cuda:0's memory in; --gpu-memory-gb still wins when given, and args stay as parsed."""
    from jobs.plan import cluster_query
    from pipeline.plan.clusters import gpu_gib
    args = build_parser().parse_args(["align", "--dry-run"])
    assert gpu_gib(cluster_query(args).gpu_memory_gb, "NVIDIA H100 80GB HBM3", device_gib=79.2) == \
        (79.2, "read from cuda:0")
    assert args.gpu_memory_gb is None
    args = build_parser().parse_args(["align", "--dry-run", "--gpu-memory-gb", "40"])
    assert gpu_gib(cluster_query(args).gpu_memory_gb, "NVIDIA H100 80GB HBM3", device_gib=79.2) == \
        (40.0, "--gpu-memory-gb")


# -- parameter counts ----------------------------------------------------------------------------------
def test_param_formula_matches_safetensors_headers(tiny_models):
    from pipeline.plan.sizing import params_from_config, safetensors_params
    for kind in ("policy", "classifier"):
        folder = Path(tiny_models[kind])
        cfg = json.loads((folder / "config.json").read_text())
        assert params_from_config(cfg) == safetensors_params(folder), kind


def test_param_formula_real_shapes():
    from pipeline.plan.sizing import params_from_config
    assert params_from_config(LLAMA_8B) == 8_030_261_248          # Llama-3.1-8B
    assert params_from_config(LLAMA_70B) == 70_553_706_496        # Llama-3.1-70B
    smollm = {"model_type": "llama", "hidden_size": 576, "intermediate_size": 1536, "num_attention_heads": 9,
              "num_hidden_layers": 30, "num_key_value_heads": 3, "vocab_size": 49152, "tie_word_embeddings": True}
    assert params_from_config(smollm) == 134_515_008


# -- a connected cluster --------------------------------------------------------------------------------
@pytest.mark.slow
def test_dry_run_reads_the_connected_cluster(ray_cluster, tiny_models, capsys, monkeypatch):
    address = ray_cluster.get_runtime_context().gcs_address
    monkeypatch.setenv("RAY_ADDRESS", address)
    rc, out = _run(["align", "--dry-run", "--policy", tiny_models["policy"]], capsys)
    assert rc == 0, out
    assert f"connected: {address}" in out
    cpus = ray_cluster.cluster_resources()["CPU"]
    rc, out = _run(["align", "--dry-run", "--policy", tiny_models["policy"], "--aligners", str(int(cpus) + 1),
                    "--aligner-cpus", "1"], capsys)
    assert rc == 1 and f"the cluster has {cpus:g}" in out
    assert ray_cluster.is_initialized()      # the planner reused the session's connection, never shut it down


def test_estimate_counts_every_row_a_prompt_decodes():
    """best-of-n decodes n rows per prompt and lookahead S: the planner's KV estimate grows with them, while the
    reward's backward activations stop growing at GRAD_TOKENS' chunk (a pure function: no printing, no cluster)."""
    from ggro.config import GGROConfig, ModelConfig
    from actors.resources import Resources
    from pipeline.plan.sizing import ModelInfo, estimate
    info = ModelInfo("m", 10**9, "test", layers=16, hidden=2048, heads=16, kv_heads=8, head_dim=128, vocab=32000)
    res = Resources(tp=1, policy_gpus_per_replica=1, policy_replicas=1, reward_replicas=1, reward_gpus=1,
                    policy_cpus=1, reward_cpus=1, aligner_cpus=1, aligners=1)
    mcfg = ModelConfig(policy="p", reward="r", reward_kind="classifier", batch_size=8)

    def est(**kw):
        return estimate(info, info, res, GGROConfig(**{"max_new_tokens": 256, **kw}), mcfg, prompt_tokens=256)

    greedy, bo8 = est(method="greedy"), est(method="best-of-n", n=8)
    look = est(search_mode="lookahead", num_refinements=8)
    assert bo8.policy_rank_bytes > greedy.policy_rank_bytes
    # 2048 // 256 = 8 rows per backward: greedy's 8 rows and best-of-8's 64 keep the same activations
    assert bo8.reward_actor_bytes == greedy.reward_actor_bytes and "8 of 64 seqs per backward" in bo8.lines[1]
    assert est(method="greedy", max_new_tokens=64).reward_actor_bytes < greedy.reward_actor_bytes
    assert look.policy_rank_bytes == bo8.policy_rank_bytes
    assert est(search_mode="parallel", num_refinements=8).policy_rank_bytes < look.policy_rank_bytes


def test_dry_run_plans_auto_dtype_and_device(tmp_path, capsys, no_weights):
    """`--dtype auto --device auto` plan as the workers will run them: bfloat16 on cuda when the job gives its
    policy GPUs, float32 on cpu when it does not."""
    big = _config_only(tmp_path, "llama70b", LLAMA_70B)
    rc, out = _run(["align", "--dry-run", "--policy", big, "--reward-kind", "classifier", "--dtype", "auto",
                    "--device", "auto", "--policy-gpus-per-replica", "1", "--reward-gpus", "1", "--tp", "4",
                    "--cluster-gpus", "8", "--gpu-memory-gb", "80"], capsys)
    assert "dtype bfloat16, device cuda" in out, out
    rc, out = _run(["align", "--dry-run", "--policy", big, "--dtype", "auto", "--device", "auto",
                    "--cluster-gpus", "0"], capsys)
    assert "dtype float32, device cpu" in out, out
