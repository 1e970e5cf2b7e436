"""Settings of every role, as frozen dataclasses validated once when built.

The CLI builds these from flags; tests build them directly. `ExecutorConfig` also travels to the
executor process as JSON (msgspec), never pickled.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from parallax.p2p.peer import MULTIADDR_RE, is_p2p_target
from parallax.scheduler.admission import AdvertiseAllowList
from parallax.serving.tls import NO_TLS, TLSConfig

DTYPES = ("auto", "float32", "bfloat16", "float16")
# --quantize: GGUF block types a float checkpoint is packed into at load (quant/quantize.py)
QUANTIZE_CHOICES = ("q8_0", "q4_0", "q4_k")
# --activation-int8: decode matmuls on packed weights with int8 activations (quant/loading.py)
ACTIVATION_INT8_CHOICES = ("auto", "on", "off")
_DEVICE = re.compile(r"^(cpu|cuda(:\d+)?)$")
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?i?b?)?\s*$", re.IGNORECASE)
_UNITS = {"": 2**30, "b": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}


MAX_INIT_NODES = 256  # the most nodes a cluster may be told to wait for (-n, /scheduler/init)


class ConfigError(ValueError):
    """A setting is invalid; the message names it and says what is allowed."""


def parse_size(text: str | int | float, default_unit: str = "g") -> int:
    """Bytes from "2GB", "512MB", "1.5g", "300M" or a bare number (in `default_unit`, GiB).

    Units are binary (1 GB = 2**30 bytes), case-insensitive, with or without "i"/"B".
    """
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        return int(float(text) * _UNITS[default_unit])
    m = _SIZE.match(str(text))
    if not m:
        raise ConfigError(f"cannot read the size {text!r}: use e.g. 2GB, 512MB or 1.5")
    number, unit = float(m.group(1)), (m.group(2) or "").lower().replace("i", "")
    unit = unit[:-1] if unit.endswith("b") and len(unit) > 1 else unit
    scale = _UNITS[default_unit] if unit == "" else _UNITS[unit]
    return int(number * scale)


def resolve_dtype(dtype: str, device: str) -> str:
    """"auto" -> bfloat16 on CUDA, float32 on CPU (the small built-in model needs fp32)."""
    if dtype != "auto":
        return dtype
    return "bfloat16" if device.startswith("cuda") else "float32"


def check_quantize(value: str | None) -> None:
    """None (float weights) or one of QUANTIZE_CHOICES; ConfigError naming them otherwise."""
    if value is not None and value not in QUANTIZE_CHOICES:
        raise ConfigError(f"quantize must be one of {', '.join(QUANTIZE_CHOICES)} (or absent "
                          f"for float weights), got {value!r}")


def check_activation_int8(value: str) -> None:
    if value not in ACTIVATION_INT8_CHOICES:
        raise ConfigError(f"activation_int8 must be one of {', '.join(ACTIVATION_INT8_CHOICES)}, "
                          f"got {value!r}")


def _check_port(name: str, port: int | None, low: int = 0) -> None:
    """A TCP port in low..65535 (None: not given)."""
    if port is not None and (not isinstance(port, int) or not low <= port <= 65535):
        raise ConfigError(f"{name} must be in {low}..65535, got {port!r}")


def _check_listen(host: str, port: int, allowed_hosts: tuple[str, ...]) -> None:
    """Where a server listens: its port, a host, and the Host names it answers."""
    _check_port("port", port)
    if not host:
        raise ConfigError("host must not be empty")
    _check_allowed_hosts(allowed_hosts)


def _check_positive(name: str, value: int | None, allow_none: bool = True) -> None:
    if value is None and allow_none:
        return
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ConfigError(f"{name} must be a positive integer, got {value!r}")


@dataclass(frozen=True)
class ExecutorConfig:
    """What one executor process needs: which layers of which model, where, and engine limits."""

    model: str | None = None
    start_layer: int = 0
    end_layer: int | None = None
    device: str = "cpu"
    dtype: str = "float32"  # resolved: float32 | bfloat16 | float16
    quantize: str | None = None  # pack a float checkpoint into GGUF blocks at load (q8_0, ...)
    kv_memory_bytes: int | None = None  # None: a share of free memory, chosen at load time
    block_size: int = 16
    max_batch_size: int = 32
    max_num_batched_tokens: int = 512
    max_model_len: int | None = None
    enable_prefix_caching: bool = True
    threads: int | None = None
    warmup: bool = True
    activation_int8: str = "auto"  # auto | on | off: int8 activations in packed decode matmuls
    # pipeline stage: where this executor's activation PULL socket binds, and the address
    # other nodes use to reach it (None: a single node, no activation socket)
    activation_bind: str | None = None
    activation_endpoint: str | None = None
    link_encryption: bool = False  # serve the activation socket with CURVE (TLS nodes)

    def __post_init__(self) -> None:
        if not _DEVICE.match(self.device):
            raise ConfigError(f"device must be cpu, cuda or cuda:N, got {self.device!r}")
        if self.dtype not in DTYPES[1:]:
            raise ConfigError(f"dtype must be one of {', '.join(DTYPES[1:])}, got {self.dtype!r}")
        check_quantize(self.quantize)
        check_activation_int8(self.activation_int8)
        if self.start_layer < 0 or (self.end_layer is not None
                                    and self.end_layer <= self.start_layer):
            raise ConfigError(f"bad layer range [{self.start_layer}, {self.end_layer})")
        for name in ("block_size", "max_batch_size", "max_num_batched_tokens"):
            _check_positive(name, getattr(self, name), allow_none=False)
        for name in ("kv_memory_bytes", "max_model_len", "threads"):
            _check_positive(name, getattr(self, name))


def node_executor_config(config: ServeConfig | JoinConfig, **layers: Any) -> ExecutorConfig:
    """The executor settings a node's own settings give (device, dtype, batching, threads...),
    plus `layers`: what it serves (model, layer range, quantize, KV budget, activation socket)."""
    return ExecutorConfig(
        device=config.device,
        dtype=resolve_dtype(config.dtype, config.device),
        max_batch_size=config.max_batch_size,
        max_num_batched_tokens=config.max_num_batched_tokens,
        threads=config.threads,
        warmup=config.warmup,
        activation_int8=config.activation_int8,
        enable_prefix_caching=config.enable_prefix_caching,
        **layers,
    )


@dataclass(frozen=True)
class ServeConfig:
    """`parallax serve`: one node holding the whole model, with the OpenAI API in front."""

    model: str | None = None
    host: str = "127.0.0.1"
    port: int = 3000
    device: str = "cpu"
    dtype: str = "auto"
    quantize: str | None = None  # q8_0 | q4_0 | q4_k: pack a float checkpoint at load
    max_batch_size: int = 32
    max_waiting: int = 64  # admitted requests beyond the batch; more -> 429
    kv_memory_bytes: int | None = None
    threads: int | None = None
    max_model_len: int | None = None
    max_num_batched_tokens: int = 512
    max_body_bytes: int = 4 * 2**20  # larger request bodies -> 413
    max_restarts: int = 5  # consecutive failed executor starts before giving up
    warmup: bool = True
    activation_int8: str = "auto"  # auto | on | off (see ExecutorConfig)
    allowed_hosts: tuple[str, ...] = ()  # Host names answered when not bound to loopback
    tls: TLSConfig = NO_TLS  # https server/client (and CURVE links on nodes)
    enable_prefix_caching: bool = True  # --no-prefix-caching turns it off
    executor: ExecutorConfig = field(init=False)

    def __post_init__(self) -> None:
        _check_listen(self.host, self.port, self.allowed_hosts)
        if self.dtype not in DTYPES:
            raise ConfigError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        for name in ("max_body_bytes",):
            _check_positive(name, getattr(self, name), allow_none=False)
        if not isinstance(self.max_waiting, int) or self.max_waiting < 0:
            raise ConfigError(f"max_waiting must be >= 0, got {self.max_waiting!r}")
        if not isinstance(self.max_restarts, int) or self.max_restarts < 0:
            raise ConfigError(f"max_restarts must be >= 0, got {self.max_restarts!r}")
        executor = node_executor_config(self, model=self.model, quantize=self.quantize,
                                        kv_memory_bytes=self.kv_memory_bytes,
                                        max_model_len=self.max_model_len)
        object.__setattr__(self, "executor", executor)

    @property
    def max_in_flight(self) -> int:
        """Requests admitted at once (running + waiting); one more is answered 429."""
        return self.max_batch_size + self.max_waiting


SCHEDULER_DTYPES = ("float32", "bfloat16")


@dataclass(frozen=True)
class SchedulerConfig:
    """`parallax run`: the scheduler (node registry, allocation, routing, one OpenAI API)."""

    model: str | None = None  # None: wait for POST /scheduler/init
    init_nodes_num: int = 1  # the first allocation waits for this many nodes
    host: str = "127.0.0.1"
    port: int = 3001
    join_token: str | None = None  # required from nodes (X-Join-Token) when set
    api_key: str | None = None  # required on /v1/* (Authorization: Bearer) when set
    retry_attempts: int = 20  # all pipelines busy: retry this many intervals, then 429
    retry_interval_s: float = 5.0
    heartbeat_timeout_s: float = 15.0  # a node silent this long is evicted
    # replay on failure (scheduler/replay.py): how long a request whose pipeline broke waits
    # for a complete pipeline (keep-alives every replay_keepalive_s), and how often at most
    replay_wait_s: float = 120.0
    max_replays: int = 3
    replay_keepalive_s: float = 5.0
    dtype: str = "float32"  # what nodes load weights in: sizes /model/list and allocation
    quantize: str | None = None  # q8_0 | q4_0 | q4_k: nodes pack -m's float weights at load
    mdns: bool = True
    local_models: tuple[str, ...] = ()  # extra model dirs / .gguf files offered in /model/list
    connect_timeout_s: float = 5.0  # scheduler -> head node
    read_timeout_s: float = 600.0  # longest silence of a head node's answer
    max_body_bytes: int = 4 * 2**20  # larger request bodies -> 413
    evict_interval_s: float = 1.0
    p2p: bool = False  # also run a Lattica peer: nodes and chat servers join by peer id
    p2p_port: int = 3003  # the peer's tcp port (fixed, so its address can be advertised)
    relays: tuple[str, ...] = ()  # relay server multiaddrs for peers behind NAT
    max_queued: int = 1024  # requests waiting for a pipeline with room; one more -> 429
    allowed_hosts: tuple[str, ...] = ()  # Host names answered when not bound to loopback
    # hosts a node may advertise besides the address it joins from (scheduler/admission.py)
    allow_advertised_hosts: tuple[str, ...] = ()
    tls: TLSConfig = NO_TLS  # https server/client (and CURVE links on nodes)

    def __post_init__(self) -> None:
        _check_listen(self.host, self.port, self.allowed_hosts)
        _check_p2p(self.p2p_port, self.relays)
        try:
            AdvertiseAllowList.parse(self.allow_advertised_hosts)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        if self.p2p and self.tls.enabled:  # its P2P bridge talks plain HTTP to this server
            raise ConfigError("--p2p and the --tls-* options do not go together yet: P2P mode "
                              "is encrypted by libp2p; use one or the other")
        _check_positive("init_nodes_num", self.init_nodes_num, allow_none=False)
        if self.init_nodes_num > MAX_INIT_NODES:
            raise ConfigError(f"init_nodes_num must be at most {MAX_INIT_NODES}, "
                              f"got {self.init_nodes_num}")
        _check_positive("max_body_bytes", self.max_body_bytes, allow_none=False)
        _check_positive("max_queued", self.max_queued, allow_none=False)
        if not isinstance(self.retry_attempts, int) or self.retry_attempts < 0:
            raise ConfigError(f"retry_attempts must be >= 0, got {self.retry_attempts!r}")
        if self.retry_interval_s < 0:
            raise ConfigError(f"retry_interval must be >= 0, got {self.retry_interval_s!r}")
        if not isinstance(self.max_replays, int) or self.max_replays < 0:
            raise ConfigError(f"max_replays must be >= 0, got {self.max_replays!r}")
        if self.replay_wait_s < 0:
            raise ConfigError(f"replay_wait_s must be >= 0, got {self.replay_wait_s!r}")
        if not self.replay_keepalive_s > 0:
            raise ConfigError(f"replay_keepalive_s must be > 0, got {self.replay_keepalive_s!r}")
        for name in ("heartbeat_timeout_s", "connect_timeout_s", "read_timeout_s",
                     "evict_interval_s"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name} must be > 0, got {getattr(self, name)!r}")
        if self.dtype not in SCHEDULER_DTYPES:
            raise ConfigError(f"dtype must be one of {', '.join(SCHEDULER_DTYPES)}, "
                              f"got {self.dtype!r}")
        check_quantize(self.quantize)
        for name in ("join_token", "api_key"):
            if getattr(self, name) is not None and not getattr(self, name).strip():
                raise ConfigError(f"{name} must not be empty when given")

    @property
    def heartbeat_interval_s(self) -> float:
        """How often nodes are told to heartbeat: a third of the timeout, at most 5 s."""
        return min(5.0, self.heartbeat_timeout_s / 3)


@dataclass(frozen=True)
class JoinConfig:
    """`parallax join`: a node that takes the layers the scheduler assigns to it."""

    scheduler: str | None = None  # HOST:PORT; None: find one by mDNS
    host: str = "127.0.0.1"
    port: int = 3000
    activation_port: int | None = None  # default: port + 100
    advertise_host: str | None = None  # address other machines use; default: from --host
    device: str = "cpu"
    dtype: str = "auto"
    memory_bytes: int | None = None  # budget for weights + KV cache; None: free memory
    kv_memory_bytes: int | None = None  # KV cache budget; None: memory_bytes less the weights
    join_token: str | None = None
    threads: int | None = None
    max_batch_size: int = 32
    max_waiting: int = 64
    max_num_batched_tokens: int = 512
    max_body_bytes: int = 4 * 2**20
    max_restarts: int = 5
    warmup: bool = True
    activation_int8: str = "auto"  # auto | on | off (see ExecutorConfig)
    discovery_timeout_s: float = 15.0
    p2p_port: int | None = None  # P2P mode (-s PEER): the Lattica peer's port; default port + 200
    relays: tuple[str, ...] = ()
    allowed_hosts: tuple[str, ...] = ()  # Host names answered when not bound to loopback
    tls: TLSConfig = NO_TLS  # https server/client (and CURVE links on nodes)
    enable_prefix_caching: bool = True  # --no-prefix-caching turns it off on this stage
    probe_interval_s: float = 30.0  # peers' RTT and bandwidth are re-measured this often

    def __post_init__(self) -> None:
        _check_port("port", self.port)
        if not 0 < self.probe_interval_s < float("inf"):
            raise ConfigError(f"probe_interval_s must be a finite number > 0, got "
                              f"{self.probe_interval_s!r}")
        _check_p2p(self.p2p_port, self.relays)
        _check_allowed_hosts(self.allowed_hosts)
        if self.join_token is not None and not self.join_token.strip():
            raise ConfigError("join_token must not be empty when given")
        _check_port("activation port", self.activation_port, low=1)
        if self.dtype not in DTYPES:
            raise ConfigError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        check_activation_int8(self.activation_int8)
        if not _DEVICE.match(self.device):
            raise ConfigError(f"device must be cpu, cuda or cuda:N, got {self.device!r}")
        if self.scheduler is not None and not (_SCHEDULER_ADDRESS.match(self.scheduler)
                                               or is_p2p_target(self.scheduler)):
            raise ConfigError(f"--scheduler must be HOST:PORT, a peer id or a /p2p/ multiaddr, "
                              f"got {self.scheduler!r}")
        if self.tls.enabled and self.scheduler is not None and is_p2p_target(self.scheduler):
            raise ConfigError("P2P mode is encrypted by libp2p already: drop the --tls-* options")
        if self.scheduler is not None and self.scheduler.startswith("https://") \
                and not self.tls.serves_tls:
            raise ConfigError("an https:// scheduler needs this node to serve TLS too: give "
                              "--tls-certfile and --tls-keyfile (and --tls-ca-file)")
        _check_positive("memory_bytes", self.memory_bytes)
        _check_positive("kv_memory_bytes", self.kv_memory_bytes)
        if self.memory_bytes and self.kv_memory_bytes \
                and self.kv_memory_bytes >= self.memory_bytes:
            raise ConfigError("--kv-memory must be less than --memory, which also holds the "
                              "weights; lower --kv-memory or raise --memory")

    @property
    def max_in_flight(self) -> int:
        return self.max_batch_size + self.max_waiting

    @property
    def compute_dtype(self) -> str:
        return resolve_dtype(self.dtype, self.device)


_SCHEDULER_ADDRESS = re.compile(r"^(https?://)?[\w.\-\[\]:]+:\d+/?$")


def _check_p2p(port: int | None, relays: tuple[str, ...], allow_zero: bool = False) -> None:
    _check_port("--p2p-port", port, low=0 if allow_zero else 1)
    for relay in relays:
        if not MULTIADDR_RE.match(relay):
            raise ConfigError(f"--relay must be a multiaddr ending in /p2p/<peer id>, got {relay!r}")


_HOST_NAME = re.compile(r"^[A-Za-z0-9._:\[\]-]+$")


def _check_allowed_hosts(hosts: tuple[str, ...]) -> None:
    for host in hosts:
        if not isinstance(host, str) or not _HOST_NAME.match(host):
            raise ConfigError(f"--allowed-hosts takes host names or IP addresses (no port or "
                              f"scheme), got {host!r}")


def _check_proxy_common(cfg: ChatConfig | GatewayConfig) -> None:
    _check_listen(cfg.host, cfg.port, cfg.allowed_hosts)
    _check_positive("max_body_bytes", cfg.max_body_bytes, allow_none=False)
    if not _SCHEDULER_ADDRESS.match(cfg.scheduler or "") and not (
            isinstance(cfg, ChatConfig) and is_p2p_target(cfg.scheduler)):
        raise ConfigError(f"--scheduler must be HOST:PORT, got {cfg.scheduler!r}")
    for name in ("connect_timeout_s", "read_timeout_s"):
        if not getattr(cfg, name) > 0:
            raise ConfigError(f"{name} must be > 0, got {getattr(cfg, name)!r}")


@dataclass(frozen=True)
class ChatConfig:
    """`parallax chat`: the web UI on another machine, proxying its API calls to the scheduler."""

    scheduler: str = "127.0.0.1:3001"  # HOST:PORT of `parallax run`, or its peer id / multiaddr
    host: str = "127.0.0.1"
    port: int = 3002
    connect_timeout_s: float = 5.0
    read_timeout_s: float = 600.0  # longest silence of a proxied answer
    p2p_port: int = 0  # P2P mode: this server's Lattica port (0: any free port)
    relays: tuple[str, ...] = ()
    allowed_hosts: tuple[str, ...] = ()  # Host names answered when not bound to loopback
    tls: TLSConfig = NO_TLS  # https server/client (and CURVE links on nodes)
    max_body_bytes: int = 4 * 2**20  # larger request bodies -> 413

    def __post_init__(self) -> None:
        _check_proxy_common(self)
        _check_p2p(self.p2p_port, self.relays, allow_zero=True)


@dataclass(frozen=True)
class GatewayConfig:
    """`parallax gateway`: password-protected backend for a phone app, in front of the scheduler."""

    password: str | None = None  # required: every request sends `Authorization: Bearer <it>`
    scheduler: str = "127.0.0.1:3001"
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None  # sent to the scheduler as `Authorization: Bearer <key>`
    connect_timeout_s: float = 5.0
    read_timeout_s: float = 600.0
    allowed_hosts: tuple[str, ...] = ()  # Host names answered when not bound to loopback
    tls: TLSConfig = NO_TLS  # https server/client (and CURVE links on nodes)
    max_body_bytes: int = 4 * 2**20  # larger request bodies -> 413
    max_failed_auth: int = 10  # wrong passwords per client within the window; then 429
    failed_auth_window_s: float = 60.0  # ... and the client stays blocked this long

    def __post_init__(self) -> None:
        _check_proxy_common(self)
        _check_positive("max_failed_auth", self.max_failed_auth, allow_none=False)
        if not self.failed_auth_window_s > 0:
            raise ConfigError(f"failed_auth_window_s must be > 0, got "
                              f"{self.failed_auth_window_s!r}")
        if self.password is None or not self.password.strip():
            raise ConfigError("the gateway needs a password: pass --password or set "
                              "PARALLAX_GATEWAY_PASSWORD")
        if self.api_key is not None and not self.api_key.strip():
            raise ConfigError("api_key must not be empty when given")
