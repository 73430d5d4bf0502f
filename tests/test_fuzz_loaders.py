"""Fuzzing the user-input loaders: a recipe, overrides, a config dict, a jsonl dataset.

The contract (omniopd.errors): whatever a user feeds in, a loader returns normally or raises
OmniOPDError (one line on stderr, exit status 2). Any other exception is a traceback for the user,
and a failure here. Explicit @example inputs pin crashes found earlier, so they stay fixed.
"""

from __future__ import annotations

import json
import string

import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from omniopd.config import RunConfig, build_config, load_config
from omniopd.data import Example, load_examples
from omniopd.errors import OmniOPDError

FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

SECTIONS = {name: list(f.annotation.model_fields) for name, f in RunConfig.model_fields.items() if hasattr(f.annotation, "model_fields")}
TOP_FIELDS = list(RunConfig.model_fields)
FIELD_PATHS = [f"{s}.{k}" for s, ks in SECTIONS.items() for k in ks] + TOP_FIELDS

# scalars a YAML reader resolves in surprising ways: tags, anchors, dates, special floats, huge numbers
TRICKY_SCALARS = [
    "0", "-1", "1.5", "1e-5", "1.0e400", ".inf", "-.inf", ".nan", "0x1F", "0o17", "1_000", "true", "no", "~", "null", "''",
    "[]", "{}", "[0.9, 0.999]", "[1, 2, 3]", "2001-02-30", "2001-13-45", "2024-01-01", "12:30:00", "'quoted'", '"esc\\x41"',
    "!!int x", "!!float x", "!!bool x", "!!timestamp x", "!!binary x", "!!str 5", "!!null x", "!!set {a}", "!!omap [a]",
    "!!python/object:os.system", "&a 1", "*a", "*missing", "<<: *a", "? x", "- a", "|", ">", "%", "@", "`", "9" * 5000,
]
scalar_text = st.one_of(st.sampled_from(TRICKY_SCALARS), st.text(max_size=12), st.integers().map(str), st.floats().map(str))

json_leaf = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True), st.text(max_size=20))
json_value = st.recursive(json_leaf, lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=8), kids, max_size=4), max_leaves=12)


@st.composite
def section_dicts(draw) -> dict:
    """A config dict that mostly uses real section and field names, with arbitrary values."""
    out: dict = {}
    for _ in range(draw(st.integers(0, 4))):
        name = draw(st.sampled_from([*SECTIONS, *TOP_FIELDS, "bogus"]) | st.text(max_size=6))
        if name in SECTIONS and draw(st.booleans()):
            keys = st.sampled_from([*SECTIONS[name], "extra"]) | st.text(max_size=6)
            out[name] = draw(st.dictionaries(keys, json_value, max_size=4))
        else:
            out[name] = draw(json_value)
    return out


config_dicts = st.one_of(
    section_dicts(),
    st.dictionaries(st.one_of(st.text(max_size=8), st.integers(), st.none()), json_value, max_size=4),
)

overrides = st.lists(
    st.one_of(
        st.builds(lambda k, v: f"{k}={v}", st.sampled_from(FIELD_PATHS) | st.text(max_size=10), scalar_text),
        st.text(max_size=20),
    ),
    max_size=4,
)


@st.composite
def yamlish(draw) -> str:
    """Text shaped like a recipe: section headers, indented fields, tricky scalars, stray syntax."""
    lines = []
    for _ in range(draw(st.integers(0, 8))):
        kind = draw(st.integers(0, 4))
        if kind == 0:
            lines.append(draw(st.sampled_from(list(SECTIONS))) + ":")
        elif kind == 1:
            sec = draw(st.sampled_from(list(SECTIONS)))
            lines.append(f"  {draw(st.sampled_from(SECTIONS[sec]))}: {draw(scalar_text)}")
        elif kind == 2:
            lines.append(f"{draw(st.sampled_from(TOP_FIELDS))}: {draw(scalar_text)}")
        elif kind == 3:
            lines.append(draw(st.text(alphabet=string.printable, max_size=20)))
        else:
            lines.append(draw(st.sampled_from(["---", "...", "- a", "  - b", "? k", ": v", "#c", "\t", "key: [", "a: {b", "&x y: *x"])))
    return "\n".join(lines)


recipe_text = st.one_of(yamlish(), st.text(max_size=200), config_dicts.map(lambda d: yaml.safe_dump(d, allow_unicode=True)))


def _ok_or_user_error(fn, *args, **kwargs):
    try:
        return fn(*args, **kwargs)
    except OmniOPDError as err:
        assert str(err), "an OmniOPDError needs a message"
        return None


# ---------------------------------------------------------------------------------------------- config


@FUZZ
@given(text=recipe_text, ovr=overrides)
@example(text="seed: !!float x\n", ovr=[])  # yaml constructor ValueError
@example(text="seed: 2001-02-30\n", ovr=[])  # impossible date
@example(text="seed: " + "9" * 5000 + "\n", ovr=[])  # int() digit limit
@example(text="[" * 5000 + "]" * 5000, ovr=[])  # deep nesting
@example(text="", ovr=["seed=!!int x"])
@example(text="", ovr=["seed=!!timestamp x"])
@example(text="", ovr=["student.name=!!bool x"])
def test_load_config_text(tmp_path, text, ovr):
    path = tmp_path / "recipe.yaml"
    path.write_text(text, encoding="utf-8")
    cfg = _ok_or_user_error(load_config, path, ovr)
    assert cfg is None or isinstance(cfg, RunConfig)


@FUZZ
@given(raw=st.binary(max_size=200))
@example(raw=b"\xff\xfeseed: 1\n")  # not UTF-8
def test_load_config_bytes(tmp_path, raw):
    path = tmp_path / "recipe.yaml"
    path.write_bytes(raw)
    _ok_or_user_error(load_config, path, [])


@FUZZ
@given(data=config_dicts, ovr=overrides)
@example(data={}, ovr=["optim.lr=!!float x"])
@example(data={}, ovr=["seed=2001-13-45"])
@example(data={}, ovr=["seed=" + "9" * 5000])
@example(data={"audit": 5}, ovr=["audit.num_chunks=3"])
def test_build_config(data, ovr):
    cfg = _ok_or_user_error(build_config, data, ovr)
    assert cfg is None or isinstance(cfg, RunConfig)


# ---------------------------------------------------------------------------------------------- data

row_fields = st.sampled_from(["question", "problem", "answer", "solution", "id", "unique_id", "task_id", "extra"])
answer_like = st.one_of(json_value, st.sampled_from(["#### 5", "####", "x #### ", "a ####1,000", "  ", "42", "#### #### 7"]))
rows = st.dictionaries(row_fields, st.one_of(answer_like, st.text(max_size=20)), max_size=5)
jsonl_line = st.one_of(
    rows.map(lambda r: json.dumps(r, ensure_ascii=False)),
    json_value.map(json.dumps),
    st.text(max_size=40),
    st.sampled_from(["", "   ", "{", "}", "[]", "null", "NaN", '{"question": "q", "answer": Infinity}']),
)


@FUZZ
@given(lines=st.lists(jsonl_line, max_size=6), limit=st.none() | st.integers(-1, 4))
@example(lines=['{"question": "q", "answer": ' + "1" * 5000 + "}"], limit=None)  # int() digit limit
@example(lines=["[" * 100_000 + "]" * 100_000], limit=None)  # deep nesting
def test_load_examples_text(tmp_path, lines, limit):
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(lines), encoding="utf-8")
    out = _ok_or_user_error(load_examples, str(path), limit=limit)
    if out is not None:
        assert out and all(isinstance(e, Example) and e.question and e.answer for e in out)


@FUZZ
@given(raw=st.binary(max_size=200))
@example(raw=b'{"question": "q\xff", "answer": "1"}\n')  # not UTF-8
def test_load_examples_bytes(tmp_path, raw):
    path = tmp_path / "data.jsonl"
    path.write_bytes(raw)
    _ok_or_user_error(load_examples, str(path))


@FUZZ
@given(spec=st.text(max_size=30).filter(lambda s: not s.startswith(("gsm8k", "math500", "amc23", "aime24"))))
def test_load_examples_spec(spec):
    # named datasets need the shared folder: only arbitrary paths/names here, none of which exist
    _ok_or_user_error(load_examples, spec)
