"""Serve's search loops: bounded admission, and one background GGRO search per distinct search config.

A loop runs `ggro.search.run` over a feed that pulls newly admitted prompts between rounds (the search's
continuous batching), so concurrent users join shared rounds. A request that stops waiting withdraws its prompts
(`SearchHub.cancel`): the policy replica drops their rows at its next decode step, and their slots come back
once their loop lets them go, so `max_queue` bounds the work in progress, not the open connections.
"""
from __future__ import annotations

import dataclasses
import logging
import queue
import threading
import uuid
from dataclasses import dataclass

from ggro.config import GGROConfig
from ggro.rows import InputRow
from ggro.search import Prompt
from pipeline import telemetry
from pipeline.serve.models import CALL_TIMEOUT_S, HandlePolicy, HandleReward

log = logging.getLogger("ray.serve")


@dataclass
class Job:
    """One choice of one request, as it travels through a search loop. `emit(event)` is thread-safe."""
    prompt: Prompt
    index: int
    emit: object                         # callable(tuple): ("segment", index, y) | ("done", index, Result) |
                                         # ("error", index, msg) | ("unavailable", index, msg): a model replica died
    stream: bool = False
    sent: int = 0                        # tokens of y already reported as segments
    settled: bool = False                # its request is done with it (answered, failed or cancelled)
    cancelled: bool = False              # its request stopped waiting: the search drops it (guarded by hub.lock)
    ack: object = None                   # the policy replica's answer to its cancel (a DeploymentResponse)
    row: InputRow | None = None          # the request's row, which a reward model of another vocabulary reads
    prompt_format: str = "chat"          # ... in the format the policy read it in (raw: the completions endpoint)


def replica_lost(e: BaseException) -> bool:
    """Whether a model call failed because its replica died or became unreachable (its process was killed, ran
    out of memory or lost its node): the request may be retried once Serve has replaced the replica."""
    import ray.exceptions as rex
    return isinstance(e, (rex.RayActorError, rex.ActorUnavailableError, rex.NodeDiedError, rex.WorkerCrashedError))


class _Loop(threading.Thread):
    def __init__(self, hub: "SearchHub", cfg: GGROConfig):
        super().__init__(daemon=True, name=f"ggro-search-{cfg.method}")
        self.hub, self.cfg = hub, cfg
        self.q: queue.Queue[Job] = queue.Queue()
        self.jobs: dict[str, Job] = {}      # queued or active in this loop, by prompt id (guarded by hub.lock)
        self.token = uuid.uuid4().hex[:8]
        self.policy = HandlePolicy(hub.policy_handle, self.token, self._watch)
        # The ingress's Engine over this loop's handles. A reward model of another vocabulary reads each prompt's
        # row (Engine.hold): one engine per loop, since a loop never holds a prompt id twice while seeded
        # requests' ids ("choice-0") repeat across loops
        self.engine = hub.engine.over(self.policy, HandleReward(hub.reward_handle, self.token))

    def hold(self, job: Job) -> None:
        """Take `job` on (under hub.lock), its row registered before the search can score it."""
        self.jobs[job.prompt.id] = job
        if job.row is not None:
            self.engine.hold(dataclasses.replace(job.row, id=job.prompt.id), job.prompt_format)

    def _drop(self, prompt_id: str) -> Job | None:
        """Let go of a prompt (under hub.lock), its row and its admission slot: a long-lived loop must not keep
        every row it saw. In the same critical section as the pop, so a later request's job of the same id
        keeps its own row. The slot comes back here, not when the request stops waiting: until its loop
        lets it go, a withdrawn prompt is still work in progress."""
        self.engine.forget(prompt_id)
        job = self.jobs.pop(prompt_id, None)
        if job is not None:
            self.hub.release_slot()
        return job

    def _forget_cancel(self, job: Job) -> None:
        """After a cancelled job leaves: once the replica has its cancel, release its id there (which clears
        the cancel), so a later request's prompt of the same id ("choice-0") is not cancelled by it."""
        if job.ack is None:
            return
        try:
            job.ack.result(timeout_s=CALL_TIMEOUT_S)
            self.policy.release([job.prompt.id])
        except Exception:     # the replica is gone: its cancels went with it
            pass

    def _watch(self, seq_id: str, prefix: list[int]) -> None:
        job = self.jobs.get(seq_id)
        if job is None or not job.stream:
            return
        y = prefix[len(job.prompt.ids):]
        if len(y) > job.sent:
            job.sent = len(y)
            job.emit(("segment", job.index, list(y)))

    def _feed(self):
        """Newly admitted prompts, one per `next`; None (not StopIteration) when none are waiting, so the
        search keeps its active prompts going and asks again next round."""
        while True:
            try:
                job = self.q.get_nowait()
            except queue.Empty:
                yield None
                continue
            if not self._withdrawn(job.prompt.id):
                yield job.prompt

    def _drain(self) -> list[Prompt]:
        out = []
        while True:
            try:
                job = self.q.get_nowait()
            except queue.Empty:
                return out
            if not self._withdrawn(job.prompt.id):
                out.append(job.prompt)

    def _withdrawn(self, prompt_id: str) -> bool:
        """ggro.search's hook, asked between rounds: True drops a cancelled job's prompt from the search for
        good, so the loop forgets the job (its id may then join this loop again, from a later request)."""
        with self.hub.lock:
            job = self.jobs.get(prompt_id)
            if job is None or not job.cancelled:
                return False
            self._drop(prompt_id)
            self.hub.withdrawn += 1
        self._forget_cancel(job)
        return True

    def run(self):
        hub = self.hub
        while True:
            with hub.lock:
                if self.q.empty():
                    hub.loops[self.cfg].remove(self)
                    if not hub.loops[self.cfg]:
                        del hub.loops[self.cfg]
                    # jobs still listed here were failed or delivered already
                    return
            try:
                prompts = self._feed() if self.cfg.method == "ggro" else self._drain()
                for res in self.engine.search(prompts, self.cfg, hub.batch_size, withdrawn=self._withdrawn):
                    with hub.lock:
                        job = self._drop(res.id)
                        live = job is not None and not job.settled   # a cancelled job's answer has no reader
                        if live:
                            job.settled = True
                        if job is not None and res.finish_reason == "cancelled":
                            hub.cut += 1
                        elif job is not None and not live:
                            hub.late += 1
                    if live and res.finish_reason == "cancelled":   # not withdrawn here: never left hanging
                        job.emit(("error", job.index, "its decode was cancelled"))
                    elif live:
                        job.emit(("done", job.index, res))
                    elif job is not None and res.finish_reason != "cancelled":   # cut: the search released it,
                        self._forget_cancel(job)                                 # after its cancel had landed
            except Exception as e:   # a model replica failed: fail what this loop holds, keep serving
                log.exception("GGRO search loop failed")
                with hub.lock:
                    held = list(self.jobs.values())
                    failed = [j for j in held if not j.settled]
                    for j in failed:
                        j.settled = True
                    for prompt_id in list(self.jobs):
                        self._drop(prompt_id)
                    while not self.q.empty():
                        self.q.get_nowait()
                kind = "unavailable" if replica_lost(e) else "error"
                for job in failed:
                    job.emit((kind, job.index, f"{type(e).__name__}: {e}"))
                try:
                    self.policy.release([j.prompt.id for j in held])
                except Exception:
                    pass


class SearchHub:
    """Admission (bounded), and the map from search config to the loops running it."""

    def __init__(self, engine, policy_handle, reward_handle, batch_size: int, max_queue: int, app: str = ""):
        """`engine`: the ingress's ggro.engine.Engine (its ModelSet), which each loop runs over its own handles."""
        self.engine, self.policy_handle, self.reward_handle = engine, policy_handle, reward_handle
        self.batch_size, self.max_queue, self.app = batch_size, max_queue, app
        self.lock = threading.Lock()
        self.loops: dict[GGROConfig, list[_Loop]] = {}
        self.outstanding = 0
        self.cancelled = 0                   # prompts whose request stopped waiting before their answer
        self.withdrawn = 0                   # ... of them, dropped from the search between its rounds
        self.cut = 0                         # ... of them, dropped from a decode batch while it ran
        self.late = 0                        # ... of them, finished by their search before the cancel landed

    def admit(self, k: int) -> bool:
        with self.lock:
            if self.outstanding + k > self.max_queue:
                return False
            self.outstanding += k
            telemetry.record_queue_depth(self.app, self.outstanding)   # under the lock: never a stale value last
            return True

    def release_slot(self) -> None:
        """A prompt left its search loop (under self.lock)."""
        self.outstanding -= 1
        telemetry.record_queue_depth(self.app, self.outstanding)

    def cancel(self, jobs: list[Job]) -> int:
        """Withdraw `jobs` not answered yet (their client left, the request timed out or a sibling choice
        failed): their search loop drops them between rounds and the policy replica drops their rows at its
        next decode step; their slots come back as their loop lets them go. Returns how many were cancelled."""
        with self.lock:
            live = [j for j in jobs if not j.settled]
            for j in live:
                j.settled = j.cancelled = True
            self.cancelled += len(live)
            # Sent under the lock (`.remote` does not wait), so a loop that sees `cancelled` also sees `ack`;
            # the replica answers it beside its running decode
            by_loop: dict[int, tuple] = {}
            for j in live:
                lp = self._loop_of(j)
                if lp is not None:
                    by_loop.setdefault(id(lp), (lp, []))[1].append(j)
            for lp, held in by_loop.values():
                try:
                    ack = lp.policy.cancel([j.prompt.id for j in held])
                except Exception:     # the replica is gone: the loop fails or withdraws the jobs anyway
                    log.warning("could not cancel %d prompt(s) on the policy replica", len(held), exc_info=True)
                    continue
                for j in held:
                    j.ack = ack
        if live:
            telemetry.record_cancelled(self.app, len(live))
        return len(live)

    def _loop_of(self, job: Job) -> "_Loop | None":
        """The loop that holds `job` (under self.lock)."""
        return next((lp for loops in self.loops.values() for lp in loops if lp.jobs.get(job.prompt.id) is job), None)

    def submit(self, cfg: GGROConfig, job: Job) -> None:
        """Queue a job on a loop for `cfg` that does not hold its prompt id yet (starting one if needed)."""
        with self.lock:
            loops = self.loops.setdefault(cfg, [])
            loop = next((lp for lp in loops if job.prompt.id not in lp.jobs), None)
            start = loop is None
            if start:
                loop = _Loop(self, cfg)
                loops.append(loop)
            loop.hold(job)
            loop.q.put(job)
        if start:
            loop.start()

    def stats(self) -> dict:
        with self.lock:
            return {"outstanding": self.outstanding, "max_queue": self.max_queue,
                    "search_loops": sum(len(v) for v in self.loops.values()), "cancelled": self.cancelled,
                    "withdrawn": self.withdrawn, "cut": self.cut, "late": self.late}
