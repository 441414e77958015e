"""curriculum.py: sequence-length warmup keeps tokens per step, easy-first ordering, and both in train.py runs
(with exact resume)."""

import numpy as np
import pytest
import torch

from sologpt import curriculum
import train as train_mod
from sologpt.configurator import load_config
from conftest import assert_resume_is_exact


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
    assert_resume_is_exact(tiny_flags + switch + ["--lr_decay_iters=8"], tmp_path, stop=3, learns_below=4.1)


def test_warmup_and_curriculum_together_are_refused(tiny_flags, capsys):
    with pytest.raises(SystemExit):
        train_mod.main(tiny_flags + ["--seq_warmup_iters=4", "--seq_warmup_start=8", "--curriculum=unigram"])
    assert "cannot be combined" in capsys.readouterr().err
