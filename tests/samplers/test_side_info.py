"""Side-information files: atomic safetensors + JSON round trip, clear errors, and every path a diffusers user takes:
push_to_hub, hub ids through the offline cache, from_config / swap_scheduler, and the warning without them."""

import json
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from diffusers import configuration_utils
from diffusers.utils import hub_utils
from huggingface_hub import constants as hf_constants

from diffalign.samplers import DCSolverScheduler, DPMSolverPPScheduler, DPMSolverV3Scheduler, swap_scheduler
from diffalign.samplers.side_info import SideInfoMixin, hub_snapshot, read_side_info, save_side_info


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


# ---- every path a diffusers user takes ------------------------------------------------------------------------------
def toy(scale=None, **config):
    scheduler = ScaledScheduler(**config)
    scheduler.scale = scale
    return scheduler


def test_push_to_hub_uploads_the_side_files(tmp_path, monkeypatch):
    """diffusers uploads the folder from inside save_config: the side files must already be there."""
    uploaded = []

    def fake_upload_folder(repo_id, folder_path, **kwargs):
        uploaded.append(sorted(p.name for p in Path(folder_path).iterdir()))

    for module in (configuration_utils, hub_utils):
        monkeypatch.setattr(module, "create_repo", lambda repo_id, **kw: SimpleNamespace(repo_id=repo_id))
    monkeypatch.setattr(hub_utils, "upload_folder", fake_upload_folder)
    toy(torch.ones(3)).save_pretrained(tmp_path / "out", push_to_hub=True, repo_id="org/repo")
    toy(torch.ones(3)).push_to_hub("org/repo")  # diffusers' other path: save into a temporary folder, upload it
    files = ["scheduler_config.json", "toy_side_info.json", "toy_side_info.safetensors"]
    assert uploaded == [files, ["README.md", *files]]  # push_to_hub adds a model card


def offline_hub_cache(cache_dir, scheduler, repo_id="org/repo", subfolder="scheduler", commit="a" * 40):
    """A folder laid out as huggingface_hub's cache holding ``scheduler`` at ``repo_id/subfolder`` on main."""
    repo = cache_dir / f"models--{repo_id.replace('/', '--')}"
    scheduler.save_pretrained(repo / "snapshots" / commit / subfolder)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    return commit


def test_from_pretrained_hub_id_downloads_the_side_files(tmp_path, monkeypatch):
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    commit = offline_hub_cache(tmp_path, toy(torch.arange(4.0)))
    loaded = ScaledScheduler.from_pretrained("org/repo", subfolder="scheduler", cache_dir=tmp_path)
    assert torch.equal(loaded.scale, torch.arange(4.0))
    pinned = ScaledScheduler.from_pretrained("org/repo", subfolder="scheduler", cache_dir=tmp_path, revision=commit)
    assert torch.equal(pinned.scale, torch.arange(4.0))
    bare = tmp_path / "bare"
    offline_hub_cache(bare, toy(None))  # a repo without side information loads without it
    assert ScaledScheduler.from_pretrained("org/repo", subfolder="scheduler", cache_dir=bare).scale is None


def test_hub_snapshot_folders_are_recognised(tmp_path):
    folder = tmp_path / "models--org--repo" / "snapshots" / ("b" * 40) / "scheduler"
    folder.mkdir(parents=True)
    assert hub_snapshot(folder) == ("org/repo", "b" * 40, "scheduler", str(tmp_path.resolve()))
    assert hub_snapshot(tmp_path) is None


def test_from_config_and_swap_scheduler_carry_the_side_information():
    source = toy(torch.arange(3.0))
    assert torch.equal(ScaledScheduler.from_config(source.config).scale, torch.arange(3.0))
    assert torch.equal(ScaledScheduler.from_config(source).scale, torch.arange(3.0))  # the scheduler itself
    assert torch.equal(ScaledScheduler.from_config(source.config, solver_order=3).scale, torch.arange(3.0))
    assert ScaledScheduler.from_config(dict(source.config)).scale is None  # a copy names no source
    pipe = SimpleNamespace(scheduler=source)
    assert torch.equal(swap_scheduler(pipe, ScaledScheduler).scheduler.scale, torch.arange(3.0))


def test_dc_ratios_carry_over_when_the_settings_match():
    source = DCSolverScheduler()
    source.set_dc_ratios(5, [1.0, 1.0, 1.1, 0.9, 1.05])
    assert DCSolverScheduler.from_config(source.config).ratio_table == source.ratio_table
    with pytest.warns(UserWarning, match="not carried.*solver_order"):
        assert not DCSolverScheduler.from_config(source.config, solver_order=3).ratio_table
    pipe = SimpleNamespace(scheduler=source)
    assert swap_scheduler(pipe, "dc_solver").scheduler.ratio_table == source.ratio_table
    karras = DCSolverScheduler(use_karras_sigmas=True)  # diffusers' Karras grid is not our timestep_spacing='karras'
    karras.set_dc_ratios(5, [1.0, 1.0, 1.1, 0.9, 1.05])
    with pytest.warns(UserWarning, match="not carried.*use_karras_sigmas"):
        DCSolverScheduler.from_config(karras.config, use_karras_sigmas=False, timestep_spacing="karras")


@pytest.mark.parametrize("cls,match", [(DCSolverScheduler, "no compensation ratios"), (DPMSolverV3Scheduler, "EMS")])
def test_running_without_side_information_warns_at_every_set_timesteps(cls, match):
    """Each instance, each call: also under Python's default filter, which shows a location only once."""
    for _ in range(2):
        scheduler = cls()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("default")
            for n in (5, 5, 6):
                scheduler.set_timesteps(n)
        assert sum(match in str(w.message) for w in caught) == 3
