"""Where preference records come from: a JSONL folder, or a table (parquet file, folder of parquet shards,
``datasets`` folder written by ``save_to_disk``, hub id), read whole or streamed.

JSONL folder (default file name ``pairs.jsonl``), one object per line, paths relative to the folder::

    {"prompt": str, "chosen": path, "rejected": path}                       # a pair: K = 2, chosen first
    {"prompt": str, "image": path}                                          # one image: K = 1 (Diffusion-DRO)
    {"prompt": str, "images": [path, ...],                                  # K >= 2 candidates
     "scores": [float, ...],          # optional, one per image, higher = better (else: images best first)
     "weight_maps": [path, ...],      # optional, one per image: PNG / JPEG / .npy / .safetensors
     "labels": [+1 | -1 | 0, ...]}    # optional, per-segment preference of candidate 0 over candidate 1

Other keys are ignored (``make_digits_pairs`` writes ``reward_chosen`` / ``reward_rejected`` for reference).

Table columns (parquet / ``datasets``):

- prompt: ``caption`` or ``prompt``;
- images: ``jpg_0`` .. ``jpg_{K-1}``, or one ``images`` list column; each entry encoded image bytes or a
  ``datasets`` image ``{"bytes", "path"}`` (a path-only entry needs ``image_root``, see ``records.py``);
- order: ``label_0`` / ``label_1`` (Pick-a-Pic, Kirstain et al. 2023: 1 = preferred, 0.5 = tie; ties are dropped
  and the winner is put first, as in Diffusion-DPO), or a ``scores`` list column (higher = better, stored order
  kept), or neither (stored order = preference order, best first);
- optional ``weight_maps`` (list column of encoded PNG / NPY / safetensors bytes or ``{"bytes", "path"}``) and
  ``labels`` (list column of per-segment labels).

Every record of a dataset has the same K; a JSONL file or table is checked when it is opened and a record that
breaks the rule is refused (``DatasetError``), never skipped. Streaming (``streaming=True``) reads a table with
``datasets`` streaming, split over processes with ``split_dataset_by_node``, for data too large to copy.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .records import DatasetError, PreferenceRecord, read_jsonl, resolve_path

PROMPT_COLUMNS = ("caption", "prompt")
PICKAPIC_LABELS = ("label_0", "label_1")
OPTIONAL_LISTS = ("scores", "weight_maps", "labels")


def jsonl_record(entry: dict, where: str) -> PreferenceRecord:
    """A ``PreferenceRecord`` from one JSONL object (either format of the module docstring)."""
    if "prompt" not in entry:
        raise DatasetError(f"{where} lacks the key 'prompt'; it has {sorted(entry)}.")
    if "image" in entry:  # one image (an expert demonstration, K = 1)
        images = [entry["image"]]
    elif "images" in entry:
        images = entry["images"]
        if not isinstance(images, list):
            raise DatasetError(f"{where}: 'images' must be a list of image paths, got {type(images).__name__}.")
    elif "chosen" in entry and "rejected" in entry:
        images = [entry["chosen"], entry["rejected"]]
    else:
        raise DatasetError(
            f"{where} has neither 'images' nor 'chosen' + 'rejected' (keys: {sorted(entry)}); each line must be "
            '{"prompt", "chosen", "rejected"} or {"prompt", "images": [...], optional "scores", "weight_maps", '
            '"labels"}.'
        )
    try:
        return PreferenceRecord(entry["prompt"], images, *(entry.get(name) for name in OPTIONAL_LISTS))
    except DatasetError as error:
        raise DatasetError(f"{where}: {error}") from None


def check_same_k(counts, origin: str) -> int:
    """The one K of a dataset, or a DatasetError naming the first record whose K differs."""
    counts = np.asarray(counts)
    if len(counts) == 0:
        raise DatasetError(f"dataset {origin} has no records.")
    different = np.flatnonzero(counts != counts[0])
    if len(different):
        raise DatasetError(
            f"dataset {origin}: record {different[0]} has {counts[different[0]]} images but record 0 has "
            f"{counts[0]}; every record of a dataset must have the same number of candidates K (split it by K)."
        )
    return int(counts[0])


class JsonlSource:
    """A folder with a JSONL of records; every path is checked when the file is read (``records.resolve_path``)."""

    def __init__(self, folder: Path, jsonl_name: str, image_root: Path | None = None):
        path = folder / jsonl_name
        self.base, self.root, self.num_ties = folder, image_root, 0
        self.records = [jsonl_record(entry, f"{path} line {number}") for number, entry in read_jsonl(path)]
        for record in self.records:
            for value in record.images + (record.weight_maps or []):
                if isinstance(value, str):
                    resolve_path(value, self.base, self.root)
        self.num_candidates = check_same_k([r.num_candidates for r in self.records], str(path))

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> PreferenceRecord:
        return self.records[i]


@dataclass
class TableLayout:
    """Which columns of a table hold what (see the module docstring), found from its column names."""

    prompt: str
    images: list[str]  # jpg_0 .. jpg_{K-1}, or ["images"] for a list column
    pickapic: bool
    optional: list[str]

    @classmethod
    def of(cls, columns: list[str], origin: str) -> TableLayout:
        prompt = next((name for name in PROMPT_COLUMNS if name in columns), None)
        numbered = []
        while f"jpg_{len(numbered)}" in columns:
            numbered.append(f"jpg_{len(numbered)}")
        images = ["images"] if "images" in columns else numbered
        pickapic = any(name in columns for name in PICKAPIC_LABELS)
        problems = []
        if prompt is None:
            problems.append("a prompt column ('caption' or 'prompt')")
        if pickapic:
            missing = [name for name in ("jpg_0", "jpg_1", *PICKAPIC_LABELS) if name not in columns]
            if missing:
                problems.append(f"the Pick-a-Pic column(s) {missing}")
            elif images != ["jpg_0", "jpg_1"]:
                problems.append(f"Pick-a-Pic labels go with exactly two images, not {images}")
            if "scores" in columns:
                problems.append("one kind of order (Pick-a-Pic labels or a 'scores' column), not both")
        elif images != ["images"] and len(images) < 2:
            problems.append("image columns ('jpg_0', 'jpg_1', ... or an 'images' list column)")
        if problems:
            raise DatasetError(
                f"dataset {origin} lacks {'; '.join(problems)}; it has the columns {columns}. Expected a prompt, "
                "K image columns and optionally label_0 / label_1 (Pick-a-Pic: jpg_* as image bytes, label_0 = 1 "
                "when jpg_0 is preferred, 0.5 for a tie) or scores, weight_maps, labels (see "
                "diffalign.alignment.sources), or a folder with a JSONL of {prompt, chosen, rejected}."
            )
        return cls(prompt, images, pickapic, [name for name in OPTIONAL_LISTS if name in columns])

    @property
    def columns(self) -> list[str]:
        return [self.prompt, *self.images, *(PICKAPIC_LABELS if self.pickapic else ()), *self.optional]

    def record(self, row: dict, origin: str) -> PreferenceRecord | None:
        """The record of one row; None for a Pick-a-Pic tie (label_0 == 0.5)."""
        images = list(row["images"]) if self.images == ["images"] else [row[name] for name in self.images]
        if self.pickapic:
            if row["label_0"] == 0.5:
                return None
            if row["label_0"] < 0.5:
                images.reverse()  # the winner first
        try:
            return PreferenceRecord(row[self.prompt], images, *(row.get(name) for name in OPTIONAL_LISTS))
        except DatasetError as error:
            raise DatasetError(f"dataset {origin}: {error}") from None


def _undecoded(dataset, layout: TableLayout):
    """The dataset with its image columns left as ``{"bytes", "path"}`` (decoded later, lazily, by us)."""
    from datasets import Image as ImageFeature
    from datasets import Sequence

    dataset = dataset.select_columns(layout.columns)
    for name in layout.images:
        feature = dataset.features[name] if dataset.features is not None else None
        if isinstance(feature, ImageFeature):
            dataset = dataset.cast_column(name, ImageFeature(decode=False))
        elif isinstance(getattr(feature, "feature", None), ImageFeature):  # a list of images (List / Sequence)
            dataset = dataset.cast_column(name, Sequence(ImageFeature(decode=False)))
    return dataset


class TableSource:
    """Rows of a ``datasets.Dataset`` as records: Pick-a-Pic ties dropped, K checked over the whole table."""

    def __init__(self, dataset, origin: str, image_root: Path | None = None):
        self.layout = TableLayout.of(list(dataset.column_names), origin)
        self.dataset, self.origin, self.base, self.root = _undecoded(dataset, self.layout), origin, None, image_root
        rows = np.arange(len(dataset))
        if self.layout.pickapic:
            label_0 = dataset.select_columns(["label_0"]).with_format("arrow")[:].column("label_0")
            rows = np.flatnonzero(np.asarray(label_0.to_numpy(), dtype=np.float64) != 0.5)
        self.rows, self.num_ties = rows, len(dataset) - len(rows)
        self.num_candidates = self._check_lengths()

    def _check_lengths(self) -> int:
        """K of the table; a DatasetError for rows of another K or with a list of the wrong length. Reads only the
        list lengths of the table's memory-mapped columns (no image bytes), so row numbers are the table's."""
        if self.layout.images != ["images"]:
            counts = np.full(self.dataset.data.num_rows, len(self.layout.images))
        else:
            counts = self._list_lengths("images")
        k = check_same_k(counts, self.origin)
        for name in ("scores", "weight_maps"):
            if name in self.layout.optional:
                lengths = self._list_lengths(name)
                wrong = np.flatnonzero((lengths != k) & (lengths >= 0))
                if len(wrong):
                    raise DatasetError(
                        f"dataset {self.origin}: record {wrong[0]} has {lengths[wrong[0]]} {name} for {k} images; "
                        f"give one {name[:-1]} per image, in the images' order."
                    )
        return k

    def _list_lengths(self, name: str) -> np.ndarray:
        """Lengths of a list column in table order (-1 for a null entry)."""
        import pyarrow.compute as pc

        lengths = pc.list_value_length(self.dataset.data.column(name)).fill_null(-1)
        return np.asarray(lengths.to_numpy(zero_copy_only=False))

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> PreferenceRecord:
        return self.layout.record(self.dataset[int(self.rows[i])], self.origin)


class StreamingTableSource:
    """A streamed table (``datasets.IterableDataset``), this process's share (``split_dataset_by_node``), yielding
    (index, record or None for a tie). Inside a DataLoader worker ``datasets`` reads that worker's part of the share
    only; ``index`` = process + P (worker + W position) for P processes and W workers: unique, and the same on every
    pass at the same P and W."""

    def __init__(
        self, dataset, origin: str, image_root: Path | None = None, process_index: int = 0, num_processes: int = 1
    ):
        from datasets.distributed import split_dataset_by_node

        columns = dataset.column_names
        if columns is None:  # an iterable dataset without known features: look at the first row
            columns = list(next(iter(dataset)))
        self.layout = TableLayout.of(list(columns), origin)
        self.origin, self.base, self.root, self.num_candidates = origin, None, image_root, None
        self.process_index, self.num_processes = process_index, num_processes
        self.dataset = split_dataset_by_node(_undecoded(dataset, self.layout), process_index, num_processes)

    def iterate(self, seed: int | None = None, epoch: int = 0, buffer_size: int = 1000):
        """(index, record or None) over this process's share, shuffled with a buffer when ``seed`` is given."""
        dataset = self.dataset
        if seed is not None:
            dataset = dataset.shuffle(seed=seed, buffer_size=buffer_size)
            dataset.set_epoch(epoch)
        import torch.utils.data

        worker = torch.utils.data.get_worker_info()
        worker_id, num_workers = (worker.id, worker.num_workers) if worker is not None else (0, 1)
        slot, stride = self.process_index + self.num_processes * worker_id, self.num_processes * num_workers
        for position, row in enumerate(dataset):
            record = self.layout.record(row, self.origin)
            if record is not None:
                if self.num_candidates is None:
                    self.num_candidates = record.num_candidates
                elif record.num_candidates != self.num_candidates:
                    raise DatasetError(
                        f"dataset {self.origin}: a streamed record has {record.num_candidates} images, earlier ones "
                        f"{self.num_candidates}; every record of a dataset must have the same number of candidates K."
                    )
            yield slot + stride * position, record


def _open_table(path: Path, dataset: str, split: str, streaming: bool):
    import datasets

    if path.is_file() and path.suffix == ".parquet":
        return datasets.load_dataset("parquet", data_files=str(path), split="train", streaming=streaming)
    if path.is_dir() and any(path.glob("*.parquet")):
        files = sorted(str(p) for p in path.glob("*.parquet"))
        return datasets.load_dataset("parquet", data_files=files, split="train", streaming=streaming)
    if path.is_dir() and any((path / name).is_file() for name in ("state.json", "dataset_dict.json")):
        data = datasets.load_from_disk(str(path))
        data = data[split] if isinstance(data, datasets.DatasetDict) else data
        return data.to_iterable_dataset() if streaming else data
    if path.exists() and not path.is_dir():
        raise DatasetError(f"dataset {dataset} is a file but not .parquet; pass a parquet file or a folder.")
    return datasets.load_dataset(dataset, split=split, streaming=streaming)


def load_source(
    dataset: str,
    split: str = "train",
    jsonl_name: str = "pairs.jsonl",
    image_root: str | Path | None = None,
    streaming: bool = False,
    process_index: int = 0,
    num_processes: int = 1,
):
    """The record source for ``dataset``: a JSONL folder, a parquet file / folder of shards, a ``save_to_disk``
    folder, or a hub id / anything ``datasets.load_dataset`` reads. ``streaming`` reads a table lazily, this
    process's share only (``process_index`` of ``num_processes``)."""
    path = Path(dataset)
    root = Path(image_root) if image_root is not None else None
    if path.is_dir() and (path / jsonl_name).is_file():
        if streaming:
            raise DatasetError(
                f"dataset {dataset} is a JSONL folder, which is read whole; streaming is for tables (parquet shards, "
                "hub datasets). Drop --streaming."
            )
        return JsonlSource(path, jsonl_name, root)
    table = _open_table(path, dataset, split, streaming)
    if streaming:
        return StreamingTableSource(table, dataset, root, process_index, num_processes)
    return TableSource(table, dataset, root)
