"""`--config run.yaml`: every flag of every command that takes --config has a YAML key that takes effect;
flags given on the command line win; unknown keys and wrong types are errors naming the key."""
from __future__ import annotations

import argparse
import dataclasses
import json
import math

import pytest
import yaml

from ggro.config import GGROConfig, ModelConfig
from jobs.cli import build_parser
from jobs.common import resolve_args

FIELD_DEFAULTS = {f.name: f.default for c in (GGROConfig, ModelConfig) for f in dataclasses.fields(c)}


def subparsers() -> dict[str, argparse.ArgumentParser]:
    return dict(build_parser()._subparsers._group_actions[0].choices)


CONFIG_COMMANDS = sorted(name for name, p in subparsers().items() if "--config" in p._option_string_actions)


def flags(p: argparse.ArgumentParser) -> list[argparse.Action]:
    return [a for a in p._actions if a.option_strings and a.dest not in ("help", "config")]


def non_default(a: argparse.Action):
    """(YAML value, the value args must then hold) for a setting that is neither the flag's default nor
    the config field's default, and valid for GGROConfig / ModelConfig."""
    base = a.default if a.default is not None else FIELD_DEFAULTS.get(a.dest)
    if isinstance(a, argparse._StoreConstAction):
        return True, a.const
    if a.choices:
        v = next(c for c in reversed(list(a.choices)) if c != base)
        return v, v
    if a.type is int or hasattr(a.type, "lo"):         # jobs.common.at_least: an int with a floor
        return (base or 0) + 3, (base or 0) + 3
    if a.type is float or getattr(a.type, "__name__", "") == "positive":
        v = base / 2 if base else 0.25          # halving keeps top_p in (0, 1] and temperatures > 0
        return v, v
    if a.dest == "device":                      # a device name has a form (checked; not loaded here)
        return "cuda:1", "cuda:1"
    if a.type in (None, str):
        return f"yaml-{a.dest}", f"yaml-{a.dest}"
    if a.dest == "modes":                       # bench's comma-separated search modes
        return ["adaptive", "lookahead:8:1"], a.type("adaptive,lookahead:8:1")
    if a.dest == "probes":                      # eval's comma-separated probe sets
        return ["prefill", "gsm8k"], a.type("prefill,gsm8k")
    return [3, 5], a.type("3,5")                # a comma-separated list flag (bench's --best-of-n)


def write(tmp_path, data: dict) -> str:
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


def test_config_is_offered_by_the_commands_that_configure_a_model():
    assert {"align", "dpo", "serve", "bench"} <= set(CONFIG_COMMANDS)


def test_every_config_field_has_a_flag():
    for name in CONFIG_COMMANDS:
        dests = {a.dest for a in flags(subparsers()[name])}
        assert set(FIELD_DEFAULTS) <= dests, (name, set(FIELD_DEFAULTS) - dests)


@pytest.mark.parametrize("command", CONFIG_COMMANDS)
def test_every_flag_has_a_yaml_key_that_takes_effect(command, tmp_path):
    actions = flags(subparsers()[command])
    data, expected = {}, {}
    for i, a in enumerate(actions):
        key = a.option_strings[-1][2:]
        key = key if i % 2 else key.replace("-", "_")     # both spellings are accepted
        data[key], expected[a.dest] = non_default(a)
        assert expected[a.dest] != a.default, a.dest
    args = build_parser().parse_args([command, "--config", write(tmp_path, data)])
    got = {dest: getattr(args, dest) for dest in expected}
    assert got == expected
    # ... and reaches the configs the job runs with
    gcfg, mcfg, rest = resolve_args(args)
    for c in (gcfg, mcfg):
        for f in dataclasses.fields(c):
            assert getattr(c, f.name) == expected[f.name], f.name
    assert {k: rest[k] for k in expected if k not in FIELD_DEFAULTS} == \
        {k: v for k, v in expected.items() if k not in FIELD_DEFAULTS}


@pytest.mark.parametrize("command", CONFIG_COMMANDS)
def test_flags_on_the_command_line_win_even_at_their_default(command, tmp_path):
    p = subparsers()[command]
    cfg = write(tmp_path, {"max-new-tokens": 30, "seed": 9, "trace": True})
    args = build_parser().parse_args([command, "--config", cfg, "--max-new-tokens", "128"])
    assert (args.max_new_tokens, args.seed, args.trace) == (128, 9, True)
    if "--tp" in p._option_string_actions:     # an int flag with a default: 1 given beats the YAML's 2
        cfg = write(tmp_path, {"tp": 2})
        assert build_parser().parse_args([command, "--config", cfg, "--tp", "1"]).tp == 1
        assert build_parser().parse_args([command, "--config", cfg]).tp == 2


def test_null_keeps_the_default_and_strings_convert_like_the_command_line(tmp_path):
    cfg = write(tmp_path, {"input": None, "tp": "3", "top-p": "0.5", "local": False})
    args = build_parser().parse_args(["align", "--config", cfg])
    assert (args.input, args.tp, args.top_p, args.local) == (None, 3, 0.5, False)


@pytest.mark.parametrize("command", CONFIG_COMMANDS)
@pytest.mark.parametrize("data, words", [
    ({"max-new-tokens": "abc"}, "'max-new-tokens': invalid int value: 'abc'"),
    ({"max_new_tokens": 2.5}, "'max_new_tokens' must be an integer, got 2.5"),
    ({"max_new_tokens": True}, "'max_new_tokens' must be an integer, got True"),
    ({"trace": 3}, "'trace' must be true or false, got 3"),
    ({"trace": "yes"}, "'trace' must be true or false, got 'yes'"),
    ({"method": "beam"}, "'method': invalid choice: 'beam'"),
    ({"temperature": [1, 2]}, "'temperature'"),
    ({"policy": {"path": "x"}}, "'policy' must be a string"),
    ({"num_refinemnts": 3}, "unknown keys in --config: num_refinemnts (did you mean num_refinements?)"),
    ({"config": "other.yaml"}, "unknown keys in --config: config"),
])
def test_wrong_types_and_unknown_keys_name_the_key(command, data, words, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args([command, "--config", write(tmp_path, data)])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert words in err and f"ggro {command}: error:" in err, err


def test_a_wrong_value_is_an_error_even_where_the_flag_wins(tmp_path, capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["align", "--config", write(tmp_path, {"local": 3}), "--local"])
    assert "'local' must be true or false, got 3" in capsys.readouterr().err


def test_bad_files(tmp_path, capsys):
    for text, words in [("- a\n- b\n", "must hold a mapping"), ("a: [\n", "not valid YAML")]:
        (tmp_path / "bad.yaml").write_text(text)
        with pytest.raises(SystemExit):
            build_parser().parse_args(["align", "--config", str(tmp_path / "bad.yaml")])
        assert words in capsys.readouterr().err
    with pytest.raises(SystemExit):
        build_parser().parse_args(["align", "--config", str(tmp_path / "missing.yaml")])
    assert "cannot read --config" in capsys.readouterr().err


def test_yaml_input_is_the_input_that_is_read(tmp_path):
    """A YAML `input:` once aligned the bundled examples instead."""
    from jobs.align import input_rows
    src = tmp_path / "mine.jsonl"
    src.write_text("".join(json.dumps({"id": f"m{i}", "prompt": f"question {i}"}) + "\n" for i in range(3)))
    args = build_parser().parse_args(["align", "--config", write(tmp_path, {"input": str(src), "limit": 2})])
    assert [r.id for r in input_rows(args)] == ["m0", "m1"]


def test_yaml_dry_run_only_plans(tmp_path, capsys):
    """A YAML `dry-run: true` once ran a real job: now it prints the plan, loads no weights, writes nothing."""
    from jobs.cli import main
    out = tmp_path / "out"
    cfg = write(tmp_path, {"dry-run": True, "local": True, "output": str(out)})
    assert main(["align", "--config", cfg]) == 0
    assert "resource plan (no weights loaded)" in capsys.readouterr().out
    assert not out.exists()


def test_serve_settings_come_from_yaml(tmp_path):
    from jobs.serve import parse, settings_from_args
    cfg = write(tmp_path, {"max-queue": 3, "model-name": "mine", "tp": 2, "model_replicas": 2, "dtype": "bfloat16"})
    s = settings_from_args(parse(["--config", cfg, "--model-replicas", "1"]))
    res = s.resources
    assert (s.max_queue, s.model_name, res.tp, res.policy_replicas, s.mcfg.dtype) == (3, "mine", 2, 1, "bfloat16")
    assert res.reward_replicas == 1      # the deprecated serve name sets both deployments
    # serve speaks align's resource vocabulary, from YAML as from flags
    cfg = write(tmp_path, {"policy-replicas": 2, "reward_replicas": 3, "policy-cpus": 0.2, "reward-gpus": 0.5})
    res = settings_from_args(parse(["--config", cfg, "--policy-gpus-per-replica", "1"])).resources
    assert (res.policy_replicas, res.reward_replicas, res.policy_cpus, res.reward_gpus,
            res.policy_gpus_per_replica, res.mode) == (2, 3, 0.2, 0.5, 1.0, "serve")


def test_python_m_entry_points_merge_the_same_way(tmp_path):
    """`python -m jobs.align` (what `ray job submit` runs) parses with the same Parser."""
    from jobs import align, common
    seen = {}
    cfg = write(tmp_path, {"policy-replicas": 3, "aligners": 2})
    common.module_main("jobs.align", None, align.add_args, lambda a: seen.update(vars(a)) or 0,
                       ["--config", cfg, "--aligners", "4"])
    assert (seen["policy_replicas"], seen["aligners"]) == (3, 4)


def test_a_required_flag_may_come_from_the_yaml(tmp_path, capsys):
    from jobs.common import Parser, add_engine_args
    p = Parser(prog="ggro x")
    p.add_argument("--output", required=True)
    add_engine_args(p)
    assert p.parse_args(["--config", write(tmp_path, {"output": "o"})]).output == "o"
    assert p.parse_args(["--output", "cli", "--config", write(tmp_path, {"output": "o"})]).output == "cli"
    with pytest.raises(SystemExit):
        p.parse_args(["--config", write(tmp_path, {"seed": 1})])
    assert "required (on the command line or as --config keys): --output" in capsys.readouterr().err
    with pytest.raises(SystemExit):   # a parser without --config keeps argparse's own check
        build_parser().parse_args(["prompts", "--output", "x.jsonl"])
    assert "the following arguments are required: --from" in capsys.readouterr().err


def test_fill_admits_prompts_until_a_decode_call_is_as_full_as_best_of_n():
    """GGRO's prompts in flight per search: batch_size x fill rows over each prompt's rows per call; the baselines
    keep batch_size prompts. fill does not change outputs, so it is not in the config hash."""
    from ggro.confighash import config_hash
    m = ModelConfig(batch_size=8, fill=8)
    g = GGROConfig()
    assert m.prompts_per_call(g) == 64 and m.decode_rows(g) == 64
    assert m.prompts_per_call(dataclasses.replace(g, search_mode="lookahead", num_refinements=8)) == 8
    assert m.prompts_per_call(dataclasses.replace(g, search_mode="lookahead", num_refinements=4)) == 16
    assert m.prompts_per_call(dataclasses.replace(g, search_mode="parallel", num_refinements=4)) == 21
    assert m.prompts_per_call(dataclasses.replace(g, method="best-of-n", n=8)) == 8
    assert ModelConfig(batch_size=8).prompts_per_call(g) == 8        # unset: 1 (a cluster's default)
    assert config_hash(g, m) == config_hash(g, ModelConfig(batch_size=8))
    with pytest.raises(Exception, match="fill"):
        ModelConfig(fill=0)


def test_bench_and_eval_help_shows_their_own_token_default(capsys):
    """Both set max_new_tokens themselves (64; --quick 16); their help said the knob's 128."""
    for cmd in ("bench", "eval"):
        with pytest.raises(SystemExit):
            build_parser().parse_args([cmd, "--help"])
        assert "--max-new-tokens MAX_NEW_TOKENS [quick: 16; else 64]" in " ".join(capsys.readouterr().out.split())


def test_an_empty_judge_question_is_refused():
    """`--rubric ""` used to ask the default question without a word."""
    from ggro.config import ConfigError
    for blank in ("", "  "):
        with pytest.raises(ConfigError, match="rubric must not be empty"):
            ModelConfig(rubric=blank)


@pytest.mark.parametrize("field, value, words", [
    ("temperature", math.inf, "temperature must be a number > 0"), ("temperature", math.nan, "temperature must be"),
    ("nudge_temperature", math.inf, "nudge_temperature must be a number > 0"), ("top_p", math.nan, "top_p must be"),
    ("entropy_threshold", math.nan, "entropy_threshold must be a number"),
    ("entropy_threshold", -1.0, "entropy_threshold must be a number >= 0")])
def test_non_finite_search_settings_are_refused(field, value, words):
    """An infinite temperature made every sampling logit 0 (or NaN beside a -inf logit) and an infinite nudge
    temperature every proposal a tie: refused like any other bad value."""
    from ggro.config import ConfigError, GGROConfig
    with pytest.raises(ConfigError, match=words):
        GGROConfig(**{field: value})


def test_a_device_or_port_that_cannot_be_is_refused_before_any_model_loads():
    """`--device foo` was torch's RuntimeError and `--device cuda` without a GPU an AssertionError, both from the
    first weights' `.to`; `ggro serve --port 99999` started Ray before failing in its proxy."""
    import torch
    from ggro.config import ConfigError, ModelLoadError
    from ggro.models import here
    from jobs.serve import parse, settings_from_args
    for bad in ("foo", "cuda:x", "gpu", ""):
        with pytest.raises(ConfigError, match="device must be cpu, cuda, cuda:N or auto"):
            ModelConfig(device=bad)
    assert here(ModelConfig(device="auto")).device == ("cuda" if torch.cuda.is_available() else "cpu")
    missing = f"cuda:{torch.cuda.device_count()}"            # one past the last GPU this process sees
    with pytest.raises(ModelLoadError, match=f"--device {missing}: this process sees .*pass --device cpu"):
        here(ModelConfig(device=missing))
    for port in ("0", "99999"):
        with pytest.raises(ConfigError, match="--port must be between 1 and 65535"):
            settings_from_args(parse(["--port", port]))


@pytest.mark.parametrize("argv", [["bench", "--threads", "0"], ["bench", "--limit", "0"], ["bench", "--oracle-prompts", "-1"],
                                  ["eval", "--threads", "-2"], ["align", "--in-flight", "0"],
                                  ["align", "--plan-prompt-tokens", "0"], ["align", "--ray-timeout", "nan"],
                                  ["serve", "--gpu-memory-gb", "-1"], ["eval", "--judge-rubric", " "]])
def test_counts_below_their_floor_are_flag_errors(argv, capsys):
    """`ggro bench --limit 0` ran every prompt, `--threads 0` all cores, `align --in-flight 0` the default and
    `eval --judge-rubric ""` the guide's question, without a word; a NaN timeout or GPU memory passed every check."""
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(argv)
    assert e.value.code == 2 and f"argument {argv[1]}: expected a" in capsys.readouterr().err
