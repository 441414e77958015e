"""sologpt/checkpoint.py: the format (read's errors for missing, truncated, random and foreign files), the
atomic save, and the model of every checkpoint kind."""

import pytest
import torch

from conftest import make_model, perturb, rand_ids
from sologpt import checkpoint
from sologpt.checkpoint import FORMAT_VERSION as CKPT_FORMAT_VERSION, read as read_checkpoint

V = 64  # vocabulary of the tiny models


def _checkpoint(model):
    return {"format_version": CKPT_FORMAT_VERSION, "model_config": checkpoint.model_config(model), "model": model.state_dict(),
            "iter_num": 3, "best_val_loss": 1.5}


def test_read_checkpoint_roundtrip(tmp_path):
    model = perturb(make_model())
    torch.save(_checkpoint(model), tmp_path / "ckpt.pt")
    ckpt = read_checkpoint(tmp_path / "ckpt.pt")
    assert ckpt["iter_num"] == 3
    again = checkpoint.load_model(ckpt).eval()
    idx = rand_ids(1, 8)
    assert torch.equal(again(idx)[0], model(idx)[0])


def test_read_checkpoint_missing(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        read_checkpoint(tmp_path / "nope.pt")


def test_read_checkpoint_truncated(tmp_path):
    f = tmp_path / "ckpt.pt"
    torch.save(_checkpoint(make_model()), f)
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="corrupt or truncated"):
        read_checkpoint(f)


def test_read_checkpoint_random_bytes(tmp_path):
    f = tmp_path / "ckpt.pt"
    f.write_bytes(bytes(torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(0)).tolist()))
    with pytest.raises(ValueError, match="corrupt or truncated"):
        read_checkpoint(f)


def test_read_checkpoint_wrong_format(tmp_path):
    f = tmp_path / "ckpt.pt"
    ckpt = _checkpoint(make_model())
    del ckpt["format_version"]
    torch.save(ckpt, f)
    with pytest.raises(ValueError, match="not a sologpt checkpoint"):
        read_checkpoint(f)
    torch.save([1, 2, 3], f)
    with pytest.raises(ValueError, match="not a sologpt checkpoint"):
        read_checkpoint(f)


# ---- the atomic save ----------------------------------------------------------------------------------------------

def test_json_files_are_written_atomically(tmp_path, monkeypatch):
    path = tmp_path / "config.json"
    checkpoint.write_json(path, {"a": 1})

    def dies(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("os.fsync", dies)
    with pytest.raises(OSError):
        checkpoint.write_json(path, {"a": 2})
    monkeypatch.undo()
    assert path.read_text() == '{\n  "a": 1\n}\n' and list(tmp_path.iterdir()) == [path]  # no temp file left


def test_a_save_syncs_the_file_then_the_folder(tmp_path, monkeypatch):
    """The data reaches the disk before the rename publishes it, and the folder after it (the rename itself is only
    durable then); prepare/ does the same for the token files and meta.json."""
    import os
    import stat
    from prepare import shakespeare_char
    synced, real = [], os.fsync

    def fsync(fd):
        synced.append("folder" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file")
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    checkpoint.save(tmp_path / "ckpt.pt", {"x": torch.ones(2)})
    assert synced == ["file", "folder"]
    synced.clear()
    (tmp_path / "in.txt").write_text("to be or not to be\n" * 50)
    shakespeare_char.write_dataset(tmp_path / "in.txt", tmp_path / "data")
    assert synced == ["file", "file", "file", "folder"]  # train.bin, val.bin, meta.json, then the folder


def test_a_pickle_that_asks_for_code_is_refused_as_unsafe(tmp_path):
    import os

    class Evil:
        def __reduce__(self):
            return os.system, (f"touch {tmp_path / 'ran'}",)

    torch.save({"format_version": CKPT_FORMAT_VERSION, "model": Evil()}, tmp_path / "ckpt.pt")
    with pytest.raises(ValueError, match=r"was refused as unsafe: it asks to import posix.system"):
        read_checkpoint(tmp_path / "ckpt.pt")
    torch.save(torch.nn.Linear(2, 2), tmp_path / "module.pt")  # a whole module, not its state dict
    with pytest.raises(ValueError, match=r"refused as unsafe: it asks to import torch.nn.modules.linear.Linear"):
        read_checkpoint(tmp_path / "module.pt")
    assert not (tmp_path / "ran").exists()


# ---- checkpoints written before the library moved into sologpt/ ---------------------------------------------------

# format 1 as the pre-redesign main wrote it (checked against real files of that version): its top-level keys, the
# model_config of a plain GPT-2 model, and the train_config fields of that version's TrainConfig
V1_KEYS = {"format_version", "model_config", "model", "optimizer", "scaler", "iter_num", "init_source", "best_val_loss",
           "last_eval_iter", "skipped_steps", "elapsed_s", "train_config", "rng"}
V1_MODEL_CONFIG = {"block_size", "vocab_size", "vocab_pad_multiple", "n_layer", "n_head", "n_embd", "dropout", "bias",
                   "attn_impl", "n_classes", "cls_pool"}
V1_TRAIN_FIELDS = (
    'out_dir', 'init_from', 'overwrite', 'always_save_checkpoint', 'dataset', 'data_root', 'data_input', 'batch_size',
    'auto_batch_sequences', 'block_size', 'gradient_accumulation_steps', 'n_layer', 'n_head', 'n_embd', 'dropout',
    'bias', 'attn_impl', 'vocab_pad_multiple', 'rope', 'norm', 'qk_norm', 'mlp_act', 'tie_embeddings', 'attn_backend',
    'seq_warmup_iters', 'seq_warmup_start', 'curriculum', 'task', 'cls_pool', 'freeze_layers', 'freeze_embeddings',
    'lora_rank', 'lora_alpha', 'lora_dropout', 'lora_targets', 'qat', 'qat_group_size', 'teacher', 'distill_alpha',
    'distill_temperature', 'grad_checkpointing', 'chunked_loss', 'optim_state', 'base_dtype', 'optimizer',
    'learning_rate', 'weight_decay', 'beta1', 'beta2', 'grad_clip', 'max_iters', 'decay_lr', 'warmup_iters',
    'lr_decay_iters', 'min_lr', 'eval_interval', 'eval_iters', 'log_interval', 'progress', 'sample_tokens', 'device',
    'dtype', 'compile', 'cuda_graphs', 'fp8', 'fp8_head', 'residual_bf16', 'seed')


def as_v1(ckpt):
    """A checkpoint reduced to what format 1 held before the redesign: fields added since are dropped."""
    return {**{k: ckpt[k] for k in V1_KEYS},
            "model_config": {k: v for k, v in ckpt["model_config"].items() if k in V1_MODEL_CONFIG},
            "train_config": {k: v for k, v in ckpt["train_config"].items() if k in V1_TRAIN_FIELDS}}


def test_checkpoints_keep_format_1(trained):
    ckpt = read_checkpoint(trained / "ckpt.pt")
    # keys added since, which readers of format 1 ignore: the number of ranks that trained it (torchrun) and the
    # step of the best val loss, and the guard's counters (sologpt/guard.py), which a checkpoint without them starts
    # at their defaults
    assert set(ckpt) == V1_KEYS | {"world_size", "best_iter", "guard"}
    assert set(ckpt["model_config"]) == V1_MODEL_CONFIG
    assert set(ckpt["train_config"]) >= set(V1_TRAIN_FIELDS)


def test_a_pre_redesign_checkpoint_resumes_exactly_and_samples(tiny_flags, tmp_path):
    import sample as sample_mod
    from conftest import run_train
    from sologpt.configurator import load_config
    flags = tiny_flags + ["--dropout=0.1", "--eval_interval=4", "--lr_decay_iters=8"]
    run_train(flags + ["--max_iters=8", f"--out_dir={tmp_path / 'straight'}"])
    run_train(flags + ["--max_iters=4"])
    path = tmp_path / "out" / "ckpt.pt"
    checkpoint.save(path, as_v1(read_checkpoint(path)))
    run_train(flags + ["--max_iters=8", "--init_from=resume"])
    a, b = read_checkpoint(tmp_path / "straight" / "ckpt.pt")["model"], read_checkpoint(path)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    checkpoint.save(path, as_v1(read_checkpoint(path)))
    texts = sample_mod.sample(load_config(sample_mod.SampleConfig, [f"--out_dir={tmp_path / 'out'}", "--device=cpu",
                                                                    "--num_samples=1", "--max_new_tokens=5"]))
    assert len(texts) == 1
