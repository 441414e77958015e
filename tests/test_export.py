"""tools/export.py: a Hugging Face GPT-2 directory with the same logits, and its errors."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

import sample as sample_mod
import train as train_mod
from conftest import REPO, SHARED, SHAKESPEARE, bpe_flags, error_of, run_train as run
from model import GPT, GPTConfig
from sologpt import checkpoint, classify, hf_gpt2
from sologpt.checkpoint import read as read_checkpoint
from sologpt.configurator import load_config
from tools import export as export_mod


# ---- export ------------------------------------------------------------------------------------------------

def test_export_to_hugging_face_gives_identical_logits(tiny_flags, tmp_path, capsys):
    transformers = pytest.importorskip("transformers")
    run(tiny_flags + ["--max_iters=3"])
    export_mod.main([f"--out_dir={tmp_path / 'out'}", f"--hf_dir={tmp_path / 'hf'}"])
    ours = checkpoint.load_model(read_checkpoint(tmp_path / "out" / "ckpt.pt")).eval()
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "hf").eval()
    idx = torch.randint(0, ours.config.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(hf(idx).logits, ours(idx)[0], rtol=1e-5, atol=1e-5)
    assert "nothing to do" in error_of(export_mod.main, [f"--out_dir={tmp_path / 'out'}"], capsys)


def test_merged_checkpoint_of_a_low_precision_base_run_loads(tiny_flags, tmp_path, capsys):
    run(tiny_flags + ["--max_iters=2"])
    flags = [f if not f.startswith("--out_dir") else f"--out_dir={tmp_path / 'f'}" for f in tiny_flags]
    run(flags + [f"--init_from={tmp_path / 'out' / 'ckpt.pt'}", "--max_iters=2", "--freeze_layers=1",
                 "--base_dtype=int8"])
    export_mod.main([f"--out_dir={tmp_path / 'f'}", f"--merged_ckpt={tmp_path / 'm.pt'}"])
    merged = checkpoint.load_model(read_checkpoint(tmp_path / "m.pt")).eval()
    ours = checkpoint.load_model(read_checkpoint(tmp_path / "f" / "ckpt.pt")).eval()
    idx = torch.randint(0, 65, (1, 8))
    assert torch.equal(merged(idx)[0], ours(idx)[0])
    err = error_of(export_mod.main, [f"--out_dir={tmp_path / 'f'}", f"--merged_ckpt={tmp_path / 'no' / 'm.pt'}"],
                   capsys)
    assert "does not exist" in err
