"""Averages of the loss breakdown between log steps, kept on the device."""

from __future__ import annotations

import time

import torch


class LossMeter:
    """Sums the breakdown on the device between log steps, so the loop never waits on `.item()`."""

    def __init__(self):
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = {}
        self.images = 0
        self.started = time.perf_counter()

    def add(self, breakdown: dict[str, torch.Tensor], images: int) -> None:
        for name, value in breakdown.items():
            self.sums[name] = self.sums.get(name, 0) + value.float()
            self.counts[name] = self.counts.get(name, 0) + 1
        self.images += images

    def flush(self, num_processes: int) -> dict[str, float]:
        values = {name: (total / self.counts[name]).item() for name, total in self.sums.items()}
        elapsed = time.perf_counter() - self.started
        values["images_per_s"] = self.images * num_processes / max(elapsed, 1e-9)
        self.__init__()
        return values
