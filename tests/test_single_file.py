"""Single-file export in the LDM layout (ComfyUI, A1111) and its offline import through `load_vae`."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from vae_hf.cli import main
from vae_hf.io.single_file import LDM_PREFIX, save_single_file
from vae_hf.models.vae import ModelLoadError, load_vae

from conftest import ROOT
from conftest import tiny_vae as conftest_tiny_vae


def tiny_vae(widths=(32, 64), norm_num_groups: int = 32, seed: int = 0) -> AutoencoderKL:
    return conftest_tiny_vae(seed, widths, norm_num_groups).eval()


def reconstruct(vae: AutoencoderKL, images: torch.Tensor) -> torch.Tensor:
    """Deterministic encode -> posterior mode -> decode, exercising every tensor of the VAE."""
    with torch.no_grad():
        return vae.decode(vae.encode(images).latent_dist.mode()).sample


def images(seed: int = 1) -> torch.Tensor:
    return torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def ldm_reference_shapes(widths: tuple[int, ...], layers: int, latent: int) -> dict[str, tuple[int, ...]]:
    """Every tensor of the LDM first stage, written from LDM's Encoder/Decoder construction, not from diffusers."""
    shapes: dict[str, tuple[int, ...]] = {}

    def conv(name: str, out: int, inp: int, kernel: int) -> None:
        shapes[f"{name}.weight"], shapes[f"{name}.bias"] = (out, inp, kernel, kernel), (out,)

    def norm(name: str, channels: int) -> None:
        shapes[f"{name}.weight"], shapes[f"{name}.bias"] = (channels,), (channels,)

    def resnet(name: str, inp: int, out: int) -> None:
        norm(f"{name}.norm1", inp)
        conv(f"{name}.conv1", out, inp, 3)
        norm(f"{name}.norm2", out)
        conv(f"{name}.conv2", out, out, 3)
        if inp != out:
            conv(f"{name}.nin_shortcut", out, inp, 1)

    def mid(part: str, channels: int) -> None:
        resnet(f"{part}.mid.block_1", channels, channels)
        norm(f"{part}.mid.attn_1.norm", channels)
        for projection in ("q", "k", "v", "proj_out"):  # 1x1 convs in LDM
            conv(f"{part}.mid.attn_1.{projection}", channels, channels, 1)
        resnet(f"{part}.mid.block_2", channels, channels)

    conv("encoder.conv_in", widths[0], 3, 3)
    channels = widths[0]
    for level, width in enumerate(widths):
        for block in range(layers):
            resnet(f"encoder.down.{level}.block.{block}", channels, width)
            channels = width
        if level != len(widths) - 1:
            conv(f"encoder.down.{level}.downsample.conv", width, width, 3)
    mid("encoder", channels)
    norm("encoder.norm_out", channels)
    conv("encoder.conv_out", 2 * latent, channels, 3)
    # The decoder is built from the lowest resolution up, but `up` is indexed by resolution level.
    conv("decoder.conv_in", channels, latent, 3)
    mid("decoder", channels)
    for level in reversed(range(len(widths))):
        for block in range(layers + 1):
            resnet(f"decoder.up.{level}.block.{block}", channels, widths[level])
            channels = widths[level]
        if level != 0:
            conv(f"decoder.up.{level}.upsample.conv", channels, channels, 3)
    norm("decoder.norm_out", channels)
    conv("decoder.conv_out", 3, channels, 3)
    conv("quant_conv", 2 * latent, 2 * latent, 1)
    conv("post_quant_conv", latent, latent, 1)
    return shapes


def file_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    with safe_open(str(path), framework="pt") as file:
        return {key: tuple(file.get_slice(key).get_shape()) for key in file.keys()}


def test_export_writes_every_sd_vae_tensor_under_its_ldm_name_and_shape(tmp_path: Path):
    widths = (128, 256, 512, 512)
    vae = AutoencoderKL(
        block_out_channels=widths,
        layers_per_block=2,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=4,
    )
    path = save_single_file(vae, tmp_path / "sd_vae.safetensors", dtype="fp16")

    expected = ldm_reference_shapes(widths, layers=2, latent=4)
    found = file_shapes(path)
    assert len(expected) == 248  # the tensor count of the original SD VAE checkpoints
    assert sorted(found) == sorted(expected)
    assert found == expected
    assert found["encoder.mid.attn_1.q.weight"] == (512, 512, 1, 1)


def test_fp32_round_trip_through_load_vae_reproduces_the_outputs(tmp_path: Path):
    vae = tiny_vae()
    path = save_single_file(vae, tmp_path / "vae.safetensors")
    loaded = load_vae(str(path)).eval()
    assert list(loaded.config.block_out_channels) == [32, 64]
    assert loaded.config.layers_per_block == 1 and loaded.config.latent_channels == 4
    torch.testing.assert_close(reconstruct(loaded, images()), reconstruct(vae, images()), atol=1e-6, rtol=0)


def test_fp16_export_is_fp16_on_disk_and_close_after_loading(tmp_path: Path):
    vae = tiny_vae()
    path = save_single_file(vae, tmp_path / "vae_fp16.safetensors", dtype="fp16")
    with safe_open(str(path), framework="pt") as file:
        header = file.metadata()
        assert file.get_tensor("decoder.conv_out.weight").dtype == torch.float16
    assert header["dtype"] == "fp16" and header["layout"] == "ldm" and header["format"] == "pt"
    loaded = load_vae(str(path)).eval()
    expected = reconstruct(vae, images())
    assert not torch.equal(reconstruct(loaded, images()), expected)  # it really went through fp16
    torch.testing.assert_close(reconstruct(loaded, images()), expected, atol=2e-2, rtol=0)


def test_first_stage_model_prefix_is_written_and_loads(tmp_path: Path):
    vae = tiny_vae()
    path = save_single_file(vae, tmp_path / "prefixed.safetensors", prefix=True)
    assert all(key.startswith(LDM_PREFIX) for key in file_shapes(path))
    loaded = load_vae(str(path)).eval()
    torch.testing.assert_close(reconstruct(loaded, images()), reconstruct(vae, images()), atol=1e-6, rtol=0)


def test_vae_is_taken_out_of_a_whole_checkpoint(tmp_path: Path):
    vae = tiny_vae()
    path = save_single_file(vae, tmp_path / "prefixed.safetensors", prefix=True)
    checkpoint = load_file(path)
    checkpoint["model.diffusion_model.input_blocks.0.0.weight"] = torch.zeros(4, 4)  # the UNet's, not the VAE's
    save_file(checkpoint, tmp_path / "whole.safetensors")
    loaded = load_vae(str(tmp_path / "whole.safetensors")).eval()
    torch.testing.assert_close(reconstruct(loaded, images()), reconstruct(vae, images()), atol=1e-6, rtol=0)


def test_file_with_diffusers_key_names_loads(tmp_path: Path):
    vae = tiny_vae()
    save_file(
        {key: tensor.contiguous() for key, tensor in vae.state_dict().items()}, tmp_path / "diffusers.safetensors"
    )
    loaded = load_vae(str(tmp_path / "diffusers.safetensors")).eval()
    torch.testing.assert_close(reconstruct(loaded, images()), reconstruct(vae, images()), atol=1e-6, rtol=0)


def test_group_norm_groups_come_back_from_the_header(tmp_path: Path):
    # 16 groups cannot be read off any shape, and LDM's default of 32 would not even divide width 16.
    vae = tiny_vae(widths=(16, 32), norm_num_groups=16)
    path = save_single_file(vae, tmp_path / "groups16.safetensors")
    loaded = load_vae(str(path)).eval()
    assert loaded.config.norm_num_groups == 16
    torch.testing.assert_close(reconstruct(loaded, images()), reconstruct(vae, images()), atol=1e-6, rtol=0)


def assert_one_line_load_error(path: Path, *fragments: str) -> None:
    with pytest.raises(ModelLoadError) as error:
        load_vae(str(path))
    message = str(error.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message


def test_corrupt_file_gives_one_line_error(tmp_path: Path):
    path = tmp_path / "corrupt.safetensors"
    path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    assert_one_line_load_error(path, "not a readable safetensors file")


def test_unrelated_safetensors_gives_one_line_error(tmp_path: Path):
    path = tmp_path / "unrelated.safetensors"
    save_file({"classifier.weight": torch.zeros(10, 5)}, path)
    assert_one_line_load_error(path, "holds no VAE tensors")


def test_missing_and_unexpected_keys_are_refused(tmp_path: Path):
    tensors = load_file(save_single_file(tiny_vae(), tmp_path / "vae.safetensors"))
    del tensors["decoder.up.1.upsample.conv.bias"]
    tensors["encoder.mid.attn_2.q.weight"] = torch.zeros(64, 64, 1, 1)
    save_file(tensors, tmp_path / "damaged.safetensors")
    assert_one_line_load_error(
        tmp_path / "damaged.safetensors", "missing keys ['decoder.up.1.upsample.conv.bias']", "encoder.mid.attn_2"
    )


def test_export_command_writes_a_loadable_file(tmp_path: Path):
    tiny_vae().save_pretrained(tmp_path / "vae")
    out = tmp_path / "exported" / "vae.safetensors"
    command = ["export", "--model", str(tmp_path / "vae"), "--single-file", str(out), "--dtype", "fp16", "--prefix"]
    assert main(command) == 0
    assert out.is_file() and all(key.startswith(LDM_PREFIX) for key in file_shapes(out))
    assert load_vae(str(out)).config.block_out_channels == (32, 64)


def test_export_command_with_a_missing_model_exits_2_with_one_line(tmp_path: Path, capsys):
    status = main(["export", "--model", str(tmp_path / "nope"), "--single-file", str(tmp_path / "out.safetensors")])
    assert status == 2
    stderr = capsys.readouterr().err.strip()
    assert stderr.startswith("vae-hf: error:") and "\n" not in stderr
    assert not (tmp_path / "out.safetensors").exists()


def test_a_single_file_without_our_header_gets_ldms_training_size(tmp_path):
    """A file from elsewhere carries no diffusers config: its sample_size (what latent-stats and interpolate
    crop to by default) is 256, LDM's training size, not diffusers' default 32; a header's value still wins."""
    from vae_hf.io.single_file import ldm_state_dict

    vae = conftest_tiny_vae(sample_size=64)
    bare = tmp_path / "elsewhere.safetensors"
    save_file({k: v.contiguous() for k, v in ldm_state_dict(vae.state_dict()).items()}, bare)
    assert load_vae(str(bare)).config.sample_size == 256
    ours = save_single_file(vae, tmp_path / "ours.safetensors")
    assert load_vae(str(ours)).config.sample_size == 64


HUB_ID = "someone/tiny-vae"
LOAD_FROM_CACHE = """
import warnings
warnings.simplefilter("always")  # a warning printed once per interpreter must show here
from vae_hf.models.vae import load_vae
print(load_vae("someone/tiny-vae").config.block_out_channels)
"""


def fill_hub_cache(cache: Path, vae: AutoencoderKL) -> None:
    """A Hub model as huggingface_hub caches it: refs/main names a snapshot folder holding the files."""
    repo = cache / f"models--{HUB_ID.replace('/', '--')}"
    commit = "0123456789abcdef0123456789abcdef01234567"
    vae.save_pretrained(repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)


def test_a_hub_id_missing_from_the_cache_in_offline_mode_says_so(monkeypatch):
    """diffusers said "does not appear to have a file named config.json", after a deprecation warning."""
    from vae_hf.offline import OfflineError

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(OfflineError) as error:
        load_vae("vae-hf-tests/never-downloaded", option="--model")
    message = str(error.value)
    assert message.startswith("--model: vae-hf-tests/never-downloaded is not in the local Hugging Face cache")
    assert "HF_HUB_OFFLINE=1 keeps the Hub off" in message and "\n" not in message


def test_a_cached_hub_model_loads_offline_without_a_warning(tmp_path: Path):
    fill_hub_cache(tmp_path / "hub", tiny_vae())
    environment = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hub")}
    result = subprocess.run(
        [sys.executable, "-c", LOAD_FROM_CACHE], cwd=tmp_path, capture_output=True, text=True, env=environment
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[32, 64]" and "Warning" not in result.stderr, result.stderr


@pytest.mark.parametrize("typo", ["outputs/demo/vea", "outputs/vea"])
def test_a_mistyped_local_path_is_a_missing_folder_not_a_hub_id(typo, tmp_path: Path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "outputs" / "demo").mkdir(parents=True)
    with pytest.raises(ModelLoadError, match=f"^--model: no such file or folder {typo}$"):
        load_vae(typo, option="--model")


@pytest.fixture
def umask():
    """Set the process's umask for a test, and restore it."""
    previous = os.umask(0o022)
    yield os.umask
    os.umask(previous)


@pytest.mark.parametrize(("mask", "mode"), [(0o022, 0o644), (0o027, 0o640)], ids=["umask-022", "umask-027"])
def test_exports_and_latents_get_the_permissions_a_plain_write_gives(tmp_path: Path, umask, mask, mode):
    """safetensors writes owner-only files (0600), so weights and exports were unreadable to the group whatever
    the umask."""
    from vae_hf.analysis.inference import save_latents
    from vae_hf.io.export import save_vae

    umask(mask)
    vae = tiny_vae()
    written = [
        save_single_file(vae, tmp_path / "vae.safetensors"),
        *sorted(save_vae(vae, tmp_path / "vae").iterdir()),
        save_latents(tmp_path / "latents.safetensors", {"mean": torch.zeros(2)}, {}),
    ]
    assert {path.name: oct(path.stat().st_mode & 0o777) for path in written} == {
        path.name: oct(mode) for path in written
    }
    (tmp_path / "vae.safetensors").chmod(0o664)  # a file replaced keeps its mode, as a plain write would
    assert save_single_file(vae, tmp_path / "vae.safetensors").stat().st_mode & 0o777 == 0o664


def test_export_diffusers_turns_a_single_file_into_a_folder_that_loads_offline(tmp_path: Path, capsys):
    """diffusers' own from_single_file(path) fetches a reference config from the Hub; the folder needs nothing."""
    vae = tiny_vae(seed=5)
    single = save_single_file(vae, tmp_path / "vae.safetensors", dtype="fp32")
    assert main(["export", "--model", str(single), "--diffusers", str(tmp_path / "folder")]) == 0
    assert f"wrote {tmp_path / 'folder'} (diffusers folder)" in capsys.readouterr().out
    loaded = AutoencoderKL.from_pretrained(tmp_path / "folder").eval()
    assert list(loaded.config.block_out_channels) == [32, 64]
    assert torch.equal(reconstruct(loaded, images()), reconstruct(vae, images()))
    # what the docs promise: diffusers reads the single file exactly, offline, given this folder as its config
    from_diffusers = AutoencoderKL.from_single_file(str(single), config=str(tmp_path / "folder")).eval()
    assert torch.equal(reconstruct(from_diffusers, images()), reconstruct(vae, images()))


def test_export_diffusers_refuses_to_replace_a_folder_that_is_not_a_vae(tmp_path: Path, capsys):
    single = save_single_file(tiny_vae(), tmp_path / "vae.safetensors")
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "a.png").write_bytes(b"")
    assert main(["export", "--model", str(single), "--diffusers", str(tmp_path / "photos")]) == 2
    assert "is not a diffusers folder" in capsys.readouterr().err
    assert (tmp_path / "photos" / "a.png").exists()


def test_a_flux_shaped_vae_without_quant_convolutions_exports_and_loads(tmp_path: Path):
    """configs/flux_f8c16.yaml's layout (16 channels, no quant/post-quant convolutions), on tiny widths."""
    from vae_hf.config import load_config
    from vae_hf.models.vae import build_vae

    config = load_config(ROOT / "configs" / "flux_f8c16.yaml", ["model.block_out_channels=[32,64]"])
    vae = build_vae(config.model, 32).eval()
    assert vae.quant_conv is None and vae.post_quant_conv is None and vae.config.latent_channels == 16
    path = save_single_file(vae, tmp_path / "vae.safetensors")
    loaded = load_vae(str(path)).eval()
    assert loaded.quant_conv is None and loaded.post_quant_conv is None and loaded.config.latent_channels == 16
    torch.testing.assert_close(reconstruct(loaded, images()), reconstruct(vae, images()), atol=1e-6, rtol=0)
    vae.save_pretrained(tmp_path / "folder")
    assert AutoencoderKL.from_pretrained(tmp_path / "folder").post_quant_conv is None
