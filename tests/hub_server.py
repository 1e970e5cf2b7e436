"""A local stand-in for the part of the Hugging Face hub's HTTP API hub_gguf uses, and
synthetic Llama GGUF files to serve from it (tests/test_hub_gguf.py, benchmarks/hub_gguf_bench.py).

- `GET {prefix}/api/models/{repo}[/revision/{rev}]`: model info with `sha` and `siblings`.
- `HEAD|GET {prefix}/{repo}/resolve/{rev}/{file}`: a 302 to `http://localhost:PORT{prefix}/storage/{sha256}` carrying
  `X-Linked-Size`, `X-Linked-Etag` and `X-Repo-Commit`, like the real hub for LFS files.
- `HEAD|GET {prefix}/storage/{sha256}` with `Range`: 206 partial content.

`prefix` is any path before `/api` or the repo (e.g. `/node1`): give each client its own
HF_ENDPOINT `http://127.0.0.1:PORT/node1` and `sent[prefix]` counts the body bytes it got.
Faults for the tests: `expire_once` (the next storage answer is a 403), `cut_after` (the next storage answer longer than that sends that many
bytes and drops the connection) and `bad_length_once` (the next answer has the wrong length).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import struct
import threading
import time
from collections import defaultdict
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np

COMMIT = "0123456789abcdef0123456789abcdef01234567"
ROUTE = re.compile(r"^(?P<prefix>/[\w-]+)?/(?P<rest>(api|storage|[\w.-]+/[\w.-]+/resolve)/.*)$")


class FakeHub:
    """Serves `files` (repo -> {filename: local path}) at one commit on 127.0.0.1."""

    def __init__(self, files: dict[str, dict[str, str]]) -> None:
        self.files = files
        self.blobs: dict[str, str] = {}  # sha256 -> path
        self.etags: dict[tuple[str, str], str] = {}
        for repo, names in files.items():
            for name, path in names.items():
                digest = _sha256(path)
                self.blobs[digest] = path
                self.etags[(repo, name)] = digest
        self.sent: dict[str, int] = defaultdict(int)
        self.requests: list[tuple[str, str, str]] = []  # (method, path, range)
        self.authorized: list[str] = []  # paths of requests that carried an Authorization
        self.expire_once = False  # the next storage answer is 403, as an expired signed URL
        self.cut_after: int | None = None
        self.bytes_per_s: float | None = None  # a link's bandwidth, shared by all answers
        self._free_at = 0.0
        self.bad_length_once = False
        self.lock = threading.Lock()
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:
                pass

            def do_HEAD(self) -> None:
                hub.handle(self, head=True)

            def do_GET(self) -> None:
                hub.handle(self, head=False)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> FakeHub:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    def endpoint(self, prefix: str) -> str:
        return f"http://127.0.0.1:{self.port}/{prefix}"

    # ---- requests ---------------------------------------------------------------------------

    def handle(self, req: BaseHTTPRequestHandler, head: bool) -> None:
        path = req.path.split("?", 1)[0]
        match = ROUTE.match(path)
        with self.lock:
            self.requests.append((req.command, path, req.headers.get("Range", "")))
            if req.headers.get("Authorization"):
                self.authorized.append(path)
        if not match:
            return self._send(req, 404, b'{"error": "not found"}', head)
        prefix, rest = match["prefix"] or "", match["rest"]
        if rest.startswith("api/models/"):
            return self._info(req, rest.removeprefix("api/models/"), head)
        if rest.startswith("storage/"):
            return self._storage(req, prefix, rest.removeprefix("storage/"), head)
        repo, _, tail = rest.partition("/resolve/")
        revision, _, name = tail.partition("/")
        if repo not in self.files or name not in self.files[repo] or \
                revision not in (COMMIT, "main"):
            return self._send(req, 404, b"Entry not found", head)
        etag = self.etags[(repo, name)]
        req.send_response(302)
        # another host name, as the real hub's storage is: the token must not follow
        req.send_header("Location",
                        f"http://localhost:{self.port}{prefix}/storage/{etag}?signed=1")
        req.send_header("X-Linked-Size", str(os.path.getsize(self.files[repo][name])))
        req.send_header("X-Linked-Etag", f'"{etag}"')
        req.send_header("X-Repo-Commit", COMMIT)
        req.send_header("ETag", '"git-oid"')
        req.send_header("Content-Length", "0")
        req.end_headers()

    def _info(self, req, rest: str, head: bool) -> None:
        repo, _, revision = rest.partition("/revision/")
        if repo not in self.files or revision not in ("", COMMIT, "main"):
            return self._send(req, 404, b'{"error": "Repository not found"}', head)
        siblings = [{"rfilename": name, "size": os.path.getsize(path),
                     "lfs": {"sha256": self.etags[(repo, name)], "size": os.path.getsize(path),
                             "pointerSize": 134}}
                    for name, path in self.files[repo].items()]
        body = json.dumps({"id": repo, "modelId": repo, "sha": COMMIT, "private": False,
                           "siblings": siblings + [{"rfilename": "README.md"}]}).encode()
        self._send(req, 200, body, head, "application/json")

    def _storage(self, req, prefix: str, key: str, head: bool) -> None:
        path = self.blobs.get(key)
        if path is None:
            return self._send(req, 404, b"NoSuchKey", head)
        with self.lock:
            expired, self.expire_once = self.expire_once, False
        if expired:
            return self._send(req, 403, b"Request has expired", head)
        size = os.path.getsize(path)
        start, end = 0, size
        match = re.match(r"^bytes=(\d+)-(\d*)$", req.headers.get("Range", ""))
        if match:
            start, end = int(match[1]), min(size, int(match[2]) + 1 if match[2] else size)
        with open(path, "rb") as f:
            f.seek(start)
            body = f.read(end - start)
        status = 206 if match else 200
        with self.lock:
            cut = self.cut_after if self.cut_after is not None and \
                len(body) > self.cut_after else None
            if cut is not None:
                self.cut_after = None
            bad, self.bad_length_once = self.bad_length_once, False
        req.send_response(status)
        if match:
            req.send_header("Content-Range", f"bytes {start}-{end - 1}/{size}")
        if bad:  # a corrupted answer: one byte short, and says so
            body = body[:-1]
        req.send_header("Content-Length", str(len(body)))
        req.send_header("Accept-Ranges", "bytes")
        req.end_headers()
        if head:
            return
        if cut is not None:  # send part of the body, then drop the connection
            body = body[:cut]
            req.close_connection = True
        for i in range(0, len(body), 2**16):
            self._throttle(len(body[i : i + 2**16]))
            req.wfile.write(body[i : i + 2**16])
        with self.lock:
            self.sent[prefix.strip("/")] += len(body)
        if cut is not None:
            req.wfile.flush()
            req.connection.shutdown(2)

    def _throttle(self, num_bytes: int) -> None:
        """Wait until a link of `bytes_per_s` (all answers share it) could carry these bytes."""
        if not self.bytes_per_s:
            return
        with self.lock:
            start = max(time.monotonic(), self._free_at)
            self._free_at = start + num_bytes / self.bytes_per_s
            wait = self._free_at - time.monotonic()
        if wait > 0:
            time.sleep(wait)

    def _send(self, req, status: int, body: bytes, head: bool,
              content_type: str = "text/plain") -> None:
        req.send_response(status)
        req.send_header("Content-Type", content_type)
        req.send_header("Content-Length", str(len(body)))
        req.end_headers()
        if not head:
            req.wfile.write(body)


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(2**20):
            digest.update(block)
    return digest.hexdigest()


# ---- synthetic GGUF files ------------------------------------------------------------------------


@functools.lru_cache(maxsize=2)
def tokenizer_fields(source_path: str) -> tuple:
    """The tokenizer.* metadata (vocabulary, merges, chat template) of another GGUF file, as
    (key, value, type, item type) tuples for GGUFWriter.add_key_value. Parsed here with struct
    (gguf's reader takes seconds over a 49 k vocabulary)."""
    from gguf import GGUFValueType as VT

    from parallax.models.gguf_table import SCALARS

    with open(source_path, "rb") as f:
        buf = f.read(16 * 2**20)
    pos = 24
    num_fields = struct.unpack_from("<Q", buf, 16)[0]

    def string() -> str:
        nonlocal pos
        length = struct.unpack_from("<Q", buf, pos)[0]
        pos += 8 + length
        return buf[pos - length : pos].decode("utf-8")

    def value(kind: int):
        nonlocal pos
        if kind == VT.STRING:
            return string()
        if kind == VT.ARRAY:
            item, count = struct.unpack_from("<IQ", buf, pos)
            pos += 12
            return [value(item) for _ in range(count)]
        fmt = "<" + SCALARS[kind]
        pos += struct.calcsize(fmt)
        return struct.unpack_from(fmt, buf, pos - struct.calcsize(fmt))[0]

    fields = []
    for _ in range(num_fields):
        key = string()
        kind = struct.unpack_from("<I", buf, pos)[0]
        sub_type = VT(struct.unpack_from("<I", buf, pos + 4)[0]) if kind == VT.ARRAY else None
        pos += 4
        content = value(kind)
        if key.startswith("tokenizer."):
            fields.append((key, content, VT(kind), sub_type))
    return tuple(fields)


def write_llama_gguf(path: str, num_layers: int = 8, hidden: int = 256, ffn: int = 768,
                     num_heads: int = 4, num_kv_heads: int = 2, split_max_tensors: int = 0,
                     tokenizer_from: str | None = None, vocab: int = 49152,
                     seed: int = 0) -> list[str]:
    """A Llama GGUF with random Q8_0 weights and an untied output matrix; returns the paths
    written (the split parts, when `split_max_tensors` splits it)."""
    import gguf
    from gguf import GGMLQuantizationType as QT

    rng = np.random.default_rng(seed)
    writer = gguf.GGUFWriter(path, "llama", split_max_tensors=split_max_tensors)
    writer.add_block_count(num_layers)
    writer.add_embedding_length(hidden)
    writer.add_feed_forward_length(ffn)
    writer.add_head_count(num_heads)
    writer.add_head_count_kv(num_kv_heads)
    writer.add_context_length(512)
    writer.add_vocab_size(vocab)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_freq_base(10000.0)
    for key, value, kind, sub_type in tokenizer_fields(tokenizer_from) if tokenizer_from else ():
        writer.add_key_value(key, value, kind, sub_type)

    def q8(name: str, rows: int, cols: int, scale: float = 0.05) -> None:
        """Q8_0 blocks built directly (fast): a float16 scale and 32 int8 values each."""
        blocks = np.empty((rows, cols // 32, 34), dtype=np.uint8)
        scales = (scale / 127 * (0.5 + rng.random((rows, cols // 32)))).astype(np.float16)
        blocks[..., :2] = scales.view(np.uint8).reshape(rows, cols // 32, 2)
        blocks[..., 2:] = rng.integers(-127, 128, (rows, cols // 32, 32), dtype=np.int8) \
            .view(np.uint8)
        writer.add_tensor(name, blocks.reshape(rows, -1), raw_dtype=QT.Q8_0)

    def norm(name: str) -> None:
        writer.add_tensor(name, (1 + 0.1 * rng.standard_normal(hidden)).astype(np.float32))

    head_dim = hidden // num_heads
    q8("token_embd.weight", vocab, hidden, 1.0)
    for i in range(num_layers):
        norm(f"blk.{i}.attn_norm.weight")
        q8(f"blk.{i}.attn_q.weight", hidden, hidden)
        q8(f"blk.{i}.attn_k.weight", num_kv_heads * head_dim, hidden)
        q8(f"blk.{i}.attn_v.weight", num_kv_heads * head_dim, hidden)
        q8(f"blk.{i}.attn_output.weight", hidden, hidden)
        norm(f"blk.{i}.ffn_norm.weight")
        q8(f"blk.{i}.ffn_gate.weight", ffn, hidden)
        q8(f"blk.{i}.ffn_up.weight", ffn, hidden)
        q8(f"blk.{i}.ffn_down.weight", hidden, ffn)
    norm("output_norm.weight")
    q8("output.weight", vocab, hidden)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    if not split_max_tensors:
        return [path]
    stem = path.removesuffix(".gguf")
    return sorted(p for p in (os.path.join(os.path.dirname(path), f)
                              for f in os.listdir(os.path.dirname(path) or "."))
                  if p.startswith(stem + "-") and p.endswith(".gguf"))
