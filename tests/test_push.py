"""`vae-hf push`: the staged upload and its model card, and the calls made at the huggingface_hub boundary.

Nothing here reaches a network: HfApi's methods and the reachability probe are replaced by recorders.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import huggingface_hub
import pytest
import torch
import yaml
from diffusers import AutoencoderKL
from huggingface_hub import HfApi
from PIL import Image

import vae_hf.io.hub as hub
import vae_hf.offline as offline
from vae_hf.cli import main
from vae_hf.io.hub import stage_upload
from vae_hf.io.single_file import save_single_file

from conftest import tiny_vae

FAKE_TOKEN = "hf_fake_secret_123"
REPO_ID = "alice/tiny-vae"
CONFIG_YAML = """\
seed: 1111
output_dir: {output_dir}
model:
  pretrained: null
  block_out_channels: [32, 64]
  train_decoder_only: false
data:
  dataset: someone/faces-256
  split: train
  resolution: 32
loss:
  reconstruction: l1
  kl_weight: 1.0e-06
  kl_reduction: sum
  perceptual_weight: 1.0
  disc_loss: hinge
  disc_weight: 0.5
  disc_start_step: 7
"""


def write_state(checkpoint: Path, global_step: int) -> None:
    checkpoint.mkdir(parents=True)
    (checkpoint / "trainer_state.json").write_text(json.dumps({"progress": {"global_step": global_step}}))


@pytest.fixture
def run_output(tmp_path: Path) -> Path:
    """A training output folder as the trainer leaves it: vae/, config.yaml, checkpoints, samples, metrics."""
    output_dir = tmp_path / "run"
    tiny_vae().save_pretrained(output_dir / "vae")
    (output_dir / "config.yaml").write_text(CONFIG_YAML.format(output_dir=output_dir))
    write_state(output_dir / "checkpoints" / "checkpoint-5", 5)
    write_state(output_dir / "checkpoints" / "checkpoint-12", 12)
    (output_dir / "checkpoints" / "checkpoint-20").mkdir()  # incomplete: no trainer_state.json yet
    (output_dir / "metrics.json").write_text(json.dumps({"psnr": 27.123456, "lpips": 0.0812}))
    (output_dir / "samples").mkdir()
    for index, name in enumerate(["step-0000012.png", "step-0000001.png"]):
        Image.new("RGB", (8, 4), (index * 200, 0, 0)).save(output_dir / "samples" / name)
        os.utime(output_dir / "samples" / name, (1_000_000 + index, 1_000_000 + index))  # step-0000001 is newest
    return output_dir


@pytest.fixture
def hub_reachable(monkeypatch):
    """Online, logged in with a fake token, HfApi replaced by recorders that capture what would be uploaded."""
    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(offline, "unreachable_reason", lambda url, timeout_s=5.0: None)
    monkeypatch.setenv("HF_TOKEN", FAKE_TOKEN)
    calls: dict[str, dict] = {}

    def create_repo(self, repo_id, **kwargs):
        calls["create_repo"] = {"repo_id": repo_id, **kwargs}

    def upload_folder(self, **kwargs):
        folder = Path(kwargs["folder_path"])
        kwargs["files"] = sorted(str(path.relative_to(folder)) for path in folder.rglob("*") if path.is_file())
        kwargs["card"] = (folder / "README.md").read_text()
        calls["upload_folder"] = kwargs

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    return calls


def front_matter(card: str) -> dict:
    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---\n")[1])


def test_staged_card_reports_recipe_data_steps_metrics_sample_and_loading_lines(run_output: Path, tmp_path: Path):
    staging = stage_upload(run_output / "vae", tmp_path / "staging", REPO_ID)
    card = (staging / "README.md").read_text()
    assert front_matter(card) == {
        "library_name": "diffusers",
        "tags": ["stable-diffusion", "vae", "autoencoder-kl", "diffusers", "vae-hf"],
        "datasets": ["someone/faces-256"],
    }  # no licence unless the user picks one
    assert CONFIG_YAML.format(output_dir=run_output).strip() in card  # the recipe, verbatim
    assert "- data: `someone/faces-256` (split `train`, 32 px)" in card
    assert "- steps trained: 12 " in card  # the newest complete checkpoint, not the incomplete checkpoint-20
    assert "l1 reconstruction + 1e-06 KL (sum) + 1.0 LPIPS + 0.5 hinge GAN from step 7" in card
    assert "| psnr | 27.12 |" in card and "| lpips | 0.0812 |" in card
    assert "![sample](samples/step-0000001.png)" in card
    assert (staging / "samples" / "step-0000001.png").is_file()
    assert f'vae = AutoencoderKL.from_pretrained("{REPO_ID}")' in card
    assert 'StableDiffusionPipeline.from_pretrained("stable-diffusion-v1-5/stable-diffusion-v1-5", vae=vae)' in card


def test_licence_flag_goes_into_the_front_matter(run_output: Path, tmp_path: Path):
    staging = stage_upload(run_output / "vae", tmp_path / "staging", REPO_ID, license_id="mit")
    assert front_matter((staging / "README.md").read_text())["license"] == "mit"


def test_staging_leaves_the_users_folder_untouched_and_writes_no_token(run_output: Path, tmp_path: Path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", FAKE_TOKEN)
    folder = run_output / "vae"
    before = {path.name: path.read_bytes() for path in folder.iterdir()}
    staging = stage_upload(folder, tmp_path / "staging", REPO_ID)
    assert {path.name: path.read_bytes() for path in folder.iterdir()} == before
    staged = [path for path in staging.rglob("*") if path.is_file()]
    assert {"config.json", "diffusion_pytorch_model.safetensors", "README.md"} <= {path.name for path in staged}
    for path in staged:
        assert FAKE_TOKEN.encode() not in path.read_bytes(), path


def test_folder_outside_a_run_still_gets_a_card_with_loading_lines(run_output: Path, tmp_path: Path):
    bare = tmp_path / "elsewhere" / "my_vae"
    bare.parent.mkdir()
    (run_output / "vae").rename(bare)
    card = (stage_upload(bare, tmp_path / "staging", REPO_ID) / "README.md").read_text()
    assert "- steps trained: not recorded" in card and "## Recipe" not in card and "## Metrics" not in card
    assert "block widths [32, 64]" in card and f'AutoencoderKL.from_pretrained("{REPO_ID}")' in card


def test_push_creates_the_repo_and_uploads_the_staged_folder(run_output: Path, hub_reachable, capsys):
    status = main(["push", "--model", str(run_output / "vae"), "--repo-id", REPO_ID, "--private"])
    assert status == 0, capsys.readouterr().err
    create, upload = hub_reachable["create_repo"], hub_reachable["upload_folder"]
    assert create == {"repo_id": REPO_ID, "private": True, "exist_ok": True}  # no token argument
    assert upload["repo_id"] == REPO_ID and "token" not in upload
    assert {"config.json", "diffusion_pytorch_model.safetensors", "README.md"} <= set(upload["files"])
    assert "samples/step-0000001.png" in upload["files"]
    assert FAKE_TOKEN not in upload["card"] and "steps trained: 12" in upload["card"]
    assert Path(upload["folder_path"]) != run_output / "vae"
    assert not Path(upload["folder_path"]).exists()  # the staging copy is cleaned up
    assert not (run_output / "vae" / "README.md").exists()
    assert REPO_ID in capsys.readouterr().out


def test_push_is_public_unless_asked(run_output: Path, hub_reachable):
    assert main(["push", "--model", str(run_output / "vae"), "--repo-id", REPO_ID]) == 0
    assert hub_reachable["create_repo"]["private"] is False


def assert_push_fails(arguments: list[str], capsys, *fragments: str) -> None:
    assert main(["push", *arguments]) == 2
    stderr = capsys.readouterr().err.strip()
    assert stderr.startswith("vae-hf: error:") and "\n" not in stderr
    for fragment in fragments:
        assert fragment in stderr
    assert FAKE_TOKEN not in stderr


def test_push_while_the_hub_is_unreachable_fails_at_once(run_output: Path, hub_reachable, monkeypatch, capsys):
    monkeypatch.setattr(
        offline, "unreachable_reason", lambda url, timeout_s=5.0: "cannot reach huggingface.co: timed out"
    )
    assert_push_fails(["--model", str(run_output / "vae"), "--repo-id", REPO_ID], capsys, "cannot reach huggingface.co")
    assert hub_reachable == {}


def test_push_in_hub_offline_mode_fails_at_once(run_output: Path, hub_reachable, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert_push_fails(["--model", str(run_output / "vae"), "--repo-id", REPO_ID], capsys, "HF_HUB_OFFLINE")
    assert hub_reachable == {}


def test_push_without_a_token_fails_at_once(run_output: Path, hub_reachable, monkeypatch, tmp_path: Path, capsys):
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(tmp_path / "no-stored-token"))
    assert huggingface_hub.get_token() is None
    assert_push_fails(["--model", str(run_output / "vae"), "--repo-id", REPO_ID], capsys, "no Hugging Face token")
    assert hub_reachable == {}


def uploaded_weights(hub_reachable: dict, monkeypatch) -> dict:
    """Make the recorder also load the VAE that would be uploaded (the staging copy is gone afterwards)."""
    record = HfApi.upload_folder

    def upload_folder(self, **kwargs):
        record(self, **kwargs)
        hub_reachable["uploaded_state"] = AutoencoderKL.from_pretrained(kwargs["folder_path"]).state_dict()

    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    return hub_reachable


def assert_same_weights(state: dict, vae) -> None:
    expected = vae.state_dict()
    assert state.keys() == expected.keys()
    for name, tensor in expected.items():
        assert torch.equal(state[name], tensor), name


def test_push_of_a_single_file_uploads_it_as_a_diffusers_folder(tmp_path: Path, hub_reachable, monkeypatch, capsys):
    vae = tiny_vae(seed=3)
    single = save_single_file(vae, tmp_path / "my-vae.safetensors")
    calls = uploaded_weights(hub_reachable, monkeypatch)
    assert main(["push", "--model", str(single), "--repo-id", REPO_ID]) == 0, capsys.readouterr().err
    upload = calls["upload_folder"]
    assert {"config.json", "diffusion_pytorch_model.safetensors", "README.md"} <= set(upload["files"])
    assert "my-vae.safetensors" not in upload["files"]  # the LDM layout is converted, not uploaded as well
    assert f'AutoencoderKL.from_pretrained("{REPO_ID}")' in upload["card"] and "block widths [32, 64]" in upload["card"]
    assert_same_weights(calls["uploaded_state"], vae)
    assert not Path(upload["folder_path"]).exists()


def test_push_of_a_hub_id_downloads_it_then_uploads_a_diffusers_folder(
    tmp_path: Path, hub_reachable, monkeypatch, capsys
):
    vae = tiny_vae(seed=4)
    vae.save_pretrained(tmp_path / "downloaded")
    downloads = []
    load = AutoencoderKL.from_pretrained.__func__

    def from_pretrained(cls, source, **kwargs):  # stands in for the Hub download
        if source == "someone/their-vae":
            downloads.append(source)
            source = str(tmp_path / "downloaded")
        return load(cls, source, **kwargs)

    monkeypatch.setattr(AutoencoderKL, "from_pretrained", classmethod(from_pretrained))
    calls = uploaded_weights(hub_reachable, monkeypatch)
    assert main(["push", "--model", "someone/their-vae", "--repo-id", REPO_ID]) == 0, capsys.readouterr().err
    assert downloads == ["someone/their-vae"] and calls["upload_folder"]["repo_id"] == REPO_ID
    assert_same_weights(calls["uploaded_state"], vae)


def test_push_of_a_hub_id_while_offline_fails_at_once_before_any_download(hub_reachable, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert_push_fails(["--model", "someone/their-vae", "--repo-id", REPO_ID], capsys, "HF_HUB_OFFLINE")
    assert hub_reachable == {}


def test_push_refuses_what_is_not_a_vae(tmp_path: Path, hub_reachable, capsys):
    assert_push_fails(["--model", str(tmp_path), "--repo-id", REPO_ID], capsys, "diffusers folder")
    (tmp_path / "notes.txt").write_text("not a model")
    assert_push_fails(["--model", str(tmp_path / "notes.txt"), "--repo-id", REPO_ID], capsys, "Hub model id")
    assert_push_fails(["--model", str(tmp_path / "missing.safetensors"), "--repo-id", REPO_ID], capsys, "--model")
    (tmp_path / "junk.safetensors").write_bytes(b"not safetensors")
    assert_push_fails(["--model", str(tmp_path / "junk.safetensors"), "--repo-id", REPO_ID], capsys, "--model")
    assert hub_reachable == {}


def test_push_refuses_a_repo_id_without_owner(run_output: Path, hub_reachable, capsys):
    assert_push_fails(["--model", str(run_output / "vae"), "--repo-id", "tiny-vae"], capsys, "OWNER/NAME")


def test_hub_refusal_is_one_line(run_output: Path, hub_reachable, monkeypatch, capsys):
    def refuse(self, repo_id, **kwargs):
        raise OSError("403 Forbidden: you cannot write to alice\nrequest id: abc")

    monkeypatch.setattr(HfApi, "create_repo", refuse)
    assert_push_fails(["--model", str(run_output / "vae"), "--repo-id", REPO_ID], capsys, "403 Forbidden")


def test_training_with_push_to_hub_uploads_the_vae_at_the_end(image_folder, tmp_path, monkeypatch):
    """train.push_to_hub: checked before any compute, uploaded at the end through huggingface_hub."""
    import vae_hf.io.hub as hub
    from vae_hf.config import load_config
    from vae_hf.train.trainer import Trainer

    from conftest import tiny_overrides

    calls = []
    monkeypatch.setattr(offline, "unreachable_reason", lambda url, timeout_s=5.0: None)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.setattr(hub.huggingface_hub, "get_token", lambda: "hf_fake_secret_123")
    monkeypatch.setattr(hub.HfApi, "create_repo", lambda self, repo_id, **kw: calls.append(("create", repo_id, kw)))
    monkeypatch.setattr(
        hub.HfApi,
        "upload_folder",
        lambda self, repo_id, folder_path, **kw: calls.append(("upload", repo_id, sorted(os.listdir(folder_path)))),
    )
    overrides = {
        "train.push_to_hub": "true",
        "train.hub_repo_id": "someone/tiny-vae",
        "train.hub_private": "true",
        "loss.disc_weight": 0,
        "train.max_steps": 1,
    }
    Trainer(load_config(None, tiny_overrides(image_folder, tmp_path / "run", **overrides))).train()
    assert calls[0] == ("create", "someone/tiny-vae", {"private": True, "exist_ok": True})
    assert calls[1][0:2] == ("upload", "someone/tiny-vae")
    assert {"config.json", "diffusion_pytorch_model.safetensors", "README.md"} <= set(calls[1][2])


def test_push_at_every_export_pushes_each_epoch_once(image_folder, tmp_path, monkeypatch):
    from vae_hf.config import load_config
    from vae_hf.train.trainer import Trainer

    from conftest import tiny_overrides

    pushed = []
    monkeypatch.setattr(hub, "require_push_access", lambda: None)
    monkeypatch.setattr("vae_hf.train.trainer.require_push_access", lambda: None)
    monkeypatch.setattr(
        "vae_hf.train.reporting.push_vae_folder",
        lambda folder, repo_id, private, commit_message: pushed.append(commit_message),
    )
    overrides = {
        "train.push_to_hub": "true",
        "train.hub_repo_id": "someone/tiny-vae",
        "train.hub_push_every_export": "true",
        "loss.disc_weight": 0,
        "train.max_steps": "null",
        "train.num_epochs": 2,
        "train.batch_size": 4,
    }
    Trainer(load_config(None, tiny_overrides(image_folder, tmp_path / "run", **overrides))).train()
    assert pushed == ["vae-hf: step 2", "vae-hf: step 4"]  # 8 images, batches of 4: 2 steps an epoch


def test_push_to_hub_without_access_fails_before_training(image_folder, tmp_path, monkeypatch):
    from vae_hf.config import load_config
    from vae_hf.train.trainer import Trainer

    from conftest import tiny_overrides

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.setattr(
        offline, "unreachable_reason", lambda url, timeout_s=5.0: "cannot reach huggingface.co: offline"
    )
    overrides = {"train.push_to_hub": "true", "train.hub_repo_id": "someone/tiny-vae"}
    with pytest.raises(offline.OfflineError, match="pushing needs the Hugging Face Hub"):
        Trainer(load_config(None, tiny_overrides(image_folder, tmp_path / "run", **overrides)))
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("typo", ["outputs/demo/vea", "outputs/vea"])
def test_a_mistyped_local_model_is_named_before_the_hub_is_contacted(
    typo, tmp_path, hub_reachable, monkeypatch, capsys
):
    """The README promises local input is checked first; the typo used to read "cannot reach huggingface.co"."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "outputs" / "demo" / "vae").mkdir(parents=True)
    probed = []
    monkeypatch.setattr(offline, "unreachable_reason", lambda url, timeout_s=5.0: probed.append(url) or "timed out")
    assert_push_fails(["--model", typo, "--repo-id", REPO_ID], capsys, f"--model: no such file or folder {typo}")
    assert probed == [] and hub_reachable == {}
