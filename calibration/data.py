"""Calibration text: read a dataset, split off held-out text, cut fixed-length token sequences.

Documents are assigned by position: every tenth (index % 10 == 9) is held out and never seen
by calibration; `polarc eval` reads only those. The split therefore does not depend on
`--tokens`, and any calibration on a dataset leaves the same held-out text for evaluation.
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from polarc.errors import PolarcError, first_line
from polarc.models.tokenizer import Tokenizer

BUILTIN = "builtin"
BUILTIN_FILE = Path(__file__).with_name("builtin_corpus.jsonl.gz")
HELDOUT_EVERY = 10
CHUNK_CHARS = 2000
# A paragraph longer than this (a file that is one long line, say) is cut into CHUNK_CHARS
# pieces, so every document tokenizes in bounded memory. Shorter ones stay whole: cutting
# them would move the builtin corpus's document boundaries, and with them its held-out split.
LONG_PARAGRAPH = 200_000


@dataclass
class Sequences:
    """Token sequences [n, seq_len] (int64) from one split of a dataset."""

    ids: torch.Tensor
    dataset: str
    split: str

    @property
    def n_tokens(self) -> int:
        return self.ids.numel()


def _pieces(text: str) -> Iterator[str]:
    """Paragraphs of `text`; one longer than LONG_PARAGRAPH is cut into pieces of at most
    CHUNK_CHARS, each at the last whitespace before the limit (or at the limit)."""
    for para in text.split("\n\n"):
        if len(para) > LONG_PARAGRAPH:
            while len(para) > CHUNK_CHARS:
                cut = max(para.rfind(" ", 0, CHUNK_CHARS), para.rfind("\n", 0, CHUNK_CHARS))
                cut = cut if cut > CHUNK_CHARS // 2 else CHUNK_CHARS
                yield para[:cut]
                para = para[cut:]
        yield para


def _chunks(text: str) -> Iterator[str]:
    """Paragraph-aligned documents of about CHUNK_CHARS (a longer paragraph is a document of
    its own), so that held-out assignment interleaves."""
    buf: list[str] = []
    size = 0
    for para in _pieces(text):
        if buf and size + len(para) > CHUNK_CHARS:
            yield "\n\n".join(buf)
            buf, size = [], 0
        buf.append(para)
        size += len(para) + 2
    if buf and "".join(buf).strip():
        yield "\n\n".join(buf)


def _text_blocks(path: Path, size: int = 1 << 20) -> Iterator[str]:
    """A text file in blocks that end at a paragraph break (or hold a whole oversized one):
    memory stays bounded whatever the file's layout."""
    rest = ""
    with open(path, encoding="utf-8") as f:
        while block := f.read(size):
            rest += block
            cut = rest.rfind("\n\n")
            if cut >= 0:
                yield rest[:cut]
                rest = rest[cut + 2:]
            elif len(rest) > 4 * size:  # no paragraph break for a long way: cut anyway
                yield rest
                rest = ""
    yield rest


def _text_field(record: dict, where: str) -> str:
    if isinstance(record.get("text"), str):
        return record["text"]
    for value in record.values():
        if isinstance(value, str):
            return value
    raise PolarcError(f"{where}: a record has no text field", hint='use a "text" column')


def iter_documents(dataset: str) -> Iterator[str]:
    """Documents of `dataset`: "builtin", a .txt/.jsonl/.parquet file, or a hub dataset."""
    if dataset == BUILTIN:
        with gzip.open(BUILTIN_FILE, "rt", encoding="utf-8") as f:
            for line in f:
                yield from _chunks(json.loads(line)["text"])
        return
    path = Path(dataset)
    if path.exists():
        yield from _iter_file(path)
        return
    if path.suffix in (".txt", ".jsonl", ".json", ".parquet") or dataset.startswith((".", "/")):
        raise PolarcError(f"dataset file {dataset} does not exist")
    yield from _iter_hub(dataset)


def _iter_file(path: Path) -> Iterator[str]:
    try:
        if path.suffix == ".txt":
            for block in _text_blocks(path):
                yield from _chunks(block)
        elif path.suffix in (".jsonl", ".json"):
            with open(path, encoding="utf-8") as f:
                for n, line in enumerate(f, 1):
                    if line.strip():
                        try:
                            record = json.loads(line)
                        except json.JSONDecodeError:
                            raise PolarcError(f"{path}:{n} is not valid JSON") from None
                        yield from _chunks(_text_field(record, str(path)))
        elif path.suffix == ".parquet":
            import pyarrow.parquet as pq

            table = pq.ParquetFile(path)
            schema = table.schema_arrow
            col = "text" if "text" in schema.names else next(
                (n for n in schema.names if str(schema.field(n).type) in ("string", "large_string")),
                None)
            if col is None:
                raise PolarcError(f"{path} has no text column")
            for batch in table.iter_batches(batch_size=256, columns=[col]):
                for value in batch.column(0).to_pylist():
                    if isinstance(value, str):
                        yield from _chunks(value)
        else:
            raise PolarcError(f"unsupported dataset file {path}",
                              hint="use .txt, .jsonl or .parquet, or 'builtin'")
    except UnicodeDecodeError:
        raise PolarcError(f"{path} is not UTF-8 text") from None
    except PolarcError:
        raise
    except Exception as exc:
        raise PolarcError(f"cannot read {path}: {first_line(exc)}") from None


def _iter_hub(spec: str) -> Iterator[str]:
    parts = spec.split(":")
    name, config = parts[0], (parts[1] or None) if len(parts) > 1 else None
    split = parts[2] if len(parts) > 2 else "train"
    try:
        import datasets
    except ImportError:
        raise PolarcError(f"{spec!r} is not a local file; hub datasets need `datasets`",
                          hint="pip install datasets (and be online), or give a local file") from None
    try:
        ds = datasets.load_dataset(name, config, split=split, streaming=True)
    except Exception as exc:
        raise PolarcError(f"cannot load hub dataset {spec!r}: {first_line(exc)}",
                          hint="offline? use a local .txt/.jsonl/.parquet file or 'builtin'"
                          ) from None
    for record in ds:
        yield from _chunks(_text_field(record, spec))


def load_sequences(
    dataset: str,
    tokenizer: Tokenizer,
    *,
    seq_len: int,
    calib_tokens: int,
    heldout_tokens: int,
    split: bool = True,
) -> tuple[Sequences, Sequences]:
    """(calibration, held-out) sequences: up to `calib_tokens` / `heldout_tokens` each.
    Without `split` every document is held-out text (a dataset given only for evaluation).

    Raises a `PolarcError` when the dataset yields less than one sequence overall, or too
    little to give both splits a sequence.
    """
    if seq_len < 2:
        raise PolarcError(f"--seq-len must be at least 2, got {seq_len}")
    streams: dict[str, list[int]] = {"calib": [], "heldout": []}
    want = {"calib": calib_tokens, "heldout": heldout_tokens}
    sep = [tokenizer.eos_id] if tokenizer.eos_id is not None else []
    for i, doc in enumerate(iter_documents(dataset)):
        part = "heldout" if not split or i % HELDOUT_EVERY == HELDOUT_EVERY - 1 else "calib"
        if len(streams[part]) >= want[part]:
            if all(len(streams[s]) >= want[s] for s in streams):
                break
            continue
        streams[part].extend(tokenizer.encode(doc) + sep)
    total = sum(len(s) for s in streams.values())
    if total < seq_len:
        raise PolarcError(f"dataset {dataset!r} yields only {total} tokens, fewer than one "
                          f"sequence of --seq-len {seq_len}",
                          hint="give more text or a smaller --seq-len")
    out = []
    for part in ("calib", "heldout"):
        n = min(len(streams[part]), want[part]) // seq_len
        if n == 0 and want[part] > 0:
            raise PolarcError(f"dataset {dataset!r} is too small: its {part} split (every "
                              f"{HELDOUT_EVERY}th document is held out) has less than one "
                              f"sequence of {seq_len} tokens",
                              hint="give more text (at least ten documents) or a smaller --seq-len")
        ids = torch.tensor(streams[part][: n * seq_len], dtype=torch.long).view(n, seq_len)
        out.append(Sequences(ids=ids, dataset=dataset, split=part))
    return out[0], out[1]
