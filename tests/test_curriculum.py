"""curriculum.py: sequence-length warmup keeps tokens per step, easy-first ordering, and both in train.py runs
(with exact resume)."""

import numpy as np
import pytest
import torch

import curriculum
import train as train_mod
from configurator import load_config
from model import read_checkpoint


def run(flags):
    return train_mod.train(load_config(train_mod.TrainConfig, flags))


def test_sequence_length_warmup_holds_tokens_per_step():
    cfg = train_mod.TrainConfig(batch_size=8, block_size=256, seq_warmup_iters=100, seq_warmup_start=32)
    shapes = [curriculum.batch_shape(it, cfg) for it in range(0, 120, 10)]
    lengths = [T for _, T in shapes]
    assert lengths[0] == 32 and lengths[-1] == 256 and lengths == sorted(lengths)
    assert all(8 * 256 - T < B * T <= 8 * 256 for B, T in shapes)  # tokens per step within one sequence
    assert len(set(lengths)) <= 9  # a few shapes only
    assert curriculum.batch_shape(5, train_mod.TrainConfig(batch_size=8, block_size=256)) == (8, 256)


def test_easy_first_orders_windows_by_unigram_surprisal():
    data = np.array([0] * 40 + [1, 2, 3, 4, 5, 6, 7, 8] * 5 + [0] * 40, dtype=np.uint16)
    easy = curriculum.EasyFirst(data, 8, 9)
    assert np.all(np.diff(easy.scores) >= 0)
    x, y = easy.batch(0, 2, "cpu")
    assert (x == 0).all()  # the runs of the most common token come first
    assert torch.equal(x[:, 1:], y[:, :-1])
    assert easy.batch(len(easy.order), 1, "cpu") is None  # after the first epoch


@pytest.mark.parametrize("switch", [["--seq_warmup_iters=4", "--seq_warmup_start=8"], ["--curriculum=unigram"]])
def test_curriculum_runs_and_resumes_exactly(tiny_flags, tmp_path, switch):
    flags = tiny_flags + switch + ["--lr_decay_iters=8"]
    run(flags + ["--max_iters=8"])
    straight = read_checkpoint(tmp_path / "out" / "ckpt.pt")
    assert straight["best_val_loss"] < 4.1
    other = [f if not f.startswith("--out_dir") else f"--out_dir={tmp_path / 'r'}" for f in flags]
    run(other + ["--max_iters=3"])
    run(other + ["--max_iters=8", "--init_from=resume"])
    resumed = read_checkpoint(tmp_path / "r" / "ckpt.pt")
    for k, v in straight["model"].items():
        assert torch.equal(resumed["model"][k], v), k


def test_warmup_and_curriculum_together_are_refused(tiny_flags, capsys):
    with pytest.raises(SystemExit):
        train_mod.main(tiny_flags + ["--seq_warmup_iters=4", "--seq_warmup_start=8", "--curriculum=unigram"])
    assert "cannot be combined" in capsys.readouterr().err
