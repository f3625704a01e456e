"""Learned side information of a scheduler (DPM-Solver-v3's EMS, DC-Solver's ratios) as files beside its config.

A scheduler with side information sets ``side_info_name`` (the file stem) and implements ``side_info_state()``
(tensors + JSON metadata to save) and ``_load_side_info(tensors, meta)`` (validate and adopt). This mixin gives it
``save_pretrained`` / ``from_pretrained`` that write and find ``<stem>.safetensors`` + ``<stem>.json`` next to
``scheduler_config.json`` (locally or on the hub), ``from_config`` that carries them over from the source scheduler,
and ``load_side_info(directory)``. Files are
written atomically (temporary file, then ``os.replace``); nothing is unpickled.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import tempfile
import warnings
import weakref
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file


def model_fingerprint(model) -> str:
    """A short identity of a model: a string is kept as is; a ``torch.nn.Module`` hashes its class, parameter and
    buffer names, shapes and values (sha256).

    A module whose state holds values derived at load time with platform-dependent bits (an eigendecomposition)
    defines ``fingerprint_tensors()``, the named tensors that define it; those are hashed instead of its state dict,
    so the fingerprint is the same in every process.
    """
    if isinstance(model, str):
        return model
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model_fingerprint takes a torch.nn.Module or a str, got {type(model).__name__}.")
    tensors = model.fingerprint_tensors() if hasattr(model, "fingerprint_tensors") else model.state_dict()
    digest = hashlib.sha256(type(model).__name__.encode())
    for name, tensor in sorted(tensors.items()):
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


HUB_KWARGS = ("cache_dir", "revision", "token", "local_files_only", "force_download", "proxies")
"""``from_pretrained`` keywords that also apply to downloading the side files."""


def hub_snapshot(directory: Path) -> tuple[str, str, str, str] | None:
    """``(repo_id, commit, subfolder, cache_dir)`` when ``directory`` lies in a ``huggingface_hub`` cache snapshot
    (``<cache>/models--org--name/snapshots/<commit>/<subfolder>``), the folder ``DiffusionPipeline.from_pretrained``
    hands its components; None otherwise."""
    parts = directory.resolve().parts
    for k in range(len(parts) - 2):
        if parts[k].startswith("models--") and parts[k + 1] == "snapshots":
            repo_id = parts[k].removeprefix("models--").replace("--", "/")
            return repo_id, parts[k + 2], "/".join(parts[k + 3 :]), str(Path(*parts[:k]))
    return None


def download_side_info(repo_id: str, stem: str, subfolder: str | None = None, **hub_kwargs) -> Path | None:
    """Fetch ``<stem>.safetensors`` + ``<stem>.json`` from a hub repo (or the offline cache) with
    ``huggingface_hub.hf_hub_download``; returns their local folder, or None when the repo has no such files."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    try:
        paths = [
            hf_hub_download(repo_id, f"{stem}{suffix}", subfolder=subfolder or None, **hub_kwargs)
            for suffix in (".safetensors", ".json")
        ]
    except EntryNotFoundError:  # LocalEntryNotFoundError (offline, not cached) is one too
        return None
    return Path(paths[0]).parent


def warn_each_time(message: str, stacklevel: int = 2) -> None:
    """``warnings.warn`` that repeats on every call, not once per code location as the default filter does, so that
    every run without side information says so; ``ignore`` / ``error`` filters still apply."""
    frame = inspect.currentframe()
    for _ in range(stacklevel):
        frame = frame.f_back if frame.f_back is not None else frame
    module = frame.f_globals.get("__name__", "<unknown>")
    warnings.warn_explicit(message, UserWarning, frame.f_code.co_filename, frame.f_lineno, module, registry={})


_LIVE: weakref.WeakSet = weakref.WeakSet()
"""Every scheduler with side information, so that ``from_config(scheduler.config)`` can find the config's owner."""


class SideInfoMixin:
    """Side information that survives every path a diffusers user takes.

    ``save_pretrained`` writes the files before diffusers' ``save_config`` uploads the folder (``push_to_hub``);
    ``from_pretrained`` reads them from a local folder, a hub id (``subfolder``, ``revision``, ``cache_dir``, through
    ``huggingface_hub``) or the hub cache snapshot a pipeline was loaded from; ``from_config`` carries them over from
    the scheduler whose config (or which scheduler itself) is passed, when it has them and they fit
    (``carry_side_info``).
    """

    side_info_name: str = ""

    def __new__(cls, *args, **kwargs):
        scheduler = super().__new__(cls)
        _LIVE.add(scheduler)
        return scheduler

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

    def carry_side_info(self, source) -> bool:
        """Adopt ``source``'s side information when it has the same kind and it fits this scheduler (same noise
        schedule; for DC-Solver also the sampler settings); warn and keep none when it does not fit."""
        if getattr(source, "side_info_name", None) != self.side_info_name or source is self:
            return False
        state = source.side_info_state()
        if state is None:
            return False
        try:
            self._load_side_info(*state)
        except ValueError as err:
            warn_each_time(f"{type(self).__name__}: the side information of the source scheduler not carried: {err}")
            return False
        return True

    def save_pretrained(self, save_directory: str | os.PathLike, push_to_hub: bool = False, **kwargs) -> None:
        """Write the side files, then diffusers' config (which uploads the whole folder with ``push_to_hub``)."""
        state = self.side_info_state()
        if state is not None:
            save_side_info(save_directory, self.side_info_name, *state)
        super().save_pretrained(os.fspath(save_directory), push_to_hub=push_to_hub, **kwargs)  # diffusers wants str

    @classmethod
    def from_config(cls, config=None, return_unused_kwargs=False, **kwargs):
        """diffusers' ``from_config``; also takes a scheduler, and carries the side information of the scheduler
        whose config (the very object ``scheduler.config``) or which scheduler is passed."""
        source = config if isinstance(config, SideInfoMixin) else None
        if source is None and config is not None:
            source = next((s for s in list(_LIVE) if s.config is config), None)
        if isinstance(config, SideInfoMixin):
            config = config.config
        out = super().from_config(config, return_unused_kwargs=return_unused_kwargs, **kwargs)
        if source is not None:
            (out[0] if return_unused_kwargs else out).carry_side_info(source)
        return out

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path=None, subfolder=None, return_unused_kwargs=False, **kwargs):
        """diffusers' ``from_pretrained``, then the side information from the same folder, hub repo or cache."""
        hub_kwargs = {k: kwargs[k] for k in HUB_KWARGS if kwargs.get(k) is not None}
        out = super().from_pretrained(
            pretrained_model_name_or_path, subfolder=subfolder, return_unused_kwargs=return_unused_kwargs, **kwargs
        )
        scheduler = out[0] if return_unused_kwargs else out
        stem = cls.side_info_name
        directory = Path(pretrained_model_name_or_path or ".") / (subfolder or "")
        if directory.is_dir():
            snapshot = None if has_side_info(directory, stem) else hub_snapshot(directory)
            if snapshot is not None:  # a pipeline download that skipped *.safetensors: fetch the files by name
                repo_id, commit, folder, cache_dir = snapshot
                directory = download_side_info(repo_id, stem, folder, revision=commit, cache_dir=cache_dir)
        else:
            directory = download_side_info(str(pretrained_model_name_or_path), stem, subfolder, **hub_kwargs)
        if directory is not None and has_side_info(directory, stem):
            scheduler.load_side_info(directory)
        return out
