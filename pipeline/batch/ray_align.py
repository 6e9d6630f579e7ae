"""`ggro align` on Ray: the input streams from storage through Ray Data to Parquet parts.

    input files ──read_datasource(PromptFiles)──> rows parsed and validated in the read tasks (the
                   in-process reader's code: ggro.rows.file_rows; bad rows become error rows)
         ──map_batches(prepare)──> drop rows past --limit and ids already in --output (resume), turn the
                   2nd, 3rd.. copy of an id into an `id#dupK` error row
         ──map_batches(Aligner, ActorPoolStrategy, num_cpus=--aligner-cpus)
                   Aligner: the unchanged ggro Engine/search; its Policy is a policy replica (tp rank
                   actors), its Reward the reward pool. Each Aligner call splits its batch into
                   `--in-flight` sub-batches run in threads, so one sub-batch's RM call overlaps
                   another's policy decode.
         ──write_datasink(AtomicParquetSink)──> whole OUTPUT_SCHEMA part files of --rows-per-file rows
                   (the tail smaller; tmp + move), on a shared path or any pyarrow URI (s3://, gs://)

The input side (the id-only scan, resume, --limit and duplicate ids) is pipeline/batch/ray_input.py.
"""
from __future__ import annotations

import logging
import os
import threading
from concurrent.futures import ThreadPoolExecutor

import pyarrow as pa

from ggro.schema import OUTPUT_SCHEMA, output_record, to_table
from pipeline.batch.output import output_uri, write_file
from pipeline.batch.ray_input import READ_CPUS, InputPlan, input_error, item_to_row, prepare

log = logging.getLogger("ggro.ray_align")   # the driver's: jobs.logs sets its level; in workers, Ray's
BLOCKS_PER_ALIGNER = 4        # at least this many blocks per aligner, so every aligner has work to the end
MAX_CALLS_PER_BLOCK = 8       # at most this many aligner calls per block (see aligner_block_rows)


def connect(address: str | None = None, log_to_driver: bool = True):
    """Connect to --address / $RAY_ADDRESS, or start a local Ray instance. `log_to_driver` (off with
    --quiet): Ray forwards the workers' logs to this driver, so `ray job logs` shows them. A cluster that
    cannot be reached (or refuses this driver's token) is a ClusterUnreachable with what to check."""
    import ray
    if ray.is_initialized():
        return ray
    os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        from ray.exceptions import AuthenticationError
        from actors.resources import ClusterUnreachable, unreachable
        try:
            ray.init(address=address, log_to_driver=log_to_driver)
        except (ConnectionError, AuthenticationError) as e:
            raise ClusterUnreachable(unreachable(address, e)) from None
    else:
        ray.init(include_dashboard=False, log_to_driver=log_to_driver)
    return ray


def _engine(mcfg, gcfg, reward, context: int):
    """An Engine over the reward pool (its Policy is set per call); a reward model with its own vocabulary is
    asked in its own ids (the pool's workers hold it plain), which only the baselines can use."""
    from ggro.engine import Engine
    engine = Engine.remote(mcfg, context, reward=reward)
    engine.models.check(gcfg.method)
    return engine


class Aligner:
    """Ray Data callable class: one output table per batch of rows, every input id exactly once."""

    def __init__(self, mcfg, gcfg, policies, reward, context: int, in_flight: int = 2):
        self.gcfg, self.mcfg = gcfg, mcfg
        self.policies, self.dead = list(policies), set()
        self.in_flight = max(1, in_flight)
        # one engine (tokenizers included) per thread: fast tokenizers are not safe to share across threads
        self.engines = [_engine(mcfg, gcfg, reward, context) for _ in range(self.in_flight)]
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
                log.warning("ggro: policy replica %d failed (%s); retrying its rows elsewhere", i,
                            e.__class__.__name__)
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
        from pipeline.telemetry import record_rows
        record_rows(records)
        return to_table(records)


def _part_name(out_dir: str, table: pa.Table) -> str:
    """A part named by its rows' ids: a write that Ray runs again after losing a node (the first attempt's
    file already in place, its answer lost with the node) replaces that file instead of adding its rows a
    second time. A name that other rows already hold (a 48-bit clash) falls back to a random one."""
    import hashlib
    import uuid
    import pyarrow.parquet as pq
    from pyarrow import fs as pafs
    from pipeline.batch.output import output_fs
    ids = sorted(table["id"].to_pylist())
    name = f"part-{hashlib.sha256(chr(0).join(ids).encode()).hexdigest()[:12]}.parquet"
    fs, path = output_fs(out_dir)
    if fs.get_file_info(f"{path}/{name}").type != pafs.FileType.NotFound:
        held = pq.read_table(f"{path}/{name}", columns=["id"], filesystem=fs)["id"].to_pylist()
        if sorted(held) != ids:
            name = f"part-{uuid.uuid4().hex[:12]}.parquet"
    return name


def _sink(out_dir: str, rows_per_file: int):
    from ray.data import Datasink

    class AtomicParquetSink(Datasink):
        """Whole OUTPUT_SCHEMA part files only (tmp + move): a killed job never leaves half a file. Ray Data
        hands each write call `min_rows_per_write` rows (the tail fewer): one part file per call."""

        @property
        def min_rows_per_write(self) -> int:
            return rows_per_file

        def write(self, blocks, ctx):
            tables = [b if isinstance(b, pa.Table) else pa.Table.from_pandas(b) for b in blocks]
            tables = [t.select(OUTPUT_SCHEMA.names).cast(OUTPUT_SCHEMA) for t in tables if t.num_rows]
            if tables:
                table = pa.concat_tables(tables)
                write_file(out_dir, _part_name(out_dir, table), table)

        def get_name(self) -> str:
            return "GGROParquet"

    return AtomicParquetSink()


def start_ray_workers(job):
    """Connect to Ray and start the policy replicas and the reward pool (actors.cluster.Workers); raises
    ClusterTooSmall when they cannot be placed, ModelLoadError when GGRO would get a reward model of another
    vocabulary (the entry point turns both into exit codes)."""
    from actors.cluster import start_workers

    from ggro.modelset import ModelSet
    ModelSet(job.mcfg).check(job.gcfg.method)   # GGRO with a reward model of another vocabulary: fail now
    connect(job.address, log_to_driver=job.log_to_driver)
    res = job.resources
    workers = start_workers(job.mcfg, res, timeout_s=job.ray_timeout)
    shared = "" if workers.reward.owned else " (the policy replicas judge: one copy of the weights)"
    log.info("ggro: started %d policy replica(s) x tp %d and %d reward actor(s) on Ray%s", res.policy_replicas,
             res.tp, len(workers.reward.workers) if workers.reward.owned else 0, shared)
    return workers


def _light_repartition(ds):
    """Give the streaming repartition the prepare stage's CPU share so Ray Data fuses the two into one
    task: by default it asks for a whole CPU, which a small cluster whose CPUs the policy and reward
    actors hold never frees (the job would wait forever). Ray Data has no public argument for this in
    2.60; without the internal attribute the repartition runs unfused, as before."""
    op = getattr(getattr(ds, "_logical_plan", None), "dag", None)
    args = getattr(op, "ray_remote_args", None)
    if type(op).__name__ == "StreamingRepartition" and isinstance(args, dict):
        args["num_cpus"] = READ_CPUS
    return ds


def aligner_block_rows(todo: int, per_call: int, aligners: int) -> int:
    """Rows per block into the aligners: whole aligner calls, as many as keep BLOCKS_PER_ALIGNER blocks per
    aligner, up to MAX_CALLS_PER_BLOCK. Why not one call per block: Ray Data's driver keeps bookkeeping for every
    block it has seen, so one-call blocks cost a 500 000-row run ~+25 MB of driver memory that 8-call blocks
    do not (docs/streaming.md); more calls per block would leave aligners idle at the end of small runs."""
    calls = todo // (per_call * max(1, aligners) * BLOCKS_PER_ALIGNER)
    return per_call * min(MAX_CALLS_PER_BLOCK, max(1, calls))


def align_on_ray(plan: InputPlan, job, workers) -> None:
    """Stream `plan`'s input through the aligners on `workers`, adding whole part files to `job.output`
    (`job`: a pipeline.batch.job.AlignJob)."""
    import ray
    import ray.data

    out_dir = output_uri(job.output)   # the sink's write tasks run on other nodes, in other folders
    res, mcfg, gcfg, in_flight = job.resources, job.mcfg, job.gcfg, max(1, job.in_flight)
    per_call = max(1, mcfg.batch_size) * in_flight
    ds = plan.dataset().map_batches(
        prepare, batch_format="pyarrow", num_cpus=READ_CPUS,
        fn_kwargs=dict(done=ray.put(plan.done), cutoff=plan.cutoff, dup_keys=plan.dup_keys, dup_names=plan.dup_names))
    # blocks of whole aligner calls (streaming: no shuffle), enough of them for every aligner actor
    ds = _light_repartition(ds.repartition(
        target_num_rows_per_block=aligner_block_rows(plan.todo, per_call, res.aligners)))
    out = ds.map_batches(
        Aligner, batch_size=per_call, batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=res.aligners),
        num_cpus=res.aligner_cpus, max_restarts=-1, max_task_retries=-1,
        fn_constructor_kwargs=dict(mcfg=mcfg, gcfg=gcfg, policies=workers.policies, reward=workers.reward,
                                   context=workers.context, in_flight=in_flight))
    from actors.cluster import needed, while_placeable
    try:   # stopped (ClusterTooSmall) when lost nodes leave no room for the job: never a silent hang
        while_placeable(lambda: out.write_datasink(_sink(str(out_dir), job.rows_per_file),
                                                   ray_remote_args={"num_cpus": res.io_cpus}),
                        needed(mcfg, res), job.ray_timeout)
    except Exception as e:
        err = input_error(e)
        if err is not e:
            raise err from None
        raise
