"""Resolution stages (`train.stages`): which resolution, batch size and accumulation hold at each optimizer step."""

from __future__ import annotations

import math
from dataclasses import dataclass

from vae_hf.config import Config


@dataclass(frozen=True)
class Stage:
    number: int
    """0 for the first stage."""
    start_step: int
    """The optimizer step it starts at."""
    until_step: int | None
    """The step the next stage starts at; None: the last stage, which holds until the run's end."""
    resolution: int
    batch_size: int
    gradient_accumulation_steps: int

    def describe(self) -> str:
        return (
            f"stage {self.number + 1} from step {self.start_step}: {self.resolution} px, batch {self.batch_size} x "
            f"{self.gradient_accumulation_steps} accumulated"
        )


def training_stages(config: Config) -> list[Stage]:
    """The run's stages with the run's own settings where a stage leaves them null; one stage without
    `train.stages`. The last stage holds until the run's end."""
    data, train = config.data, config.train
    configured = train.stages or [None]
    stages, start = [], 0
    for number, stage in enumerate(configured):
        last = number == len(configured) - 1

        def setting(name: str, default: int, stage=stage) -> int:
            value = None if stage is None else getattr(stage, name)
            return default if value is None else value

        stages.append(
            Stage(
                number,
                start,
                None if last else stage.until_step,
                setting("resolution", data.resolution),
                setting("batch_size", train.batch_size),
                setting("gradient_accumulation_steps", train.gradient_accumulation_steps),
            )
        )
        start = None if last else stage.until_step
    return stages


def stage_at(stages: list[Stage], step: int) -> Stage:
    """The stage that trains optimizer step `step + 1` (the one after `step` steps are done)."""
    return next(stage for stage in stages if stage.until_step is None or step < stage.until_step)


def position_in(batches_done: int, old: Stage, new: Stage) -> int:
    """An epoch's position carried into a new stage: the batches of the new size that cover the images the old
    batches took (rounded up, so no image is trained on twice in the epoch)."""
    return math.ceil(batches_done * old.batch_size / new.batch_size)
