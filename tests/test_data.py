import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from polarc.calibration.data import balanced_shares, iter_documents, iter_tagged, load_sequences

from polarc.errors import PolarcError
from polarc.models.tokenizer import ByteTokenizer

TOK = ByteTokenizer(320)


def _docs(n: int) -> list[str]:
    return [f"Document number {i}. " + "lorem ipsum dolor sit amet " * 8 for i in range(n)]


def test_builtin_split_keeps_heldout_documents_out_of_calibration() -> None:
    calib, heldout = load_sequences("builtin", TOK, seq_len=128, calib_tokens=20000,
                                    heldout_tokens=4000)
    assert calib.ids.shape[1] == heldout.ids.shape[1] == 128
    assert calib.n_tokens <= 20000 and heldout.n_tokens <= 4000
    docs = list(iter_documents("builtin"))
    held_text = TOK.decode(heldout.ids.flatten().tolist())
    calib_text = TOK.decode(calib.ids.flatten().tolist())
    held_docs = [d for i, d in enumerate(docs) if i % 10 == 9]
    # a held-out document's opening words are in the held-out stream, not the calibration one
    probe = held_docs[0][:120]
    assert probe in held_text and probe not in calib_text


def test_split_does_not_depend_on_budget() -> None:
    _, a = load_sequences("builtin", TOK, seq_len=64, calib_tokens=1000, heldout_tokens=2000)
    _, b = load_sequences("builtin", TOK, seq_len=64, calib_tokens=9000, heldout_tokens=2000)
    assert a.ids.equal(b.ids)


@pytest.mark.parametrize("fmt", ["txt", "jsonl", "parquet"])
def test_local_files(tmp_path: Path, fmt: str) -> None:
    docs = _docs(200)
    path = tmp_path / f"data.{fmt}"
    if fmt == "txt":
        path.write_text("\n\n".join(docs))
    elif fmt == "jsonl":
        path.write_text("".join(json.dumps({"id": i, "text": d}) + "\n" for i, d in enumerate(docs)))
    else:
        pq.write_table(pa.table({"text": docs, "n": list(range(200))}), path)
    calib, heldout = load_sequences(str(path), TOK, seq_len=32, calib_tokens=4096,
                                    heldout_tokens=256)
    assert calib.ids.shape[0] > 10 and heldout.ids.shape == (8, 32)
    assert "Document number 0." in TOK.decode(calib.ids[0].tolist())


def test_fewer_tokens_than_one_sequence(tmp_path: Path) -> None:
    path = tmp_path / "tiny.txt"
    path.write_text("too short")
    with pytest.raises(PolarcError, match="fewer than one sequence"):
        load_sequences(str(path), TOK, seq_len=512, calib_tokens=4096, heldout_tokens=512)


def test_no_heldout_document(tmp_path: Path) -> None:
    path = tmp_path / "few.jsonl"
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in _docs(3)))
    with pytest.raises(PolarcError, match="too small"):
        load_sequences(str(path), TOK, seq_len=32, calib_tokens=4096, heldout_tokens=64)


def test_missing_file_and_bad_json(tmp_path: Path) -> None:
    with pytest.raises(PolarcError, match="does not exist"):
        list(iter_documents(str(tmp_path / "nope.jsonl")))
    bad = tmp_path / "bad.jsonl"
    bad.write_text("{not json}\n")
    with pytest.raises(PolarcError, match="bad.jsonl:1 is not valid JSON"):
        list(iter_documents(str(bad)))


def test_broad_mix_has_every_domain_deduplicated_and_licensed() -> None:
    import gzip
    import json
    from collections import Counter

    from polarc.calibration.data import BUILTIN_FILE

    with gzip.open(BUILTIN_FILE.with_name("mix.jsonl.gz"), "rt", encoding="utf-8") as f:
        records = [json.loads(line) for line in f]
    domains = Counter(r["domain"] for r in records)
    assert set(domains) == {"narrative", "expository", "reference", "conversational", "code"}
    assert min(domains.values()) >= 200  # every domain keeps 20+ held-out documents
    assert len({r["text"] for r in records}) == len(records)
    assert all(r["license"] and r["source"] and len(r["text"]) >= 500 for r in records)
    assert not any("BSD-4" in r["license"] for r in records)


def _tagged(tmp_path: Path, per_domain: dict[str, int]) -> Path:
    """A .jsonl dataset whose records carry a domain (sorted by domain, as files often are)."""
    path = tmp_path / "tagged.jsonl"
    lines = [json.dumps({"text": f"{d} document {i}. " + f"{d} words here " * 12, "domain": d})
             for d, n in per_domain.items() for i in range(n)]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_mix_split_holds_out_every_domain_and_balances_them() -> None:
    from collections import Counter

    calib, heldout = load_sequences("mix", TOK, seq_len=128, calib_tokens=5 * 128 * 8,
                                    heldout_tokens=5 * 128 * 2)
    domains = {"narrative", "expository", "reference", "conversational", "code"}
    assert Counter(calib.domains) == dict.fromkeys(domains, 8)
    assert Counter(heldout.domains) == dict.fromkeys(domains, 2)
    # rows are interleaved, not one domain after another
    assert len(set(calib.domains[:5])) == 5
    # the held-out documents of one domain are its every tenth, never calibration text
    code = [t for d, t in iter_tagged("mix") if d == "code"]
    calib_text = TOK.decode(calib.ids.flatten().tolist())
    assert code[9][:100] not in calib_text and code[0][:100] in calib_text


def test_domain_filters(tmp_path: Path) -> None:
    path = _tagged(tmp_path, {"a": 60, "b": 60, "c": 60})
    calib, heldout = load_sequences(str(path), TOK, seq_len=32, calib_tokens=32 * 12,
                                    heldout_tokens=32 * 3, skip_domains=("b",))
    assert set(calib.domains) == set(heldout.domains) == {"a", "c"}
    assert "b words" not in TOK.decode(calib.ids.flatten().tolist())
    _, only = load_sequences(str(path), TOK, seq_len=32, calib_tokens=0, heldout_tokens=64,
                             domains=("b",))
    assert set(only.domains) == {"b"}
    with pytest.raises(PolarcError, match="has no domain nope; its domains: a, b, c"):
        load_sequences(str(path), TOK, seq_len=32, calib_tokens=64, heldout_tokens=32,
                       domains=("nope",))


def test_a_small_domain_gives_what_it_has() -> None:
    assert balanced_shares({"a": 100, "b": 2, "c": 100}, 30) == {"b": 2, "a": 14, "c": 14}
    assert balanced_shares({"a": 3}, 10) == {"a": 3}


def test_tuning_rows_come_from_every_domain(tmp_path: Path) -> None:
    from polarc.calibration.calibrate import split_tune

    path = _tagged(tmp_path, {"a": 80, "b": 80, "c": 80})
    pool, _ = load_sequences(str(path), TOK, seq_len=32, calib_tokens=32 * 60, heldout_tokens=32)
    train, tune = split_tune(pool, 6)
    assert sorted(tune.domains) == ["a", "a", "b", "b", "c", "c"]
    assert train.ids.shape[0] + tune.ids.shape[0] == pool.ids.shape[0]
    both = {tuple(r) for r in train.ids.tolist()} & {tuple(r) for r in tune.ids.tolist()}
    assert not both
