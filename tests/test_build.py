"""sologpt/build.py on tiny CPU runs: start points (another run's checkpoint, a GPT-2 directory with a grown
vocabulary), freezing, domain tokens, the fine-tuning recipe, and the guards on start points."""

import json
import subprocess
import sys

import pytest
import torch

import sample as sample_mod
import train as train_mod
from conftest import REPO, SHAKESPEARE, error_of, run_train as run
from sologpt import checkpoint, hf_gpt2
from sologpt.checkpoint import read as read_checkpoint
from sologpt.configurator import load_config


# ---- start points --------------------------------------------------------------------------------------

def test_start_from_a_sologpt_checkpoint_with_fresh_optimizer(tiny_flags, tmp_path):
    run(tiny_flags + ["--max_iters=6"])
    src = read_checkpoint(tmp_path / "out" / "ckpt.pt")
    flags = [f if not f.startswith("--out_dir") else f"--out_dir={tmp_path / 'ft'}" for f in tiny_flags]
    run(flags + [f"--init_from={tmp_path / 'out' / 'ckpt.pt'}", "--max_iters=0", "--n_layer=7"])  # shape: from ckpt
    ft = read_checkpoint(tmp_path / "ft" / "ckpt.pt")
    assert ft["iter_num"] == 0 and ft["init_source"] == str(tmp_path / "out" / "ckpt.pt")
    assert ft["model_config"]["n_layer"] == 2
    for k, v in src["model"].items():
        assert torch.equal(ft["model"][k], v), k
    assert ft["optimizer"]["state"] == {}  # a fresh optimizer


# ---- freezing ------------------------------------------------------------------------------------------

def test_frozen_layers_stay_bit_identical_and_have_no_optimizer_state(tiny_flags, tmp_path, capsys):
    run(tiny_flags + ["--max_iters=0"])
    start = read_checkpoint(tmp_path / "out" / "ckpt.pt")["model"]
    flags = [f if not f.startswith("--out_dir") else f"--out_dir={tmp_path / 'ft'}" for f in tiny_flags]
    capsys.readouterr()
    run(flags + [f"--init_from={tmp_path / 'out' / 'ckpt.pt'}", "--max_iters=5", "--freeze_layers=1",
                 "--freeze_embeddings=True"])
    assert "trainable parameters:" in capsys.readouterr().out
    ckpt = read_checkpoint(tmp_path / "ft" / "ckpt.pt")
    end = ckpt["model"]
    frozen = [k for k in start if k.startswith(("transformer.h.0.", "transformer.wte", "transformer.wpe", "lm_head"))]
    assert frozen and all(torch.equal(start[k], end[k]) for k in frozen)
    assert not torch.equal(start["transformer.h.1.mlp.c_fc.weight"], end["transformer.h.1.mlp.c_fc.weight"])
    n_trainable = sum(v.numel() for k, v in start.items() if k not in frozen)
    n_state = sum(s["exp_avg"].numel() for s in ckpt["optimizer"]["state"].values())
    assert n_state == n_trainable  # optimizer state only for the trainable tensors


def test_freeze_more_layers_than_the_model_has(tiny_flags, capsys):
    err = error_of(train_mod.main, tiny_flags + ["--freeze_layers=5"], capsys)
    assert "freeze_layers=5" in err and "2 layers" in err


# ---- vocabulary growth (domain tokens) ------------------------------------------------------------------

def test_resize_vocab_from_gpt2_weights(gpt2_setup):
    model = checkpoint.fit(checkpoint.load_source(gpt2_setup / "gpt2"), "gpt2", vocab_size=50260)
    base = hf_gpt2.load(gpt2_setup / "gpt2")
    w = model.transformer.wte.weight
    assert w.shape[0] == 50260 and model.lm_head.weight is w
    assert torch.equal(w[:50257], base.transformer.wte.weight)
    torch.testing.assert_close(w[50257:], base.transformer.wte.weight.mean(0).expand(3, -1))
    idx = torch.tensor([[1, 2, 50259]])
    assert model(idx)[0].shape == (1, 3, 50260)
    with pytest.raises(ValueError, match="cannot shrink"):
        model.resize_vocab(100)


def test_finetune_shakespeare_config_runs(gpt2_setup, tmp_path):
    from conftest import REPO
    run([str(REPO / "config" / "finetune_shakespeare.py"), f"--init_from={gpt2_setup / 'gpt2'}",
         f"--data_root={gpt2_setup / 'data'}", "--dataset=bpe", f"--out_dir={tmp_path / 'o'}", "--device=cpu",
         "--block_size=32", "--batch_size=2", "--gradient_accumulation_steps=1", "--max_iters=2",
         "--eval_interval=2", "--eval_iters=1", "--progress=False", "--sample_tokens=0"])
    ckpt = read_checkpoint(tmp_path / "o" / "ckpt.pt")
    assert ckpt["iter_num"] == 2 and ckpt["model_config"]["vocab_pad_multiple"] == 64
    assert ckpt["train_config"]["learning_rate"] == 3e-5


def test_domain_tokens_grow_gpt2_and_decode(gpt2_setup, tmp_path):
    """prepare/text.py --extra_tokens, then fine-tune GPT-2 weights: the embedding grows by the new terms, whose
    rows start at the mean, and sample.py decodes them."""
    terms = tmp_path / "terms.txt"
    terms.write_text("Bolingbroke\nNorthumberland\nthe\nBolingbroke\n", encoding="utf-8")  # 'the' is one token
    docs = tmp_path / "docs"
    docs.mkdir()
    text = SHAKESPEARE.read_text(encoding="utf-8")[:60_000]
    for i in range(20):
        (docs / f"{i}.txt").write_text(text[i * 3000:(i + 1) * 3000] + " Bolingbroke and Northumberland.",
                                       encoding="utf-8")
    cmd = [sys.executable, "prepare/text.py", str(docs), "--name=dom", f"--data_root={tmp_path / 'data'}",
           f"--extra_tokens={terms}", "--min_split_tokens=40", "--val_fraction=0.2"]
    res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    meta = json.loads((tmp_path / "data" / "dom" / "meta.json").read_text())
    assert meta["extra_tokens"] == ["Bolingbroke", "Northumberland"] and meta["vocab_size"] == 50259
    run([f"--data_root={tmp_path / 'data'}", "--dataset=dom", f"--out_dir={tmp_path / 'o'}", "--device=cpu",
         f"--init_from={gpt2_setup / 'gpt2'}", "--block_size=32", "--batch_size=2", "--max_iters=2",
         "--eval_interval=2", "--eval_iters=1", "--progress=False", "--sample_tokens=0"])
    ckpt = read_checkpoint(tmp_path / "o" / "ckpt.pt")
    assert ckpt["model_config"]["vocab_size"] == 50259
    texts = sample_mod.sample(load_config(sample_mod.SampleConfig, [f"--out_dir={tmp_path / 'o'}", "--device=cpu",
                                                                    "--start=Bolingbroke", "--num_samples=1",
                                                                    "--max_new_tokens=3", "--stream=False"]))
    assert texts[0].startswith("Bolingbroke")


def test_start_point_guards(tiny_flags, tmp_path, capsys, char_data):
    run(tiny_flags + ["--max_iters=2"])
    own = tmp_path / "out" / "ckpt.pt"
    before = own.read_bytes()
    # a new run in out_dir would overwrite its own start point
    err = error_of(train_mod.main, tiny_flags + [f"--init_from={own}", "--overwrite=True"], capsys)
    assert "this run's own checkpoint" in err and own.read_bytes() == before
    # a quantized file is not a start point for training
    res = subprocess.run([sys.executable, "-m", "tools.quantize", "--ckpt", str(own), "--mode", "int8"], cwd=REPO,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    other = [f if not f.startswith("--out_dir") else f"--out_dir={tmp_path / 'o2'}" for f in tiny_flags]
    err = error_of(train_mod.main, other + [f"--init_from={tmp_path / 'out' / 'ckpt_int8.pt'}"], capsys)
    assert "is quantized (int8)" in err
    # resuming with a switch that changes which tensors train is refused
    err = error_of(train_mod.main, tiny_flags + ["--init_from=resume", "--freeze_layers=1"], capsys)
    assert "was trained with freeze_layers=0, not 1" in err
    # another character table: ids would mean other characters
    meta = json.loads((char_data / "tiny" / "meta.json").read_text())
    (tmp_path / "out" / "meta.json").write_text(json.dumps({**meta, "chars": meta["chars"][::-1]}))
    err = error_of(train_mod.main, other + [f"--init_from={own}"], capsys)
    assert "another tokenizer" in err and "chars differs" in err


def test_frozen_int8_base_checkpoint_loads_for_sampling(tiny_flags, tmp_path):
    run(tiny_flags + ["--max_iters=2"])
    other = [f if not f.startswith("--out_dir") else f"--out_dir={tmp_path / 'f'}" for f in tiny_flags]
    run(other + [f"--init_from={tmp_path / 'out' / 'ckpt.pt'}", "--max_iters=2", "--freeze_layers=1",
                 "--base_dtype=int8"])
    ckpt = read_checkpoint(tmp_path / "f" / "ckpt.pt")
    assert ckpt["model"]["transformer.h.0.attn.c_attn.weight"].dtype == torch.int8  # stored as trained
    model = checkpoint.load_model(ckpt)
    assert model.transformer.h[0].attn.c_attn.weight.dtype == torch.float32  # back to an ordinary model
    texts = sample_mod.sample(load_config(sample_mod.SampleConfig, [f"--out_dir={tmp_path / 'f'}", "--device=cpu",
                                                                    "--num_samples=1", "--max_new_tokens=5",
                                                                    "--stream=False"]))
    assert len(texts) == 1
