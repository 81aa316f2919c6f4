"""One run at a time per output folder.

Two runs writing into one ``--output_dir`` (two terminals, a job submitted twice) would interleave
checkpoints and logs and then fight over ``final_model/``. A run that writes takes a lock file at
start, created with O_EXCL so exactly one process wins; it holds the holder's pid, host, command and
start time, so the refusal can name them. A lock whose process is gone (killed, machine rebooted) is
taken over with a note; a lock from another host cannot be checked and is honoured.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from .distributed import is_main_process
from .errors import UserError

log = logging.getLogger(__name__)

LOCK_NAME = ".fine_tuning_llms.lock"


def _holder_alive(holder: dict) -> bool:
    if holder.get("host") != socket.gethostname():
        return True  # cannot look at another machine's processes: assume it still runs
    try:
        os.kill(int(holder["pid"]), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    except (KeyError, TypeError, ValueError):
        return False  # unreadable lock: nobody can be holding it properly
    return _same_process(holder)


def _same_process(holder: dict) -> bool:
    """The pid may have been reused by an unrelated process since: compare start times (Linux)."""
    started = holder.get("process_start")
    current = _process_start(int(holder["pid"]))
    return started is None or current is None or started == current


def _process_start(pid: int) -> str | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _read(lock: Path) -> dict:
    try:
        return json.loads(lock.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def _describe(holder: dict) -> str:
    return (f"pid {holder.get('pid', '?')} on {holder.get('host', '?')}, started {holder.get('started', '?')}: "
            f"{holder.get('command', '?')}")


def _write_new(lock: Path, record: dict) -> bool:
    try:
        fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        json.dump(record, fh)
    return True


@contextlib.contextmanager
def output_lock(folder: str | Path, command: str | None = None) -> Iterator[Path | None]:
    """Hold ``folder``'s lock for the duration; raise UserError if another live run holds it."""
    if not is_main_process():
        yield None  # the other ranks work under rank 0's lock
        return
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    lock = folder / LOCK_NAME
    record = {"pid": os.getpid(), "host": socket.gethostname(), "process_start": _process_start(os.getpid()),
              "command": command or " ".join(sys.argv), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    if not _write_new(lock, record):
        holder = _read(lock)
        if _holder_alive(holder):
            raise UserError(f"{folder} is in use by another run ({_describe(holder)}); wait for it to finish "
                            f"or pass another --output_dir")
        log.warning("Taking over the lock of a run that is gone (%s)", _describe(holder) if holder else "unreadable lock")
        lock.unlink(missing_ok=True)
        if not _write_new(lock, record):  # someone else took it over in the same instant
            raise UserError(f"{folder} is in use by another run ({_describe(_read(lock))}); pass another --output_dir")
    try:
        yield lock
    finally:
        if _read(lock).get("pid") == record["pid"]:
            lock.unlink(missing_ok=True)
