"""Shared command-line plumbing for the entry points: flags from a config dataclass, and one-line
errors. (Lives beside the scripts: the library itself parses no command lines.)"""
from __future__ import annotations

import argparse
import faulthandler
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Callable, TypeVar

# `mlflow run` of this project (a checkout or a Git URI) uses the project's own source.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

from sample_importance.errors import UserError  # noqa: E402
from sample_importance.mlflow_io import PARENT_PID_VAR, check_store, database_call, shown  # noqa: E402

C = TypeVar("C")


PROJECT = Path(__file__).resolve().parent.parent  # the MLproject folder (steps launch from it)


def parse_config(cls: type[C], argv: list[str] | None, description: str) -> C:
    """Build `cls` from --field flags (one per parameter, typed, defaulting to the field's default)."""
    parser = argparse.ArgumentParser(description=description)
    help_texts = cls.field_help()
    for name, default in cls().params().items():  # a block of options is one key=value text
        parser.add_argument(f"--{name}", type=type(default), default=default,
                            help=f"{help_texts.get(name, '')} (default: {default!r})")
    return cls(**vars(parser.parse_args(argv)))


def stage_main(name: str) -> Callable[[list[str] | None], str]:
    """The `main(argv)` of entry point `name`: its flags parsed into the stage's config class, then the
    stage (`sample_importance.stages.STAGES`); returns the run id."""
    from sample_importance.stages import STAGES

    stage = STAGES[name]

    def main(argv: list[str] | None = None) -> str:
        cfg = parse_config(stage.config, argv, stage.description)
        check_store()  # one sentence, at once, for a store that cannot work
        return stage.run(cfg, PROJECT)
    return main


class _Interrupt:
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


def _die_with_parent() -> None:
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


def _stacks_on_sigusr1() -> None:
    """`kill -USR1 <pid>` prints every thread's Python stack on stderr: where a run hangs (not
    where stderr is no file, as under a test's capture, or on systems without SIGUSR1)."""
    try:
        faulthandler.register(signal.SIGUSR1, all_threads=True)
    except (AttributeError, ValueError, OSError):  # io.UnsupportedOperation is both of the latter
        pass


def run_cli(main: Callable[[], object]) -> None:
    """Run `main`; a user error becomes one line on stderr and exit status 2. SIGTERM ends it as
    Ctrl-C does (its run KILLED, resumable); a launched step ends with its launcher."""
    interrupt = _Interrupt()
    signal.signal(signal.SIGTERM, interrupt)
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:  # not where SIGINT is ignored
        signal.signal(signal.SIGINT, interrupt)
    _stacks_on_sigusr1()
    _die_with_parent()
    try:
        main()
    except UserError as exc:  # escaped: a message may quote text from the tracking store
        print(f"error: {shown(exc, 5000)}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
