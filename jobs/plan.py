"""`--dry-run`: size a job before paying for it. Validates the configuration and the models' metadata
(never their weights), prints the resource plan and says whether the cluster can hold it.

The checks are pure functions in pipeline/plan/planner.py (sizing in pipeline/plan/sizing.py, the cluster in
pipeline/plan/clusters.py); this module holds the flags and the entry point.

Exit status: 0 the plan fits, 1 it does not (the output says what to change), 2 bad configuration.
"""
from __future__ import annotations

import argparse
import sys

from ggro.config import ConfigError, GGROConfig, ModelConfig, ModelLoadError
from pipeline.plan.clusters import ASSUMED_GPU_GIB, ClusterQuery
from actors.resources import Resources
from jobs.common import at_least, positive


def add_plan_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("resource plan (--dry-run)")
    g.add_argument("--dry-run", action="store_true", default=False,
                   help="validate the configuration and models' metadata (no weights are loaded), print the "
                        "resource plan and whether the cluster fits it, then exit (0 fits, 1 does not)")
    g.add_argument("--cluster-gpus", type=at_least(0), help="plan for a described cluster with this many GPUs "
                   "instead of the connected one (--address / RAY_ADDRESS) or this machine")
    g.add_argument("--cluster-cpus", type=positive, help="CPUs of the described cluster [8 per GPU, at least 8]")
    g.add_argument("--gpus-per-node", type=at_least(1), help="GPUs per node of the described cluster; a policy "
                   "replica's tp ranks must share one node [all GPUs on one node]")
    g.add_argument("--gpu-memory-gb", type=positive, help="memory per GPU in GiB [from the connected cluster's "
                   f"accelerator type, else {ASSUMED_GPU_GIB}]")
    g.add_argument("--cluster-memory-gb", type=positive, help="host RAM of the cluster in GiB, checked for "
                   "actors that run on CPU [the connected cluster's; unchecked for a described one]")
    g.add_argument("--plan-prompt-tokens", type=at_least(1), default=512,
                   help="typical prompt length in tokens, for the KV-cache and activation estimates")


def cluster_query(args) -> ClusterQuery:
    return ClusterQuery(gpus=args.cluster_gpus, cpus=args.cluster_cpus, gpus_per_node=args.gpus_per_node,
                        gpu_memory_gb=args.gpu_memory_gb, memory_gb=args.cluster_memory_gb,
                        address=getattr(args, "address", None))


def dry_run(args, gcfg: GGROConfig, mcfg: ModelConfig, res: Resources) -> int:
    """Entry point for `--dry-run` (align, dpo, serve): 0 fits, 1 does not fit, 2 invalid."""
    from pipeline.plan.clusters import find_cluster
    from pipeline.plan.planner import make_plan, render
    from pipeline.plan.sizing import model_info
    try:
        pol = model_info(mcfg.policy)
        rm = pol if mcfg.reward_model == mcfg.policy else model_info(mcfg.reward_model)
        query = cluster_query(args)
        plan = make_plan(pol, rm, res, gcfg, mcfg, int(args.plan_prompt_tokens or 512),
                         lambda: find_cluster(query, res.mode))
    except (ConfigError, ModelLoadError) as e:   # a bad setting, a model that is not there
        print(f"ggro: error: {e}", file=sys.stderr)
        return 2
    command = getattr(args, "command", None) or ("serve" if res.mode == "serve" else "align")
    text, code = render(plan, command)
    print(text)
    return code
