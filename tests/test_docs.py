"""The documentation stays true: the configuration reference matches config.py, the site builds without a
warning, and every command the README shows names a real subcommand, real config keys and real files."""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import re
import shlex
import subprocess
import sys
import typing

import pytest

from vae_hf.config import Config

from conftest import ROOT

README = ROOT / "README.md"
DOC_PAGES = sorted((ROOT / "docs").glob("*.md"))


def load_generator():
    path = ROOT / "docs" / "generate_config_reference.py"
    spec = importlib.util.spec_from_file_location("generate_config_reference", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def bash_commands(markdown: str) -> list[list[str]]:
    """Each command of the ```bash blocks as tokens: continuations joined, comments dropped, `&&` split."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", markdown, flags=re.DOTALL):
        for line in block.replace("\\\n", " ").splitlines():
            tokens = shlex.split(line, comments=True)
            while "&&" in tokens:
                cut = tokens.index("&&")
                commands.append(tokens[:cut])
                tokens = tokens[cut + 1 :]
            if tokens:
                commands.append(tokens)
    return commands


def vae_hf_arguments(tokens: list[str]) -> list[str] | None:
    """What follows `vae-hf` / `python -m vae_hf`, `train_autoencoder.py` counting as `train`; None otherwise."""
    if tokens[0] == "vae-hf":
        return tokens[1:]
    if tokens[:3] == ["python", "-m", "vae_hf"]:
        return tokens[3:]
    if "train_autoencoder.py" in tokens and tokens[0] in ("accelerate", "python"):
        return ["train", *tokens[tokens.index("train_autoencoder.py") + 1 :]]
    return None


def is_placeholder(value: str) -> bool:
    return "<" in value or "..." in value


def config_key_exists(dotted: str) -> bool:
    """Whether `dotted` (e.g. `train.max_steps`) names a leaf field of the Config dataclasses."""
    cls: object = Config
    for name in dotted.split("."):
        if not dataclasses.is_dataclass(cls):
            return False
        hints = typing.get_type_hints(cls)
        if name not in {field.name for field in dataclasses.fields(cls)}:
            return False
        cls = hints[name]
    return not dataclasses.is_dataclass(cls)


def overrides_and_config_files(arguments: list[str]) -> tuple[list[str], list[str]]:
    """The `key=value` overrides and `--config FILE` values of a train or bench command line."""
    overrides, files = [], []
    for previous, token in zip(["", *arguments], arguments, strict=False):
        if previous == "--config":
            files.append(token)
        elif "=" in token and not token.startswith("-"):
            overrides.append(token)
    return overrides, files


def launcher_config_files(tokens: list[str]) -> list[str]:
    """`--config_file FILE` of `accelerate launch`."""
    return [token for previous, token in zip(tokens, tokens[1:], strict=False) if previous == "--config_file"]


def test_configuration_reference_is_generated_from_config_py():
    committed = (ROOT / "docs" / "configuration.md").read_text(encoding="utf-8")
    stale = "docs/configuration.md is stale: run python docs/generate_config_reference.py"
    assert committed == load_generator().render(), stale


def test_configuration_reference_lists_every_key_with_its_default():
    page = load_generator().render()
    assert "| `train.max_steps` | `Optional[int]` | `null` |" in page
    assert "| `loss.disc_loss` | `str` | `lsgan` |" in page
    assert "| `seed` | `int` | `1111` |" in page


def test_site_builds_without_warnings(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "WARNING" not in output, output
    assert (tmp_path / "site" / "configuration" / "index.html").is_file()


def test_readme_links_to_docs_pages_that_exist():
    links = re.findall(r"\]\((docs/[^)#]+)", README.read_text(encoding="utf-8"))
    assert links, "the README links to no docs page"
    missing = [link for link in links if not (ROOT / link).is_file()]
    assert not missing, f"README links to missing files: {missing}"


@pytest.mark.parametrize("page", [README, *DOC_PAGES], ids=lambda path: path.relative_to(ROOT).as_posix())
def test_commands_shown_name_real_config_keys_and_files(page):
    checked = 0
    for tokens in bash_commands(page.read_text(encoding="utf-8")):
        for path in launcher_config_files(tokens):
            assert (ROOT / path).is_file(), f"{page.name}: {' '.join(tokens)}: no such file {path}"
        arguments = vae_hf_arguments(tokens)
        if not arguments or arguments[0] not in ("train", "bench"):
            continue
        overrides, files = overrides_and_config_files(arguments[1:])
        for path in files:
            if not is_placeholder(path):
                assert (ROOT / path).is_file(), f"{page.name}: {' '.join(tokens)}: no such config {path}"
        for override in overrides:
            key = override.split("=", 1)[0]
            assert config_key_exists(key), f"{page.name}: {' '.join(tokens)}: no config key {key}"
        checked += 1
    if page == README:
        assert checked >= 5, "the README's training commands were not found"


def test_every_subcommand_the_readme_shows_answers_help():
    subcommands = {
        arguments[0]
        for tokens in bash_commands(README.read_text(encoding="utf-8"))
        if (arguments := vae_hf_arguments(tokens))
    }
    assert {"train", "evaluate", "reconstruct", "interpolate", "latent-stats", "export", "push"} <= subcommands
    processes = {
        name: subprocess.Popen(
            [sys.executable, "-m", "vae_hf", name, "--help"],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for name in sorted(subcommands)
    }
    failed = {}
    for name, process in processes.items():
        output, _ = process.communicate(timeout=120)
        if process.returncode != 0:
            failed[name] = output.strip().splitlines()[-1:] if output.strip() else []
    assert not failed, f"`python -m vae_hf SUB --help` failed for: {failed}"


def test_the_command_checks_catch_a_wrong_key_and_subcommand():
    """The checks above can fail: a misspelt key, a section used as a key and a made-up file are caught."""
    assert config_key_exists("train.max_steps") and config_key_exists("seed")
    assert not config_key_exists("train.max_step")
    assert not config_key_exists("train")
    assert not config_key_exists("train.max_steps.inner")
    commands = bash_commands("```bash\nvae-hf bench --config configs/nope.yaml \\\n  trian.max_steps=3\n```\n")
    overrides, files = overrides_and_config_files(vae_hf_arguments(commands[0])[1:])
    assert overrides == ["trian.max_steps=3"] and files == ["configs/nope.yaml"]
    assert not config_key_exists("trian.max_steps") and not (ROOT / files[0]).is_file()
