"""One writer per run folder, and an overwrite that cannot destroy the run it replaces.

`RunLock` is the run folder's lock: a file ``.perl.lock`` holding the holder's pid and host, held
with ``flock`` by global rank 0 for the whole run. The kernel releases an ``flock`` when its
process ends in any way (SIGKILL included), so a lock file that nobody holds is stale by
definition and is taken over; the pid and host in it only tell a refused user who holds it.
Readers never take the lock. `perlwb sweep` locks its sweep folder with the same class.

`Overwrite` moves a previous run's files into ``<folder>/.perl-previous-run/`` instead of deleting
them. `Overwrite.commit` deletes them once the new run has written its first snapshot or
checkpoint; `Overwrite.rollback` (any failure before that) removes what the new run wrote and
moves them back. A process killed between the two leaves the aside folder behind;
`restore_previous_run` (called by `perl.train` and `perl.open_run` when no live process holds
the lock) finishes the rollback. A small manifest written before the first move makes every
crash point recoverable: names in it that are still in the folder were never moved.

Usage:
    with RunLock(run_dir):                       # RunFolderLocked (a ConfigError) if held
        moves = Overwrite(run_dir).move_aside()
        try:
            ...                                  # write the new run; on its first snapshot:
            moves.commit()
        except BaseException:
            moves.rollback()
            raise
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import socket
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Optional

from perl.config import ConfigError
from perl.fileio import atomic_write_text, is_temp_of

__all__ = [
    "LOCK_FILE",
    "ASIDE_DIR",
    "RunLock",
    "RunFolderLocked",
    "lock_holder",
    "Overwrite",
    "restore_previous_run",
    "has_interrupted_overwrite",
    "recover_interrupted_overwrite",
]

LOCK_FILE = ".perl.lock"
ASIDE_DIR = ".perl-previous-run"
_DISCARD = ASIDE_DIR + ".discard"
_MANIFEST = ".perl-moved.json"
# note: what belongs to whoever launched the run rather than to the run (the sweep driver's launch
# config, its open log file and its marker): never moved aside, so the launcher keeps writing them.
LAUNCHER_FILES = frozenset({"launch_config.yaml", "train.log", "sweep_run.json"})
_NEVER_MOVED = frozenset({LOCK_FILE, ASIDE_DIR, _DISCARD, _MANIFEST}) | LAUNCHER_FILES


class RunFolderLocked(ConfigError):
    """Another live process holds the folder's lock."""


def _host() -> str:
    return socket.gethostname()


def _read_holder(fd: int) -> dict:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        data = json.loads(os.read(fd, 4096).decode("utf-8", "replace") or "{}")
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _describe(holder: dict) -> str:
    pid = holder.get("pid", "?")
    host = holder.get("host")
    return f"pid {pid}" + (f" on host {host}" if host and host != _host() else "")


class RunLock:
    """The lock of a run folder (or a sweep folder): one writer at a time.

    Usage:
        with RunLock("runs/demo"):
            ...                      # train; a second RunLock("runs/demo").acquire() raises
        RunLock("sweeps/x", name=".sweep.lock", what="perlwb sweep")

    Args:
        folder (`str | Path`): the folder; created if missing (only when the lock is taken).
        name (`str`, defaults to ".perl.lock"): the lock file's name in the folder.
        what (`str`, defaults to "a training"): how the refusal names the holder.
    """

    def __init__(self, folder: str | os.PathLike, name: str = LOCK_FILE, what: str = "a training"):
        self.folder = Path(folder).expanduser()
        self.path = self.folder / name
        self.what = what
        self._fd: Optional[int] = None

    def acquire(self) -> RunLock:
        """Take the lock, or raise `RunFolderLocked` at once naming the holder's pid."""
        if self._fd is not None:
            return self
        for _ in range(5):
            try:
                self.folder.mkdir(parents=True, exist_ok=True)
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as e:
                raise ConfigError(
                    f"cannot create the lock file {self.path} ({e.strerror or e}); choose a folder "
                    "you can write, or remove what is in the way."
                ) from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read_holder(fd)
                os.close(fd)
                raise RunFolderLocked(self.refusal(holder)) from None
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if not same:  # note: the previous holder unlinked it between our open and flock
                os.close(fd)
                continue
            holder = _read_holder(fd)
            if holder.get("host") not in (None, _host()):
                # note: flock does not reach across hosts on every shared file system, so a lock
                # written on another machine is respected until the user removes it
                os.close(fd)
                raise RunFolderLocked(self.refusal(holder))
            os.ftruncate(fd, 0)
            os.lseek(fd, 0, os.SEEK_SET)
            os.write(
                fd,
                json.dumps(
                    {"pid": os.getpid(), "host": _host(), "since": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
                ).encode(),
            )
            os.fsync(fd)
            self._fd = fd
            return self
        raise RunFolderLocked(f"could not take the lock {self.path}: it keeps being replaced; try again.")

    def refusal(self, holder: dict) -> str:
        """The one-line refusal naming ``holder`` (``{"pid": ..., "host": ...}``) and what to do."""
        return (
            f"{self.folder} is in use by {self.what} ({_describe(holder)}, lock file {self.path}); wait for it "
            f"to end or stop it, or choose another folder; if that process is gone, delete {self.path}."
        )

    def release(self) -> None:
        """Release and remove the lock file (safe to call twice)."""
        if self._fd is None:
            return
        try:
            if os.stat(self.path).st_ino == os.fstat(self._fd).st_ino:
                self.path.unlink()
        except OSError:
            pass
        os.close(self._fd)
        self._fd = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def lock_holder(folder: str | os.PathLike, name: str = LOCK_FILE) -> Optional[dict]:
    """``{"pid": ..., "host": ...}`` of the live process holding ``folder``'s lock, else None (reads only)."""
    path = Path(folder).expanduser() / name
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        holder = _read_holder(fd)
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return holder or {"pid": "?"}
        fcntl.flock(fd, fcntl.LOCK_UN)
        if holder.get("host") not in (None, _host()):
            return holder
        return None  # note: a file nobody holds: its process ended (even by SIGKILL); stale
    finally:
        os.close(fd)


# --------------------------------------------------------------------------------------------
# Overwrite: move aside, commit, roll back.


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class Overwrite:
    """A previous run's files in ``folder``, moved aside until the new run proves itself.

    Args:
        folder (`str | Path`): the run folder (or a separate tracking folder).
        scope (`Iterable[str]`, optional): the only entry names that belong to a run here (a
            shared tracking folder); default every entry except the lock, the aside folder and the
            launcher's files. A rollback removes only new entries within the scope.
    """

    def __init__(self, folder: str | os.PathLike, scope: Optional[Iterable[str]] = None):
        self.folder = Path(folder).expanduser()
        self.scope = None if scope is None else sorted(set(scope))
        self.moved: list[str] = []
        self.done = False

    @property
    def aside(self) -> Path:
        return self.folder / ASIDE_DIR

    def move_aside(self) -> Overwrite:
        """Move the selected entries into ``<folder>/.perl-previous-run/`` (nothing when there are none)."""
        if not self.folder.is_dir():
            self.done = True
            return self
        if self.aside.exists():
            # note: callers restore an interrupted overwrite first; two asides would be ambiguous
            raise ConfigError(
                f"{self.aside} exists: an earlier overwrite of {self.folder} was interrupted; "
                "open the run once (perl.open_run) or train again to restore it."
            )
        names = sorted(
            e.name
            for e in self.folder.iterdir()
            if e.name not in _NEVER_MOVED and (self.scope is None or e.name in self.scope)
        )
        if not names:
            self.done = True
            return self
        self.aside.mkdir()
        manifest = json.dumps({"folder": str(self.folder), "names": names, "scope": self.scope})
        atomic_write_text(self.aside / _MANIFEST, manifest)  # note: before the first move, so a crash is recoverable
        _fsync_dir(self.aside)
        for name in names:
            os.rename(self.folder / name, self.aside / name)
            self.moved.append(name)
        _fsync_dir(self.folder)
        return self

    def commit(self) -> None:
        """The new run holds: delete the previous run's files for good."""
        if self.done:
            return
        self.done = True
        discard = self.folder / _DISCARD
        if self.aside.exists():
            os.rename(self.aside, discard)  # note: atomic: after this the aside is no longer restorable
            shutil.rmtree(discard, ignore_errors=True)

    def rollback(self) -> None:
        """The new run failed before its first snapshot: remove what it wrote, put the previous run back."""
        if self.done:
            return
        self.done = True
        restore_previous_run(self.folder)


def has_interrupted_overwrite(folder: str | os.PathLike) -> bool:
    folder = Path(folder).expanduser()
    return (folder / ASIDE_DIR).is_dir() or (folder / _DISCARD).is_dir()


def restore_previous_run(folder: str | os.PathLike) -> bool:
    """Finish an interrupted overwrite of ``folder``; True when a previous run was put back.

    A committed overwrite (``.perl-previous-run.discard``) is finished by deleting it. Otherwise
    every entry the new run wrote is removed and the moved entries are renamed back. The caller
    must hold the folder's lock (or know that no training is writing to it).
    """
    folder = Path(folder).expanduser()
    discard = folder / _DISCARD
    if discard.exists():
        shutil.rmtree(discard, ignore_errors=True)
    aside = folder / ASIDE_DIR
    if not aside.is_dir():
        return False
    try:
        manifest = json.loads((aside / _MANIFEST).read_text(encoding="utf-8"))
        names, scope = set(manifest["names"]), manifest.get("scope")
        scope = None if scope is None else set(scope)
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        names = scope = None
    moved = {e.name for e in aside.iterdir() if e.name != _MANIFEST and not is_temp_of(e.name, _MANIFEST)}
    if names is None:
        if moved:  # note: cannot happen through Overwrite (manifest first); refuse to guess
            raise ConfigError(f"{aside} has no readable manifest; move its contents back into {folder} by hand.")
        shutil.rmtree(aside)  # note: killed before the manifest existed: nothing was moved
        return False
    for entry in list(folder.iterdir()):
        if entry.name in _NEVER_MOVED or (entry.name in names and entry.name not in moved):
            continue  # note: the launcher's files, and entries the interrupted move never reached
        if scope is not None and entry.name not in scope:
            continue  # note: a shared folder: only names a run writes there are the new run's
        _remove(entry)
    for name in moved:
        os.rename(aside / name, folder / name)
    shutil.rmtree(aside)
    _fsync_dir(folder)
    return True


def recover_interrupted_overwrite(folders: Iterable[str | os.PathLike], lock_folder: str | os.PathLike) -> list[Path]:
    """Restore the previous run in each of ``folders`` left by a killed overwrite; the restored folders.

    Does nothing while a live process holds ``lock_folder``'s lock (that overwrite is in progress).
    """
    folders = [Path(f).expanduser() for f in dict.fromkeys(str(f) for f in folders)]
    if not any(has_interrupted_overwrite(f) for f in folders) or lock_holder(lock_folder) is not None:
        return []
    restored = []
    with RunLock(lock_folder):
        for folder in folders:
            if restore_previous_run(folder):
                restored.append(folder)
    return restored
