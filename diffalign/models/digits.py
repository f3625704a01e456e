"""Embedded "digits" models: a digits classifier, an unconditional and a class-conditional diffusion model.

Everything here runs offline on CPU and is small enough to ship inside the package:

- Data: the 1,797 handwritten digits that scikit-learn ships (``sklearn.datasets.load_digits``), kept at their
  native 8x8 resolution (no padding, no upsampling) and scaled from 0..16 to [-1, 1]. Every model in this module
  sees images of shape (B, 1, 8, 8) in [-1, 1] ("model space"). A fixed, seeded, stratified 20% of the images is
  held out to measure the classifier; the diffusion models train on all images.
- ``DigitsClassifier``: a small CNN whose 64-D penultimate features define the Fréchet distance "FD-digits"
  (see ``diffalign.evaluation.frechet``).
- ``digits``: a diffusers ``UNet2DModel`` (epsilon prediction, DDPM linear betas 1e-4..0.02, 1,000 steps).
- ``digits-cond``: a diffusers ``UNet2DConditionModel`` conditioned through the text path: ``DigitsPromptEncoder``
  turns a prompt such as ``"a handwritten 7"`` or ``"seven"`` into ``encoder_hidden_states`` of shape (B, 1, D)
  through a learned table with one row per digit and one "null" row for the empty prompt, which is what
  classifier-free guidance uses as the unconditional branch.
- ``DigitsPipeline``: a ``DiffusionPipeline`` whose loop follows ``StableDiffusionPipeline`` (``set_timesteps``,
  ``init_noise_sigma``, ``scale_model_input``, ``step(...).prev_sample``), so any diffusers scheduler swaps in with
  ``pipe.scheduler = X.from_config(pipe.scheduler.config)``.

The shipped weights live in ``diffalign/assets/digits/`` as saved diffusers folders (safetensors + JSON, float16
to keep them small) and are retrained by ``scripts/train_embedded.py``. The loaders read them with safetensors
only and return float32 models.
"""

from __future__ import annotations

import inspect
import re
from functools import cache
from pathlib import Path

import numpy as np
import torch
from diffusers import DDPMScheduler, DiffusionPipeline, ModelMixin, UNet2DConditionModel, UNet2DModel
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.image_processor import VaeImageProcessor
from diffusers.pipelines.pipeline_utils import ImagePipelineOutput
from diffusers.utils.torch_utils import randn_tensor
from torch import nn

ASSETS_DIR = Path(__file__).resolve().parent.parent / "assets" / "digits"
IMAGE_SIZE = 8
NUM_CLASSES = 10
NULL_LABEL = NUM_CLASSES  # the row of the prompt table used for the empty prompt ""
_NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
_DIGIT_PATTERN = re.compile(r"(?<![0-9a-z])(" + "|".join(_NUMBER_WORDS) + r"|[0-9])(?![0-9a-z])")


@cache
def _digits_arrays() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """All digits as float32 (N, 1, 8, 8) in [-1, 1], their labels (N,), and the seeded held-out mask (N,)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    images = (data.images.astype(np.float32) / 8.0 - 1.0)[:, None]  # (N, 1, 8, 8), 0..16 -> [-1, 1]
    labels = data.target.astype(np.int64)  # (N,)
    _, test_index = train_test_split(np.arange(len(labels)), test_size=0.2, stratify=labels, random_state=0)
    held_out = np.zeros(len(labels), dtype=bool)
    held_out[test_index] = True
    return images, labels, held_out


def load_digits_data(split: str = "all") -> tuple[torch.Tensor, torch.Tensor]:
    """The scikit-learn digits as (images (N, 1, 8, 8) in [-1, 1], labels (N,)).

    ``split`` is ``"all"`` (1,797 images), ``"train"`` (80%) or ``"test"`` (the fixed, seeded, stratified 20%).
    """
    images, labels, held_out = _digits_arrays()
    masks = {"all": np.ones_like(held_out), "train": ~held_out, "test": held_out}
    if split not in masks:
        raise ValueError(f"split={split!r} is not one of {sorted(masks)}; pass 'all', 'train' or 'test'.")
    mask = masks[split]
    return torch.from_numpy(images[mask]), torch.from_numpy(labels[mask])


class DigitsClassifier(ModelMixin, ConfigMixin):
    """Small CNN for 8x8 digits in [-1, 1]; ``features`` gives the penultimate activations used by FD-digits."""

    @register_to_config
    def __init__(self, channels: tuple[int, int, int] = (32, 64, 64), feature_dim: int = 64, dropout: float = 0.2):
        super().__init__()
        c1, c2, c3 = channels
        self.body = nn.Sequential(
            nn.Conv2d(1, c1, 3, padding=1),
            nn.SiLU(),
            nn.Conv2d(c1, c2, 3, padding=1),
            nn.SiLU(),
            nn.MaxPool2d(2),  # 8x8 -> 4x4
            nn.Conv2d(c2, c3, 3, padding=1),
            nn.SiLU(),
            nn.MaxPool2d(2),  # 4x4 -> 2x2
            nn.Flatten(),
            nn.Dropout(dropout),
            nn.Linear(c3 * 4, feature_dim),
            nn.SiLU(),
        )
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(feature_dim, NUM_CLASSES))

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 1, 8, 8) images in [-1, 1] -> (B, feature_dim) penultimate features."""
        return self.body(images)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 1, 8, 8) images in [-1, 1] -> (B, 10) logits."""
        return self.head(self.body(images))


def prompt_to_label(prompt: str) -> int:
    """The digit named in ``prompt`` ("a handwritten 7", "Seven"), or ``NULL_LABEL`` for a blank prompt."""
    if not prompt.strip():
        return NULL_LABEL
    digits = {m if m.isdigit() else str(_NUMBER_WORDS.index(m)) for m in _DIGIT_PATTERN.findall(prompt.lower())}
    if len(digits) != 1:
        raise ValueError(
            f"prompt {prompt!r} names {len(digits)} different digits; the digits model needs exactly one digit "
            "(as '7' or 'seven'), or the empty prompt '' for unconditional samples."
        )
    return int(digits.pop())


class DigitsPromptEncoder(ModelMixin, ConfigMixin):
    """The "text encoder" of ``digits-cond``: a learned table from a prompt's digit to (B, 1, D) hidden states.

    Row ``NULL_LABEL`` (10) encodes the empty prompt, i.e. the unconditional branch of classifier-free guidance.
    """

    @register_to_config
    def __init__(self, hidden_size: int = 32):
        super().__init__()
        self.embedding = nn.Embedding(NUM_CLASSES + 1, hidden_size)

    def tokenize(self, prompts: list[str]) -> torch.Tensor:
        """Prompts -> (B,) label ids in 0..10 on this module's device."""
        return torch.tensor([prompt_to_label(p) for p in prompts], dtype=torch.long, device=self.device)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(B,) label ids -> (B, 1, hidden_size) encoder_hidden_states."""
        return self.embedding(input_ids)[:, None]


def build_scheduler() -> DDPMScheduler:
    """The DDPM training schedule of both diffusion models: linear betas 1e-4..0.02, 1,000 steps, epsilon.

    Two choices make every scheduler built with ``from_config`` solve the plain ODE from pure noise: ``clip_sample``
    is off (DDIM would inherit it), and the spacing is ``"trailing"`` so that the first timestep is 999 (with
    ``"leading"``, DPMSolverMultistep at 200 steps would start at t=800).
    """
    return DDPMScheduler(
        num_train_timesteps=1000,
        beta_start=0.0001,
        beta_end=0.02,
        beta_schedule="linear",
        prediction_type="epsilon",
        clip_sample=False,
        timestep_spacing="trailing",
    )


def build_digits_unet(conditional: bool = False, hidden_size: int = 32) -> UNet2DModel | UNet2DConditionModel:
    """A freshly initialised UNet for 8x8 digits (8x8 -> 4x4 -> 2x2, about 1.1M parameters).

    The unconditional UNet has self-attention at 4x4. The conditional one reads the prompt through the
    cross-attention of its 2x2 middle block only: one prompt token makes it a learned per-digit feature there.
    """
    common = dict(
        sample_size=IMAGE_SIZE,
        in_channels=1,
        out_channels=1,
        layers_per_block=1,
        block_out_channels=(32, 64, 64),
        norm_num_groups=16,
    )
    if conditional:
        return UNet2DConditionModel(
            down_block_types=("DownBlock2D",) * 3,
            up_block_types=("UpBlock2D",) * 3,
            cross_attention_dim=hidden_size,
            attention_head_dim=8,
            **common,
        )
    return UNet2DModel(
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=32,
        **common,
    )


class DigitsPipeline(DiffusionPipeline):
    """Sample 8x8 digits, unconditionally (``text_encoder=None``) or from prompts with classifier-free guidance.

    The denoising loop is ``StableDiffusionPipeline``'s, so every diffusers scheduler (and every diffalign one) can
    replace ``self.scheduler``.
    """

    model_cpu_offload_seq = "text_encoder->unet"
    _optional_components = ["text_encoder"]

    def __init__(
        self,
        unet: UNet2DModel | UNet2DConditionModel,
        scheduler: DDPMScheduler,
        text_encoder: DigitsPromptEncoder | None = None,
    ):
        super().__init__()
        self.register_modules(unet=unet, scheduler=scheduler, text_encoder=text_encoder)
        self.image_processor = VaeImageProcessor(vae_scale_factor=1, do_resize=False, do_normalize=True)

    def _prepare_extra_step_kwargs(self, generator: torch.Generator | None, eta: float) -> dict:
        """``eta`` and ``generator`` for schedulers whose ``step`` accepts them (as in StableDiffusionPipeline)."""
        accepted = set(inspect.signature(self.scheduler.step).parameters)
        extra = {"eta": eta, "generator": generator}
        return {key: value for key, value in extra.items() if key in accepted}

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        num_inference_steps: int = 50,
        guidance_scale: float = 2.0,
        num_images_per_prompt: int = 1,
        eta: float = 0.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
    ) -> ImagePipelineOutput | tuple:
        """Generate ``len(prompt) * num_images_per_prompt`` digits.

        ``prompt`` names one digit per image ("a handwritten 7"); ``None`` or ``""`` asks for unconditional samples
        (the only choice when the pipeline has no text encoder). ``guidance_scale`` > 1 turns on classifier-free
        guidance against the empty prompt. ``latents`` (B, 1, 8, 8) replaces the initial noise and is scaled by
        ``scheduler.init_noise_sigma``. ``output_type`` is ``"pil"``, ``"np"`` (B, 8, 8, 1) or ``"pt"`` (B, 1, 8, 8),
        all in [0, 1], or ``"latent"``: the raw samples (B, 1, 8, 8) in model space [-1, 1].
        """
        prompts = [""] if prompt is None else [prompt] if isinstance(prompt, str) else list(prompt)
        if self.text_encoder is None and any(p.strip() for p in prompts):
            raise ValueError(
                f"this DigitsPipeline is unconditional (no text_encoder) but got prompt={prompt!r}; pass prompt=None "
                "and num_images_per_prompt=N, or load the conditional model with load_digits_pipeline(True)."
            )
        prompts = [p for p in prompts for _ in range(num_images_per_prompt)]
        batch_size = len(prompts)
        device = self._execution_device
        dtype = self.unet.dtype

        do_guidance = self.text_encoder is not None and guidance_scale > 1.0
        if self.text_encoder is not None:
            labels = self.text_encoder.tokenize(prompts)  # (B,)
            if do_guidance:
                labels = torch.cat([torch.full_like(labels, NULL_LABEL), labels])  # (2B,) unconditional first
            encoder_hidden_states = self.text_encoder(labels).to(dtype)  # (B or 2B, 1, D)

        self.scheduler.set_timesteps(num_inference_steps, device=device)
        shape = (batch_size, self.unet.config.in_channels, self.unet.config.sample_size, self.unet.config.sample_size)
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=device, dtype=dtype)  # (B, 1, 8, 8)
        elif latents.shape != shape:
            raise ValueError(f"latents have shape {tuple(latents.shape)}, expected {shape} for {batch_size} images.")
        else:
            latents = latents.to(device=device, dtype=dtype)
        latents = latents * self.scheduler.init_noise_sigma
        extra_step_kwargs = self._prepare_extra_step_kwargs(generator, eta)

        for t in self.progress_bar(self.scheduler.timesteps):
            model_input = torch.cat([latents] * 2) if do_guidance else latents
            model_input = self.scheduler.scale_model_input(model_input, t)
            if self.text_encoder is None:
                noise_pred = self.unet(model_input, t).sample  # (B, 1, 8, 8)
            else:
                noise_pred = self.unet(model_input, t, encoder_hidden_states=encoder_hidden_states).sample
            if do_guidance:
                noise_uncond, noise_cond = noise_pred.chunk(2)
                noise_pred = noise_uncond + guidance_scale * (noise_cond - noise_uncond)
            latents = self.scheduler.step(noise_pred, t, latents, **extra_step_kwargs).prev_sample

        images = self.image_processor.postprocess(latents, output_type=output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (images,)
        return ImagePipelineOutput(images=images)


def _asset(name: str, path: str | Path | None) -> Path:
    folder = Path(path) if path is not None else ASSETS_DIR / name
    if not folder.is_dir():
        raise FileNotFoundError(
            f"no digits model folder at {folder}; reinstall diffalign or run scripts/train_embedded.py --out DIR."
        )
    return folder


def load_digits_classifier(path: str | Path | None = None) -> DigitsClassifier:
    """The shipped digits classifier (or one saved at ``path``) in float32 and eval mode, read from safetensors."""
    return DigitsClassifier.from_pretrained(_asset("classifier", path), use_safetensors=True).float().eval()


def load_digits_pipeline(conditional: bool = False, path: str | Path | None = None) -> DigitsPipeline:
    """The shipped ``digits`` (or ``digits-cond`` when ``conditional``) pipeline in float32, DDPM scheduler."""
    folder = _asset("digits-cond" if conditional else "digits", path)
    pipeline = DigitsPipeline.from_pretrained(folder, use_safetensors=True)
    for module in (pipeline.unet, pipeline.text_encoder):
        if module is not None:
            module.float()
    return pipeline


def load_digits_unet(conditional: bool = False, path: str | Path | None = None) -> UNet2DModel | UNet2DConditionModel:
    """The shipped UNet alone (its scheduler config is in the sibling ``scheduler/scheduler_config.json``)."""
    folder = _asset("digits-cond" if conditional else "digits", path)
    unet_class = UNet2DConditionModel if conditional else UNet2DModel
    return unet_class.from_pretrained(folder, subfolder="unet", use_safetensors=True).float().eval()
