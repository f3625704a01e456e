"""A bounded replay buffer of rollouts, and per-process tensor state that checkpoints carry.

Online methods (D3PO, Diffusion-DRO) sample trajectories during training. Each process keeps the trajectories of
its last ``capacity`` prompts (oldest out) in a ``ReplayBuffer``: per prompt its K trajectories' latents (x_T ...
x_0, in the dtype they were sampled in), the timesteps and step log-probabilities, the rewards, the prompt, and
where it came from (dataset index, epoch, step). Every stored prompt gets a running id, the handle of offline
labelling (``labels.py``).

State that a resume must find again (the buffer, a lagged policy copy, ...) is a dict of tensors per process;
``register_process_state`` writes it as ``<name>_<process>.safetensors`` into every checkpoint (safetensors, no
pickle) and reads it back on resume, through accelerate's save/load hooks.
"""

from __future__ import annotations

import json
import os
from collections import deque
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .rollout import Rollout

TENSOR_KEYS = ("latents", "timesteps", "log_probs", "rewards")
"""Per-prompt tensors of a stored entry: (K, T + 1, c, h, w), (K, T), (K, T), (K,)."""


class ReplayBuffer:
    """The trajectories of the last ``capacity`` prompts, oldest first (one entry = one prompt, K trajectories)."""

    def __init__(self, capacity: int):
        if capacity < 1:
            raise ValueError(f"ReplayBuffer capacity must be >= 1, got {capacity}.")
        self.capacity = capacity
        self.entries: deque[dict] = deque(maxlen=capacity)
        self.next_id = 0

    def __len__(self) -> int:
        return len(self.entries)

    def add(self, rollout: Rollout, prompts: list[str], index: torch.Tensor, epoch: int) -> list[int]:
        """Store the B prompts of ``rollout`` (detached, on CPU); the oldest fall out beyond ``capacity``.
        -> the ids given to them."""
        ids = []
        for b, prompt in enumerate(prompts):
            entry = {key: getattr(rollout, key)[b].detach().cpu().clone() for key in TENSOR_KEYS}
            entry.update(id=self.next_id, prompt=prompt, index=int(index[b]), epoch=epoch)
            self.entries.append(entry)
            ids.append(self.next_id)
            self.next_id += 1
        return ids

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The buffer as flat tensors ``<id>.<key>`` plus a JSON ``meta`` tensor (prompts, sources, order)."""
        tensors = {f"{e['id']}.{key}": e[key].contiguous() for e in self.entries for key in TENSOR_KEYS}
        meta = {
            "capacity": self.capacity,
            "next_id": self.next_id,
            "entries": [{k: e[k] for k in ("id", "prompt", "index", "epoch")} for e in self.entries],
        }
        tensors["meta"] = torch.frombuffer(bytearray(json.dumps(meta).encode()), dtype=torch.uint8)
        return tensors

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore what ``state_dict`` returned (the capacity must match)."""
        meta = json.loads(bytes(state["meta"].tolist()).decode())
        if meta["capacity"] != self.capacity:
            raise ValueError(
                f"the stored replay buffer holds up to {meta['capacity']} prompts, this run {self.capacity}; resume "
                f"with --rollout_buffer_size {meta['capacity']}."
            )
        self.entries.clear()
        for entry in meta["entries"]:
            entry.update({key: state[f"{entry['id']}.{key}"] for key in TENSOR_KEYS})
            self.entries.append(entry)
        self.next_id = meta["next_id"]

    def save(self, path: str | os.PathLike) -> None:
        """Write the buffer to a safetensors file (temporary file + rename)."""
        path = Path(path)
        temporary = path.with_name(path.name + ".tmp")
        save_file(self.state_dict(), str(temporary))
        os.replace(temporary, path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> ReplayBuffer:
        """A buffer read from a file ``save`` wrote."""
        state = load_file(str(path))
        buffer = cls(json.loads(bytes(state["meta"].tolist()).decode())["capacity"])
        buffer.load_state_dict(state)
        return buffer


def register_process_state(
    accelerator,
    name: str,
    state_dict: Callable[[], dict[str, torch.Tensor]],
    load_state_dict: Callable[[dict[str, torch.Tensor]], None],
) -> None:
    """Save ``state_dict()`` of every process as ``<name>_<process>.safetensors`` into each checkpoint and hand it
    to ``load_state_dict`` on resume. A resume needs the same number of processes (each has its own state)."""

    def file_name() -> str:
        return f"{name}_{accelerator.process_index}.safetensors"

    def save_hook(models, weights, output_dir):
        state = {key: value.detach().cpu().contiguous() for key, value in state_dict().items()}
        save_file(state, os.path.join(output_dir, file_name()))

    def load_hook(models, input_dir):
        path = os.path.join(input_dir, file_name())
        if not os.path.isfile(path):
            raise ValueError(
                f"checkpoint {input_dir} has no {file_name()} (the {name} of process {accelerator.process_index}); "
                "an online run resumes with the number of processes it was saved with."
            )
        load_state_dict(load_file(path))

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)
