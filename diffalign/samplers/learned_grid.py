"""Learned time grids (GITS, LD3) as side information of a scheduler, for ours and for diffusers' own.

A learned grid is, per (solver, NFE[, guidance scale]), the ``n + 1`` decreasing diffusers sigmas
``rho = sigma_t / alpha_t`` a sampler steps on (the last one 0: the solve ends on the data). The grids of one model
live in one ``learned_grids.safetensors`` + ``learned_grids.json`` pair beside ``scheduler_config.json`` (written
with ``side_info.save_side_info``), together with the schedule and model fingerprints they are valid for.

- Our schedulers (``VPScheduler``) load the file in ``from_pretrained`` (or ``load_learned_grids(folder)``) and
  ``set_timesteps(n)`` steps on the grid for ``n`` when one exists for the scheduler's class.
- diffusers' schedulers: ``pipeline_grid_kwargs`` returns the ``timesteps=`` to pass to a pipeline, and
  ``set_grid`` puts a grid on any scheduler directly (also on those whose ``set_timesteps`` takes no custom VP
  timesteps, e.g. ``UniPCMultistepScheduler``).

Grids for diffusers' schedulers are stored at integer timesteps (those schedulers round model times to integers).
"""

from __future__ import annotations

import inspect
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .schedule import NoiseScheduleVP
from .side_info import has_side_info, model_fingerprint, read_side_info, save_side_info, schedule_fingerprint

GRIDS_FILE = "learned_grids"
"""Stem of the side-information files (``learned_grids.safetensors`` / ``.json``)."""

FORMAT = "diffalign.learned_grids/1"


def grid_key(solver: str, nfe: int, guidance_scale: float | None = None, method: str | None = None) -> str:
    """The table key of one grid: ``"UniPCMultistepScheduler/nfe=5"`` or ``".../nfe=5/guidance_scale=7.5"``; with
    ``method``, the key of an alternative kept beside the selected grid (``".../nfe=5/method=gits"``)."""
    key = f"{solver}/nfe={int(nfe)}"
    if guidance_scale is not None:
        key = f"{key}/guidance_scale={float(guidance_scale):g}"
    return key if method is None else f"{key}/method={method}"


def solver_name(scheduler) -> str:
    """The solver a grid belongs to: a scheduler's class name, e.g. ``UniPCMultistepScheduler`` (a str is kept)."""
    return scheduler if isinstance(scheduler, str) else type(scheduler).__name__


def check_sigmas(sigmas) -> np.ndarray:
    """``sigmas`` as a float64 array of >= 2 strictly decreasing values ending at >= 0; a clear error otherwise."""
    rhos = np.asarray(sigmas, dtype=np.float64).reshape(-1)
    if len(rhos) < 2 or not np.all(np.isfinite(rhos)) or np.any(np.diff(rhos) >= 0) or rhos[-1] < 0:
        raise ValueError(
            f"a time grid must be >= 2 strictly decreasing finite sigmas ending at >= 0; got {rhos.tolist()}."
        )
    return rhos


@dataclass
class LearnedGrids:
    """The grids of one model under one noise schedule: ``grids[key]`` (n + 1,) sigmas, ``info[key]`` metadata."""

    schedule: str
    """``schedule_fingerprint`` of the noise schedule the grids were learned under."""
    model: str
    """``model_fingerprint`` of the model."""
    grids: dict[str, np.ndarray] = field(default_factory=dict)
    info: dict[str, dict] = field(default_factory=dict)

    def add(self, solver: str, sigmas, guidance_scale: float | None = None, alternative: bool = False, **info) -> str:
        """Store ``sigmas`` (n + 1 values, n = NFE) for ``solver``; ``info`` (method, losses, ...) goes to the JSON.

        The grid becomes the selected one for (solver, NFE, guidance scale), which ``set_timesteps`` uses; with
        ``alternative`` it is kept beside it under its ``info["method"]`` instead (``get(..., method=)``, and the
        ``grid=<method>`` rows of ``diffalign bench``).
        """
        rhos = check_sigmas(sigmas)
        if alternative and "method" not in info:
            raise ValueError("an alternative grid is stored under its method: pass method='gits' (or the like).")
        key = grid_key(solver_name(solver), len(rhos) - 1, guidance_scale, info["method"] if alternative else None)
        self.grids[key] = rhos
        self.info[key] = dict(info)
        return key

    def get(
        self, solver, nfe: int, guidance_scale: float | None = None, method: str | None = None
    ) -> np.ndarray | None:
        """The grid for (solver, nfe, guidance scale), falling back to the grid learned without a guidance scale.

        ``method`` None: the selected grid. A method (``"gits"``, ``"ld3"``): its alternative, or the selected grid
        when that one was made by ``method``; None when there is neither.
        """
        name = solver_name(solver)
        for scale in dict.fromkeys((guidance_scale, None)):
            selected = grid_key(name, nfe, scale)
            if method is None and selected in self.grids:
                return self.grids[selected]
            if method is not None:
                if grid_key(name, nfe, scale, method) in self.grids:
                    return self.grids[grid_key(name, nfe, scale, method)]
                if selected in self.grids and self.info[selected].get("method") == method:
                    return self.grids[selected]
        return None

    def save(self, directory: str | os.PathLike) -> Path:
        """Write ``learned_grids.safetensors`` + ``.json`` into ``directory`` (atomically)."""
        tensors = {key: torch.tensor(rhos) for key, rhos in self.grids.items()}  # copies: grids may share arrays
        meta = dict(format=FORMAT, schedule_sha256=self.schedule, model_fingerprint=self.model, grids=self.info)
        return save_side_info(directory, GRIDS_FILE, tensors, meta)

    @classmethod
    def load(cls, directory: str | os.PathLike) -> LearnedGrids:
        tensors, meta = read_side_info(directory, GRIDS_FILE)
        if meta.get("format") != FORMAT:
            raise ValueError(f"{directory}/{GRIDS_FILE}.json has format {meta.get('format')!r}, expected {FORMAT!r}.")
        grids = {key: check_sigmas(t.double().numpy()) for key, t in tensors.items()}
        info = {key: dict(meta.get("grids", {}).get(key, {})) for key in grids}
        return cls(schedule=meta["schedule_sha256"], model=meta["model_fingerprint"], grids=grids, info=info)

    def check_schedule(self, schedule: NoiseScheduleVP, where: str = "") -> None:
        """Raise when the grids were learned under another noise schedule."""
        ours = schedule_fingerprint(schedule)
        if ours != self.schedule:
            raise ValueError(
                f"learned grids{where} were computed for noise schedule {self.schedule}, but this scheduler's is "
                f"{ours}; recompute them with `diffalign calibrate --grid` for this model."
            )

    def check_model(self, model) -> None:
        """Raise when ``model`` (a module or a fingerprint string) is not the one the grids were learned for."""
        ours = model_fingerprint(model)
        if ours != self.model:
            raise ValueError(
                f"learned grids belong to model {self.model}, not {ours}; recompute them for this model with "
                "`diffalign calibrate --grid`."
            )


class LearnedGridMixin:
    """Learned grids for a ``VPScheduler``: ``from_pretrained`` / ``save_pretrained`` carry them, and
    ``set_timesteps(n)`` uses ``learned_sigmas(n)`` when it is not None."""

    learned_grids: LearnedGrids | None = None
    grid_guidance_scale: float | None = None
    """The guidance scale whose grids ``set_timesteps`` picks (grids learned without one are the fallback)."""

    def load_learned_grids(self, directory: str | os.PathLike):
        """Adopt ``directory``'s learned grids after checking the schedule fingerprint; returns ``self``."""
        grids = LearnedGrids.load(directory)
        grids.check_schedule(self.noise_schedule, f" in {directory}")
        self.learned_grids = grids
        return self

    def learned_sigmas(self, nfe: int) -> list[float] | None:
        """The loaded grid for ``nfe`` steps of this solver, or None (then the configured spacing applies)."""
        if self.learned_grids is None:
            return None
        rhos = self.learned_grids.get(self, nfe, self.grid_guidance_scale)
        return None if rhos is None else rhos.tolist()

    def save_pretrained(self, save_directory: str | os.PathLike, push_to_hub: bool = False, **kwargs) -> None:
        super().save_pretrained(save_directory, push_to_hub=push_to_hub, **kwargs)
        if self.learned_grids is not None:
            self.learned_grids.save(save_directory)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path=None, subfolder=None, return_unused_kwargs=False, **kwargs):
        """diffusers' ``from_pretrained``, then the learned grids from the same local folder when they are there."""
        out = super().from_pretrained(
            pretrained_model_name_or_path, subfolder=subfolder, return_unused_kwargs=return_unused_kwargs, **kwargs
        )
        scheduler = out[0] if return_unused_kwargs else out
        directory = Path(pretrained_model_name_or_path or ".") / (subfolder or "")
        if directory.is_dir() and has_side_info(directory, GRIDS_FILE):
            scheduler.load_learned_grids(directory)
        return out


# ---- diffusers' schedulers -------------------------------------------------------------------------------------


def integer_grid(schedule: NoiseScheduleVP, sigmas) -> np.ndarray:
    """``sigmas`` moved to the nearest integer timesteps (as diffusers' schedulers evaluate the model there); the
    final 0 is kept. Raises when two steps land on the same integer timestep."""
    rhos = check_sigmas(sigmas)
    with np.errstate(divide="ignore"):
        times = np.round(schedule.t_of_lambda(-np.log(rhos[:-1])))
    if np.any(np.diff(times) >= 0):
        raise ValueError(f"grid {rhos.tolist()} has two steps on one integer timestep ({times.tolist()}).")
    return np.concatenate([schedule.rho(times), rhos[-1:]])


def grid_timesteps(schedule: NoiseScheduleVP, sigmas) -> list[int]:
    """The ``n`` integer model timesteps of a grid that ends at sigma 0 (diffusers' ``timesteps=``)."""
    rhos = check_sigmas(sigmas)
    if rhos[-1] != 0:
        raise ValueError("diffusers' schedulers end at sigma 0 (final_sigmas_type='zero'); the grid must end at 0.")
    return [int(t) for t in np.round(schedule.t_of_lambda(-np.log(rhos[:-1])))]


def pipeline_grid_kwargs(scheduler, grids: LearnedGrids, nfe: int, guidance_scale: float | None = None) -> dict:
    """``{"timesteps": [...]}`` to pass to a diffusers pipeline whose scheduler is ``scheduler`` for a learned grid.

    ``pipe(prompt, **pipeline_grid_kwargs(pipe.scheduler, grids, 5))``. Raises when no grid is stored for this
    scheduler and NFE, or when the scheduler's ``set_timesteps`` takes no custom timesteps (use ``set_grid`` and a
    sampling loop of your own then).
    """
    rhos = grids.get(scheduler, nfe, guidance_scale)
    if rhos is None:
        raise ValueError(
            f"no learned grid for {grid_key(solver_name(scheduler), nfe, guidance_scale)}; have {list(grids.grids)}."
        )
    if "timesteps" not in inspect.signature(scheduler.set_timesteps).parameters:
        raise ValueError(
            f"{type(scheduler).__name__}.set_timesteps takes no custom timesteps; put the grid on it with "
            "learned_grid.set_grid(scheduler, sigmas) and run the denoising loop yourself."
        )
    return {"timesteps": grid_timesteps(NoiseScheduleVP.from_config(scheduler.config), rhos)}


def set_grid(scheduler, sigmas, device=None) -> None:
    """Put the grid ``sigmas`` (n + 1, last 0) on ``scheduler``: ours through ``set_timesteps(sigmas=)``; diffusers'
    schedulers through ``set_timesteps(n)`` (which resets their state) and then their ``timesteps`` / ``sigmas``
    replaced by the grid at integer timesteps."""
    rhos = check_sigmas(sigmas)
    if hasattr(scheduler, "learned_sigmas"):
        scheduler.set_timesteps(sigmas=rhos.tolist(), device=device)
        return
    schedule = NoiseScheduleVP.from_config(scheduler.config)
    timesteps = grid_timesteps(schedule, rhos)
    scheduler.set_timesteps(len(timesteps), device=device)
    if len(scheduler.timesteps) != len(timesteps) or len(scheduler.sigmas) != len(rhos):
        raise ValueError(f"{type(scheduler).__name__} does not take one model call per grid step; cannot set a grid.")
    scheduler.timesteps = torch.tensor(timesteps, dtype=scheduler.timesteps.dtype, device=scheduler.timesteps.device)
    scheduler.sigmas = torch.from_numpy(np.concatenate([schedule.rho(timesteps), [0.0]])).to(scheduler.sigmas.dtype)
