"""How far a run has come: the counters a checkpoint stores and a resume restores."""

from __future__ import annotations

from dataclasses import asdict, dataclass


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
    images_skipped: int = 0
    """Images that could not be decoded."""
    steps_skipped: int = 0
    """VAE updates skipped for non-finite gradients."""
    disc_steps_skipped: int = 0
    """Discriminator updates skipped for non-finite gradients."""

    def state_dict(self) -> dict[str, int]:
        return asdict(self)

    def load_state_dict(self, state: dict[str, int]) -> None:
        for key in asdict(self):
            setattr(self, key, int(state[key]))
