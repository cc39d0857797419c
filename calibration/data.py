"""Calibration text: read a dataset, split off held-out text, cut fixed-length token sequences.

Documents may carry a domain (the builtin mix's records do; a .jsonl file's records may, in a
"domain" field). Documents are assigned by position within their domain: every tenth (index %
10 == 9) is held out and never seen by calibration; `polarc eval` reads only those. The split
therefore does not depend on `--tokens`, and any calibration on a dataset leaves the same
held-out text, in every domain, for evaluation. Each split takes the same number of tokens
from every domain (as far as each has them), so no domain dominates the routers or the plan.
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
MIX = "mix"
MIX_FILE = Path(__file__).with_name("mix.jsonl.gz")
PACKAGED = {BUILTIN: BUILTIN_FILE, MIX: MIX_FILE}
HELDOUT_EVERY = 10
CHUNK_CHARS = 2000
# A paragraph longer than this (a file that is one long line, say) is cut into CHUNK_CHARS
# pieces, so every document tokenizes in bounded memory. Shorter ones stay whole: cutting
# them would move the builtin corpus's document boundaries, and with them its held-out split.
LONG_PARAGRAPH = 200_000


@dataclass
class Sequences:
    """Token sequences [n, seq_len] (int64) from one split of a dataset, and each row's
    domain ("" for text without one). Rows of different domains are interleaved."""

    ids: torch.Tensor
    dataset: str
    split: str
    domains: list[str]

    @property
    def n_tokens(self) -> int:
        return self.ids.numel()

    def rows(self, rows: torch.Tensor) -> Sequences:
        return Sequences(self.ids[rows], self.dataset, self.split,
                         [self.domains[int(i)] for i in rows])


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


def _domain_field(record: dict) -> str:
    domain = record.get("domain")
    return domain if isinstance(domain, str) else ""


def iter_documents(dataset: str) -> Iterator[str]:
    """Documents of `dataset`: "builtin", "mix", a .txt/.jsonl/.parquet file, or a hub dataset."""
    for _, text in iter_tagged(dataset):
        yield text


def iter_tagged(dataset: str) -> Iterator[tuple[str, str]]:
    """(domain, document) pairs of `dataset` (domain "" where the text has none)."""
    if dataset in PACKAGED:
        with gzip.open(PACKAGED[dataset], "rt", encoding="utf-8") as f:
            for line in f:
                record = json.loads(line)
                for chunk in _chunks(record["text"]):
                    yield _domain_field(record), chunk
        return
    path = Path(dataset)
    if path.exists():
        yield from _iter_file(path)
        return
    if path.suffix in (".txt", ".jsonl", ".json", ".parquet") or dataset.startswith((".", "/")):
        raise PolarcError(f"dataset file {dataset} does not exist")
    for chunk in _iter_hub(dataset):
        yield "", chunk


def _iter_file(path: Path) -> Iterator[tuple[str, str]]:
    try:
        if path.suffix == ".txt":
            for block in _text_blocks(path):
                for chunk in _chunks(block):
                    yield "", chunk
        elif path.suffix in (".jsonl", ".json"):
            with open(path, encoding="utf-8") as f:
                for n, line in enumerate(f, 1):
                    if line.strip():
                        try:
                            record = json.loads(line)
                        except json.JSONDecodeError:
                            raise PolarcError(f"{path}:{n} is not valid JSON") from None
                        if not isinstance(record, dict):
                            raise PolarcError(f"{path}:{n} is not a JSON object")
                        for chunk in _chunks(_text_field(record, str(path))):
                            yield _domain_field(record), chunk
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
                        for chunk in _chunks(value):
                            yield "", chunk
        else:
            raise PolarcError(f"unsupported dataset file {path}",
                              hint="use .txt, .jsonl or .parquet, or 'mix'")
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
                          hint="offline? use a local .txt/.jsonl/.parquet file or 'mix'"
                          ) from None
    for record in ds:
        yield from _chunks(_text_field(record, spec))


def balanced_shares(available: dict[str, int], want: int) -> dict[str, int]:
    """How many of `want` to take from each domain: equal shares, and what a small domain
    cannot give spread over the others."""
    shares: dict[str, int] = {}
    left = want
    order = sorted(available, key=lambda d: available[d])
    for i, domain in enumerate(order):
        shares[domain] = min(available[domain], left // (len(order) - i))
        left -= shares[domain]
    return shares


def load_sequences(
    dataset: str,
    tokenizer: Tokenizer,
    *,
    seq_len: int,
    calib_tokens: int,
    heldout_tokens: int,
    split: bool = True,
    domains: tuple[str, ...] = (),
    skip_domains: tuple[str, ...] = (),
) -> tuple[Sequences, Sequences]:
    """(calibration, held-out) sequences: up to `calib_tokens` / `heldout_tokens` each, the
    same number of tokens from each domain as far as each has them (only `domains` when given,
    none of `skip_domains`). Without `split` every document is held-out text (a dataset given
    only for evaluation).

    Raises a `PolarcError` when the dataset yields less than one sequence overall, or too
    little to give both splits a sequence, or when a named domain is not in it.
    """
    if seq_len < 2:
        raise PolarcError(f"--seq-len must be at least 2, got {seq_len}")
    want = {"calib": calib_tokens, "heldout": heldout_tokens}
    streams: dict[str, dict[str, list[int]]] = {"calib": {}, "heldout": {}}
    seen: dict[str, int] = {}  # documents per domain, kept or not
    sep = [tokenizer.eos_id] if tokenizer.eos_id is not None else []

    def enough() -> bool:
        # Text with domains is read to its end (only parsed, not tokenized, once a domain's
        # streams are full): a later record may start a domain not seen yet, and a file
        # sorted by domain would otherwise give only its first.
        return set(seen) == {""} and all(len(streams[s].get("", [])) >= want[s] for s in streams)

    for domain, doc in iter_tagged(dataset):
        i = seen.get(domain, 0)
        seen[domain] = i + 1
        if _skipped(domain, domains, skip_domains):
            continue
        part = "heldout" if not split or i % HELDOUT_EVERY == HELDOUT_EVERY - 1 else "calib"
        stream = streams[part].setdefault(domain, [])
        if len(stream) >= want[part]:
            if enough():
                break
            continue
        stream.extend(tokenizer.encode(doc) + sep)
    unknown = sorted((set(domains) | set(skip_domains)) - set(seen))
    if unknown:
        have = ", ".join(sorted(d for d in seen if d)) or "none (its text has no domains)"
        raise PolarcError(f"dataset {dataset!r} has no domain {', '.join(unknown)}; "
                          f"its domains: {have}")
    total = sum(len(t) for part in streams.values() for t in part.values())
    if total < seq_len:
        raise PolarcError(f"dataset {dataset!r} yields only {total} tokens, fewer than one "
                          f"sequence of --seq-len {seq_len}",
                          hint="give more text or a smaller --seq-len")
    out = []
    for part in ("calib", "heldout"):
        per_domain = streams[part]
        rows_by_domain = balanced_shares(
            {d: len(t) // seq_len for d, t in per_domain.items()}, want[part] // seq_len)
        if sum(rows_by_domain.values()) == 0 and want[part] > 0:
            raise PolarcError(f"dataset {dataset!r} is too small: its {part} split (every "
                              f"{HELDOUT_EVERY}th document is held out) has less than one "
                              f"sequence of {seq_len} tokens",
                              hint="give more text (at least ten documents) or a smaller --seq-len")
        # Interleave the domains' rows, so any contiguous or evenly spread pick mixes them.
        order = sorted(((r / n, d, r) for d, n in rows_by_domain.items() for r in range(n)))
        ids = torch.tensor([per_domain[d][r * seq_len:(r + 1) * seq_len] for _, d, r in order],
                           dtype=torch.long).view(len(order), seq_len)
        out.append(Sequences(ids=ids, dataset=dataset, split=part,
                             domains=[d for _, d, _ in order]))
    return out[0], out[1]


def _skipped(domain: str, only: tuple[str, ...], skip: tuple[str, ...]) -> bool:
    return (bool(only) and domain not in only) or domain in skip
