"""Property-based fuzzing of the params file and the ``sparsity:`` block (issue #7).

Random malformed documents -- wrong types, unknown keys, random nesting and scalars, YAML text
with garbage in it -- must either validate or raise a ``UserError`` whose message is one line.
Through the command line (``sparsetrain plan``, which also resolves the ``sparsity:`` block
against the model) they must exit 0, or exit 2 with exactly one ``error: `` line on stderr:
never a traceback.

The runs are derandomized (the same examples on every CI run, no example database). Set
``SPARSETRAIN_FUZZ=explore`` (optionally ``SPARSETRAIN_FUZZ_SCALE=20``) to draw fresh random
examples, many more of them, when hunting for new failures locally.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import io
import logging
import os
import string
import typing

import pytest
import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from sparsetrain import config as params_mod
from sparsetrain.cli import main
from sparsetrain.config import load_params, params_from_dict
from sparsetrain.config import sparsity as sparsity_config
from sparsetrain.errors import UserError

EXPLORE = os.environ.get("SPARSETRAIN_FUZZ") == "explore"
SCALE = int(os.environ.get("SPARSETRAIN_FUZZ_SCALE", "10")) if EXPLORE else 1


def fuzz(n: int):
    return settings(
        deadline=None, max_examples=n * SCALE, database=None, derandomize=not EXPLORE,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.data_too_large],
    )


def assert_one_line(e: BaseException) -> None:
    """A user error: one line, naming something (never an empty message)."""
    assert isinstance(e, UserError), f"{type(e).__name__} is not a UserError: {e!r}"
    text = str(e)
    assert text.strip(), repr(e)
    assert "\n" not in text and "\r" not in text, f"message spans lines: {text!r}"


# ---------------------------------------------------------------------------------------------
# Strategies
# ---------------------------------------------------------------------------------------------

KEY_TEXT = st.text(alphabet=string.ascii_letters + string.digits + "_.-[]*:\"' \n", max_size=12)
WILD_KEY_TEXT = st.text(max_size=12)  # anything, line breaks and control characters included

SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=16),
    st.sampled_from(["", "1e-3", "nan", "inf", "-inf", "1_000", "0x10", "true", "auto", "~", "2:4", "None"]),
    st.binary(max_size=6),
    st.dates(),
)
HASHABLE_KEYS = st.one_of(KEY_TEXT, WILD_KEY_TEXT, st.integers(-3, 3), st.booleans(), st.none(), st.floats(allow_nan=False))


def nested(leaves: st.SearchStrategy, keys: st.SearchStrategy = HASHABLE_KEYS) -> st.SearchStrategy:
    return st.recursive(
        leaves,
        lambda children: st.one_of(
            st.lists(children, max_size=3),
            st.dictionaries(keys, children, max_size=3),
        ),
        max_leaves=6,
    )


ANY_VALUE = nested(SCALARS)


def _plausible(field: dataclasses.Field, hint: typing.Any) -> st.SearchStrategy:
    """Values of the right type for a params field: in range, at the edges and just outside."""
    meta = field.metadata
    args = typing.get_args(hint) or (hint,)
    options: list[st.SearchStrategy] = []
    if meta.get("choices"):
        options.append(st.sampled_from(list(meta["choices"])))
    lo, hi = meta.get("min"), meta.get("max")
    if int in args:
        low = int(lo) if lo is not None else -5
        high = int(hi) if hi is not None else low + 64
        # Small values mostly: a plan builds the model, and a big one takes seconds to build.
        options.append(st.integers(low, min(high, low + 8)))
        options.append(st.sampled_from([low - 1, high, high + 1, 2**63, -(2**63)]))
    if float in args:
        options.append(st.floats(lo if lo is not None else -2.0, hi if hi is not None else 2.0))
        options.append(st.sampled_from([float("nan"), float("inf"), -1.0, 1e30, "1e-3", "x"]))
    if bool in args:
        options.append(st.booleans())
    if str in args and not meta.get("choices"):
        options.append(st.text(max_size=10))
    if list in args:  # the learning-rate schedule
        options.append(SCHEDULE)
    if type(None) in args:
        options.append(st.none())
    return st.one_of(options) if options else ANY_VALUE


PHASE = st.fixed_dictionaries(
    {},
    optional={
        "scheduler": st.sampled_from(["Linear", "CosineDecay", "Constant", "Cosine", ""]) | ANY_VALUE,
        "initial_learning_rate": st.floats(-1, 1) | ANY_VALUE,
        "end_learning_rate": st.floats(0, 1) | ANY_VALUE,
        "total_iters": st.integers(-2, 20) | ANY_VALUE,
        "junk": ANY_VALUE,
    },
)
SCHEDULE = st.lists(PHASE | ANY_VALUE, max_size=3)


def section(cls: type, with_junk_keys: bool = True, skip: tuple[str, ...] = ()) -> st.SearchStrategy:
    """A mapping for one params section: each valid key maybe present, plausible or random."""
    hints = typing.get_type_hints(cls)
    fields = [f for f in dataclasses.fields(cls) if not f.metadata.get("internal") and f.name not in skip]
    optional = {f.name: st.one_of(_plausible(f, hints[f.name]), ANY_VALUE) for f in fields}
    base = st.fixed_dictionaries({}, optional=optional)
    if not with_junk_keys:
        return base
    junk = st.dictionaries(st.one_of(WILD_KEY_TEXT, HASHABLE_KEYS), ANY_VALUE, max_size=2)
    return st.tuples(base, junk, st.booleans()).map(lambda t: {**t[0], **t[1]} if t[2] else t[0])


# Patterns: ones that match the tiny model's parameters, ones that match nothing, 1-D only, or
# are not valid regexes.
PATTERNS = st.one_of(
    st.sampled_from([
        "ffn.*linear_layer.weight", "self_attn.*weight", "proj_output_dense_layer.weight", "proj_[qkv]_dense_layer",
        "weight", "bias", "norm", "ln_f", "embed", "lm_head", "layers.0", "transformer_decoder.layers.1.ffn.ffn.0.linear_layer.weight",
        ".*", "", "fc_layers.*weight", "mlp.*weight", "nomatch", "(", "[a-", "*",
        "(?P<x>ffn)", "ffn|self_attn", "^transformer_decoder", "^layers", "weight$", "a{2,1}", "mlp\nweight", "a{4294967296}",
        "(" * 1000 + "a" + ")" * 1000,
    ]),
    st.text(alphabet=string.ascii_letters + ".*()[]|^$?+{}\\0123456789_", max_size=12),
)
SPARSITY_VALUE = st.one_of(
    st.floats(0, 0.99), st.sampled_from([0, 0.0, 0.5, 0.75, 0.999, 1, 1.0, -0.1, 1.5, 75, float("nan")]), ANY_VALUE,
)
STRUCTURE = st.one_of(
    st.sampled_from(["unstructured", "block", "BLOCK", "2:4", "4:8", "1:2", " 2 : 4 ", "0:4", "4:4", "5:4", "2:128", "2:3",
                     "n:m", "dense", 124, 0, -1, 60]),
    ANY_VALUE,
)
BLOCK_SIZE = st.one_of(
    st.sampled_from([1, 2, 4, 8, 16, 32, 128, 0, -4, [4, 8], [8, 4], [0, 4], [4], [4, 4, 4], [True, 4], 4.0, "8"]),
    ANY_VALUE,
)
GROUP = st.fixed_dictionaries(
    {},
    optional={
        "sparsity": SPARSITY_VALUE,
        "init_method": st.sampled_from(["topk", "random", "from_zeros", "TopK", "magnitude"]) | ANY_VALUE,
        "seed": st.integers(-5, 5) | ANY_VALUE,
        "structure": STRUCTURE,
        "block_size": BLOCK_SIZE,
        "type": st.just("sideband"),  # a top-level key in a group: an error
        "sparsty": ANY_VALUE,
    },
)
PATTERN_FORMS = st.one_of(
    st.none(),
    PATTERNS,
    st.lists(PATTERNS | ANY_VALUE, max_size=3),
    st.dictionaries(PATTERNS, GROUP | st.none() | ANY_VALUE, max_size=3),
    st.dictionaries(HASHABLE_KEYS, ANY_VALUE, max_size=2),
    ANY_VALUE,
)
SPARSITY_BLOCK = st.one_of(
    st.fixed_dictionaries(
        {},
        optional={
            "type": st.sampled_from(["sideband", "static", "Static", "gmp", "rigl", "set", "dynamic"]) | ANY_VALUE,
            "algorithm": st.sampled_from(["sideband", "static"]),
            "sparsity": SPARSITY_VALUE,
            "init_method": st.sampled_from(["topk", "random", "from_zeros", "x"]) | ANY_VALUE,
            "seed": st.integers(-(2**64), 2**64) | ANY_VALUE,
            "structure": STRUCTURE,
            "block_size": BLOCK_SIZE,
            "param_name_patterns": PATTERN_FORMS,
            "update": ANY_VALUE,
            "sparsity_level": ANY_VALUE,
        },
    ),
    ANY_VALUE,
)

SECTION_CLASSES = dict(params_mod.SECTIONS)
PARAMS_DOC = st.one_of(
    st.fixed_dictionaries(
        {},
        optional={
            **{name: st.one_of(section(cls), ANY_VALUE) for name, cls in SECTION_CLASSES.items()},
            "sparsity": SPARSITY_BLOCK,
        },
    ).flatmap(
        lambda doc: st.dictionaries(st.one_of(WILD_KEY_TEXT, HASHABLE_KEYS), ANY_VALUE, max_size=1).map(
            lambda junk: {**doc, **junk}
        )
    ),
    ANY_VALUE,
)


# ---------------------------------------------------------------------------------------------
# params_from_dict / load_params
# ---------------------------------------------------------------------------------------------


def _validate(doc) -> None:
    try:
        params_from_dict(copy.deepcopy(doc))
    except UserError as e:
        assert_one_line(e)


@fuzz(400)
@given(PARAMS_DOC)
@example({"model": {"preset": ["gpt2-tiny"]}})  # an unhashable preset was a TypeError
@example({"model": {"bad\nkey": 1}})  # a key with a line break made a two-line message
@example({"modle\r\n": {}})
@example({"optimizer": {"learning_rate": [{"scheduler": "Linear", "initial_learning_rate": 0.1, "x\ny": 1}]}})
@example({"model": {"hidden_size": 10**30, "num_heads": 1}})  # overflowed torch's size arithmetic in plan
@example({"runconfig": {"seed": -1}})  # numpy refuses negative seeds when drawing batches
@example({"sparsity": {"spar\nsity": 0.5}})
@example({"sparsity": {"sparsity": 0.5, "param_name_patterns": "a{4294967296}"}})  # OverflowError in re
def test_random_params_documents_validate_or_fail_in_one_line(doc):
    _validate(doc)


@fuzz(300)
@given(SPARSITY_BLOCK, st.booleans())
def test_random_sparsity_blocks_validate_or_fail_in_one_line(block, with_model):
    doc = {"sparsity": block}
    if with_model:
        doc["model"] = {"hidden_size": 32, "num_hidden_layers": 2, "num_heads": 2}
    _validate(doc)
    try:
        sparsity_config.parse_sparsity(copy.deepcopy(block))
    except UserError as e:
        assert_one_line(e)


def _garbled(text: str, edits: list[tuple[int, str, int]]) -> str:
    """``text`` with each edit (position, insertion, number of characters deleted) applied."""
    for pos, insert, delete in edits:
        pos = pos % (len(text) + 1)
        text = text[:pos] + insert + text[pos + delete:]
    return text


YAML_GARBAGE = st.one_of(
    st.text(max_size=6),
    st.sampled_from([
        ":", ": ", "- ", "[", "]", "{", "}", "'", '"', "\t", "\n", "\n  ", "&a ", "*a", "!!python/object:os.system ",
        "!!int ", "!!float ", "!!bool ", "!!binary ", "!!timestamp ", "!!set ", "!!omap ", "? ", "|", ">", "%YAML 1.1\n",
        "---\n", "...\n", "#", "2001-02-30", "2001-13-01 12:00:00", "\x00", "\ufeff", "0o777", "1e400", ".nan",
    ]),
)


@pytest.fixture(scope="module")
def fuzz_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz")


@fuzz(250)
@given(
    doc=PARAMS_DOC,
    edits=st.lists(st.tuples(st.integers(0, 10_000), YAML_GARBAGE, st.integers(0, 3)), max_size=3),
    raw=st.one_of(st.none(), st.text(max_size=40), st.binary(max_size=40)),
)
@example(doc={}, edits=[(0, "a: 2001-02-30", 0)], raw=None)  # were ValueError / KeyError tracebacks
@example(doc={}, edits=[(0, "a: !!bool x", 0)], raw=None)
@example(doc={}, edits=[(0, "[" * 2000, 0)], raw=None)  # RecursionError
@example(doc={}, edits=[(0, "a: !!int ''", 0)], raw=None)  # IndexError inside PyYAML
@example(doc={}, edits=[(0, "!!timestamp ", 2)], raw=None)
@example(doc={}, edits=[], raw=b"\xff\xfe model: {}")
def test_random_yaml_text_loads_or_fails_in_one_line(fuzz_dir, doc, edits, raw):
    path = fuzz_dir / "params.yaml"
    if raw is None:
        try:
            text = yaml.safe_dump(doc, sort_keys=False)
        except yaml.YAMLError:
            text = repr(doc)
        path.write_text(_garbled(text, edits), encoding="utf-8", errors="surrogatepass")
    elif isinstance(raw, bytes):
        path.write_bytes(raw)
    else:
        path.write_text(raw, encoding="utf-8", errors="surrogatepass")
    try:
        load_params(path)
    except UserError as e:
        assert_one_line(e)
        assert str(path) in str(e), str(e)  # the file is named


@fuzz(150)
@given(st.lists(st.one_of(
    st.text(max_size=30),
    st.tuples(st.sampled_from(["runconfig", "model", "sparsity", "optimizer", "x", ""]), KEY_TEXT, st.text(max_size=12)).map(
        lambda t: f"{t[0]}.{t[1]}={t[2]}"
    ),
    st.sampled_from(["runconfig.max_steps=2001-02-30", "model.hidden_size=!!int x", "a.b=[[[", "model=1", "model.x.y=1",
                     "sparsity.sparsity=0.5", "sparsity.param_name_patterns.mlp=1"]),
), max_size=3))
def test_random_overrides_apply_or_fail_in_one_line(fuzz_dir, overrides):
    path = fuzz_dir / "base.yaml"
    if not path.exists():
        path.write_text("model: {hidden_size: 32, num_hidden_layers: 2, num_heads: 2}\n")
    try:
        load_params(path, overrides)
    except UserError as e:
        assert_one_line(e)


# ---------------------------------------------------------------------------------------------
# The command line: sparsetrain plan (resolves the sparsity block against the model)
# ---------------------------------------------------------------------------------------------

TINY_MODEL = {"hidden_size": 32, "num_hidden_layers": 2, "num_heads": 2, "max_position_embeddings": 64}
TINY_INPUT = {"source": "stdlib", "batch_size": 4, "max_sequence_length": 32}


def _plan_doc(sparsity, model_extra, input_extra, other):
    doc = {
        "train_input": {**TINY_INPUT, **input_extra},
        "eval_input": dict(TINY_INPUT),
        "model": {**TINY_MODEL, **model_extra},
    }
    if sparsity is not None:
        doc["sparsity"] = sparsity
    doc.update(other)
    return doc


LOG_PREFIX = "[log] "


@contextlib.contextmanager
def captured_stderr():
    """stderr of an in-process run, the sparsetrain log included (its handler may hold an old stream)."""
    buf = io.StringIO()
    logger = logging.getLogger("sparsetrain")
    saved = logger.handlers[:], logger.propagate, logger.level
    handler = logging.StreamHandler(buf)
    handler.setLevel(logging.WARNING)
    handler.setFormatter(logging.Formatter(LOG_PREFIX + "%(message)s"))
    logger.handlers[:] = [handler]
    logger.propagate = False
    try:
        with contextlib.redirect_stderr(buf), contextlib.redirect_stdout(io.StringIO()):
            yield buf
    finally:
        logger.handlers[:], logger.propagate = saved[0], saved[1]
        logger.setLevel(saved[2])


def check_plan(path) -> None:
    with captured_stderr() as err:
        rc = main(["plan", "--params", str(path)])
    lines = err.getvalue().splitlines()
    if rc == 0:
        assert not [line for line in lines if line.startswith("error")], lines
        return
    assert rc == 2, (rc, lines)
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], lines
    assert "Traceback" not in err.getvalue()
    # nothing else on stderr but log records (warnings logged before the failure)
    assert all(line == errors[0] or line.startswith(LOG_PREFIX) for line in lines), lines


MODEL_EXTRA = st.fixed_dictionaries(
    {},
    optional={
        "hidden_size": st.sampled_from([8, 16, 32, 64, 0, 33, 2**16 + 1, 10**30, "32", 32.0]),
        "num_heads": st.sampled_from([1, 2, 3, 4, 0, 64]),
        "num_hidden_layers": st.sampled_from([1, 2, 3, 0, -1, 1025, 10**30, None]),
        "filter_size": st.sampled_from([None, 1, 7, 64, 0, 2**20 + 1, 2**62]),
        "vocab_size": st.sampled_from([None, 1, 100, 256, 257, 0, 2**24 + 1, 2**62]),
        "max_position_embeddings": st.sampled_from([32, 64, 16, 2**20 + 1, 2**62]),
        "share_embedding_weights": st.booleans(),
        "use_bias": st.booleans() | ANY_VALUE,
        "preset": st.sampled_from(["gpt2-tiny", "gpt5"]) | ANY_VALUE,
    },
)
INPUT_EXTRA = st.fixed_dictionaries(
    {},
    optional={
        "source": st.sampled_from(["stdlib", "text", "jsonl", "shards", "web"]),
        "tokenizer": st.sampled_from(["byte", "bpe", "/nonexistent/tokenizer.json", ""]),
        "bpe_vocab_size": st.sampled_from([257, 4096, 256, 2**24 + 1]),
        "max_sequence_length": st.sampled_from([1, 32, 65, 0]),
        "data_path": st.sampled_from(["/nonexistent", ""]) | ANY_VALUE,
    },
)


@fuzz(120)
@given(
    sparsity=st.one_of(st.none(), SPARSITY_BLOCK),
    model_extra=st.one_of(st.just({}), MODEL_EXTRA),
    input_extra=st.one_of(st.just({}), INPUT_EXTRA),
    other=st.one_of(st.just({}), st.fixed_dictionaries({}, optional={
        "optimizer": section(params_mod.OptimizerParams),
        "runconfig": section(params_mod.RunConfig),
        "junk": ANY_VALUE,
    })),
)
@example(sparsity={"sparsity": 0.5, "param_name_patterns": {"ffn.*linear_layer.weight": {}, "self_attn.*weight": {"structure": "2:4"}}},
         model_extra={}, input_extra={}, other={})
@example(sparsity={"sparsity": 0.5, "param_name_patterns": "bias"}, model_extra={}, input_extra={}, other={})
@example(sparsity={"sparsity": 0.5}, model_extra={"hidden_size": 2**40, "num_heads": 1}, input_extra={}, other={})
@example(sparsity=None, model_extra={"vocab_size": 2**62}, input_extra={}, other={})
@example(sparsity=None, model_extra={}, input_extra={"source": "shards"}, other={})  # was a TypeError in plan
@example(sparsity={"sparsity": 0.5, "param_name_patterns": {"mlp\nweight": {}}}, model_extra={}, input_extra={}, other={})
@example(sparsity=None, model_extra={}, input_extra={"tokenizer": "bpe", "bpe_vocab_size": 2**62}, other={})
def test_plan_on_random_configs_exits_0_or_2_with_one_error_line(fuzz_dir, sparsity, model_extra, input_extra, other):
    doc = _plan_doc(sparsity, model_extra, input_extra, other)
    path = fuzz_dir / "plan.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    check_plan(path)


@fuzz(60)
@given(doc=PARAMS_DOC)
def test_plan_on_random_documents(fuzz_dir, doc):
    path = fuzz_dir / "plan_any.yaml"
    try:
        path.write_text(yaml.safe_dump(doc, sort_keys=False))
    except yaml.YAMLError:
        return
    # a document that builds a large model would take seconds to plan; the sizes are bounded
    model = doc.get("model") if isinstance(doc, dict) else None
    if isinstance(model, dict) and isinstance(model.get("num_hidden_layers"), int) and model["num_hidden_layers"] > 8:
        model["num_hidden_layers"] = 2
        path.write_text(yaml.safe_dump(doc, sort_keys=False))
    check_plan(path)
