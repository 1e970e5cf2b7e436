"""Issue 11, items 7-9: the activation port takes garbage, forgeries and replays without harm.

(a) Real ZeroMQ sockets on 127.0.0.1: every malformed, unsigned, wrongly keyed, replayed or
    misaddressed message is dropped with a log line and nothing escapes; sends never block and
    never dial an endpoint the scheduler did not list; a tiny two-stage pipeline finishes an
    in-flight request unchanged while an attacker pushes to both stages.
(b) The scheduler hands each pipeline a key and routes to a node only once its executor holds it.
(c) One real cluster (scheduler + two `parallax join` nodes on the built-in model): a streaming
    greedy request in flight while garbage reaches both activation ports ends with the same text
    as without the attack, the executors keep their pids and the nodes stay listed.
"""

from __future__ import annotations

import logging
import os
import time

import httpx
import pytest
import torch
import zmq
from processes import free_port
from test_cluster import START_TIMEOUT_S, LocalCluster, split_memory
from test_pipeline_links import KEY, Cluster
from tiny_models import greedy_tokens, save_tiny_model

from parallax.config import SchedulerConfig
from parallax.engine.sampling_params import SamplingParams
from parallax.models.loader import load_shard
from parallax.node import links as links_module
from parallax.node.executor import ExecutorLoop
from parallax.node.link_auth import PREVIOUS_KEY_GRACE_S, LinkSecurity, key_id
from parallax.node.links import LinkLimits, PeerUnreachable, PipelineLinks
from parallax.protocol.common import TokenOutput, encode
from parallax.protocol.control import Heartbeat, HeartbeatResponse, NodeJoin
from parallax.protocol.ipc import AddRequest, SetLinkSecurity, decode_to_executor
from parallax.protocol.links import (
    ActivationEntry,
    LinkActivations,
    LinkRelease,
    LinkSeal,
    LinkTokens,
)
from parallax.scheduler.allocation import ModelSpec
from parallax.scheduler.app import SchedulerState
from parallax.scheduler.catalog import ModelCatalog
from parallax.scheduler.link_keys import relay_keys
from parallax.serving.sse import parse_sse_lines

LIMITS = LinkLimits(8, 64, 256, 1000)
OTHER_KEY = bytes(32)
FOREIGN = "tcp://10.9.9.9:5555"
PARAMS = SamplingParams(temperature=0, max_tokens=4)


# ---- helpers --------------------------------------------------------------------------------


@pytest.fixture
def port():
    """A stage's links (keyed, its pipeline = itself + a head) and an attacker PUSH socket."""
    context = zmq.Context()
    own, head = (f"tcp://127.0.0.1:{free_port()}" for _ in range(2))
    links = PipelineLinks(context, own, own, LIMITS, LinkSecurity(KEY, [own, head]))
    attacker = context.socket(zmq.PUSH)
    attacker.setsockopt(zmq.LINGER, 0)
    attacker.connect(own)
    yield links, attacker, head
    attacker.close()
    links.close()
    context.term()


def sealed(frames: list, key: bytes = KEY, security: LinkSecurity | None = None) -> list:
    """`frames` with the seal a pipeline member holding `key` would put in front."""
    security = security or LinkSecurity(key, ())
    return [security.seal(frames), *frames]


def activations(head: str, *, dtype: str = "float32", hidden: int = 8, tokens: int = 2,
                start: int = 0, downstream: tuple[str, ...] = (), nbytes: int | None = None,
                token_ids: list[int] | None = None, rid: str = "r1") -> list[bytes]:
    """Header + tensor frames of a LinkActivations with one entry."""
    ids = token_ids or list(range(1, tokens + 1))
    entry = ActivationEntry(rid, ids, start, PARAMS, len(ids), list(downstream), head, True)
    payload = bytes(len(ids) * hidden * 4 if nbytes is None else nbytes)
    return [encode(LinkActivations([entry], dtype, hidden)), payload]


def push(links: PipelineLinks, attacker: zmq.Socket, frames: list):
    """Send `frames` to the port and take what `receive` makes of them."""
    attacker.send_multipart(frames)
    assert links.pull.poll(5000), "the message never arrived"
    return links.receive()


def assert_dropped(links, attacker, frames, caplog, reason: str) -> None:
    with caplog.at_level(logging.WARNING, logger="parallax.links"):
        assert push(links, attacker, frames) is None
    assert any(reason in r.getMessage() for r in caplog.records), caplog.text
    caplog.clear()


# ---- (a) one port, every kind of garbage ---------------------------------------------------


def test_a_valid_sealed_message_is_taken(port):
    links, attacker, head = port
    message, hidden = push(links, attacker, sealed(activations(head)))
    assert isinstance(message, LinkActivations) and hidden.shape == (2, 8)
    assert push(links, attacker, sealed([encode(LinkRelease(["r1"]))])) == (
        LinkRelease(["r1"]), None)


def test_another_float_dtype_is_taken_for_a_mixed_pipeline(port):
    links, attacker, head = port
    frames = activations(head, dtype="bfloat16", nbytes=2 * 8 * 2)  # e.g. from a GPU stage
    message, hidden = push(links, attacker, sealed(frames))
    assert hidden.dtype == torch.bfloat16 and hidden.shape == (2, 8)  # the runner casts it


def _signed_garbage(head: str) -> dict[str, tuple[list, str]]:
    """Sealed with the right key (a buggy or compromised member): caught by validation."""
    tokens = LinkTokens([TokenOutput("r1", 5, True, "pwned")])
    return {
        "unknown dtype": (activations(head, dtype="nope"), "dtype 'nope'"),
        "float64": (activations(head, dtype="float64"), "dtype 'float64'"),
        "no tensor frame": (activations(head)[:1], "2 frames for a LinkActivations"),
        "hidden size 0": (activations(head, hidden=0), "hidden size 0"),
        "wrong byte length": (activations(head, nbytes=5), "5 tensor bytes"),
        "forged head": (activations(FOREIGN), "is not in this pipeline"),
        "non-tcp head": (activations("ipc:///tmp/evil"), "is not in this pipeline"),
        "forged downstream": (activations(head, downstream=(FOREIGN,)), "not in this pipeline"),
        "too many tokens": (activations(head, tokens=65), "65 tokens"),
        "negative position": (activations(head, start=-1), "outside the model"),
        "past the model": (activations(head, start=255), "outside the model"),
        "token outside vocab": (activations(head, token_ids=[5000]), "outside the vocabulary"),
        "undecodable header": ([b"\xc1\x00garbage"], "undecodable header"),
        "bad finish reason": ([encode(tokens)], "finish reason 'pwned'"),
        "empty release": ([encode(LinkRelease([]))], "release of 0 requests"),
    }


@pytest.mark.parametrize("case", list(_signed_garbage("tcp://h:1")))
def test_signed_garbage_is_dropped_and_the_port_keeps_working(port, caplog, case):
    links, attacker, head = port
    frames, reason = _signed_garbage(head)[case]
    assert_dropped(links, attacker, sealed(frames), caplog, reason)
    assert push(links, attacker, sealed(activations(head))) is not None  # still serving


def test_unsigned_forged_and_replayed_messages_are_dropped(port, caplog):
    links, attacker, head = port
    release = [encode(LinkRelease(["r1"]))]
    tokens = [encode(LinkTokens([TokenOutput("r1", 7, True, "stop")]))]
    fake_seal = encode(LinkSeal(os.urandom(16), 1, os.urandom(32)))
    # the pre-issue-11 wire format, as an outsider sends it: no seal at all
    assert_dropped(links, attacker, activations(head, dtype="nope"), caplog, "no valid seal")
    assert_dropped(links, attacker, release, caplog, "1 frames")
    assert_dropped(links, attacker, [*tokens, b"x"], caplog, "no valid seal")
    assert_dropped(links, attacker, [fake_seal, *tokens], caplog, "bad MAC")
    assert_dropped(links, attacker, sealed(release, OTHER_KEY), caplog, "bad MAC")
    assert_dropped(links, attacker, [b"x"] * 5, caplog, "5 frames")
    assert_dropped(links, attacker, [b"", b""], caplog, "no valid seal")
    # a tampered frame under a valid seal
    good = sealed(activations(head))
    assert_dropped(links, attacker, [good[0], good[1], bytes(len(good[2]) - 1) + b"\x01"],
                   caplog, "bad MAC")
    # a captured valid message, replayed: taken once only (also after newer ones)
    sender = LinkSecurity(KEY, ())
    first, second = sealed(release, security=sender), sealed(tokens, security=sender)
    assert push(links, attacker, first) is not None
    assert_dropped(links, attacker, first, caplog, "replayed")
    assert push(links, attacker, second) is not None
    assert_dropped(links, attacker, first, caplog, "replayed")
    assert_dropped(links, attacker, second, caplog, "replayed")


def test_a_stage_without_a_key_drops_everything_and_sends_nothing(caplog):
    context = zmq.Context()
    own = f"tcp://127.0.0.1:{free_port()}"
    links = PipelineLinks(context, own, own, LIMITS)  # no key from the scheduler yet
    attacker = context.socket(zmq.PUSH)
    attacker.connect(own)
    try:
        assert_dropped(links, attacker, sealed([encode(LinkRelease(["r"]))]), caplog,
                       "no link key")
        with pytest.raises(PeerUnreachable, match="not an endpoint of this node's pipeline"):
            links.send_message(own, LinkRelease(["r"]))
        links.set_security(None, [own])
        with pytest.raises(PeerUnreachable, match="no link key"):
            links.send_message(own, LinkRelease(["r"]))
        links.set_security(KEY, [own])
        with pytest.raises(PeerUnreachable, match="not an endpoint"):
            links.send_message(FOREIGN, LinkRelease(["r"]))
    finally:
        attacker.close(linger=0)
        links.close()
        context.term()


def test_an_oversized_message_never_reaches_the_stage(port):
    links, attacker, head = port
    attacker.send_multipart([b"s", b"h", bytes(LIMITS.max_message_bytes + 1)])
    assert not links.pull.poll(500)  # ZMQ_MAXMSGSIZE: the connection is dropped instead
    fresh = links.context.socket(zmq.PUSH)
    fresh.connect(links.own_endpoint)
    try:
        assert push(links, fresh, sealed(activations(head))) is not None
    finally:
        fresh.close(linger=0)


def test_sends_never_block_and_never_dial_unlisted_endpoints(port, monkeypatch):
    links, _, head = port
    monkeypatch.setattr(links_module, "CONNECT_WAIT_S", 0.3)
    for endpoint in ("ipc:///tmp/parallax-evil", "inproc://x", "tcp://*:1", FOREIGN, "garbage"):
        with pytest.raises(PeerUnreachable):
            links.send_message(endpoint, LinkRelease(["r"]))
        assert endpoint not in links.pushes
    started = time.monotonic()
    links.send_message(head, LinkRelease(["r"]))  # listed, but nobody listens there
    links.send_message(head, LinkRelease(["r"]))
    assert time.monotonic() - started < 0.1 and links.has_pending
    deadline = time.monotonic() + 3
    gone: list[str] = []
    while not gone and time.monotonic() < deadline:
        links.flush()
        gone = links.disconnected_peers()
        time.sleep(0.02)
    assert gone == [head] and not links.has_pending


def test_the_previous_key_is_accepted_for_a_grace_period_only():
    now = [0.0]
    receiver = LinkSecurity(KEY, (), clock=lambda: now[0])
    old_sender = LinkSecurity(KEY, ())
    receiver.update(OTHER_KEY, ())
    assert receiver.check(sealed([b"h"], security=old_sender)) is None
    assert receiver.check(sealed([b"h"], OTHER_KEY)) is None
    now[0] = PREVIOUS_KEY_GRACE_S + 1
    assert "bad MAC" in receiver.check(sealed([b"h"], security=old_sender))
    assert receiver.key_id == key_id(OTHER_KEY) != key_id(KEY)


# ---- (a) a tiny two-stage pipeline under attack ---------------------------------------------


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("hardening"), "llama")[0]


@pytest.mark.slow
def test_in_flight_request_survives_forgeries_on_both_stages(model_path, caplog):
    prompt = list(range(1, 12))
    # long enough that it is still running after the first short drive on a fast idle CPU
    params = SamplingParams(temperature=0, max_tokens=400, ignore_eos=True)
    expected = greedy_tokens(load_shard(model_path).model, [prompt], max_tokens=400)[0]
    cluster = Cluster(model_path, [(0, 2), (2, 4)])
    attackers = [cluster.context.socket(zmq.PUSH) for _ in cluster.endpoints]
    head = cluster.endpoints[0]
    hidden = cluster.links[1].limits.hidden_size
    try:
        cluster.add("victim", prompt, params)
        before = cluster.run(until_s=0.02).get("victim", [])
        assert "victim" in cluster.engines[0].sequences  # in flight
        forged = [
            [encode(LinkTokens([TokenOutput("victim", 3, True, "stop")]))],
            [encode(LinkRelease(["victim"]))],
            activations(head, dtype="nope", hidden=hidden, rid="victim"),
            sealed([encode(LinkRelease(["victim"]))], OTHER_KEY),
            # a member's key but a stranger's endpoint: would restart and redirect the victim
            sealed(activations(FOREIGN, hidden=hidden, rid="victim")),
        ]
        with caplog.at_level(logging.WARNING, logger="parallax.links"):
            for attacker, endpoint in zip(attackers, cluster.endpoints, strict=True):
                attacker.connect(endpoint)
                for frames in forged:
                    attacker.send_multipart(frames)
            out = cluster.run(until_s=120)  # 400 tokens: more than 20 s on a loaded CI machine
        assert [o.token_id for o in before + out["victim"]] == expected
        assert out["victim"][-1].finish_reason == "length"
        assert caplog.text.count("dropped a stage message") == 2 * len(forged)
        assert "not in this pipeline" in caplog.text
        # a routing table naming a stranger is refused before anything is dialled
        with pytest.raises(ValueError, match="not in this node's pipeline"):
            cluster.routers[0].add_request(AddRequest("x", prompt, params, [FOREIGN]))
        assert FOREIGN not in cluster.links[0].pushes and "x" not in cluster.routers[0].routes
    finally:
        for attacker in attackers:
            attacker.close(linger=0)
        cluster.close()


def test_one_failing_message_does_not_stop_the_drain(model_path, caplog, monkeypatch):
    cluster = Cluster(model_path, [(0, 2), (2, 4)])
    context = cluster.context
    pull, push_ = context.socket(zmq.PULL), context.socket(zmq.PUSH)
    attacker = context.socket(zmq.PUSH)
    try:
        loop = ExecutorLoop(cluster.engines[1], pull, push_, links=cluster.links[1])
        applied = []

        def on_message(message, hidden):
            applied.append(message)
            if len(applied) == 1:
                raise IndexError("boom")
            return []

        monkeypatch.setattr(loop.stage, "on_message", on_message)
        attacker.connect(cluster.endpoints[1])
        sender = LinkSecurity(KEY, ())
        for rid in ("a", "b"):
            attacker.send_multipart(sealed([encode(LinkRelease([rid]))], security=sender))
        deadline = time.monotonic() + 5
        with caplog.at_level(logging.ERROR, logger="parallax.executor"):
            while len(applied) < 2 and time.monotonic() < deadline:
                loop._drain_links()
                time.sleep(0.01)
        assert [m.rids for m in applied] == [["a"], ["b"]]
        assert "could not be applied" in caplog.text
        # the frontend hands a new key over ipc; a malformed one means no key (fail closed)
        for key, expected in ((OTHER_KEY.hex(), OTHER_KEY), ("zz", None)):
            message = SetLinkSecurity(key, cluster.endpoints)
            loop.handle(decode_to_executor(encode(message)))
            assert cluster.links[1].security.key == expected
    finally:
        for socket in (pull, push_, attacker):
            socket.close(linger=0)
        cluster.close()


# ---- (b) the scheduler's keys ---------------------------------------------------------------


MB = 2**20
SPEC = ModelSpec("test-model", num_layers=8, layer_bytes=10 * MB, embedding_bytes=10 * MB,
                 lm_head_bytes=10 * MB, kv_bytes_per_token_per_layer=0)


def _state() -> SchedulerState:
    state = SchedulerState(SchedulerConfig(mdns=False, init_nodes_num=2),
                           catalog=ModelCatalog(known={"test-model": SPEC}, curated={},
                                                include_builtin=False))
    state.set_model("test-model", 2)
    return state


def _join(state: SchedulerState, node_id: str, memory_mb: int, peer_id: str | None = None):
    state.join(NodeJoin(node_id, "cpu", "cpu", memory_mb * MB, 100.0, 10.0,
                        f"http://{node_id}:3000", f"tcp://{node_id}:3100", peer_id=peer_id))


def _beat(state: SchedulerState, node_id: str, key: str = "") -> HeartbeatResponse:
    assignment = state.assignment_of(node_id)
    return state.heartbeat(Heartbeat(
        node_id, "ready", loaded_model=assignment.model, loaded_start_layer=assignment.start_layer,
        loaded_end_layer=assignment.end_layer, link_key_id=key_id(bytes.fromhex(key))))


def test_pipeline_nodes_share_a_key_and_count_only_once_they_hold_it():
    state = _state()
    _join(state, "a", 70, peer_id="peer-a")
    _join(state, "b", 70)
    first_a, first_b = _beat(state, "a"), _beat(state, "b")
    assert first_a.link_key and first_a.link_key == first_b.link_key
    assert sorted(first_a.link_peers) == ["tcp://a:3100", "tcp://b:3100"]
    assert state.registry.ready_pipelines() == []  # loaded, but without the key yet
    _beat(state, "a", first_a.link_key)
    _beat(state, "b", first_b.link_key)
    assert state.registry.ready_pipelines() == [0]
    assert relay_keys(state.link_keys, state.registry, "peer-a") == [
        bytes.fromhex(first_a.link_key)]
    assert relay_keys(state.link_keys, state.registry, "stranger") is None
    # a changed pipeline gets a fresh key; its nodes are not routed to until they hold it
    state.leave("b")
    _join(state, "c", 70)
    again = _beat(state, "a", first_a.link_key)
    assert again.link_key and again.link_key != first_a.link_key
    assert state.registry.ready_pipelines() == []
    # a node holding the whole model has no stage links, hence no key
    _join(state, "big", 500)
    state.leave("a")
    state.leave("c")
    assert _beat(state, "big").link_key == ""


# ---- (c) a real cluster under attack --------------------------------------------------------


class AttackedCluster(LocalCluster):
    """LocalCluster that remembers each node's activation port (the attacker's target)."""

    def __init__(self, tmp_path, num_nodes: int, memory: str) -> None:
        self.activation_ports: dict[int, int] = {}
        self._next_activation = 0
        super().__init__(tmp_path, num_nodes, memory)

    def start_node(self, port: int):
        self._next_activation = self.activation_ports.setdefault(port, free_port())
        return super().start_node(port)

    def node_args(self) -> list[str]:
        return ["--activation-port", str(self._next_activation)]  # the last one counts


@pytest.fixture(scope="module")
def attacked(tmp_path_factory):
    cluster = AttackedCluster(tmp_path_factory.mktemp("attacked"), num_nodes=2, memory=split_memory())
    try:
        status = cluster.wait_status({"available"}, START_TIMEOUT_S)
        assert len(status["pipelines"]) == 1 and len(status["pipelines"][0]) == 2
        yield cluster
    finally:
        cluster.close()


def _garbage(rid: str, endpoint: str) -> list[list[bytes]]:
    """Every kind of message an outsider (no key) can push to an activation port."""
    entry = ActivationEntry(rid, [1, 2], 0, PARAMS, 2, [], "tcp://10.9.9.9:1", True)

    def header(dtype: str = "float32", hidden: int = 576) -> bytes:
        return encode(LinkActivations([entry], dtype, hidden))

    unsigned_tokens = encode(LinkTokens([TokenOutput(rid, 0, True, "stop")]))
    unsigned_release = encode(LinkRelease([rid]))
    fake_seal = encode(LinkSeal(os.urandom(16), 1, os.urandom(32)))
    return [
        [header("nope"), bytes(2 * 576 * 4)],  # the attack of the issue
        [header()],  # a header with no tensor frame
        [header(hidden=0), b""],
        [header(), bytes(7)],  # wrong byte length
        [header(), bytes(2 * 576 * 4)],  # forged head_endpoint
        [encode(LinkActivations([ActivationEntry(rid, [1], 0, PARAMS, 1,
                                                        ["ipc:///tmp/x"], endpoint)],
                                     "float32", 576)), bytes(576 * 4)],
        [unsigned_tokens],
        [unsigned_release],
        [fake_seal, unsigned_tokens],
        [fake_seal, unsigned_release],
        [fake_seal, header("nope"), bytes(2 * 576 * 4)],
        [os.urandom(64)], [b""] * 7, [b"x", b"y", bytes(11 * 2**20)],  # last: over MAXMSGSIZE
    ]


def _stream(cluster: LocalCluster, during=None) -> tuple[str, str | None, int]:
    """Stream a greedy answer; call `during(rid)` after the first chunk. Returns (text,
    finish_reason, number of content chunks that arrived after `during`)."""
    body = {"model": "default", "messages": [{"role": "user", "content": "Count to fifty."}],
            "max_tokens": 64, "temperature": 0, "stream": True}
    text, finish, after = [], None, 0
    with httpx.stream("POST", f"{cluster.url}/v1/chat/completions", json=body,
                      timeout=120) as response:
        assert response.status_code == 200
        for event in parse_sse_lines(response.iter_lines()):
            if not isinstance(event, dict) or not event.get("choices"):
                continue
            choice = event["choices"][0]
            text.append(choice["delta"].get("content") or "")
            finish = choice.get("finish_reason") or finish
            if during is not None:
                during(event["id"])
                during = None
            elif finish is None:
                after += 1
    return "".join(text), finish, after


def _executor_pids(cluster: LocalCluster) -> dict[int, int]:
    return {port: httpx.get(f"http://127.0.0.1:{port}/health", timeout=5).json()["executor_pid"]
            for port in cluster.node_ports}


@pytest.mark.slow
def test_garbage_on_the_activation_ports_leaves_the_stream_intact(attacked):
    baseline, baseline_finish, _ = _stream(attacked)
    assert baseline_finish in ("length", "stop") and baseline
    pids = _executor_pids(attacked)
    assert all(pids.values())
    context = zmq.Context()
    sockets = []

    in_flight_after_attack = []

    def attack(rid: str) -> None:
        for activation_port in attacked.activation_ports.values():
            endpoint = f"tcp://127.0.0.1:{activation_port}"
            for frames in _garbage(rid, endpoint):
                socket = context.socket(zmq.PUSH)  # a fresh connection each: one dropped
                socket.setsockopt(zmq.LINGER, 2000)  # for an oversized message hurts no other
                socket.connect(endpoint)
                socket.send_multipart(frames)
                sockets.append(socket)
        time.sleep(0.3)  # loopback delivers in well under that; the request must still run
        in_flight_after_attack.append(sum(
            httpx.get(f"http://127.0.0.1:{port}/health", timeout=5).json()["num_requests"]
            for port in attacked.node_ports))

    try:
        text, finish, after = _stream(attacked, during=attack)
    finally:
        for socket in sockets:
            socket.close()
        context.term()
    assert in_flight_after_attack == [1] and after > 0, "the stream ended before the attack"
    assert (text, finish) == (baseline, baseline_finish)
    assert _executor_pids(attacked) == pids
    listed = {n["node_id"] for n in attacked.status()["node_list"]}
    assert all(any(n.endswith(f"-{port}") for n in listed) for port in attacked.node_ports)
    logs = "".join((attacked.tmp_path / f"node-{port}.log").read_text()
                   for port in attacked.node_ports)
    assert "dropped a stage message" in logs and "no valid seal" in logs
    assert "Traceback" not in logs
    # and the cluster still answers afterwards
    assert _stream(attacked)[0] == baseline
