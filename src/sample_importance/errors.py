"""Errors a user can cause and fix. Entry points print their message as one line and exit non-zero."""
from __future__ import annotations


class UserError(Exception):
    """Base class: the message is one sentence that says what is wrong and what to do."""


class ConfigError(UserError, ValueError):
    """A parameter a user chose is invalid; the message says what to do."""


class Stopped(Exception):
    """Work stopped on purpose (e.g. a trial pruned by the sweep): the run ends KILLED, not FAILED."""
