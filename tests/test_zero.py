"""The DeepSpeed engines' config: the shipped launch config is filled from the trainer's settings, and what
the trainer cannot honour is refused in one line before any model is built. (Training under ZeRO-2 is tested
in test_distributed.py.)"""

import importlib.util

import pytest
import yaml
from accelerate.utils import DeepSpeedPlugin

from vae_hf.config import ConfigError, load_config
from vae_hf.parallel.deepspeed import engine_config
from vae_hf.train.trainer import Trainer

from conftest import ROOT, tiny_overrides, write_images


def shipped_plugin(**changes) -> DeepSpeedPlugin:
    """The plugin `accelerate launch --config_file configs/accelerate/deepspeed_zero2.yaml` builds."""
    launch = yaml.safe_load((ROOT / "configs" / "accelerate" / "deepspeed_zero2.yaml").read_text())
    plugin = DeepSpeedPlugin(**{**launch["deepspeed_config"], **changes})
    plugin.set_mixed_precision("no")  # as Accelerate does: the trainer runs it in "no" mode
    return plugin


def test_the_shipped_config_gets_the_trainers_batch_accumulation_and_clipping():
    config = load_config(None, ["train.batch_size=3", "train.gradient_accumulation_steps=5", "optim.max_grad_norm=2"])
    filled = engine_config(shipped_plugin(), config.train, config.optim.max_grad_norm, num_processes=4)
    assert filled["zero_optimization"]["stage"] == 2
    assert filled["train_micro_batch_size_per_gpu"] == 3 and filled["gradient_accumulation_steps"] == 5
    assert filled["train_batch_size"] == 3 * 5 * 4
    assert filled["gradient_clipping"] == 2.0
    assert not filled["fp16"]["enabled"] and not filled["bf16"]["enabled"]
    unclipped = load_config(None, [])
    assert engine_config(shipped_plugin(), unclipped.train, None, 1)["gradient_clipping"] == 0.0  # 0: off


@pytest.mark.parametrize(
    ("plugin", "overrides", "message"),
    [
        ({"zero_stage": 3}, [], "stage is 3; vae-hf runs ZeRO stage 2; stage 3 shards the weights"),
        ({"zero_stage": 1}, [], "stage is 1"),
        ({"offload_optimizer_device": "cpu"}, [], "offload_optimizer to cpu is not supported"),
        ({"gradient_clipping": 0.5}, ["optim.max_grad_norm=1.0"], "gradient_clipping is 0.5 but optim.max_grad_norm"),
        ({"gradient_accumulation_steps": 8}, [], "gradient_accumulation_steps is 8"),
        ({}, ["train.mixed_precision=fp16"], "fp16 needs a gradient scaler per player"),
    ],
)
def test_what_the_trainer_cannot_honour_is_refused(plugin, overrides, message):
    config = load_config(None, overrides)
    with pytest.raises(ConfigError, match=message):
        engine_config(shipped_plugin(**plugin), config.train, config.optim.max_grad_norm, num_processes=2)


def test_deepspeed_settings_that_would_bypass_the_trainer_are_refused():
    config = load_config(None, [])
    half = shipped_plugin()
    half.deepspeed_config["bf16"] = {"enabled": True}
    with pytest.raises(ConfigError, match="bf16.enabled casts the weights to half precision"):
        engine_config(half, config.train, None, 1)
    own_optimizer = shipped_plugin()
    own_optimizer.deepspeed_config["optimizer"] = {"type": "AdamW"}
    with pytest.raises(ConfigError, match="remove optimizer/scheduler"):
        engine_config(own_optimizer, config.train, None, 1)
    unmeasured = shipped_plugin()
    unmeasured.deepspeed_config["zero_optimization"]["compute_grad_norm"] = False
    with pytest.raises(ConfigError, match="compute_grad_norm=false turns off the skip of non-finite updates"):
        engine_config(unmeasured, config.train, None, 1)
    unfilled = shipped_plugin()
    unfilled.deepspeed_config["zero_optimization"]["reduce_bucket_size"] = "auto"
    with pytest.raises(ConfigError, match="set a value for zero_optimization.reduce_bucket_size"):
        engine_config(unfilled, config.train, None, 1)


def test_a_deepspeed_launch_without_the_package_is_one_line(monkeypatch, tmp_path):
    real_find_spec = importlib.util.find_spec

    def find_spec(name, *args):
        return None if name == "deepspeed" else real_find_spec(name, *args)

    write_images(tmp_path / "images", 4)
    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")  # what `accelerate launch` sets for a DeepSpeed config
    config = load_config(None, tiny_overrides(tmp_path / "images", tmp_path / "run"))
    with pytest.raises(ConfigError, match=r"needs the deepspeed package: pip install 'vae-hf\[deepspeed\]'"):
        Trainer(config)
