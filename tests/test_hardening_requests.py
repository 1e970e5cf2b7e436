"""Issue 11, requests: caller-supplied chat templates, slow renders, checkpoint file names,
the gateway's password backoff.

The node frontend runs against the scripted fake executor of `test_serve_frontend` (real ZMQ
protocol, real FastAPI app); checkpoints are real tiny safetensors models, tampered with.
The gateway's attack test (wrong passwords → 429) lives in `test_chat_gateway.py`, next to its
fixtures; `test_serve.py` sends the same template attack to a real `parallax serve`.
"""

from __future__ import annotations

import asyncio
import json
import os
import time

import pytest
from test_serve_frontend import CharTokenizer, Harness, run
from tiny_models import save_tiny_model

from parallax.gateway.backoff import AuthFailureLimiter, client_key, insecure_bind_warning
from parallax.models.loader import load_shard
from parallax.models.weights import INDEX_FILE, check_weight_map, weight_map
from parallax.serving.openai_schemas import ALLOWED_TEMPLATE_KWARGS

NESTED_LOOPS = "{% for a in range(10**6) %}{% for b in range(10**6) %}x{% endfor %}{% endfor %}"


# ---------------------------------------------------------------- chat templates (item 10)


class RecordingTokenizer(CharTokenizer):
    """Records what reaches the template; `SLOW` in a message makes the render take a while."""

    SLOW_S = 1.5

    def __init__(self) -> None:
        super().__init__()
        self.rendered: list[dict] = []

    def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=True, **kw):
        self.rendered.append(kw)
        if any("SLOW" in m["content"] for m in messages):
            time.sleep(self.SLOW_S)  # blocking, as Jinja and tokenizers are
        return super().apply_chat_template(messages, tokenize, add_generation_prompt, **kw)


def _harness() -> Harness:
    harness = Harness()
    harness.tokenizer = RecordingTokenizer()
    return harness


@pytest.mark.parametrize("kwargs, needle", [
    ({"chat_template": NESTED_LOOPS}, "chat_template_kwargs.chat_template"),
    ({"enable_thinking": False, "tokenize": True}, "chat_template_kwargs.tokenize"),
    ({"enable_thinking": ["a"]}, "string, number, boolean or null"),
])
def test_caller_template_kwargs_are_refused_before_any_render(kwargs, needle):
    async def scenario():
        async with _harness() as h:
            r = await h.chat("REPLY:hi", chat_template_kwargs=kwargs)
            assert r.status_code == 400, r.text
            body = r.json()
            assert body["object"] == "error" and body["code"] == 400
            assert needle in body["message"]
            assert all(key in body["message"] for key in ALLOWED_TEMPLATE_KWARGS) or \
                "must be" in body["message"]
            assert h.tokenizer.rendered == []  # nothing reached the template
            r = await h.chat("REPLY:ok", chat_template_kwargs={"enable_thinking": False})
            assert r.status_code == 200 and h.tokenizer.rendered == [{"enable_thinking": False}]

    run(scenario())


def test_a_slow_render_blocks_neither_health_nor_other_requests():
    """The render runs in a worker thread: while one prompt takes 1.5 s to render, /health and
    a second chat answer at once (the heartbeats share this event loop in a node)."""
    async def scenario():
        async with _harness() as h:
            slow = asyncio.create_task(h.chat("REPLY:SLOW"))
            await asyncio.sleep(0.2)  # the slow render is under way
            started = time.monotonic()
            health = await h.http.get("/health")
            fast = await h.chat("REPLY:fast")
            elapsed = time.monotonic() - started
            assert health.status_code == 200 and health.json()["status"] == "ready"
            assert fast.json()["choices"][0]["message"]["content"] == "fast"
            assert elapsed < 0.8, f"blocked for {elapsed:.2f} s behind the slow render"
            assert not slow.done()
            assert (await slow).json()["choices"][0]["message"]["content"] == "SLOW"
            assert h.frontend._num_rendering == 0

    run(scenario())


def test_renders_in_progress_count_toward_capacity():
    """A flood of slow renders gets 429 beyond max_in_flight instead of queueing unbounded."""
    async def scenario():
        harness = Harness(max_batch_size=1, max_waiting=1)
        harness.tokenizer = RecordingTokenizer()
        async with harness as h:
            tasks = [asyncio.create_task(h.chat("REPLY:SLOW")) for _ in range(2)]
            await asyncio.sleep(0.2)
            refused = await h.chat("REPLY:more")
            assert refused.status_code == 429, refused.text
            assert [r.status_code for r in await asyncio.gather(*tasks)] == [200, 200]

    run(scenario())


# ---------------------------------------------------------------- checkpoint files (item 13)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> str:
    path, _ = save_tiny_model(tmp_path_factory.mktemp("weights"), "llama")
    return path


def _indexed_copy(checkpoint: str, root, name: str, target: str | None = None) -> str:
    """A copy of the checkpoint with an index naming `target` (default: its real file)."""
    model_dir = root / name
    model_dir.mkdir()
    for file in os.listdir(checkpoint):
        os.link(os.path.join(checkpoint, file), model_dir / file)
    names = list(weight_map(checkpoint))
    entries = {n: "model.safetensors" for n in names}
    if target is not None:
        entries[names[0]] = target
    (model_dir / INDEX_FILE).write_text(json.dumps({"metadata": {}, "weight_map": entries}))
    return str(model_dir)


@pytest.mark.parametrize("target", [
    "/etc/passwd", "/tmp/model.safetensors", "../model.safetensors",
    "sub/../../model.safetensors", "./model.safetensors", "*.safetensors", "model.bin",
    "C:\\model.safetensors", "sub\\..\\x.safetensors",
])
def test_index_naming_files_outside_the_checkpoint_is_refused(checkpoint, tmp_path, target):
    model_dir = _indexed_copy(checkpoint, tmp_path, "evil", target)
    with pytest.raises(ValueError, match="inside its own directory"):
        load_shard(model_dir)
    with pytest.raises(ValueError, match="inside its own directory"):
        check_weight_map({"w": target})  # what the hub checks before it downloads


def test_index_entry_symlinked_out_of_the_checkpoint_is_refused(checkpoint, tmp_path):
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    os.link(os.path.join(checkpoint, "model.safetensors"), outside / "stolen.safetensors")
    model_dir = _indexed_copy(checkpoint, tmp_path, "linked", "sub/stolen.safetensors")
    os.symlink(outside, os.path.join(model_dir, "sub"))
    with pytest.raises(ValueError, match="outside the checkpoint directory"):
        load_shard(model_dir)
    single = tmp_path / "single"
    single.mkdir()
    os.link(os.path.join(checkpoint, "config.json"), single / "config.json")
    os.symlink(outside / "stolen.safetensors", single / "model.safetensors")
    with pytest.raises(ValueError, match="outside the checkpoint directory"):
        load_shard(str(single))


def test_honest_indexes_still_load(checkpoint, tmp_path):
    model_dir = _indexed_copy(checkpoint, tmp_path, "honest")
    assert load_shard(model_dir).read_log.num_bytes > 0
    # a Hugging Face cache snapshot: files are symlinks to ../../blobs of the same repo
    repo = tmp_path / "models--org--tiny"
    (repo / "blobs").mkdir(parents=True)
    snapshot = repo / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    for file in os.listdir(model_dir):
        os.link(os.path.join(model_dir, file), repo / "blobs" / file)
        os.symlink(os.path.join("..", "..", "blobs", file), snapshot / file)
    assert load_shard(str(snapshot)).read_log.num_bytes > 0


# ---------------------------------------------------------------- gateway backoff (item 6)


def test_backoff_blocks_for_the_window_then_forgives():
    now = [1000.0]
    limiter = AuthFailureLimiter(limit=3, window_s=60, clock=lambda: now[0])
    for _ in range(2):
        limiter.failed("a")
    assert limiter.retry_after("a") is None
    now[0] += 61  # old failures leave the window
    limiter.failed("a")
    limiter.failed("a")
    assert limiter.retry_after("a") is None
    limiter.failed("a")
    assert limiter.retry_after("a") == 60
    now[0] += 59.5
    assert limiter.retry_after("a") == 1
    now[0] += 1
    assert limiter.retry_after("a") is None
    limiter.succeeded("a")
    assert len(limiter) == 0


def test_backoff_table_is_bounded():
    limiter = AuthFailureLimiter(limit=2, window_s=60, max_clients=100)
    for i in range(5000):
        limiter.failed(f"10.0.{i // 256}.{i % 256}")
    assert len(limiter) == 100


def test_backoff_keys_and_plain_http_warning():
    assert client_key("203.0.113.7") == "203.0.113.7"
    assert client_key("2001:db8:1:2:3:4:5:6") == client_key("2001:db8:1:2:ffff::1") == \
        "2001:db8:1:2::/64"
    assert client_key("::ffff:203.0.113.7") == "203.0.113.7"
    assert client_key(None) == "unknown"
    for host in ("127.0.0.1", "localhost", "::1"):
        assert insecure_bind_warning(host, tls=False) is None
    assert insecure_bind_warning("0.0.0.0", tls=True) is None
    warning = insecure_bind_warning("0.0.0.0", tls=False)
    assert warning and "without TLS" in warning and "0.0.0.0" in warning


def test_gateway_prints_the_warning_when_bound_beyond_loopback(monkeypatch, capsys):
    from parallax.config import ConfigError, GatewayConfig
    from parallax.gateway import server

    for bad in ({"max_failed_auth": 0}, {"failed_auth_window_s": 0}):
        with pytest.raises(ConfigError, match=next(iter(bad))):
            GatewayConfig(password="pw", **bad)

    async def no_serve(app, host, port, banner, tls=None):
        return 0

    monkeypatch.setattr(server, "serve_app", no_serve)
    server.run_gateway(GatewayConfig(password="pw", host="0.0.0.0", port=0))
    assert "without TLS" in capsys.readouterr().err
    server.run_gateway(GatewayConfig(password="pw", host="127.0.0.1", port=0))
    assert "without TLS" not in capsys.readouterr().err
