"""`ggro align` on Ray: Ray Data rows -> Aligner actor pool (search over actor handles) -> Parquet parts.

    rows ──from_items──> map_batches(Aligner, ActorPoolStrategy, num_cpus=--aligner-cpus)
                           Aligner: the unchanged ggro Engine/search; its Policy is a policy replica
                           (tp rank actors), its Reward the reward pool. Each Aligner call splits its
                           batch into `--in-flight` sub-batches run in threads, so one sub-batch's RM
                           call overlaps another's policy decode.
         ──write_datasink(AtomicParquetSink)──> OUTPUT_SCHEMA part files (tmp + move, like --local),
                                                 on a shared path or any pyarrow URI (s3://, gs://)

Resume is the local mode's: `jobs.align` skips ids already in --output (pipeline.output.done_ids)
before calling `align_on_ray`; parts are only ever whole files, so a killed job leaves whole parts.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

import pyarrow as pa

from ggro.schema import OUTPUT_SCHEMA, output_record, to_table
from pipeline.output import output_uri, write_part

ROW_SCHEMA = pa.schema([
    ("id", pa.string()), ("messages", pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))),
    ("prompt", pa.string()), ("prefill", pa.string()), ("metadata", pa.string()), ("error", pa.string()),
])


def add_cluster_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("ray cluster (without --local)")
    g.add_argument("--address", help="Ray cluster address (e.g. ray://head:10001 or auto); default: "
                   "$RAY_ADDRESS, else start a local Ray instance")
    g.add_argument("--tp", type=int, default=1, help="tensor-parallel degree of each policy replica "
                   "(DeepSpeed-inference; gloo on CPU, NCCL on GPU)")
    g.add_argument("--policy-gpus-per-replica", type=float, default=0,
                   help="GPUs per TP rank of a policy replica (0: CPU)")
    g.add_argument("--policy-replicas", type=int, default=1, help="policy replicas (each --tp rank actors)")
    g.add_argument("--policy-cpus", type=float, default=0.5, help="CPU share per policy TP rank")
    g.add_argument("--reward-replicas", type=int, default=1, help="reward-model actors (batches split across them)")
    g.add_argument("--reward-gpus", type=float, default=0, help="GPUs per reward actor (0: CPU)")
    g.add_argument("--reward-cpus", type=float, default=0.5, help="CPU share per reward actor")
    g.add_argument("--aligners", type=int, default=1, help="aligner actor pool size (Ray Data map_batches)")
    g.add_argument("--aligner-cpus", type=float, default=0.25, help="CPU share per aligner actor")
    g.add_argument("--in-flight", type=int, default=2,
                   help="sub-batches each aligner keeps in flight (overlaps policy and reward work)")
    g.add_argument("--ray-timeout", type=float, default=120,
                   help="seconds to wait for placement groups before failing with a clear message")


def resources_from(args):
    from actors.cluster import Resources
    get = lambda k, d: getattr(args, k, None) if getattr(args, k, None) is not None else d  # noqa: E731
    return Resources(tp=get("tp", 1), policy_gpus_per_replica=get("policy_gpus_per_replica", 0),
                     policy_replicas=get("policy_replicas", 1), policy_cpus=get("policy_cpus", 0.5),
                     reward_replicas=get("reward_replicas", 1), reward_gpus=get("reward_gpus", 0),
                     reward_cpus=get("reward_cpus", 0.5), aligners=get("aligners", 1),
                     aligner_cpus=get("aligner_cpus", 0.25))


def connect(address: str | None = None):
    """Connect to --address / $RAY_ADDRESS, or start a local Ray instance."""
    import ray
    if ray.is_initialized():
        return ray
    os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=False)
    else:
        ray.init(include_dashboard=False, log_to_driver=False)
    return ray


def row_to_item(r) -> dict:
    return {"id": r.id, "messages": r.messages, "prompt": r.prompt, "prefill": r.prefill,
            "metadata": json.dumps(r.metadata, ensure_ascii=False, default=str) if r.metadata else None,
            "error": r.error}


def item_to_row(d: dict):
    from ggro.rows import InputRow
    return InputRow(id=d["id"], messages=list(d["messages"] or []), prompt=d["prompt"], prefill=d["prefill"] or "",
                    metadata=json.loads(d["metadata"]) if d["metadata"] else {}, error=d["error"])


class Aligner:
    """Ray Data callable class: one output table per batch of rows, every input id exactly once."""

    def __init__(self, mcfg, gcfg, policies, reward, context: int, in_flight: int = 2):
        from ggro import models
        from ggro.engine import Engine
        self.gcfg, self.mcfg = gcfg, mcfg
        self.policies, self.dead = list(policies), set()
        self.in_flight = max(1, in_flight)
        # one tokenizer per thread: fast tokenizers are not safe to share across threads
        self.engines = [Engine(models.load_tokenizer(mcfg.policy), None, reward, context, mcfg)
                        for _ in range(self.in_flight)]
        self.pool = ThreadPoolExecutor(self.in_flight)
        self.lock = threading.Lock()
        self.turn = 0

    def _replica(self):
        with self.lock:
            live = [i for i in range(len(self.policies)) if i not in self.dead]
            if not live:
                raise RuntimeError("every policy replica of this job has died")
            self.turn += 1
            i = live[self.turn % len(live)]
            return i, self.policies[i]

    def _align(self, k: int, rows: list) -> list[dict]:
        from ray.exceptions import ActorUnavailableError, RayActorError
        engine = self.engines[k]
        while True:
            i, engine.policy = self._replica()
            try:
                return list(engine.align(rows, self.gcfg))
            except (RayActorError, ActorUnavailableError) as e:
                print(f"ggro: policy replica {i} failed ({e.__class__.__name__}); retrying its rows elsewhere",
                      file=sys.stderr)
                with self.lock:
                    self.dead.add(i)
            except Exception:   # isolate the failing row(s): rerun one by one
                return [rec for r in rows for rec in self._one(engine, r)]

    def _one(self, engine, row) -> list[dict]:
        from ray.exceptions import ActorUnavailableError, RayActorError
        try:
            return list(engine.align([row], self.gcfg))
        except (RayActorError, ActorUnavailableError):
            raise
        except Exception as e:   # a row the search cannot handle: report it, keep going
            return [output_record(row, None, engine.tokenizer, engine.provenance(self.gcfg), self.gcfg.method,
                                  error=f"{e.__class__.__name__}: {e}")]

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = [item_to_row(d) for d in batch.to_pylist()]
        parts = [rows[k::self.in_flight] for k in range(self.in_flight)]
        futures = [self.pool.submit(self._align, k, part) for k, part in enumerate(parts) if part]
        records = [rec for f in futures for rec in f.result()]
        assert sorted(r["id"] for r in records) == sorted(r.id for r in rows), "rows in != rows out"
        return to_table(records)


def _sink(out_dir: str):
    from ray.data import Datasink

    class AtomicParquetSink(Datasink):
        """Whole OUTPUT_SCHEMA part files only (tmp + move): a killed job never leaves half a file."""

        def write(self, blocks, ctx):
            for block in blocks:
                table = block if isinstance(block, pa.Table) else pa.Table.from_pandas(block)
                if table.num_rows:
                    write_part(out_dir, table.cast(OUTPUT_SCHEMA).to_pylist())

        def get_name(self) -> str:
            return "GGROParquet"

    return AtomicParquetSink()


def start_ray_workers(mcfg, args):
    """Connect to Ray and start the policy replicas and the reward pool (actors.cluster.Workers)."""
    from actors.cluster import start_workers
    from actors.policy import ClusterTooSmall
    from jobs.common import fail

    connect(getattr(args, "address", None))
    res = resources_from(args)
    try:
        workers = start_workers(mcfg, res, timeout_s=getattr(args, "ray_timeout", None) or 120)
    except ClusterTooSmall as e:
        fail(str(e), 1)
    print(f"ggro: started {res.policy_replicas} policy replica(s) x tp {res.tp} and {res.reward_replicas} "
          "reward actor(s) on Ray", file=sys.stderr)
    return workers


def align_on_ray(rows, out_dir, gcfg, mcfg, args, workers) -> None:
    """Align `rows` (InputRow, errors included) on `workers` and add their part files to `out_dir`."""
    import ray.data

    out_dir = output_uri(out_dir)      # the sink's write tasks run on other nodes, in other folders
    res = resources_from(args)
    in_flight = getattr(args, "in_flight", None) or 2
    per_call = max(1, mcfg.batch_size) * in_flight
    items = [row_to_item(r) for r in rows]
    # one block per aligner call, built here: a repartition would need a whole-CPU task
    ds = ray.data.from_arrow([pa.Table.from_pylist(items[i:i + per_call], schema=ROW_SCHEMA)
                              for i in range(0, len(items), per_call)])
    out = ds.map_batches(
        Aligner, batch_size=per_call, batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=res.aligners),
        num_cpus=res.aligner_cpus, max_restarts=-1, max_task_retries=-1,
        fn_constructor_kwargs=dict(mcfg=mcfg, gcfg=gcfg, policies=workers.policies, reward=workers.reward,
                                   context=workers.context, in_flight=in_flight))
    out.write_datasink(_sink(str(out_dir)), ray_remote_args={"num_cpus": res.io_cpus})


def read_uri_rows(uri: str):
    """Rows of a JSONL/Parquet file or folder at any URI pyarrow's filesystems accept (s3://, gs://,
    hdfs://, file://), with the same per-row validation and error rows as `ggro.rows.read_rows`."""
    import tempfile
    from pyarrow import fs as pafs
    from ggro.rows import read_rows

    filesystem, path = pafs.FileSystem.from_uri(uri)
    info = filesystem.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(uri)
    if info.type == pafs.FileType.Directory:
        files = sorted(f.path for f in filesystem.get_file_info(pafs.FileSelector(path))
                       if f.type == pafs.FileType.File and f.path.endswith((".jsonl", ".parquet")))
    else:
        files = [path]
    with tempfile.TemporaryDirectory(prefix="ggro-input-") as tmp:
        for f in files:   # copied locally once, then parsed exactly like a local file (names kept for ids)
            local = os.path.join(tmp, os.path.basename(f))
            with filesystem.open_input_stream(f) as src, open(local, "wb") as dst:
                while chunk := src.read(1 << 20):
                    dst.write(chunk)
            yield from read_rows(local)
