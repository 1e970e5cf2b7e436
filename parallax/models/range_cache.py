"""A local copy of a remote file that holds only the byte ranges fetched so far.

`PartialFile` is a sparse file of the remote file's full size plus a JSON sidecar
(`<file>.ranges.json`) listing the half-open ranges that are present and verified. Readers
open the file like any other: bytes never fetched read as zeros, and the GGUF loader never
touches them (it reads only the tensors of its layers). A range is recorded only after its
bytes are written, so a process killed mid-download keeps what arrived, and the next fetch
asks only for the rest.

`RangeFetcher` fills missing ranges with bounded HTTP range requests (a few in parallel),
checking every response's status, Content-Range and length: a response of the wrong length
is discarded and asked again; a connection cut mid-body keeps the prefix that arrived.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import httpx

logger = logging.getLogger(__name__)

MAX_RANGE_BYTES = 16 * 2**20  # one request never asks for more (bounded memory and retries)
COALESCE_GAP = 64 * 2**10  # tensors closer than this are fetched in one request
CHUNK_BYTES = 1 * 2**20
NUM_WORKERS = 4
NUM_ATTEMPTS = 5
TIMEOUT = httpx.Timeout(30.0, connect=10.0)
SIDECAR_SUFFIX = ".ranges.json"
SAVE_EVERY_S = 0.5


def merge(ranges: Iterable[tuple[int, int]], gap: int = 0) -> list[tuple[int, int]]:
    """Sorted, merged half-open ranges (ranges closer than `gap` are joined)."""
    out: list[list[int]] = []
    for start, end in sorted(r for r in ranges if r[1] > r[0]):
        if out and start <= out[-1][1] + gap:
            out[-1][1] = max(out[-1][1], end)
        else:
            out.append([start, end])
    return [(a, b) for a, b in out]


def subtract(wanted: Iterable[tuple[int, int]],
             present: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """The parts of `wanted` not covered by `present` (both merged, half-open)."""
    missing = []
    for start, end in merge(wanted):
        pos = start
        for a, b in present:
            if b <= pos or a >= end:
                continue
            if a > pos:
                missing.append((pos, a))
            pos = max(pos, b)
        if pos < end:
            missing.append((pos, end))
    return missing


def total(ranges: Iterable[tuple[int, int]]) -> int:
    return sum(b - a for a, b in ranges)


class PartialFile:
    """A sparse local file of `size` bytes and the ranges of it that hold the remote bytes.

    `etag` identifies the remote content: a sidecar recorded for another etag or size is
    discarded (the file is started afresh). Thread-safe.
    """

    def __init__(self, path: str, size: int, etag: str) -> None:
        self.path, self.size, self.etag = path, size, etag
        self.sidecar = path + SIDECAR_SUFFIX
        self._lock = threading.Lock()
        self._saved_at = 0.0
        self.hash_verified = False
        self.ranges = self._load()
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        with open(path, "ab") as f:  # sparse: truncate to the full size, nothing is written
            if f.tell() != size:
                f.truncate(size)

    @classmethod
    def existing(cls, path: str) -> PartialFile | None:
        """The cached file at `path` as its sidecar describes it (offline mode), or None."""
        try:
            with open(path + SIDECAR_SUFFIX) as f:
                meta = json.load(f)
            return cls(path, int(meta["size"]), str(meta["etag"]))
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def _load(self) -> list[tuple[int, int]]:
        try:
            with open(self.sidecar) as f:
                meta = json.load(f)
            if meta.get("size") != self.size or meta.get("etag") != self.etag \
                    or os.path.getsize(self.path) != self.size:
                return []
            self.hash_verified = self.hash_verified or bool(meta.get("hash_verified"))
            return merge((int(a), int(b)) for a, b in meta["ranges"])
        except (OSError, ValueError, KeyError, TypeError):
            return []

    def save(self, forget_others: bool = False) -> None:
        """Write the sidecar. Ranges another process (a second node on this machine sharing
        the cache) recorded meanwhile are kept: every recorded byte is the remote's."""
        with self._lock:
            if not forget_others:
                self.ranges = merge([*self.ranges, *self._load()])
            meta = {"size": self.size, "etag": self.etag, "ranges": self.ranges,
                    "hash_verified": self.hash_verified}
            tmp = f"{self.sidecar}.{os.getpid()}.{threading.get_ident()}.tmp"
            with open(tmp, "w") as f:
                json.dump(meta, f)
            os.replace(tmp, self.sidecar)  # atomic: a reader never sees half a sidecar
            self._saved_at = time.monotonic()

    def record(self, start: int, end: int) -> None:
        """[start, end) now holds the remote bytes (written before this call)."""
        with self._lock:
            self.ranges = merge([*self.ranges, (start, end)])
            due = time.monotonic() - self._saved_at > SAVE_EVERY_S
        if due:
            self.save()

    def missing(self, wanted: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
        with self._lock:
            return subtract(wanted, list(self.ranges))

    @property
    def complete(self) -> bool:
        return not self.missing([(0, self.size)])

    def write(self, offset: int, data: bytes) -> None:
        fd = os.open(self.path, os.O_WRONLY)
        try:
            os.pwrite(fd, data, offset)
        finally:
            os.close(fd)

    def read(self, start: int, end: int) -> bytes:
        with open(self.path, "rb") as f:
            f.seek(start)
            return f.read(end - start)

    def verify_hash(self) -> bool:
        """Whole file present: check its sha256 against the etag when the etag is one (the
        hub's X-Linked-Etag of an LFS file). False (and everything forgotten) on mismatch."""
        if self.hash_verified or not _is_sha256(self.etag) or not self.complete:
            return True
        digest = hashlib.sha256()
        with open(self.path, "rb") as f:
            while block := f.read(8 * 2**20):
                digest.update(block)
        if digest.hexdigest() == self.etag:
            self.hash_verified = True
            self.save()
            return True
        with self._lock:
            self.ranges = []
        self.save(forget_others=True)
        return False


def _is_sha256(etag: str) -> bool:
    return len(etag) == 64 and all(c in "0123456789abcdef" for c in etag)


@dataclass
class Progress:
    """Bytes fetched against bytes wanted, reported at most once a second."""

    label: str
    wanted: int
    report: Callable[[Progress], None] | None = None
    done: int = 0
    finished: bool = False
    started: float = field(default_factory=time.monotonic)
    _reported: float = 0.0
    _lock: threading.RLock = field(default_factory=threading.RLock)

    def add(self, num_bytes: int) -> None:
        """Count bytes from any fetching thread; `report` runs under the lock, one call at a
        time (it may send on a ZeroMQ socket, which is not thread-safe)."""
        with self._lock:
            self.done += num_bytes
            now = time.monotonic()
            if now - self._reported >= 1.0 and self.report is not None:
                self._reported = now
                self.report(self)

    @property
    def rate(self) -> float:
        """Bytes per second since the start."""
        return self.done / max(1e-6, time.monotonic() - self.started)

    def finish(self) -> None:
        """The last report (everything arrived), from the thread that waited for the rest."""
        with self._lock:
            self.finished = True
            if self.report is not None:
                self.report(self)

    @property
    def eta_s(self) -> float:
        return 0.0 if self.finished else max(0, self.wanted - self.done) / max(1.0, self.rate)

    def text(self) -> str:
        if self.finished:
            return (f"downloaded {self.done / 1e6:.1f} MB of {self.label} in "
                    f"{time.monotonic() - self.started:.1f} s ({self.rate / 1e6:.1f} MB/s)")
        return (f"downloading {self.label}: {self.done / 1e6:.1f} / {self.wanted / 1e6:.1f} MB, "
                f"{self.rate / 1e6:.1f} MB/s, ETA {self.eta_s:.0f} s")


class RangeError(IOError):
    """A range could not be fetched after every attempt."""


class RangeFetcher:
    """Fills ranges of PartialFiles from URLs with HTTP range requests.

    `headers_for(url)` gives the headers of a request (the hub token goes to the hub only).
    `refresh(url)` may return a new URL when one stops working (expired storage URLs).
    """

    def __init__(self, client: httpx.Client, headers_for: Callable[[str], dict[str, str]],
                 refresh: Callable[[str], str] | None = None) -> None:
        self.client = client
        self.headers_for = headers_for
        self.refresh = refresh

    def fill(self, part: PartialFile, url: str, wanted: Iterable[tuple[int, int]],
             progress: Progress | None = None) -> None:
        """Fetch what `part` lacks of `wanted`; raises RangeError when a range keeps failing."""
        spans = []
        for start, end in merge(part.missing(wanted), gap=COALESCE_GAP):
            spans += [(a, min(end, a + MAX_RANGE_BYTES)) for a in range(start, end,
                                                                        MAX_RANGE_BYTES)]
        if not spans:
            return
        state = {"url": url}
        try:
            with ThreadPoolExecutor(NUM_WORKERS) as pool:
                for future in [pool.submit(self._span, part, state, span, progress)
                               for span in spans]:
                    future.result()
        finally:
            part.save()

    def _span(self, part: PartialFile, state: dict, span: tuple[int, int],
              progress: Progress | None) -> None:
        last: Exception | None = None
        for attempt in range(NUM_ATTEMPTS):
            todo = part.missing([span])  # what an earlier, cut attempt did not bring
            if not todo:
                return
            start, end = todo[0][0], todo[-1][1]
            try:
                self._get(part, state["url"], start, end, progress)
            except (httpx.HTTPError, RangeError) as exc:
                last = exc
                logger.info("range %d-%d of %s: %s (attempt %d)", start, end,
                            os.path.basename(part.path), exc, attempt + 1)
                if isinstance(exc, _Expired) and self.refresh is not None:
                    state["url"] = self.refresh(state["url"])
                time.sleep(min(2.0, 0.2 * (attempt + 1)))
        if part.missing([span]):
            raise RangeError(f"bytes {span[0]}-{span[1]} of {os.path.basename(part.path)} "
                             f"failed {NUM_ATTEMPTS} times: {last}")

    def _get(self, part: PartialFile, url: str, start: int, end: int,
             progress: Progress | None) -> None:
        headers = {**self.headers_for(url), "Range": f"bytes={start}-{end - 1}",
                   "Accept-Encoding": "identity"}
        with self.client.stream("GET", url, headers=headers, timeout=TIMEOUT) as response:
            if response.status_code in (401, 403, 404, 410):
                raise _Expired(f"HTTP {response.status_code}")
            expected = f"bytes {start}-{end - 1}/{part.size}"
            if response.status_code != 206 or response.headers.get("content-range") != expected:
                raise RangeError(f"asked {expected}, got HTTP {response.status_code} "
                                 f"{response.headers.get('content-range')}")
            length = response.headers.get("content-length")
            if length is not None and int(length) != end - start:
                raise RangeError(f"asked {end - start} bytes, the answer says {length}")
            pos = start
            for chunk in response.iter_raw(CHUNK_BYTES):
                if pos + len(chunk) > end:
                    raise RangeError(f"more than the {end - start} bytes asked")
                part.write(pos, chunk)
                part.record(pos, pos + len(chunk))  # a cut connection keeps this much
                pos += len(chunk)
                if progress is not None:
                    progress.add(len(chunk))
            if pos != end:
                raise RangeError(f"{pos - start} of {end - start} bytes arrived")


class _Expired(RangeError):
    """The URL answered 401/403/404/410: a signed storage URL may have expired."""
