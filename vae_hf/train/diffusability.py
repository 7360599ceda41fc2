"""The diffusability measures during training: at each held-out evaluation, measures 1-4 of `vae-hf
diffusability` (and the probe with `train.diffusability_probe_steps`) on the held-out images, logged beside
PSNR/LPIPS and written to `<output_dir>/diffusability/` (table.md and spectra.png, which the model card shows)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from vae_hf.analysis.diffusability_report import diffusability_of, format_table, spectra_chart
from vae_hf.analysis.diffusion_probe import ProbeConfig
from vae_hf.config import Config
from vae_hf.io.model_card import DIFFUSABILITY_DIR, DIFFUSABILITY_RECORD


class DiffusabilityRecorder:
    """Measures the models of one evaluation and keeps the table and the spectra of every evaluation so far."""

    def __init__(self, config: Config, output_dir: Path, record: dict[str, Any] | None = None):
        """`record`: a resumed run's metrics.json, whose earlier evaluations stay in the table (their spectra are
        not kept there, so the chart starts with this process's evaluations)."""
        self.folder = Path(output_dir) / DIFFUSABILITY_DIR
        train = config.train
        self.seed = config.seed
        self.probe = None
        if train.diffusability_probe_steps:
            self.probe = ProbeConfig(
                steps=train.diffusability_probe_steps,
                width=train.diffusability_probe_width,
                seed=config.seed,
                fid_samples=0,  # FID needs many samples and Inception: `vae-hf diffusability` measures it
            )
        self.rows: dict[str, tuple[str, dict[str, Any], dict[str, Any] | None]] = {}
        for label in ("baseline", "latest", "final"):  # metrics.json's evaluations, in order
            evaluation = (record or {}).get(label, {})
            for name, scalars in evaluation.get(DIFFUSABILITY_RECORD, {}).items():
                self.rows[f"{label}/{name}"] = (f"{name}, step {evaluation['step']} ({label})", scalars, None)

    def measure(
        self,
        models: dict[str, nn.Module],
        batches: list[torch.Tensor],
        lpips_model: nn.Module | None,
        step: int,
        label: str,
    ) -> dict[str, dict[str, float]]:
        """The scalars of each model, by model name (`eval`, `eval_ema`); writes table.md and spectra.png."""
        measured = {}
        if label == "final":  # the final evaluation supersedes the latest progress row
            self.rows = {key: row for key, row in self.rows.items() if not key.startswith("latest/")}
        for name, vae in models.items():
            result = diffusability_of(vae, batches, self.probe, lpips_model, seed=self.seed)
            measured[name] = result["scalars"]
            self.rows[f"{label}/{name}"] = (f"{name}, step {step} ({label})", result["scalars"], result["spectrum"])
        self.write()
        return measured

    def write(self) -> None:
        """The table of every evaluation recorded so far (a later "latest" replaces the earlier one)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        rows = list(self.rows.values())
        (self.folder / "table.md").write_text(format_table([(label, scalars) for label, scalars, _ in rows]) + "\n")
        spectra = [(label, spectrum) for label, _, spectrum in rows if spectrum is not None]
        if spectra:
            spectra_chart(spectra).save(self.folder / "spectra.png")
