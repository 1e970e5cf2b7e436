"""Read only the tensors a shard owns from safetensors checkpoints (single or sharded)."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from safetensors import safe_open

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


@dataclass
class ReadLog:
    """What a load touched: proof that a shard reads only its own tensors."""

    tensor_names: list[str] = field(default_factory=list)
    num_bytes: int = 0

    def record(self, name: str, tensor: torch.Tensor) -> None:
        self.tensor_names.append(name)
        self.num_bytes += tensor.numel() * tensor.element_size()


def weight_map(model_dir: str) -> dict[str, str]:
    """Tensor name -> safetensors file name, from the index or the single file's header."""
    index_path = os.path.join(model_dir, INDEX_FILE)
    if os.path.exists(index_path):
        with open(index_path) as f:
            return dict(json.load(f)["weight_map"])
    single = os.path.join(model_dir, SINGLE_FILE)
    if os.path.exists(single):
        with safe_open(single, framework="pt") as f:
            return {name: SINGLE_FILE for name in f.keys()}  # noqa: SIM118 - not a dict
    files = sorted(n for n in os.listdir(model_dir) if n.endswith(".safetensors"))
    if not files:
        raise ValueError(
            f"{model_dir} has no safetensors weights ({INDEX_FILE} or *.safetensors); "
            "convert the checkpoint to safetensors or pass a .gguf file"
        )
    mapping: dict[str, str] = {}
    for name in files:
        with safe_open(os.path.join(model_dir, name), framework="pt") as f:
            mapping.update({key: name for key in f.keys()})  # noqa: SIM118
    return mapping


def files_for_shard(mapping: dict[str, str], owns: Callable[[str], bool]) -> list[str]:
    """The checkpoint files holding at least one tensor the shard owns (what to download)."""
    return sorted({file for name, file in mapping.items() if owns(name)})


def iter_safetensors(
    model_dir: str, owns: Callable[[str], bool], log: ReadLog | None = None
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, tensor) for the owned tensors only; other tensors are never read."""
    mapping = weight_map(model_dir)
    by_file: dict[str, list[str]] = {}
    for name, file in mapping.items():
        if owns(name):
            by_file.setdefault(file, []).append(name)
    for file, names in sorted(by_file.items()):
        with safe_open(os.path.join(model_dir, file), framework="pt") as f:
            for name in names:
                tensor = f.get_tensor(name)
                if log is not None:
                    log.record(name, tensor)
                yield name, tensor
