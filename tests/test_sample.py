"""sample.py end to end (as a user runs it) and its errors."""

import subprocess
import sys

import pytest

import sample as sample_mod
from sologpt.configurator import load_config
from conftest import REPO


def sample(argv):
    return sample_mod.sample(load_config(sample_mod.SampleConfig, argv))


def test_sample_subprocess_prints_samples(trained):
    cmd = [sys.executable, "sample.py", f"--out_dir={trained}", "--start=ROMEO:", "--num_samples=3",
           "--max_new_tokens=40", "--device=cpu"]
    res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    samples = [s.strip("\n") for s in res.stdout.split("-" * 40) if s.strip()]
    assert len(samples) == 3
    assert all(s.startswith("ROMEO:") and len(s) == len("ROMEO:") + 40 for s in samples)


def test_same_seed_same_text_and_prompt_file(trained, tmp_path):
    a = sample([f"--out_dir={trained}", "--num_samples=2", "--max_new_tokens=30", "--seed=7"])
    b = sample([f"--out_dir={trained}", "--num_samples=2", "--max_new_tokens=30", "--seed=7"])
    c = sample([f"--out_dir={trained}", "--num_samples=2", "--max_new_tokens=30", "--seed=8"])
    assert a == b and a != c
    assert a[0] != a[1]  # the samples of one call differ from each other
    prompt = tmp_path / "p.txt"
    prompt.write_text("KING HENRY:\n", encoding="utf-8")
    out = sample([f"--out_dir={trained}", f"--start=FILE:{prompt}", "--num_samples=1", "--max_new_tokens=5",
                  "--temperature=0", "--top_k=None"])
    assert out[0].startswith("KING HENRY:\n") and len(out[0]) == len("KING HENRY:\n") + 5


def error_line(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        sample_mod.main(argv)
    assert exc.value.code == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err
    return err


def test_sample_errors(trained, tmp_path, capsys):
    assert "is a folder with neither ckpt.pt" in error_line([f"--out_dir={tmp_path}"], capsys)
    err = error_line([f"--out_dir={trained}", "--start=ROMEO: ¿qué?"], capsys)
    assert "'¿' (U+00BF)" in err and "'é' (U+00E9)" in err
    assert "cannot read the prompt file" in error_line([f"--out_dir={trained}", f"--start=FILE:{tmp_path}/no"],
                                                       capsys)
    assert "top_p" in error_line([f"--out_dir={trained}", "--top_p=0"], capsys)


def test_sample_device_and_dtype_errors(trained, capsys):
    assert "dtype='fp16' is unknown" in error_line([f"--out_dir={trained}", "--dtype=fp16"], capsys)
    assert "device='foo' is unknown" in error_line([f"--out_dir={trained}", "--device=foo"], capsys)


def test_empty_prompt_starts_from_token_zero_unprinted(trained):
    out = sample([f"--out_dir={trained}", "--start=", "--num_samples=1", "--max_new_tokens=7", "--temperature=0"])
    assert len(out[0]) == 7
