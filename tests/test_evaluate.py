"""tools/evaluate.py on language models: a dataset's split as tokens equals tools/score.py on the same text, a split
scored as text (documents re-tokenized by the model, other tokenizers too), text files, and the errors. The
classifier side is tested with a trained classifier in tests/test_classify.py."""

import json
import math

import numpy as np
import pytest

from conftest import SHAKESPEARE, error_of
from prepare import text as text_prep
from sologpt import tokenizer
from sologpt.configurator import load_config
from tools import evaluate as evaluate_mod, score as score_mod


def evaluate(argv):
    return evaluate_mod.evaluate(load_config(evaluate_mod.EvaluateConfig, argv + ["--device=cpu"]))


def test_a_split_scores_as_tools_score_scores_its_text(trained, char_data, tmp_path):
    meta = json.loads((char_data / "tiny" / "meta.json").read_text())
    val = np.fromfile(char_data / "tiny" / "val.bin", dtype=meta["dtype"])
    text = tmp_path / "val.txt"
    text.write_text(tokenizer.from_meta(meta).decode(val.tolist()), encoding="utf-8")
    (name, got), = evaluate([f"--out_dir={trained}", "--stride=16", "--batch_size=64"]).items()  # the run's dataset
    want = score_mod.score(load_config(score_mod.ScoreConfig, [f"--out_dir={trained}", f"--input={text}",
                                                               "--stride=16", "--device=cpu"]))
    assert name == f"{char_data / 'tiny'} val" and got["tokens"] == len(val) - 1 == got["characters"]
    for key in ("total_nll", "perplexity", "bits_per_char"):
        assert got[key] == pytest.approx(want[key], rel=1e-6), key
    # the same text as a file, and the split as text (one document: the same again), through --dataset
    files = evaluate([f"--out_dir={trained}", f"--input={text},{text}", "--stride=16"])  # each file once
    assert list(files) == [str(text)] and files[str(text)]["total_nll"] == pytest.approx(want["total_nll"], 1e-6)
    as_text = evaluate([f"--out_dir={trained}", f"--data_root={char_data}", "--dataset=tiny", "--as_text=True",
                        "--stride=16", f"--metrics={tmp_path / 'm.json'}"])
    (r,) = as_text.values()
    assert r["documents"] == 1 and r["total_nll"] == pytest.approx(want["total_nll"], rel=1e-6)
    assert json.loads((tmp_path / "m.json").read_text())["model"] == str(trained / "ckpt.pt")


def test_documents_as_text_under_another_tokenizer(gpt2_setup, tmp_path):
    """A GPT-2 directory on a character dataset of several documents: each val document is decoded, tokenized
    with GPT-2's BPE and scored on its own; meta.json's val_documents count them."""
    lines = [line for line in SHAKESPEARE.read_text(encoding="utf-8").splitlines() if line.strip()]
    docs = [" ".join(lines[8 * i:8 * i + 8]) for i in range(40)]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs), encoding="utf-8")
    meta = text_prep.main([str(tmp_path / "d.jsonl"), "--name", "docs", "--data_root", str(tmp_path / "data"),
                           "--tokenizer", "char", "--workers", "1", "--min_split_tokens", "1", "--val_fraction", "0.3"])
    n_val = meta["report"]["documents_val"]
    assert len(meta["val_documents"]) == n_val > 1
    val_docs = [docs[line - 1] for _, line in meta["val_documents"]]
    (name, r), = evaluate([f"--out_dir={gpt2_setup / 'gpt2'}", f"--data_root={tmp_path / 'data'}",
                           "--dataset=docs"]).items()
    assert name.endswith("docs val (as text)") and r["documents"] == n_val
    # the same as scoring each document as its own file
    total = chars = 0
    for i, doc in enumerate(val_docs):
        (tmp_path / f"{i}.txt").write_text(doc, encoding="utf-8")
        s = score_mod.score(load_config(score_mod.ScoreConfig, [f"--hf_dir={gpt2_setup / 'gpt2'}",
                                                                f"--input={tmp_path / f'{i}.txt'}", "--device=cpu"]))
        total, chars = total + s["total_nll"], chars + s["characters"]
    assert r["total_nll"] == pytest.approx(total, rel=1e-6) and r["characters"] == chars
    assert r["bits_per_char"] == pytest.approx(total / math.log(2) / chars, rel=1e-6)
    # a meta.json whose list disagrees with val.bin is caught
    bad = {**json.loads((tmp_path / "data" / "docs" / "meta.json").read_text()), "val_documents": [[0, 1]]}
    (tmp_path / "data" / "docs" / "meta.json").write_text(json.dumps(bad))
    with pytest.raises(evaluate_mod.UserError, match=f"val.bin holds {n_val} documents but meta.json lists 1"):
        evaluate([f"--out_dir={gpt2_setup / 'gpt2'}", f"--data_root={tmp_path / 'data'}", "--dataset=docs"])


def test_errors(trained, char_data, tmp_path, capsys):
    def err(*argv):
        return error_of(evaluate_mod.main, [f"--out_dir={trained}", *argv], capsys)

    assert "pass --input or --dataset, not both" in err("--input=x.txt", "--dataset=tiny")
    assert "split='test' is unknown" in err("--split=test")
    assert "--dataset=nope: no meta.json" in err("--dataset=nope")
    assert "cannot read --input" in err(f"--input={tmp_path / 'none.txt'}")
    assert "stride=999 must be between 1" in err("--stride=999")
