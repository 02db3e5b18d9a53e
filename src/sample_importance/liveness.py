"""Who works on a run, and whether they still live: this process's owner and user names, process
liveness, the heartbeat lease, the run lock (a lock file beside the run's artifacts, released by the
operating system however the process ends), file ownership, and the interrupt held while a call to
a SQL store runs. Nothing here talks to MLflow (`mlflow_io` does, and uses this).
"""
from __future__ import annotations

import contextlib
import fcntl
import getpass
import os
import signal
import socket
import stat
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Iterator

from .errors import UserError

HEARTBEAT_S = 60.0
LEASE_S = 900.0  # a RUNNING run of another machine with no heartbeat for this long has lost its claim
PARENT_PID_VAR = "SAMPLE_IMPORTANCE_PARENT_PID"  # a launched step watches this process id and ends with it
LOCK_FILE = "sample_importance.lock"  # beside a run's local artifact folder: held by the process working on it


def owner() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def user() -> str:
    """This process's user and machine, as recorded in TAG_USER."""
    try:
        name = getpass.getuser()
    except (KeyError, OSError):  # no user name for this uid (some containers)
        name = f"uid{os.getuid()}"
    return f"{name}@{socket.gethostname()}"


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def died_here(owner_tag: str) -> bool:
    """Whether `owner_tag` (host:pid, as `owner` writes it) names a process of this machine that no
    longer exists."""
    host, _, pid = owner_tag.rpartition(":")
    return host == socket.gethostname() and pid.isdigit() and int(pid) != os.getpid() and not process_alive(int(pid))


def gone(owner_tag: str, heartbeat: str, start_s: float) -> str | None:
    """Why the owner (host:pid) of a RUNNING run is gone, or None while it may live: on this
    machine, its process no longer exists (killed with -9); on another machine, its heartbeat (else
    the run's start) is older than LEASE_S (that machine died, or the run was planted to block its
    configuration)."""
    if owner_tag.rpartition(":")[0] == socket.gethostname():
        return f"its process ({owner_tag}) died" if died_here(owner_tag) else None
    try:
        beat = float(heartbeat)
    except ValueError:
        beat = 0.0
    silent = time.time() - max(beat, start_s)
    return f"its process ({owner_tag}) sent no heartbeat for {silent / 60:.0f} minutes" if silent > LEASE_S else None


class Heartbeat:
    """One daemon thread that writes the heartbeat (`send`) of every RUNNING run this process owns, every
    HEARTBEAT_S: the lease by which other machines tell a live run from one whose machine died
    (`reap_orphans`). Its writes are best effort (a store that is briefly unreachable is retried
    at the next beat)."""

    def __init__(self, send: Callable[[str], None]) -> None:
        self.send = send  # send(run_id): write the run's heartbeat
        self.runs: set[str] = set()
        self.lock = threading.Lock()
        self.thread: threading.Thread | None = None

    def add(self, run_id: str) -> None:
        with self.lock:
            self.runs.add(run_id)
            if self.thread is None or not self.thread.is_alive():
                self.thread = threading.Thread(target=self._beat, name="run-heartbeat", daemon=True)
                self.thread.start()

    def remove(self, run_id: str) -> None:
        with self.lock:
            self.runs.discard(run_id)

    def _beat(self) -> None:
        while True:
            time.sleep(HEARTBEAT_S)
            with self.lock:
                runs = list(self.runs)
            for run_id in runs:
                with contextlib.suppress(Exception):
                    self.send(run_id)


def owned_by_me(*paths: Path) -> bool:
    """Whether every path is this user's own and no symbolic link (the folders down to a file, and
    the file a plain one): a run's folder planted in a shared store may hold links to the user's
    files, which a check that follows them would take for the user's own."""
    try:
        modes = [os.lstat(p) for p in paths]
    except OSError:
        return False
    return (all(m.st_uid == os.getuid() and not stat.S_ISLNK(m.st_mode) for m in modes)
            and stat.S_ISREG(modes[-1].st_mode))


class RunBusyError(UserError):
    """Another process is working on the run."""


@contextlib.contextmanager
def waiting_lock(path: Path) -> Iterator[None]:
    """An exclusive lock on `path` (created if missing, never through a link) for the block, waiting
    for whoever holds it (processes that start on one empty SQLite store migrate it one at a time)."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


@contextlib.contextmanager
def lock(run_id: str, folder: Path) -> Iterator[None]:
    """Hold an exclusive lock on the run (LOCK_FILE in `folder`) for the block; the operating system
    releases it when the process ends, however it ends. Raises RunBusyError at once if another
    process holds it."""
    folder.mkdir(parents=True, exist_ok=True)
    fd = _open_lock(run_id, folder / LOCK_FILE)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RunBusyError(f"Run {run_id} is being worked on by another process on this machine: wait for it "
                               f"to finish (the results go to run {run_id}), or stop that process first.") from None
        yield
    finally:
        os.close(fd)  # releases the lock


def _open_lock(run_id: str, path: Path) -> int:
    """The lock file's descriptor: created exclusively, or opened without following a link (a planted
    link would make this process create or lock a file wherever it points); a plain file only."""
    nofollow = getattr(os, "O_NOFOLLOW", 0)
    try:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | nofollow, 0o644)
        except FileExistsError:
            fd = os.open(path, os.O_RDWR | nofollow)
    except OSError as exc:
        raise RunLockError(f"Run {run_id}'s lock file {path} cannot be used ({exc.strerror or exc}; a symbolic "
                           "link is never followed): delete that run, or that file if you made it.") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise RunLockError(f"Run {run_id}'s lock file {path} is not a plain file: delete that run, or that file if "
                           "you made it.")
    return fd


class RunLockError(UserError):
    """A run's lock file is not one this project made (a link, a folder)."""


def database_call(frame):
    """The outermost frame, among `frame` and its callers, that runs SQL store code (SQLAlchemy,
    MLflow's SQL stores and database utilities, Optuna's RDB storage), or None. An interrupt
    raised inside such a call can leave a SQLite database locked: the run's own last writes then
    wait 20 s each for the lock and fail, and the run stays RUNNING."""
    if "sqlalchemy" not in sys.modules:  # nothing has opened a SQL store
        return None
    import mlflow.store  # where MLflow's store code lies (imported already: sqlalchemy is)

    store = os.path.dirname(mlflow.store.__file__) + os.sep
    places = (store + "db" + os.sep, *(os.path.dirname(sys.modules[name].__file__) + os.sep
                                      for name in ("sqlalchemy", "optuna.storages._rdb") if name in sys.modules))
    outermost = None
    while frame is not None:
        name = frame.f_code.co_filename
        if name.startswith(places) or (name.startswith(store) and os.path.basename(name).startswith("sqlalchemy_")):
            outermost = frame
        frame = frame.f_back
    return outermost


class HeldInterrupt:
    """SIGTERM and Ctrl-C (SIGINT) end an entry point as KeyboardInterrupt: its run ends KILLED and
    resumable. One that lands inside a call to the SQL store is held until that call returns and
    raised there, in its caller (a profile hook watches for the return; more signals meanwhile count
    as one): raised inside, it can leave a SQLite store locked, and the run's last writes would
    then fail after 20 s each, leaving it RUNNING. A call that takes longer than HOLD_S (a store
    that cannot be reached, retried for minutes) is interrupted where it is, and so is any call
    under a profiler (the hook would displace it)."""

    HOLD_S = 30.0

    def __init__(self) -> None:
        self.call = None  # the outermost frame of the store call an interrupt waits for
        self.overdue = False
        self.timer: threading.Timer | None = None

    def __call__(self, signum, frame) -> None:
        call = database_call(frame)
        if call is not None and not self.overdue and sys.getprofile() in (None, self._watch):
            if self.call is None:  # the handler runs in the main thread: the hook watches that one
                sys.setprofile(self._watch)
                self.timer = threading.Timer(self.HOLD_S, self._overdue, (signum,))
                self.timer.daemon = True
                self.timer.start()
            self.call = call
            return
        if self.call is not None:  # held too long
            self._release()
            sys.setprofile(None)
        raise KeyboardInterrupt

    def _overdue(self, signum: int) -> None:
        if self.call is not None:
            self.overdue = True
            os.kill(os.getpid(), signum)

    def _release(self) -> None:
        self.call, self.overdue = None, False
        self.timer.cancel()

    def _watch(self, frame, event, arg) -> None:
        if event == "return" and frame is self.call:
            self._release()
            # Raised from the hook, it leaves the returning call and reaches its caller; Python
            # then switches the hook off.
            raise KeyboardInterrupt


def die_with_parent() -> None:
    """A step launched by another entry point (`main`, `ordering`) ends when its launcher ends,
    however the launcher ends (kill -9 included): a thread watches the launcher's process id, passed
    down in PARENT_PID_VAR, and stops this process as SIGTERM would, so no child trains on alone."""
    parent = os.environ.get(PARENT_PID_VAR, "")
    if not parent.isdigit():
        return

    def watch() -> None:
        while True:
            try:
                os.kill(int(parent), 0)
            except ProcessLookupError:
                os.kill(os.getpid(), signal.SIGTERM)
                return
            except PermissionError:
                pass
            time.sleep(1.0)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


