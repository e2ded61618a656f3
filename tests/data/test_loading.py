"""``data/loading.py``: a data section's tokenizer (a BPE trained once, saved in model_dir and
reloaded; a missing tokenizer file named) and its token stream (documents joined by end-of-text)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from sparsetrain import data
from sparsetrain.errors import DataError
from tests.data.helpers import make_input, text_of


def test_load_tokens_joins_documents_with_eos(corpus: Path):
    inp = make_input(data_path=str(corpus), split="eval")
    stream = data.load_tokens(inp)
    docs = [p.read_bytes() for p in data.corpus_files(inp, "eval")]
    assert stream.dtype == np.uint16
    assert stream.tokens().astype(np.uint8).tobytes() == b"\x00".join(docs)


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
