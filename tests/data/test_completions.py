"""``data/completions.py`` (and the relative-path rule of ``data/paths.py``): prompt/completion
JSON Lines as samples with the loss on the completion only -- the exact inputs and targets of a
sample, padding, the truncation rule, the model's loss against a hand computation, the split, a
locally trained BPE, bad records named in one line, and relative paths found beside the params
file."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from sparsetrain import data
from sparsetrain.data import completions
from sparsetrain.errors import ConfigError, DataError
from tests.data.helpers import make_input
from tests.helpers import tiny_gpt

IGNORE = -100


def write_jsonl(path: Path, rows: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


def cinput(path: Path | str, **overrides):
    values = dict(source="jsonl", data_path=str(path), prompt_field="prompt", completion_field="completion",
                  split="all", shuffle=False, max_sequence_length=8)
    return make_input(**{**values, **overrides})


def one_line(exc: pytest.ExceptionInfo) -> str:
    assert "\n" not in str(exc.value)
    return str(exc.value)


def test_sample_inputs_targets_and_padding(tmp_path: Path):
    path = write_jsonl(tmp_path / "ft.jsonl", [{"prompt": "ab", "completion": "cd"}, {"prompt": "", "completion": "xyz"}])
    stream = data.load_tokens(cinput(path))
    assert isinstance(stream, data.SampleStream) and stream.num_samples == 2 and stream.seq_len == 8
    assert stream.arrays[0].dtype == np.uint16  # -100 must not wrap around in an unsigned array
    x, y = data.get_batch(stream, 2, 8, seed=0, step=0, shuffle=False)
    a, b, c, d, x_, y_, z = (ord(ch) for ch in "abcdxyz")
    # "ab" + "cd" + eos (0): prompt positions -100, then the next tokens, then padding (eos, -100)
    assert x[0].tolist() == [a, b, c, d, 0, 0, 0, 0]
    assert y[0].tolist() == [IGNORE, c, d, 0, IGNORE, IGNORE, IGNORE, IGNORE]
    # an empty prompt: the completion's first token has nothing before it and is not counted
    assert x[1].tolist() == [x_, y_, z, 0, 0, 0, 0, 0]
    assert y[1].tolist() == [y_, z, 0, IGNORE, IGNORE, IGNORE, IGNORE, IGNORE]
    assert stream.max_token() == z and stream.min_token() == 0
    assert data.fingerprint(stream)["kind"] == "samples"


@pytest.mark.parametrize(
    "prompt, completion, budget, expected",
    [
        ([1, 2, 3], [4, 0], 8, ([1, 2, 3], [4, 0], None)),
        ([1, 2, 3, 4, 5], [6, 7, 0], 6, ([3, 4, 5], [6, 7, 0], "prompt")),  # the prompt keeps its end
        ([1, 2, 3], [4, 5, 6, 7, 0], 5, ([3], [4, 5, 6, 7], "completion")),  # the prompt's last token, the completion's head
        ([], [4, 5, 6, 7, 0], 3, ([], [4, 5, 6], "completion")),
        ([1, 2], [3, 0], 4, ([1, 2], [3, 0], None)),  # exactly max_sequence_length + 1
    ],
)
def test_truncation_rule(prompt, completion, budget, expected):
    assert completions.fit_sample(prompt, completion, budget) == expected


def test_long_records_are_cut_and_counted_once(tmp_path: Path, caplog):
    rows = [{"prompt": "p" * 10, "completion": "ok"}, {"prompt": "q", "completion": "c" * 20}, {"prompt": "a", "completion": "b"}]
    with caplog.at_level(logging.INFO, logger="sparsetrain"):
        stream = data.load_tokens(cinput(write_jsonl(tmp_path / "long.jsonl", rows)))
    cut = [r.getMessage() for r in caplog.records if "longer than" in r.getMessage()]
    assert cut == ["train_input: 2 of 3 records are longer than max_sequence_length + 1 = 9 tokens: "
                   "1 cut at the prompt's start, 1 at the completion's end"]
    x, y = stream.rows(np.arange(3))
    assert x[0].tolist() == [ord(c) for c in "pppppp"] + [ord("o"), ord("k")]  # the completion whole, with eos
    assert y[0].tolist() == [IGNORE] * 5 + [ord("o"), ord("k"), 0]
    assert x[1].tolist() == [ord("q")] + [ord("c")] * 7 and y[1].tolist() == [ord("c")] * 8  # no eos left
    assert any("3 prompt/completion samples of 8 tokens" in r.getMessage() for r in caplog.records)


def test_model_loss_is_cross_entropy_over_completion_tokens(tmp_path: Path):
    rows = [{"prompt": "name[A] ->", "completion": " A is."}, {"prompt": "x ->", "completion": " longer one"}]
    stream = data.load_tokens(cinput(write_jsonl(tmp_path / "ft.jsonl", rows), max_sequence_length=24))
    x, y = next(data.eval_batches(stream, 2, 24))
    model = tiny_gpt(vocab_size=256)
    with torch.no_grad():
        logits = model(x)
        loss = model(x, y)
    terms = []
    for row, r in enumerate(rows):
        ids = [*r["prompt"].encode(), *r["completion"].encode(), 0]
        for target in range(len(r["prompt"].encode()), len(ids)):  # each completion token and the eos
            terms.append(-F.log_softmax(logits[row, target - 1], dim=-1)[ids[target]])
    torch.testing.assert_close(loss, torch.stack(terms).mean())
    assert int((y != IGNORE).sum()) == len(terms) == sum(len(r["completion"]) + 1 for r in rows)


def test_single_file_is_split_by_record(tmp_path: Path):
    rows = [{"prompt": f"p{i} ->", "completion": f" c{i}"} for i in range(60)]
    path = write_jsonl(tmp_path / "ft.jsonl", rows)
    train = list(completions.records(cinput(path, split="train", eval_fraction=0.2)))
    evals = list(completions.records(cinput(path, split="eval", eval_fraction=0.2)))
    assert train and evals and sorted(r.prompt for r in train + evals) == sorted(r["prompt"] for r in rows)
    as_docs = make_input(source="jsonl", data_path=str(path), text_field="prompt", split="eval", eval_fraction=0.2)
    assert [r.prompt for r in evals] == list(data.iter_documents(as_docs))  # the jsonl documents' split
    with pytest.raises(DataError) as exc:
        data.load_tokens(cinput(path, split="eval", eval_fraction=0.0))
    assert one_line(exc) == (f"train_input.data_path: the eval split of {str(path)!r} holds no records "
                             "(eval_fraction 0.0); use more records, another eval_fraction or split: all")


def test_bpe_trains_on_prompts_and_completions(tmp_path: Path):
    rows = [{"prompt": f"name[Zorblax{i % 3}] ->", "completion": f" Zorblax{i % 3} serves food."} for i in range(40)]
    inp = cinput(write_jsonl(tmp_path / "ft.jsonl", rows), tokenizer="bpe", bpe_vocab_size=300, max_sequence_length=32)
    tok = data.load_tokenizer(inp, tmp_path / "run")
    assert (tmp_path / "run" / "tokenizer.json").is_file() and len(tok.encode(" Zorblax1 serves")) < 10
    stream = data.load_tokens(inp, tok)
    x, y = stream.rows(np.arange(1))
    prompt = tok.encode(rows[0]["prompt"])
    assert (y[0, : len(prompt) - 1] == IGNORE).all() and y[0, len(prompt) - 1] == tok.encode(rows[0]["completion"])[0]


@pytest.mark.parametrize(
    "line, fragment",
    [
        ('{"prompt": "a", "completion": "b"', "train_input.data_path: {path}:2: invalid JSON (Expecting ',' delimiter); "
         "each line must be one JSON object"),
        ('{"prompt": "a"}', "train_input.completion_field: 'completion' missing in {path}:2 (found: ['prompt'])"),
        ('{"completion": "b"}', "train_input.prompt_field: 'prompt' missing in {path}:2 (found: ['completion'])"),
        ('{"prompt": 3, "completion": "b"}', "train_input.prompt_field: 'prompt' in {path}:2 is a int, not a string"),
        ('{"prompt": "a", "completion": ["b"]}', "train_input.completion_field: 'completion' in {path}:2 is a list, not a string"),
        ('{"prompt": "a", "completion": ""}', "train_input.completion_field: 'completion' in {path}:2 is empty; a "
         "sample needs a completion to learn (drop the record)"),
        ('["a", "b"]', "train_input.prompt_field: 'prompt' missing in {path}:2 (found: list)"),
    ],
)
def test_bad_records_are_one_line_errors(tmp_path: Path, line: str, fragment: str):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "fine", "completion": "ok"}, line])
    with pytest.raises(DataError) as exc:
        data.load_tokens(cinput(path))
    assert one_line(exc) == fragment.format(path=path)


def test_prompt_keys_are_checked(tmp_path: Path):
    path = write_jsonl(tmp_path / "ft.jsonl", [{"prompt": "a", "completion": "b"}])
    with pytest.raises(ConfigError, match=r"^train_input\.prompt_field: only for source jsonl \(source is 'text'\); remove it$"):
        data.check_input(cinput(path, source="text"))
    with pytest.raises(ConfigError, match="prompt_field: 'prompt' is also completion_field; name two fields"):
        data.check_input(cinput(path, completion_field="prompt"))
    with pytest.raises(ConfigError, match="prompt_field: each record is a prompt/completion sample, not a document"):
        list(data.iter_documents(cinput(path)))  # sparsetrain prepare writes documents
    with pytest.raises(DataError) as exc:  # eval_input without the prompt_field train_input has
        data.load_tokens(cinput(path, prompt_field=None, section="eval_input"))
    assert one_line(exc) == (f"eval_input.text_field: 'text' missing in {path}:1, which holds 'completion': "
                             "for prompt/completion samples set eval_input.prompt_field")


def test_relative_paths_are_found_beside_the_params_file(tmp_path: Path, monkeypatch):
    configs, elsewhere = tmp_path / "configs", tmp_path / "elsewhere"
    write_jsonl(configs / "data" / "ft.jsonl", [{"prompt": "a", "completion": "b"}])
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    inp = cinput("data/ft.jsonl")
    with pytest.raises(DataError, match=r"data_path: 'data/ft.jsonl' does not exist \(give a file"):
        data.corpus_files(inp)  # no params file: the working directory only
    inp.params_dir = str(configs)  # what loading a params file sets
    assert data.corpus_files(inp) == [configs / "data" / "ft.jsonl"]
    assert inp.data_path == str(configs / "data" / "ft.jsonl")  # resolved once, as params.yaml records it
    glob_inp = cinput("data/*.jsonl")
    glob_inp.params_dir = str(configs)
    assert data.corpus_files(glob_inp) == [configs / "data" / "ft.jsonl"]
    write_jsonl(elsewhere / "data" / "ft.jsonl", [{"prompt": "c", "completion": "d"}])
    local = cinput("data/ft.jsonl")
    local.params_dir = str(configs)
    assert [r.prompt for r in completions.records(local)] == ["c"]  # the working directory comes first
    missing = cinput("data/none.jsonl")
    missing.params_dir = str(configs)
    with pytest.raises(DataError) as exc:
        data.corpus_files(missing)
    assert one_line(exc) == (f"train_input.data_path: 'data/none.jsonl' does not exist in the working directory nor "
                             f"beside the params file ({configs}) (give a file, a directory or a glob)")


def test_relative_hdf5_data_dirs_are_found_beside_the_params_file(tmp_path: Path, monkeypatch):
    configs = tmp_path / "configs"
    (configs / "h5").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    inp = make_input(source="hdf5", data_dir=["h5", "configs"], mixture=None, max_sequence_length=None, split=None)
    inp.params_dir = str(configs)
    data.check_input(inp)
    assert inp.data_dir == [str(configs / "h5"), "configs"]  # 'configs' exists in the working directory
    mix = make_input(source="hdf5", mixture=[{"data_dir": "h5", "weight": 1.0}], max_sequence_length=None, split=None)
    mix.params_dir = str(configs)
    data.check_input(mix)
    assert mix.mixture == [{"data_dir": str(configs / "h5"), "weight": 1.0}]
