"""`vae-hf bench` runs on a CPU in seconds on a tiny config and writes its JSON (speed is reported,
never asserted)."""

import json
import subprocess
import sys

from conftest import ROOT, tiny_overrides, write_images


def test_bench_writes_its_report(tmp_path):
    images = tmp_path / "images"
    write_images(images, 16)
    out = tmp_path / "bench.json"
    overrides = tiny_overrides(images, tmp_path / "unused", **{"train.max_steps": 1})
    result = subprocess.run(
        [sys.executable, "-m", "vae_hf", "bench", *overrides, "--steps", "3", "--warmup", "1", "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text())
    for name in ("trainer_disc_off", "trainer_disc_on", "bare_disc_off", "bare_disc_on"):
        assert report[name]["s_per_step"] > 0 and report[name]["images_per_s"] > 0
    assert report["overhead_disc_on"] == report["trainer_disc_on"]["s_per_step"] / report["bare_disc_on"]["s_per_step"]
    assert report["flops_per_step_disc_on"] > 0
    assert report["mfu_disc_on"] is None and report["device"] == "cpu"  # a CPU's peak is not guessed
    assert report["data_loader"]["images_per_s"] > 0 and report["peak_memory_mb"]["process_max_rss"] > 0
    assert "| trainer / bare |" in result.stdout
