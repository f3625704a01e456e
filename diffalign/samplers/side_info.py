"""Learned side information of a scheduler (DPM-Solver-v3's EMS, DC-Solver's ratios) as files beside its config.

A scheduler with side information sets ``side_info_name`` (the file stem) and implements ``side_info_state()``
(tensors + JSON metadata to save) and ``_load_side_info(tensors, meta)`` (validate and adopt). This mixin gives it
``save_pretrained`` / ``from_pretrained`` that write and find ``<stem>.safetensors`` + ``<stem>.json`` next to
``scheduler_config.json``, and ``load_side_info(directory)`` for schedulers built with ``from_config``. Files are
written atomically (temporary file, then ``os.replace``); nothing is unpickled.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file


def model_fingerprint(model) -> str:
    """A short identity of a model: a string is kept as is; a ``torch.nn.Module`` hashes its class, parameter and
    buffer names, shapes and values (sha256)."""
    if isinstance(model, str):
        return model
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model_fingerprint takes a torch.nn.Module or a str, got {type(model).__name__}.")
    digest = hashlib.sha256(type(model).__name__.encode())
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return f"{type(model).__name__}:sha256:{digest.hexdigest()[:16]}"


def schedule_fingerprint(schedule) -> str:
    """A short hash of a ``NoiseScheduleVP``'s ``alphas_cumprod``: side information is only valid under it."""
    return hashlib.sha256(np.ascontiguousarray(schedule.alphas_cumprod).tobytes()).hexdigest()[:16]


def _atomic_write(path: Path, write) -> None:
    """Call ``write(tmp_path)`` then rename onto ``path``, so a crash never leaves a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def save_side_info(directory: str | os.PathLike, stem: str, tensors: dict[str, torch.Tensor], meta: dict) -> Path:
    """Write ``<stem>.safetensors`` (contiguous CPU tensors) and ``<stem>.json`` (metadata) into ``directory``."""
    directory = Path(directory)
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    _atomic_write(directory / f"{stem}.safetensors", lambda p: save_file(tensors, p))
    text = json.dumps(meta, indent=1, sort_keys=True)
    _atomic_write(directory / f"{stem}.json", lambda p: Path(p).write_text(text))
    return directory


def read_side_info(directory: str | os.PathLike, stem: str) -> tuple[dict[str, torch.Tensor], dict]:
    """Read what ``save_side_info`` wrote; a clear error when a file is missing or unreadable."""
    directory = Path(directory)
    tensor_path, meta_path = directory / f"{stem}.safetensors", directory / f"{stem}.json"
    missing = [p.name for p in (tensor_path, meta_path) if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"{directory} has no {' or '.join(missing)}; expected both files of {stem!r}.")
    try:
        meta = json.loads(meta_path.read_text())
        tensors = load_file(str(tensor_path))
    except Exception as err:  # corrupt JSON / safetensors header
        raise ValueError(f"cannot read {stem!r} from {directory}: {err}. Recompute and save it again.") from err
    return tensors, meta


def has_side_info(directory: str | os.PathLike, stem: str) -> bool:
    return (Path(directory) / f"{stem}.safetensors").is_file()


class SideInfoMixin:
    """``save_pretrained`` / ``from_pretrained`` / ``load_side_info`` for schedulers with learned side information."""

    side_info_name: str = ""

    def side_info_state(self) -> tuple[dict[str, torch.Tensor], dict] | None:
        """(tensors, metadata) to save, or None when the scheduler runs on its fallback."""
        raise NotImplementedError

    def _load_side_info(self, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        """Validate against this scheduler's config and adopt; raise ValueError on a mismatch."""
        raise NotImplementedError

    def load_side_info(self, directory: str | os.PathLike):
        """Load ``<side_info_name>.safetensors`` + ``.json`` from ``directory``; returns ``self``."""
        tensors, meta = read_side_info(directory, self.side_info_name)
        self._load_side_info(tensors, meta)
        return self

    def save_pretrained(self, save_directory: str | os.PathLike, push_to_hub: bool = False, **kwargs) -> None:
        super().save_pretrained(save_directory, push_to_hub=push_to_hub, **kwargs)
        state = self.side_info_state()
        if state is not None:
            save_side_info(save_directory, self.side_info_name, *state)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path=None, subfolder=None, return_unused_kwargs=False, **kwargs):
        """diffusers' ``from_pretrained``, then the side information from the same local folder when it is there."""
        out = super().from_pretrained(
            pretrained_model_name_or_path, subfolder=subfolder, return_unused_kwargs=return_unused_kwargs, **kwargs
        )
        scheduler = out[0] if return_unused_kwargs else out
        directory = Path(pretrained_model_name_or_path or ".") / (subfolder or "")
        if directory.is_dir() and has_side_info(directory, cls.side_info_name):
            scheduler.load_side_info(directory)
        return out
