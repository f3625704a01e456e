"""Where the trainer's micro-batches come from: a dataset of known length, or a stream too large to copy.

``MapFeed``: a map-style dataset (decoded records or their latent cache) in a permutation seeded by (seed, epoch),
through accelerate's prepared loader, which splits each global batch over the processes. A resume at global step
``s`` starts in epoch ``s // steps_per_epoch`` and skips the batches already seen.

``StreamFeed``: a ``StreamingPreferenceDataset`` whose processes each read their own share of the table
(``split_dataset_by_node``), shuffled with a buffer seeded by (seed, epoch). The length of an epoch is not known in
advance and the shares may differ in length, so the processes agree, one accumulation cycle at a time, whether
every one of them still has a full cycle of micro-batches; the epoch ends for all when one runs out (the rest of the
longer shares is left for the next epoch's reshuffle). The position in the stream (epoch, micro-batches into it and
the last record read) goes into every checkpoint, one file per process, so a resume continues the same sequence of
batches: without DataLoader workers it starts reading after the last record it had read, without decoding the
records before it; with workers it re-reads and drops the batches already seen.
"""

from __future__ import annotations

import itertools
import math

import torch
from accelerate import Accelerator

from .data import StreamingPreferenceDataset, collate_preferences
from .replay import register_process_state


class EpochShuffleSampler(torch.utils.data.Sampler):
    """A permutation of ``range(n)`` seeded by (seed, epoch): the same on every process and after a resume.

    The feed sets ``epoch`` before each pass. There is deliberately no ``set_epoch`` method: accelerate's prepared
    loader calls ``set_epoch(its own iteration count)`` on the sampler each time it is iterated, and that count lags
    behind the trainer's epoch after a ``skip_first_batches`` copy has served the first (or resumed) epoch.
    """

    def __init__(self, n: int, seed: int):
        self.n, self.seed, self.epoch = n, seed, 0

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return iter(torch.randperm(self.n, generator=generator).tolist())


def epoch_batches(accelerator: Accelerator, loader, sampler: EpochShuffleSampler, epoch: int, skip: int):
    """The prepared ``loader``'s batches of ``epoch`` in the order of (seed, epoch), the first ``skip`` left out."""
    sampler.epoch = epoch
    return accelerator.skip_first_batches(loader, skip) if skip else loader


class MapFeed:
    """Full batches of ``batch_size`` records of a map-style ``dataset`` per process, in (seed, epoch) order."""

    def __init__(self, dataset, batch_size: int, seed: int, num_workers: int, accelerator: Accelerator, accumulation):
        self.sampler = EpochShuffleSampler(len(dataset), seed)
        loader = torch.utils.data.DataLoader(
            dataset,
            batch_size=batch_size,
            sampler=self.sampler,
            collate_fn=collate_preferences,
            num_workers=num_workers,
            drop_last=True,
        )
        if len(loader) == 0:
            raise ValueError(f"{len(dataset)} records is fewer than --train_batch_size {batch_size}.")
        self.accelerator, self.accumulation = accelerator, accumulation
        self.loader = accelerator.prepare(loader)
        self.steps_per_epoch = math.ceil(len(self.loader) / accumulation)  # accelerate syncs at an epoch's end

    def resume_point(self, global_step: int) -> tuple[int, int]:
        """(epoch, micro-batches of it already seen) after ``global_step`` optimizer steps."""
        epoch, steps = divmod(global_step, self.steps_per_epoch)
        return epoch, steps * self.accumulation

    def batches(self, epoch: int, skip: int):
        return epoch_batches(self.accelerator, self.loader, self.sampler, epoch, skip)


class StreamFeed:
    """Micro-batches of a stream, whole accumulation cycles only, in step on every process (see the module doc)."""

    def __init__(
        self,
        dataset: StreamingPreferenceDataset,
        batch_size: int,
        num_workers: int,
        accelerator: Accelerator,
        accumulation: int,
    ):
        self.dataset, self.accelerator, self.accumulation = dataset, accelerator, accumulation
        self.num_workers = num_workers
        self.loader = torch.utils.data.DataLoader(
            dataset, batch_size=batch_size, collate_fn=collate_preferences, num_workers=num_workers, drop_last=True
        )
        self.epoch, self.seen, self.position = 0, 0, -1  # the last record read: its position in the epoch's stream
        register_process_state(accelerator, "stream_position", self.state_dict, self.load_state_dict)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"position": torch.tensor([self.epoch, self.seen, self.position], dtype=torch.int64)}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.epoch, self.seen, self.position = state["position"].tolist()

    def resume_point(self, global_step: int) -> tuple[int, int]:
        """(epoch, micro-batches of it already seen): what the checkpoint loaded (0, 0 for a new run)."""
        if global_step == 0:
            return 0, 0
        return self.epoch, self.seen

    def _all_have(self, full: bool) -> bool:
        """Whether every process has a full accumulation cycle. Collective."""
        if self.accelerator.num_processes == 1:
            return full
        flags = self.accelerator.gather(torch.tensor([float(full)], device=self.accelerator.device))
        return bool(flags.min() > 0)

    def batches(self, epoch: int, skip: int):
        self.dataset.set_epoch(epoch)
        jump = skip > 0 and self.num_workers == 0 and self.epoch == epoch
        self.dataset.start = self.position + 1 if jump else 0
        iterator = iter(self.loader)
        if skip and not jump:  # workers: each reads its own part of the share, so re-read what was seen
            for _ in itertools.islice(iterator, skip):
                pass
        self.epoch, self.seen = epoch, skip
        while True:
            cycle = list(itertools.islice(iterator, self.accumulation))
            if not self._all_have(len(cycle) == self.accumulation):
                return
            for batch in cycle:
                self.seen += 1
                self.position = int(batch.pop("position").max())
                yield batch


def make_feed(dataset, config, accelerator: Accelerator):
    """The feed of ``dataset``: a ``StreamFeed`` for a stream, else a ``MapFeed``."""
    accumulation = config.gradient_accumulation_steps
    if isinstance(dataset, StreamingPreferenceDataset):
        return StreamFeed(dataset, config.train_batch_size, config.dataloader_num_workers, accelerator, accumulation)
    return MapFeed(
        dataset, config.train_batch_size, config.seed, config.dataloader_num_workers, accelerator, accumulation
    )
