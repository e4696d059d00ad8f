"""One writer per cache folder (docs/cache-format.md, "One writer at a time").

`molt extract` holds an exclusive `fcntl.flock` on `<cache>/_progress/lock` while it runs. The
kernel drops the lock when the process ends, however it ends (`kill -9` included), so no stale
lock is ever left behind; `_progress/lock.json` only *describes* the holder (pid, host, command)
for the refusal message and is never trusted as the lock itself.

Ranks of one torchrun job share the lock: the first rank to arrive holds it and writes its job
id; a rank that finds the lock held by its own job (same torchrun rendezvous, world size and
command line) proceeds without holding it. Rank 0 outlives the other ranks' writes (it waits for
every unit record, then the final barrier), so in practice the lock covers the whole job. Any
other process is refused, naming the holder.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any, Iterator

from molt_cache.cache.layout import LOCK_FILE, LOCK_HOLDER_FILE, PROGRESS_DIR


class CacheLockedError(OSError):
    """Another `molt extract` job is writing this cache folder; the message names it."""


def job_id(world_size: int) -> str:
    """What ranks of one job share and other jobs do not. One process: host + pid. torchrun:
    its rendezvous (run id, master address and port) + world size + the command line."""
    if world_size <= 1:
        return f"process:{socket.gethostname()}:{os.getpid()}"
    parts = [os.environ.get(k, "") for k in ("TORCHELASTIC_RUN_ID", "MASTER_ADDR", "MASTER_PORT")]
    key = json.dumps(parts + [world_size, sys.argv])
    return "torchrun:" + hashlib.sha256(key.encode()).hexdigest()[:16]


def _read_holder(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
        return data if isinstance(data, dict) else None
    except (OSError, ValueError):
        return None


def _describe(holder: dict[str, Any] | None) -> str:
    if holder is None:
        return "a process that has not yet said who it is"
    opts = holder.get("options") or {}
    shown = ", ".join(f"{k}={v}" for k, v in opts.items())
    return (f"pid {holder.get('pid')} on {holder.get('host')} since {holder.get('started')}, "
            f"command `{holder.get('command')}`" + (f" ({shown})" if shown else ""))


@contextlib.contextmanager
def writer_lock(folder: str | Path, *, job: str, options: dict[str, Any] | None = None,
                wait_s: float = 2.0) -> Iterator[bool]:
    """Hold (or, for a rank of the holder's own job, share) the folder's writer lock.

    Yields True when this process holds the flock, False when it shares its job's. Raises
    CacheLockedError naming the holder's pid, host, command and options when another job holds it.
    `wait_s`: how long to wait for a new holder to write its description (not for the lock)."""
    progress = Path(folder) / PROGRESS_DIR
    progress.mkdir(parents=True, exist_ok=True)
    holder_path = progress / LOCK_HOLDER_FILE
    fd = os.open(progress / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    held = False
    try:
        deadline = time.monotonic() + wait_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                held = True
                break
            except BlockingIOError:
                holder = _read_holder(holder_path)
                if holder is not None and holder.get("job") == job:
                    break  # a rank of our own job holds it
                if time.monotonic() >= deadline:
                    raise CacheLockedError(
                        f"{folder} is being written by another `molt extract`: {_describe(holder)}; "
                        "wait for it to finish, or choose another --out-dir") from None
                time.sleep(0.1)
        if held:
            info = {"job": job, "pid": os.getpid(), "host": socket.gethostname(),
                    "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "command": " ".join(sys.argv),
                    "options": options or {}}
            tmp = holder_path.with_name(holder_path.name + f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(info, indent=1) + "\n")
            tmp.replace(holder_path)
        yield held
    finally:
        if held:
            fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
