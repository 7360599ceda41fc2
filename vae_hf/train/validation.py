"""Held-out evaluation during training: the starting model's scores, progress every
`train.eval_every_steps`, and the final scores and latent statistics, recorded in
`<output_dir>/metrics.json` and in the trackers."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from diffusers import AutoencoderKL
from torch.utils.data import DataLoader, Subset

from vae_hf.analysis.evaluation import ReconstructionMetrics, evaluate_vae
from vae_hf.analysis.latent_stats import latent_statistics
from vae_hf.config import Config
from vae_hf.data.buckets import assign_buckets, grouped_batches, image_sizes
from vae_hf.data.datasets import heldout_dataset
from vae_hf.data.loader import collate
from vae_hf.io.model_card import DIFFUSABILITY_RECORD
from vae_hf.train.diffusability import DiffusabilityRecorder

logger = logging.getLogger(__name__)


class Validator:
    def __init__(
        self,
        config: Config,
        accelerator: Accelerator,
        output_dir: Path,
        resumed: bool = False,
        buckets: list[tuple[int, int]] | None = None,
    ):
        """With `buckets` (`data.bucket_eval`), the scores see each held-out image in its nearest bucket, batched
        by bucket; the latent statistics and diffusability measures keep the square crops."""
        self.accelerator = accelerator
        self.path = Path(output_dir) / "metrics.json"
        # a resumed run keeps its baseline; a new run in the same folder starts a new record
        self.record: dict[str, Any] = json.loads(self.path.read_text()) if resumed and self.path.is_file() else {}
        heldout = heldout_dataset(config.data, config.seed)
        self.loader = None
        if heldout is None:
            return
        # Each process scores its own slice, without the padding a prepared loader would add;
        # torchmetrics gathers the states of all processes when the scores are computed.
        rank, world = accelerator.process_index, accelerator.num_processes
        if buckets is None:
            shard = Subset(heldout, list(range(rank, len(heldout), world)))
            self.loader = DataLoader(shard, batch_size=config.train.batch_size, collate_fn=collate)
        else:
            sizes = image_sizes(heldout.dataset, heldout.image_column)
            batches = grouped_batches(assign_buckets(sizes, buckets), buckets, config.train.batch_size, rank, world)
            self.loader = DataLoader(heldout, batch_sampler=batches, collate_fn=collate)
        self.full_loader = DataLoader(heldout, batch_size=config.train.batch_size, collate_fn=collate)
        self.metrics = ReconstructionMetrics(config.train.eval_metrics, config.loss.perceptual_pretrained)
        self.diffusability = (
            DiffusabilityRecorder(config, output_dir, self.record) if config.train.eval_diffusability else None
        )
        self.metrics.to(accelerator.device)
        if self.metrics.rfid_unavailable and accelerator.is_main_process:
            logger.warning("rFID will not be reported: %s", self.metrics.rfid_unavailable)

    @property
    def enabled(self) -> bool:
        return self.loader is not None

    @property
    def has_baseline(self) -> bool:
        return "baseline" in self.record

    def evaluate(self, models: dict[str, AutoencoderKL], step: int, label: str) -> dict[str, float]:
        """Score each model (every process must call this); returns the numbers to log, by name."""
        results = {name: evaluate_vae(vae, self.loader, self.metrics) for name, vae in models.items()}
        self.record[label] = {"step": step, **results}
        logged = {
            f"{name}/{metric}": value
            for name, scores in results.items()
            for metric, value in scores.items()
            if isinstance(value, (int, float)) and metric not in ("num_images", "images_skipped")
        }
        if self.diffusability is not None and self.accelerator.is_main_process:
            measured = self.measure_diffusability(models, step, label)
            self.record[label][DIFFUSABILITY_RECORD] = measured
            for name, scalars in measured.items():
                logged.update({f"{name}/{key}": value for key, value in scalars.items()})
        self._write()
        return logged

    def measure_diffusability(self, models: dict[str, AutoencoderKL], step: int, label: str) -> dict[str, dict]:
        """How learnable the latents are (main process, all held-out images): `vae-hf diffusability`'s measures
        1-4, and the probe when `train.diffusability_probe_steps` is set. LPIPS only with the pretrained trunk."""
        lpips_model = self.metrics.lpips_model if self.metrics.perceptual_pretrained else None
        with torch.no_grad():
            batches = list(self.latent_batches())
        return self.diffusability.measure(models, batches, lpips_model, step, label)

    def latent_statistics(self, vae: AutoencoderKL, step: int) -> dict[str, Any] | None:
        """Latent mean/std over the held-out images (main process); the factors diffusion training wants."""
        if not self.accelerator.is_main_process:
            return None
        with torch.no_grad():
            stats = latent_statistics(vae, self.latent_batches())
        self.record["latent_stats"] = {"step": step, **_plain(stats)}
        self._write()
        return self.record["latent_stats"]

    def latent_batches(self):
        """All the held-out images (not this process's slice), batch by batch: what latent statistics measure."""
        return (batch["pixel_values"] for batch in self.full_loader)

    def note(self, name: str, value: Any) -> None:
        """Record a fact about the run in metrics.json (main process), e.g. how `auto` settings were decided."""
        self.record[name] = value
        self._write()

    def summary(self) -> str:
        """One line per recorded evaluation, for the end-of-run message."""
        lines = []
        for label in ("baseline", "final"):
            scores = self.record.get(label, {}).get("eval", {})
            shown = ", ".join(f"{k} {v:.4g}" for k, v in scores.items() if isinstance(v, float))
            if shown:
                lines.append(f"{label} (step {self.record[label]['step']}): {shown}")
        return "; ".join(lines)

    def _write(self) -> None:
        if self.accelerator.is_main_process:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            staging = self.path.with_name(f".{self.path.name}.tmp-{os.getpid()}")
            staging.write_text(json.dumps(self.record, indent=2, default=str))
            os.replace(staging, self.path)


def _plain(value: Any) -> Any:
    """Tensors and tuples to JSON-friendly numbers and lists."""
    if isinstance(value, dict):
        return {key: _plain(inner) for key, inner in value.items()}
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, (list, tuple)):
        return [_plain(inner) for inner in value]
    return value
