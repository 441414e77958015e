"""tools/score.py: strided NLL vs brute force, --hf_dir vs transformers, bits per character, and the errors."""

import json
import math
import subprocess
import sys
from contextlib import nullcontext

import pytest
import torch
import torch.nn.functional as F

from sologpt import checkpoint
from tools import score as score_mod
from sologpt.configurator import load_config
from conftest import REPO, SHAKESPEARE
from model import GPT, GPTConfig
from sologpt.checkpoint import FORMAT_VERSION as CKPT_FORMAT_VERSION

TEXT = SHAKESPEARE.read_text(encoding="utf-8")[:3000]


def write_run(folder, model, meta):
    """An out_dir as train.py leaves it, minus the training state score.py never reads."""
    folder.mkdir(parents=True, exist_ok=True)
    ckpt = {"format_version": CKPT_FORMAT_VERSION, "model_config": checkpoint.model_config(model), "model": model.state_dict(),
            "train_config": {"data_root": str(folder / "no-data"), "dataset": "none"}}
    torch.save(ckpt, folder / "ckpt.pt")
    (folder / "meta.json").write_text(json.dumps(meta))
    return ckpt


def char_meta():
    chars = "".join(sorted(set(TEXT)))
    return {"tokenizer": "char", "vocab_size": len(chars), "chars": chars}


@pytest.fixture(scope="module")
def char_run(tmp_path_factory):
    torch.manual_seed(0)
    meta = char_meta()
    model = GPT(GPTConfig(vocab_size=meta["vocab_size"], block_size=32, n_layer=2, n_head=2, n_embd=32))
    out = tmp_path_factory.mktemp("score") / "out"
    ckpt = write_run(out, model, meta)
    text = tmp_path_factory.mktemp("text") / "text.txt"
    text.write_text(TEXT[:500], encoding="utf-8")
    return out, ckpt, model.eval(), text


def run_score(argv):
    return score_mod.score(load_config(score_mod.ScoreConfig, argv))


def token_nll(model, ids, j, start):
    """-log p(ids[j] | ids[start:j]): one token, one forward pass."""
    logits, _ = model(torch.tensor([ids[start:j]]))
    return -F.log_softmax(logits[0, -1].double(), dim=-1)[ids[j]].item()


def test_windows_score_every_token_once_with_bounded_context():
    for n, bs, stride in [(2, 4, 2), (5, 4, 2), (50, 16, 8), (51, 16, 1), (100, 16, 16), (17, 16, 3)]:
        scored = []
        for start, first, end in score_mod.windows(n, bs, stride):
            assert 0 <= start < first < end <= n and end - 1 - start <= bs
            scored += range(first, end)
        assert scored == list(range(1, n))


def test_one_window_equals_a_direct_forward(char_run):
    _, _, model, _ = char_run
    ids = torch.randint(0, model.config.vocab_size, (30,)).tolist()
    res = score_mod.score_text(model, ids, 32, 16, "cpu", nullcontext())
    _, loss = model(torch.tensor([ids[:-1]]), torch.tensor([ids[1:]]))
    assert res["tokens"] == 29
    assert res["total_nll"] == pytest.approx(loss.item() * 29, rel=1e-5)
    assert res["perplexity"] == pytest.approx(math.exp(loss.item()), rel=1e-5)


def test_strided_equals_brute_force_per_token(char_run):
    _, _, model, _ = char_run
    model = GPT(GPTConfig(**{**checkpoint.model_config(model), "block_size": 16})).eval()
    ids = torch.randint(0, model.config.vocab_size, (60,)).tolist()
    bs = 16
    # stride 1: every token sees min(j, block_size) tokens before it, the most the model can take
    want = sum(token_nll(model, ids, j, max(0, j - bs)) for j in range(1, 60))
    got = score_mod.score_text(model, ids, bs, 1, "cpu", nullcontext(), batch_size=7)
    assert got["total_nll"] == pytest.approx(want, rel=1e-5)
    # stride 8: tokens 1..16 are scored by the first window; after it, window k ends after target 16 + 8k and
    # starts block_size tokens before its last input, so a token's context begins at that window's start
    want8 = 0.0
    for j in range(1, 60):
        end = 17 if j <= 16 else min(60, 17 + 8 * math.ceil((j - 16) / 8))
        want8 += token_nll(model, ids, j, max(0, end - 17))
    for batch_size in (1, 4):
        got8 = score_mod.score_text(model, ids, bs, 8, "cpu", nullcontext(), batch_size=batch_size)
        assert got8["total_nll"] == pytest.approx(want8, rel=1e-5)
    assert got8["total_nll"] != pytest.approx(want, rel=1e-6)  # less context: a (slightly) different number


def test_hf_dir_matches_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=2, n_head=2, n_embd=16, n_positions=32,
                                                              vocab_size=50257)).eval()
    hf.save_pretrained(tmp_path / "hf")
    import tiktoken
    enc = tiktoken.get_encoding("gpt2")
    text = TEXT[:300]
    ids = enc.encode(text)
    assert len(ids) > 40  # several windows of 32
    (tmp_path / "t.txt").write_text(text, encoding="utf-8")
    res = run_score([f"--hf_dir={tmp_path / 'hf'}", f"--input={tmp_path / 't.txt'}", "--stride=1", "--device=cpu"])
    with torch.no_grad():  # transformers, one forward per token with the last 32 tokens as context
        want = sum(-F.log_softmax(hf(torch.tensor([ids[max(0, j - 32):j]])).logits[0, -1].double(), -1)[ids[j]].item()
                   for j in range(1, len(ids)))
        assert res["tokens"] == len(ids) - 1
        assert res["perplexity"] == pytest.approx(math.exp(want / (len(ids) - 1)), rel=1e-4)
        # a text inside one window: transformers' own loss
        short = TEXT[:60]
        (tmp_path / "s.txt").write_text(short, encoding="utf-8")
        res = run_score([f"--hf_dir={tmp_path / 'hf'}", f"--input={tmp_path / 's.txt'}", "--device=cpu"])
        x = torch.tensor([enc.encode(short)])
        assert x.size(1) <= 32
        assert res["perplexity"] == pytest.approx(math.exp(hf(x, labels=x).loss.item()), rel=1e-4)


def uniform(config):
    """A model whose logits are all zero (token embedding and tied output layer zeroed): every token has 1/V."""
    model = GPT(config)
    with torch.no_grad():
        model.transformer.wte.weight.zero_()
    return model


def test_bits_per_char_of_a_uniform_model(tmp_path, char_run):
    _, _, _, text = char_run
    meta = char_meta()
    write_run(tmp_path / "char", uniform(GPTConfig(vocab_size=meta["vocab_size"], block_size=32, n_layer=1,
                                                   n_head=1, n_embd=8)), meta)
    res = run_score([f"--out_dir={tmp_path / 'char'}", f"--input={text}"])
    V = meta["vocab_size"]
    assert res["tokens"] == res["characters"] == 499  # one character per token; the first is context
    assert res["bits_per_token"] == pytest.approx(math.log2(V), rel=1e-5)
    assert res["bits_per_char"] == pytest.approx(math.log2(V), rel=1e-5)
    assert res["perplexity"] == pytest.approx(V, rel=1e-5)
    # BPE: the same bits per token, spread over about 4 characters per token
    write_run(tmp_path / "bpe", uniform(GPTConfig(vocab_size=50257, block_size=32, n_layer=1, n_head=1, n_embd=8)),
              {"tokenizer": "gpt2", "vocab_size": 50257})
    res = run_score([f"--out_dir={tmp_path / 'bpe'}", f"--input={text}"])
    import tiktoken
    ids = tiktoken.get_encoding("gpt2").encode(TEXT[:500])
    chars = 500 - len(tiktoken.get_encoding("gpt2").decode(ids[:1]))
    assert (res["tokens"], res["characters"]) == (len(ids) - 1, chars)
    assert res["bits_per_token"] == pytest.approx(math.log2(50257), rel=1e-5)
    assert res["bits_per_char"] == pytest.approx(math.log2(50257) * (len(ids) - 1) / chars, rel=1e-5)


def test_quantized_checkpoint_scores_close_to_float(char_run, tmp_path):
    out, ckpt, _, text = char_run
    qpath = out / "ckpt_int8.pt"  # beside meta.json, as quantize.py writes it
    torch.save(checkpoint.quantized(ckpt, "int8"), qpath)
    base = run_score([f"--out_dir={out}", f"--input={text}"])
    q = run_score([f"--ckpt={qpath}", f"--input={text}"])
    assert q["perplexity"] == pytest.approx(base["perplexity"], rel=1e-2)
    assert q["perplexity"] != base["perplexity"]


def error_line(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        score_mod.main(argv)
    assert exc.value.code == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err
    return err


def test_errors(char_run, tmp_path, capsys):
    out, _, _, text = char_run
    res = subprocess.run([sys.executable, "-m", "tools.score", f"--out_dir={out}", f"--input={tmp_path / 'nope.txt'}"],
                         cwd=REPO, capture_output=True, text=True, timeout=120)
    assert res.returncode == 1 and res.stderr.count("\n") == 1 and "Traceback" not in res.stderr
    assert res.stderr.startswith("error: cannot read --input") and "nope.txt" in res.stderr
    assert "pass --input=FILE" in error_line([f"--out_dir={out}"], capsys)
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("ROMEO: caf\xe9".encode("latin-1"))
    assert "is not UTF-8 text (byte 10 is 0xe9)" in error_line([f"--out_dir={out}", f"--input={bad}"], capsys)
    one = tmp_path / "one.txt"
    one.write_text("A", encoding="utf-8")
    assert "1 token(s) long" in error_line([f"--out_dir={out}", f"--input={one}"], capsys)
    odd = tmp_path / "odd.txt"
    odd.write_text("ROMEO: ¿qué?", encoding="utf-8")
    err = error_line([f"--out_dir={out}", f"--input={odd}"], capsys)
    assert "'¿' (U+00BF)" in err and "vocabulary lacks" in err
    assert "stride=33" in error_line([f"--out_dir={out}", f"--input={text}", "--stride=33"], capsys)
    assert "is a folder with neither ckpt.pt" in error_line([f"--out_dir={tmp_path}", f"--input={text}"], capsys)
    lone = tmp_path / "lone" / "ckpt.pt"  # a checkpoint without its meta.json or dataset
    lone.parent.mkdir()
    lone.write_bytes((out / "ckpt.pt").read_bytes())
    assert "no meta.json beside" in error_line([f"--ckpt={lone}", f"--input={text}"], capsys)
    assert "x does not exist: give a run folder" in error_line([f"--hf_dir={tmp_path / 'x'}", f"--input={text}"],
                                                               capsys)
