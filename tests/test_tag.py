"""Task "tag" on tiny CPU runs: BIO tags from spans and their entity counts, prepare/tags.py and its errors, a tagger
that learns (per-class precision, recall, F1), padding, LoRA on a language model's checkpoint, and sample.py's tags."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

import sample as sample_mod
from conftest import REPO, error_of, run_train
from model import GPTConfig
from sologpt import bio, tag, tokenizer
from sologpt.configurator import load_config
from tools import export as export_mod, score as score_mod


def test_spans_become_bio_tags_of_words_and_entities_are_counted():
    words, tags = bio.spans_to_tags("I saw New York, then Paris.", [{"start": 6, "end": 14, "label": "LOC"},
                                                                    {"start": 21, "end": 26, "label": "LOC"}])
    assert words == ["I", "saw", "New", "York,", "then", "Paris."] and tags == ["O", "O", "B-LOC", "I-LOC", "O",
                                                                                "B-LOC"]
    assert bio.entities(tags) == {("LOC", 2, 3), ("LOC", 5, 5)}
    assert bio.entities(["I-PER", "I-PER", "B-PER", "I-LOC"]) == {("PER", 0, 1), ("PER", 2, 2), ("LOC", 3, 3)}
    names = ["O", "B-LOC", "I-LOC", "B-PER", "I-PER"]
    c = bio.counts(["B-LOC", "I-LOC", "O", "B-PER"], ["B-LOC", "O", "O", "B-PER"], names)
    assert c == {"LOC": [0, 1, 1], "PER": [1, 1, 1]}  # the LOC entity was found only in part: no hit
    assert bio.scores(c) == {"LOC": (0.0, 0.0, 0.0), "PER": (1.0, 1.0, 1.0)}
    assert bio.scheme(["NOUN", "VERB"]) == "plain" and bio.counts(["NOUN", "VERB"], ["NOUN", "NOUN"],
                                                                 ["NOUN", "VERB"]) == {"NOUN": [1, 2, 1],
                                                                                       "VERB": [0, 0, 1]}
    enc = tokenizer.from_meta({"tokenizer": "gpt2", "vocab_size": 50257})
    ids, last = bio.encode_words(enc, ["Tokenization", "is", "fun"])
    assert enc.decode(ids) == "Tokenization is fun" and enc.decode(ids[:last[0] + 1]) == "Tokenization"
    assert last[1:] == [last[0] + 1, last[0] + 2]


def prepare(tmp, rows, val_rows, *extra):
    for name, r in (("train", rows), ("val", val_rows)):
        (tmp / f"{name}.jsonl").write_text("".join(json.dumps(x) + "\n" for x in r), encoding="utf-8")
    cmd = [sys.executable, "prepare/tags.py", f"--input={tmp / 'train.jsonl'}", f"--val_input={tmp / 'val.jsonl'}",
           "--name=t", f"--data_root={tmp / 'data'}", "--tokenizer=char", *extra]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)


def easy_rows(n, seed):
    """Words of letters a..f; 'xx' and 'yy' words are entities of kinds X and Y (an 'xx' after another starts none)."""
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(n):
        words = ["".join(rng.choice(list("abcdef"), size=3)) for _ in range(6)]
        tags = ["O"] * 6
        for kind in ("X", "Y"):
            i = int(rng.integers(6))
            words[i], tags[i] = kind.lower() * 2, f"B-{kind}"
        rows.append({"tokens": words, "tags": tags})
    return rows


@pytest.fixture(scope="module")
def tagger(tmp_path_factory):
    root = tmp_path_factory.mktemp("tag")
    res = prepare(root, easy_rows(400, 0), easy_rows(40, 1))
    assert res.returncode == 0, res.stderr
    out = root / "out"
    run_train([f"--data_root={root / 'data'}", "--dataset=t", f"--out_dir={out}", "--device=cpu", "--task=tag",
               "--n_layer=1", "--n_head=2", "--n_embd=32", "--block_size=32", "--batch_size=32", "--max_iters=60",
               "--eval_interval=30", "--eval_iters=2", "--learning_rate=1e-2", "--warmup_iters=5", "--progress=False"])
    return root


def test_the_tagger_learns_its_tags_and_sample_prints_them(tagger, capsys):
    meta = json.loads((tagger / "data" / "t" / "meta.json").read_text(encoding="utf-8"))
    assert meta["tags"] == ["O", "B-X", "B-Y"] and meta["tag_scheme"] == "bio"
    m = [json.loads(x) for x in (tagger / "out" / "metrics.jsonl").read_text().splitlines()]
    m = [x for x in m if x.get("kind", "eval") == "eval"]  # lines without a "kind" are evaluations
    assert m[-1]["val_f1_X"] >= 0.9 and m[-1]["val_f1_Y"] >= 0.9 and m[-1]["val_accuracy"] >= 0.95, m[-1]
    assert m[-1]["val_macro_f1"] == pytest.approx((m[-1]["val_f1_X"] + m[-1]["val_f1_Y"]) / 2)
    assert {"val_precision_X", "val_recall_Y"} <= set(m[-1]) and m[0]["val_loss"] > 2 * m[-1]["val_loss"]
    tags = sample_mod.sample(load_config(sample_mod.SampleConfig, [f"--out_dir={tagger / 'out'}", "--device=cpu",
                                                                   "--start=abc yy def xx"]))
    assert tags == [[("abc", "O"), ("yy", "B-Y"), ("def", "O"), ("xx", "B-X")]]
    assert "abc/O yy/B-Y def/O xx/B-X" in capsys.readouterr().out


def test_padding_does_not_change_the_tags():
    torch.manual_seed(0)
    model = tag.Tagger(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=64, n_tags=5)).eval()
    ids = torch.randint(1, 64, (1, 7))
    padded = torch.cat([ids, torch.zeros(1, 9, dtype=torch.long)], dim=1)
    torch.testing.assert_close(model(padded)[0][:, :7], model(ids)[0], rtol=1e-5, atol=1e-5)


def test_a_language_model_checkpoint_becomes_a_tagger_with_lora(tagger, tiny_flags, tmp_path, capsys):
    """From a character LM's checkpoint (its table extended with --vocab_from), LoRA adapters plus a new head; the
    run's small checkpoint loads in sample.py (base rebuilt, adapters merged); export and score refuse a tagger."""
    run_train(tiny_flags + ["--max_iters=2"])
    lm = tmp_path / "out"
    res = prepare(tmp_path, easy_rows(100, 2), easy_rows(10, 3), f"--vocab_from={lm}")
    assert res.returncode == 0, res.stderr
    out = tmp_path / "tagger"
    run_train([f"--data_root={tmp_path / 'data'}", "--dataset=t", f"--out_dir={out}", "--device=cpu", "--task=tag",
               f"--init_from={lm / 'ckpt.pt'}", "--lora_rank=2", "--block_size=32", "--batch_size=8", "--max_iters=3",
               "--eval_interval=3", "--eval_iters=1", "--progress=False"])
    capsys.readouterr()
    tags = sample_mod.sample(load_config(sample_mod.SampleConfig, [f"--out_dir={out}", "--device=cpu",
                                                                   "--start=abc xx"]))
    assert [w for w, _ in tags[0]] == ["abc", "xx"] and all(t in ("O", "B-X", "B-Y") for _, t in tags[0])
    assert "a tagger (n_tags > 0) cannot be exported" in error_of(export_mod.main, [f"--out_dir={out}", f"--hf_dir={tmp_path / 'hf'}"],
                                              capsys)
    (tmp_path / "text.txt").write_text("abc def\n", encoding="utf-8")
    assert "is a tagger: scoring needs a language model" in error_of(score_mod.main, [f"--out_dir={out}", f"--input={tmp_path / 'text.txt'}",
                                                               "--device=cpu"], capsys)


@pytest.mark.parametrize("rows, message", [
    ([{"tokens": ["a", "b"], "tags": ["O"]}], "train.jsonl:1 needs 'tags': one tag per word (2 words)"),
    ([{"tokens": ["a b"], "tags": ["O"]}], "not a list of words"),
    ([{"text": "ab cd", "spans": [{"start": 0, "end": 9, "label": "X"}]}], "outside its text"),
    ([{"text": "ab cd", "spans": [{"start": 0, "end": 2, "label": "X"}, {"start": 1, "end": 4, "label": "Y"}]}],
     "overlapping spans"),
    ([{"tokens": ["a"], "tags": ["O"]}], "only the tag 'O'"),
])
def test_prepare_bad_rows_are_one_line(tmp_path, rows, message):
    res = prepare(tmp_path, rows, [{"tokens": ["a"], "tags": ["O"]}])
    assert res.returncode == 1 and message in res.stderr and res.stderr.count("\n") == 1, res.stderr
    assert not (tmp_path / "data" / "t").exists()
