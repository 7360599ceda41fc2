"""The trainer's checkpoint side: what a checkpoint holds beyond Accelerate's state, saving it,
resuming from it, and the two ways a run stops early with its state saved (a signal, divergence).

A mixin of `Trainer`: it reads the trainer's players, progress, EMA and checkpointer.
"""

from __future__ import annotations

from pathlib import Path

from vae_hf.checkpointing import checkpoint_layout, model_shape, read_tensors
from vae_hf.ema import EMA
from vae_hf.errors import UserError
from vae_hf.zero import ZeroPlayer


class TrainingDiverged(UserError, RuntimeError):
    """Too many consecutive non-finite steps; the state was saved before stopping."""


class CheckpointingMixin:
    @property
    def model_shape(self) -> dict:
        loss = self.config.loss
        disc = (
            None
            if self.disc_player is None
            else {"channels": loss.disc_channels, "num_layers": loss.disc_num_layers, "norm": loss.disc_norm}
        )
        return model_shape(dict(self.vae.config), disc)

    def state_dict(self) -> dict:
        """What Accelerate's save_state does not hold: counters, data position, schedules, scalers."""
        players = {"vae": self.vae_player, "discriminator": self.disc_player}
        return {
            "num_processes": self.accelerator.num_processes,
            "layout": checkpoint_layout(self.accelerator),
            "progress": self.progress.state_dict(),
            "schedulers": {name: p.scheduler.state_dict() for name, p in players.items() if p is not None},
            "scalers": {name: p.scaler.state_dict() for name, p in players.items() if p is not None and p.scaler},
            "ema": None if self.ema is None else self.ema.state_dict()[1],
        }

    def load_state_dict(self, state: dict) -> None:
        self.progress.load_state_dict(state["progress"])
        players = {"vae": self.vae_player, "discriminator": self.disc_player}
        for name, scheduler_state in state["schedulers"].items():
            players[name].scheduler.load_state_dict(scheduler_state)
        for name, scaler_state in state["scalers"].items():
            if players[name].scaler is not None:
                players[name].scaler.load_state_dict(scaler_state)

    def process_state_dict(self) -> dict:
        """What differs between processes: each rank's position in its shard of a stream."""
        return {"stream": self.dataloader.state_dict() if self.streaming else None}

    def _zero_players(self) -> dict[str, ZeroPlayer]:
        """DeepSpeed's players by the suffix of their checkpoint files (as Accelerate names models)."""
        players = {"": self.vae_player, "_1": self.disc_player}
        return {suffix: player for suffix, player in players.items() if isinstance(player, ZeroPlayer)}

    def save_checkpoint(self) -> Path:
        self._settle_nonfinite()
        tensors = {} if self.ema is None else {"ema": self.ema.state_dict()[0]}
        for suffix, player in self._zero_players().items():  # every process joins the gathers
            tensors[f"model{suffix}"], tensors[f"optimizer{suffix}"] = player.state_tensors()
        path = self.checkpointer.save(
            self.progress.global_step, self.state_dict(), self.model_shape, self.process_state_dict(), tensors
        )
        self.last_checkpoint_step = self.progress.global_step
        return path

    def resume(self, resume_from: str) -> None:
        path = self.checkpointer.resolve(resume_from)
        if path is None:
            if self.is_main:
                print(f"vae-hf: no checkpoint in {self.checkpointer.folder} yet; starting a new run", flush=True)
            return
        state, process_state = self.checkpointer.load(path, self.model_shape)
        self.load_state_dict(state)
        for suffix, player in self._zero_players().items():
            player.load_state_tensors(read_tensors(path, f"model{suffix}"), read_tensors(path, f"optimizer{suffix}"))
        if self.ema is not None:
            if state.get("ema") is None:  # EMA switched on for a run that had none: start it from here
                self.ema = EMA(self.vae, self.config.train.ema_decay)
            else:
                self.ema.load_state_dict(read_tensors(path, "ema"), state["ema"])
        if self.streaming and self.progress.batches_in_epoch > 0:
            self._stream_position = process_state["stream"]
        if self.is_main:
            print(
                f"vae-hf: resumed from {path} at step {self.progress.global_step} (epoch {self.progress.epoch}, "
                f"batch {self.progress.batches_in_epoch})",
                flush=True,
            )

    def _stop_diverged(self) -> None:
        path = self.save_checkpoint()
        raise TrainingDiverged(
            f"{self.consecutive_nonfinite} optimizer steps in a row had non-finite gradients "
            f"(step {self.progress.global_step}); "
            f"stopped instead of training on garbage. State saved to {path}: lower optim.lr, set optim.max_grad_norm, "
            f"or use train.mixed_precision=bf16, then resume with train.resume_from=latest"
        )

    def _stop_for_signal(self) -> Path:
        path = self.save_checkpoint()
        self.accelerator.end_training()
        if self.is_main:
            print(
                f"vae-hf: stopped by {self.stop_signal} at step {self.progress.global_step}; state saved to {path}. "
                f"Resume with: train.resume_from=latest (same config and output_dir)",
                flush=True,
            )
        return path
