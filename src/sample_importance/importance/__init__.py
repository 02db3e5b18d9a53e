"""The recorder: exact per-sample, per-layer sample importance for any nn.Module (recorder.py), the
optimizers' step factors (optim.py) and per-module-type rules in one registry, one file per family
(rules/). It imports only torch and the project's errors: it can be read, and vendored, alone."""
from __future__ import annotations

from .recorder import ImportanceRecorder
from .rules import RULES, register_rule

__all__ = ["ImportanceRecorder", "RULES", "register_rule"]
