"""The directory a gateway's processes share (metric snapshots, operator overrides), and
the removal of those that killed gateways left behind.

Process 0 makes the directory and removes it when it exits. A gateway killed outright (an
OOM kill, SIGKILL from a supervisor) cannot, and each restart would leave another one in
the temp dir. So every process of a gateway holds a shared flock on the directory's lock
file for as long as it lives, and a gateway that starts removes each directory whose lock
it can take exclusively. The kernel drops a dead process's locks, in whatever PID
namespace it ran, so a running gateway's directory is never taken, which a check of PIDs
could not promise to containers sharing a /tmp.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import tempfile

ENV = "BREAKWATER_GATEWAY_SHARED_DIR"
"""Where process 0 tells its siblings (and an operator may name a directory of their own)."""
PREFIX = "breakwater-gateway-"
LOCK = "owner.lock"

_held: list[int] = []
"""Lock files kept open for the life of the process: closing one would drop its lock."""


def ensure() -> str | None:
    """The gateway's shared directory in ENV: a sibling holds the one it inherited, process
    0 removes killed gateways' directories and makes its own. Returns the path to remove at
    exit (None when inherited or set by the operator)."""
    inherited = os.environ.get(ENV)
    if inherited:
        _hold(os.path.join(inherited, LOCK))
        return None
    sweep(tempfile.gettempdir())
    path = tempfile.mkdtemp(prefix=PREFIX)
    staged = os.path.join(path, LOCK + ".new")
    fd = os.open(staged, os.O_CREAT | os.O_RDWR | os.O_CLOEXEC, 0o600)
    _lock(fd)
    os.rename(staged, os.path.join(path, LOCK))  # appears locked: no sweep finds it free
    os.environ[ENV] = path
    return path


def remove(path: str | None) -> None:
    if path:
        shutil.rmtree(path, ignore_errors=True)


def sweep(parent: str) -> list[str]:
    """Remove this user's gateway directories under `parent` that no process holds; returns
    them. One without a lock file (an operator's, or an older gateway's) is left alone."""
    removed: list[str] = []
    uid = os.getuid()
    try:
        entries = os.scandir(parent)
    except OSError:
        return removed
    with entries:
        for entry in entries:
            try:
                if not entry.name.startswith(PREFIX) or not entry.is_dir(follow_symlinks=False):
                    continue
                if entry.stat(follow_symlinks=False).st_uid != uid:
                    continue
                fd = os.open(
                    os.path.join(entry.path, LOCK), os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW
                )
            except OSError:
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                continue  # held: its gateway runs
            else:
                shutil.rmtree(entry.path, ignore_errors=True)
                removed.append(entry.path)
            finally:
                os.close(fd)
    return removed


def _hold(lock: str) -> None:
    try:
        fd = os.open(lock, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return  # an operator's directory: nothing to hold, nothing will sweep it
    _lock(fd)


def _lock(fd: int) -> None:
    """A shared lock, kept. Where the file system has no flock, none: no sweep can take the
    directory either, as its exclusive lock fails the same way."""
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)  # only a sweep's brief hold could block
    except OSError:
        os.close(fd)
        return
    _held.append(fd)
