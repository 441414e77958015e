"""inference.py and sample.py's generation paths on the CPU: batched prompts of different lengths give each row
exactly its own greedy output, the same tokens as transformers' generate on the same weights, stopping at the end
token, prompt files, truncation of long prompts, and the int8 model on the CPU."""

import subprocess
import sys

import numpy as np
import pytest
import torch

from sologpt import hf_gpt2
import sample as sample_mod
from sologpt.configurator import load_config
from conftest import REPO, perturbed_model
from sologpt.inference import Engine, MultiStepEngine


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


# ---- MultiStepEngine: several steps per call, tokens picked on the device ----------------------------------------

@pytest.mark.parametrize("steps", [1, 3, 16])
def test_multi_step_greedy_equals_the_one_step_engine(steps):
    model = tiny()
    one = Engine(model, 4, 11 + 20, "cpu").generate(PROMPTS, 20, temperature=0)
    many = MultiStepEngine(model, 4, 11 + 20, "cpu", steps=steps)
    assert many.generate(PROMPTS, 20, temperature=0) == one
    assert many.generate(PROMPTS[:2], 7, temperature=0) == [row[:7] for row in one[:2]]  # fewer rows, reused
    stop = one[1][3]
    cut = Engine(model, 4, 40, "cpu").generate(PROMPTS, 20, temperature=0, stop_token=stop)
    assert MultiStepEngine(model, 4, 40, "cpu", steps=steps).generate(PROMPTS, 20, temperature=0,
                                                                      stop_token=stop) == cut
    seen = []
    many.generate(PROMPTS, 20, temperature=0, on_token=lambda step, t: seen.append((step, t.tolist())))
    assert [step for step, _ in seen] == list(range(20))
    assert [t for _, t in seen] == [list(col) for col in zip(*one)]


def reference_probs(logits, temperature, top_k=None, top_p=None):
    """The distribution sample_next draws from, written out in numpy: softmax(logits / T) over the top_k tokens,
    then the smallest most-likely prefix whose probability reaches top_p, renormalised."""
    z = logits.double().numpy() / temperature
    keep = np.ones_like(z, dtype=bool)
    if top_k is not None:
        keep &= z >= np.sort(z, axis=-1)[:, [-top_k]]
    p = np.where(keep, np.exp(z - z.max(-1, keepdims=True)), 0)
    p /= p.sum(-1, keepdims=True)
    if top_p is not None:
        order = np.argsort(-p, axis=-1)
        sorted_p = np.take_along_axis(p, order, -1)
        before = np.cumsum(sorted_p, -1) - sorted_p
        kept = np.zeros_like(p, dtype=bool)
        np.put_along_axis(kept, order, before < top_p, -1)
        kept[np.arange(len(p)), order[:, 0]] = True
        p = np.where(kept, p, 0)
        p /= p.sum(-1, keepdims=True)
    return p


def assert_draws_follow(tokens, expected):
    """tokens (N,) drawn each from its row of expected (N, V): the counts match sum(expected) (chi-square with
    bins of fewer than 5 expected draws pooled, bound df + 6 sqrt(2 df): false alarms ~1e-6), and no token of
    probability 0 is ever drawn."""
    counts = np.bincount(tokens, minlength=expected.shape[1])
    want = expected.sum(0)
    assert counts[want == 0].sum() == 0
    big = want >= 5
    obs, exp = list(counts[big]) + [counts[~big].sum()], list(want[big]) + [want[~big].sum()]
    obs, exp = np.array(obs[:len(obs) - (exp[-1] == 0)]), np.array(exp[:len(exp) - (exp[-1] == 0)])
    chi2, df = ((obs - exp) ** 2 / exp).sum(), len(exp) - 1
    assert df >= 1 and chi2 < df + 6 * (2 * df) ** 0.5, (chi2, df)


@pytest.mark.parametrize("temperature, top_k, top_p", [(1.0, None, None), (0.7, 5, None), (1.3, None, 0.8),
                                                       (1.0, 12, 0.9)])
def test_pick_draws_the_filtered_softmax(temperature, top_k, top_p):
    from sologpt.inference import pick
    torch.manual_seed(0)
    logits = torch.randn(4, 20) * 2  # 4 distributions over 20 tokens
    n = 20000
    rows = logits.repeat_interleave(n, dim=0)  # (4n, 20)
    noise = torch.empty_like(rows).exponential_(generator=torch.Generator().manual_seed(1))
    tokens = pick(rows, temperature, top_k, top_p, noise)[:, 0].view(4, n).numpy()
    for i in range(4):
        expected = reference_probs(logits[i:i + 1], temperature, top_k, top_p).repeat(n, 0)
        assert_draws_follow(tokens[i], expected)


def test_multi_step_sampling_follows_the_model():
    """The engine's first and second sampled tokens (the second from a decode step): the counts over 3000 rows
    of one prompt match the model's own filtered probabilities (GPT.forward without a cache) given each row's
    tokens so far."""
    model = tiny(seed=2)
    prompt, n, settings = [3, 1, 4, 1, 5], 3000, (0.9, 20, 0.95)
    engine = MultiStepEngine(model, n, len(prompt) + 3, "cpu", steps=2)
    rows = engine.generate([prompt] * n, 3, *settings, generator=torch.Generator().manual_seed(3))
    tokens = torch.tensor(rows)  # (n, 3)
    for t in range(3):
        idx = torch.cat([torch.tensor([prompt] * n), tokens[:, :t]], dim=1)  # each row's context
        with torch.no_grad():
            logits = model(idx)[0][:, -1]  # (n, vocab)
        assert_draws_follow(tokens[:, t].numpy(), reference_probs(logits, *settings))
