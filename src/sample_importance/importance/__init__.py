"""The recorder: exact per-sample, per-layer sample importance for any nn.Module (recorder.py),
per-module-type rules in a registry (rules.py) and many MLPs trained at once (stacked.py)."""
from __future__ import annotations

from .recorder import ImportanceRecorder
from .rules import RULES, register_rule

__all__ = ["ImportanceRecorder", "RULES", "register_rule"]
