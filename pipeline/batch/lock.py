"""`.ggro.lock`: one writing run per output folder, with a stale-lock rule that survives a killed driver."""
from __future__ import annotations

import json
import os
import socket
import sys
import threading
import time
import uuid
from pathlib import Path

from pyarrow import fs as pafs

from pipeline.batch.manifest import now
from pipeline.batch.output import LOCK, OutputError, OutputLocked, output_fs


EMPTY_STALE_S = 10.0


def _proc_stat(pid: int) -> list[str] | None:
    """/proc/PID/stat's fields after the command name (Linux): [0] the state, [19] the start time in clock ticks
    since boot."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return fields if len(fields) > 19 else None
    except (OSError, IndexError):
        return None


def _proc_start(pid: int) -> str | None:
    """The process's start time, to tell a reused pid from the holder."""
    stat = _proc_stat(pid)
    return stat[19] if stat else None


def _alive(pid: int, proc_start: str | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    stat = _proc_stat(pid)
    if stat and stat[0] in ("Z", "X"):     # killed, not yet reaped by its parent: it holds nothing
        return False
    return proc_start is None or stat is None or stat[19] == proc_start


class OutputLock:
    """`.ggro.lock` in an output folder: one writing run at a time.

    The file holds the holder's host, pid, process start and run start. A second run is refused with
    OutputLocked naming the holder. A lock is stale, and taken over, when its holder is on this host
    and its process is gone (a SIGKILLed driver), or when the holder has not refreshed it for
    `stale_after_s` (a driver on another machine or pod that died: the holder rewrites the file every
    `heartbeat_s`). On a local or shared POSIX path the lock is taken atomically (O_EXCL); object
    stores have no create-if-absent here, so there it is written, then read back to confirm."""

    def __init__(self, out_dir: str | Path, heartbeat_s: float = 60.0, stale_after_s: float = 900.0):
        self.out_dir = out_dir
        self.fs, self.dir = output_fs(out_dir)
        self.path = f"{self.dir}/{LOCK}"
        self.local = isinstance(self.fs, pafs.LocalFileSystem)
        self.heartbeat_s, self.stale_after_s = heartbeat_s, stale_after_s
        self.token = uuid.uuid4().hex
        self.info = {"host": socket.gethostname(), "pid": os.getpid(), "proc_start": _proc_start(os.getpid()),
                     "started": now(), "token": self.token}
        self._stop = threading.Event()
        self._thread = None

    def _write(self, exclusive: bool) -> bool:
        data = json.dumps(self.info).encode()
        if self.local:
            flags = os.O_WRONLY | os.O_CREAT | (os.O_EXCL if exclusive else os.O_TRUNC)
            try:
                fd = os.open(self.path, flags, 0o644)
            except FileExistsError:
                return False
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
            except OSError:         # a full disk: never leave an empty lock that refuses the next run
                if exclusive:
                    os.unlink(self.path)
                raise
            return True
        if exclusive and self.fs.get_file_info(self.path).type != pafs.FileType.NotFound:
            return False
        with self.fs.open_output_stream(self.path) as f:
            f.write(data)
        return not exclusive or (self.holder() or {}).get("token") == self.token

    def holder(self) -> dict | None:
        try:
            with self.fs.open_input_stream(self.path) as f:
                return json.loads(f.read() or b"{}")
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {}

    def _stale(self, h: dict) -> bool:
        if h.get("host") == socket.gethostname() and isinstance(h.get("pid"), int):
            return not _alive(h["pid"], h.get("proc_start"))
        mtime = self.fs.get_file_info(self.path).mtime
        # An unreadable (empty) local lock: its holder writes it right after creating it, so one that is
        # EMPTY_STALE_S old has no holder (a run killed in between, or an older ggro on a full disk).
        limit = EMPTY_STALE_S if self.local and not h else self.stale_after_s
        return mtime is not None and time.time() - mtime.timestamp() > limit

    def acquire(self) -> "OutputLock":
        try:
            for _ in range(3):
                if self._write(exclusive=True):
                    break
                h = self.holder()
                if h is None:
                    continue        # released meanwhile: try again
                if not self._stale(h):
                    raise OutputLocked(
                        f"--output {self.out_dir} is being written by another run (host {h.get('host', '?')}, "
                        f"pid {h.get('pid', '?')}, since {h.get('started', '?')}); wait for it to finish, or, if "
                        f"that run is gone, delete {self.path}")
                print(f"ggro: taking over the stale lock of host {h.get('host')} pid {h.get('pid')} "
                      f"(started {h.get('started')})", file=sys.stderr)
                self._remove_stale(h)
            else:
                raise OutputLocked(f"could not take the lock {self.path}: other runs keep taking it")
        except OutputError:
            raise
        except (OSError, ValueError) as e:
            raise OutputError(f"cannot write --output {self.out_dir}: {e}") from None
        self._thread = threading.Thread(target=self._beat, daemon=True, name="ggro-lock-heartbeat")
        self._thread.start()
        return self

    def _remove_stale(self, stale: dict) -> None:
        """Remove the lock judged stale, and only it: two runs that both judged it stale must not both take the
        folder (one deleting the lock the other had just made). Locally it is moved aside atomically, so one
        mover wins, and put back when what was moved is not the stale lock (another run's fresh one); the O_EXCL
        create then decides. Object stores have no atomic move: there it is deleted."""
        if not self.local:
            self.fs.delete_file(self.path)
            return
        aside = f"{self.path}.{self.token}.stale"
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return                      # another run moved it first
        try:
            with open(aside, "rb") as f:
                moved = json.loads(f.read() or b"{}")
        except ValueError:
            moved = {}
        if moved != stale:
            try:
                os.link(aside, self.path)      # put it back, unless yet another run made one meanwhile
            except FileExistsError:
                pass
        os.unlink(aside)

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                if (self.holder() or {}).get("token") == self.token:
                    self._write(exclusive=False)
            except OSError:
                pass

    def release(self) -> None:
        self._stop.set()
        try:
            if (self.holder() or {}).get("token") == self.token:
                self.fs.delete_file(self.path)
        except OSError:
            pass

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()
