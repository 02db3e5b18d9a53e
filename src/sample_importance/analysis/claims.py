"""A claim of the paper, as measured here: what was measured and whether the claim holds."""
from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class Claim:
    number: int  # the claim's number in the study's report (1-5)
    claim: str  # the paper's claim, in one sentence
    measured: str  # what was measured here, with the figures
    holds: bool
    figure: str = ""  # artifact path of the figure that shows it, in the analysis run

    def to_dict(self) -> dict:
        return asdict(self)
