"""Shared fixtures: one CPU thread, the shared data folder, a tiny character dataset, tiny train flags."""

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
# ../shared next to the clone (CI and the dev machines); SOLOGPT_SHARED points elsewhere (e.g. on a GPU box)
SHARED = Path(os.environ.get("SOLOGPT_SHARED", REPO.parent / "shared"))
SHAKESPEARE = SHARED / "data" / "shakespeare" / "input.txt"


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    """Tiny matmuls gain nothing from threads, and on a busy 2-core machine OpenMP's spinning workers
    made each forward 10-100x slower (measured: 14-130 ms vs 0.8 ms for one tiny forward)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # for the scripts the tests start as subprocesses
    os.environ.setdefault("TIKTOKEN_CACHE_DIR", str(SHARED / "tiktoken"))
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def char_data(tmp_path_factory):
    """data_root holding 'tiny': the first 200k characters of tiny-shakespeare, prepared at character level."""
    from prepare.shakespeare_char import write_dataset
    root = tmp_path_factory.mktemp("data")
    text = tmp_path_factory.mktemp("text") / "input.txt"
    text.write_text(SHAKESPEARE.read_text(encoding="utf-8")[:200_000], encoding="utf-8")
    write_dataset(text, root / "tiny")
    return root


@pytest.fixture
def tiny_flags(char_data, tmp_path):
    """Flags for a tiny, fast CPU training run writing to tmp_path/out."""
    return [f"--data_root={char_data}", "--dataset=tiny", f"--out_dir={tmp_path / 'out'}", "--device=cpu",
            "--n_layer=2", "--n_head=2", "--n_embd=32", "--block_size=32", "--batch_size=8",
            "--eval_iters=2", "--eval_interval=5", "--log_interval=1", "--warmup_iters=2",
            "--learning_rate=3e-3", "--min_lr=3e-4", "--progress=False", "--sample_tokens=0", "--compile=False"]


@pytest.fixture(scope="module")
def trained(char_data, tmp_path_factory):
    """out_dir of a tiny character model trained for 20 steps (one per test module)."""
    import train as train_mod
    from sologpt.configurator import load_config
    out = tmp_path_factory.mktemp("run") / "out"
    flags = [f"--data_root={char_data}", "--dataset=tiny", f"--out_dir={out}", "--device=cpu", "--n_layer=2",
             "--n_head=2", "--n_embd=32", "--block_size=32", "--batch_size=8", "--max_iters=20", "--eval_iters=1",
             "--progress=False", "--sample_tokens=0"]
    train_mod.train(load_config(train_mod.TrainConfig, flags))
    return out


@pytest.fixture(scope="session")
def gpt2_setup(tmp_path_factory):
    """A tiny random GPT-2 directory (transformers' own format) and a BPE dataset of tiny-shakespeare."""
    transformers = pytest.importorskip("transformers")
    from prepare.shakespeare import write_dataset
    root = tmp_path_factory.mktemp("ft")
    text = root / "input.txt"
    text.write_text(SHAKESPEARE.read_text(encoding="utf-8")[:30_000], encoding="utf-8")
    write_dataset(text, root / "data" / "bpe")
    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=2, n_head=2, n_embd=32, n_positions=64,
                                                              vocab_size=50257))
    hf.save_pretrained(root / "gpt2")
    return root


def perturbed_model(seed=0, **kw):
    """A tiny GPT in eval mode with larger weights than the init, so a wrong mask or position changes the
    generated tokens. kw: GPTConfig fields over n_layer=2, n_head=2, n_embd=32, block_size=48, vocab_size=64."""
    from model import GPT, GPTConfig
    torch.manual_seed(seed)
    model = GPT(GPTConfig(**{**dict(n_layer=2, n_head=2, n_embd=32, block_size=48, vocab_size=64), **kw})).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape) * 0.3 / p.shape[-1] ** 0.5)
    return model


def assert_resume_is_exact(flags, tmp_path, stop=4, steps=8, learns_below=4.0):
    """Train `steps` steps straight into tmp_path/out, and again into tmp_path/r stopping after `stop` and
    resuming: the final weights must be bit for bit the same (CPU, float32). Returns the second run's flags."""
    import train as train_mod
    from sologpt.configurator import load_config
    from sologpt.checkpoint import read as read_checkpoint

    def run(f):
        train_mod.train(load_config(train_mod.TrainConfig, f))

    run(flags + [f"--max_iters={steps}"])
    straight = read_checkpoint(tmp_path / "out" / "ckpt.pt")
    assert straight["best_val_loss"] < learns_below  # it learns (ln 65 = 4.17 at the start)
    other = [f if not f.startswith("--out_dir") else f"--out_dir={tmp_path / 'r'}" for f in flags]
    run(other + [f"--max_iters={stop}"])
    run(other + [f"--max_iters={steps}", "--init_from=resume"])
    resumed = read_checkpoint(tmp_path / "r" / "ckpt.pt")
    for k, v in straight["model"].items():
        assert torch.equal(resumed["model"][k], v), k
    return other


def run_train(flags):
    """train.py's train() on a config made from flags, as the command line would."""
    import train as train_mod
    from sologpt.configurator import load_config
    return train_mod.train(load_config(train_mod.TrainConfig, flags))


def error_of(main, argv, capsys):
    """Run a script's main(argv), expect exit 1 and return its single stderr line."""
    capsys.readouterr()  # drop what earlier steps of the test printed
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    return err


def bpe_flags(root, out, *extra, init=None):
    """Flags for a tiny CPU run on gpt2_setup's BPE data, starting from its GPT-2 directory (or init)."""
    init = init or root / "gpt2"
    return [f"--data_root={root / 'data'}", "--dataset=bpe", f"--out_dir={out}", "--device=cpu", "--block_size=32",
            "--batch_size=4", "--eval_interval=3", "--eval_iters=2", "--progress=False", "--sample_tokens=0",
            "--learning_rate=3e-3", "--warmup_iters=0", f"--init_from={init}", *extra]


TINY = dict(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=64, dropout=0.0)  # the tiny test model


def make_model(seed=0, **overrides):
    """A tiny GPT (TINY, with overrides) in eval mode."""
    from model import GPT, GPTConfig
    torch.manual_seed(seed)
    return GPT(GPTConfig(**{**TINY, **overrides})).eval()


def perturb(model, seed=1, std=0.5):
    """Replace the near-zero init (c_proj std ~0.007, zero biases) with larger random weights so that the attention
    and MLP paths clearly matter and a wrong mask or position could not hide in noise."""
    import math
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std / math.sqrt(max(p.shape[-1], 1)) + p)
    return model


def rand_ids(B, T, seed=0, vocab=64):
    return torch.randint(0, vocab, (B, T), generator=torch.Generator().manual_seed(seed))
