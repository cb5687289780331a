"""What a step of the suite leaves behind (a stage of a compression recipe, or a script run alone)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class StageResult:
    checkpoint: Path | None  # the .pt a following stage starts from (None: an export)
    outputs: list[Path] = field(default_factory=list)  # files written besides the checkpoint (exports)
    value: Any = None  # what the script's main returns (a train run's last EvalResult, a prune report)
