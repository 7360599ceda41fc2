"""How far a run has come: the counters a checkpoint stores and a resume restores."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class TrainProgress:
    global_step: int = 0
    """Optimizer steps done."""
    micro_step: int = 0
    """Micro-batches trained on (it seeds the posterior noise of the next one)."""
    epoch: int = 0
    """Completed passes over the data."""
    batches_in_epoch: int = 0
    """Batches of the current epoch already consumed: where a resumed run picks the data up."""
    unreadable_files: set[int] = field(default_factory=set)
    """Keys (`file_key`) of the files that could not be decoded, met by any process: each is counted once."""
    steps_skipped: int = 0
    """VAE updates skipped for non-finite gradients."""
    disc_steps_skipped: int = 0
    """Discriminator updates skipped for non-finite gradients."""

    @property
    def images_skipped(self) -> int:
        """Unreadable files met so far (each once, however many epochs met it)."""
        return len(self.unreadable_files)

    def state_dict(self) -> dict[str, Any]:
        state = asdict(self)
        state["unreadable_files"] = sorted(self.unreadable_files)
        state["images_skipped"] = self.images_skipped  # for people reading trainer_state.json
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key in asdict(self):
            if key == "unreadable_files":  # absent from checkpoints of older versions: found again as met
                self.unreadable_files = set(state.get(key, ()))
            else:
                setattr(self, key, int(state[key]))
