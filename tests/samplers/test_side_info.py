"""Side-information files: atomic safetensors + JSON round trip, discovery by from_pretrained, clear errors."""

import json

import pytest
import torch

from diffalign.samplers import DPMSolverPPScheduler
from diffalign.samplers.side_info import SideInfoMixin, read_side_info, save_side_info


class ScaledScheduler(SideInfoMixin, DPMSolverPPScheduler):
    """A toy scheduler whose side information is one tensor tied to num_train_timesteps."""

    side_info_name = "toy_side_info"

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.scale = None

    def side_info_state(self):
        if self.scale is None:
            return None
        return {"scale": self.scale}, {"num_train_timesteps": self.config.num_train_timesteps}

    def _load_side_info(self, tensors, meta):
        if meta["num_train_timesteps"] != self.config.num_train_timesteps:
            raise ValueError("computed for another schedule")
        self.scale = tensors["scale"]


def test_round_trip_through_pretrained_folder(tmp_path):
    scheduler = ScaledScheduler()
    scheduler.scale = torch.arange(5.0)
    scheduler.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "scheduler_config.json",
        "toy_side_info.json",
        "toy_side_info.safetensors",
    ]
    loaded = ScaledScheduler.from_pretrained(tmp_path)
    assert torch.equal(loaded.scale, torch.arange(5.0))
    assert ScaledScheduler().load_side_info(tmp_path).scale.sum().item() == 10.0


def test_mismatch_and_corruption_are_clear(tmp_path):
    save_side_info(tmp_path, "toy_side_info", {"scale": torch.ones(2)}, {"num_train_timesteps": 7})
    with pytest.raises(ValueError, match="another schedule"):
        ScaledScheduler().load_side_info(tmp_path)
    (tmp_path / "toy_side_info.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="cannot read 'toy_side_info'"):
        read_side_info(tmp_path, "toy_side_info")
    with pytest.raises(FileNotFoundError, match="toy_side_info.json"):
        read_side_info(tmp_path / "empty", "toy_side_info")


def test_atomic_write_leaves_no_temporaries(tmp_path):
    save_side_info(tmp_path, "s", {"a": torch.zeros(3)}, {"k": 1})
    save_side_info(tmp_path, "s", {"a": torch.ones(3)}, {"k": 2})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.json", "s.safetensors"]
    assert json.loads((tmp_path / "s.json").read_text()) == {"k": 2}
