"""``data/sources.py``: the files of a source (``stdlib``, a text file / directory / glob,
``jsonl``), their stable train/eval split by a fixed hash of relative paths, their documents, and
bad sources named by their key."""

from __future__ import annotations

import json
import pathlib
import sysconfig
from pathlib import Path

import pytest

from sparsetrain import data
from sparsetrain.errors import ConfigError, DataError
from tests.data.helpers import make_input, text_of


def test_stdlib_corpus_is_sizeable_and_split_stably():
    inp = make_input(source="stdlib", eval_fraction=0.05)
    train = data.corpus_files(inp, "train")
    evals = data.corpus_files(inp, "eval")
    assert train == data.corpus_files(inp, "train")
    assert evals == data.corpus_files(inp, "eval")
    assert evals and not set(train) & set(evals)
    everything = train + evals
    assert sum(p.stat().st_size for p in everything) > 5_000_000
    root = Path(sysconfig.get_paths()["stdlib"])
    for p in everything:
        parts = p.relative_to(root).parts
        assert p.suffix == ".py" and not p.name.startswith("test_")
        assert not {"site-packages", "dist-packages", "test", "tests", "idle_test"} & set(parts)
    assert 0.01 < len(evals) / len(everything) < 0.15


def test_stdlib_exclusions(tmp_path: Path, monkeypatch):
    for rel in [
        "os.py",
        "json/decoder.py",
        "site-packages/pkg.py",
        "dist-packages/d.py",
        "test/t.py",
        "unittest/tests/u.py",
        "idlelib/idle_test/i.py",
        "test_support.py",
        "json/test_x.py",
        "__pycache__/os.py",
        "json/data.txt",
    ]:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text("x = 1\n")
    monkeypatch.setattr(sysconfig, "get_paths", lambda: {"stdlib": str(tmp_path)})
    files = data.corpus_files(make_input(source="stdlib"), "all")
    assert files == [tmp_path / "json" / "decoder.py", tmp_path / "os.py"]


def test_split_is_a_fixed_hash_of_relative_paths(corpus: Path):
    # blake2b of the relative path, never Python's salted hash(): the same in every process.
    evals = data.corpus_files(make_input(data_path=str(corpus), eval_fraction=0.2), "eval")
    assert [p.name for p in evals] == ["doc_08.txt", "doc_14.txt"]


def test_binary_files_are_skipped(corpus: Path):
    (corpus / "sub" / "blob.bin").write_bytes(b"\x7fELF\x00\x01")
    docs = list(data.iter_documents(make_input(data_path=str(corpus), split="all")))
    assert len(docs) == 20 and all("\x00" not in d for d in docs)


def test_text_directory_split_is_disjoint_and_complete(corpus: Path):
    inp = make_input(data_path=str(corpus))
    train, evals = data.corpus_files(inp, "train"), data.corpus_files(inp, "eval")
    assert evals and train and not set(train) & set(evals)
    assert sorted(train + evals) == sorted(data.corpus_files(inp, "all"))
    assert len(train + evals) == 20  # the hidden file is skipped
    assert corpus / "sub" / "doc_19.md" in train + evals
    docs = list(data.iter_documents(inp, "eval"))
    assert docs == [p.read_text(encoding="utf-8") for p in evals]


def test_split_does_not_depend_on_where_the_corpus_lives(corpus: Path, tmp_path: Path):
    moved = tmp_path / "elsewhere" / "corpus"
    moved.parent.mkdir()
    corpus.rename(moved)
    names = [p.name for p in data.corpus_files(make_input(data_path=str(moved)), "eval")]
    moved.rename(corpus)
    assert names == [p.name for p in data.corpus_files(make_input(data_path=str(corpus)), "eval")]


def test_text_glob_and_single_file(corpus: Path):
    glob_files = data.corpus_files(make_input(data_path=str(corpus / "doc_0*.txt")), "all")
    assert [p.name for p in glob_files] == [f"doc_{i:02d}.txt" for i in range(10)]
    recursive = data.corpus_files(make_input(data_path=str(corpus / "**" / "*.md")), "all")
    assert recursive == [corpus / "sub" / "doc_19.md"]

    one = corpus / "doc_03.txt"
    text = one.read_text(encoding="utf-8")
    inp = make_input(data_path=str(one), eval_fraction=0.25)
    (train,), (evals,) = data.iter_documents(inp, "train"), data.iter_documents(inp, "eval")
    assert train + evals == text
    assert len(evals) == round(0.25 * len(text))


def test_unset_split_follows_the_section(corpus: Path):
    train = make_input(data_path=str(corpus), split=None)
    evals = make_input(data_path=str(corpus), split=None, section="eval_input")
    assert data.corpus_files(train) == data.corpus_files(train, "train")
    assert data.corpus_files(evals) == data.corpus_files(evals, "eval")


def test_empty_split_is_an_error(corpus: Path):
    with pytest.raises(DataError, match=r"train_input\.split: the eval split is empty"):
        data.corpus_files(make_input(data_path=str(corpus), eval_fraction=0.0), "eval")


def test_few_files_still_get_an_eval_file(tmp_path: Path):
    for i in range(3):
        (tmp_path / f"{i}.txt").write_text(text_of(i))
    inp = make_input(data_path=str(tmp_path), eval_fraction=0.01)
    assert len(data.corpus_files(inp, "eval")) == 1
    assert len(data.corpus_files(inp, "train")) == 2


def test_jsonl_documents_and_document_split(tmp_path: Path):
    path = tmp_path / "docs.jsonl"
    records = [{"text": text_of(i, 20), "id": i} for i in range(60)]
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n\n")
    inp = make_input(source="jsonl", data_path=str(path))
    train, evals = list(data.iter_documents(inp, "train")), list(data.iter_documents(inp, "eval"))
    assert evals and train and sorted(train + evals) == sorted(r["text"] for r in records)
    assert evals == list(data.iter_documents(inp, "eval"))

    other = make_input(source="jsonl", data_path=str(tmp_path / "*.jsonl"), text_field="body")
    with pytest.raises(DataError, match=r"train_input\.text_field: 'body' missing in .*docs\.jsonl:1"):
        list(data.iter_documents(other, "all"))


def test_jsonl_bad_line_names_file_and_line(tmp_path: Path):
    d = tmp_path / "jl"
    d.mkdir()
    (d / "a.jsonl").write_text('{"text": "fine"}\n{"text": "cut off\n')
    (d / "notes.txt").write_text("not jsonl, not read")
    inp = make_input(source="jsonl", data_path=str(d), split="all", section="eval_input")
    with pytest.raises(DataError, match=r"eval_input\.data_path: .*a\.jsonl:2: invalid JSON"):
        list(data.iter_documents(inp))


def test_missing_path_is_an_error(tmp_path: Path):
    with pytest.raises(DataError, match=r"train_input\.data_path: '.*nowhere' does not exist"):
        data.corpus_files(make_input(data_path=str(tmp_path / "nowhere")))
    with pytest.raises(DataError, match=r"train_input\.data_path: '.*\*\.txt' matches no files"):
        data.corpus_files(make_input(data_path=str(tmp_path / "*.txt")))
    with pytest.raises(ConfigError, match=r"train_input\.data_path: required"):
        data.corpus_files(make_input(data_path=None))


def test_empty_corpus_is_an_error(tmp_path: Path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"eval_input\.data_path: directory .* holds no files"):
        data.corpus_files(make_input(data_path=str(tmp_path / "empty"), section="eval_input"))
    for i in range(3):
        (tmp_path / f"{i}.txt").write_text("")
    with pytest.raises(DataError, match=r"train_input\.data_path: .* holds no text"):
        data.load_tokens(make_input(data_path=str(tmp_path / "*.txt"), split="all"))


def test_unreadable_file_is_an_error(corpus: Path, monkeypatch):
    real_read_bytes = pathlib.Path.read_bytes

    def read_bytes(self):
        if self.name == "doc_05.txt":
            raise PermissionError(13, "Permission denied", str(self))
        return real_read_bytes(self)

    monkeypatch.setattr(pathlib.Path, "read_bytes", read_bytes)
    inp = make_input(data_path=str(corpus), split="all")
    with pytest.raises(DataError, match=r"train_input\.data_path: cannot read .*doc_05\.txt.*Permission denied"):
        data.load_tokens(inp)
