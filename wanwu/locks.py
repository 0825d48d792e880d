"""One writer per stage and project: a second process running the same stage waits for the first, then resumes.

Two processes writing one stage's outputs at once (two terminals, a cron job and a user, two ``wanwu run``) would
interleave their table rewrites. The lock is a file lock (``filelock``: ``fcntl`` on POSIX, released by the kernel
when its holder dies, so a SIGKILLed holder never leaves a stale lock) at ``.wanwu/locks/<name>.lock`` in the
project; beside it ``<name>.owner`` says who holds it. ``dvc repro`` has its own repository lock on top.

How long a second process waits is infrastructure, not an ML knob: ``$WANWU_LOCK_TIMEOUT`` seconds (default one
hour; ``0`` fails at once). It then fails with :class:`StageLocked`, naming the lock file and its holder.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from wanwu.offline import state_dir

TIMEOUT_ENV = "WANWU_LOCK_TIMEOUT"
DEFAULT_TIMEOUT = 3600.0


class StageLocked(RuntimeError):
    """Another process held the stage's lock for longer than this one would wait."""


def lock_path(root: str | Path, name: str) -> Path:
    return state_dir(Path(root)) / "locks" / f"{name}.lock"


def _holder(owner: Path) -> str:
    try:
        info = json.loads(owner.read_text(encoding="utf-8"))
        return f"pid {info['pid']} ({info['cmd']}, since {info['since']})"
    except (OSError, ValueError, KeyError):
        return "a process that has not written its name yet"


@contextlib.contextmanager
def stage_lock(root: str | Path, name: str, timeout: float | None = None) -> Iterator[Path]:
    """Hold the project's lock for ``name`` (a stage, or ``pipeline``); wait up to ``timeout`` s if it is taken."""
    from filelock import FileLock, Timeout

    if timeout is None:
        timeout = float(os.environ.get(TIMEOUT_ENV, DEFAULT_TIMEOUT))
    path = lock_path(root, name)
    path.parent.mkdir(parents=True, exist_ok=True)
    owner = path.with_suffix(".owner")
    lock = FileLock(str(path))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        if timeout <= 0:
            raise StageLocked(
                f"{name}: another process is running it in this project: {path} is held by {_holder(owner)}. "
                f"Wait for it to finish (${TIMEOUT_ENV} sets how long to wait, in seconds) and run again."
            ) from None
        print(
            f"{name}: waiting up to {timeout:.0f} s for {path}, held by {_holder(owner)}",
            file=sys.stderr,
            flush=True,
        )
        try:
            lock.acquire(timeout=timeout)
        except Timeout:
            raise StageLocked(
                f"{name}: {path} was still held by {_holder(owner)} after {timeout:.0f} s. Let that run finish, "
                f"or stop it, then run again (${TIMEOUT_ENV} sets the wait)."
            ) from None
    try:
        info = {"pid": os.getpid(), "cmd": " ".join(sys.argv)[:300], "since": time.strftime("%Y-%m-%d %H:%M:%S")}
        owner.write_text(json.dumps(info), encoding="utf-8")
        yield path
    finally:
        owner.unlink(missing_ok=True)
        lock.release()


def heal_dvc_rwlock(root: str | Path) -> str | None:
    """Remove DVC's ``.dvc/tmp/rwlock`` when a killed ``dvc`` left it half-written; say so, else return None.

    DVC rewrites that file in place (truncate, then write JSON) under its guard ``rwlock.lock``; a SIGKILL between
    the two leaves it empty, and every later ``dvc repro`` then stops with "Unable to read RWLock-file ... JSON
    structure is corrupted" (treeverse/dvc#7615) until someone deletes it. The file only lists the outputs running
    ``dvc`` processes hold, and a missing file means none (DVC's own reading), so under DVC's guard an unreadable
    one is removed. A readable one is left alone (DVC itself clears the entries of dead processes).
    """
    path = Path(root) / ".dvc" / "tmp" / "rwlock"
    if not path.is_file():
        return None

    def readable() -> bool:  # or gone: nothing to heal either way
        try:
            json.loads(path.read_text(encoding="utf-8"))  # "" (the kill's usual leftover) raises too
        except FileNotFoundError:
            return True
        except (ValueError, OSError):
            return False
        return True

    if readable():
        return None
    from dvc.lock import make_lock

    with make_lock(str(path.with_name("rwlock.lock")), tmp_dir=str(path.parent), hardlink_lock=False):
        if readable():  # a running dvc finished its write meanwhile
            return None
        size = path.stat().st_size
        path.unlink()
    return (
        f"{path}: removed, it was half-written ({size} bytes; a dvc process killed while writing it leaves it so, "
        "treeverse/dvc#7615) and no dvc process was editing it"
    )


def heal_dvc_lockfile(root: str | Path) -> str | None:
    """Drop the stage entries of ``dvc.lock`` that a killed ``dvc`` left cut off; say so, else return None.

    DVC rewrites ``dvc.lock`` whole (read, update one stage, dump) in place, without a temporary file: a SIGKILL
    inside the dump leaves it cut off (seen in the fault suite), and every later ``dvc repro`` then stops with
    "'./dvc.lock' validation failed" until someone edits it. A stage without an entry simply runs again, so the
    entries that still validate against DVC's own schema are kept and the rest dropped; a file that no longer
    parses is moved aside whole (``dvc.lock.broken``). Done under DVC's repository lock: while a ``dvc`` runs, the
    file is its own and is left alone.
    """
    import yaml

    path = Path(root) / "dvc.lock"
    if not path.is_file():
        return None
    from dvc.schema import COMPILED_LOCK_FILE_STAGE_SCHEMA, COMPILED_LOCKFILE_SCHEMA
    from voluptuous import Invalid

    def damage() -> list[str] | None:
        """None: whole (or gone). []: nothing worth keeping (no YAML, no stage table). Else the cut stages."""
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (yaml.YAMLError, UnicodeDecodeError):
            return []
        try:
            COMPILED_LOCKFILE_SCHEMA(data)
            return None
        except Invalid:
            pass
        stages = data.get("stages") if isinstance(data, dict) else None
        if not isinstance(stages, dict):
            return []
        cut = []
        for name, entry in stages.items():
            try:
                COMPILED_LOCK_FILE_STAGE_SCHEMA(entry)
            except Invalid:
                cut.append(name)
        return cut or None  # every entry whole: not a cut-off file, DVC's own error stands

    if damage() is None:
        return None
    from dvc.lock import LockError, make_lock

    tmp = path.parent / ".dvc" / "tmp"
    tmp.mkdir(parents=True, exist_ok=True)
    try:
        with make_lock(str(tmp / "lock"), tmp_dir=str(tmp), hardlink_lock=False):
            cut = damage()  # again, under the lock: a dvc may have finished its write meanwhile
            if cut is None:
                return None
            if not cut:
                aside = path.with_name("dvc.lock.broken")
                os.replace(path, aside)
                return (
                    f"{path}: moved to {aside.name}, it does not parse as a lock file (a dvc killed while writing "
                    "it leaves it so); every stage runs again"
                )
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
            data["stages"] = {k: v for k, v in data["stages"].items() if k not in cut}
            out = path.with_name(f"dvc.lock.{os.getpid()}.tmp")
            out.write_text(yaml.safe_dump(data, sort_keys=False, allow_unicode=True), encoding="utf-8")
            os.replace(out, path)
    except LockError:  # a dvc is running: the file is its own
        return None
    names = ", ".join(map(str, cut))
    return f"{path}: the entries of {names} were cut off by a killed dvc and are dropped; they run again"
