"""EMA weights, the decoder-only guard at export, and gradient checkpointing."""

import pytest
import torch
from diffusers import AutoencoderKL
from safetensors.torch import load_file

from vae_hf.config import load_config
from vae_hf.data.loader import to_model_range
from vae_hf.train.ema import EMA
from vae_hf.train.trainer import Trainer

from conftest import tiny_overrides


def build(image_folder, tmp_path, **overrides) -> Trainer:
    return Trainer(load_config(None, tiny_overrides(image_folder, tmp_path / "run", **overrides)))


def test_ema_is_the_warmed_up_moving_average():
    module = torch.nn.Linear(2, 1, bias=False)
    torch.nn.init.zeros_(module.weight)
    ema = EMA(module, decay=0.9)
    expected = torch.zeros(1, 2)
    for step in range(5):
        module.weight.data.fill_(float(step + 1))
        decay = min(0.9, (1 + step) / (10 + step))
        expected = decay * expected + (1 - decay) * module.weight.data
        ema.update(module)
    torch.testing.assert_close(ema.shadow["weight"], expected)
    averaged = ema.copy_of(module)
    torch.testing.assert_close(averaged.weight.data, expected)
    assert torch.equal(module.weight.data, torch.full((1, 2), 5.0))  # the live weights are untouched


def test_ema_export_differs_from_the_raw_weights_and_loads(image_folder, tmp_path):
    trainer = build(image_folder, tmp_path, **{"train.ema_decay": 0.9, "train.max_steps": 3, "loss.disc_weight": 0})
    trainer.train()
    raw = load_file(tmp_path / "run" / "vae" / "diffusion_pytorch_model.safetensors")
    averaged = load_file(tmp_path / "run" / "vae_ema" / "diffusion_pytorch_model.safetensors")
    assert raw.keys() == averaged.keys()
    assert any(not torch.equal(raw[name], averaged[name]) for name in raw)
    vae = AutoencoderKL.from_pretrained(tmp_path / "run" / "vae_ema")
    for name, value in vae.state_dict().items():
        assert torch.equal(value, averaged[name])
    assert (tmp_path / "run" / "checkpoints" / "checkpoint-3" / "ema.safetensors").is_file()


def test_ema_state_resumes(image_folder, tmp_path):
    overrides = {"train.ema_decay": 0.9, "loss.disc_weight": 0, "model.sample_posterior": "false"}
    build(image_folder, tmp_path, **overrides, **{"train.max_steps": 2}).train()
    resumed = build(image_folder, tmp_path, **overrides, **{"train.max_steps": 2, "train.resume_from": "latest"})
    saved = load_file(tmp_path / "run" / "checkpoints" / "checkpoint-2" / "ema.safetensors")
    assert resumed.ema.updates == 2
    for name, value in saved.items():
        assert torch.equal(resumed.ema.shadow[name], value)


def test_a_decoder_only_export_refuses_a_changed_encoder(image_folder, tmp_path):
    trainer = build(image_folder, tmp_path, **{"model.train_decoder_only": "true", "loss.disc_weight": 0})
    trainer.save_vae()  # unchanged: exports
    with torch.no_grad():
        trainer.vae.encoder.conv_in.weight[0, 0, 0, 0] += 1e-3
    with pytest.raises(RuntimeError, match="encoder of vae changed"):
        trainer.save_vae()


def test_decoder_only_training_exports_a_bit_identical_encoder(image_folder, tmp_path):
    trainer = build(
        image_folder,
        tmp_path,
        **{"model.train_decoder_only": "true", "loss.disc_weight": 0, "train.ema_decay": 0.5, "train.max_steps": 2},
    )
    initial = {k: v.clone() for k, v in trainer.vae.state_dict().items() if k.startswith(("encoder.", "quant_conv."))}
    trainer.train()
    for folder in ("vae", "vae_ema"):
        exported = load_file(tmp_path / "run" / folder / "diffusion_pytorch_model.safetensors")
        for name, value in initial.items():
            assert torch.equal(exported[name], value), (folder, name)


def test_gradient_checkpointing_gives_the_same_gradients(image_folder, tmp_path):
    grads = {}
    for flag in ("false", "true"):
        trainer = build(
            image_folder,
            tmp_path / flag,
            **{"train.gradient_checkpointing": flag, "loss.disc_weight": 0, "model.sample_posterior": "false"},
        )
        assert trainer.vae.is_gradient_checkpointing == (flag == "true")
        images = to_model_range(next(iter(trainer.dataloader))["pixel_values"])
        reconstructions, posterior, *_ = trainer.vae_player.wrapped(images)
        g_loss, _ = trainer.generator_loss(images, reconstructions, posterior, disc_active=False)
        g_loss.backward()
        grads[flag] = {n: p.grad.clone() for n, p in trainer.vae.named_parameters() if p.grad is not None}
    assert grads["true"].keys() == grads["false"].keys()
    for name, grad in grads["false"].items():
        torch.testing.assert_close(grads["true"][name], grad, rtol=1e-4, atol=1e-7, msg=name)
