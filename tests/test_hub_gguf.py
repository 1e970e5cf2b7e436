"""GGUF files from the hub (`-m OWNER/REPO:QUANT`, `OWNER/REPO/FILE.gguf`): tag resolution to
one commit, and nodes that fetch only their own tensors' bytes (tests/hub_server.py stands in
for the hub, HF_ENDPOINT points at it, each client gets its own cache directory)."""

from __future__ import annotations

import itertools
import json
import os
import shutil
import time

import pytest
import torch

from parallax.engine.engine import Engine, EngineConfig
from parallax.engine.sampling_params import SamplingParams
from parallax.models import hub_gguf, range_cache
from parallax.models.gguf import hf_name, open_reader
from parallax.models.hub import builtin_gguf_path, resolve
from parallax.models.loader import load_shard, load_tokenizer
from parallax.models.registry import family_for
from tests.hub_server import COMMIT, FakeHub, write_llama_gguf
from tests.test_gguf_packed import pipeline_greedy

pytestmark = pytest.mark.slow  # a local hub HTTP server and model downloads

LAYERS = 8
VOCAB = 512
CLIENTS = itertools.count()
PROMPT = [1, 17, 300, 42, 7, 99, 250, 3]
MODEL = "test/Model-GGUF:Q8_0"
SPLIT = "test/Split-GGUF:q8_0"


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A small-vocabulary model, the same split in 3 parts, one with SmolLM2's tokenizer."""
    root = tmp_path_factory.mktemp("gguf")
    single = write_llama_gguf(str(root / "Model-Q8_0.gguf"), LAYERS, vocab=VOCAB)[0]
    (root / "split").mkdir()
    parts = write_llama_gguf(str(root / "split" / "Model-Q8_0.gguf"), LAYERS, vocab=VOCAB,
                             hidden=512, ffn=1536, split_max_tensors=30, seed=1)
    assert len(parts) == 3
    (root / "tok").mkdir()
    with_tokenizer = write_llama_gguf(str(root / "tok" / "Tok-Q8_0.gguf"), 2, hidden=64, ffn=128,
                                      tokenizer_from=builtin_gguf_path())[0]
    return single, parts, with_tokenizer


@pytest.fixture(scope="module")
def hub(files):
    single, parts, with_tokenizer = files
    many = {name: single for name in ("Many-Q4_K_M.gguf", "Many-q8_0.gguf",
                                      "sub/Many-IQ4_XS.gguf", "mmproj-Many-F16.gguf")}
    with FakeHub({"test/Model-GGUF": {"Model-Q8_0.gguf": single},
                  "test/Split-GGUF": {os.path.basename(p): p for p in parts},
                  "test/Many-GGUF": many, "test/Tok-GGUF": {"Tok-Q8_0.gguf": with_tokenizer}}) \
            as server:
        yield server


@pytest.fixture
def node(hub, tmp_path, monkeypatch):
    """This test's client: its own endpoint prefix (bytes counted apart) and cache."""
    prefix = f"c{next(CLIENTS)}"
    monkeypatch.setenv("HF_ENDPOINT", hub.endpoint(prefix))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    return prefix


def owned_bytes(path: str, start: int, end: int) -> tuple[int, int]:
    """(bytes of the tensors a shard [start, end) loads from the file, header bytes)."""
    reader = open_reader(path)
    from parallax.models.gguf import gguf_config

    config = gguf_config(reader)
    family = family_for(config.model_type)
    size = sum(int(t.n_bytes) for t in reader.tensors
               if hf_name(t.name) and family.owns_tensor(hf_name(t.name), start, end, config))
    headers = sum(_header_end(part) for part in reader.parts)
    return size, headers


def _header_end(path: str) -> int:
    from parallax.models.gguf_table import parse_header

    with open(path, "rb") as f:
        return parse_header(f.read(64 * 2**20), path)[2]


def assert_same_weights(a, b) -> None:
    """Bitwise equal parameters and packed buffers."""
    state_a, state_b = a.model.state_dict(), b.model.state_dict()
    assert state_a.keys() == state_b.keys() and state_a
    for name, tensor in state_a.items():
        assert torch.equal(tensor, state_b[name]), name


def whole_greedy(model, prompt: list[int], eos_id: int) -> list[int]:
    engine = Engine(model, EngineConfig(kv_memory_bytes=32 * 2**20), eos_token_ids=[eos_id])
    engine.add_request("q", prompt, SamplingParams(temperature=0, max_tokens=32))
    tokens = []
    while engine.has_work():
        tokens += [o.token_id for o in engine.step()]
    return tokens


# ---- naming ---------------------------------------------------------------------------------


def test_quant_tags_resolve_case_insensitively_to_one_commit(node):
    by_tag = hub_gguf.resolve_pinned("test/Many-GGUF:q4_k_m")
    assert by_tag == hub_gguf.resolve_pinned("test/Many-GGUF:Q4_K_M")
    assert by_tag == hub_gguf.resolve_pinned("test/Many-GGUF/Many-Q4_K_M.gguf")
    assert by_tag.files == ("Many-Q4_K_M.gguf",) and by_tag.revision == COMMIT
    assert by_tag.model == f"test/Many-GGUF@{COMMIT}/Many-Q4_K_M.gguf"
    assert hub_gguf.resolve_pinned("test/Many-GGUF:Q8_0").files == ("Many-q8_0.gguf",)
    assert hub_gguf.resolve_pinned("test/Many-GGUF:iq4_xs").files == ("sub/Many-IQ4_XS.gguf",)
    split = hub_gguf.resolve_pinned(SPLIT)
    assert split.files == tuple(f"Model-Q8_0-{i:05d}-of-00003.gguf" for i in (1, 2, 3))
    assert hub_gguf.pinned(split.model) == split  # the string nodes get says it all


def test_unknown_or_ambiguous_tag_lists_the_tags(node):
    with pytest.raises(ValueError, match="available tags: IQ4_XS, Q4_K_M, q8_0"):
        hub_gguf.resolve_pinned("test/Many-GGUF:Q5_K_M")
    with pytest.raises(ValueError, match="no file Missing.gguf"):
        hub_gguf.resolve_pinned("test/Many-GGUF/Missing.gguf")
    with pytest.raises(ValueError, match="part 2 of a split GGUF"):
        hub_gguf.resolve_pinned("test/Split-GGUF/Model-Q8_0-00002-of-00003.gguf")
    with pytest.raises(ValueError, match="cannot list test/Nothing-GGUF"):
        hub_gguf.resolve_pinned("test/Nothing-GGUF:Q8_0")


def test_a_local_path_wins_over_a_repo(node, files, tmp_path, monkeypatch):
    (tmp_path / "test" / "Model-GGUF").mkdir(parents=True)
    os.symlink(files[0], tmp_path / "test" / "Model-GGUF" / "Model-Q8_0.gguf")
    assert resolve("test/Model-GGUF/Model-Q8_0.gguf").kind == "hubgguf"
    monkeypatch.chdir(tmp_path)
    assert resolve("test/Model-GGUF/Model-Q8_0.gguf").kind == "gguf"
    assert resolve(MODEL).kind == "hubgguf"


# ---- fetching only the shard's bytes ---------------------------------------------------------


def test_a_node_fetches_its_own_tensors_and_the_header_only(node, hub, files):
    own, header = owned_bytes(files[0], 0, LAYERS // 2)
    first = load_shard(MODEL, 0, LAYERS // 2)
    sent = hub.sent[node]
    assert own + header <= sent <= 1.05 * (own + header), (sent, own, header)
    assert sent < 0.6 * os.path.getsize(files[0])
    assert_same_weights(first, load_shard(files[0], 0, LAYERS // 2))

    # the same cache, the other half: only what it lacks (no header, no embedding again)
    own_last, _ = owned_bytes(files[0], LAYERS // 2, LAYERS)
    last = load_shard(MODEL, LAYERS // 2, LAYERS)
    assert own_last <= hub.sent[node] - sent <= 1.05 * own_last
    local_last = load_shard(files[0], LAYERS // 2, LAYERS)
    assert_same_weights(last, local_last)


@pytest.mark.slow
def test_shards_from_two_partial_caches_answer_like_the_whole_file(hub, files, tmp_path,
                                                                   monkeypatch):
    shards = []
    for i, (start, end) in enumerate([(0, LAYERS // 2), (LAYERS // 2, LAYERS)]):
        monkeypatch.setenv("HF_ENDPOINT", hub.endpoint(f"greedy{i}"))
        monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / f"cache{i}"))
        shards.append(load_shard(MODEL, start, end).model)
    first, last = shards
    want = whole_greedy(load_shard(files[0]).model, PROMPT, VOCAB)
    assert len(want) == 32
    assert pipeline_greedy(first, last, PROMPT, VOCAB) == want


@pytest.mark.slow
def test_tokenizer_and_chat_template_come_from_the_fetched_header(node, hub, files):
    path = hub_gguf.ensure_headers("test/Tok-GGUF:Q8_0")
    assert hub.sent[node] < 1.3 * owned_bytes(files[2], 0, 0)[1]
    fetched, whole = load_tokenizer(path), load_tokenizer(builtin_gguf_path())
    messages = [{"role": "user", "content": "What is 2 + 2?"}]
    assert fetched.apply_chat_template(messages, tokenize=False) == \
        whole.apply_chat_template(messages, tokenize=False)
    assert fetched.encode("hello world") == whole.encode("hello world")


def test_split_gguf_middle_layers(node, hub, files):
    parts = files[1]
    own, header = owned_bytes(parts[0], 3, 6)
    shard = load_shard(SPLIT, 3, 6)
    assert own + header <= hub.sent[node] <= 1.05 * (own + header), (hub.sent[node], own, header)
    assert_same_weights(shard, load_shard(parts[0], 3, 6))  # the local split file, all parts


def test_whole_file_is_checked_against_the_hubs_sha256(node, hub, files):
    load_shard(MODEL)
    path = hub_gguf.local_path(hub_gguf.resolve_pinned(MODEL), "Model-Q8_0.gguf")
    with open(path + range_cache.SIDECAR_SUFFIX) as f:
        assert json.load(f)["hash_verified"] is True
    part = range_cache.PartialFile(path, os.path.getsize(path), "0" * 64)  # a wrong hash
    part.ranges = [(0, part.size)]
    assert part.verify_hash() is False and part.ranges == []


def test_a_cut_download_resumes_without_refetching(node, hub, files, monkeypatch):
    own, header = owned_bytes(files[0], 0, LAYERS // 2)
    monkeypatch.setattr(range_cache, "NUM_ATTEMPTS", 1)  # the cut ends this load
    hub.cut_after = 3 * 2**20 + 123
    with pytest.raises(range_cache.RangeError):
        load_shard(MODEL, 0, LAYERS // 2)
    arrived = hub.sent[node]
    assert header + 3 * 2**20 <= arrived < own + header
    monkeypatch.setattr(range_cache, "NUM_ATTEMPTS", 5)
    load_shard(MODEL, 0, LAYERS // 2)  # a fresh load (another process would do the same)
    assert own + header <= hub.sent[node] <= 1.05 * (own + header)  # nothing twice


def test_a_wrong_length_answer_is_fetched_again(node, hub, files):
    own, header = owned_bytes(files[0], LAYERS // 2, LAYERS)
    hub.ensure = hub_gguf.ensure_headers(MODEL)
    before = len(hub.requests)
    hub.bad_length_once = True
    shard = load_shard(MODEL, LAYERS // 2, LAYERS)
    ranges = [r for _, path, r in hub.requests[before:] if "/storage/" in path and r]
    assert len(ranges) > len(set(ranges))  # one range asked twice
    assert_same_weights(shard, load_shard(files[0], LAYERS // 2, LAYERS))


def test_an_expired_storage_url_is_resolved_again_and_the_token_stays_on_the_hub(
        node, hub, files, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_secret")
    hub_gguf.ensure_headers(MODEL)
    heads = sum(1 for method, _, _ in hub.requests if method == "HEAD")
    hub.expire_once = True
    hub_gguf._HEADS.clear()  # as if the remembered storage URL were old
    shard = load_shard(MODEL, 0, 2)
    assert sum(1 for method, _, _ in hub.requests if method == "HEAD") >= heads + 2
    assert_same_weights(shard, load_shard(files[0], 0, 2))
    assert hub.authorized and not any("/storage/" in path for path in hub.authorized)


def test_offline_uses_the_cache_and_names_what_is_missing(node, hub, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ValueError, match="HF_HUB_OFFLINE is set and test/Model-GGUF at main"):
        load_shard(MODEL, 0, 2)
    monkeypatch.delenv("HF_HUB_OFFLINE")
    load_shard(MODEL, 0, 2)
    sent = hub.sent[node]
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    load_shard(MODEL, 0, 2)
    assert hub.sent[node] == sent
    with pytest.raises(ValueError, match=r"MB of this shard's tensors are not cached "
                                         r"\(Model-Q8_0.gguf of test/Model-GGUF@"):
        load_shard(MODEL, 2, 4)


def test_scheduler_sizes_a_hub_gguf_from_its_header(node, hub, files):
    from parallax.scheduler.catalog import ModelCatalog, display_name

    catalog = ModelCatalog("float32")
    spec = catalog.spec(MODEL)
    local = ModelCatalog("float32").spec(files[0])
    assert spec.name == f"test/Model-GGUF@{COMMIT}/Model-Q8_0.gguf"
    assert catalog.known_as(MODEL) == spec.name  # requests may name the model by its tag
    assert catalog.spec(spec.name) is spec
    assert (spec.layer_bytes, spec.embedding_bytes, spec.lm_head_bytes, spec.num_layers) == \
        (local.layer_bytes, local.embedding_bytes, local.lm_head_bytes, LAYERS)
    header = owned_bytes(files[0], 0, 0)[1]  # the header alone (in at least one request)
    assert hub.sent[node] <= max(hub_gguf.HEADER_FIRST_BYTES, 1.3 * header)
    assert display_name(spec.name) == "test/Model-GGUF/Model-Q8_0"

    from parallax.config import SchedulerConfig
    from parallax.scheduler.app import SchedulerState
    from parallax.serving.errors import APIError

    state = SchedulerState(SchedulerConfig(mdns=False), catalog=catalog)
    state.set_model(MODEL)
    assert state.model_name == spec.name  # what every node is handed
    for name in (MODEL, spec.name, "test/Model-GGUF/Model-Q8_0", "default"):
        state.check_model(name)  # requests may name it each way
    with pytest.raises(APIError):
        state.check_model("test/Other-GGUF:Q8_0")


# ---- the proof: a cluster started with -m REPO:TAG ---------------------------------------------


@pytest.mark.slow
def test_two_nodes_fetch_their_own_halves_and_answer_like_the_whole_file(tmp_path):
    """`parallax run -m test/Big-GGUF:Q8_0` + two `parallax join`, each with its own cache and
    hub prefix: each node's bytes are its own tensors plus the header (within 5 %), and
    greedy answers equal the whole local file's."""
    import subprocess
    import sys

    import httpx
    import openai

    from parallax.scheduler.catalog import ModelCatalog, solo_memory_bytes
    from tests.processes import die_with_pytest, free_port
    from tests.test_cluster import running

    path = write_llama_gguf(str(tmp_path / "Big-Q8_0.gguf"), LAYERS,
                            tokenizer_from=builtin_gguf_path())[0]
    memory = int(0.6 * solo_memory_bytes(ModelCatalog("float32").spec(path)) / 2**20)
    procs = []

    def spawn(name: str, args: list[str]) -> None:
        env = {**os.environ, "TMPDIR": str(tmp_path), "HF_ENDPOINT": hub.endpoint(name),
               "HF_HUB_CACHE": str(tmp_path / f"cache-{name}")}
        env.pop("HF_HUB_OFFLINE", None)
        log = open(tmp_path / f"{name}.log", "ab")
        procs.append(subprocess.Popen([sys.executable, "-m", "parallax.cli", *args], stdout=log,
                                      stderr=subprocess.STDOUT, env=env,
                                      preexec_fn=die_with_pytest))

    class Cluster:
        url = ""

        def wait_status(self, wanted, timeout):
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                try:
                    status = httpx.get(f"{self.url}/cluster/status_json", timeout=5).json()
                    if status["data"]["status"] in wanted:
                        return status["data"]
                except httpx.HTTPError:
                    pass
                time.sleep(0.5)
            logs = {p.name: p.read_text()[-2000:] for p in tmp_path.glob("*.log")}
            raise TimeoutError(f"cluster not {wanted}: {logs}")

        def close(self):
            for proc in procs:
                proc.terminate()
            for proc in procs:
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()

    with FakeHub({"test/Big-GGUF": {"Big-Q8_0.gguf": path}}) as hub:
        port, cluster = free_port(), Cluster()
        cluster.url = f"http://127.0.0.1:{port}"
        spawn("scheduler", ["run", "-m", "test/Big-GGUF:Q8_0", "-n", "2", "--port", str(port),
                            "--no-mdns"])
        node_ports = [free_port(), free_port()]
        for node_port in node_ports:
            spawn(f"node{node_port}", ["join", "-s", f"127.0.0.1:{port}", "--port",
                                       str(node_port), "--activation-port", str(free_port()),
                                       "--memory", f"{memory}MB", "--no-warmup"])
        with running(cluster, timeout=300):
            status = cluster.wait_status({"available"}, 5)
            assert len(status["pipelines"]) == 1 and len(status["pipelines"][0]) == 2
            assert status["model_name"] == f"test/Big-GGUF@{COMMIT}/Big-Q8_0.gguf"
            for node in status["node_list"]:
                node_port = int(node["node_id"].rsplit("-", 1)[1])
                own, header = owned_bytes(path, node["start_layer"], node["end_layer"])
                sent = hub.sent[f"node{node_port}"]
                assert own + header <= sent <= 1.05 * (own + header), (node, sent, own, header)
            assert hub.sent["scheduler"] < 1.3 * header + hub_gguf.HEADER_FIRST_BYTES
            tokenizer = load_tokenizer(path)
            client = openai.OpenAI(base_url=f"{cluster.url}/v1", api_key="none", timeout=120)
            for prompt in ("What is the capital of France?", "Count to five."):
                ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                                    add_generation_prompt=True, tokenize=True,
                                                    return_dict=True)["input_ids"]
                want = whole_greedy(load_shard(path).model, list(ids), tokenizer.eos_token_id)
                answer = client.chat.completions.create(
                    model="default", messages=[{"role": "user", "content": prompt}],
                    temperature=0, max_tokens=32)
                assert answer.choices[0].message.content == \
                    tokenizer.decode(want, skip_special_tokens=True)


def test_download_progress_travels_from_the_executor_to_the_heartbeat():
    import asyncio

    from parallax.node.executor import _download_reporter
    from parallax.node.executor_client import ExecutorClient
    from parallax.protocol.common import DownloadProgress
    from parallax.protocol.ipc import decode_from_executor

    class Push:
        sent: list[bytes] = []

        def send(self, data: bytes) -> None:
            self.sent.append(data)

    progress = range_cache.Progress("test/Model", 4_000_000, _download_reporter(Push()))
    progress.add(1_000_000)
    message = decode_from_executor(Push.sent[-1])
    assert message.download.done_bytes == 1_000_000 and message.download.total_bytes == 4_000_000
    assert "downloading test/Model: 1.0 / 4.0 MB" in message.message

    async def relay() -> DownloadProgress | None:
        lines: list[str] = []
        client = ExecutorClient(None, on_progress=lines.append)
        client._dispatch(message)
        assert lines == [message.message]
        try:
            return client.download
        finally:
            client._context.destroy(0)
            shutil.rmtree(client._dir, ignore_errors=True)

    assert asyncio.run(relay()) == message.download


def test_quantize_is_refused_for_a_hub_gguf():
    from parallax.models.hub import check_quantize_source

    with pytest.raises(ValueError, match="already quantized"):
        check_quantize_source(resolve(MODEL), "q8_0")
