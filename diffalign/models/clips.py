"""Embedded "digits-clips" video model: short clips of drifting 8x8 digits, a tiny video UNet and a per-segment reward.

The video counterpart of ``digits-cond`` (``diffalign.pipelines.digits``), small enough to ship and to train on CPU,
so that video methods (DenseDPO, Wu et al. 2025) have real samples and a real per-segment reward offline:

- Data (``make_digit_clips``): each scikit-learn digit becomes a clip of F frames (default 6), shape (1, F, 8, 8) in
  [-1, 1], in which the digit drifts in a straight line through three positions, one pixel before the centre to one
  pixel past it (``drift_offsets``), in one of eight compass directions, the uncovered border filled with the
  background -1. One pixel of shift is what the digits classifier was trained to read, so every frame stays a
  recognisable digit and a per-frame classifier score is meaningful.
- Model (``build_digits_clip_unet``): a diffusers ``UNet3DConditionModel`` (latents (B, C, F, H, W)) with the layout
  of ``digits-cond`` (8x8 -> 4x4 -> 2x2, channels 32/64/64, the prompt read by cross-attention in the 2x2 middle
  block), conditioned by the same ``DigitsPromptEncoder`` ("a handwritten 7"; "" is the classifier-free-guidance
  null prompt). It is inflated from the image model as in Make-A-Video (Singer et al. 2022, Sec. 3.2): spatial
  layers copied from ``digits-cond``, temporal convolutions and temporal attentions initialised to the identity, so
  training starts from a model that already draws a digit in every frame and mainly has to learn the motion.
- ``DigitsClipPipeline``: ``DigitsPipeline``'s denoising loop over (B, 1, F, 8, 8) latents; any diffusers scheduler
  swaps in with ``pipe.scheduler = X.from_config(pipe.scheduler.config)``.
- ``clip_segment_rewards``: per-segment reward, the mean over a segment's frames of the digits classifier's
  log p(prompted digit | frame), segments laid out in time as ``diffalign.alignment.losses.frame_segments``.

The shipped weights live in ``diffalign/assets/digits/digits-clips/`` (float16 safetensors + JSON) and are retrained
by ``scripts/train_embedded_clips.py``; the loader returns float32 modules. Measured on its samples (DDIM, seeded):
per-frame classifier accuracy for the prompted digit 0.94 (20 clips, 10 steps, guidance 2; 0.92 on 100 clips at 20
steps; 0.99 at guidance 4), lower on the shifted first and last frames (0.80-0.92) than on the centred middle ones
(1.0); ``drift_residual`` 0.12, against 0.18 for the untrained inflated model and 0.017 for the training clips.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import PIL.Image
import torch
from diffusers import (
    DDPMScheduler,
    DiffusionPipeline,
    ModelMixin,  # noqa: F401  (the loader looks it up here: see DigitsClipPipeline.__init__)
    UNet2DConditionModel,
    UNet3DConditionModel,
)
from diffusers.image_processor import VaeImageProcessor
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor

from ..pipelines.digits import (
    ASSETS_DIR,
    IMAGE_SIZE,
    NULL_LABEL,
    DigitsClassifier,
    DigitsPromptEncoder,
    load_digits_classifier,
    load_digits_data,
    prompt_to_label,
)

CLIPS_DIR = ASSETS_DIR / "digits-clips"
NUM_FRAMES = 6
# the eight compass directions of the drift, as (dy, dx) pixel steps
DIRECTIONS = torch.tensor([(-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1)])


def drift_offsets(num_frames: int) -> torch.Tensor:
    """Position of the digit along its direction in each frame, round(2 f / (F - 1) - 1) in {-1, 0, 1}, (F,) int64.

    F = 6 gives -1, -1, 0, 0, 1, 1: a one-pixel step every two frames.
    """
    if num_frames < 1:
        raise ValueError(f"num_frames={num_frames}: a clip needs at least one frame.")
    if num_frames == 1:
        return torch.zeros(1, dtype=torch.long)
    return torch.round(torch.linspace(-1.0, 1.0, num_frames)).long()


def shift_images(images: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Shift images (N, 1, 8, 8) in [-1, 1] by offsets (N, 2) of (dy, dx) in {-1, 0, 1}, filling with -1."""
    if images.ndim != 4 or images.shape[1:] != (1, IMAGE_SIZE, IMAGE_SIZE):
        raise ValueError(f"expected images (N, 1, 8, 8), got {tuple(images.shape)}.")
    if offsets.shape != (len(images), 2) or offsets.abs().max() > 1:
        raise ValueError(f"offsets must be (N, 2) = ({len(images)}, 2) steps in {{-1, 0, 1}}, got {offsets}.")
    padded = torch.nn.functional.pad(images[:, 0], (1, 1, 1, 1), value=-1.0)  # (N, 10, 10)
    grid = torch.arange(IMAGE_SIZE, device=images.device) + 1  # (8,) rows / columns of the image inside the padding
    dy, dx = offsets.long().to(images.device).unbind(1)  # (N,), (N,)
    rows = grid[None] - dy[:, None]  # (N, 8): output row r shows input row r - dy
    cols = grid[None] - dx[:, None]  # (N, 8)
    clip_index = torch.arange(len(images), device=images.device)[:, None, None]  # (N, 1, 1)
    return padded[clip_index, rows[:, :, None], cols[:, None, :]][:, None]  # (N, 1, 8, 8)


def make_digit_clips(images: torch.Tensor, directions: torch.Tensor, num_frames: int = NUM_FRAMES) -> torch.Tensor:
    """Clips of digits drifting along ``directions``: images (N, 1, 8, 8) in [-1, 1], directions (N, 2) of (dy, dx)
    in {-1, 0, 1} -> clips (N, 1, F, 8, 8), frame f shifted by ``drift_offsets(F)[f] * (dy, dx)``, border -1."""
    frames = [shift_images(images, offset * directions) for offset in drift_offsets(num_frames).tolist()]
    return torch.stack(frames, dim=2)  # (N, 1, F, 8, 8)


def load_digit_clips(
    split: str = "all", num_frames: int = NUM_FRAMES, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """One clip per scikit-learn digit of ``split``, its drift direction drawn with ``seed``.

    Returns (clips (N, 1, F, 8, 8) in [-1, 1], labels (N,)).
    """
    images, labels = load_digits_data(split)  # (N, 1, 8, 8), (N,)
    generator = torch.Generator().manual_seed(seed)
    directions = DIRECTIONS[torch.randint(0, len(DIRECTIONS), (len(images),), generator=generator)]  # (N, 2)
    return make_digit_clips(images, directions, num_frames), labels


def drift_residual(clips: torch.Tensor) -> torch.Tensor:
    """How far clips (B, 1, F, 8, 8) in [-1, 1] are from a rigid one-pixel drift: (B,), the mean over consecutive
    frame pairs of min over shifts (dy, dx) in {-1, 0, 1}^2 of the mean squared difference between frame f + 1 and
    frame f shifted (border -1). The training clips score 0.017 (pixels lost at the border), the shipped model's
    samples 0.12, independent digits-cond samples of one prompt per frame 0.18, independent dataset digits 0.29."""
    batch_size, _, num_frames = clips.shape[:3]
    if num_frames < 2:
        raise ValueError(f"drift_residual needs clips of at least two frames, got {tuple(clips.shape)}.")
    previous = clips[:, 0, :-1].reshape(-1, 1, IMAGE_SIZE, IMAGE_SIZE)  # (B (F-1), 1, 8, 8)
    following = clips[:, 0, 1:].reshape(-1, 1, IMAGE_SIZE, IMAGE_SIZE)  # (B (F-1), 1, 8, 8)
    steps = torch.cat([DIRECTIONS, torch.zeros(1, 2, dtype=torch.long)])  # (9, 2): every one-pixel shift
    errors = [
        (shift_images(previous, step.expand(len(previous), 2)) - following).pow(2).mean(dim=(1, 2, 3))
        for step in steps
    ]  # 9 x (B (F-1),)
    return torch.stack(errors).amin(dim=0).reshape(batch_size, num_frames - 1).mean(dim=1)


def build_digits_clip_unet(image_unet: UNet2DConditionModel | None = None) -> UNet3DConditionModel:
    """The clip UNet (about 1.75M parameters), freshly initialised or inflated from ``digits-cond``'s image UNet.

    Inflation (Make-A-Video, Singer et al. 2022, Sec. 3.2): every spatial weight is copied from ``image_unet`` (the
    middle block's 1x1 convolutions ``proj_in``/``proj_out`` become the linear layers they equal), the temporal
    convolutions keep diffusers' zero last layer, and the output projections of the temporal attentions are zeroed,
    so the inflated UNet computes exactly the image UNet on each frame until it is trained.
    """
    unet = UNet3DConditionModel(
        sample_size=IMAGE_SIZE,
        in_channels=1,
        out_channels=1,
        down_block_types=("DownBlock3D",) * 3,
        up_block_types=("UpBlock3D",) * 3,
        block_out_channels=(32, 64, 64),
        layers_per_block=1,
        norm_num_groups=16,
        cross_attention_dim=32,
        attention_head_dim=8,
    )
    if image_unet is None:
        return unet
    video_state, image_state = unet.state_dict(), image_unet.state_dict()
    foreign = [k for k, v in image_state.items() if k not in video_state or video_state[k].numel() != v.numel()]
    if foreign:
        raise ValueError(
            f"image_unet does not have digits-cond's layout ({len(foreign)} weights do not fit, e.g. {foreign[0]}); "
            "pass load_digits_unet(conditional=True) or a UNet2DConditionModel built by build_digits_unet(True)."
        )
    unet.load_state_dict({k: v.reshape(video_state[k].shape) for k, v in image_state.items()}, strict=False)
    for temporal_attention in [unet.transformer_in, *unet.mid_block.temp_attentions]:
        torch.nn.init.zeros_(temporal_attention.proj_out.weight)
        torch.nn.init.zeros_(temporal_attention.proj_out.bias)
    return unet


@dataclass
class DigitsClipPipelineOutput(BaseOutput):
    """``frames``: B lists of F PIL images, (B, F, 8, 8, 1) numpy, or (B, 1, F, 8, 8) torch (see ``output_type``)."""

    frames: torch.Tensor | np.ndarray | list[list[PIL.Image.Image]]


class DigitsClipPipeline(DiffusionPipeline):
    """Sample clips of 8x8 digits from prompts ("a handwritten 7") with classifier-free guidance.

    The loop is ``DigitsPipeline``'s (``StableDiffusionPipeline``'s) over (B, 1, F, 8, 8) latents, so every diffusers
    scheduler can replace ``self.scheduler``.
    """

    model_cpu_offload_seq = "text_encoder->unet"

    def __init__(self, unet: UNet3DConditionModel, scheduler: DDPMScheduler, text_encoder: DigitsPromptEncoder):
        super().__init__()
        self.register_modules(unet=unet, scheduler=scheduler, text_encoder=text_encoder)
        # model_index.json names this module, which imports the encoder (and ModelMixin, the base class diffusers
        # looks up in the named module to find the loading method), so the saved folder loads wherever
        # DigitsPromptEncoder itself is defined
        if type(text_encoder) is DigitsPromptEncoder:
            self.register_to_config(text_encoder=(__name__, DigitsPromptEncoder.__name__))
        self.image_processor = VaeImageProcessor(vae_scale_factor=1, do_resize=False, do_normalize=True)

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str],
        num_frames: int = NUM_FRAMES,
        num_inference_steps: int = 50,
        guidance_scale: float = 2.0,
        num_videos_per_prompt: int = 1,
        eta: float = 0.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
    ) -> DigitsClipPipelineOutput | tuple:
        """Generate ``len(prompt) * num_videos_per_prompt`` clips of ``num_frames`` frames.

        ``prompt`` names one digit per clip ("a handwritten 7", "seven"); ``guidance_scale`` > 1 turns on
        classifier-free guidance against the empty prompt. ``latents`` (B, 1, F, 8, 8) replaces the initial noise
        and is scaled by ``scheduler.init_noise_sigma``. ``output_type`` is ``"pil"`` (B lists of F images), ``"np"``
        (B, F, 8, 8, 1) or ``"pt"`` (B, 1, F, 8, 8), all in [0, 1], or ``"latent"``: the raw clips (B, 1, F, 8, 8)
        in model space [-1, 1], the input of ``clip_segment_rewards``.
        """
        if num_frames < 1:
            raise ValueError(f"num_frames={num_frames}: a clip needs at least one frame.")
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        labels = self.text_encoder.tokenize(prompts)  # (P,)
        if (labels == NULL_LABEL).any():
            raise ValueError(f"every prompt must name a digit ('a handwritten 7'), got {prompts!r}.")
        labels = labels.repeat_interleave(num_videos_per_prompt)  # (B,)
        batch_size = len(labels)
        device = self._execution_device
        dtype = self.unet.dtype

        do_guidance = guidance_scale > 1.0
        if do_guidance:
            labels = torch.cat([torch.full_like(labels, NULL_LABEL), labels])  # (2B,) unconditional first
        encoder_hidden_states = self.text_encoder(labels).to(dtype)  # (B or 2B, 1, D)

        self.scheduler.set_timesteps(num_inference_steps, device=device)
        shape = (batch_size, self.unet.config.in_channels, num_frames, IMAGE_SIZE, IMAGE_SIZE)
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=device, dtype=dtype)  # (B, 1, F, 8, 8)
        elif latents.shape != shape:
            raise ValueError(f"latents have shape {tuple(latents.shape)}, expected {shape} for {batch_size} clips.")
        else:
            latents = latents.to(device=device, dtype=dtype)
        latents = latents * self.scheduler.init_noise_sigma
        accepted = set(inspect.signature(self.scheduler.step).parameters)
        extra_step_kwargs = {k: v for k, v in {"eta": eta, "generator": generator}.items() if k in accepted}

        for t in self.progress_bar(self.scheduler.timesteps):
            model_input = torch.cat([latents] * 2) if do_guidance else latents
            model_input = self.scheduler.scale_model_input(model_input, t)
            noise_pred = self.unet(model_input, t, encoder_hidden_states=encoder_hidden_states).sample
            if do_guidance:
                noise_uncond, noise_cond = noise_pred.chunk(2)  # (B, 1, F, 8, 8) each
                noise_pred = noise_uncond + guidance_scale * (noise_cond - noise_uncond)
            latents = self.scheduler.step(noise_pred, t, latents, **extra_step_kwargs).prev_sample

        self.maybe_free_model_hooks()
        frames = self._postprocess(latents, output_type)
        if not return_dict:
            return (frames,)
        return DigitsClipPipelineOutput(frames=frames)

    def _postprocess(self, latents: torch.Tensor, output_type: str):
        """(B, 1, F, 8, 8) clips in [-1, 1] -> the frames of ``output_type``."""
        if output_type == "latent":
            return latents
        batch_size, channels, num_frames = latents.shape[:3]
        if output_type == "pt":
            return (latents.float() / 2 + 0.5).clamp(0, 1)  # (B, 1, F, 8, 8)
        flat = latents.transpose(1, 2).reshape(batch_size * num_frames, channels, IMAGE_SIZE, IMAGE_SIZE)
        if output_type == "np":
            images = self.image_processor.postprocess(flat, output_type="np")  # (B F, 8, 8, 1)
            return images.reshape(batch_size, num_frames, IMAGE_SIZE, IMAGE_SIZE, channels)
        if output_type == "pil":
            images = self.image_processor.postprocess(flat, output_type="pil")
            return [images[i * num_frames : (i + 1) * num_frames] for i in range(batch_size)]
        raise ValueError(f"output_type={output_type!r} is not one of 'pil', 'np', 'pt', 'latent'.")


def load_digits_clip_pipeline(path: str | Path | None = None) -> DigitsClipPipeline:
    """The shipped ``digits-clips`` pipeline (or one saved at ``path``) in float32 with its DDPM scheduler."""
    folder = Path(path) if path is not None else CLIPS_DIR
    if not (folder / "model_index.json").is_file():
        raise FileNotFoundError(
            f"no digits-clips pipeline at {folder}; reinstall diffalign or retrain it with "
            "scripts/train_embedded_clips.py --out DIR."
        )
    pipeline = DigitsClipPipeline.from_pretrained(folder, use_safetensors=True)
    pipeline.unet.float().eval()
    pipeline.text_encoder.float()
    return pipeline


def clip_segment_rewards(
    clips: torch.Tensor, prompts: list[str], num_segments: int, classifier: DigitsClassifier | None = None
) -> torch.Tensor:
    """Per-segment reward of clips (B, 1, F, 8, 8) in [-1, 1]: (B, S), the mean over each segment's frames of
    log p(prompted digit | frame) under the digits classifier (the shipped one unless ``classifier`` is given).

    Segment s holds frames f with floor(f S / F) = s, the layout of ``diffalign.alignment.losses.frame_segments``,
    so reward segments and DenseDPO's loss segments coincide. Differentiable in ``clips``.
    """
    if clips.ndim != 5 or clips.shape[1] != 1 or clips.shape[3:] != (IMAGE_SIZE, IMAGE_SIZE):
        raise ValueError(f"clip_segment_rewards expects clips (B, 1, F, 8, 8) in [-1, 1], got {tuple(clips.shape)}.")
    batch_size, _, num_frames = clips.shape[:3]
    if len(prompts) != batch_size:
        raise ValueError(f"got {len(prompts)} prompts for {batch_size} clips; pass one prompt per clip.")
    if not 1 <= num_segments <= num_frames:
        raise ValueError(f"num_segments={num_segments} must be between 1 and the {num_frames} frames of a clip.")
    labels = torch.tensor([prompt_to_label(p) for p in prompts], device=clips.device)  # (B,)
    if (labels == NULL_LABEL).any():
        raise ValueError(f"every prompt must name a digit to be rewarded ('a handwritten 7'), got {prompts!r}.")
    if classifier is None:
        classifier = load_digits_classifier()
    classifier = classifier.to(clips.device)
    frames = clips.transpose(1, 2).reshape(batch_size * num_frames, 1, IMAGE_SIZE, IMAGE_SIZE)  # (B F, 1, 8, 8)
    log_probs = classifier(frames.float()).log_softmax(dim=1).reshape(batch_size, num_frames, -1)  # (B, F, 10)
    frame_rewards = log_probs.gather(2, labels[:, None, None].expand(-1, num_frames, 1))[..., 0]  # (B, F)
    segments = torch.arange(num_frames, device=clips.device) * num_segments // num_frames  # (F,)
    sums = frame_rewards.new_zeros(batch_size, num_segments).index_add(1, segments, frame_rewards)  # (B, S)
    counts = torch.bincount(segments, minlength=num_segments).to(sums)  # (S,)
    return sums / counts
