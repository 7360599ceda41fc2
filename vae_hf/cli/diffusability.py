"""`vae-hf diffusability`: how learnable each VAE's latents are, a Markdown row per model, JSON and PNG charts."""

from __future__ import annotations

from vae_hf.analysis.diffusability_report import DiffusabilityRequest, compare_models, report_table


def diffusability_command(request: DiffusabilityRequest) -> int:
    """Measure every model on the same images, print the table; `--out` and `--plots` are written as it goes."""
    report = compare_models(request)
    print(report_table(report))
    for name, path in report.get("plots", {}).items():
        print(f"{name}: {path}")
    if request.out is not None:
        print(f"results: {request.out}")
    return 0
