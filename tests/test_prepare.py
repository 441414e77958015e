"""Tests for prepare/: exact round trips, the split, streamed BPE == whole-text BPE, and the
one-line errors for bad input, missing files and failed downloads (no real network used)."""

import io
import json
import os
import random
import subprocess
import sys
import urllib.error
import urllib.request

import numpy as np
import pytest
import tiktoken

from prepare import shakespeare, shakespeare_char
from prepare.common import PrepareError, TokenWriter, iter_text, token_dtype

from conftest import REPO, SHAKESPEARE, SHARED


@pytest.fixture(autouse=True)
def tiktoken_cache(monkeypatch):
    if "TIKTOKEN_CACHE_DIR" not in os.environ:  # lets tiktoken load gpt2 offline
        monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(SHARED / "tiktoken"))


@pytest.fixture(scope="module")
def text():
    return read(SHAKESPEARE)


def gpt2():
    return tiktoken.get_encoding("gpt2")  # call inside tests, after tiktoken_cache has run


def read(path):
    return path.read_bytes().decode("utf-8")  # not read_text: it would turn "\r\n" into "\n"


def read_bins(data_dir):
    meta = json.loads((data_dir / "meta.json").read_text(encoding="utf-8"))
    train = np.fromfile(data_dir / "train.bin", dtype=meta["dtype"])
    val = np.fromfile(data_dir / "val.bin", dtype=meta["dtype"])
    return meta, train, val


def run_error(main, argv, capsys):
    """Run a script's main and return its stderr, checking it failed with one error line."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    return err


# --- character level ---------------------------------------------------------------------

def test_char_round_trip_split_and_dtype(tmp_path, text):
    # An odd chunk size makes pieces end at arbitrary characters.
    meta = shakespeare_char.main(["--input", str(SHAKESPEARE), "--data_root", str(tmp_path),
                                  "--chunk_bytes", "4099"])
    data_dir = tmp_path / "shakespeare_char"
    assert sorted(p.name for p in data_dir.iterdir()) == ["meta.json", "train.bin", "val.bin"]
    meta, train, val = read_bins(data_dir)
    assert meta["tokenizer"] == "char" and meta["dtype"] == "uint16" and train.dtype == np.uint16
    assert meta["vocab_size"] == len(meta["chars"]) == 65
    assert meta["source_sha256"] == shakespeare_char.SHA256
    assert len(train) == meta["train_tokens"] == int(len(text) * 0.9)
    assert len(val) == meta["val_tokens"] == len(text) - int(len(text) * 0.9)
    assert meta["max_token_id"] == max(train.max(), val.max()) < meta["vocab_size"]
    chars = meta["chars"]
    assert "".join(chars[i] for i in np.concatenate([train, val])) == text


def test_char_script_runs_from_repo_root(tmp_path, text):
    proc = subprocess.run([sys.executable, "prepare/shakespeare_char.py", "--input", str(SHAKESPEARE),
                           "--data_root", str(tmp_path), "--name", "chars", "--val_fraction", "0.25"],
                          cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "65" in proc.stdout and "train.bin" in proc.stdout
    meta, train, val = read_bins(tmp_path / "chars")
    assert len(train) == int(len(text) * 0.75) and len(train) + len(val) == len(text)


def test_char_multilingual_round_trip(tmp_path):
    # Characters of every width (Arabic, CJK, Hindi, ...) must map back exactly.
    src = tmp_path / "udhr.txt"
    src.write_bytes(b"".join(p.read_bytes() for p in sorted((SHARED / "data" / "udhr").glob("*.txt"))))
    meta = shakespeare_char.main(["--input", str(src), "--data_root", str(tmp_path), "--chunk_bytes", "1000"])
    meta, train, val = read_bins(tmp_path / "shakespeare_char")
    assert "".join(meta["chars"][i] for i in np.concatenate([train, val])) == read(src)


def test_dtype_rule_and_uint32_writer(tmp_path):
    assert token_dtype(65) == token_dtype(50257) == token_dtype(65536) == np.uint16
    assert token_dtype(65537) == np.uint32
    with TokenWriter(tmp_path / "x.bin", np.uint32) as w:
        w.write([0, 70000])
    assert w.n_tokens == 2 and w.max_id == 70000
    assert np.fromfile(tmp_path / "x.bin.tmp", dtype=np.uint32).tolist() == [0, 70000]


def test_interrupted_run_keeps_previous_dataset(tmp_path, monkeypatch):
    argv = ["--input", str(SHAKESPEARE), "--data_root", str(tmp_path), "--chunk_bytes", "65536"]
    shakespeare_char.main(argv)
    data_dir = tmp_path / "shakespeare_char"
    before = {p.name: p.read_bytes() for p in data_dir.iterdir()}
    calls = []

    def encode_then_die(piece, code_points):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return np.zeros(len(piece), dtype=np.int64)  # would corrupt the data if it got published

    monkeypatch.setattr(shakespeare_char, "encode", encode_then_die)
    with pytest.raises(KeyboardInterrupt):
        shakespeare_char.main(argv)
    assert {p.name: p.read_bytes() for p in data_dir.iterdir()} == before  # no .tmp left, nothing changed


# --- GPT-2 BPE ---------------------------------------------------------------------------

def test_bpe_round_trip_and_split(tmp_path, text):
    meta = shakespeare.main(["--input", str(SHAKESPEARE), "--data_root", str(tmp_path)])
    meta, train, val = read_bins(tmp_path / "shakespeare")
    assert meta["tokenizer"] == "gpt2" and meta["vocab_size"] == 50257 and meta["eot_token"] == 50256
    assert meta["dtype"] == "uint16" and (meta["train_tokens"], meta["val_tokens"]) == (len(train), len(val))
    enc = gpt2()
    assert enc.decode(train.tolist()) + enc.decode(val.tolist()) == text
    cut = shakespeare.first_safe_cut(text, int(len(text) * 0.9))  # train ends at the first safe cut >= 90%
    assert enc.decode(train.tolist()) == text[:cut]
    assert train.tolist() + val.tolist() == enc.encode_ordinary(text)


@pytest.mark.parametrize("source, encoding, chunk_bytes", [
    ("shakespeare/input.txt", "utf-8", 4096),
    ("udhr/*.txt", "utf-8", 300),        # many scripts: multi-byte characters cut by chunks
    ("webtext/firefox.txt", "latin-1", 2000),  # CRLF line ends
    ("webtext/wine.txt", "utf-8", 1000),  # NEL (U+0085) line ends: whitespace that is no line break
])
def test_bpe_streamed_tokens_equal_whole_text_tokens(tmp_path, source, encoding, chunk_bytes):
    src = tmp_path / "input.txt"  # the webtext files are messy on purpose: make them valid UTF-8
    src.write_text("".join(p.read_bytes().decode(encoding, errors="replace")
                           for p in sorted((SHARED / "data").glob(source))), encoding="utf-8", newline="")
    shakespeare.write_dataset(src, tmp_path / "out", chunk_bytes=chunk_bytes)
    _, train, val = read_bins(tmp_path / "out")
    assert train.tolist() + val.tolist() == gpt2().encode_ordinary(read(src))


def test_safe_cuts_never_change_gpt2_tokens():
    # Random text from the characters that stress the regex: spaces of several kinds, line
    # breaks, contractions, digits, letters, punctuation. At every cut the script may take,
    # the tokens of the two sides must add up to the tokens of the whole string.
    enc, rng = gpt2(), random.Random(0)
    alphabet = ["\n", "\n", "\r\n", " ", " ", "\t", "\r", "\x85", "\x1c", "\u3000", "a", "b", "é", "日",
                "1", "'", "s", "'ll", ".", "!", "-"]
    n_cuts = 0
    for _ in range(400):
        s = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 30)))
        whole = enc.encode_ordinary(s)
        for m in shakespeare.SAFE_CUT.finditer(s):
            i = m.end()
            assert enc.encode_ordinary(s[:i]) + enc.encode_ordinary(s[i:]) == whole, (s, i)
            n_cuts += 1
    assert n_cuts > 500


def test_safe_cut_helpers():
    s = "ab\n \ncd\r\n\nef"
    assert shakespeare.last_safe_cut(s) == 7 and shakespeare.first_safe_cut(s, 0) == 2
    assert shakespeare.first_safe_cut(s, 3) == 7 and shakespeare.first_safe_cut(s, 8) is None
    assert shakespeare.last_safe_cut("\nabc") == 0 and shakespeare.last_safe_cut(" \n\n") == 0


def test_bpe_without_line_breaks_is_a_clear_error(tmp_path, capsys):
    src = tmp_path / "one_line.txt"
    src.write_text("no line break anywhere, so no safe place to split off val", encoding="utf-8")
    err = run_error(shakespeare.main, ["--input", str(src), "--data_root", str(tmp_path)], capsys)
    assert "val.bin would be empty" in err
    assert list((tmp_path / "shakespeare").iterdir()) == []


# --- reading text ------------------------------------------------------------------------

@pytest.mark.parametrize("bad_at", range(0, 20))
def test_bad_byte_offset_is_exact(tmp_path, bad_at):
    # With 8-byte chunks, positions 7, 15 sit at the end of a chunk (the decoder buffers the
    # byte, then fails in the next chunk) and 8, 16 at the start of one.
    data = bytearray(b"x" * 24)
    data[bad_at] = 0xE9  # latin-1 "é": a lead byte followed by a non-continuation byte
    path = tmp_path / "latin1.txt"
    path.write_bytes(bytes(data))
    with pytest.raises(PrepareError) as e:
        list(iter_text(path, chunk_bytes=8))
    assert f"bad byte 0xe9 at byte offset {bad_at} " in str(e.value)
    assert str(path) in str(e.value) and "iconv" in str(e.value)


def test_bad_byte_offset_in_real_latin1_file():
    path = SHARED / "data" / "webtext" / "firefox.txt"
    with pytest.raises(UnicodeDecodeError) as expected:
        path.read_bytes().decode("utf-8")
    with pytest.raises(PrepareError) as e:
        list(iter_text(path, chunk_bytes=4096))
    assert f"at byte offset {expected.value.start} " in str(e.value)


def test_truncated_character_at_end_of_file(tmp_path):
    path = tmp_path / "cut.txt"
    path.write_bytes("abc€".encode("utf-8")[:-1])  # "€" is 3 bytes; keep 2 of them
    with pytest.raises(PrepareError, match=r"bad byte 0xe2 at byte offset 3 \(unexpected end of data\)"):
        list(iter_text(path, chunk_bytes=2))


def test_multibyte_characters_across_chunk_boundaries(tmp_path):
    text = "aé€😀" * 50  # 1-, 2-, 3- and 4-byte characters: every boundary position occurs
    path = tmp_path / "utf8.txt"
    path.write_text(text, encoding="utf-8")
    for chunk_bytes in (1, 2, 3, 5, 7):
        assert "".join(iter_text(path, chunk_bytes)) == text


def test_non_utf8_input_through_the_script(tmp_path):
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"caf\xe9 au lait\n" * 3)
    proc = subprocess.run([sys.executable, "prepare/shakespeare_char.py", "--input", str(bad),
                           "--data_root", str(tmp_path), "--chunk_bytes", "3"],
                          cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 1
    assert proc.stderr == (f"error: {bad} is not valid UTF-8: bad byte 0xe9 at byte offset 3 "
                           "(invalid continuation byte); convert it first (e.g. iconv -f latin1 -t utf-8)\n")
    assert not (tmp_path / "shakespeare_char").exists()


# --- finding the input -------------------------------------------------------------------

def test_missing_input_is_a_clear_error(tmp_path, capsys):
    missing = tmp_path / "nope.txt"
    err = run_error(shakespeare_char.main, ["--input", str(missing), "--data_root", str(tmp_path)], capsys)
    assert str(missing) in err and "does not exist" in err


def test_download_failure_is_a_clear_error(tmp_path, monkeypatch, capsys):
    def offline(url, timeout=None):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    err = run_error(shakespeare.main, ["--data_root", str(tmp_path)], capsys)
    data_dir = tmp_path / "shakespeare"
    assert f"could not download {shakespeare.URL} (no network)" in err
    assert "--input" in err and str(data_dir / "input.txt") in err
    assert list(data_dir.iterdir()) == []  # no partial download left behind


def test_checksum_mismatch_leaves_no_file(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(urllib.request, "urlopen", lambda url, timeout=None: io.BytesIO(b"not shakespeare"))
    err = run_error(shakespeare_char.main, ["--data_root", str(tmp_path)], capsys)
    assert "checksum mismatch" in err and shakespeare_char.SHA256 in err
    assert list((tmp_path / "shakespeare_char").iterdir()) == []


def test_download_then_reuse_local_copy(tmp_path, monkeypatch, text):
    payload = SHAKESPEARE.read_bytes()
    monkeypatch.setattr(urllib.request, "urlopen", lambda url, timeout=None: io.BytesIO(payload))
    shakespeare_char.main(["--data_root", str(tmp_path)])
    data_dir = tmp_path / "shakespeare_char"
    assert read(data_dir / "input.txt") == text

    def offline(url, timeout=None):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(urllib.request, "urlopen", offline)  # the second run must not download
    meta = shakespeare_char.main(["--data_root", str(tmp_path)])
    assert meta["source"] == str(data_dir / "input.txt") and meta["train_tokens"] == int(len(text) * 0.9)
