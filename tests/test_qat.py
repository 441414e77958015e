"""Quantization-aware training in train.py on tiny CPU runs (qat): the checkpoint is an ordinary one with the same
keys, the exported int4 model computes what training saw, and bad values are one line."""

import pytest
import torch

import train as train_mod
from conftest import run_train as run
from sologpt import checkpoint, quantize
from sologpt.checkpoint import read as read_checkpoint


def test_qat_checkpoint_is_ordinary_and_exports_what_it_trained(tiny_flags, tmp_path):
    run(tiny_flags + ["--max_iters=4", "--qat=int4", "--qat_group_size=32"])
    ckpt = read_checkpoint(tmp_path / "out" / "ckpt.pt")
    plain = checkpoint.load_model(ckpt).eval()  # loads as an ordinary float model: same keys
    qat = quantize.enable_qat(checkpoint.load_model(ckpt), "int4", 32).eval()
    int4 = checkpoint.load_model(checkpoint.quantized(ckpt, "int4", 32)).eval()
    idx = torch.randint(0, plain.config.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(int4(idx)[0], qat(idx)[0], rtol=1e-5, atol=1e-5)
        assert not torch.allclose(plain(idx)[0], qat(idx)[0])


def test_qat_bad_values(tiny_flags, capsys):
    for flags, message in ((["--qat=int3"], "qat='int3' is unknown"),
                           (["--qat=int4", "--qat_group_size=48"], "qat:")):
        with pytest.raises(SystemExit):
            train_mod.main(tiny_flags + flags)
        assert message in capsys.readouterr().err
