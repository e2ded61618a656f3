"""Tests for sparsetrain.data: corpora, splits, tokenizers, token streams, batches, shards."""

from __future__ import annotations

import json
import pathlib
import sysconfig
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from sparsetrain import data
from sparsetrain.errors import ConfigError, DataError

WORDS = "alpha beta gamma delta def return class import lambda yield größe naïve 数据 🙂".split()


def make_input(**overrides) -> types.SimpleNamespace:
    values = dict(
        source="text",
        data_path=None,
        text_field="text",
        tokenizer="byte",
        bpe_vocab_size=300,
        split="train",
        eval_fraction=0.2,
        batch_size=4,
        max_sequence_length=16,
        shuffle=True,
        section="train_input",
    )
    values.update(overrides)
    return types.SimpleNamespace(**values)


def text_of(i: int, n_words: int = 200) -> str:
    rng = np.random.default_rng(i)
    lines = [" ".join(rng.choice(WORDS, size=10)) for _ in range(n_words // 10)]
    return f"# document {i}\n" + "\n".join(lines) + "\n"


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    """20 small text files, one of them in a subdirectory, plus a hidden file that is skipped."""
    d = tmp_path / "corpus"
    (d / "sub").mkdir(parents=True)
    for i in range(19):
        (d / f"doc_{i:02d}.txt").write_text(text_of(i), encoding="utf-8")
    (d / "sub" / "doc_19.md").write_text(text_of(19), encoding="utf-8")
    (d / ".hidden.txt").write_text("never read")
    return d


def stream_of(*lengths: int, dtype=np.uint32) -> data.TokenStream:
    """Arrays of consecutive ids (array k starts at k * 1_000_000) so a token tells its place."""
    arrays = [np.arange(k * 1_000_000, k * 1_000_000 + n, dtype=dtype) for k, n in enumerate(lengths)]
    return data.TokenStream(arrays)


# --- corpora and splits ---------------------------------------------------------------------


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


# --- tokenizers -------------------------------------------------------------------------------


def test_byte_tokenizer_round_trip():
    tok = data.ByteTokenizer()
    text = "def f(x):\n    return 'größe' + '数据' + '🙂'\n"
    ids = tok.encode(text)
    assert ids == list(text.encode("utf-8")) and max(ids) < tok.vocab_size == 256
    assert tok.decode(ids) == text
    assert tok.eos_id == 0 and tok.eos_id not in ids
    assert tok.encode_batch(["a", "é"]) == [[97], [195, 169]]
    joined = tok.encode_documents(["ab", "é"])
    assert joined.dtype == np.uint16 and joined.tolist() == [97, 98, 0, 195, 169]
    assert tok.decode(tok.encode("é")[:1]) == "\ufffd"
    assert tok.decode([104, 0, 105, 300]) == "hi\ufffd"  # eos left out; id of a padded vocab replaced


def test_bpe_trains_saves_and_reloads(corpus: Path, tmp_path: Path):
    inp = make_input(data_path=str(corpus), tokenizer="bpe", bpe_vocab_size=400)
    model_dir = tmp_path / "run"
    tok = data.load_tokenizer(inp, model_dir)
    assert isinstance(tok, data.HFTokenizer) and (model_dir / "tokenizer.json").is_file()
    assert 257 <= tok.vocab_size <= 400 and tok.eos_id == tok.tokenizer.token_to_id("<|endoftext|>")
    text = text_of(99)
    ids = tok.encode(text)
    assert len(ids) < len(text.encode("utf-8")) / 2  # merges learned
    assert tok.decode(ids) == text

    resumed = data.load_tokenizer(inp, model_dir)  # found in model_dir: loaded, not retrained
    assert resumed.encode(text) == ids and resumed.vocab_size == tok.vocab_size
    by_path = data.load_tokenizer(make_input(data_path=str(corpus), tokenizer=str(model_dir / "tokenizer.json")))
    assert by_path.encode_batch([text, "x"]) == [ids, tok.encode("x")]


def test_tokenizer_path_missing_is_an_error(corpus: Path, tmp_path: Path):
    inp = make_input(data_path=str(corpus), tokenizer=str(tmp_path / "gpt2.json"), section="eval_input")
    with pytest.raises(DataError, match=r"eval_input\.tokenizer: '.*gpt2\.json' does not exist; use 'byte', 'bpe'"):
        data.load_tokenizer(inp)


# --- token streams and batches ---------------------------------------------------------------


def test_load_tokens_joins_documents_with_eos(corpus: Path):
    inp = make_input(data_path=str(corpus), split="eval")
    stream = data.load_tokens(inp)
    docs = [p.read_bytes() for p in data.corpus_files(inp, "eval")]
    assert stream.dtype == np.uint16
    assert stream.tokens().astype(np.uint8).tobytes() == b"\x00".join(docs)


def test_get_batch_is_deterministic_and_shifted():
    stream = stream_of(5000)
    x, y = data.get_batch(stream, 8, 32, seed=7, step=3, shuffle=True)
    x2, y2 = data.get_batch(stream, 8, 32, seed=7, step=3, shuffle=True)
    assert x.shape == y.shape == (8, 32) and x.dtype == y.dtype == torch.int64
    assert torch.equal(x, x2) and torch.equal(y, y2)
    assert torch.equal(x[:, 1:], y[:, :-1]) and torch.equal(y[:, -1], x[:, -1] + 1)
    assert torch.equal(x - x[:, :1], torch.arange(32).expand(8, 32))  # contiguous windows
    other, _ = data.get_batch(stream, 8, 32, seed=7, step=4, shuffle=True)
    assert not torch.equal(x, other)
    assert int(x.min()) >= 0 and int(y.max()) < 5000


def test_shuffled_ranks_never_overlap():
    stream = stream_of(3000, 2000)
    seq, world = 16, 3
    starts = {
        rank: torch.cat(
            [
                data.get_batch(stream, 8, seq, seed=1, step=s, shuffle=True, rank=rank, world_size=world)[0][:, 0]
                for s in range(30)
            ]
        )
        for rank in range(world)
    }
    covered = [set() for _ in range(world)]
    for rank, firsts in starts.items():
        for start in firsts.tolist():
            covered[rank].update(range(start, start + seq))  # input tokens of the window
    for a in range(world):
        for b in range(a + 1, world):
            assert not covered[a] & covered[b]
    for rank in starts:  # windows stay inside one array
        x, _ = data.get_batch(stream, 8, seq, seed=1, step=0, shuffle=True, rank=rank, world_size=world)
        assert torch.equal(x - x[:, :1], torch.arange(seq).expand(8, seq))


def test_unshuffled_batches_are_consecutive_and_wrap():
    stream = stream_of(101)  # (101 - 1) // 10 = 10 windows
    x0, y0 = data.get_batch(stream, 4, 10, seed=0, step=0, shuffle=False)
    assert x0[:, 0].tolist() == [0, 10, 20, 30] and y0[3, -1].item() == 40
    x1, _ = data.get_batch(stream, 4, 10, seed=0, step=1, shuffle=False)
    assert x1[:, 0].tolist() == [40, 50, 60, 70]
    x2, _ = data.get_batch(stream, 4, 10, seed=0, step=2, shuffle=False)
    assert x2[:, 0].tolist() == [80, 90, 0, 10]  # wraps around
    r0, _ = data.get_batch(stream, 2, 10, seed=0, step=1, shuffle=False, rank=0, world_size=2)
    r1, _ = data.get_batch(stream, 2, 10, seed=0, step=1, shuffle=False, rank=1, world_size=2)
    assert r0[:, 0].tolist() == [40, 50] and r1[:, 0].tolist() == [60, 70]


def test_windows_do_not_cross_files():
    stream = stream_of(25, 5, 31)  # windows of 10 + 1: 2 + 0 + 3
    assert stream.num_windows(10) == 5
    x, y = data.get_batch(stream, 5, 10, seed=0, step=0, shuffle=False)
    assert x[:, 0].tolist() == [0, 10, 2_000_000, 2_000_010, 2_000_020]
    assert torch.equal(y - x, torch.ones_like(x))


def test_eval_batches_counts():
    stream = stream_of(1001)  # 100 windows of 10 + 1
    batches = list(data.eval_batches(stream, 8, 10))
    assert len(batches) == 12 and all(x.shape == (8, 10) for x, _ in batches)
    assert batches[1][0][0, 0].item() == 80
    assert len(list(data.eval_batches(stream, 8, 10, num_batches=3))) == 3
    assert len(list(data.eval_batches(stream, 8, 10, num_batches=50))) == 12
    again = list(data.eval_batches(stream, 8, 10, num_batches=3))
    assert all(torch.equal(a[0], b[0]) for a, b in zip(batches, again))
    ranks = [list(data.eval_batches(stream, 8, 10, rank=r, world_size=2)) for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == 6
    assert ranks[1][0][0][0, 0].item() == 80

    (small,) = data.eval_batches(stream_of(31), 8, 10)  # 3 windows < batch size
    assert small[0].shape == (3, 10)


def test_check_vocab_names_section_and_id():
    stream = data.TokenStream([np.array([1, 2, 300, 5], dtype=np.uint16)], vocab_size=512)
    data.check_vocab(stream, 301, "train_input")
    with pytest.raises(DataError, match="token id 300 does not fit model.vocab_size 300"):
        data.check_vocab(stream, 300, "train_input")
    with pytest.raises(DataError, match=r"eval_input: token id 300 does not fit model.vocab_size 256"):
        data.check_vocab(stream, 256, "eval_input")


def test_too_short_stream_is_an_error(tmp_path: Path):
    (tmp_path / "tiny.txt").write_text("short text")
    inp = make_input(data_path=str(tmp_path / "tiny.txt"), split="all", max_sequence_length=64)
    with pytest.raises(DataError, match=r"train_input\.max_sequence_length: .* 10 tokens .* 65"):
        data.load_tokens(inp)
    data.load_tokens(make_input(data_path=str(tmp_path / "tiny.txt"), split="all", max_sequence_length=9))


# --- shards ----------------------------------------------------------------------------------


def test_prepare_shards_matches_text_path(corpus: Path, tmp_path: Path):
    inp = make_input(data_path=str(corpus))
    out = tmp_path / "shards"
    meta = data.prepare_shards(inp, out, "byte", 4096, shard_tokens=5000)
    assert meta == json.loads((out / "meta.json").read_text())
    assert meta["format"] == "sparsetrain-shards-v1" and meta["dtype"] == "uint16"
    assert (meta["vocab_size"], meta["eos_id"], meta["tokenizer"]) == (256, 0, "byte")
    assert len(meta["files"]["train"]) > 1 and meta["files"]["train"][0] == "train_000.bin"
    assert not list(out.glob(".*.tmp"))
    for split in ("train", "eval"):
        text_stream = data.load_tokens(make_input(data_path=str(corpus), split=split))
        shard_inp = make_input(source="shards", data_path=str(out), split=split)
        shard_stream = data.load_tokens(shard_inp)
        assert isinstance(shard_stream.arrays[0], np.memmap) and not shard_stream.arrays[0].flags.writeable
        assert np.array_equal(shard_stream.tokens(), text_stream.tokens())
        assert shard_stream.num_tokens == meta["num_tokens"][split]
    assert isinstance(data.load_tokenizer(shard_inp), data.ByteTokenizer)


def test_prepare_bpe_shards_carry_their_tokenizer(corpus: Path, tmp_path: Path):
    out = tmp_path / "shards"
    meta = data.prepare_shards(make_input(data_path=str(corpus)), out, "bpe", 350)
    assert meta["tokenizer"] == "tokenizer.json" and (out / "tokenizer.json").is_file()
    shard_inp = make_input(source="shards", data_path=str(out), tokenizer="bpe", split="eval")
    tok = data.load_tokenizer(shard_inp)
    assert tok.vocab_size == meta["vocab_size"]
    text_stream = data.load_tokens(make_input(data_path=str(corpus), split="eval"), tok)
    assert np.array_equal(data.load_tokens(shard_inp).tokens(), text_stream.tokens())
    same_file = make_input(source="shards", data_path=str(out), tokenizer=str(out / "tokenizer.json"))
    assert data.load_tokenizer(same_file).vocab_size == tok.vocab_size
    with pytest.raises(DataError, match=r"train_input\.tokenizer: 'byte' differs from the shards' tokenizer"):
        data.load_tokenizer(make_input(source="shards", data_path=str(out), tokenizer="byte"))


def write_fake_shards(out: Path, tokens: np.ndarray, vocab_size: int) -> None:
    out.mkdir()
    tokens.tofile(out / "train_000.bin")
    np.array([], dtype=tokens.dtype).tofile(out / "eval_000.bin")
    meta = {
        "format": "sparsetrain-shards-v1",
        "dtype": tokens.dtype.name,
        "vocab_size": vocab_size,
        "eos_id": 0,
        "tokenizer": "byte",
        "num_tokens": {"train": len(tokens), "eval": 0},
        "files": {"train": ["train_000.bin"], "eval": ["eval_000.bin"]},
    }
    (out / "meta.json").write_text(json.dumps(meta))


def test_uint32_shards(tmp_path: Path):
    tokens = np.arange(69_000, 70_000, dtype=np.uint32)
    write_fake_shards(tmp_path / "big", tokens, vocab_size=70_000)
    stream = data.load_tokens(make_input(source="shards", data_path=str(tmp_path / "big")))
    assert stream.dtype == np.uint32 and stream.vocab_size == 70_000
    data.check_vocab(stream, 70_000, "train_input")
    x, y = data.get_batch(stream, 4, 16, seed=0, step=0, shuffle=False)
    assert x[0, 0].item() == 69_000 and y[0, 0].item() == 69_001 and x.dtype == torch.int64
    with pytest.raises(DataError, match="token id 69999 does not fit model.vocab_size 65536"):
        data.check_vocab(stream, 65_536, "train_input")
    assert data.token_dtype(65_536) == np.uint16 and data.token_dtype(65_537) == np.uint32


def test_bad_shard_dir_names_the_file(tmp_path: Path):
    inp = make_input(source="shards", data_path=str(tmp_path))
    with pytest.raises(DataError, match=r"train_input\.data_path: .*meta\.json not found"):
        data.load_tokens(inp)
    (tmp_path / "meta.json").write_text("{not json")
    with pytest.raises(DataError, match=r"train_input\.data_path: .*meta\.json is not readable JSON"):
        data.load_tokens(inp)
    (tmp_path / "meta.json").write_text(json.dumps({"format": "sparsetrain-shards-v1", "dtype": "uint16"}))
    with pytest.raises(DataError, match=r"meta\.json is invalid: missing key 'vocab_size'"):
        data.load_tokenizer(inp)

    write_fake_shards(tmp_path / "cut", np.arange(100, dtype=np.uint16), vocab_size=256)
    with open(tmp_path / "cut" / "train_000.bin", "ab") as f:
        f.write(b"\x01")  # half a token
    with pytest.raises(DataError, match=r"shard .*train_000\.bin has 201 bytes"):
        data.load_tokens(make_input(source="shards", data_path=str(tmp_path / "cut")))
    write_fake_shards(tmp_path / "ok", np.arange(100, dtype=np.uint16), vocab_size=256)
    with pytest.raises(DataError, match=r"eval_input\.max_sequence_length: the data holds 0 tokens"):
        data.load_tokens(
            make_input(source="shards", data_path=str(tmp_path / "ok"), split="eval", section="eval_input")
        )
