"""Tests for prepare/text.py and its helpers prepare/clean.py and prepare/dedup.py: every cleaning rule and
filter, exact and near dedup, the document split, the separators, bad input of every kind, the char path,
worker determinism, and the one-line errors of the command line. Small inputs in tmp_path: fast on 2 cores."""

import gzip
import json
import subprocess
import sys
import unicodedata

import numpy as np
import pytest

from sologpt import tokenizer
from prepare import text as prep
from prepare.clean import CLEAN_RULES, Limits, WORD, clean, mean_word_length, quality_problem
from prepare.common import decode_text
from prepare.dedup import NearDuplicates, char_shingles, exact_key, lsh_bands, minhash, minhash_params, word_shingles

from conftest import REPO, SHAKESPEARE, SHARED

UDHR = SHARED / "data" / "udhr"
WEBTEXT = SHARED / "data" / "webtext"
EOT = 50256
ALL_RULES = set(CLEAN_RULES)


def paragraphs(n, start=0):
    """n different English documents of ~50 words: 8 lines of tiny-shakespeare each, joined by spaces."""
    lines = [line.strip() for line in SHAKESPEARE.read_text(encoding="utf-8").splitlines() if line.strip()]
    return [" ".join(lines[8 * i:8 * i + 8]) for i in range(start, start + n)]


def write_jsonl(path, docs):
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs), encoding="utf-8")
    return path


def prepare(tmp_path, *inputs, name="out", workers=1, flags=()):
    """Run prepare/text.py's main in-process (one worker, no size floor, 30% val so that a few documents
    surely give both splits); return meta, train ids, val ids."""
    argv = [str(p) for p in inputs] + ["--name", name, "--data_root", str(tmp_path / "data"), "--workers",
                                       str(workers), "--min_split_tokens", "1", "--val_fraction", "0.3", *flags]
    meta = prep.main(argv)
    out = tmp_path / "data" / name
    train = np.fromfile(out / "train.bin", dtype=meta["dtype"])
    val = np.fromfile(out / "val.bin", dtype=meta["dtype"])
    return meta, train, val


def split_docs(ids, eot):
    """The token stream cut at the separators: one id list per document."""
    docs, cur = [], []
    for i in ids.tolist():
        if i == eot:
            docs.append(cur)
            cur = []
        else:
            cur.append(i)
    return docs + [cur] if cur or docs else docs


def cli(*args):
    return subprocess.run([sys.executable, "prepare/text.py", *map(str, args)], cwd=REPO, capture_output=True,
                          text=True)


def assert_one_error_line(proc, *fragments):
    assert proc.returncode == 1, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if not line.startswith("warning: ")]
    assert len(errors) == 1 and errors[0].startswith("error: "), proc.stderr
    for f in fragments:
        assert f in errors[0], errors[0]
    assert "Traceback" not in proc.stderr


# --- cleaning ------------------------------------------------------------------------------

def test_nfc():
    assert clean("cafe\u0301", {"nfc"}) == ("café", ["nfc"])
    assert clean("café", {"nfc"}) == ("café", [])


def test_control_characters_and_line_ends():
    text = "a\r\nb\rc\x85d\x00e\x07f\tg\u2028h\x9f"
    assert clean(text, {"control"}) == ("a\nb\nc\ndef\tg\nh", ["control"])
    assert clean(text, set()) == (text, [])  # off: untouched


def test_html_tags_and_entities():
    text = "<p>Hello <b>world</b></p><script>var x = 1;</script><!-- hidden -->&amp; &lt;b&gt; &#233;&eacute;"
    assert clean(text, {"html"}) == ("\nHello world\n& <b> éé", ["html"])  # escaped "<b>" is text, kept
    plain = "press <Ctrl-N> or <name>, x < y > z, AT&T & co"  # not HTML: untouched
    assert clean(plain, {"html"}) == (plain, [])


def test_urls_and_emails():
    text = "see https://example.com/a?b=1. or www.example.org (http://a.b/c) and mail bob.smith+x@mail.example.co.uk!"
    assert clean(text, {"urls"}) == ("see . or  () and mail bob.smith+x@mail.example.co.uk!", ["urls"])
    assert clean(text, {"emails"})[0].endswith("and mail !")
    assert not prep.parse_args(["x", "--name", "n"]).urls  # URLs carry meaning: kept unless asked


def test_whitespace():
    text = "  a   b\t\tc  \n\n\n\n  indented  \nlast \n\n"
    assert clean(text, {"whitespace"}) == ("a b c\n\n  indented\nlast", ["whitespace"])


@pytest.mark.parametrize("lang", sorted(p.stem for p in UDHR.glob("*.txt")))
def test_cleaning_keeps_every_script(lang):
    # Chinese, Arabic, Hindi, ... come out unchanged apart from NFC; the whitespace rule only moves spaces.
    raw = (UDHR / f"{lang}.txt").read_text(encoding="utf-8")
    nfc = unicodedata.normalize("NFC", raw)
    assert clean(raw, ALL_RULES - {"whitespace"})[0] == nfc
    assert clean(raw, ALL_RULES)[0].split() == nfc.split()


# --- quality filters -------------------------------------------------------------------------

def problem(text, **limits):
    lim = Limits(**limits)
    return quality_problem(text, WORD.findall(text), lim)


def test_each_filter():
    prose = "The quick brown fox jumps over the lazy dog near the quiet river bank today."
    everything = dict(min_chars=10, min_words=5, max_symbol_ratio=0.3, max_digit_ratio=0.3, max_repeated_lines=0.2,
                      max_repeated_ngrams=0.3, min_mean_word_length=2, max_mean_word_length=12)
    assert problem(prose, **everything) is None
    assert problem("tiny", min_chars=10) == "min_chars"
    assert problem("only three words", min_words=5) == "min_words"
    assert problem("#### $$$$ %%%% @@@@ !!!! && ok ok", max_symbol_ratio=0.3) == "symbol_ratio"
    assert problem("call 555 1234 5678 9012 3456 now", max_digit_ratio=0.3) == "digit_ratio"
    assert problem("buy cheap pills now\n" * 5 + prose, max_repeated_lines=0.2) == "repeated_lines"
    assert problem("buy cheap pills now " * 10 + prose, max_repeated_ngrams=0.3) == "repeated_ngrams"
    assert problem("a b c d e f g h i j", min_mean_word_length=2) == "mean_word_length"
    assert problem("Pneumonoultramicroscopicsilicovolcanoconiosis floccinaucinihilipilification",
                   max_mean_word_length=12) == "mean_word_length"
    assert problem("tiny", min_chars=0, min_words=0) is None  # 0 switches a rule off


def test_filters_do_not_drop_scripts_without_spaces():
    defaults = prep.limits_from(prep.parse_args(["x", "--name", "n"]))
    for path in sorted(UDHR.glob("*.txt")):  # all 16 languages pass the default filters
        text = clean(path.read_text(encoding="utf-8"), ALL_RULES)[0]
        assert quality_problem(text, WORD.findall(text), defaults) is None, path.name
    zh = clean((UDHR / "cmn_hans.txt").read_text(encoding="utf-8"), ALL_RULES)[0]
    ja = clean((UDHR / "jpn.txt").read_text(encoding="utf-8"), ALL_RULES)[0]
    for text in (zh, ja):  # a sentence is many words, not one enormous word; no mean length to judge
        assert len(WORD.findall(text)) > len(text) / 2
        assert mean_word_length(text, WORD.findall(text)) is None
    assert problem("人人生而自由", min_words=5) is None  # six characters are six words
    assert problem("すべての人間は", min_words=5) is None


# --- dedup -----------------------------------------------------------------------------------

def test_exact_key_ignores_case_and_spacing():
    assert exact_key("Hello  World\n") == exact_key("hello world") != exact_key("hello, world")


def test_lsh_bands_follow_the_threshold():
    for t in (0.5, 0.8, 0.9):
        bands, rows = lsh_bands(t, 128)
        assert bands * rows <= 128 and 1 - (1 - (t + 0.05) ** rows) ** bands > 0.9  # just above t: found
    assert lsh_bands(0.9, 128)[1] > lsh_bands(0.5, 128)[1]  # stricter threshold, longer bands


@pytest.mark.parametrize("unit", ["word", "char"])
def test_near_duplicates(unit):
    a = " ".join(paragraphs(6))
    edited = a.replace("Citizen", "Citizens", 1).replace(" the ", " a ", 2)  # lightly edited copy
    other = " ".join(paragraphs(6, start=20))
    params = minhash_params(128)

    def sig(text):
        return minhash(word_shingles(WORD.findall(text)) if unit == "word" else char_shingles(text), params)

    near = NearDuplicates(0.8, 128)
    assert not near.is_duplicate(sig(a))
    assert not near.is_duplicate(sig(other))
    assert near.is_duplicate(sig(edited))
    assert near.count == 2  # only kept documents are remembered
    # the estimate is close to the true Jaccard similarity of the shingle sets
    sa, sb = (set((word_shingles(WORD.findall(t)) if unit == "word" else char_shingles(t)).tolist())
              for t in (a, edited))
    assert abs((sig(a) == sig(edited)).mean() - len(sa & sb) / len(sa | sb)) < 0.1


@pytest.mark.parametrize("threshold, differ, duplicate", [
    (0.8, 25, True), (0.8, 26, False),  # 103/128 = 0.805 >= 0.8; 102/128 = 0.797 just below
    (0.5, 64, True), (0.5, 65, False),  # 64/128 = 0.5 exactly counts (>=); one position less does not
    (0.9, 12, True), (0.9, 13, False)])
def test_near_duplicate_threshold_is_where_the_line_is(threshold, differ, duplicate):
    """A pair that shares whole LSH bands (so it is compared) is a duplicate from the threshold up and never below:
    signatures that differ in their last `differ` of 128 positions have estimated similarity 1 - differ / 128."""
    a = np.random.default_rng(0).integers(0, 2**32 - 1, size=128, dtype=np.uint32)
    b = a.copy()
    b[128 - differ:] += 1
    near = NearDuplicates(threshold, 128)
    assert not near.is_duplicate(a)
    assert near.is_duplicate(b) is duplicate
    assert near.count == (1 if duplicate else 2)


def test_the_near_dedup_flag_sets_the_threshold(tmp_path):
    """Two documents of about 0.6 estimated similarity: removed at --near_dedup 0.4, kept at 0.8 (the near-copy and
    unrelated pair of test_dedup_through_the_script would pass a script that ignored the flag)."""
    words = " ".join(paragraphs(6)).split()[:150]
    other = list(words)
    for i in range(0, 150, 20):  # change one word in 20: about 3 in 4 five-word shingles survive
        other[i] = other[i] + "x"
    a, b = " ".join(words), " ".join(other)
    sa, sb = (set(word_shingles(WORD.findall(t)).tolist()) for t in (a, b))
    assert 0.5 < len(sa & sb) / len(sa | sb) < 0.7
    corpus = write_jsonl(tmp_path / "d.jsonl", [a, b] + paragraphs(4, start=30))
    removed = [prepare(tmp_path, corpus, name=f"t{t}", flags=["--near_dedup", str(t)])[0]["report"]["removed"]
               ["near_duplicate"] for t in (0.4, 0.8)]
    assert removed == [1, 0]


def test_dedup_through_the_script(tmp_path):
    docs = paragraphs(30)
    a = docs[0] + " " + docs[1]
    corpus = docs[2:] + [a, a.upper().replace(" ", "  "), a.replace(" the ", " a ", 1)]
    meta, train, val = prepare(tmp_path, write_jsonl(tmp_path / "d.jsonl", corpus), flags=["--no-whitespace"])
    r = meta["report"]
    assert r["documents_in"] == 31 and r["removed"]["exact_duplicate"] == 1
    assert r["removed"]["near_duplicate"] == 1 and r["documents_kept"] == 29
    meta, _, _ = prepare(tmp_path, tmp_path / "d.jsonl", name="nodedup", flags=["--no-dedup", "--near_dedup", "0"])
    assert meta["report"]["documents_kept"] == 31


# --- split, separators, determinism ----------------------------------------------------------

def test_split_by_document_with_separators(tmp_path):
    docs = paragraphs(60)
    meta, train, val = prepare(tmp_path, write_jsonl(tmp_path / "d.jsonl", docs))
    enc = tokenizer.from_meta(meta)
    r = meta["report"]
    assert meta["eot_token"] == EOT and r["documents_train"] + r["documents_val"] == 60 and r["documents_val"] > 0
    for ids, n in ((train, r["documents_train"]), (val, r["documents_val"])):
        assert ids[0] != EOT and ids[-1] != EOT and (ids == EOT).sum() == n - 1  # between documents only
    pieces = [enc.decode(d) for d in split_docs(train, EOT) + split_docs(val, EOT)]
    assert sorted(pieces) == sorted(docs)  # every document whole, on one side
    # meta.json says which ones went to val, in val.bin's order: [source file, line] (JSONL lines count from 1)
    assert [docs[line - 1] for _, line in meta["val_documents"]] == [enc.decode(d) for d in split_docs(val, EOT)]
    assert {f for f, _ in meta["val_documents"]} == {0} and meta["source"] == [str(tmp_path / "d.jsonl")]
    assert (meta["train_tokens"], meta["val_tokens"]) == (len(train), len(val))


def test_split_is_seeded_and_deterministic(tmp_path):
    src = write_jsonl(tmp_path / "d.jsonl", paragraphs(60))
    runs = {}
    for name, seed in (("a", 1), ("b", 1), ("c", 2)):
        prepare(tmp_path, src, name=name, flags=["--seed", str(seed)])
        runs[name] = (tmp_path / "data" / name / "val.bin").read_bytes()
    assert runs["a"] == runs["b"] and runs["a"] != runs["c"]
    # the side a document lands on depends on its text, not on its position
    reversed_src = write_jsonl(tmp_path / "r.jsonl", paragraphs(60)[::-1])
    meta, _, val = prepare(tmp_path, reversed_src, name="r", flags=["--seed", "1"])
    enc = tokenizer.from_meta(meta)
    first = np.frombuffer(runs["a"], dtype=meta["dtype"])
    assert sorted(enc.decode(d) for d in split_docs(val, EOT)) == sorted(enc.decode(d) for d in split_docs(first, EOT))


def test_workers_give_the_same_bytes(tmp_path, monkeypatch):
    monkeypatch.setattr(prep, "BATCH_CHARS", 2000)  # many small batches, so both workers get some
    src = write_jsonl(tmp_path / "d.jsonl", paragraphs(80) + paragraphs(3))  # with duplicates to drop
    outputs = {}
    for workers in (1, 2):
        meta, train, val = prepare(tmp_path, src, name=f"w{workers}", workers=workers)
        outputs[workers] = (train.tobytes(), val.tobytes(), meta["report"]["removed"], meta["val_documents"])
    assert outputs[1] == outputs[2]


# --- inputs ----------------------------------------------------------------------------------

def test_txt_md_gz_folders_and_globs(tmp_path):
    docs = paragraphs(12)
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    for i, d in enumerate(docs[:4]):
        (src / "sub" / f"{i}.txt").write_text(d, encoding="utf-8")
    (src / "a.md").write_text(docs[4], encoding="utf-8")
    with gzip.open(src / "b.txt.gz", "wt", encoding="utf-8") as f:
        f.write(docs[5])
    with gzip.open(src / "c.jsonl.gz", "wt", encoding="utf-8") as f:
        f.write("".join(json.dumps({"body": d}) + "\n" for d in docs[6:]))
    (src / "notes.csv").write_text("ignored,file\n", encoding="utf-8")
    meta, train, val = prepare(tmp_path, src, flags=["--text_field", "body"])
    enc = tokenizer.from_meta(meta)
    assert meta["report"]["files_read"] == 7 and meta["report"]["documents_in"] == 12
    assert sorted(enc.decode(d) for d in split_docs(train, EOT) + split_docs(val, EOT)) == sorted(docs)
    meta, _, _ = prepare(tmp_path, f"{src}/sub/*.txt", src / "a.md", name="glob")
    assert meta["report"]["files_read"] == 5


def test_bad_jsonl_lines_are_counted_and_skipped(tmp_path):
    good = paragraphs(10)
    lines = [json.dumps({"text": d}) for d in good[:5]] + ["{not json", "", "[1, 2]", json.dumps({"title": "x"}),
                                                           json.dumps({"text": 3})] + \
            [json.dumps({"text": d}) for d in good[5:]]
    (tmp_path / "d.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    meta, _, _ = prepare(tmp_path, tmp_path / "d.jsonl")
    r = meta["report"]
    assert r["invalid_jsonl_lines"] == 4 and r["documents_in"] == 10  # the empty line is no document, no error
    assert any("d.jsonl:6: is not valid JSON" in w for w in r["warnings"])
    proc = cli(tmp_path / "d.jsonl", "--name", "s", "--data_root", tmp_path / "cli", "--strict")
    assert_one_error_line(proc, f"{tmp_path / 'd.jsonl'}:6: is not valid JSON")
    assert not (tmp_path / "cli" / "s" / "meta.json").exists()


def test_binary_and_corrupt_files_are_skipped(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for i, d in enumerate(paragraphs(6)):
        (src / f"{i}.txt").write_text(d, encoding="utf-8")
    (src / "image.txt").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256)))
    (src / "broken.txt.gz").write_bytes(b"\x1f\x8b\x08\x00 not really gzip")
    meta, _, _ = prepare(tmp_path, src)
    r = meta["report"]
    assert (r["binary_files"], r["unreadable_files"], r["documents_in"]) == (1, 1, 6)
    (src / "broken.txt.gz").unlink()
    with pytest.raises(prep.PrepareError, match="image.txt: has NUL bytes"):
        prep.write_dataset(prep.parse_args([str(src), "--name", "x", "--data_root", str(tmp_path), "--strict"]))


def test_non_utf8_bytes(tmp_path):
    # cp1252 ("é", curly quotes), and a UTF-8 file with one stray Latin-1 byte, like webtext/wine.txt
    a, b = paragraphs(2)
    (tmp_path / "a.txt").write_bytes(f"{a} caf\xe9 \x93quoted\x94".encode("latin-1"))
    (tmp_path / "b.txt").write_bytes(f"{b} naïve señor".encode("utf-8") + b" costs \xa320")
    meta, train, val = prepare(tmp_path, tmp_path / "a.txt", tmp_path / "b.txt", flags=["--val_fraction", "0.5"])
    text = tokenizer.from_meta(meta).decode(np.concatenate([train, val]).tolist())
    assert "café “quoted”" in text and "naïve señor" in text and "costs £20" in text
    assert meta["report"]["non_utf8_files"] == 2
    assert any("b.txt: 1 non-UTF-8 byte(s) decoded as cp1252" in w for w in meta["report"]["warnings"])
    assert decode_text(b"caf\xe9 \x81", "replace") == ("caf\ufffd \ufffd", 2)
    assert decode_text(b"caf\xe9 \x81") == ("café \x81", 2)  # cp1252 leaves 0x81 unassigned: Latin-1's
    assert decode_text(b"caf\xe9", "skip") == (None, 0)
    assert decode_text("\ufeffbom".encode("utf-8"), "skip") == ("bom", 0)


def test_webtext_mixed_encodings(tmp_path):
    meta, train, val = prepare(tmp_path, WEBTEXT / "wine.txt", WEBTEXT / "firefox.txt", flags=["--val_fraction", "0.5"])
    text = tokenizer.from_meta(meta).decode(np.concatenate([train, val]).tolist())
    assert "\x85" not in text and "\r" not in text  # NEL and CRLF became \n
    assert text.count("\ufffd") == 2  # firefox.txt's own: one U+FFFD and one "&#65533;"; the fallback adds none
    assert "£20" in text and "Fahrpläne" in text  # wine.txt's one Latin-1 byte, firefox.txt is cp1252
    assert meta["report"]["non_utf8_files"] == 2


# --- errors ----------------------------------------------------------------------------------

def test_input_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "data.csv").write_text("a,b\n", encoding="utf-8")
    (tmp_path / "blank.txt").write_text(" \n", encoding="utf-8")
    (tmp_path / "bad.jsonl").write_text("not json\n", encoding="utf-8")
    cases = [([tmp_path / "empty"], "holds no .txt, .md, .jsonl files"),
             ([tmp_path / "missing.txt"], "does not exist"),
             ([tmp_path / "empty" / "data.csv"], "is not a .txt, .md, .jsonl file"),
             ([f"{tmp_path}/*.md"], "matches no .txt, .md, .jsonl files"),
             ([tmp_path / "bad.jsonl"], r"no documents in the 1 input files \(0 binary, 0 unreadable, 1 invalid"),
             ([tmp_path / "blank.txt"], r"all 1 documents were removed")]
    for inputs, message in cases:
        with pytest.raises(prep.PrepareError, match=message):
            prep.write_dataset(prep.parse_args([*map(str, inputs), "--name", "x", "--data_root", str(tmp_path)]))


def test_cli_errors_are_one_line(tmp_path):
    (tmp_path / "empty").mkdir()
    assert_one_error_line(cli(tmp_path / "empty", "--name", "x", "--data_root", tmp_path), "holds no .txt")
    small = write_jsonl(tmp_path / "small.jsonl", paragraphs(3))
    proc = cli(small, "--name", "x", "--data_root", tmp_path)
    assert_one_error_line(proc, "tokens, fewer than --min_split_tokens=1025", "3 kept documents")
    assert "documents kept" in proc.stdout  # the report says where the documents went
    assert sorted(p.name for p in (tmp_path / "x").iterdir()) == []  # nothing half-written


def test_failed_run_keeps_the_previous_dataset(tmp_path):
    prepare(tmp_path, write_jsonl(tmp_path / "d.jsonl", paragraphs(40)))
    out = tmp_path / "data" / "out"
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(prep.PrepareError):
        prep.write_dataset(prep.parse_args([str(write_jsonl(tmp_path / "s.jsonl", paragraphs(2))), "--name", "out",
                                            "--data_root", str(tmp_path / "data")]))
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


# --- tokenizers ------------------------------------------------------------------------------

def test_char_tokenizer(tmp_path):
    docs = [clean(p.read_text(encoding="utf-8"), ALL_RULES)[0] for p in sorted(UDHR.glob("*.txt"))]
    docs += paragraphs(10)
    meta, train, val = prepare(tmp_path, write_jsonl(tmp_path / "d.jsonl", docs), flags=["--tokenizer", "char"])
    chars = meta["chars"]
    assert meta["tokenizer"] == "char" and meta["vocab_size"] == len(chars) and meta["dtype"] == "uint16"
    assert list(chars) == sorted(chars) and chars[meta["eot_token"]] == prep.CHAR_EOT
    assert meta["max_token_id"] < len(chars)
    enc = tokenizer.from_meta(meta)
    assert enc.eot_token == meta["eot_token"]
    pieces = enc.decode(train.tolist()).split(prep.CHAR_EOT) + enc.decode(val.tolist()).split(prep.CHAR_EOT)
    assert sorted(pieces) == sorted(docs)
    assert set(chars) == set("".join(docs)) | {prep.CHAR_EOT}


def test_extra_tokens(tmp_path):
    terms = tmp_path / "terms.txt"
    terms.write_text("Kubernetes\n\nGPU cluster\nthe\nKubernetes\n", encoding="utf-8")  # blank, single token, repeat
    docs = [f"{d} Our GPU cluster runs Kubernetes." for d in paragraphs(20)]
    meta, train, val = prepare(tmp_path, write_jsonl(tmp_path / "d.jsonl", docs), flags=["--extra_tokens", str(terms)])
    assert meta["extra_tokens"] == ["Kubernetes", "GPU cluster"] and meta["vocab_size"] == 50259
    ids = np.concatenate([train, val])
    assert (ids == 50257).sum() == (ids == 50258).sum() == 20
    enc = tokenizer.from_meta(meta)
    assert sorted(enc.decode(d) for d in split_docs(train, EOT) + split_docs(val, EOT)) == sorted(docs)
    with pytest.raises(prep.PrepareError, match="--tokenizer gpt2"):
        prep.write_dataset(prep.parse_args([str(tmp_path / "d.jsonl"), "--name", "c", "--tokenizer", "char",
                                            "--extra_tokens", str(terms)]))
