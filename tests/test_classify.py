"""sologpt/classify.py and prepare/classify.py on tiny CPU runs: a classifier learns and reports accuracy,
its batches and padding, sample.py labels lines, and the errors for bad rows and mismatched data."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

import sample as sample_mod
import train as train_mod
from conftest import REPO, SHARED, error_of, run_train as run
from model import GPTConfig
from sologpt import classify
from sologpt.checkpoint import read as read_checkpoint
from sologpt.configurator import load_config
from sologpt.rundir import read_metrics
from tools import evaluate as evaluate_mod


# ---- classification -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def polarity(tmp_path_factory):
    """The first 600 labelled sentences of sentence_polarity at character level, 10% validation."""
    root = tmp_path_factory.mktemp("cls")
    rows = (SHARED / "data" / "sentence_polarity" / "train.jsonl").read_text(encoding="utf-8").splitlines()[:600]
    (root / "rows.jsonl").write_text("\n".join(rows) + "\n", encoding="utf-8")
    cmd = [sys.executable, "prepare/classify.py", f"--input={root / 'rows.jsonl'}", "--name=pol",
           f"--data_root={root / 'data'}", "--tokenizer=char"]
    res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    return root


@pytest.fixture(scope="module")
def easy_classes(tmp_path_factory):
    """A task a tiny model learns in a few dozen steps: the label is whether the text holds an 'x'."""
    root = tmp_path_factory.mktemp("easy")
    rng = np.random.default_rng(0)
    rows = []
    for i in range(400):
        words = ["".join(rng.choice(list("abcdefg"), size=4)) for _ in range(5)]
        if i % 2:
            words[rng.integers(5)] = "xxxx"
        rows.append({"text": " ".join(words), "label": "pos" if i % 2 else "neg"})
    write_rows(root / "rows.jsonl", rows)
    cmd = [sys.executable, "prepare/classify.py", f"--input={root / 'rows.jsonl'}", "--name=easy",
           f"--data_root={root / 'data'}", "--tokenizer=char"]
    res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    return root


@pytest.mark.parametrize("pool", ["last", "mean"])
def test_classifier_learns_and_reports_accuracy(easy_classes, tmp_path, pool, capsys):
    flags = [f"--data_root={easy_classes / 'data'}", "--dataset=easy", f"--out_dir={tmp_path / 'out'}",
             "--device=cpu", "--task=classify", f"--cls_pool={pool}", "--n_layer=1", "--n_head=2", "--n_embd=32",
             "--block_size=32", "--batch_size=32", "--max_iters=60", "--eval_interval=30", "--eval_iters=2",
             "--learning_rate=1e-2", "--warmup_iters=5", "--progress=False"]
    run(flags)
    lines = read_metrics(tmp_path / "out")
    last = lines[-1]
    assert last["val_accuracy"] >= 0.9 and last["val_macro_f1"] >= 0.9, last
    assert last["train_loss"] < 0.5 * lines[0]["train_loss"]
    # sample.py classifies each line of the prompt with the trained head
    labels = sample_mod.sample(load_config(sample_mod.SampleConfig, [f"--out_dir={tmp_path / 'out'}",
                                                                     "--device=cpu", "--start=abcd xxxx bcde fgab cdef\nabcd efga bcde fgab cdef"]))
    assert labels == ["pos", "neg"]
    printed = capsys.readouterr().out
    assert "val accuracy" in printed and "ppl" not in printed  # a classifier's evaluation line has no perplexity
    if pool == "last":
        evaluate_a_classifier(tmp_path / "out", easy_classes, last, tmp_path, capsys)


def evaluate_a_classifier(out, root, last, tmp_path, capsys):
    """tools/evaluate.py on a trained classifier: its own val split gives train.py's numbers; labelled rows (texts
    of several lines too) give accuracy, macro-F1, per-class figures, a confusion matrix and a predictions file."""
    def evaluate(*argv):
        return evaluate_mod.evaluate(load_config(evaluate_mod.EvaluateConfig, [f"--out_dir={out}", "--device=cpu",
                                                                               *argv]))

    (name, r), = evaluate().items()  # the run's dataset, val split
    assert name == "easy-val" and r["accuracy"] == last["val_accuracy"] and r["macro_f1"] == last["val_macro_f1"]
    rows = [{"text": "abcd xxxx\nbcde fgab cdef", "label": "pos"}, {"text": "abcd efga\nbcde fgab", "label": "pos"},
            {"text": "gfed cbag\nfedc", "label": "neg"}]
    write_rows(tmp_path / "new.jsonl", rows)
    (name, r), = evaluate(f"--input={tmp_path / 'new.jsonl'}", "--batch_size=2").items()
    preds = [json.loads(line) for line in (out / "predictions-new.jsonl").read_text().splitlines()]
    assert [p["text"] for p in preds] == [row["text"] for row in rows] and preds[0]["pred"] == "pos"
    assert [p["label"] for p in preds] == ["pos", "pos", "neg"]
    assert all(abs(sum(p["probs"].values()) - 1) < 1e-4 for p in preds)
    counts = np.array(r["confusion"])  # rows: the true label, columns: the predicted one
    assert counts.sum() == 3 and counts[1].sum() == 2 and r["accuracy"] == np.trace(counts) / 3
    assert r["per_class"]["pos"]["support"] == 2 and r["per_class"]["pos"]["recall"] == counts[1, 1] / 2
    printed = capsys.readouterr().out
    assert "confusion matrix (rows: true label, columns: predicted)" in printed and "macro-F1" in printed
    # rows without labels: predictions only; rows the model cannot take: one line
    write_rows(tmp_path / "unlabelled.jsonl", [{"text": "abcd xxxx"}])
    (_, r), = evaluate(f"--input={tmp_path / 'unlabelled.jsonl'}").items()
    assert "accuracy" not in r and json.loads((out / "predictions-unlabelled.jsonl").read_text())["pred"] == "pos"
    write_rows(tmp_path / "odd.jsonl", [{"text": "abcd", "label": "maybe"}])
    err = error_of(evaluate_mod.main, [f"--out_dir={out}", f"--input={tmp_path / 'odd.jsonl'}"], capsys)
    assert "has labels the model does not know: ['maybe'] (its labels: ['neg', 'pos'])" in err
    write_rows(tmp_path / "half.jsonl", [{"text": "abcd", "label": "pos"}, {"text": "efga"}])
    err = error_of(evaluate_mod.main, [f"--out_dir={out}", f"--input={tmp_path / 'half.jsonl'}"], capsys)
    assert "1 of 2 rows have no 'label'" in err


def test_classifier_batches_right_padded_and_truncated_from_the_left():
    tokens = np.arange(1, 11, dtype=np.uint16)  # examples [1..3], [4..10]
    split = (tokens, np.array([0, 3, 10]), np.array([0, 1]))
    x, lengths, y = classify.make_batch(split, np.array([0, 1]), 5, "cpu")
    assert x.tolist() == [[1, 2, 3, 0, 0], [6, 7, 8, 9, 10]] and lengths.tolist() == [3, 5] and y.tolist() == [0, 1]
    pred, true = np.array([0, 0, 1, 1]), np.array([0, 1, 1, 1])
    assert classify.macro_f1(pred, true, 2) == pytest.approx((2 / 3 + 0.8) / 2)


def test_padding_does_not_change_the_class_logits():
    torch.manual_seed(0)
    model = classify.Classifier(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=64,
                                          n_classes=3)).eval()
    ids = torch.randint(1, 64, (1, 7))
    padded = torch.cat([ids, torch.zeros(1, 9, dtype=torch.long)], dim=1)
    for pool in ("last", "mean"):
        model.config.cls_pool = pool
        alone = model(ids)[0]
        torch.testing.assert_close(model(padded, lengths=torch.tensor([7]))[0], alone, rtol=1e-5, atol=1e-5)


def write_rows(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")


@pytest.mark.parametrize("rows, message", [
    ([{"text": "a", "label": "x"}, {"text": "b"}], "rows.jsonl:2 has no label"),
    ([{"text": "a", "label": "x"}, {"text": "b", "label": "x"}], "only one class"),
    ([{"txt": "a", "label": "x"}], "rows.jsonl:1 has no text"),
])
def test_prepare_classify_bad_rows(tmp_path, rows, message):
    write_rows(tmp_path / "rows.jsonl", rows)
    cmd = [sys.executable, "prepare/classify.py", f"--input={tmp_path / 'rows.jsonl'}", "--name=x",
           f"--data_root={tmp_path}", "--tokenizer=char"]
    res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=60)
    assert res.returncode == 1 and message in res.stderr and res.stderr.count("\n") == 1, res.stderr
    assert not (tmp_path / "x" / "meta.json").exists()


def test_task_and_data_must_agree(polarity, tiny_flags, capsys):
    err = error_of(train_mod.main, [f"--data_root={polarity / 'data'}", "--dataset=pol", "--device=cpu"], capsys)
    assert "holds 'classify' data but task='lm'" in err
    err = error_of(train_mod.main, tiny_flags + ["--task=classify"], capsys)
    assert "holds 'lm' data but task='classify'" in err


def test_a_new_classifier_draws_its_weights_as_before_the_redesign():
    """The head is made before the weights are initialised, as GPT(n_classes=3) did: a classifier trained from
    scratch starts from the same weights (values printed by the pre-redesign model.py, seed 0)."""
    torch.manual_seed(0)
    m = classify.Classifier(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=64, n_classes=3))
    torch.testing.assert_close(m.cls_head.weight[0, :3], torch.tensor([0.018236180767, 0.002815536456, -0.008363409899]))
    torch.testing.assert_close(m.transformer.h[1].mlp.c_proj.weight[0, :2], torch.tensor([-0.012563676573,
                                                                                          -0.003797887824]))


def test_labelled_rows_in_the_tokenizer_of_a_pretrained_run(polarity, trained, char_data, tmp_path):
    """prepare/classify.py --tokenizer_from: the rows in the characters of another dataset (here tiny-shakespeare's),
    so a classifier starts from a model trained on it; characters it lacks are left out, with a warning."""
    cmd = [sys.executable, "prepare/classify.py", f"--input={polarity / 'rows.jsonl'}", "--name=pol_like",
           f"--data_root={tmp_path}", f"--tokenizer_from={trained}"]  # a run folder: its meta.json
    res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stderr.startswith("warning: ") and "characters the tokenizer of" in res.stderr
    meta, tiny = (json.loads(p.read_text()) for p in (tmp_path / "pol_like" / "meta.json",
                                                       char_data / "tiny" / "meta.json"))
    assert meta["chars"] == tiny["chars"] and meta["task"] == "classify"
    tokens, offsets, _ = classify.load_split(tmp_path / "pol_like", "train", meta)
    assert tokens[offsets[1] - 1] == tiny["chars"].index("\n")  # the end marker
    run([f"--data_root={tmp_path}", "--dataset=pol_like", f"--out_dir={tmp_path / 'out'}", "--device=cpu",
         "--task=classify", f"--init_from={trained}", "--block_size=32", "--batch_size=8", "--max_iters=2",
         "--eval_iters=1", "--progress=False"])
    assert read_checkpoint(tmp_path / "out" / "ckpt.pt")["model_config"]["n_classes"] == 2
