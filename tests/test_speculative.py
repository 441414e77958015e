"""sologpt/speculative.py: speculative decoding gives exactly the model's greedy tokens whatever the draft, its
sampled tokens follow the model's own (filtered) distribution, both KV caches hold the right tokens after
rejections, and sample.py's --draft option (its errors included)."""

import copy
import subprocess
import sys

import pytest
import torch

import sample as sample_mod
from conftest import REPO, perturbed_model
from sologpt import speculative
from sologpt.configurator import load_config
from sologpt.inference import Engine
from sologpt.speculative import SpeculativeEngine
from test_inference import assert_draws_follow, reference_probs

PROMPTS = [[5, 9, 2], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11], [42]]


@pytest.mark.parametrize("k", [1, 2, 4, 7])
def test_greedy_tokens_equal_the_model_greedy_tokens(k):
    model = perturbed_model()
    want = Engine(model, 3, 11 + 24, "cpu").generate(PROMPTS, 24, temperature=0)
    other = perturbed_model(seed=5, n_layer=1, n_embd=16)  # disagrees often
    spec = SpeculativeEngine(model, other, 11 + 24, "cpu", draft_tokens=k)
    assert spec.generate(PROMPTS, 24, temperature=0) == want
    assert spec.stats["accepted"] < spec.stats["proposed"]  # rejections happened
    same = SpeculativeEngine(model, copy.deepcopy(model), 11 + 24, "cpu", draft_tokens=k)
    assert same.generate(PROMPTS, 24, temperature=0) == want
    assert same.acceptance() == 1.0 and same.stats["proposed"] > 0
    stop = want[1][5]  # a token row 1 produces at step 5: each row is cut after its first one
    cut = Engine(model, 3, 11 + 24, "cpu").generate(PROMPTS, 24, temperature=0, stop_token=stop)
    assert spec.generate(PROMPTS, 24, temperature=0, stop_token=stop) == cut
    seen = []
    spec.generate(PROMPTS[:1], 24, temperature=0, on_token=lambda step, t: seen.append((step, int(t[0]))))
    assert seen == list(enumerate(want[0]))



def test_stats_count_only_the_tokens_kept():
    """Drafts past max_new_tokens and tokens after a stop token are neither accepted nor returned: a copy of the
    model as draft, k = 8 and 3 new tokens is one prefill token and one round with room for 2 drafts."""
    model = perturbed_model()
    same = SpeculativeEngine(model, copy.deepcopy(model), 11 + 24, "cpu", draft_tokens=8)
    out = same.generate(PROMPTS[:1], 3, temperature=0)
    assert len(out[0]) == 3 and same.stats == {"proposed": 2, "accepted": 2, "target_forwards": 2, "tokens": 3}
    want = Engine(model, 1, 11 + 24, "cpu").generate(PROMPTS[:1], 24, temperature=0)[0]
    stop = want[1]
    same = SpeculativeEngine(model, copy.deepcopy(model), 11 + 24, "cpu", draft_tokens=8)
    out = same.generate(PROMPTS[:1], 24, temperature=0, stop_token=stop)
    assert same.stats["tokens"] == len(out[0]) <= 2

def peaked(seed, **kw):
    """A tiny model over 12 tokens whose next-token distributions are far from uniform."""
    model = perturbed_model(seed=seed, vocab_size=12, **kw)
    with torch.no_grad():
        model.transformer.ln_f.weight.mul_(4)
    return model


@pytest.mark.parametrize("settings", [(1.0, None, None), (0.7, 6, None), (1.2, None, 0.85)])
def test_sampled_tokens_follow_the_model(settings):
    """The first three tokens of 1500 rows of one prompt (the first from the prefill, the next from a round of
    k = 3 drafts: accepted drafts, a draw from the residual or the bonus draw): each row's token t matches the
    model's filtered probabilities given that row's tokens before it (no cache). A draft far from the model, so
    a wrong rule (e.g. keeping every draft token) fails this check (measured: chi-square of ~2000 vs a bound of
    ~40)."""
    model, draft = peaked(0), peaked(7, n_layer=1)
    prompt, n = [3, 1, 4], 1500
    spec = SpeculativeEngine(model, draft, len(prompt) + 5, "cpu", draft_tokens=3)
    rows = torch.tensor(spec.generate([prompt] * n, 5, *settings, generator=torch.Generator().manual_seed(1)))
    for t in range(4):
        idx = torch.cat([torch.tensor([prompt] * n), rows[:, :t]], dim=1)  # (n, P + t) each row's context
        with torch.no_grad():
            logits = model(idx)[0][:, -1]  # (n, vocab)
        assert_draws_follow(rows[:, t].numpy(), reference_probs(logits, *settings))
    assert 0.1 < spec.acceptance() < 0.9  # both branches of the rule were taken often


def test_caches_hold_the_accepted_tokens_after_rejections():
    """After a generation with many rejections, the model's cache equals a fresh prefill of the text (every
    column but the last token's), the draft's too for the columns it has read, and the next token's logits
    from the cache equal a full forward without one."""
    model, draft = perturbed_model(), perturbed_model(seed=5, n_layer=1, n_embd=16)
    prompt = [5, 9, 2]
    spec = SpeculativeEngine(model, draft, 3 + 30, "cpu", draft_tokens=4)
    seq = prompt + spec.generate([prompt], 30, 1.0, generator=torch.Generator().manual_seed(0))[0]
    assert spec.stats["accepted"] < spec.stats["proposed"] - 5
    for engine, net, cols in ((spec.target, model, len(seq) - 1), (spec.draft, draft, len(seq) - 2)):
        fresh = Engine(net, 1, 3 + 30, "cpu")
        fresh.prefill([seq[:cols]], 0, None)
        for a, b in zip(engine.k + engine.v, fresh.k + fresh.v):
            torch.testing.assert_close(a[:, :, :cols], b[:, :, :cols])
    pad = torch.zeros(1, dtype=torch.long)
    logits = spec.target.forward(torch.tensor([seq[-1:]]), torch.tensor(len(seq) - 1), pad)
    with torch.no_grad():
        full = model(torch.tensor([seq]))[0][:, -1]
    torch.testing.assert_close(logits, full, atol=1e-5, rtol=1e-5)


def test_the_pair_must_share_the_vocabulary():
    model = perturbed_model()
    with pytest.raises(ValueError, match="vocab_size=32 differs from the model's 64"):
        SpeculativeEngine(model, perturbed_model(vocab_size=32), 20, "cpu")
    with pytest.raises(ValueError, match="tokenizer"):
        speculative.check_pair(model, model, {"tokenizer": "char", "chars": "ab"}, {"tokenizer": "char", "chars": "ba"})
    with pytest.raises(ValueError, match="block_size=48"):
        SpeculativeEngine(model, model, 60, "cpu")


def sample(argv):
    return sample_mod.sample(load_config(sample_mod.SampleConfig, argv + ["--device=cpu", "--stream=False"]))


def test_sample_with_a_draft(trained, capsys):
    flags = [f"--out_dir={trained}", "--start=ROMEO:", "--max_new_tokens=20", "--num_samples=2"]
    plain = sample(flags + ["--temperature=0"])
    capsys.readouterr()
    assert sample(flags + ["--temperature=0", f"--draft={trained}", "--draft_tokens=3"]) == plain
    assert "speculative decoding: 100.0% of" in capsys.readouterr().err
    texts = sample(flags + [f"--draft={trained / 'ckpt.pt'}", "--top_k=5"])  # sampled, a checkpoint file
    assert len(texts) == 2 and all(t.startswith("ROMEO:") for t in texts)


def test_sample_refuses_a_draft_of_another_vocabulary(trained, tmp_path):
    from sologpt import hf_gpt2
    hf_gpt2.save(perturbed_model(vocab_size=50257), tmp_path / "gpt2-draft")  # GPT-2's tokenizer
    res = subprocess.run([sys.executable, "sample.py", f"--out_dir={trained}", f"--draft={tmp_path / 'gpt2-draft'}",
                          "--device=cpu", "--max_new_tokens=5"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert res.returncode != 0
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: the draft model's vocab_size=50257 differs"), res.stderr
    with pytest.raises(Exception, match="draft_tokens=0 must be at least 1"):
        sample([f"--out_dir={trained}", f"--draft={trained}", "--draft_tokens=0"])
    with pytest.raises(Exception, match="exceed the model's block_size=32.*lower max_new_tokens"):
        sample([f"--out_dir={trained}", f"--draft={trained}", "--max_new_tokens=40"])


def test_bench_measures_speculation_beside_the_engines(tmp_path):
    cmd = [sys.executable, "-m", "bench.generate", "--device", "cpu", "--n_layer", "1", "--n_head", "2", "--n_embd",
           "32", "--batch_sizes", "1", "--prompt", "4", "--new", "8", "--no_hf", "--reps", "1", "--check"]
    res = subprocess.run(cmd + ["--draft", "1x32", "--draft_tokens", "2"], cwd=REPO, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "speculative, k=2" in res.stdout and "accepted" in res.stdout
    assert "check: all greedy tokens equal" in res.stdout
    for bad, says in ((["--draft", str(tmp_path / "nothing")], "nothing"), (["--draft", "3x200"], "e.g. 2x256"),
                      (["--draft", "1x32", "--batch_sizes", "8"], "add 1 to --batch_sizes")):
        res = subprocess.run(cmd + bad, cwd=REPO, capture_output=True, text=True, timeout=300)
        assert res.returncode == 1 and res.stderr.startswith("error: ") and len(res.stderr.splitlines()) == 1, \
            res.stderr
        assert says in res.stderr
