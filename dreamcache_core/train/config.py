"""Settings of one adapter training run. The defaults follow the released DreamCache training recipe."""

from __future__ import annotations

import dataclasses

from .model import MIXED_PRECISION


@dataclasses.dataclass
class TrainConfig:
    """One training run.

    ``micro_batch`` is the batch of one forward pass on one process. One optimizer step uses
    micro_batch x accumulation x processes samples; the released run used 12 x 1 x 4 = 48.
    ``resume`` is ``auto`` (continue from ``output/resume.pt`` when it exists), ``never`` or the
    path of a resume file.
    """

    data: str
    output: str
    checkpoint: str | None = None
    layout: str = "auto"
    resolution: int = 512
    micro_batch: int = 12
    accumulation: int = 1
    max_steps: int = 200_000
    learning_rate: float = 1e-5
    weight_decay: float = 0.01
    seed: int = 0
    caption_dropout: float = 0.07
    save_every: int = 2000
    preview_every: int = 0
    log_every: int = 10
    mixed_precision: str = "no"
    gradient_checkpointing: bool = False
    all_inner_blocks: bool = False
    resume: str = "auto"
    num_workers: int = 0

    def validate(self) -> None:
        """Raise ValueError naming the first invalid setting."""
        if self.mixed_precision not in MIXED_PRECISION:
            raise ValueError(f"mixed_precision {self.mixed_precision!r} is invalid; use one of {MIXED_PRECISION}.")
        if self.resolution < 64 or self.resolution % 64 != 0:
            raise ValueError(f"resolution {self.resolution} is invalid; use a multiple of 64 such as 512.")
        for name in ("micro_batch", "accumulation", "max_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} {getattr(self, name)} is invalid; it must be at least 1.")
        for name in ("save_every", "preview_every", "log_every", "num_workers"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} {getattr(self, name)} is invalid; use 0 to disable or a positive number.")
        if not 0.0 <= self.caption_dropout <= 1.0:
            raise ValueError(f"caption_dropout {self.caption_dropout} is invalid; use a probability in [0, 1].")
