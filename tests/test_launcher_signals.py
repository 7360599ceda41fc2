"""SIGTERM to the launcher ends every trainer process with a saved checkpoint and leaves no process behind:
`docker stop`, a pod eviction and most preemptions signal the launcher (the container's first process), not the
trainer. Under `accelerate launch` alone the trainer of a one-process run asks the kernel for SIGTERM when its
launcher dies; under `vae-hf supervise` (the Docker image's entrypoint) the whole job hears the signal and the
supervisor exits with 143 once every process has saved and exited."""

import os
import signal
import subprocess
import time

import psutil
import pytest
from test_distributed import ACCELERATE

from conftest import ROOT, tiny_overrides


@pytest.mark.parametrize(
    ("supervised", "processes", "status"),
    [(False, 1, -signal.SIGTERM), (True, 1, 143), (True, 2, 143)],
    ids=["accelerate-launch-1-process", "supervised-1-process", "supervised-2-processes"],
)
def test_sigterm_to_the_launcher_saves_a_checkpoint_and_leaves_no_process(
    image_folder, tmp_path, supervised, processes, status
):
    launcher = [*ACCELERATE, "--num_processes", str(processes), "--num_machines", "1", "--mixed_precision", "no"]
    launcher += ["--dynamo_backend", "no", *(["--multi_gpu"] if processes > 1 else [])]
    if supervised:
        launcher = ["vae-hf", "supervise", "--", *launcher]
    run = tmp_path / "run"
    overrides = {"train.max_steps": 100_000, "train.sample_every_steps": 1, "loss.perceptual_weight": 0}
    command = [*launcher, "train_autoencoder.py", *tiny_overrides(image_folder, run, **overrides)]
    log = (tmp_path / "log.txt").open("w")
    job = subprocess.Popen(
        command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "ACCELERATE_USE_CPU": "true"}
    )
    try:
        deadline = time.monotonic() + 240
        while len(list((run / "samples").glob("*.png"))) < 3:  # training is under way: three steps done
            assert job.poll() is None and time.monotonic() < deadline, (tmp_path / "log.txt").read_text()[-3000:]
            time.sleep(0.2)
        family = psutil.Process(job.pid).children(recursive=True)
        job.send_signal(signal.SIGTERM)
        assert job.wait(timeout=120) == status
        _, left = psutil.wait_procs(family, timeout=60)
        assert left == [], f"processes left running: {left}"
    finally:
        for process in psutil.Process(job.pid).children(recursive=True) if job.poll() is None else []:
            process.kill()
        job.kill()
    output = (tmp_path / "log.txt").read_text()
    assert "vae-hf: stopped by SIGTERM at step" in output, output[-3000:]
    step = int(output.split("vae-hf: stopped by SIGTERM at step ")[1].split(";")[0])
    assert (run / "checkpoints" / f"checkpoint-{step}" / "trainer_state.json").is_file()
