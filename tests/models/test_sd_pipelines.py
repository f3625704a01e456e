"""diffalign schedulers inside real diffusers pipelines: tiny random SD 1.5 and SDXL, CPU, offline."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import json  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from diffusers import (  # noqa: E402
    DDIMScheduler,
    DiffusionPipeline,
    DPMSolverMultistepScheduler,
    DPMSolverSinglestepScheduler,
    StableDiffusionImg2ImgPipeline,
)
from tiny_pipelines import SD_SIZE, SDXL_SIZE, make_sd_pipeline, make_sdxl_pipeline  # noqa: E402

from diffalign.samplers import SCHEDULERS, swap_scheduler  # noqa: E402

NAMES = sorted(SCHEDULERS)
VARIANTS = {
    "default": {},
    "order3": {"solver_order": 3},
    "singlestep": {"solver_mode": "singlestep"},
    "karras": {"timestep_spacing": "karras"},
}
SIZES = {"sd": SD_SIZE, "sdxl": SDXL_SIZE}
PROMPT = "a photo of an astronaut riding a horse"
STEPS = 6  # enough for third-order blocks and the lower-order final steps


@pytest.fixture(scope="module", autouse=True)
def single_thread():
    """Run the tiny models on one thread: thread start-up costs more than they compute, badly so on a busy box."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def sd_pipe(tmp_path_factory):
    return make_sd_pipeline(tmp_path_factory.mktemp("sd"))


@pytest.fixture(scope="module")
def sdxl_pipe(tmp_path_factory):
    return make_sdxl_pipeline(tmp_path_factory.mktemp("sdxl"))


def restoring_scheduler(pipe):
    """Yield ``pipe``, then put its loaded scheduler back, so swaps never leak config into later tests."""
    original = pipe.scheduler
    yield pipe
    pipe.scheduler = original


@pytest.fixture
def sd(sd_pipe):
    yield from restoring_scheduler(sd_pipe)


@pytest.fixture
def sdxl(sdxl_pipe):
    yield from restoring_scheduler(sdxl_pipe)


def generate(pipe, seed: int, steps: int = STEPS, size: int = SD_SIZE) -> np.ndarray:
    """One guided text-to-image sample as a (1, size, size, 3) float array in [0, 1]."""
    return pipe(
        PROMPT,
        num_inference_steps=steps,
        guidance_scale=5.0,
        height=size,
        width=size,
        output_type="np",
        generator=torch.Generator().manual_seed(seed),
    ).images


def public_config(scheduler) -> dict:
    """A scheduler's config without diffusers' bookkeeping keys (``_class_name``, ``_use_default_values``, ...)."""
    return {k: v for k, v in scheduler.config.items() if not k.startswith("_")}


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("kind", ["sd", "sdxl"])
def test_text_to_image(request, kind, name, variant):
    pipe = request.getfixturevalue(kind)
    size = SIZES[kind]
    swap_scheduler(pipe, name, **VARIANTS[variant])
    assert type(pipe.scheduler) is SCHEDULERS[name]

    image = generate(pipe, seed=0, size=size)
    assert image.shape == (1, size, size, 3)
    assert np.isfinite(image).all()
    np.testing.assert_array_equal(generate(pipe, seed=0, size=size), image)
    assert np.abs(generate(pipe, seed=1, size=size) - image).max() > 1e-3


@pytest.mark.parametrize("variant", ["default", "singlestep", "order3"])
@pytest.mark.parametrize("name", NAMES)
def test_img2img_starts_mid_schedule(sd, name, variant):
    swap_scheduler(sd, name, **VARIANTS[variant])
    img2img = StableDiffusionImg2ImgPipeline(**sd.components, requires_safety_checker=False)
    img2img.set_progress_bar_config(disable=True)
    init = torch.rand(1, 3, SD_SIZE, SD_SIZE, generator=torch.Generator().manual_seed(0))
    image = img2img(
        PROMPT,
        image=init,
        strength=0.5,
        num_inference_steps=STEPS,
        guidance_scale=5.0,
        output_type="np",
        generator=torch.Generator().manual_seed(0),
    ).images
    assert image.shape == (1, SD_SIZE, SD_SIZE, 3)
    assert np.isfinite(image).all()
    # strength 0.5 of 6 steps: the pipeline calls set_begin_index(3), add_noise at the 4th timestep, then 3 steps.
    assert img2img.scheduler.begin_index == STEPS // 2
    assert img2img.scheduler.step_index == STEPS


@pytest.mark.parametrize("name", NAMES)
def test_saved_pipeline_reloads_our_scheduler(sd, name, tmp_path):
    swap_scheduler(sd, name, solver_order=3, timestep_spacing="karras")
    sd.save_pretrained(tmp_path)
    library, class_name = json.loads((tmp_path / "model_index.json").read_text())["scheduler"]
    # diffusers records a non-diffusers class by its full module path, e.g. "diffalign.samplers.dpm_solver".
    assert (library.split(".")[0], class_name) == ("diffalign", SCHEDULERS[name].__name__)

    reloaded = DiffusionPipeline.from_pretrained(tmp_path)
    reloaded.set_progress_bar_config(disable=True)
    assert type(reloaded.scheduler) is SCHEDULERS[name]
    assert public_config(reloaded.scheduler) == public_config(sd.scheduler)
    np.testing.assert_array_equal(generate(reloaded, seed=0), generate(sd, seed=0))


def test_swap_unknown_name_raises_helpful_error(sd):
    original = sd.scheduler
    with pytest.raises(ValueError, match="no_such_name") as info:
        swap_scheduler(sd, "no_such_name")
    message = str(info.value)
    assert all(name in message for name in NAMES)
    assert "DDIMScheduler" in message  # points at diffusers class names too
    assert sd.scheduler is original


def test_swap_diffusers_class_name(sd):
    original_config = public_config(sd.scheduler)
    assert swap_scheduler(sd, "DDIMScheduler") is sd
    assert type(sd.scheduler) is DDIMScheduler
    for key in ("beta_start", "beta_end", "beta_schedule", "steps_offset", "timestep_spacing"):
        assert sd.scheduler.config[key] == original_config[key]
    assert np.isfinite(generate(sd, seed=0)).all()


# Same solver, same grid in both libraries: (our name, our overrides, diffusers class, its overrides). The comment on
# each case is the max |image difference| measured over the 8-step SD run (torch 2.13 CPU, diffusers 0.42.1).
SAME_ALGORITHM = {
    # DPM-Solver++(2M), leading spacing, lower-order final step to sigma 0: 4.2e-07
    "dpm_solver_pp-2M": ("dpm_solver_pp", {}, DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++"}),
    # DPM-Solver++(3M): 3.6e-07
    "dpm_solver_pp-3M": (
        "dpm_solver_pp",
        {"solver_order": 3},
        DPMSolverMultistepScheduler,
        {"solver_order": 3, "algorithm_type": "dpmsolver++"},
    ),
    # DPM-Solver-2 multistep; diffusers' noise form cannot step to sigma 0, so both end at sigma_min: 4.5e-07
    "dpm_solver-2M-sigma_min": (
        "dpm_solver",
        {"final_sigmas_type": "sigma_min"},
        DPMSolverMultistepScheduler,
        {"algorithm_type": "dpmsolver", "final_sigmas_type": "sigma_min"},
    ),
    # DPM-Solver++(2S); diffusers' singlestep scheduler always uses linspace and defaults to lower_order_final=False:
    # 4.8e-07
    "dpm_solver_pp-2S-linspace": (
        "dpm_solver_pp",
        {"solver_mode": "singlestep", "timestep_spacing": "linspace"},
        DPMSolverSinglestepScheduler,
        {"algorithm_type": "dpmsolver++", "lower_order_final": True},
    ),
}


@pytest.mark.filterwarnings("ignore::FutureWarning")  # diffusers deprecates its algorithm_type="dpmsolver"
@pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")  # diffusers' np.array(tensor)
@pytest.mark.parametrize("case", SAME_ALGORITHM)
def test_matches_diffusers_on_the_same_algorithm(sd, case):
    """Where diffusers implements the same solver on the same grid, the SD images agree to float32 rounding."""
    name, overrides, diffusers_cls, diffusers_overrides = SAME_ALGORITHM[case]
    config = sd.scheduler.config
    swap_scheduler(sd, name, **overrides)
    ours = generate(sd, seed=0, steps=8)
    sd.scheduler = diffusers_cls.from_config(config, **diffusers_overrides)
    reference = generate(sd, seed=0, steps=8)
    assert np.abs(ours - reference).max() < 1e-4
