"""Single-file VAEs in the original LDM (CompVis) key layout: what ComfyUI and A1111 load, and what we read back.

diffusers renamed the LDM first stage's modules (`down.<i>.block.<j>` became `down_blocks.<i>.resnets.<j>`, ...),
numbers the decoder's levels the other way round (LDM's `up.0` is the full-resolution level, diffusers' last
`up_blocks` entry), and turned the mid-block attention's 1x1 convolutions into Linear layers. Export undoes each of
these renames. Import reads the architecture off the tensor shapes (a single file carries no config) and then lets
diffusers' own `convert_ldm_vae_checkpoint` rename the tensors, so a round trip checks our export against diffusers'
reading of the LDM layout rather than against itself.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Callable, Iterable, Mapping
from importlib import metadata as package_metadata
from pathlib import Path

import torch
from diffusers import AutoencoderKL
from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from vae_hf.config import WEIGHT_DTYPES
from vae_hf.io.export import ExportError
from vae_hf.io.files import plain_permissions

logger = logging.getLogger(__name__)

LDM_PREFIX = "first_stage_model."
"""Where a whole Stable Diffusion checkpoint keeps its VAE (`--prefix` writes it so)."""
WRAPPER_PREFIXES = (LDM_PREFIX, "vae.")
"""Prefixes under which a bigger checkpoint nests the VAE; diffusers' converter accepts the same two."""
TRAINING_LEFTOVERS = ("loss.", "model_ema.")
"""LDM training checkpoints also hold the discriminator/LPIPS (`loss.`) and EMA buffers: not part of the VAE."""
LDM_SAMPLE_SIZE = 256
LDM_NORM_GROUPS = 32
"""LDM's `Normalize()` hard-codes GroupNorm(32, C); the shapes cannot tell, so files without our metadata get 32."""
DTYPES = {name: getattr(torch, dtype) for name, dtype in WEIGHT_DTYPES.items()}

# AutoencoderKL settings that tensor shapes do not reveal; our export stores them in the header to restore them.
CARRIED_CONFIG = ("norm_num_groups", "act_fn", "sample_size", "scaling_factor", "shift_factor", "latents_mean",
                  "latents_std", "force_upcast")  # fmt: skip

# diffusers' attention sub-module names -> LDM's (the second group: names older diffusers files still use).
ATTENTION_NAMES = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out",
                   "query": "q", "key": "k", "value": "v", "proj_attn": "proj_out"}  # fmt: skip
ATTENTION_PROJECTIONS = ("q", "k", "v", "proj_out")
ATTENTION_KEY = re.compile(r"^(encoder|decoder)\.mid_block\.attentions\.0\.(.+)\.(weight|bias)$")

# Each rule renames a diffusers key prefix; the function gets the match and the decoder's number of levels.
BLOCK_RULES: list[tuple[re.Pattern[str], Callable[[re.Match[str], int], str]]] = [
    (re.compile(r"^encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\."), lambda m, n: f"encoder.down.{m[1]}.block.{m[2]}."),
    (re.compile(r"^encoder\.down_blocks\.(\d+)\.downsamplers\.0\."), lambda m, n: f"encoder.down.{m[1]}.downsample."),
    # LDM builds the decoder from the lowest resolution up but indexes `up` by resolution level: reverse.
    (
        re.compile(r"^decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\."),
        lambda m, n: f"decoder.up.{n - 1 - int(m[1])}.block.{m[2]}.",
    ),
    (
        re.compile(r"^decoder\.up_blocks\.(\d+)\.upsamplers\.0\."),
        lambda m, n: f"decoder.up.{n - 1 - int(m[1])}.upsample.",
    ),
    (re.compile(r"^(encoder|decoder)\.mid_block\.resnets\.(\d+)\."), lambda m, n: f"{m[1]}.mid.block_{int(m[2]) + 1}."),
    (re.compile(r"^(encoder|decoder)\.conv_norm_out\."), lambda m, n: f"{m[1]}.norm_out."),
]


class SingleFileError(ValueError):
    """A single file is not a VAE we can read; `load_vae` reports it as a one-line ModelLoadError."""


# --- diffusers -> LDM ------------------------------------------------------------------------------------------


def ldm_key(diffusers_key: str, decoder_levels: int) -> str:
    """The LDM name of one diffusers AutoencoderKL tensor; names the two layouts share pass through."""
    attention = ATTENTION_KEY.match(diffusers_key)
    if attention is not None:
        part, name, kind = attention.groups()
        return f"{part}.mid.attn_1.{ATTENTION_NAMES.get(name, name)}.{kind}"
    for pattern, rename in BLOCK_RULES:
        match = pattern.match(diffusers_key)
        if match is not None:
            renamed = rename(match, decoder_levels) + diffusers_key[match.end() :]
            return renamed.replace(".conv_shortcut.", ".nin_shortcut.")  # the resnet's 1x1 skip conv
    return diffusers_key


def ldm_state_dict(diffusers_state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a diffusers AutoencoderKL state dict to LDM keys and give attention weights their 1x1-conv shape."""
    decoder_levels = _count_levels(diffusers_state, "decoder.up_blocks.")
    ldm: dict[str, torch.Tensor] = {}
    for key, tensor in diffusers_state.items():
        name = ldm_key(key, decoder_levels)
        if name in ldm:  # e.g. a file holding both `to_q` and the old `query`
            raise SingleFileError(f"two tensors map to the LDM key {name}")
        if _is_attention_projection(name) and tensor.ndim == 2:
            tensor = tensor[:, :, None, None]  # Linear [C_out, C_in] -> 1x1 conv [C_out, C_in, 1, 1]
        ldm[name] = tensor
    return ldm


def save_single_file(vae: AutoencoderKL, path: Path, dtype: str = "fp32", prefix: bool = False) -> Path:
    """Write the VAE as one LDM-layout safetensors file, as ComfyUI's and A1111's VAE loaders expect.

    The header records the layout, dtype and the diffusers config, so that our own import restores what shapes
    cannot tell (GroupNorm groups, scaling factor). Written to a temporary sibling and renamed into place.
    """
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ExportError(f"--single-file must end in .safetensors, got {path}")
    key_prefix = LDM_PREFIX if prefix else ""
    tensors = {
        key_prefix + key: tensor.detach().to("cpu", DTYPES[dtype]).contiguous()
        for key, tensor in ldm_state_dict(vae.state_dict()).items()
    }
    header = {"format": "pt", "layout": "ldm", "dtype": dtype, "prefix": key_prefix, "producer": _producer(),
              "diffusers_config": json.dumps(_public_config(vae), sort_keys=True)}  # fmt: skip
    staging = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(staging), metadata=header)
        os.replace(plain_permissions(staging, path), path)
    except (OSError, SafetensorError) as error:
        staging.unlink(missing_ok=True)
        raise ExportError(f"cannot write {path}: {getattr(error, 'strerror', None) or error}") from None
    return path


# --- LDM (or diffusers keys) -> AutoencoderKL -------------------------------------------------------------------


def load_single_file(path: Path) -> AutoencoderKL:
    """Rebuild an AutoencoderKL from one safetensors file, offline: LDM keys (prefixed or not) or diffusers keys."""
    tensors, header = read_vae_tensors(Path(path))
    if any(".down_blocks." in key or ".up_blocks." in key or ".mid_block." in key for key in tensors):
        tensors = ldm_state_dict(tensors)  # a diffusers-layout file: one code path for both from here on
    if not any(key.startswith(("encoder.", "decoder.")) for key in tensors):
        raise SingleFileError(
            f"{path} holds no VAE tensors (expected keys such as encoder.conv_in.weight, optionally under {LDM_PREFIX})"
        )
    config = infer_vae_config(tensors, _header_config(header))
    try:
        vae = AutoencoderKL(**config)
    except (ValueError, TypeError) as error:  # e.g. widths that GroupNorm(norm_num_groups) cannot split
        raise SingleFileError(f"cannot build the AutoencoderKL its shapes describe: {_first_line(error)}") from None
    check_layout(tensors, ldm_state_dict(vae.state_dict()), config)
    try:
        vae.load_state_dict(convert_ldm_vae_checkpoint(tensors, dict(vae.config)), strict=True)
    except RuntimeError as error:  # diffusers' converter disagreeing with our layout check
        raise SingleFileError(f"diffusers' LDM conversion does not fit: {_first_line(error)}") from None
    return vae


def read_vae_tensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The file's VAE tensors (wrapper prefix stripped) and its header; only the VAE's tensors are read."""
    try:
        with safe_open(str(path), framework="pt") as file:
            header = file.metadata() or {}
            names = vae_key_names(file.keys())
            tensors = {name: file.get_tensor(key) for key, name in names.items()}
    except (SafetensorError, OSError) as error:
        raise SingleFileError(f"{path} is not a readable safetensors file: {_first_line(error)}") from None
    return tensors, header


def vae_key_names(keys: Iterable[str]) -> dict[str, str]:
    """Map the file keys that belong to the VAE to their names without a wrapper prefix."""
    keys = list(keys)
    for prefix in WRAPPER_PREFIXES:
        if any(key.startswith(prefix) for key in keys):  # a whole checkpoint: UNet, text encoder, VAE
            return {key: key[len(prefix) :] for key in keys if key.startswith(prefix)}
    return {key: key for key in keys if not key.startswith(TRAINING_LEFTOVERS)}


def infer_vae_config(ldm: Mapping[str, torch.Tensor], header_config: Mapping[str, object]) -> dict[str, object]:
    """AutoencoderKL's arguments, read off the LDM tensor shapes (plus what only our header records)."""
    levels = _count_levels(ldm, "encoder.down.")
    if levels == 0:
        raise SingleFileError("no encoder.down.<level> tensors: not a KL-VAE first stage")
    # conv1 of a level's first resnet maps the previous width to this level's width: [C_level, C_prev, 3, 3]
    widths = tuple(_shape(ldm, f"encoder.down.{level}.block.0.conv1.weight")[0] for level in range(levels))
    resnets_per_level = {len(_indices(ldm, f"encoder.down.{level}.block.")) for level in range(levels)}
    if len(resnets_per_level) != 1:
        raise SingleFileError(f"levels hold different numbers of resnet blocks {sorted(resnets_per_level)}")
    config: dict[str, object] = {
        "in_channels": _shape(ldm, "encoder.conv_in.weight")[1],
        "out_channels": _shape(ldm, "decoder.conv_out.weight")[0],
        "down_block_types": ("DownEncoderBlock2D",) * levels,
        "up_block_types": ("UpDecoderBlock2D",) * levels,
        "block_out_channels": widths,
        "layers_per_block": resnets_per_level.pop(),
        "latent_channels": _shape(ldm, "encoder.conv_out.weight")[0] // 2,  # the encoder emits mean and log-variance
        "use_quant_conv": "quant_conv.weight" in ldm,
        "use_post_quant_conv": "post_quant_conv.weight" in ldm,
        "mid_block_add_attention": "encoder.mid.attn_1.q.weight" in ldm,
        "norm_num_groups": LDM_NORM_GROUPS,
        # LDM's and Stable Diffusion's training size; diffusers' default (32) would make tools crop to 32 px
        "sample_size": LDM_SAMPLE_SIZE,
    }
    config.update({key: value for key, value in header_config.items() if key in CARRIED_CONFIG})
    return config


def check_layout(
    found: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor], config: Mapping[str, object]
) -> None:
    """Strict: exactly the keys and shapes of the inferred architecture, or one line saying what differs."""
    missing = sorted(expected.keys() - found.keys())
    unexpected = sorted(found.keys() - expected.keys())
    described = f"widths {list(config['block_out_channels'])}, {config['layers_per_block']} resnets per level"
    if missing or unexpected:
        differences = [
            f"{label} keys {_preview(keys)}"
            for label, keys in (("missing", missing), ("unexpected", unexpected))
            if keys
        ]
        raise SingleFileError(f"not the VAE its shapes describe ({described}): {'; '.join(differences)}")
    for key, tensor in expected.items():
        if found[key].shape != tensor.shape:
            raise SingleFileError(
                f"{key} has shape {list(found[key].shape)}, the VAE its shapes describe ({described}) "
                f"needs {list(tensor.shape)}"
            )


# --- helpers ---------------------------------------------------------------------------------------------------


def _indices(keys: Iterable[str], prefix: str) -> set[int]:
    """The integers that follow `prefix` in the keys (`encoder.down.` -> the level numbers)."""
    found = set()
    for key in keys:
        if key.startswith(prefix):
            head = key[len(prefix) :].split(".", 1)[0]
            if head.isdigit():
                found.add(int(head))
    return found


def _count_levels(keys: Iterable[str], prefix: str) -> int:
    indices = _indices(keys, prefix)
    return max(indices) + 1 if indices else 0


def _shape(tensors: Mapping[str, torch.Tensor], key: str) -> tuple[int, ...]:
    if key not in tensors:
        raise SingleFileError(f"not a KL-VAE first stage: no tensor {key}")
    return tuple(tensors[key].shape)


def _is_attention_projection(ldm_name: str) -> bool:
    return ".mid.attn_1." in ldm_name and ldm_name.endswith(tuple(f".{p}.weight" for p in ATTENTION_PROJECTIONS))


def _header_config(header: Mapping[str, str]) -> dict[str, object]:
    """The diffusers config our export stores in the header; other tools' files have none."""
    text = header.get("diffusers_config")
    if text is None:
        return {}
    try:
        config = json.loads(text)
    except json.JSONDecodeError:
        config = None
    if not isinstance(config, dict):
        logger.warning("ignoring an unreadable diffusers_config in the safetensors header")
        return {}
    return config


def _public_config(vae: AutoencoderKL) -> dict[str, object]:
    """The model's config without diffusers' private bookkeeping (`_class_name`, `_use_default_values`, ...)."""
    return {key: value for key, value in vae.config.items() if not key.startswith("_")}


def _producer() -> str:
    try:
        return f"vae-hf {package_metadata.version('vae-hf')}"
    except package_metadata.PackageNotFoundError:  # running from a source tree that is not installed
        return "vae-hf"


def _preview(keys: list[str], shown: int = 3) -> str:
    more = f" (+{len(keys) - shown} more)" if len(keys) > shown else ""
    return f"{keys[:shown]}{more}"


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
