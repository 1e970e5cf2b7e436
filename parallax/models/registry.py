"""model_type -> family class. Adding a family is one file plus one line here."""

from __future__ import annotations

import importlib

# model_type: (module, class). Imported lazily so one broken family never blocks the others.
FAMILIES: dict[str, tuple[str, str]] = {
    "llama": ("parallax.models.llama", "LlamaForCausalLM"),
    "mistral": ("parallax.models.llama", "LlamaForCausalLM"),
    "qwen2": ("parallax.models.qwen2", "Qwen2ForCausalLM"),
    "qwen3": ("parallax.models.qwen3", "Qwen3ForCausalLM"),
    "qwen3_moe": ("parallax.models.qwen3_moe", "Qwen3MoeForCausalLM"),
    "gpt_oss": ("parallax.models.gpt_oss", "GptOssForCausalLM"),
    "minimax_m2": ("parallax.models.minimax_m2", "MiniMaxM2ForCausalLM"),
}


def supported_model_types() -> list[str]:
    return sorted(FAMILIES)


def family_for(model_type: str):
    """The shard class for a config's model_type, or a ValueError naming what is supported."""
    if model_type not in FAMILIES:
        raise ValueError(
            f"model_type {model_type!r} is not supported; supported: "
            f"{', '.join(supported_model_types())}"
        )
    module_name, class_name = FAMILIES[model_type]
    return getattr(importlib.import_module(module_name), class_name)
