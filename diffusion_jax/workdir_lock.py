"""One training run per workdir: an advisory lock file ``WORKDIR/train.lock``.

The lock is ``fcntl.flock`` on that file, so the kernel releases it when its process ends,
however it ends; the file's JSON records the holder (``pid``, ``host``, ``since``) for the
message a second run prints::

    with workdir_lock.hold("runs/digits"):
        ...  # train

A second run on the same workdir raises `WorkdirLockedError` naming the holder. A lock file
left by a process that is gone (no flock held: it was killed) is taken over with a warning.
A file naming another host whose lock this host cannot see (a shared file system without
``flock``) is refused too; delete it if that run is over. Paths with a scheme (``gs://...``)
have no local file to lock: they are not locked, with a note.
"""
from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import json
import os
import socket
import sys
from collections.abc import Iterator

LOCK_FILE = "train.lock"


class WorkdirLockedError(RuntimeError):
    """Another live run holds the workdir's lock."""


@contextlib.contextmanager
def hold(workdir: str) -> Iterator[str | None]:
    """Holds ``WORKDIR/train.lock`` for the body; yields its path (None when not locked).

    The file is removed and the lock released when the body ends, by return or exception.

    Raises:
        WorkdirLockedError: another live process holds the lock (the message names its pid,
            host, start time and the lock file).
    """
    if "://" in workdir:
        print(f"Note: {workdir} is not a local path; it is not locked against a second "
              "run_train.py on the same workdir.", file=sys.stderr, flush=True)
        yield None
        return
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(os.path.abspath(workdir), LOCK_FILE)
    fd = _acquire(path)
    try:
        yield path
    finally:
        _release(path, fd)


def holder(path: str) -> dict:
    """The holder recorded in the lock file ``path`` (empty when unreadable)."""
    try:
        with open(path) as f:
            record = json.load(f)
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def describe(record: dict) -> str:
    """``pid 123 on host h since 2026-12-03T13:50:00Z`` for a lock file's record."""
    return (f"pid {record.get('pid', '?')} on host {record.get('host', '?')} since "
            f"{record.get('since', '?')}")


def _acquire(path: str) -> int:
    """Opens, flocks and fills in the lock file; returns its descriptor."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            raise WorkdirLockedError(_busy_message(path, holder(path))) from None
        try:
            same_file = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:  # the holder removed it between our open and flock
            same_file = False
        if same_file:
            break
        os.close(fd)
    try:
        _take(path, fd)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _take(path: str, fd: int) -> None:
    """Checks the previous record (a dead holder is taken over) and writes ours."""
    previous, host = holder(path), socket.gethostname()
    if previous:
        if previous.get("host") != host:
            raise WorkdirLockedError(_busy_message(path, previous) + " (another host: this one "
                                     "cannot tell whether it is still running; delete the lock "
                                     "file if it is not)")
        print(f"Warning: taking over the stale lock {path} of {describe(previous)} (that "
              "process is gone).", file=sys.stderr, flush=True)
    since = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    record = json.dumps(dict(pid=os.getpid(), host=host, since=since, argv=sys.argv))
    os.ftruncate(fd, 0)
    os.pwrite(fd, record.encode(), 0)
    os.fsync(fd)


def _release(path: str, fd: int) -> None:
    """Removes the file (while still holding the lock), then releases it."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    finally:
        os.close(fd)


def _busy_message(path: str, record: dict) -> str:
    return (f"workdir {os.path.dirname(path)} is in use by another training run: "
            f"{describe(record)} (lock file {path})")
