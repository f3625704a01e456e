"""The data order through accelerate's prepared loader depends only on (seed, epoch), also after a skip (resume)."""

import torch
from accelerate import Accelerator

from diffalign.alignment.feed import EpochShuffleSampler, epoch_batches


def orders(accelerator, loader, sampler, plan):
    """The dataset indices seen in each (epoch, skip) pass of ``plan``, iterated in that sequence."""
    return [torch.cat(list(epoch_batches(accelerator, loader, sampler, e, s))).tolist() for e, s in plan]


def prepared(accelerator, n=12, seed=3, batch_size=3):
    sampler = EpochShuffleSampler(n, seed)
    loader = torch.utils.data.DataLoader(list(range(n)), batch_size=batch_size, sampler=sampler, drop_last=True)
    return accelerator.prepare(loader), sampler


def test_each_epoch_has_its_own_order_and_a_skip_keeps_it():
    accelerator = Accelerator(cpu=True)
    loader, sampler = prepared(accelerator)
    expected = {}
    for epoch in range(4):  # what (seed, epoch) alone says
        sampler.epoch = epoch
        expected[epoch] = list(sampler)
    fresh = orders(accelerator, loader, sampler, [(0, 0), (1, 0), (2, 0), (3, 0)])
    assert fresh == [expected[e] for e in range(4)]
    assert len({tuple(o) for o in fresh}) == 4  # epochs 0 and 1 (and 2, 3) differ

    # a run resumed in epoch 2 after 1 batch: a skip copy serves epoch 2, then the prepared loader epoch 3
    loader, sampler = prepared(accelerator)
    resumed = orders(accelerator, loader, sampler, [(2, 1), (3, 0)])
    assert resumed == [expected[2][3:], expected[3]]
    # and a fresh run whose first epoch is a skip copy too (the prepared loader's own counter then lags)
    loader, sampler = prepared(accelerator)
    late = orders(accelerator, loader, sampler, [(0, 2), (1, 0), (2, 0)])
    assert late == [expected[0][6:], expected[1], expected[2]]
