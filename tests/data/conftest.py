"""The corpus of the data tests: it replaces the suite-wide ``corpus`` fixture in this directory
(so ``tiny_params`` here would read it too; the data tests use ``make_input`` instead)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.data.helpers import text_of


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
