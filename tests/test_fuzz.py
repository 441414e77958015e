"""Property-based fuzzing (hypothesis, a dev extra): the config parser and checks, config files, and prepare's text
handling (decoding, cleaning, filters, streaming, the character and GPT-2 datasets, labelled rows, meta.json) take
whatever they are given and either work or raise the one error type their script prints as one line; no other
exception escapes. Derandomized, so every run tries the same examples."""

import json
import string

import numpy as np
import pytest

hypothesis = pytest.importorskip("hypothesis")  # pip install -e ".[dev]"
from hypothesis import HealthCheck, given, settings, strategies as st  # noqa: E402

import train  # noqa: E402
from prepare import classify as prep_classify, shakespeare, shakespeare_char  # noqa: E402
from prepare.clean import CLEAN_RULES, FILTERS, WORD, Limits, clean, quality_problem  # noqa: E402
from prepare.common import PrepareError, decode_text, iter_text  # noqa: E402
from sologpt import checks, tokenizer  # noqa: E402
from sologpt.configurator import UserError, load_config  # noqa: E402

FUZZ = settings(max_examples=120, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
FIELDS = list(train.TrainConfig.__dataclass_fields__)

# what people type after "=": numbers of every shape, words, Python literals, broken quotes, odd characters
VALUES = st.one_of(
    st.integers(-10**6, 10**6).map(str), st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.sampled_from(["nan", "inf", "-inf", "1e999", "True", "False", "None", "auto", "''", "'x", "[1, 2]", "{}",
                     "(1,)", "1_000", "0x10", "1e-3", "-0", "\x00", "é", "..", "9" * 400, "scratch", "resume"]),
    st.text(max_size=12))
FLAG = st.tuples(st.one_of(st.sampled_from(FIELDS), st.text(string.ascii_letters + "_", max_size=10)),
                 VALUES).map(lambda kv: f"--{kv[0]}={kv[1]}")


@FUZZ
@given(st.lists(st.one_of(FLAG, st.sampled_from(["--max_iters", "--", "-x", "--=1"])), max_size=6))
def test_config_flags_and_checks_never_crash(argv):
    try:
        cfg = load_config(train.TrainConfig, argv)
    except UserError:
        return
    cfg.device = "cpu" if cfg.device == "auto" else cfg.device  # no GPU probing in a fuzz loop
    try:
        checks.resolve(cfg)
    except UserError:
        pass


LITERALS = st.recursive(st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=8)),
                        lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=3), inner,
                                                                                   max_size=3), max_leaves=5)


@FUZZ
@given(st.dictionaries(st.one_of(st.sampled_from(FIELDS), st.from_regex(r"[a-z_][a-z0-9_]{0,8}", fullmatch=True)),
                       LITERALS, max_size=5))
def test_config_files_never_crash(tmp_path, names):
    path = tmp_path / "c.py"
    path.write_text("".join(f"{k} = {v!r}\n" for k, v in names.items()))
    try:
        load_config(train.TrainConfig, [str(path)])
    except UserError:
        pass


TEXT = st.text(st.characters(codec="utf-8"), max_size=300)  # any code point, controls and surrogate-free


@FUZZ
@given(TEXT, st.sets(st.sampled_from(CLEAN_RULES)), st.integers(0, 20), st.floats(0, 1), st.floats(0, 30))
def test_cleaning_and_filters_take_any_text(text, rules, min_words, ratio, length):
    out, changed = clean(text, frozenset(rules))
    assert isinstance(out, str) and set(changed) <= set(rules)
    limits = Limits(min_chars=min_words, min_words=min_words, max_symbol_ratio=ratio, max_digit_ratio=ratio,
                    max_repeated_lines=ratio, max_repeated_ngrams=ratio, min_mean_word_length=length / 10,
                    max_mean_word_length=length)
    assert quality_problem(out, WORD.findall(out), limits) in (None, *FILTERS)


@FUZZ
@given(st.binary(max_size=300), st.sampled_from(["cp1252", "replace", "skip"]))
def test_decoding_takes_any_bytes(data, mode):
    text, bad = decode_text(data, mode)
    assert (text is None) == (mode == "skip" and bad == 0 and _not_utf8(data))
    assert text is None or isinstance(text, str)


def _not_utf8(data):
    try:
        data.decode("utf-8")
        return False
    except UnicodeDecodeError:
        return True


@FUZZ
@given(st.binary(max_size=400), st.integers(1, 64))
def test_streamed_text_is_the_file_or_one_error(tmp_path, data, chunk):
    path = tmp_path / "in.txt"
    path.write_bytes(data)
    try:
        text = "".join(iter_text(path, chunk))
    except PrepareError as e:
        assert "is not valid UTF-8" in str(e)
        assert _not_utf8(data)
        return
    assert text == data.decode("utf-8")


@FUZZ
@given(TEXT)
def test_char_dataset_round_trips_or_refuses(tmp_path, text):
    path = tmp_path / "in.txt"
    path.write_text(text, encoding="utf-8", newline="")
    try:
        meta = shakespeare_char.write_dataset(path, tmp_path / "d")
    except PrepareError as e:
        assert "would be empty" in str(e)
        return
    ids = [np.fromfile(tmp_path / "d" / f"{s}.bin", dtype=meta["dtype"]) for s in ("train", "val")]
    assert "".join(meta["chars"][i] for i in np.concatenate(ids)) == text


@settings(FUZZ, max_examples=40)
@given(TEXT)
def test_gpt2_dataset_round_trips_or_refuses(tmp_path, text):
    path = tmp_path / "in.txt"
    path.write_text(text, encoding="utf-8", newline="")
    try:
        meta = shakespeare.write_dataset(path, tmp_path / "d")
    except PrepareError as e:
        assert "would be empty" in str(e)
        return
    ids = np.concatenate([np.fromfile(tmp_path / "d" / f"{s}.bin", dtype=meta["dtype"]) for s in ("train", "val")])
    assert shakespeare.load_gpt2().decode(ids.tolist()) == text


ROW = st.one_of(st.dictionaries(st.sampled_from(["text", "label", "x"]), LITERALS, max_size=3).map(json.dumps),
                st.text(max_size=20))


@FUZZ
@given(st.lists(ROW, max_size=6), st.sampled_from([".jsonl", ".csv"]))
def test_labelled_rows_are_read_or_refused(tmp_path, lines, suffix):
    path = tmp_path / f"rows{suffix}"
    path.write_text("\n".join(lines), encoding="utf-8")
    try:
        rows = prep_classify.read_rows(path, "text", "label")
    except PrepareError:
        return
    assert rows and all(isinstance(t, str) and t.strip() and isinstance(label, str) for t, label in rows)


@FUZZ
@given(st.dictionaries(st.sampled_from(["tokenizer", "vocab_size", "chars", "extra_tokens", "eot_token", "dtype"]),
                       st.one_of(LITERALS, st.sampled_from(["char", "gpt2", "nope"])), max_size=6))
def test_meta_json_is_read_or_refused(tmp_path, meta):
    path = tmp_path / "meta.json"
    path.write_text(json.dumps(meta))
    try:
        tokenizer.from_meta(tokenizer.load_meta(path))
    except tokenizer.TokenizerError:
        pass
