"""The Dockerfile can be checked without a Docker engine: what it copies exists, and it runs the
trainer as a non-root user with the Hub cache on a volume."""

import re

from conftest import ROOT

DOCKERFILE = (ROOT / "Dockerfile").read_text()


def instructions(name: str) -> list[str]:
    return [line[len(name) :].strip() for line in DOCKERFILE.splitlines() if line.startswith(name + " ")]


def test_every_copied_path_exists_and_is_not_docker_ignored():
    ignored = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines() if line.strip()}
    for sources in (copy.split()[:-1] for copy in instructions("COPY")):
        for source in sources:
            assert (ROOT / source).exists(), source
            assert source not in ignored, source


def test_it_builds_on_a_cuda_pytorch_base_and_installs_the_package():
    (base,) = instructions("FROM")
    assert base.startswith("pytorch/pytorch:") and "cuda" in base
    assert any(re.search(r"pip install .*\s\"?\.(\[[a-z,]+\])?\"?(\s|$)", run) for run in instructions("RUN"))


def test_it_trains_as_a_non_root_user_with_the_hub_cache_on_a_volume():
    (user,) = instructions("USER")
    assert user not in ("root", "0")
    assert any("huggingface" in volume for volume in instructions("VOLUME"))
    (entrypoint,) = instructions("ENTRYPOINT")
    # the supervisor first: docker stop's SIGTERM must reach the trainers (tests/test_launcher_signals.py)
    assert entrypoint == '["vae-hf", "supervise", "--", "accelerate", "launch", "train_autoencoder.py"]'
