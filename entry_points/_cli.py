"""Shared command-line plumbing for the entry points: flags from a config dataclass, and one-line
errors. (Lives beside the scripts: the library itself parses no command lines.)"""
from __future__ import annotations

import argparse
import faulthandler
import signal
import sys
from pathlib import Path
from typing import Callable, TypeVar

# `mlflow run` of this project (a checkout or a Git URI) uses the project's own source.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

from sample_importance.errors import UserError  # noqa: E402
from sample_importance.liveness import HeldInterrupt, die_with_parent  # noqa: E402
from sample_importance.mlflow_io import check_store, shown  # noqa: E402

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
    interrupt = HeldInterrupt()
    signal.signal(signal.SIGTERM, interrupt)
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:  # not where SIGINT is ignored
        signal.signal(signal.SIGINT, interrupt)
    _stacks_on_sigusr1()
    die_with_parent()
    try:
        main()
    except UserError as exc:  # escaped: a message may quote text from the tracking store
        print(f"error: {shown(exc, 5000)}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
