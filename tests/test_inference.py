"""inference.py and sample.py's generation paths on the CPU: batched prompts of different lengths give each row
exactly its own greedy output, the same tokens as transformers' generate on the same weights, stopping at the end
token, prompt files, truncation of long prompts, and the int8 model on the CPU."""

import subprocess
import sys

import pytest
import torch

from sologpt import hf_gpt2
import sample as sample_mod
from sologpt.configurator import load_config
from conftest import REPO, perturbed_model
from sologpt.inference import Engine


tiny = perturbed_model  # larger weights than the init, so a wrong mask or position changes the tokens


PROMPTS = [[5, 9, 2], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11], [42], [7, 7, 7, 7, 7, 7]]


def test_batched_rows_equal_each_prompt_alone_and_the_uncached_path():
    model = tiny()
    batched = Engine(model, 4, 11 + 20, "cpu").generate(PROMPTS, 20, temperature=0)
    for prompt, row in zip(PROMPTS, batched):
        alone = Engine(model, 1, len(prompt) + 20, "cpu").generate([prompt], 20, temperature=0)[0]
        reference = model.generate(torch.tensor([prompt]), 20, temperature=0, use_cache=False)[0, len(prompt):]
        assert row == alone == reference.tolist()


def test_greedy_tokens_equal_transformers_generate(tmp_path):
    transformers = pytest.importorskip("transformers")
    model = tiny(seed=1)
    hf_gpt2.save(model, tmp_path / "hf")
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "hf").eval()
    ours = Engine(model, 4, 11 + 16, "cpu").generate(PROMPTS, 16, temperature=0)
    for prompt, row in zip(PROMPTS, ours):
        out = hf.generate(torch.tensor([prompt]), max_new_tokens=16, do_sample=False, pad_token_id=0,
                          attention_mask=torch.ones(1, len(prompt), dtype=torch.long))
        assert out[0, len(prompt):].tolist() == row


def test_stop_token_cuts_each_row():
    model = tiny()
    free = Engine(model, 4, 40, "cpu").generate(PROMPTS, 20, temperature=0)
    stop = free[1][3]  # a token row 1 produces at step 3
    rows = Engine(model, 4, 40, "cpu").generate(PROMPTS, 20, temperature=0, stop_token=stop)
    for full, cut in zip(free, rows):
        expected = full[:full.index(stop) + 1] if stop in full else full
        assert cut == expected


def test_engine_refuses_what_does_not_fit():
    with pytest.raises(ValueError, match="do not fit"):
        Engine(tiny(), 2, 10, "cpu").generate([[1, 2, 3]], 8, temperature=0)


def sample(argv):
    return sample_mod.sample(load_config(sample_mod.SampleConfig, argv + ["--device=cpu", "--stream=False"]))


def test_prompt_file_batches_equal_single_prompts(trained, tmp_path):
    (tmp_path / "p.txt").write_text("ROMEO:\n\nFirst Citizen:\nO\n", encoding="utf-8")
    batched = sample([f"--out_dir={trained}", f"--prompts={tmp_path / 'p.txt'}", "--temperature=0",
                      "--max_new_tokens=12", "--batch_size=2"])
    assert len(batched) == 3  # the empty line is skipped
    for text in batched:
        prompt = text[:-12]
        alone = sample([f"--out_dir={trained}", f"--start={prompt}", "--temperature=0", "--max_new_tokens=12",
                        "--num_samples=1"])
        assert alone == [text]
    (tmp_path / "p.jsonl").write_text('{"prompt": "ROMEO:"}\n{"text": 1}\n', encoding="utf-8")
    with pytest.raises(Exception, match="p.jsonl:2 is not a JSON object"):
        sample([f"--out_dir={trained}", f"--prompts={tmp_path / 'p.jsonl'}"])
    (tmp_path / "empty.txt").write_text("\n\n", encoding="utf-8")
    with pytest.raises(Exception, match="has no prompts"):
        sample([f"--out_dir={trained}", f"--prompts={tmp_path / 'empty.txt'}"])


def test_long_prompt_is_truncated_from_the_left_with_a_warning(trained, capsys):
    texts = sample([f"--out_dir={trained}", "--start=" + "To be or not to be. " * 4, "--temperature=0",
                    "--max_new_tokens=5", "--num_samples=1"])
    assert "more than block_size=32; using its last 32" in capsys.readouterr().err
    assert len(texts[0]) == 32 + 5


def test_stop_string_cuts_the_sample(trained):
    free = sample([f"--out_dir={trained}", "--start=ROMEO:", "--temperature=0", "--max_new_tokens=30",
                   "--num_samples=1"])[0]
    stop = free[len("ROMEO:") + 5:len("ROMEO:") + 7]
    cut = sample([f"--out_dir={trained}", "--start=ROMEO:", "--temperature=0", "--max_new_tokens=30",
                  "--num_samples=1", f"--stop={stop}"])[0]
    assert cut == free[:free.index(stop, len("ROMEO:")) + len(stop)]


def test_int8_model_samples_on_cpu(trained):
    res = subprocess.run([sys.executable, "-m", "tools.quantize", "--ckpt", str(trained / "ckpt.pt"), "--mode", "int8"],
                         cwd=REPO, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    float_text = sample([f"--out_dir={trained}", "--start=ROMEO:", "--temperature=0", "--max_new_tokens=20",
                         "--num_samples=1"])[0]
    int8_text = sample([f"--out_dir={trained}", f"--ckpt={trained / 'ckpt_int8.pt'}", "--start=ROMEO:",
                        "--temperature=0", "--max_new_tokens=20", "--num_samples=1"])[0]
    assert int8_text.startswith("ROMEO:") and len(int8_text) == len(float_text)
    # int8 rounding moves the logits a little: most greedy characters agree with the float model
    assert sum(a == b for a, b in zip(int8_text, float_text)) >= 0.6 * len(float_text)


def test_streaming_prints_the_same_text(trained, capsys):
    argv = [f"--out_dir={trained}", "--start=ROMEO:", "--temperature=0", "--max_new_tokens=25", "--num_samples=1",
            "--device=cpu"]
    capsys.readouterr()
    streamed = sample_mod.sample(load_config(sample_mod.SampleConfig, argv + ["--stream=True"]))
    out = capsys.readouterr().out
    plain = sample_mod.sample(load_config(sample_mod.SampleConfig, argv + ["--stream=False"]))
    assert streamed == plain and out.startswith(plain[0] + "\n")
