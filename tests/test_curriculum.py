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


def test_easy_first_source_can_be_made_before_the_batch_size_is_known(char_data):
    """train.py makes the batch source before batch_size="auto" is resolved (the search draws its trial batches
    from it): the source may read the batch size only when it is called."""
    from sologpt import batches, build
    cfg = train_mod.TrainConfig(data_root=str(char_data), dataset="tiny", block_size=32, batch_size="auto",
                                curriculum="unigram", device="cpu")
    source = build.batch_source(cfg, batches.load_dataset(cfg))
    x, y, kw = source.batch(3, torch.Generator().manual_seed(0))  # a trial batch of the search
    assert x.shape == (3, 32) and kw == {}
    cfg.batch_size = 4
    assert source(0)[0][0].shape == (4, 32)
