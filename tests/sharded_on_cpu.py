"""`train_autoencoder.py` with Accelerate's FSDP or DeepSpeed switched on for CPU processes (tests only).

Accelerate 1.15 makes a process group FSDP or DeepSpeed only when it is not a CPU run: launched with
ACCELERATE_USE_CPU it is MULTI_CPU, and the FSDP or DeepSpeed config is silently dropped (plain DDP). torch's
FSDP2 (`fully_shard`) and DeepSpeed's ZeRO-2 both run on CPU processes over gloo, so for the tests we set the
type afterwards, as Accelerate would on GPUs:
    ACCELERATE_USE_CPU=true accelerate launch --config_file configs/accelerate/fsdp.yaml \
        tests/sharded_on_cpu.py <overrides>
"""

import sys
from pathlib import Path

from accelerate.state import AcceleratorState, PartialState
from accelerate.utils import DistributedType

_init = AcceleratorState.__init__


def _init_sharded_on_cpu(self, *args, fsdp_plugin=None, deepspeed_plugin=None, **kwargs):
    _init(self, *args, fsdp_plugin=fsdp_plugin, deepspeed_plugin=deepspeed_plugin, **kwargs)
    if self.distributed_type != DistributedType.MULTI_CPU:
        return
    if fsdp_plugin is not None:
        self.distributed_type = DistributedType.FSDP
        self.fsdp_plugin = fsdp_plugin
    elif deepspeed_plugin is not None:
        self.distributed_type = DistributedType.DEEPSPEED
        deepspeed_plugin.set_mixed_precision(self._mixed_precision)
        deepspeed_plugin.select(_from_accelerator_state=True)
        self.deepspeed_plugins = deepspeed_plugin
    else:
        return
    PartialState._shared_state["distributed_type"] = self.distributed_type


AcceleratorState.__init__ = _init_sharded_on_cpu

if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from vae_hf.cli import train_main

    sys.exit(train_main())
