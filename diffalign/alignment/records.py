"""One preference record: a prompt with K candidate images and what is known about their order, and the readers
of its files (images, weight maps) with the path checks that keep a dataset inside its folder.

A record is what a source (``alignment/sources.py``) yields before decoding: the images are still encoded bytes,
paths or PIL images, so a source can be listed and shuffled without touching image files. ``data.py`` decodes a
record into tensors (the dataset item) and ``collate_preferences`` stacks items into the batch of
``layout_contract.md``: candidates on axis 1, (B, K, ...).

Order conventions (the same for every source):

- pairs (Pick-a-Pic, JSONL ``chosen`` / ``rejected``): K = 2, candidate 0 is the preferred one, no scores;
- without scores the stored order is the preference order, best first; with ``scores`` (higher = better) the
  stored order is kept and methods rank by the scores;
- ``labels``: S per-segment preferences in {+1, -1, 0} between candidate 0 and candidate 1 (+1: candidate 0 better),
  as DenseDPO's per-segment labels;
- ``weight_maps``: one map per candidate (PNG / JPEG in [0, 255] -> [0, 1], or raw values from ``.npy`` /
  ``.safetensors``), resized and cropped with its image.

Paths: a dataset names files relative to its own folder (``base``). A path that is absolute or leaves that folder
(``..``) is refused with an ``ImagePathError`` unless the user passes an explicit ``image_root`` that contains it;
an image or map given only as a path inside a table (parquet ``{"path": ...}``) needs ``image_root`` as well, since a
table has no folder of its own that would be safe to trust.
"""

from __future__ import annotations

import io
import json
import os
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from safetensors import SafetensorError

UNREADABLE = (
    OSError,  # missing file, truncated file, "cannot identify image file"
    EOFError,  # a PIL plugin or numpy reaching the end of the data early
    SyntaxError,  # PIL's "not a PNG file" and friends
    ValueError,
    TypeError,
    struct.error,
    zlib.error,
    Image.DecompressionBombError,  # an image over 2 x Image.MAX_IMAGE_PIXELS
    SafetensorError,
)
"""What reading a broken image or weight-map file raises: the record is skipped and counted, the run goes on."""


class DatasetError(ValueError):
    """The dataset itself is malformed (missing keys or columns, inconsistent K, mismatched lengths). Never skipped
    like an unreadable image: the dataset is refused with a message naming the fix."""


class ImagePathError(DatasetError):
    """A dataset names a file outside the folder it may read from."""


@dataclass
class PreferenceRecord:
    """``prompt``, K ``images`` (bytes / path / PIL / ``{"bytes", "path"}``) and optional per-candidate extras."""

    prompt: str
    images: list
    scores: list[float] | None = None
    weight_maps: list | None = None
    labels: list[float] | None = None

    def __post_init__(self):
        if not isinstance(self.prompt, str):
            raise DatasetError(f"a record's prompt must be a string, got {type(self.prompt).__name__}.")
        if len(self.images) < 1:
            raise DatasetError(f"a record needs K >= 1 images (methods state their K), got none for {self.prompt!r}.")
        for name in ("scores", "weight_maps"):
            values = getattr(self, name)
            if values is not None and len(values) != len(self.images):
                raise DatasetError(
                    f"record {self.prompt!r} has {len(self.images)} images but {len(values)} {name}; give one "
                    f"{name[:-1]} per image, in the images' order."
                )
        if self.labels is not None and any(label not in (-1, 0, 1) for label in self.labels):
            raise DatasetError(
                f"record {self.prompt!r} has labels {list(self.labels)}; each per-segment label must be +1 "
                "(candidate 0 better), -1 (candidate 1 better) or 0 (tie)."
            )

    @property
    def num_candidates(self) -> int:
        return len(self.images)


def resolve_path(path: str, base: Path | None, root: Path | None) -> Path:
    """The file a dataset names: relative to ``base`` (its folder), and inside ``root`` (default: ``base``).

    Raises ImagePathError for an absolute path or a ``..`` path that leaves the allowed folder, and for any path when
    neither a folder nor a root is known (a path inside a table).
    """
    allowed = root if root is not None else base
    if allowed is None:
        raise ImagePathError(
            f"the dataset names the file {path!r} by path only (no image bytes); a table's paths could point anywhere "
            "on this machine, so they are read only below an explicit root: pass image_root (--image_root) = the "
            "folder that holds these files."
        )
    start = base if base is not None else root
    candidate = Path(os.path.normpath(os.path.join(os.path.abspath(start), path)))
    allowed = Path(os.path.normpath(os.path.abspath(allowed)))
    if not candidate.is_relative_to(allowed):
        raise ImagePathError(
            f"the dataset names the file {path!r}, which is outside {allowed} (an absolute path or one leaving the "
            "dataset folder with '..'); move the files into the dataset folder, or pass image_root (--image_root) "
            "= a folder that contains them to allow it."
        )
    return candidate


def _payload(value, base: Path | None, root: Path | None) -> bytes | Path:
    """Encoded bytes or a checked path, from bytes, a path string or a ``datasets`` ``{"bytes", "path"}`` dict."""
    if isinstance(value, dict):
        if value.get("bytes") is not None:
            return value["bytes"]
        if value.get("path") is not None:
            return resolve_path(value["path"], None, root)  # a table entry: never relative to the working directory
        raise ValueError(f"an image entry {value} has neither bytes nor a path.")
    if isinstance(value, bytes | bytearray):
        return bytes(value)
    if isinstance(value, str | os.PathLike):
        return resolve_path(os.fspath(value), base, root)
    raise TypeError(f"cannot read a file from a {type(value).__name__}; expected bytes, a path or {{bytes, path}}.")


def open_image(value, base: Path | None = None, root: Path | None = None) -> Image.Image:
    """A loaded PIL image from a PIL image, bytes, a ``{"bytes", "path"}`` dict, or a path checked by
    ``resolve_path``."""
    if isinstance(value, Image.Image):
        image = value
    else:
        payload = _payload(value, base, root)
        image = Image.open(io.BytesIO(payload) if isinstance(payload, bytes) else payload)
    image.load()
    return image


def _is_safetensors(data: bytes) -> bool:
    """safetensors layout: an 8-byte little-endian header length, then a JSON header."""
    return len(data) > 8 and data[8:9] == b"{" and 8 + struct.unpack("<Q", data[:8])[0] <= len(data)


def open_weight_map(value, base: Path | None = None, root: Path | None = None) -> np.ndarray:
    """A weight map (H, W) float32: a PNG / JPEG (grey levels / 255), ``.npy`` or ``.safetensors`` (one 2-D tensor, or
    (1, H, W)) file or bytes, or an array / nested list."""
    if isinstance(value, np.ndarray | list):
        array = np.asarray(value, dtype=np.float32)
    else:
        payload = _payload(value, base, root)
        data = payload if isinstance(payload, bytes) else payload.read_bytes()
        if data[:6] == b"\x93NUMPY":
            array = np.load(io.BytesIO(data), allow_pickle=False)
        elif _is_safetensors(data):
            from safetensors.numpy import load

            tensors = load(data)
            if len(tensors) != 1:
                raise ValueError(f"a weight-map safetensors file must hold one tensor, found {sorted(tensors)}.")
            array = next(iter(tensors.values()))
        else:
            image = Image.open(io.BytesIO(data))
            image.load()
            array = np.asarray(image.convert("L"), dtype=np.float32) / 255.0
        array = np.asarray(array, dtype=np.float32)
    array = array[0] if array.ndim == 3 and array.shape[0] == 1 else array
    if array.ndim != 2:
        raise ValueError(f"a weight map must be 2-D (H, W) or (1, H, W), got shape {array.shape}.")
    if not np.isfinite(array).all():
        raise ValueError("a weight map holds non-finite values.")
    return array


def read_jsonl(path: Path) -> list[tuple[int, dict]]:
    """(line number, object) for each non-empty line of a JSONL file, with the line named in a parse error."""
    records = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path} line {number} is not JSON: {error}.") from error
        if not isinstance(record, dict):
            raise ValueError(f"{path} line {number} is a {type(record).__name__}, not a JSON object.")
        records.append((number, record))
    return records
