"""Encryption on untrusted networks (issue 11 item 14): TLS on every HTTP leg, CURVE on the
activation links, proven with an eavesdropping proxy that records every byte.

(a) options: wrong TLS files are refused at start, with the flag named; P2P mode takes none.
(b) the activation link: with CURVE a recorded message shows none of its content (without
    CURVE the same recording shows it, so the check can fail); a plain sender cannot deliver.
(c) a real cluster with `--tls-*` on every command, `--join-token` and `--api-key`: the node's
    join and heartbeats and a client's chat pass through recording proxies, and neither the
    token, the key, the node secret, the prompt nor the answer appears in what they saw; the
    greedy answer equals the whole model's; plain HTTP is refused; a node that serves plain
    HTTP cannot join.
"""

from __future__ import annotations

import json
import ssl
import subprocess
import sys
import time

import httpx
import msgspec
import pytest
import zmq
from processes import free_port
from recording_proxy import RecordingProxy
from test_cluster import (  # noqa: F401 (reference_answers is a fixture)
    PROMPTS,
    LocalCluster,
    reference_answers,
    running,
    split_memory,
)
from tls_certs import make_test_certs

from parallax.cli import main
from parallax.config import GatewayConfig, JoinConfig, SchedulerConfig
from parallax.node.link_auth import LinkSecurity
from parallax.node.link_crypto import CurveKeyPair, is_curve_key, link_fingerprint
from parallax.node.links import LinkLimits, PipelineLinks
from parallax.protocol.common import encode
from parallax.protocol.control import NodeJoin
from parallax.protocol.links import LinkRelease
from parallax.serving.tls import TLSConfig, TLSConfigError, with_scheme

KEY = bytes(range(32))
LIMITS = LinkLimits(8, 64, 256, 1000)
MARKER = "confidential-prompt-7f3a"
JOIN_TOKEN = "join-token-5b1e-secret"
API_KEY = "api-key-c9d2-secret"


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    return make_test_certs(tmp_path_factory.mktemp("certs"))


def trusting(ca) -> ssl.SSLContext:
    """httpx's `verify` for a client that trusts only the CA file `ca`."""
    return ssl.create_default_context(cafile=str(ca))


# ---- (a) options ---------------------------------------------------------------------------


def test_tls_files_are_checked_when_the_command_starts(certs, tmp_path):
    with pytest.raises(TLSConfigError, match="together"):
        TLSConfig(certfile=str(certs.cert))
    with pytest.raises(TLSConfigError, match="--tls-ca-file .*no such file"):
        TLSConfig(ca_file=str(tmp_path / "missing.pem"))
    with pytest.raises(TLSConfigError, match="cannot use --tls-certfile"):
        TLSConfig(str(certs.cert), str(certs.ca))  # a certificate is not a key
    tls = TLSConfig(str(certs.cert), str(certs.key), str(certs.ca))
    assert tls.serves_tls and tls.scheme == "https"
    assert tls.uvicorn_kwargs() == {"ssl_certfile": str(certs.cert),
                                    "ssl_keyfile": str(certs.key)}
    assert isinstance(tls.client_verify(), ssl.SSLContext)


def test_p2p_mode_takes_no_tls_options_and_https_needs_a_node_certificate(certs):
    tls = TLSConfig(str(certs.cert), str(certs.key), str(certs.ca))
    with pytest.raises(ValueError, match="libp2p"):
        JoinConfig(scheduler="12D3KooWDpJ7As7BWAwRMfu1VU2WCqNjvq387JEYKDBj4kx6nXTN", tls=tls)
    with pytest.raises(ValueError, match="libp2p"):
        SchedulerConfig(p2p=True, tls=tls)
    with pytest.raises(ValueError, match="--tls-certfile"):
        JoinConfig(scheduler="https://10.0.0.2:3001")
    assert JoinConfig(scheduler="https://10.0.0.2:3001", tls=tls).tls.serves_tls
    assert GatewayConfig(password="pw", tls=tls).tls.serves_tls


def test_cli_names_the_bad_flag(capsys, tmp_path):
    code = main(["serve", "--tls-certfile", str(tmp_path / "nope.pem"),
                 "--tls-keyfile", str(tmp_path / "nope.key")])
    assert code == 1 and "--tls-certfile" in capsys.readouterr().err


def test_a_tls_client_never_falls_back_to_plain_http():
    assert with_scheme("10.0.0.2:3001", True) == "https://10.0.0.2:3001"
    assert with_scheme("http://10.0.0.2:3001/", True) == "https://10.0.0.2:3001"
    assert with_scheme("https://10.0.0.2:3001", False) == "https://10.0.0.2:3001"
    assert with_scheme("10.0.0.2:3001", False) == "http://10.0.0.2:3001"


# ---- (b) the activation link ---------------------------------------------------------------


def _send_through_proxy(curve: bool) -> tuple[bytes, object]:
    """Stage A sends a message naming MARKER to stage B through a recording proxy; returns
    (what the proxy saw, what B received)."""
    context = zmq.Context()
    a_endpoint, b_port = f"tcp://127.0.0.1:{free_port()}", free_port()
    b_endpoint = f"tcp://127.0.0.1:{b_port}"
    proxy = RecordingProxy(b_port)
    via = f"tcp://127.0.0.1:{proxy.port}"  # A reaches B only through the eavesdropper
    b_keys = CurveKeyPair.generate() if curve else None
    a = PipelineLinks(context, a_endpoint, a_endpoint, LIMITS, LinkSecurity(KEY, []),
                      curve=CurveKeyPair.generate() if curve else None)
    b = PipelineLinks(context, b_endpoint, b_endpoint, LIMITS, LinkSecurity(KEY, []),
                      curve=b_keys)
    try:
        b.set_security(KEY, [a_endpoint, b_endpoint])
        a.set_security(KEY, [a_endpoint, via],
                       ["", b_keys.public.decode() if b_keys else ""])
        a.send_message(via, LinkRelease([MARKER]))
        received = None
        deadline = time.monotonic() + 10
        while received is None and time.monotonic() < deadline:
            a.flush()
            if b.pull.poll(100):
                received = b.receive()
        return proxy.recorded(), received
    finally:
        proxy.close()
        a.close()
        b.close()
        context.term()


def test_curve_hides_the_message_from_an_eavesdropper():
    seen, received = _send_through_proxy(curve=True)
    assert received == (LinkRelease([MARKER]), None)
    assert len(seen) > 100 and MARKER.encode() not in seen
    seen, received = _send_through_proxy(curve=False)  # the same check sees plaintext
    assert received == (LinkRelease([MARKER]), None) and MARKER.encode() in seen


def test_a_plain_sender_cannot_reach_a_curve_stage():
    context = zmq.Context()
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    links = PipelineLinks(context, endpoint, endpoint, LIMITS, LinkSecurity(KEY, [endpoint]),
                          curve=CurveKeyPair.generate())
    attacker = context.socket(zmq.PUSH)
    attacker.setsockopt(zmq.LINGER, 0)
    attacker.setsockopt(zmq.SNDTIMEO, 1000)
    try:
        attacker.connect(endpoint)
        attacker.send_multipart([b"x", encode(LinkRelease(["r"]))])
        assert not links.pull.poll(1500)  # the handshake never completes: nothing arrives
    finally:
        attacker.close()
        links.close()
        context.term()


def test_a_changed_peer_key_is_part_of_what_a_node_reports_holding():
    one, two = (CurveKeyPair.generate().public.decode() for _ in range(2))
    assert is_curve_key(one) and not is_curve_key("~" * 40)
    assert not is_curve_key("#" * 40) and not is_curve_key(one[:-1])
    assert link_fingerprint(KEY, ["", ""]) == link_fingerprint(KEY)
    assert link_fingerprint(KEY, [one, ""]) != link_fingerprint(KEY, [two, ""])
    assert link_fingerprint(None, [one]) == ""


# ---- (c) a real cluster, every leg encrypted ------------------------------------------------


class TLSCluster(LocalCluster):
    """Scheduler and two nodes with TLS, a join token and an API key; node 1 reaches the
    scheduler through a recording proxy."""

    def __init__(self, tmp_path, certs) -> None:
        self.certs = certs
        self.proxy: RecordingProxy | None = None
        super().__init__(tmp_path, num_nodes=2, memory=split_memory())
        self.url = f"https://127.0.0.1:{self.port}"

    def tls_args(self) -> list[str]:
        return ["--tls-certfile", str(self.certs.cert), "--tls-keyfile", str(self.certs.key),
                "--tls-ca-file", str(self.certs.ca)]

    def scheduler_args(self) -> list[str]:
        return ["--join-token", JOIN_TOKEN, "--api-key", API_KEY, *self.tls_args()]

    def scheduler_target(self) -> str:
        self.proxy = RecordingProxy(self.port)
        return f"https://127.0.0.1:{self.proxy.port}"

    def node_args(self) -> list[str]:
        return ["--join-token", JOIN_TOKEN, *self.tls_args()]

    def status(self) -> dict:
        return httpx.get(f"{self.url}/cluster/status_json", timeout=5,
                         verify=trusting(self.certs.ca)).json()["data"]

    def close(self) -> None:
        super().close()
        if self.proxy is not None:
            self.proxy.close()


@pytest.fixture(scope="module")
def tls_cluster(tmp_path_factory, certs):
    with running(TLSCluster(tmp_path_factory.mktemp("tls-cluster"), certs)) as cluster:
        yield cluster


def _chat(url: str, ca: ssl.SSLContext, prompt: str) -> tuple[str, str]:
    body = {"model": "default", "messages": [{"role": "user", "content": prompt}],
            "temperature": 0, "max_tokens": 24}
    response = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=120, verify=ca,
                          headers={"Authorization": f"Bearer {API_KEY}"})
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["message"]["content"], response.text


@pytest.mark.slow
def test_every_leg_is_encrypted_and_the_answer_is_unchanged(tls_cluster, certs,
                                                            reference_answers):  # noqa: F811
    ca = trusting(certs.ca)
    client_proxy = RecordingProxy(tls_cluster.port)
    try:
        prompt = f"{PROMPTS[0]} ({MARKER})"
        answer, raw = _chat(f"https://127.0.0.1:{client_proxy.port}", ca, PROMPTS[0])
        assert answer == reference_answers[0]
        _chat(f"https://127.0.0.1:{client_proxy.port}", ca, prompt)
        client_seen = client_proxy.recorded()
    finally:
        client_proxy.close()
    node_seen = tls_cluster.proxy.recorded()  # joins and heartbeats of node 1
    assert len(client_seen) > 1000 and len(node_seen) > 1000
    for secret in (API_KEY, MARKER, answer, "chat/completions"):
        assert secret.encode() not in client_seen, secret
    for secret in (JOIN_TOKEN, "X-Node-Secret", "node_secret", "link_key", "heartbeat"):
        assert secret.encode() not in node_seen, secret
    # the nodes encrypt their activation links (their executors serve CURVE only, so the
    # answer above crossed an encrypted link) and say so
    assert [n["link_encryption"] for n in tls_cluster.status()["node_list"]] == ["curve"] * 2
    logs = "".join((tls_cluster.tmp_path / f"node-{p}.log").read_text()
                   for p in tls_cluster.node_ports)
    assert logs.count("CURVE-encrypted") == 2


@pytest.mark.slow
def test_plain_http_is_refused_everywhere(tls_cluster, certs):
    for port in (tls_cluster.port, *tls_cluster.node_ports):
        with pytest.raises(httpx.HTTPError):  # a TLS server does not speak plain HTTP
            httpx.get(f"http://127.0.0.1:{port}/health", timeout=5)
    with pytest.raises(httpx.ConnectError):  # a certificate from another CA is refused
        httpx.get(f"{tls_cluster.url}/cluster/status_json", timeout=5,
                  verify=trusting(certs.other_ca))
    node = httpx.get(f"https://127.0.0.1:{tls_cluster.node_ports[0]}/health", timeout=5,
                     verify=trusting(certs.ca))
    assert node.status_code == 200


@pytest.mark.slow
def test_a_node_serving_plain_http_cannot_join(tls_cluster, certs):
    join = NodeJoin("plain-1", "cpu", "cpu", 2**30, 10.0, 10.0, "http://127.0.0.1:9",
                    "tcp://127.0.0.1:10")
    response = httpx.post(f"{tls_cluster.url}/node/join", content=msgspec.json.encode(join),
                          headers={"X-Join-Token": JOIN_TOKEN,
                                   "Content-Type": "application/json"},
                          verify=trusting(certs.ca), timeout=5)
    assert response.status_code == 400 and "--tls-certfile" in response.json()["message"]
    # and `parallax join` without TLS options fails against the https port (no plain fallback)
    result = subprocess.run(
        [sys.executable, "-m", "parallax.cli", "join", "-s", f"https://127.0.0.1:"
         f"{tls_cluster.port}", "--port", str(free_port())],
        capture_output=True, text=True, timeout=60)
    assert result.returncode == 1 and "--tls-certfile" in result.stderr
    assert "plain-1" not in json.dumps(tls_cluster.status())


@pytest.mark.slow
def test_chat_and_gateway_serve_https_and_reach_the_scheduler_over_https(tls_cluster, certs,
                                                                         tmp_path):
    ca = trusting(certs.ca)
    procs = []
    try:
        ports = {"chat": free_port(), "gateway": free_port()}
        common = ["-s", f"127.0.0.1:{tls_cluster.port}", *tls_cluster.tls_args()]
        for name, extra in (("chat", []), ("gateway", ["--password", "pw", "--api-key",
                                                       API_KEY])):
            log = open(tmp_path / f"{name}.log", "wb")
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "parallax.cli", name, "--port", str(ports[name]),
                 *common, *extra], stdout=log, stderr=subprocess.STDOUT))
        answers = {}
        deadline = time.monotonic() + 60
        while len(answers) < 2 and time.monotonic() < deadline:
            for name, path, headers in (("chat", "/cluster/status_json", {}),
                                        ("gateway", "/cluster/status",
                                         {"Authorization": "Bearer pw"})):
                try:
                    answers[name] = httpx.get(f"https://127.0.0.1:{ports[name]}{path}",
                                              verify=ca, headers=headers, timeout=5)
                except httpx.ConnectError:
                    time.sleep(0.5)
        assert answers["chat"].status_code == 200, answers["chat"].text
        assert answers["chat"].json()["data"]["status"] == "available"
        assert answers["gateway"].status_code == 200, answers["gateway"].text
        assert answers["gateway"].json()["status"] == "available"
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait(10)
