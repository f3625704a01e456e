"""One preference record: a prompt with K candidate images and what is known about their order.

A record is what a source (``alignment/sources.py``) yields before decoding: the images are still encoded bytes,
paths or PIL images, so a source can be listed and shuffled without touching image files. ``data.py`` decodes a
record into tensors (the dataset item) and ``collate_preferences`` stacks items into the batch of
``layout_contract.md``: candidates on axis 1, (B, K, ...).

Order conventions (the same for every source):

- pairs (Pick-a-Pic, JSONL ``chosen`` / ``rejected``): K = 2, candidate 0 is the preferred one, no scores;
- ranked or scored data: the stored order, with ``scores`` (higher = better); methods rank by the scores;
- ``labels``: per-segment preferences in {+1, -1, 0} between candidate 0 and candidate 1 (+1: candidate 0 better),
  as DenseDPO's per-segment labels.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class PreferenceRecord:
    """``prompt``, K ``images`` (bytes / path / PIL / ``{"bytes", "path"}``) and optional per-candidate extras."""

    prompt: str
    images: list
    scores: list[float] | None = None
    weight_maps: list | None = None
    labels: list[float] | None = None

    def __post_init__(self):
        if len(self.images) < 2:
            raise ValueError(f"a preference record needs K >= 2 images, got {len(self.images)} for {self.prompt!r}.")
        for name in ("scores", "weight_maps"):
            values = getattr(self, name)
            if values is not None and len(values) != len(self.images):
                raise ValueError(
                    f"record {self.prompt!r} has {len(self.images)} images but {len(values)} {name}; give one "
                    f"{name[:-1]} per image, in the images' order."
                )

    @property
    def num_candidates(self) -> int:
        return len(self.images)
