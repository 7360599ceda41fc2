"""`vae-hf evaluate`: PSNR, SSIM, LPIPS and rFID of reconstructions, a row per model."""

from __future__ import annotations

from pathlib import Path

from vae_hf.analysis.evaluation import (
    EvaluationRequest,
    evaluate_models,
    format_table,
    write_report,
)


def run_evaluation(request: EvaluationRequest) -> int:
    """`vae-hf evaluate`: score every model, write the JSON report if asked, print the Markdown table."""
    report = evaluate_models(request)
    if request.out is not None:
        write_report(report, Path(request.out))
    print(format_table(report))
    return 0
