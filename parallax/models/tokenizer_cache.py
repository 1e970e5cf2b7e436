"""GGUF tokenizers converted once per file and kept on disk.

transformers builds a GGUF's tokenizer by converting the vocabulary and merges from the file's
metadata in Python: about 10 s for SmolLM2's 49 152 tokens on the 2-core machine, paid by every
node start and every reassignment. The converted tokenizer is saved (JSON files only, no
pickle) under `$PARALLAX_TOKENIZER_CACHE` (default `~/.cache/parallax/tokenizers/`), keyed by
the file's path, size and modification time and the transformers version; later loads read
it back in well under a second. A cache that cannot be written or read is skipped with a log
line: the tokenizer is then converted from the file, as without a cache.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
from pathlib import Path

logger = logging.getLogger(__name__)

CACHE_FORMAT = 1  # bump when what is stored changes


def cache_root() -> Path:
    """$PARALLAX_TOKENIZER_CACHE, else ~/.cache/parallax/tokenizers."""
    env = os.environ.get("PARALLAX_TOKENIZER_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "parallax" / "tokenizers"


def cache_entry(gguf_path: str) -> Path:
    """Where the tokenizer of this GGUF file (as it is now on disk) is kept."""
    import transformers

    stat = os.stat(gguf_path)
    key = "\0".join((os.path.realpath(gguf_path), str(stat.st_size), str(stat.st_mtime_ns),
                     transformers.__version__, str(CACHE_FORMAT)))
    return cache_root() / hashlib.sha256(key.encode()).hexdigest()[:24]


def load_gguf_tokenizer(gguf_path: str):
    """The GGUF file's transformers tokenizer (with its chat template), from the cache when it
    holds this file's, else converted from the file and stored."""
    from transformers import AutoTokenizer

    entry = cache_entry(gguf_path)
    if (entry / "tokenizer_config.json").is_file():
        try:
            return AutoTokenizer.from_pretrained(str(entry))
        except (OSError, ValueError) as exc:
            logger.warning("tokenizer cache %s unreadable (%s); converting %s again", entry, exc,
                           gguf_path)
    tokenizer = AutoTokenizer.from_pretrained(os.path.dirname(gguf_path),
                                              gguf_file=os.path.basename(gguf_path))
    store(tokenizer, entry)
    return tokenizer


def store(tokenizer, entry: Path) -> None:
    """Save into `entry` atomically (a temporary directory renamed into place), so a process
    that loads concurrently sees the whole tokenizer or none; an existing entry is replaced."""
    try:
        entry.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=entry.parent, prefix=".staging-"))
    except OSError as exc:
        logger.info("tokenizer cache not written (%s)", exc)
        return
    try:
        tokenizer.save_pretrained(str(staging))
        if entry.exists():  # unreadable, or another process just wrote it
            shutil.rmtree(entry, ignore_errors=True)
        os.rename(staging, entry)
    except OSError as exc:
        logger.info("tokenizer cache not written (%s)", exc)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
