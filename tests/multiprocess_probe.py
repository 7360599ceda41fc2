"""`train_autoencoder.py` with a probe in each process, for the multi-process tests (run under accelerate launch).

What each process does is written to `<output_dir>/probe-<rank>.json`:
- `epoch_ends`: the steps at which its epochs ended;
- `stopped_at`: the step at which it stopped for a signal, if it did;
- `batches`: [optimizer step it belongs to, height, width, batch size, checksum] of every micro-batch trained on
  (aspect-ratio buckets and stages must agree across processes; the checksum tells the processes' images apart);
- `host_reads`: tensor reads on the host (`.item()`, `.tolist()`, `bool()`, ...) between log steps, counted from
  the bookkeeping of step 2 through the last micro-batch of step `max_steps - 1` (step 1 writes a sample, the
  last step logs). `flag_reads` counts the one read left out, of the agreement's flags (`Consensus.flags`): a
  CPU tensor on every device, filled from Python values, never from the accelerator, so reading it is never a
  device sync.

With PROBE_SIGTERM="<rank>:<step>", that process sends itself SIGTERM after optimizer step <step>: a signal
that reaches one process only. With PROBE_SHORT_STREAM="<rank>:<rows>", that process's share of a stream is
cut to its first <rows> rows each epoch: the unequal shards that sharded data gives (a local image folder
streams as one shard, which `split_dataset_by_node` splits by rows, to within one row).
"""

import json
import os
import signal
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from vae_hf.cli import train_main  # noqa: E402
from vae_hf.data import datasets as image_datasets  # noqa: E402
from vae_hf.train import trainer as trainer_module  # noqa: E402

READS = ("item", "tolist", "__bool__", "__int__", "__float__")


class ShortStream(image_datasets.StreamingImageDataset):
    """A process's stream cut to its first `rows` rows each epoch; the count is part of its saved position."""

    def __init__(self, dataset, rows: int):
        super().__init__(dataset.stream, dataset.processor)
        self.rows, self.taken = rows, 0

    def __iter__(self):
        for row in super().__iter__():
            if self.taken >= self.rows:
                return
            self.taken += 1
            yield row

    def set_epoch(self, epoch: int) -> None:
        super().set_epoch(epoch)
        self.taken = 0

    def state_dict(self):
        return {"stream": super().state_dict(), "taken": self.taken}

    def load_state_dict(self, state) -> None:
        super().load_state_dict(state["stream"])
        self.taken = state["taken"]


def install_probe():
    counting = [False]
    record = {"epoch_ends": [], "stopped_at": None, "host_reads": [], "flag_reads": 0, "batches": []}
    flags = []  # the agreement's flag tensor, once a trainer exists
    for name in READS:
        real = getattr(torch.Tensor, name)

        def counted(self, *args, _real=real, _name=name, **kwargs):
            if counting[0]:
                if any(self is flag for flag in flags):
                    record["flag_reads"] += 1  # the window is watched: the agreement's own read is seen
                else:
                    record["host_reads"].append(_name)
            return _real(self, *args, **kwargs)

        setattr(torch.Tensor, name, counted)

    target = os.environ.get("PROBE_SIGTERM")
    signal_rank, signal_step = (int(part) for part in target.split(":")) if target else (None, None)
    real_init = trainer_module.Trainer.__init__
    real_end_epoch = trainer_module.Trainer._end_epoch
    real_stop = trainer_module.Trainer._stop_for_signal

    def write(trainer):
        path = Path(trainer.config.output_dir) / f"probe-{trainer.accelerator.process_index}.json"
        path.write_text(json.dumps(record))

    def after_step(trainer):
        step, last = trainer.progress.global_step, trainer.total_steps
        counting[0] = 2 <= step < last - 1
        if step == signal_step and trainer.accelerator.process_index == signal_rank:
            os.kill(os.getpid(), signal.SIGTERM)

    def init(self, config):
        real_init(self, config)
        flags.append(self.consensus.flags)
        self.step_callbacks.append(after_step)

    def end_epoch(self):
        record["epoch_ends"].append(self.progress.global_step)
        real_end_epoch(self)

    def stop(self):
        record["stopped_at"] = self.progress.global_step
        write(self)
        return real_stop(self)

    real_training_step = trainer_module.Trainer.training_step

    def training_step(self, images):
        watching, counting[0] = counting[0], False  # the probe's own read is not the trainer's
        checksum = float(images.double().sum())
        counting[0] = watching
        record["batches"].append([self.progress.global_step + 1, *images.shape[-2:], images.shape[0], checksum])
        return real_training_step(self, images)

    trainer_module.Trainer.__init__ = init
    trainer_module.Trainer.training_step = training_step
    trainer_module.Trainer._end_epoch = end_epoch
    trainer_module.Trainer._stop_for_signal = stop
    real_train = trainer_module.Trainer.train

    def train(self):
        try:
            return real_train(self)
        finally:
            counting[0] = False
            write(self)

    trainer_module.Trainer.train = train

    short = os.environ.get("PROBE_SHORT_STREAM")
    if short:
        short_rank, rows = (int(part) for part in short.split(":"))
        real_training_dataset = image_datasets.training_dataset

        def training_dataset(config, seed, rank=0, world_size=1, **options):
            dataset = real_training_dataset(config, seed, rank, world_size, **options)
            return ShortStream(dataset, rows) if rank == short_rank else dataset

        image_datasets.training_dataset = training_dataset


if __name__ == "__main__":
    install_probe()
    sys.exit(train_main())
