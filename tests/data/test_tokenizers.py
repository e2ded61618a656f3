"""``data/tokenizers.py``: the byte tokenizer (round trip, end-of-text, ids of a padded vocab).
Training and loading a BPE tokenizer for a data section is in ``test_loading.py``."""

from __future__ import annotations

import numpy as np

from sparsetrain import data


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
