"""train.py's compression switches on tiny CPU runs: quantization-aware training (same checkpoint keys, the
exported int4 model computes what training saw) and distillation from a teacher (and its errors)."""


import pytest
import torch

import finetune
import quantize
import train as train_mod
from configurator import load_config
from model import read_checkpoint


def run(flags):
    return train_mod.train(load_config(train_mod.TrainConfig, flags))


def moved(flags, name, tmp_path):
    return [f if not f.startswith("--out_dir") else f"--out_dir={tmp_path / name}" for f in flags]


def test_qat_checkpoint_is_ordinary_and_exports_what_it_trained(tiny_flags, tmp_path):
    run(tiny_flags + ["--max_iters=4", "--qat=int4", "--qat_group_size=32"])
    ckpt = read_checkpoint(tmp_path / "out" / "ckpt.pt")
    plain = finetune.load_model(ckpt).eval()  # loads as an ordinary float model: same keys
    qat = quantize.enable_qat(finetune.load_model(ckpt), "int4", 32).eval()
    int4 = quantize.load_quantized_model(quantize.quantized_checkpoint(ckpt, "int4", 32)).eval()
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


def test_distillation_changes_the_loss_and_checks_the_teacher(tiny_flags, tmp_path, capsys, char_data):
    run(tiny_flags + ["--max_iters=6"])
    teacher = tmp_path / "out" / "ckpt.pt"
    run(moved(tiny_flags, "plain", tmp_path) + ["--max_iters=4"])
    run(moved(tiny_flags, "kd", tmp_path) + ["--max_iters=4", f"--teacher={teacher}", "--distill_alpha=0.9"])
    plain = read_checkpoint(tmp_path / "plain" / "ckpt.pt")["model"]
    kd = read_checkpoint(tmp_path / "kd" / "ckpt.pt")["model"]
    assert not torch.equal(plain["transformer.h.0.mlp.c_fc.weight"], kd["transformer.h.0.mlp.c_fc.weight"])
    # a teacher with another vocabulary is refused in one line
    other = read_checkpoint(teacher)
    other["model_config"]["vocab_size"] = 70
    other["model"]["transformer.wte.weight"] = torch.zeros(70, 32)  # a bigger vocabulary than the data's
    other["model"]["lm_head.weight"] = other["model"]["transformer.wte.weight"]
    torch.save(other, tmp_path / "other.pt")
    with pytest.raises(SystemExit):
        train_mod.main(moved(tiny_flags, "x", tmp_path) + [f"--teacher={tmp_path / 'other.pt'}"])
    err = capsys.readouterr().err
    assert "teacher has a vocabulary of 70 tokens" in err and err.count("\n") == 1
