"""Read only the tensors a shard owns from safetensors checkpoints (single or sharded)."""

from __future__ import annotations

import json
import os
import posixpath
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


_GLOB_CHARS = frozenset("*?[]")


def check_weight_map(mapping: object, model_dir: str | None = None) -> dict[str, str]:
    """The index's `weight_map`, if every file it names lies inside the checkpoint directory.

    A downloaded checkpoint is untrusted: its index could name `/etc/passwd`, `../../x` or a
    glob that makes the hub download everything. Each file must be a relative path made of
    plain parts, ending in `.safetensors`; with `model_dir`, its real path (symlinks followed)
    must stay inside the directory, or inside the Hugging Face cache entry of the same repo
    (snapshot files are symlinks to `../../blobs/`). Raises ValueError naming the file.
    """
    if not isinstance(mapping, dict):
        raise ValueError(f"{INDEX_FILE}: 'weight_map' must be an object of tensor -> file")
    for name, file in mapping.items():
        if not isinstance(name, str) or not isinstance(file, str):
            raise ValueError(f"{INDEX_FILE}: weight_map entries must be strings, got "
                             f"{name!r}: {file!r}")
    for file in set(mapping.values()):
        _check_file_name(file)
        if model_dir is not None:
            _check_inside(file, model_dir)
    return dict(mapping)


def _check_file_name(file: str) -> None:
    parts = file.split("/")
    if (not file.endswith(".safetensors") or "\\" in file or ":" in file
            or posixpath.isabs(file) or _GLOB_CHARS & set(file)
            or any(part in ("", ".", "..") for part in parts)):
        raise ValueError(f"{INDEX_FILE} names the weight file {file!r}: a checkpoint may only "
                         "name .safetensors files inside its own directory (relative path, no "
                         "'..', no wildcards)")


def _check_inside(file: str, model_dir: str) -> None:
    real = os.path.realpath(os.path.join(model_dir, *file.split("/")))
    if not any(_inside(real, root) for root in _allowed_roots(model_dir)):
        raise ValueError(f"the weight file {file!r} resolves to {real}, outside the checkpoint "
                         f"directory {model_dir}; remove the symlink or the {INDEX_FILE} entry")


def _allowed_roots(model_dir: str) -> list[str]:
    root = os.path.realpath(model_dir)
    roots = [root]
    parent = os.path.dirname(root)
    if os.path.basename(parent) == "snapshots":  # HF cache: models--org--name/snapshots/<rev>
        roots.append(os.path.join(os.path.dirname(parent), "blobs"))
    return roots


def _inside(path: str, root: str) -> bool:
    return os.path.commonpath([path, root]) == root


def weight_map(model_dir: str) -> dict[str, str]:
    """Tensor name -> safetensors file name, from the index or the single file's header.

    Every file is checked to lie inside `model_dir` (`check_weight_map`): ValueError otherwise.
    """
    index_path = os.path.join(model_dir, INDEX_FILE)
    if os.path.exists(index_path):
        try:
            with open(index_path) as f:
                mapping = json.load(f)["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"cannot read {index_path}: {exc}") from exc
        return check_weight_map(mapping, model_dir)
    single = os.path.join(model_dir, SINGLE_FILE)
    if os.path.exists(single):
        _check_inside(SINGLE_FILE, model_dir)
        with safe_open(single, framework="pt") as f:
            return {name: SINGLE_FILE for name in f.keys()}  # noqa: SIM118 - not a dict
    files = sorted(n for n in os.listdir(model_dir) if n.endswith(".safetensors"))
    for name in files:
        _check_inside(name, model_dir)  # a symlink may still point elsewhere
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
