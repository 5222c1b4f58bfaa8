"""Samplers and a loader that keep a run's data order reproducible across epochs and resumes."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, Sampler


class EpochShuffleSampler(Sampler[int]):
    """Shuffles with a seed derived from ``(seed, epoch)``: the order of epoch e is the same in a resumed run."""

    def __init__(self, size: int, seed: int = 0) -> None:
        self.size, self.seed, self.epoch = size, seed, 0

    def set_epoch(self, epoch: int) -> None:  # called by Lightning at the start of every epoch
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return iter(torch.randperm(self.size, generator=generator).tolist())

    def __len__(self) -> int:
        return self.size


class ResumableShuffleSampler(EpochShuffleSampler):
    """:class:`EpochShuffleSampler` that can start one epoch part-way: after a mid-epoch checkpoint, the resumed
    run sees exactly the samples the interrupted one had not reached (its length stays the epoch's)."""

    def __init__(self, size: int, seed: int = 0) -> None:
        super().__init__(size, seed)
        self.resume: tuple[int, int] | None = None  # (epoch, samples already consumed in it)

    def __iter__(self) -> Iterator[int]:
        order = list(super().__iter__())
        if self.resume is not None and self.resume[0] == self.epoch:  # however often Lightning iterates it
            order = order[self.resume[1] :]
        return iter(order)


class ResumableDataLoader(DataLoader):
    """A DataLoader Lightning treats as resumable (``state_dict``/``load_state_dict``), so it does not warn that a
    mid-epoch checkpoint resumes unreliably: the position in the epoch is restored by
    :class:`ShakespeareDataModule`'s own state, which knows the trainer's progress, into the sampler."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        pass
