"""Shared command-line plumbing for the entry points: flags from a config dataclass, and one-line
errors. (Lives beside the scripts: the library itself parses no command lines.)"""
from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path
from typing import Callable, TypeVar

# `mlflow run` of this project (a checkout or a Git URI) uses the project's own source.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

from sample_importance.errors import UserError  # noqa: E402

C = TypeVar("C")


def parse_config(cls: type[C], argv: list[str] | None, description: str, help_texts: dict[str, str]) -> C:
    """Build `cls` from --field flags (one per dataclass field, typed, defaulting to the field's default)."""
    parser = argparse.ArgumentParser(description=description)
    for f in dataclasses.fields(cls):
        parser.add_argument(f"--{f.name}", type=type(f.default), default=f.default,
                            help=f"{help_texts.get(f.name, '')} (default: {f.default})")
    return cls(**vars(parser.parse_args(argv)))


def run_cli(main: Callable[[], object]) -> None:
    """Run `main`; a user error becomes one line on stderr and exit status 2."""
    try:
        main()
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
