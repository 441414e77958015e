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
    from configurator import load_config
    out = tmp_path_factory.mktemp("run") / "out"
    flags = [f"--data_root={char_data}", "--dataset=tiny", f"--out_dir={out}", "--device=cpu", "--n_layer=2",
             "--n_head=2", "--n_embd=32", "--block_size=32", "--batch_size=8", "--max_iters=20", "--eval_iters=1",
             "--progress=False", "--sample_tokens=0"]
    train_mod.train(load_config(train_mod.TrainConfig, flags))
    return out
