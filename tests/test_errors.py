"""``errors.py``: a user error's message is one printable line, whatever characters the user's
input held."""

from __future__ import annotations

import pytest
import yaml

from sparsetrain.config import params_from_dict
from sparsetrain.errors import UserError
from tests.helpers import cli


@pytest.mark.parametrize("key", ["\x1e", "\x0b", "\x0c", "\x85", "\u2028", "\x1b[2J"],
                         ids=["RS", "VT", "FF", "NEL", "LS", "ESC"])
def test_control_characters_in_user_input_are_escaped(key, tmp_path, capsys):
    # errors.py: UserError escapes only \n and \r; other line separators (str.splitlines splits on
    # \x1c-\x1e, \x0b, \x0c, \x85, \u2028/9) and terminal escapes reach stderr raw.
    # Found by `SPARSETRAIN_FUZZ=explore pytest tests/e2e/test_fuzz.py` (sparsity={'\x1e': None}).
    with pytest.raises(UserError) as e:
        params_from_dict({"sparsity": {key: None}})
    assert str(e.value).isprintable(), repr(str(e.value))
    path = tmp_path / "plan.yaml"
    path.write_text(yaml.safe_dump({"sparsity": {key: None}}))
    assert cli("plan", "--params", path) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and "\x1b" not in err, repr(err)
