"""`vae-hf bench`: the trainer against its floor, memory, MFU and data loading."""

from __future__ import annotations

import json
from pathlib import Path

from vae_hf.config import load_config
from vae_hf.perf.benchmark import benchmark, markdown, require_a_measurement


def bench_command(
    config_path: str | None,
    overrides: list[str],
    steps: int,
    warmup: int,
    out: str | None,
    peak_tflops: float | None,
    speed: bool = True,
    memory: bool = False,
    memory_budget_gb: float | None = None,
    loader: bool = False,
) -> int:
    require_a_measurement(speed, memory, loader)  # before the config and the models are loaded
    config = load_config(config_path, overrides)
    report = benchmark(config, steps, warmup, peak_tflops, speed, memory, memory_budget_gb, loader)
    print(markdown(report))
    if out:
        Path(out).write_text(json.dumps(report, indent=2))
    return 0
