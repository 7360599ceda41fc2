"""The command line answers bad arguments before importing the heavy libraries, and offers the choices the
modules implement."""

import subprocess
import sys

from conftest import ROOT

CHECK = """
import sys
from vae_hf.cli import main, train_main
statuses = [
    main(["push", "--model", "somewhere", "--repo-id", "no-owner"]),
    train_main(["model.no_such_key=1"]),
]
print(statuses, "torch" in sys.modules, "diffusers" in sys.modules)
"""


def test_bad_arguments_are_refused_before_torch_is_imported():
    result = subprocess.run([sys.executable, "-c", CHECK], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "[2, 2] False False"
    errors = result.stderr.strip().splitlines()
    assert errors[0].startswith("vae-hf: error: --repo-id must be OWNER/NAME")
    assert errors[1].startswith("vae-hf: error: model.no_such_key")


def test_the_command_line_offers_the_choices_the_modules_implement():
    """Each choice is defined once (vae_hf.config); the parsers offer exactly those, and every one exists."""
    import torch

    from vae_hf.cli import build_parser
    from vae_hf.io.single_file import DTYPES

    parser = build_parser()
    for dtype in DTYPES:  # each precision `export` offers is a torch dtype it can write
        assert parser.parse_args(["export", "--model", "m", "--single-file", "f", "--dtype", dtype]).dtype == dtype
        assert isinstance(DTYPES[dtype], torch.dtype)
    args = parser.parse_args(["evaluate", "--model", "m", "--data", "d"])
    assert args.metrics == "psnr,ssim,lpips,rfid"


def test_under_torchrun_the_launchers_failure_summary_names_the_reason():
    """`accelerate launch` with several processes runs torchrun, whose summary (printed last) read "To enable
    traceback see ..." for a run refused with one line: the reason was buried above the launcher's traceback."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    result = subprocess.run(
        [*command, "train_autoencoder.py", "train.max_steps"], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert result.returncode != 0
    summary = result.stderr[result.stderr.rindex("Root Cause") :]
    reason = "vae-hf: error: train.max_steps: no value given"
    assert f"traceback : {reason}" in summary, result.stderr[-3000:]


def test_the_error_file_holds_the_one_line_reason_as_torch_reads_it(tmp_path, monkeypatch):
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure

    from vae_hf.cli import train_main

    monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(tmp_path / "error.json"))
    assert train_main(["model.block_out_channels=32,64"]) == 2
    failure = ProcessFailure(local_rank=0, pid=1, exitcode=2, error_file=str(tmp_path / "error.json"))
    assert failure.message == "vae-hf: error: model.block_out_channels: a list is written in brackets: " + (
        "model.block_out_channels=[32,64]"
    )
    assert failure.message in ChildFailedError("train_autoencoder.py", {0: failure}).format_msg()
