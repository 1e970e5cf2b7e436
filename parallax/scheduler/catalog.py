"""Model name -> ModelSpec (the memory shape allocation plans with), and the `/model/list` entries.

A model string is what nodes pass to `load_shard`: the built-in name, a local directory, a
`.gguf` file, a Hugging Face repo id, or a hub GGUF pinned to one commit
(`OWNER/REPO@COMMIT/FILE.gguf`, what `OWNER/REPO:QUANT` and `OWNER/REPO/FILE.gguf` resolve to
here, sized from the file's header fetched alone). Its config comes from the GGUF metadata or config.json;
for a repo id, from the local HF cache when present, else from :data:`CURATED_CONFIGS` (a few
popular ids), else by downloading config.json alone. Sizing builds the model on the meta device
(:func:`parallax.models.sizing.estimate_layer_bytes`), so results are cached per model. A GGUF
file loaded packed (the default) is sized by its tensor table instead: the packed bytes of each
layer as stored, float tensors at the load dtype (:func:`parallax.models.sizing.model_estimate`).

Bytes assume the dtype nodes load weights in: float32 (4 bytes a parameter, what CPU nodes use)
unless the scheduler is told bfloat16 (2 bytes, CUDA nodes). A model chosen with `quantize`
(q8_0 / q4_0 / q4_k, float checkpoints only) counts the weights nodes pack at their block bytes;
specs are cached per (model, quantize).
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterable, Mapping
from typing import Any

from parallax.models import hub_gguf
from parallax.models.hub import DEFAULT_MODEL, REPO_ID, ModelSource, resolve
from parallax.scheduler.allocation import DEFAULT_MEMORY_FRACTION, ModelSpec, layer_bytes_with_kv

logger = logging.getLogger(__name__)

DTYPE_BYTES = {"float32": 4, "bfloat16": 2}

# Written from knowledge of each repo's published config.json (not downloaded): only the fields
# that decide the memory shape and let our families build on the meta device. A config found in
# the local HF cache always wins over these.
_QWEN3 = {"model_type": "qwen3", "vocab_size": 151936, "head_dim": 128, "rms_norm_eps": 1e-6,
          "rope_theta": 1000000.0, "max_position_embeddings": 40960}
CURATED_CONFIGS: dict[str, dict[str, Any]] = {
    "Qwen/Qwen3-0.6B": {**_QWEN3, "hidden_size": 1024, "intermediate_size": 3072,
                        "num_hidden_layers": 28, "num_attention_heads": 16,
                        "num_key_value_heads": 8, "tie_word_embeddings": True},
    "Qwen/Qwen3-8B": {**_QWEN3, "hidden_size": 4096, "intermediate_size": 12288,
                      "num_hidden_layers": 36, "num_attention_heads": 32,
                      "num_key_value_heads": 8, "tie_word_embeddings": False},
    "Qwen/Qwen3-30B-A3B": {**_QWEN3, "model_type": "qwen3_moe", "hidden_size": 2048,
                           "intermediate_size": 6144, "moe_intermediate_size": 768,
                           "num_experts": 128, "num_experts_per_tok": 8,
                           "decoder_sparse_step": 1, "mlp_only_layers": [],
                           "norm_topk_prob": True, "num_hidden_layers": 48,
                           "num_attention_heads": 32, "num_key_value_heads": 4,
                           "tie_word_embeddings": False},
    "openai/gpt-oss-20b": {"model_type": "gpt_oss", "hidden_size": 2880,
                           "intermediate_size": 2880, "num_local_experts": 32,
                           "num_experts_per_tok": 4, "num_hidden_layers": 24,
                           "num_attention_heads": 64, "num_key_value_heads": 8, "head_dim": 64,
                           "vocab_size": 201088, "sliding_window": 128, "attention_bias": True,
                           "tie_word_embeddings": False, "rms_norm_eps": 1e-5,
                           "rope_theta": 150000.0, "max_position_embeddings": 131072,
                           "swiglu_limit": 7.0,
                           # the experts are MXFP4 and stay so in memory (sized packed)
                           "quantization_config": {"quant_method": "mxfp4"},
                           "rope_scaling": {"rope_type": "yarn", "factor": 32.0,
                                            "beta_fast": 32.0, "beta_slow": 1.0,
                                            "truncate": False,
                                            "original_max_position_embeddings": 4096}},
    "meta-llama/Llama-3.2-1B-Instruct": {"model_type": "llama", "hidden_size": 2048,
                                         "intermediate_size": 8192, "num_hidden_layers": 16,
                                         "num_attention_heads": 32, "num_key_value_heads": 8,
                                         "head_dim": 64, "vocab_size": 128256,
                                         "tie_word_embeddings": True, "rms_norm_eps": 1e-5,
                                         "rope_theta": 500000.0,
                                         "max_position_embeddings": 131072,
                                         "rope_scaling": {"rope_type": "llama3", "factor": 32.0,
                                                          "low_freq_factor": 1.0,
                                                          "high_freq_factor": 4.0,
                                                          "original_max_position_embeddings":
                                                              8192}},
}


def canonical_model(model: str | None) -> str:
    """The string nodes load: the built-in name for None / "" / "default", else `model` as given."""
    return DEFAULT_MODEL if model in (None, "", "default") else model.strip()


def display_name(model: str) -> str:
    """Short name for `/v1/models`: a file or directory's base name, a repo id as is."""
    if model == DEFAULT_MODEL or (REPO_ID.match(model) and not os.path.exists(model)):
        return model
    if hub_gguf.is_hub_gguf(model):
        return hub_gguf.display_name(model)
    base = os.path.basename(os.path.normpath(os.path.expanduser(model)))
    return base.removesuffix(".gguf") or model


def solo_memory_bytes(spec: ModelSpec) -> float:
    """Memory one node needs to hold the whole model under the allocator's rules.

    Weights (embedding / LM head once when tied) plus every layer's KV reserve, over the share
    of memory allocation plans with. A node (`--memory`) below this gets part of the model only.
    """
    need = spec.extra_bytes(first=True, last=True) + spec.num_layers * layer_bytes_with_kv(spec)
    return need / DEFAULT_MEMORY_FRACTION


def _spec_from_config(name: str, config: Any, dtype_bytes: int,
                      source: ModelSource | None = None,
                      quantize: str | None = None) -> ModelSpec:
    """The allocator's view of a model; a GGUF `source` is sized by its packed tensor bytes, a
    float one with `quantize` by the blocks its packed weights take."""
    from parallax.models.registry import FAMILIES
    from parallax.models.sizing import model_estimate

    model_type = getattr(config, "model_type", None)
    if model_type not in FAMILIES:
        raise ValueError(f"{name}: model_type {model_type!r} is not supported; supported: "
                         f"{', '.join(sorted(FAMILIES))}")
    layer, embedding, lm_head, kv = model_estimate(source, config, dtype_bytes, quantize)
    return ModelSpec(name=name, num_layers=int(config.num_hidden_layers), layer_bytes=layer,
                     embedding_bytes=embedding, lm_head_bytes=lm_head,
                     kv_bytes_per_token_per_layer=kv,
                     tie_word_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
                     quantize=quantize,
                     activation_bytes=int(getattr(config, "hidden_size", 0) or 0) * dtype_bytes)


def _repo_config(repo_id: str, curated: Mapping[str, dict[str, Any]]) -> Any:
    """Config of a repo id: local HF cache, then the curated table, then config.json download."""
    from huggingface_hub import hf_hub_download, try_to_load_from_cache
    from transformers import AutoConfig

    from parallax.models.loader import load_config

    cached = try_to_load_from_cache(repo_id, "config.json")
    if isinstance(cached, str):
        return load_config(ModelSource(repo_id, "dir", os.path.dirname(cached), repo_id))
    if repo_id in curated:
        fields = dict(curated[repo_id])
        return AutoConfig.for_model(fields.pop("model_type"), **fields)
    try:
        path = hf_hub_download(repo_id, "config.json")
    except Exception as exc:  # network, 404, gated repo, offline mode...
        raise ValueError(f"cannot fetch the config of {repo_id}: {exc}") from exc
    return load_config(ModelSource(repo_id, "dir", os.path.dirname(path), repo_id))


class ModelCatalog:
    """Sizes models once and lists the ones the setup page offers. Thread-safe.

    `known` maps model strings to ready specs (tests, or models sized elsewhere); they are
    listed first and never looked up on disk or the network.
    """

    def __init__(self, dtype: str = "float32", local_models: Iterable[str] = (),
                 curated: Mapping[str, dict[str, Any]] | None = None,
                 known: Mapping[str, ModelSpec] | None = None,
                 include_builtin: bool = True, quantize: str | None = None) -> None:
        if dtype not in DTYPE_BYTES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPE_BYTES)}, got {dtype!r}")
        self.dtype = dtype
        self.dtype_bytes = DTYPE_BYTES[dtype]
        self.quantize = quantize  # what /model/list sizes float checkpoints with
        self.local_models = [canonical_model(m) for m in local_models]
        self.curated = dict(CURATED_CONFIGS if curated is None else curated)
        self.include_builtin = include_builtin
        self._specs: dict[tuple[str, str | None], ModelSpec] = {
            (name, spec.quantize): spec for name, spec in (known or {}).items()}
        self._known = list(known or {})
        self._lock = threading.Lock()

    def spec(self, model: str | None, quantize: str | None = None) -> ModelSpec:
        """The ModelSpec of `model` loaded with `quantize` (cached). Raises ValueError for
        unknown / unsupported models, a bad `quantize`, or `quantize` with a GGUF."""
        from parallax.config import check_quantize

        check_quantize(quantize)
        name = canonical_model(model)
        key = (name, quantize)
        with self._lock:
            if key in self._specs:
                return self._specs[key]
        source = resolve(name)
        pinned = name
        if source.kind == "hubgguf":  # one commit and file list, handed to every node as is
            pinned = hub_gguf.resolve_pinned(name).model
            with self._lock:
                if (pinned, quantize) in self._specs:
                    self._specs[key] = self._specs[(pinned, quantize)]
                    return self._specs[key]
            source = resolve(pinned)
        if source.kind == "repo":
            config = _repo_config(source.repo_id or name, self.curated)
        else:
            from parallax.models.loader import header_source, load_config

            source = header_source(source)  # a hub GGUF is sized from its header
            config = load_config(source)
        spec = _spec_from_config(pinned, config, self.dtype_bytes, source, quantize)
        with self._lock:
            self._specs[key] = self._specs[(pinned, quantize)] = spec
        return spec

    def known_as(self, model: str) -> str | None:
        """The name of the spec already sized for `model` (a hub GGUF's pinned string for the
        tag it was chosen by), or None; never looks anything up."""
        with self._lock:
            spec = self._specs.get((canonical_model(model), None))
        return None if spec is None else spec.name

    def default_quantize(self, model: str | None) -> str | None:
        """The scheduler's --quantize for `model`: None for GGUF files (packed as stored) and
        models given ready-sized (`known`). ValueError for a model string that is not one."""
        name = canonical_model(model)
        if self.quantize is None or name in self._known or \
                resolve(name).kind in ("gguf", "hubgguf"):
            return None
        return self.quantize

    def listed_spec(self, name: str) -> ModelSpec:
        """The spec /model/list shows: the model as `default_quantize` loads it."""
        return self.spec(name, self.default_quantize(name))

    def entry(self, spec: ModelSpec) -> dict[str, Any]:
        """One `/model/list` item: `{name, memory_gb, num_layers, weights_gb, dtype, quantize}`
        (quantize: null for float weights and for GGUF files, packed as stored)."""
        return {
            "name": spec.name,
            "memory_gb": round(solo_memory_bytes(spec) / 2**30, 2),
            "num_layers": spec.num_layers,
            "weights_gb": round(spec.total_bytes / 2**30, 2),
            "dtype": self.dtype,
            "quantize": spec.quantize,
        }

    def names(self) -> list[str]:
        """Every listed model string, in order, without duplicates."""
        names = [*self._known]
        if self.include_builtin:
            names.append(DEFAULT_MODEL)
        names += self.local_models + list(self.curated)
        return list(dict.fromkeys(names))

    def entries(self) -> list[dict[str, Any]]:
        """`/model/list` data; a model that cannot be sized is left out (and logged)."""
        out = []
        for name in self.names():
            try:
                out.append(self.entry(self.listed_spec(name)))
            except (ValueError, OSError) as exc:
                logger.warning("model list: skipping %s: %s", name, exc)
        return out
