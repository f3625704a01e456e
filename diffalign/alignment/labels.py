"""Human labels for D3PO: export stored trajectories for labelling offline, read the choices back, train on them.

D3PO's human-feedback mode (Yang et al., CVPR 2024, Sec. 4): trajectories are sampled, a person picks the best final
image of each prompt, and the model is trained on those choices. Here:

1. ``export_for_labelling(buffer, folder)`` writes a ``ReplayBuffer`` (e.g. a checkpoint's ``replay_0.safetensors``)
   as ``trajectories.safetensors`` (no pickle), the final images as ``images/<id>_<k>.png``, ``trajectories.jsonl``
   (``{"prompt", "images", "id"}`` per prompt: also a preference dataset the trainer reads, in the buffer's order)
   and ``labels.jsonl`` to fill in: ``{"id": 7, "choice": null}`` per prompt.
2. A person sets each ``choice`` to the index k of the preferred image, or leaves null for "no preference".
3. ``diffalign train --method d3po --dataset FOLDER --jsonl_name trajectories.jsonl --d3po_labels
   FOLDER/labels.jsonl`` trains on the stored trajectories instead of sampling: the chosen trajectory against the
   others (best vs worst: for K = 2 the other one); unlabelled prompts are ties and dropped.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .replay import TENSOR_KEYS, ReplayBuffer
from .rollout import Rollout

TRAJECTORIES_NAME, RECORDS_NAME, LABELS_NAME = "trajectories.safetensors", "trajectories.jsonl", "labels.jsonl"


def pixel_decode(latents: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) pixel-space samples in [-1, 1] (digits-cond) -> images in [0, 1]."""
    return ((latents.float() + 1) / 2).clamp(0, 1)


def export_for_labelling(
    buffer: ReplayBuffer, folder: str | Path, decode: Callable[[torch.Tensor], torch.Tensor] = pixel_decode
) -> Path:
    """Write ``buffer`` for labelling into ``folder`` (files in the module docstring) -> ``folder``.

    ``decode(latents (K, c, h, w)) -> images (K, C, H, W) in [0, 1]``: the identity map of pixel models by default;
    for latent models pass the VAE decode (``step.decode_latents`` with the backbone)."""
    folder = Path(folder)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    records, labels = [], []
    for entry in buffer.entries:
        images = decode(entry["latents"][:, -1])  # (K, C, H, W) in [0, 1]
        pixels = (images * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()  # (K, H, W, C)
        names = []
        for k, image in enumerate(pixels):
            names.append(f"images/{entry['id']}_{k}.png")
            Image.fromarray(np.ascontiguousarray(image.squeeze(-1) if image.shape[-1] == 1 else image)).save(
                folder / names[-1]
            )
        records.append({"prompt": entry["prompt"], "images": names, "id": entry["id"]})
        labels.append({"id": entry["id"], "choice": None})
    buffer.save(folder / TRAJECTORIES_NAME)
    (folder / RECORDS_NAME).write_text("".join(json.dumps(r) + "\n" for r in records))
    (folder / LABELS_NAME).write_text("".join(json.dumps(r) + "\n" for r in labels))
    return folder


def read_labels(path: str | Path, num_candidates: int) -> dict[int, int | None]:
    """``{"id": int, "choice": k or null}`` lines -> {id: choice}; null = no preference."""
    labels = {}
    for number, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        entry = json.loads(line)
        choice = entry.get("choice")
        if not isinstance(entry.get("id"), int) or not (
            choice is None or (isinstance(choice, int) and 0 <= choice < num_candidates)
        ):
            raise ValueError(
                f'{path}:{number}: {line.strip()!r}; each line must be {{"id": <trajectory id>, "choice": k in '
                f"0..{num_candidates - 1} (the preferred image) or null (no preference)}}."
            )
        labels[entry["id"]] = choice
    return labels


class LabelledTrajectories:
    """The trajectories of an export folder with their human choices, served as D3PO rollouts."""

    def __init__(self, labels_path: str | Path):
        labels_path = Path(labels_path)
        trajectories = labels_path.parent / TRAJECTORIES_NAME
        if not trajectories.is_file():
            raise ValueError(
                f"--d3po_labels {labels_path}: no {TRAJECTORIES_NAME} beside it; label the labels.jsonl that "
                "diffalign.alignment.labels.export_for_labelling wrote in the same folder."
            )
        self.entries = list(ReplayBuffer.load(trajectories).entries)
        self.labels = read_labels(labels_path, self.entries[0]["latents"].shape[0])
        unknown = sorted(set(self.labels) - {e["id"] for e in self.entries})
        if unknown:
            raise ValueError(f"{labels_path} labels trajectory ids {unknown[:5]} that {trajectories} does not hold.")

    def rollout(self, batch: dict) -> Rollout:
        """The stored trajectories of the batch's records (dataset index = position in ``trajectories.jsonl``);
        rewards 1 for the chosen trajectory, 0 for the others, all 0 without a choice (a tie, dropped)."""
        entries = [self.entries[i] for i in batch["index"].tolist()]
        for entry, prompt in zip(entries, batch["prompt"], strict=True):
            if entry["prompt"] != prompt:
                raise ValueError(
                    f"trajectory {entry['id']} was sampled for {entry['prompt']!r}, the batch has {prompt!r}: train "
                    f"with --dataset <export folder> --jsonl_name {RECORDS_NAME} and all of its records."
                )
        tensors = {key: torch.stack([e[key] for e in entries]) for key in TENSOR_KEYS}
        rewards = torch.zeros_like(tensors["rewards"])  # (B, K)
        for b, entry in enumerate(entries):
            if self.labels.get(entry["id"]) is not None:
                rewards[b, self.labels[entry["id"]]] = 1.0
        return Rollout(tensors["latents"], tensors["timesteps"], tensors["log_probs"], rewards)
