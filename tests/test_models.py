"""Dense families against transformers on tiny random weights; sharding; selective loading."""

from __future__ import annotations

import os

import pytest
import torch
from tiny_models import attach_cache, greedy_tokens, prefill_hidden, save_tiny_model

from parallax.models import hub
from parallax.models.loader import load_shard
from parallax.models.weights import files_for_shard, weight_map

FAMILIES = ["llama", "qwen2", "qwen3", "mistral"]
# fp32 on both sides; differences come only from summation order.
LOGITS_ATOL = 1e-4


@pytest.fixture(scope="module", params=FAMILIES)
def tiny(request, tmp_path_factory):
    path, hf_model = save_tiny_model(tmp_path_factory.mktemp("m"), request.param)
    return request.param, path, hf_model


def test_prefill_logits_match_transformers(tiny):
    _, path, hf_model = tiny
    shard = load_shard(path).model
    attach_cache(shard)
    ids = torch.tensor([5, 17, 99, 3, 250, 42, 7, 7, 120])
    ours = shard.compute_logits(prefill_hidden(shard, ids))
    with torch.no_grad():
        ref = hf_model(ids[None]).logits[0]
    assert ours.shape == ref.shape
    torch.testing.assert_close(ours, ref, atol=LOGITS_ATOL, rtol=0)


@pytest.mark.slow
def test_decode_with_kv_cache_matches_transformers_generate(tiny):
    _, path, hf_model = tiny
    shard = load_shard(path).model
    prompts = [[5, 17, 99, 3], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18]]
    ours = greedy_tokens(shard, prompts, max_tokens=16)
    for prompt, tokens in zip(prompts, ours, strict=True):
        ref = hf_model.generate(torch.tensor([prompt]), max_new_tokens=16, min_new_tokens=16,
                                do_sample=False, pad_token_id=0)
        assert tokens == ref[0, len(prompt):].tolist()


@pytest.mark.slow
def test_shards_chained_equal_full_model(tiny):
    _, path, _ = tiny
    full = load_shard(path).model
    parts = [load_shard(path, a, b).model for a, b in [(0, 1), (1, 3), (3, 4)]]
    for model in [full, *parts]:
        attach_cache(model)
    ids = torch.tensor([9, 8, 7, 6, 5, 4, 3, 2, 1])
    expected = full.compute_logits(prefill_hidden(full, ids))
    hidden = ids
    for part in parts:
        hidden = prefill_hidden(part, hidden)
    torch.testing.assert_close(parts[-1].compute_logits(hidden), expected, atol=1e-5, rtol=0)
    assert not hasattr(parts[1], "embed_tokens") and not hasattr(parts[1], "lm_head")
    assert not hasattr(parts[0], "lm_head") and not hasattr(parts[2], "embed_tokens")


def test_shard_reads_only_its_tensors(tmp_path):
    path, _ = save_tiny_model(tmp_path, "llama", tie_word_embeddings=False)
    log = load_shard(path, 1, 3).read_log
    layers = {int(n.split(".")[2]) for n in log.tensor_names if n.startswith("model.layers.")}
    assert layers == {1, 2}
    assert all(n.startswith("model.layers.") for n in log.tensor_names)
    full_bytes = load_shard(path).read_log.num_bytes
    assert 0 < log.num_bytes < full_bytes / 2


def test_last_shard_with_tied_embeddings_reads_embedding_as_lm_head(tmp_path):
    path, hf_model = save_tiny_model(tmp_path, "llama", tie_word_embeddings=True)
    shard = load_shard(path, 2, 4)
    assert "model.embed_tokens.weight" in shard.read_log.tensor_names
    assert not hasattr(shard.model, "embed_tokens")
    torch.testing.assert_close(shard.model.lm_head.weight, hf_model.lm_head.weight)


def test_sharded_checkpoint_files_selected_per_layer_range(tmp_path):
    from tiny_models import tiny_config
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(tiny_config("llama", num_hidden_layers=8))
    model.save_pretrained(tmp_path, safe_serialization=True, max_shard_size="40KB")
    mapping = weight_map(str(tmp_path))
    assert len(set(mapping.values())) > 3  # really sharded
    owns_tail = lambda name: name.startswith("model.layers.7.")  # noqa: E731
    tail_files = files_for_shard(mapping, owns_tail)
    assert 0 < len(tail_files) < len(set(mapping.values()))
    log = load_shard(str(tmp_path), 6, 8).read_log
    assert {n.split(".")[2] for n in log.tensor_names if "layers" in n} == {"6", "7"}


def make_offline_cache(cache_dir, repo_id: str, model_dir: str) -> None:
    """Lay out a Hugging Face cache entry for repo_id holding model_dir's files."""
    commit = "0" * 40
    root = cache_dir / ("models--" + repo_id.replace("/", "--"))
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text(commit)
    snapshot = root / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for name in os.listdir(model_dir):
        (snapshot / name).write_bytes(open(os.path.join(model_dir, name), "rb").read())


def test_repo_id_downloads_only_files_of_owned_layers(tmp_path, monkeypatch):
    from tiny_models import tiny_config
    from transformers import AutoModelForCausalLM

    model_dir = tmp_path / "src"
    model = AutoModelForCausalLM.from_config(tiny_config("llama", num_hidden_layers=8))
    model.save_pretrained(model_dir, safe_serialization=True, max_shard_size="40KB")
    cache = tmp_path / "cache"
    make_offline_cache(cache, "tiny/llama", str(model_dir))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(cache))
    requested: list[list[str]] = []
    import huggingface_hub

    real_snapshot = huggingface_hub.snapshot_download

    def spy(repo_id, allow_patterns=None, **kwargs):
        requested.append(list(allow_patterns))
        return real_snapshot(repo_id, allow_patterns=allow_patterns, **kwargs)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", spy)
    shard = load_shard("tiny/llama", 6, 8)
    weight_files = [p for p in requested[0] if p.endswith(".safetensors")]
    all_files = {f for f in os.listdir(model_dir) if f.endswith(".safetensors")}
    assert 0 < len(weight_files) < len(all_files)
    assert {n.split(".")[2] for n in shard.read_log.tensor_names if "layers" in n} == {"6", "7"}


@pytest.mark.parametrize(
    "model, message",
    [
        ("no-such-model", "unknown model"),
        ("/nonexistent/file.gguf", "does not exist"),
    ],
)
def test_bad_model_names_raise_value_error(model, message):
    with pytest.raises(ValueError, match=message):
        load_shard(model)


def test_layer_range_outside_model(tmp_path):
    path, _ = save_tiny_model(tmp_path, "llama")
    with pytest.raises(ValueError, match=r"outside the model's 4 layers"):
        load_shard(path, 2, 9)


def test_corrupt_gguf_and_unsupported_architecture(tmp_path):
    corrupt = tmp_path / "broken.gguf"
    corrupt.write_bytes(b"GGUF" + os.urandom(64))
    with pytest.raises(ValueError, match="not a readable GGUF"):
        load_shard(str(corrupt))
    import gguf

    writer = gguf.GGUFWriter(str(tmp_path / "bert.gguf"), "bert")
    writer.add_block_count(2)
    writer.add_tensor("token_embd.weight", torch.zeros(4, 4).numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ValueError, match="architecture 'bert' is not supported"):
        load_shard(str(tmp_path / "bert.gguf"))


def test_unsupported_model_type(tmp_path):
    path, _ = save_tiny_model(tmp_path, "llama")
    config_path = os.path.join(path, "config.json")
    text = open(config_path).read().replace('"model_type": "llama"', '"model_type": "gpt2"')
    open(config_path, "w").write(text)
    with pytest.raises(ValueError, match="not supported; supported: "):
        load_shard(path)


def test_builtin_model_resolves_to_wheel_gguf():
    source = hub.resolve(None)
    assert source.kind == "gguf" and source.path.endswith("SmolLM2-135M-Instruct.Q4_1.gguf")
    assert hub.resolve("default") == source
