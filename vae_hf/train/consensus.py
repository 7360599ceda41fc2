"""Decisions every process takes together: whether to stop, whether the data ran out, which files were unreadable.

A process that decides alone hangs a multi-process job (it waits in a collective the others never join) or
trains it on different steps. So each optimizer step ends with one agreement: every process contributes its
own view (a stop signal received, no full next window of data) and all act on the combined one.

The agreement runs on the host: a few integers all-reduced over a gloo process group (the default one for
CPU runs, a second one beside NCCL for GPU runs). It never reads a tensor from the accelerator, so the GPU
keeps its queue of work; the cost is one small message round trip per optimizer step.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from accelerate import Accelerator


class Consensus:
    def __init__(self, accelerator: Accelerator):
        self.num_processes = accelerator.num_processes
        self.group = None
        if self.num_processes > 1 and dist.get_backend() != "gloo":
            self.group = dist.new_group(backend="gloo")  # every process calls this, in the same order
        self.flags = torch.zeros(2, dtype=torch.int64)  # host memory on every device: never a device sync

    def agree(self, stop: bool, out_of_data: bool = False) -> tuple[bool, bool]:
        """(stop, out_of_data), each true when it is true for any process."""
        if self.num_processes == 1:
            return stop, out_of_data
        self.flags[0], self.flags[1] = int(stop), int(out_of_data)
        dist.all_reduce(self.flags, op=dist.ReduceOp.MAX, group=self.group)
        agreed_stop, agreed_out = self.flags.tolist()
        return bool(agreed_stop), bool(agreed_out)

    def agree_buckets(self, stop: bool, out_of_data: bool, ready: list[int]) -> tuple[bool, bool, list[int]]:
        """`agree`, and for a bucketed stream the windows of each bucket that every process can fill (the minimum
        of each process's `ready`), in the same single all-reduce."""
        if self.num_processes == 1:
            return stop, out_of_data, list(ready)
        values = torch.tensor([int(stop), int(out_of_data), *(-count for count in ready)], dtype=torch.int64)
        dist.all_reduce(values, op=dist.ReduceOp.MAX, group=self.group)  # the max of -count is minus the min
        agreed_stop, agreed_out, *negated = values.tolist()
        return bool(agreed_stop), bool(agreed_out), [-count for count in negated]

    def union(self, keys: set[int]) -> set[int]:
        """The union of every process's `keys` (63-bit integers), on every process."""
        if self.num_processes == 1:
            return set(keys)
        mine = torch.tensor(sorted(keys), dtype=torch.int64)
        sizes = [torch.zeros(1, dtype=torch.int64) for _ in range(self.num_processes)]
        dist.all_gather(sizes, torch.tensor([len(mine)], dtype=torch.int64), group=self.group)
        longest = max(int(size[0]) for size in sizes)
        padded = torch.full((longest,), -1, dtype=torch.int64)
        padded[: len(mine)] = mine
        gathered = [torch.empty(longest, dtype=torch.int64) for _ in range(self.num_processes)]
        dist.all_gather(gathered, padded, group=self.group)
        return {key for values in gathered for key in values.tolist() if key >= 0}
