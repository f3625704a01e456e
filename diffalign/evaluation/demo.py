"""``diffalign sample``: every registered scheduler in a diffusers pipeline on the embedded ``gmm`` digits model.

The model is the analytic Gaussian mixture fitted to scikit-learn's digits (one component per class), so it needs
no download and its exact probability-flow solution is known: each row of the PNG grid is one scheduler at the same
NFE from the same starting noise, the first row is the exact ODE solution, and each row's title gives its RMS
distance to it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from diffusers import DDIMScheduler, DDPMPipeline, DDPMScheduler, DPMSolverMultistepScheduler  # noqa: E402
from diffusers.utils.torch_utils import randn_tensor  # noqa: E402

from ..models.gmm import GMM_SCHEDULER_DIR, GaussianMixture  # noqa: E402
from ..options import option  # noqa: E402
from ..samplers import SCHEDULERS, swap_scheduler  # noqa: E402
from ..samplers.side_info import SideInfoMixin  # noqa: E402

BASELINES = {"diffusers DDIM": DDIMScheduler, "diffusers DPMSolverMultistep": DPMSolverMultistepScheduler}


@dataclass
class SampleConfig:
    """Options of ``diffalign sample``."""

    out: str = option("diffalign_samples.png", "PNG file to write")
    nfe: int = option(6, "model evaluations per sample")
    num_images: int = option(8, "samples per scheduler")
    seed: int = option(0, "seed of the starting noise")

    def __post_init__(self):
        if self.nfe < 1:
            raise ValueError(f"--nfe must be >= 1, got {self.nfe}")


def run_sample_demo(config: SampleConfig) -> list[tuple[str, float]]:
    """Write the grid to ``config.out``; returns ``[(scheduler name, RMS error to the exact ODE solution), ...]``."""
    out, nfe, num_images, seed = config.out, config.nfe, config.num_images, config.seed
    gmm = GaussianMixture.from_digits()
    # linspace: every sampler starts at t = 999, where the exact solution starts (diffusers' default "leading" grid
    # would start lower); it is also the grid the shipped v3 statistics and DC-Solver ratios were made for
    pipe = DDPMPipeline(unet=gmm, scheduler=DDPMScheduler(clip_sample=False, timestep_spacing="linspace"))
    pipe.set_progress_bar_config(disable=True)
    # The same draw DDPMPipeline makes from the same generator, so every row starts from this x_T.
    x_T = randn_tensor((num_images, 1, 8, 8), generator=torch.Generator().manual_seed(seed), dtype=gmm.dtype)
    exact = gmm.reference_solution(x_T, float(gmm.noise_schedule.rho(999.0)), 0.0).float()
    rows = [("exact ODE solution", exact, 0.0)]
    for name, cls in (BASELINES | SCHEDULERS).items():
        swap_scheduler(pipe, cls)
        if isinstance(pipe.scheduler, SideInfoMixin):  # v3's EMS, DC-Solver's ratios: shipped for this model
            pipe.scheduler.load_side_info(GMM_SCHEDULER_DIR)
        images = pipe(
            batch_size=num_images,
            generator=torch.Generator().manual_seed(seed),
            num_inference_steps=nfe,
            output_type="pt",
        ).images  # (B, 1, 8, 8) in [0, 1]
        x0 = images.float() * 2 - 1
        rows.append((name, x0, (x0 - exact.clamp(-1, 1)).pow(2).mean().sqrt().item()))
    _plot(rows, nfe, out)
    return [(name, err) for name, _, err in rows[1:]]


def _plot(rows, nfe: int, out: str | Path) -> None:
    """One strip per row: the row's images side by side, titled with the scheduler and its error."""
    fig, axes = plt.subplots(len(rows), 1, figsize=(7, 1.15 * len(rows)), squeeze=False)
    for ax, (name, x0, err) in zip(axes[:, 0], rows, strict=True):
        padded = torch.nn.functional.pad(x0[:, 0].clamp(-1, 1), (1, 1, 1, 1), value=-1.0)  # (B, 10, 10)
        ax.imshow(torch.cat(list(padded), dim=1).numpy(), cmap="gray_r", vmin=-1, vmax=1)
        ax.set_title(name if err == 0.0 else f"{name}, NFE {nfe}: RMSE {err:.3f}", loc="left", fontsize=9)
        ax.axis("off")
    fig.tight_layout()
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
