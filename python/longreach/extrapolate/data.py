"""Byte-level text for the train-short, test-long study.

The default corpus is the Python standard library's own source code: it is on
every machine that runs this package, needs no download, and is made of long
real documents (many files are tens of kilobytes), which a study of long
contexts needs. ``--data PATH`` replaces it with any text file or folder.

Documents are split into train and held-out sets by a hash of their relative
path, so the split is the same on every run and does not move when files are
added or removed. A single file (``--data file.txt``) cannot be split by file;
its last ``1/HELD_OUT_EVERY`` part is held out instead.

Evaluation uses the same held-out bytes at every length: chunks of
``max_len + 1`` bytes are cut from held-out documents, and at evaluation
length L each chunk is scored as ``max_len / L`` independent segments of L
predictions. A longer L therefore differs only in how much context the model
may use, never in which bytes it predicts.
"""

from __future__ import annotations

import hashlib
import os
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence

import torch

# One document in HELD_OUT_EVERY goes to the held-out set (about 10 %).
HELD_OUT_EVERY = 10
# Folders of an installed Python that hold third-party code or caches, not the stdlib.
_SKIPPED_DIRS = {"site-packages", "dist-packages", "__pycache__"}
# Bytes placed between documents in the training stream (a blank line).
_DOC_SEPARATOR = b"\n\n"


class DataError(ValueError):
    """The text given (or found) cannot be used for the study; the message says why."""


@dataclass(frozen=True)
class Document:
    name: str  # path relative to the corpus root (posix), or the file name
    data: bytes


@dataclass
class Corpus:
    """Train and held-out documents plus a one-line description for reports."""

    source: str
    train: List[Document]
    held_out: List[Document]

    @property
    def train_bytes(self) -> int:
        return sum(len(d.data) for d in self.train)

    @property
    def held_out_bytes(self) -> int:
        return sum(len(d.data) for d in self.held_out)

    def describe(self) -> str:
        return (
            f"{self.source}: {len(self.train)} train documents ({self.train_bytes:,} bytes), "
            f"{len(self.held_out)} held-out documents ({self.held_out_bytes:,} bytes)"
        )


def is_held_out(name: str) -> bool:
    """Deterministic split by a hash of the document's name (stable across runs and machines)."""
    digest = hashlib.sha256(name.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "little") % HELD_OUT_EVERY == 0


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _looks_like_text(data: bytes) -> bool:
    # NUL bytes do not occur in text files; this skips images, archives, compiled files.
    return b"\x00" not in data[:65536]


def _split_by_name(source: str, docs: Sequence[Document]) -> Corpus:
    train = [d for d in docs if not is_held_out(d.name)]
    held = [d for d in docs if is_held_out(d.name)]
    return Corpus(source=source, train=train, held_out=held)


def _read_folder(root: Path, pattern: str) -> List[Document]:
    docs = []
    for path in sorted(root.rglob(pattern)):
        rel = path.relative_to(root)
        if any(part in _SKIPPED_DIRS or part.startswith(".") for part in rel.parts):
            continue
        if not path.is_file():
            continue
        try:
            data = path.read_bytes()
        except OSError:
            continue  # unreadable files inside a folder are skipped, the folder itself was readable
        if data and _looks_like_text(data):
            docs.append(Document(rel.as_posix(), data))
    return docs


def load_stdlib_corpus() -> Corpus:
    """The embedded default: every .py file of the running Python's standard library."""
    root = stdlib_root()
    docs = _read_folder(root, "*.py")
    if not docs:
        raise DataError(f"no Python source files found in the standard library folder {root}")
    return _split_by_name(f"Python standard library sources ({root})", docs)


def load_corpus(path: Optional[str]) -> Corpus:
    """The default corpus (path None) or the text file / folder at ``path``."""
    if path is None:
        return load_stdlib_corpus()
    p = Path(path)
    if p.is_dir():
        try:
            docs = _read_folder(p, "*")
        except OSError as exc:
            raise DataError(f"--data: cannot read folder {path!r}: {exc}") from exc
        if not docs:
            raise DataError(f"--data: folder {path!r} holds no readable text files")
        corpus = _split_by_name(f"folder {path}", docs)
        if not corpus.train or not corpus.held_out:
            raise DataError(
                f"--data: folder {path!r} has {len(docs)} text files, too few to split into train "
                f"and held-out sets by file (about 1 in {HELD_OUT_EVERY} is held out); "
                "give more files or one large text file"
            )
        return corpus
    if p.exists():
        try:
            data = p.read_bytes()
        except OSError as exc:
            raise DataError(f"--data: cannot read file {path!r}: {exc}") from exc
        if not data:
            raise DataError(f"--data: file {path!r} is empty")
        if not _looks_like_text(data):
            raise DataError(f"--data: file {path!r} does not look like text (it contains NUL bytes)")
        cut = len(data) - len(data) // HELD_OUT_EVERY
        return Corpus(
            source=f"file {path} (last 1/{HELD_OUT_EVERY} held out)",
            train=[Document(p.name + ":train", data[:cut])],
            held_out=[Document(p.name + ":held-out", data[cut:])],
        )
    raise DataError(f"--data: {path!r} does not exist or is not a readable file or folder")


def training_stream(corpus: Corpus) -> torch.Tensor:
    """All training documents joined into one uint8 tensor of bytes."""
    joined = _DOC_SEPARATOR.join(d.data for d in corpus.train)
    return torch.frombuffer(bytearray(joined), dtype=torch.uint8)


class BatchSampler:
    """Random training windows of ``length + 1`` bytes (inputs and shifted targets).

    Has its own generator, so every scheme trained with the same seed sees the
    very same batches in the same order.
    """

    def __init__(self, stream: torch.Tensor, length: int, batch_size: int, seed: int):
        if stream.numel() < length + 2:
            raise DataError(
                f"training text has {stream.numel()} bytes, fewer than the sequence length + 2 = {length + 2} "
                f"(--train-len, or --finetune-len for the fine-tunes)"
            )
        self.stream = stream
        self.length = length
        self.batch_size = batch_size
        self.generator = torch.Generator().manual_seed(seed)

    def next(self) -> tuple:
        starts = torch.randint(0, self.stream.numel() - self.length - 1, (self.batch_size,), generator=self.generator)
        offsets = torch.arange(self.length + 1)
        window = self.stream[starts[:, None] + offsets].long()
        return window[:, :-1], window[:, 1:]


def evaluation_chunks(corpus: Corpus, max_len: int, num_chunks: int) -> torch.Tensor:
    """``num_chunks`` held-out chunks of ``max_len + 1`` bytes, as a (num_chunks, max_len + 1) tensor.

    One chunk per document, taken from the middle of each long-enough held-out
    document (file starts are often look-alike licence headers), documents in
    a fixed order given by their name's hash. Raises ValueError when the
    held-out text has too few long documents.
    """
    need = max_len + 1
    long_docs = [d for d in corpus.held_out if len(d.data) >= need]
    long_docs.sort(key=lambda d: hashlib.sha256(d.name.encode("utf-8")).digest())
    if len(long_docs) < num_chunks:
        # A lone long document (the single-file case) may give several chunks.
        chunks = []
        for d in long_docs:
            for start in range(0, len(d.data) - need + 1, need):
                chunks.append(d.data[start:start + need])
        if len(chunks) < num_chunks:
            raise DataError(
                f"held-out text gives only {len(chunks)} chunk(s) of {need} bytes (the longest "
                f"evaluation length + 1), but --eval-chunks asks for {num_chunks}; use fewer chunks, "
                "shorter lengths or more text"
            )
        # Spread the picks over the whole held-out text rather than its beginning.
        stride = len(chunks) / num_chunks
        picked = [chunks[int(i * stride)] for i in range(num_chunks)]
    else:
        picked = []
        for d in long_docs[:num_chunks]:
            start = (len(d.data) - need) // 2
            picked.append(d.data[start:start + need])
    return torch.tensor([list(c) for c in picked], dtype=torch.long)


def segments(chunks: torch.Tensor, length: int) -> tuple:
    """Split (N, max_len + 1) chunks into independent (inputs, targets) segments of ``length``.

    Returns two (N * max_len / length, length) tensors; segment s of a chunk
    predicts bytes s*length+1 .. (s+1)*length from bytes s*length .. (s+1)*length-1.
    """
    n, width = chunks.shape
    max_len = width - 1
    if max_len % length:
        raise DataError(f"evaluation length {length} does not divide the longest length {max_len}")
    per = max_len // length
    inputs = chunks[:, :-1].reshape(n * per, length)
    targets = chunks[:, 1:].reshape(n * per, length)
    return inputs, targets
