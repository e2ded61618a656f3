"""Helpers of the data tests: a data section (``make_input``) and reproducible documents (``text_of``)."""

from __future__ import annotations

import numpy as np

from sparsetrain.config import InputParams

WORDS = "alpha beta gamma delta def return class import lambda yield größe naïve 数据 🙂".split()


def make_input(**overrides) -> InputParams:
    """An input section with the test defaults below (every key the data code reads exists)."""
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
    return InputParams(**values)


def text_of(i: int, n_words: int = 200) -> str:
    rng = np.random.default_rng(i)
    lines = [" ".join(rng.choice(WORDS, size=10)) for _ in range(n_words // 10)]
    return f"# document {i}\n" + "\n".join(lines) + "\n"
