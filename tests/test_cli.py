"""The command line answers bad arguments before importing the heavy libraries, and its hard-coded choices
match the modules that implement them."""

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


def test_hard_coded_choices_match_their_modules():
    from vae_hf.cli import EXPORT_DTYPES, build_parser
    from vae_hf.evaluation import METRIC_NAMES
    from vae_hf.single_file import DTYPES

    assert set(EXPORT_DTYPES) == set(DTYPES)
    args = build_parser().parse_args(["evaluate", "--model", "m", "--data", "d"])
    assert args.metrics.split(",") == list(METRIC_NAMES)
