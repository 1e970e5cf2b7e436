"""Build a shard [start_layer, end_layer) of a model and fill it with only its weights."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from transformers import AutoConfig

from parallax.models import gguf as gguf_format
from parallax.models.hub import ModelSource, check_quantize_source, download_for_shard, resolve
from parallax.models.quant import loading as quant_loading
from parallax.models.quant import quantize as quantizer
from parallax.models.registry import family_for
from parallax.models.weights import ReadLog, iter_safetensors, weight_map

if TYPE_CHECKING:
    from parallax.models.range_cache import Progress

logger = logging.getLogger(__name__)


@dataclass
class LoadedShard:
    model: torch.nn.Module
    config: object
    source: ModelSource
    tokenizer_path: str  # a dir, or the .gguf file
    read_log: ReadLog


def header_source(source: ModelSource) -> ModelSource:
    """A hub GGUF as a local "gguf" source whose header is present (fetched when missing; the
    tensor data may not be): enough for its config, sizing and tokenizer. Others as they are."""
    if source.kind != "hubgguf":
        return source
    from parallax.models.hub_gguf import ensure_headers

    return ModelSource(source.name, "gguf", ensure_headers(source.hub_model or source.name),
                       hub_model=source.hub_model)


def load_config(source: ModelSource):
    """The transformers config of a resolved source (GGUF metadata or config.json)."""
    source = header_source(source)
    if source.kind == "gguf":
        return gguf_format.gguf_config(gguf_format.open_reader(source.path), source.path)
    try:
        return AutoConfig.from_pretrained(source.path)
    except (OSError, ValueError, KeyError) as exc:
        raise ValueError(f"cannot read config.json of {source.path}: {exc}") from exc


def load_shard(
    model: str | None,
    start_layer: int = 0,
    end_layer: int | None = None,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    on_download: Callable[[Progress], None] | None = None,
    quantize: str | None = None,
) -> LoadedShard:
    """Load layers [start_layer, end_layer) (end None = all). Raises ValueError on bad input.

    `on_download` gets download progress (a hub GGUF fetches only this shard's tensors).
    `quantize` ("q8_0" / "q4_0" / "q4_k") packs a float checkpoint's linear and embedding
    weights into GGUF blocks as they stream in, one tensor at a time (quant/quantize.py)."""
    qtype = None if quantize is None else quantizer.qtype_of(quantize)
    source = resolve(model)
    check_quantize_source(source, quantize)
    if source.kind == "hubgguf":
        source = _fetch_hub_gguf(source, start_layer, end_layer, on_download)
    if source.kind == "repo":
        def owns_for_config(config_dict: dict):
            config = AutoConfig.for_model(**config_dict)
            family = family_for(config.model_type)
            end = config.num_hidden_layers if end_layer is None else end_layer
            return lambda name: family.owns_tensor(name, start_layer, end, config)

        path = download_for_shard(source.repo_id, owns_for_config)
        source = ModelSource(source.name, "dir", path, source.repo_id)
    config = load_config(source)
    family = family_for(config.model_type)
    end = config.num_hidden_layers if end_layer is None else end_layer
    with torch.device("meta"):
        shard = family(config, start_layer, end)

    def owns(name: str) -> bool:
        return family.owns_tensor(name, start_layer, end, config)

    packed = stripped = None
    if source.kind == "gguf" and not gguf_format.dequantize_requested():
        # decided on the meta shard, so the float weights packed ones replace never exist
        reader = gguf_format.open_reader(source.path)
        packed = quant_loading.packable_names(shard, gguf_format.tensor_types(reader, owns))
        stripped = quant_loading.strip(shard, packed)
    elif source.kind != "gguf":
        names = [name for name in weight_map(source.path) if owns(name)]
        if hasattr(shard, "match_checkpoint"):
            # e.g. gpt-oss: experts held MXFP4 exactly where the safetensors store them so
            shard.match_checkpoint(set(names))
        if qtype is not None:
            packed = set(quantizer.quantized_names(shard, names, qtype))
            stripped = quant_loading.strip(shard, packed)
    shard.to_empty(device=device)
    shard.to(dtype)
    shard.rotary.build(device)

    log = ReadLog()
    if source.kind == "gguf":
        reader = gguf_format.open_reader(source.path)
        tensors = gguf_format.iter_gguf(reader, config, owns, log, packed)
    else:
        tensors = iter_safetensors(source.path, owns, log)
        if qtype is not None:
            tensors = quantizer.quantize_stream(tensors, packed, qtype)
    if stripped:
        loaded = quant_loading.load_weights(shard, tensors, stripped, dtype, device)
    else:
        loaded = shard.load_weights(tensors)
        quant_loading.log_paths(shard)
    expected = {name for name, _ in shard.named_parameters(remove_duplicate=False)}
    missing = sorted(expected - loaded)
    if missing:
        raise ValueError(
            f"{source.path} lacks {len(missing)} tensors for layers [{start_layer}, {end}), "
            f"e.g. {missing[:3]}: the checkpoint is incomplete or of another architecture"
        )
    shard.eval()
    logger.info("loaded %s layers [%d, %d) (%.1f MB read)", source.name, start_layer, end,
                log.num_bytes / 1e6)
    return LoadedShard(shard, config, source, source.path, log)


def _fetch_hub_gguf(source: ModelSource, start_layer: int, end_layer: int | None,
                    on_download: Callable[[Progress], None] | None) -> ModelSource:
    """Fetch the header, then the bytes of the shard's own tensors; a local "gguf" source."""
    from parallax.models.hub_gguf import ensure_shard, resolve_pinned

    # one commit for the header and the tensors (`serve -m REPO:TAG` resolves it here)
    source = ModelSource(source.name, source.kind, "", hub_model=resolve_pinned(
        source.hub_model or source.name).model)
    config = load_config(source)  # from the header alone
    family = family_for(config.model_type)
    end = config.num_hidden_layers if end_layer is None else end_layer
    path = ensure_shard(source.hub_model or source.name,
                        lambda name: family.owns_tensor(name, start_layer, end, config),
                        on_download)
    return ModelSource(source.name, "gguf", path, hub_model=source.hub_model)


def load_tokenizer(path: str):
    """transformers tokenizer (with chat template) from a model dir or a .gguf file."""
    import os

    from transformers import AutoTokenizer

    if path.endswith(".gguf"):
        return AutoTokenizer.from_pretrained(os.path.dirname(path),
                                             gguf_file=os.path.basename(path))
    return AutoTokenizer.from_pretrained(path)
