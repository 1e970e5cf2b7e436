"""GGUF files on the Hugging Face hub: `OWNER/REPO:QUANT`, `OWNER/REPO/FILE.gguf`, and the
pinned form `OWNER/REPO@COMMIT/FILE.gguf` the scheduler hands to every node.

The scheduler resolves a tag or file name once, against one commit of the repo listing
(`resolve_pinned`), so every node loads the same upload. A node then fetches each part's
header and tensor table with a few range requests (`ensure_headers`), and only the bytes of
the tensors its layers need (`ensure_shard`), into a sparse local copy under the HF cache
(range_cache.PartialFile) that the GGUF loader opens like a whole file. Tokenizer and chat
template come from the header's metadata. `HF_HUB_OFFLINE=1` uses only the cache.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import quote, urljoin, urlsplit

import httpx

from parallax.models.gguf_table import (
    SPLIT_NAME,
    HeaderTruncated,
    parse_header,
    split_part_names,
)
from parallax.models.range_cache import TIMEOUT, PartialFile, Progress, RangeFetcher, total

logger = logging.getLogger(__name__)

_REPO = r"(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)"
PINNED = re.compile(rf"^{_REPO}@(?P<rev>[0-9a-f]{{40}})/(?P<file>[\w./-]+\.gguf)$")
TAGGED = re.compile(rf"^{_REPO}:(?P<tag>[\w.-]+)$")
FILE_FORM = re.compile(rf"^{_REPO}(?:@(?P<rev>[\w.-]+))?/(?P<file>[\w./-]+\.gguf)$")
# a tokenizer's metadata alone can be megabytes: grow by a quarter (at least the first size)
# until the header parses, so at most about a quarter of it is fetched beyond its end
HEADER_FIRST_BYTES = 64 * 2**10
HEADER_MAX_BYTES = 512 * 2**20
MAX_REDIRECTS = 5
HEAD_TTL_S = 600.0
_HEADS: dict[str, tuple[float, RemoteFile]] = {}  # resolve URL -> (when, what HEAD said)


@dataclass(frozen=True)
class HubGGUF:
    """One GGUF (all its split parts) at one commit of a hub repo."""

    repo_id: str
    revision: str  # a commit sha once pinned
    files: tuple[str, ...]  # parts in order (one for an unsplit file)

    @property
    def model(self) -> str:
        """The pinned model string nodes load."""
        return f"{self.repo_id}@{self.revision}/{self.files[0]}"

    @property
    def name(self) -> str:
        """Short display name: `OWNER/REPO/FILE` without `.gguf` or the split suffix."""
        match = SPLIT_NAME.match(self.files[0])
        stem = match.group("stem") if match else self.files[0].removesuffix(".gguf")
        return f"{self.repo_id}/{stem}"


def is_hub_gguf(model: str) -> bool:
    """Whether `model` names a hub GGUF (pinned, `REPO:TAG` or `REPO/FILE.gguf`); a local
    path that exists is never one."""
    if os.path.exists(os.path.expanduser(model)):
        return False
    return bool(PINNED.match(model) or TAGGED.match(model) or FILE_FORM.match(model))


def pinned(model: str) -> HubGGUF | None:
    """The HubGGUF of a pinned model string (no network), else None."""
    match = PINNED.match(model)
    if not match:
        return None
    return HubGGUF(match["repo"], match["rev"], tuple(split_part_names(match["file"])))


def display_name(model: str) -> str:
    """`HubGGUF.name` for a pinned string; the string itself for the other hub forms."""
    hub = pinned(model)
    return hub.name if hub is not None else model


# ---- the hub: endpoint, token, offline mode, cache ---------------------------------------------


def endpoint() -> str:
    from huggingface_hub import constants

    return (os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")


def offline() -> bool:
    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return value.strip().lower() in ("1", "true", "yes", "on")


def cache_dir() -> str:
    """HF_HUB_CACHE (or HF_HOME/hub), read now: tests give each node its own."""
    if os.environ.get("HF_HUB_CACHE"):
        return os.path.expanduser(os.environ["HF_HUB_CACHE"])
    if os.environ.get("HF_HOME"):
        return os.path.join(os.path.expanduser(os.environ["HF_HOME"]), "hub")
    from huggingface_hub import constants

    return constants.HF_HUB_CACHE


def repo_cache(repo_id: str) -> str:
    """Our partial GGUF copies live beside huggingface_hub's own folders of the repo."""
    return os.path.join(cache_dir(), "models--" + repo_id.replace("/", "--"), "parallax-gguf")


def local_path(hub: HubGGUF, filename: str) -> str:
    return os.path.join(repo_cache(hub.repo_id), hub.revision, filename)


def headers_for(url: str) -> dict[str, str]:
    """The user's token goes to the hub endpoint only, never to a storage host."""
    from huggingface_hub import get_token

    headers = {"User-Agent": "parallax"}
    token = get_token()
    if token and urlsplit(url).netloc == urlsplit(endpoint()).netloc:
        headers["Authorization"] = f"Bearer {token}"
    return headers


# ---- scheduler: tag or file name -> one commit and its files -------------------------------------


def resolve_pinned(model: str) -> HubGGUF:
    """Resolve `REPO:TAG`, `REPO/FILE.gguf` or a pinned string to one commit and file list.

    Uses the repo listing (model info at the revision, `main` unless `REPO@REV/FILE`); offline,
    the listing cached by an earlier resolution. Raises ValueError with what to pass instead.
    """
    hub = pinned(model)
    if hub is not None:
        return hub
    tagged, file_form = TAGGED.match(model), FILE_FORM.match(model)
    if not (tagged or file_form):
        raise ValueError(f"{model!r} is neither OWNER/REPO:QUANT nor OWNER/REPO/FILE.gguf")
    repo = (tagged or file_form)["repo"]
    revision = (file_form["rev"] if file_form else None) or "main"
    sha, files = _listing(repo, revision)
    ggufs = [f for f in files if f.endswith(".gguf")]
    if file_form:
        name = file_form["file"]
        parts = split_part_names(name)
        lacking = [p for p in parts if p not in files]
        if lacking:
            raise ValueError(f"{repo} at {revision} has no file {lacking[0]}; its GGUF files: "
                             f"{', '.join(ggufs) or 'none'}")
        return HubGGUF(repo, sha, tuple(parts))
    return HubGGUF(repo, sha, tuple(_pick_by_tag(repo, tagged["tag"], ggufs)))


def _stem(filename: str) -> str:
    match = SPLIT_NAME.match(filename)
    return match.group("stem") if match else filename.removesuffix(".gguf")


def quant_tag(filename: str) -> str:
    """The quantization tag a file name ends with (`Qwen3-8B-Q4_K_M.gguf` -> `Q4_K_M`)."""
    return re.split(r"[-./]", _stem(filename))[-1]


def _pick_by_tag(repo: str, tag: str, ggufs: list[str]) -> list[str]:
    """The parts of the one GGUF whose name ends with `tag` (case-insensitive)."""
    candidates = [f for f in ggufs if not os.path.basename(f).lower().startswith("mmproj")
                  and (SPLIT_NAME.match(f) is None or SPLIT_NAME.match(f)["part"] == "00001")]
    wanted = tag.lower()
    matches = [f for f in candidates if _stem(f).lower() == wanted
               or re.search(rf"[-./_]{re.escape(wanted)}$", _stem(f).lower())]
    tags = sorted({quant_tag(f) for f in candidates}, key=str.lower)
    if not matches:
        raise ValueError(f"{repo} has no GGUF for tag {tag!r}; available tags: "
                         f"{', '.join(tags) or 'none (no .gguf files)'}")
    if len(matches) > 1:
        raise ValueError(f"tag {tag!r} of {repo} is ambiguous ({', '.join(matches)}): pass "
                         f"the file as {repo}/FILE.gguf")
    parts = split_part_names(matches[0])
    lacking = [p for p in parts if p not in ggufs]
    if lacking:
        raise ValueError(f"{repo}: split GGUF {matches[0]} lacks its part {lacking[0]}")
    return parts


def _listing(repo: str, revision: str) -> tuple[str, list[str]]:
    """(commit sha, file names) of `repo` at `revision`; cached for offline use."""
    record = os.path.join(repo_cache(repo), "listings", quote(revision, safe="") + ".json")
    if offline():
        try:
            with open(record) as f:
                data = json.load(f)
            return data["sha"], data["files"]
        except (OSError, ValueError, KeyError) as exc:
            raise ValueError(f"HF_HUB_OFFLINE is set and {repo} at {revision} was never listed "
                             f"here ({record} is missing): run once online, or pass a pinned "
                             "OWNER/REPO@COMMIT/FILE.gguf that is cached") from exc
    from huggingface_hub import HfApi

    try:
        info = HfApi(endpoint=endpoint()).model_info(repo, revision=revision, timeout=30)
    except Exception as exc:  # network, 404, gated repo...
        raise ValueError(f"cannot list {repo} at {revision} on {endpoint()}: {exc}") from exc
    files = [s.rfilename for s in info.siblings or []]
    if not info.sha:
        raise ValueError(f"{endpoint()} gave no commit for {repo} at {revision}")
    os.makedirs(os.path.dirname(record), exist_ok=True)
    with open(record + ".tmp", "w") as f:
        json.dump({"sha": info.sha, "files": files}, f)
    os.replace(record + ".tmp", record)
    return info.sha, files


# ---- nodes: headers, then the tensors of the shard ------------------------------------------------


@dataclass
class RemoteFile:
    """One part: where its bytes are (after the hub's redirect), its size and etag."""

    url: str
    size: int
    etag: str


class HubClient:
    """HTTP to the hub for one model: HEAD resolve URLs (following the redirect to the storage
    URL once), then range GETs straight from storage."""

    def __init__(self, hub: HubGGUF) -> None:
        self.hub = hub
        self.http = httpx.Client(timeout=TIMEOUT, follow_redirects=False)
        self.fetcher = RangeFetcher(self.http, headers_for, refresh=self._refresh)
        self._resolved: dict[str, str] = {}  # storage url -> resolve url

    def close(self) -> None:
        self.http.close()

    def resolve_url(self, filename: str) -> str:
        return (f"{endpoint()}/{self.hub.repo_id}/resolve/{self.hub.revision}/"
                f"{quote(filename)}")

    def head(self, filename: str) -> RemoteFile:
        """Size, etag and data URL of a part (remembered a few minutes: signed storage URLs
        last about an hour, and a load asks for each part twice, header then tensors)."""
        url = self.resolve_url(filename)
        known = _HEADS.get(url)
        if known is not None and time.monotonic() - known[0] < HEAD_TTL_S:
            remote = known[1]
        else:
            try:
                remote = self._head(url)
            except (httpx.HTTPError, KeyError, ValueError) as exc:
                raise ValueError(f"cannot reach {filename} of {self.hub.repo_id}@"
                                 f"{self.hub.revision} on {endpoint()}: {exc}") from exc
            _HEADS[url] = (time.monotonic(), remote)
        self._resolved[remote.url] = url  # to resolve again when the storage URL expires
        return remote

    def _head(self, url: str) -> RemoteFile:
        filename = _filename_of(url, self.hub)
        for _ in range(MAX_REDIRECTS):
            response = self.http.head(url, headers={**headers_for(url),
                                                    "Accept-Encoding": "identity"})
            linked = response.headers.get("x-linked-size")
            if response.is_redirect and linked is not None:  # LFS: storage URL, real size
                target = urljoin(url, response.headers["location"])
                etag = response.headers.get("x-linked-etag") or response.headers.get("etag", "")
                return RemoteFile(target, int(linked), _etag(etag))
            if response.is_redirect:  # a renamed repo: follow on the hub
                url = urljoin(url, response.headers["location"])
                continue
            if response.status_code != 200:
                raise ValueError(f"{filename} of {self.hub.repo_id}@{self.hub.revision}: HTTP "
                                 f"{response.status_code} from {url}")
            etag = response.headers.get("x-linked-etag") or response.headers.get("etag", "")
            size = response.headers.get("x-linked-size") or response.headers["content-length"]
            return RemoteFile(url, int(size), _etag(etag))
        raise ValueError(f"{filename}: more than {MAX_REDIRECTS} redirects from the hub")

    def _refresh(self, url: str) -> str:
        """A storage URL that stopped answering (signed URLs expire): resolve it again."""
        start = self._resolved.get(url)
        if start is None:
            return url
        _HEADS.pop(start, None)
        return self.head(_filename_of(start, self.hub)).url


def _etag(value: str) -> str:
    return value.strip().removeprefix("W/").strip('"')


def _filename_of(resolve_url: str, hub: HubGGUF) -> str:
    from urllib.parse import unquote

    marker = f"/resolve/{hub.revision}/"
    return unquote(resolve_url.split(marker, 1)[1])


def _open_part(client: HubClient | None, hub: HubGGUF, filename: str) -> tuple[PartialFile, str]:
    """The part's PartialFile (and its data URL; "" offline), created or reused."""
    path = local_path(hub, filename)
    if client is None:
        part = PartialFile.existing(path)
        if part is None:
            raise ValueError(f"HF_HUB_OFFLINE is set and {hub.repo_id}@{hub.revision}/{filename} "
                             f"is not cached ({path}): run once online")
        return part, ""
    remote = client.head(filename)
    return PartialFile(path, remote.size, remote.etag), remote.url


def _fetch_header(client: HubClient | None, part: PartialFile, url: str) -> int:
    """Fetch the header (metadata + tensor table) of one part; returns where its data starts."""
    length = min(part.size, HEADER_FIRST_BYTES)
    while True:
        if part.missing([(0, length)]):
            if client is None:
                raise ValueError(f"HF_HUB_OFFLINE is set and the header of {part.path} is not "
                                 "cached: run once online")
            client.fetcher.fill(part, url, [(0, length)])
        try:
            return parse_header(part.read(0, length), part.path)[2]
        except HeaderTruncated:
            if length >= min(part.size, HEADER_MAX_BYTES):
                raise ValueError(f"{part.path}: no complete GGUF header in its first "
                                 f"{length} bytes") from None
            length = min(part.size, max(length + HEADER_FIRST_BYTES, length * 5 // 4))


def ensure_headers(model: str) -> str:
    """Fetch (or find cached) the header of every part of a hub GGUF; returns the local path
    of its first part, which open_reader / load_tokenizer / sizing read like a whole file."""
    hub = resolve_pinned(model)
    client = None if offline() else HubClient(hub)
    try:
        for filename in hub.files:
            part, url = _open_part(client, hub, filename)
            _fetch_header(client, part, url)
    finally:
        if client is not None:
            client.close()
    return local_path(hub, hub.files[0])


def ensure_shard(model: str, owns: Callable[[str], bool],
                 report: Callable[[Progress], None] | None = None) -> str:
    """Fetch the bytes of every tensor whose HF name `owns` accepts (after the headers);
    returns the local path of the first part. Already cached ranges are not fetched again.
    With every part complete, each is checked against the hub's sha256 (X-Linked-Etag)."""
    from parallax.models.gguf import hf_name, open_reader

    first = ensure_headers(model)
    hub = resolve_pinned(model)
    wanted: dict[str, list[tuple[int, int]]] = {}
    for tensor in open_reader(first).tensors:
        name = hf_name(tensor.name)
        if name is not None and owns(name):
            span = (int(tensor.data_offset), int(tensor.data_offset) + int(tensor.n_bytes))
            wanted.setdefault(tensor.path, []).append(span)
    client = None if offline() else HubClient(hub)
    try:
        parts = {local_path(hub, f): _open_part(client, hub, f) for f in hub.files}
        missing = {path: parts[path][0].missing(spans) for path, spans in wanted.items()}
        lacking = sum(total(m) for m in missing.values())
        if lacking and client is None:
            names = [os.path.basename(p) for p, m in missing.items() if m]
            raise ValueError(f"HF_HUB_OFFLINE is set and {lacking / 1e6:.1f} MB of this shard's "
                             f"tensors are not cached ({', '.join(names)} of {hub.model}): "
                             "run once online")
        progress = Progress(hub.name, lacking, lambda p: _say(report, p))
        for path, spans in wanted.items():
            part, url = parts[path]
            if lacking:
                client.fetcher.fill(part, url, spans, progress)
            if not part.verify_hash():
                raise ValueError(f"{os.path.basename(path)}: sha256 differs from the hub's "
                                 "X-Linked-Etag; the cached copy was dropped, load again")
        if lacking:
            progress.finish()
    finally:
        if client is not None:
            client.close()
    return first


def _say(report: Callable[[Progress], None] | None, progress: Progress) -> None:
    logger.info("%s", progress.text())
    if report is not None:
        report(progress)
