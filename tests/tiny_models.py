"""Tiny random-weight models saved by transformers, and helpers to run our shards on them."""

from __future__ import annotations

import torch

from parallax.engine.engine import Engine, EngineConfig
from parallax.engine.sampling_params import SamplingParams
from parallax.models.attention import AttentionMetadata, PrefillSpan

TINY = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
    num_key_value_heads=2, vocab_size=256, max_position_embeddings=512, rms_norm_eps=1e-5,
)


def tiny_config(model_type: str, **overrides):
    from transformers import AutoConfig

    kwargs = {**TINY, **overrides}
    if model_type == "qwen3":
        kwargs.setdefault("head_dim", 16)
    return AutoConfig.for_model(model_type, **kwargs)


def save_tiny_model(tmp_path, model_type: str, seed: int = 0, **overrides):
    """Random-weight HF model saved as safetensors in tmp_path; returns (path, hf_model)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    config = tiny_config(model_type, **overrides)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    # Random init leaves norms at 1 and biases at 0: perturb them so they are tested too.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(("norm.weight", "bias")):
                param.add_(torch.randn_like(param) * 0.1)
    path = tmp_path / model_type
    model.save_pretrained(path, safe_serialization=True)
    return str(path), model


def attach_cache(model, num_slots: int = 1024) -> None:
    for layer in model.attention_layers:
        shape = (num_slots, layer.num_kv_heads, layer.head_dim)
        layer.k_cache = torch.zeros(shape)
        layer.v_cache = torch.zeros(shape)


@torch.inference_mode()
def prefill_hidden(model, inputs: torch.Tensor) -> torch.Tensor:
    """One sequence, whole prompt, slots 0..T-1. inputs: ids [T] or hidden [T, H]."""
    num_tokens = inputs.shape[0]
    meta = AttentionMetadata(
        slot_mapping=torch.arange(num_tokens), prefills=[PrefillSpan(0, num_tokens, num_tokens, None)]
    )
    return model(inputs, torch.arange(num_tokens), meta)


def greedy_tokens(model, prompts: list[list[int]], max_tokens: int, **config) -> list[list[int]]:
    """Run prompts through an Engine (all at once) and collect greedy tokens, EOS ignored."""
    engine = Engine(model, EngineConfig(kv_memory_bytes=config.pop("kv", 8 * 2**20), **config))
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    for i, prompt in enumerate(prompts):
        engine.add_request(str(i), prompt, params)
    out: dict[str, list[int]] = {str(i): [] for i in range(len(prompts))}
    for _ in range(10_000):
        if not engine.has_work():
            break
        for o in engine.step():
            out[o.request_id].append(o.token_id)
    return [out[str(i)] for i in range(len(prompts))]


# ---------------------------------------------------------------- scripted "successor" models
#
# A random model's text is gibberish; end-to-end tests of text handling (reasoning split, stop
# tokens) need a model that writes an exact script. A *successor model* does: its residual stream
# is the current token's one-hot embedding (attention and MLP outputs are zero), so the LM head
# maps token i straight to the logits of its scripted successor and greedy decoding follows the
# chain `successors[i]` whatever came before. A token can have one successor only; `branches`
# lift that limit where a script must revisit a token (harmony headers): one attention head per
# flag word sets a residual flag once that word is anywhere in the context, and the flag moves
# the argmax from the token's successor to an alternative.

WORD_PIECES = r" ?[A-Za-z]+|\n+|[^A-Za-z\n]"  # words with their leading space, newline runs, chars


def save_word_tokenizer(path, words: list[str], special: list[str], added: list[str],
                        eos: str, chat_template: str):
    """A word-level fast tokenizer (decode concatenates pieces) saved into `path`.

    `words` are plain vocabulary pieces (see WORD_PIECES), `special` become special tokens (left
    out by `skip_special_tokens`), `added` are added tokens that stay in decoded text (`<think>`).
    Ids follow the order special, added, words. Returns the transformers tokenizer.
    """
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    pieces = ["<unk>", *special, *added, *words]
    assert len(set(pieces)) == len(pieces), "duplicate vocabulary entries"
    backend = Tokenizer(models.WordLevel({p: i for i, p in enumerate(pieces)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(WORD_PIECES), behavior="isolated")
    # concatenates pieces; ByteFallback (a no-op on these pieces) makes it a decoder llguidance
    # reads, so grammars can constrain these models too
    backend.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Fuse()])
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special])
    backend.add_tokens([AddedToken(t, special=False, normalized=False) for t in added])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token=eos)
    tokenizer.chat_template = chat_template
    tokenizer.save_pretrained(path)
    return tokenizer


def save_successor_model(path, model_type: str, tokenizer, script: list[str],
                         branches: list[tuple[str, str, str]] = (), **overrides) -> str:
    """Save a one-layer `model_type` model into `path` whose greedy output follows `script`.

    `script` is a chain of tokens: each one's successor is the next (a token may appear twice only
    if a branch tells its visits apart). A branch (token, flag, alternative) makes `token` continue
    with `alternative` once `flag` occurred anywhere before, itself included (tried on gpt_oss;
    it needs attention biases: the query is a constant bias). The vocabulary plus one dimension
    per flag must fit in hidden_size. The config's eos_token_id is the tokenizer's eos.
    Returns `path` as a string.
    """
    from transformers import AutoModelForCausalLM

    vocabulary = tokenizer.get_vocab()
    unknown = {t for t in [*script, *(t for branch in branches for t in branch)]
               if t not in vocabulary}
    assert not unknown, f"not in the tokenizer's vocabulary: {sorted(unknown)}"
    ids = vocabulary.__getitem__
    flags = list(dict.fromkeys(flag for _, flag, _ in branches))
    vocab = len(tokenizer)
    kwargs = dict(hidden_size=64, intermediate_size=16, num_hidden_layers=1,
                  num_attention_heads=2, num_key_value_heads=2, head_dim=16, vocab_size=vocab,
                  max_position_embeddings=512, rms_norm_eps=1e-6, tie_word_embeddings=False,
                  eos_token_id=tokenizer.eos_token_id, bos_token_id=None, pad_token_id=None)
    kwargs.update(overrides)
    config = tiny_config(model_type, **kwargs)
    hidden, head_dim = config.hidden_size, config.head_dim
    assert vocab + len(flags) <= hidden and len(flags) <= config.num_key_value_heads
    assert not flags or getattr(config, "attention_bias", False), "branches need q biases"
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    params = dict(model.named_parameters())
    weight = 4.0  # logits: weight x the normalised one-hot (sqrt(hidden) without flags)
    with torch.no_grad():
        for name, param in params.items():
            param.fill_(1.0 if name.endswith("norm.weight") else 0.0)
        params["model.embed_tokens.weight"][:, :vocab] = torch.eye(vocab)
        lm_head = params["lm_head.weight"]
        successors: dict[int, int] = {}
        branched = {(token, alternative) for token, _, alternative in branches}
        for current, following in zip(script[:-1], script[1:], strict=True):
            if (current, following) in branched:
                continue
            if successors.setdefault(ids(current), ids(following)) != ids(following):
                raise ValueError(f"{current!r} has two successors in the script; add a branch")
            lm_head[ids(following), ids(current)] = weight
        attn = "model.layers.0.self_attn."
        low_freq = head_dim // 2 - 1  # the slowest RoPE pair: q.k stays put across positions
        for h, flag in enumerate(flags):
            row = h * head_dim
            params[attn + "q_proj.bias"][row + low_freq] = 4.0
            params[attn + "k_proj.weight"][row + low_freq, ids(flag)] = 2.0  # score 4*16/4 = 16
            params[attn + "v_proj.weight"][row, ids(flag)] = hidden**-0.5  # v = 1 at the flag
            params[attn + "o_proj.weight"][hidden - 1 - h, row] = 1.0  # residual flag dimension
        for token, flag, alternative in branches:
            lm_head[ids(alternative), ids(token)] = weight / 2
            lm_head[ids(alternative), hidden - 1 - flags.index(flag)] = weight * 3 / 4
    model.save_pretrained(path, safe_serialization=True)
    return str(path)
