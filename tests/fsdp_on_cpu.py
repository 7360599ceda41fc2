"""`train_autoencoder.py` with Accelerate's FSDP switched on for CPU processes (tests only).

Accelerate 1.15 makes a process group FSDP only when its type is MULTI_GPU (or another accelerator):
launched with ACCELERATE_USE_CPU it is MULTI_CPU, and the FSDP config is silently dropped (plain DDP).
torch's FSDP2 (`fully_shard`) itself runs on CPU over gloo, so for the tests we set the type afterwards:
    ACCELERATE_USE_CPU=true accelerate launch --config_file configs/accelerate/fsdp.yaml \
        tests/fsdp_on_cpu.py <overrides>
"""

import sys
from pathlib import Path

from accelerate.state import AcceleratorState, PartialState
from accelerate.utils import DistributedType

_init = AcceleratorState.__init__


def _init_with_fsdp_on_cpu(self, *args, fsdp_plugin=None, **kwargs):
    _init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
    if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
        self.distributed_type = DistributedType.FSDP
        self.fsdp_plugin = fsdp_plugin
        PartialState._shared_state["distributed_type"] = DistributedType.FSDP


AcceleratorState.__init__ = _init_with_fsdp_on_cpu

if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from vae_hf.cli import train_main

    sys.exit(train_main())
