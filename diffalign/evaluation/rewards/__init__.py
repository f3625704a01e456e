"""Reward models behind one interface, ``RewardModel.score(images, prompts) -> (N,)``, loaded by name.

``load_reward("digits")`` is the embedded CPU default (no download). The hub rewards load from their published hub
id (``load_reward("pickscore")``), another hub id or a local folder (``load_reward("pickscore:/tmp/tiny")``), with
``revision`` pinning a hub commit; ``reward.version`` records what was loaded. Rewards published only as pickled
checkpoints (HPSv2.1, ImageReward, the LAION aesthetic MLP) are converted once to safetensors by
``scripts/convert_reward_checkpoint.py``.
"""

from __future__ import annotations

import importlib
from pathlib import Path

import torch

from .base import RewardModel, refuse_pickle

# name -> "module:class" in this package; each class has ``load(source, device, revision, **kwargs)``
REWARDS = {
    "digits": "digits:DigitsReward",
    "clip": "clip:CLIPScore",
    "pickscore": "clip:PickScore",
    "hpsv2.1": "hps:HPSv21",
    "imagereward": "imagereward:ImageReward",
    "aesthetic": "aesthetic:AestheticPredictor",
}


def reward_class(name: str) -> type[RewardModel]:
    """The ``RewardModel`` subclass registered under ``name``."""
    if name not in REWARDS:
        raise ValueError(
            f"unknown reward {name!r}; choose one of {sorted(REWARDS)}, optionally as 'name:path_or_hub_id'."
        )
    module_name, class_name = REWARDS[name].split(":")
    return getattr(importlib.import_module(f"{__name__}.{module_name}"), class_name)


def load_reward(
    name_or_path: str, device: str | torch.device = "cpu", revision: str | None = None, **kwargs
) -> RewardModel:
    """Load a reward by registered name, or as ``"name:path_or_hub_id"`` from a local folder or another hub id.

    ``revision`` pins the hub commit (branch, tag or hash; the resolved commit goes into ``.version``); ``kwargs`` go
    to the reward's loader (e.g. ``batch_size``).
    """
    name, _, source = name_or_path.partition(":")
    if name not in REWARDS:
        refuse_pickle(name_or_path)
        if Path(name_or_path).expanduser().exists():
            raise ValueError(
                f"{name_or_path} is a path; say which reward it holds as 'name:path', e.g. 'pickscore:{name_or_path}' "
                f"(rewards: {sorted(REWARDS)})."
            )
    return reward_class(name).load(source or None, device=device, revision=revision, **kwargs)


__all__ = ["REWARDS", "RewardModel", "load_reward", "reward_class"]
