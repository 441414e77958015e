"""Fine-tuning in train.py on tiny CPU runs: start from another run's checkpoint, freezing, LoRA (small adapter
checkpoints, exact resume, merge, sample and export), classification heads, vocabulary growth, Hugging Face
export with identical logits, and the errors for bad input."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

import export as export_mod
import finetune
import sample as sample_mod
import train as train_mod
from configurator import load_config
from conftest import REPO, SHARED, SHAKESPEARE
from model import GPT, GPTConfig, read_checkpoint


def run(flags):
    return train_mod.train(load_config(train_mod.TrainConfig, flags))


def error_of(main, argv, capsys):
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    return err


def bpe_flags(root, out, *extra, init=None):
    init = init or root / "gpt2"
    return [f"--data_root={root / 'data'}", "--dataset=bpe", f"--out_dir={out}", "--device=cpu", "--block_size=32",
            "--batch_size=4", "--eval_interval=3", "--eval_iters=2", "--progress=False", "--sample_tokens=0",
            "--learning_rate=3e-3", "--warmup_iters=0", f"--init_from={init}", *extra]


# ---- start points --------------------------------------------------------------------------------------

def test_start_from_a_sologpt_checkpoint_with_fresh_optimizer(tiny_flags, tmp_path):
    run(tiny_flags + ["--max_iters=6"])
    src = read_checkpoint(tmp_path / "out" / "ckpt.pt")
    flags = [f if not f.startswith("--out_dir") else f"--out_dir={tmp_path / 'ft'}" for f in tiny_flags]
    run(flags + [f"--init_from={tmp_path / 'out' / 'ckpt.pt'}", "--max_iters=0", "--n_layer=7"])  # shape: from ckpt
    ft = read_checkpoint(tmp_path / "ft" / "ckpt.pt")
    assert ft["iter_num"] == 0 and ft["init_source"] == str(tmp_path / "out" / "ckpt.pt")
    assert ft["model_config"]["n_layer"] == 2
    for k, v in src["model"].items():
        assert torch.equal(ft["model"][k], v), k
    assert ft["optimizer"]["state"] == {}  # a fresh optimizer


# ---- freezing ------------------------------------------------------------------------------------------

def test_frozen_layers_stay_bit_identical_and_have_no_optimizer_state(tiny_flags, tmp_path, capsys):
    run(tiny_flags + ["--max_iters=0"])
    start = read_checkpoint(tmp_path / "out" / "ckpt.pt")["model"]
    flags = [f if not f.startswith("--out_dir") else f"--out_dir={tmp_path / 'ft'}" for f in tiny_flags]
    capsys.readouterr()
    run(flags + [f"--init_from={tmp_path / 'out' / 'ckpt.pt'}", "--max_iters=5", "--freeze_layers=1",
                 "--freeze_embeddings=True"])
    assert "trainable parameters:" in capsys.readouterr().out
    ckpt = read_checkpoint(tmp_path / "ft" / "ckpt.pt")
    end = ckpt["model"]
    frozen = [k for k in start if k.startswith(("transformer.h.0.", "transformer.wte", "transformer.wpe", "lm_head"))]
    assert frozen and all(torch.equal(start[k], end[k]) for k in frozen)
    assert not torch.equal(start["transformer.h.1.mlp.c_fc.weight"], end["transformer.h.1.mlp.c_fc.weight"])
    n_trainable = sum(v.numel() for k, v in start.items() if k not in frozen)
    n_state = sum(s["exp_avg"].numel() for s in ckpt["optimizer"]["state"].values())
    assert n_state == n_trainable  # optimizer state only for the trainable tensors


def test_freeze_more_layers_than_the_model_has(tiny_flags, capsys):
    err = error_of(train_mod.main, tiny_flags + ["--freeze_layers=5"], capsys)
    assert "freeze_layers=5" in err and "2 layers" in err


# ---- LoRA ------------------------------------------------------------------------------------------------

def test_lora_run_small_checkpoint_exact_resume_merge_sample_export(gpt2_setup, tmp_path, capsys):
    transformers = pytest.importorskip("transformers")
    root = gpt2_setup
    lora_flags = ["--lora_rank=4", "--lora_alpha=8", "--lora_targets=attn,c_fc", "--lr_decay_iters=6", "--max_iters=6"]
    run(bpe_flags(root, tmp_path / "a", *lora_flags))
    ckpt_a = read_checkpoint(tmp_path / "a" / "ckpt.pt")
    assert set(ckpt_a["model"]) == set()  # nothing but adapters trains in an LM LoRA run
    adapter = ckpt_a["adapter"]["adapter"]
    assert adapter and all(".lora_" in k for k in adapter)
    full_bytes = sum(v.numel() * 4 for v in GPT.from_pretrained(root / "gpt2").state_dict().values())
    assert (tmp_path / "a" / "ckpt.pt").stat().st_size < full_bytes / 5  # adapters + their AdamW state only

    # exact resume: 3 steps, stop, resume to 6 == 6 straight
    run(bpe_flags(root, tmp_path / "b", *lora_flags[:-1], "--max_iters=3"))
    run(bpe_flags(root, tmp_path / "b", *lora_flags, init="resume"))
    ckpt_b = read_checkpoint(tmp_path / "b" / "ckpt.pt")
    for k, v in adapter.items():
        assert torch.equal(ckpt_b["adapter"]["adapter"][k], v), k

    # merged model == base + adapters; sample.py and export.py load the adapter checkpoint
    merged = finetune.load_model(ckpt_a)
    unmerged = finetune.load_model(ckpt_a, merge=False)
    idx = torch.randint(0, 50257, (2, 16), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(merged.eval()(idx)[0], unmerged.eval()(idx)[0], rtol=1e-5, atol=1e-5)
    base = GPT.from_pretrained(root / "gpt2")
    assert not torch.allclose(base.eval()(idx)[0], merged(idx)[0])  # the adapters did change the model
    texts = sample_mod.sample(load_config(sample_mod.SampleConfig, [f"--out_dir={tmp_path / 'a'}", "--device=cpu",
                                                                    "--num_samples=1", "--max_new_tokens=5"]))
    assert len(texts) == 1
    export_mod.export(load_config(export_mod.ExportConfig, [f"--out_dir={tmp_path / 'a'}",
                                                            f"--hf_dir={tmp_path / 'hf'}",
                                                            f"--merged_ckpt={tmp_path / 'm.pt'}"]))
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "hf").eval()
    with torch.no_grad():
        ours = merged(idx)[0]
        torch.testing.assert_close(hf(idx).logits[..., :50257], ours, rtol=1e-4, atol=1e-4)
    m = finetune.load_model(read_checkpoint(tmp_path / "m.pt")).eval()
    torch.testing.assert_close(m(idx)[0], ours, rtol=1e-5, atol=1e-5)


def test_lora_bad_input(gpt2_setup, tiny_flags, tmp_path, capsys):
    root = gpt2_setup
    err = error_of(train_mod.main, bpe_flags(root, tmp_path / "x", "--lora_rank=4", "--lora_targets=q_proj"), capsys)
    assert "unknown LoRA target 'q_proj'" in err
    err = error_of(train_mod.main, tiny_flags + ["--lora_rank=4"], capsys)
    assert "adapts pretrained weights" in err


def test_adapter_onto_a_base_of_another_shape_is_refused(gpt2_setup, tmp_path):
    transformers = pytest.importorskip("transformers")
    root = gpt2_setup
    run(bpe_flags(root, tmp_path / "a", "--lora_rank=2", "--max_iters=1"))
    ckpt = read_checkpoint(tmp_path / "a" / "ckpt.pt")
    other = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=2, n_head=2, n_embd=48, n_positions=64,
                                                                 vocab_size=50257))
    other.save_pretrained(tmp_path / "other")
    ckpt["init_source"] = str(tmp_path / "other")  # as if the base directory had been replaced
    with pytest.raises(ValueError, match="n_embd=32, base has n_embd=48"):
        finetune.load_model(ckpt)


# ---- export ------------------------------------------------------------------------------------------------

def test_export_to_hugging_face_gives_identical_logits(tiny_flags, tmp_path, capsys):
    transformers = pytest.importorskip("transformers")
    run(tiny_flags + ["--max_iters=3"])
    export_mod.main([f"--out_dir={tmp_path / 'out'}", f"--hf_dir={tmp_path / 'hf'}"])
    ours = GPT.from_checkpoint(read_checkpoint(tmp_path / "out" / "ckpt.pt")).eval()
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "hf").eval()
    idx = torch.randint(0, ours.config.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(hf(idx).logits, ours(idx)[0], rtol=1e-5, atol=1e-5)
    assert "nothing to do" in error_of(export_mod.main, [f"--out_dir={tmp_path / 'out'}"], capsys)


# ---- classification -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def polarity(tmp_path_factory):
    """The first 600 labelled sentences of sentence_polarity at character level, 10% validation."""
    root = tmp_path_factory.mktemp("cls")
    rows = (SHARED / "data" / "sentence_polarity" / "train.jsonl").read_text(encoding="utf-8").splitlines()[:600]
    (root / "rows.jsonl").write_text("\n".join(rows) + "\n", encoding="utf-8")
    cmd = [sys.executable, "prepare/classify.py", f"--input={root / 'rows.jsonl'}", "--name=pol",
           f"--data_root={root / 'data'}", "--tokenizer=char"]
    res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    return root


@pytest.fixture(scope="module")
def easy_classes(tmp_path_factory):
    """A task a tiny model learns in a few dozen steps: the label is whether the text holds an 'x'."""
    root = tmp_path_factory.mktemp("easy")
    rng = np.random.default_rng(0)
    rows = []
    for i in range(400):
        words = ["".join(rng.choice(list("abcdefg"), size=4)) for _ in range(5)]
        if i % 2:
            words[rng.integers(5)] = "xxxx"
        rows.append({"text": " ".join(words), "label": "pos" if i % 2 else "neg"})
    write_rows(root / "rows.jsonl", rows)
    cmd = [sys.executable, "prepare/classify.py", f"--input={root / 'rows.jsonl'}", "--name=easy",
           f"--data_root={root / 'data'}", "--tokenizer=char"]
    res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    return root


@pytest.mark.parametrize("pool", ["last", "mean"])
def test_classifier_learns_and_reports_accuracy(easy_classes, tmp_path, pool):
    flags = [f"--data_root={easy_classes / 'data'}", "--dataset=easy", f"--out_dir={tmp_path / 'out'}",
             "--device=cpu", "--task=classify", f"--cls_pool={pool}", "--n_layer=1", "--n_head=2", "--n_embd=32",
             "--block_size=32", "--batch_size=32", "--max_iters=60", "--eval_interval=30", "--eval_iters=2",
             "--learning_rate=1e-2", "--warmup_iters=5", "--progress=False"]
    run(flags)
    lines = [json.loads(x) for x in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    last = lines[-1]
    assert last["val_accuracy"] >= 0.9 and last["val_macro_f1"] >= 0.9, last
    assert last["train_loss"] < 0.5 * lines[0]["train_loss"]
    # sample.py classifies each line of the prompt with the trained head
    labels = sample_mod.sample(load_config(sample_mod.SampleConfig, [f"--out_dir={tmp_path / 'out'}",
                                                                     "--device=cpu", "--start=abcd xxxx bcde fgab cdef\nabcd efga bcde fgab cdef"]))
    assert labels == ["pos", "neg"]


def test_classifier_batches_right_padded_and_truncated_from_the_left():
    import classify
    tokens = np.arange(1, 11, dtype=np.uint16)  # examples [1..3], [4..10]
    split = (tokens, np.array([0, 3, 10]), np.array([0, 1]))
    x, lengths, y = classify.make_batch(split, np.array([0, 1]), 5, "cpu")
    assert x.tolist() == [[1, 2, 3, 0, 0], [6, 7, 8, 9, 10]] and lengths.tolist() == [3, 5] and y.tolist() == [0, 1]
    pred, true = np.array([0, 0, 1, 1]), np.array([0, 1, 1, 1])
    assert classify.macro_f1(pred, true, 2) == pytest.approx((2 / 3 + 0.8) / 2)


def test_padding_does_not_change_the_class_logits():
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=64, n_classes=3)).eval()
    ids = torch.randint(1, 64, (1, 7))
    padded = torch.cat([ids, torch.zeros(1, 9, dtype=torch.long)], dim=1)
    for pool in ("last", "mean"):
        model.config.cls_pool = pool
        alone = model(ids)[0]
        torch.testing.assert_close(model(padded, lengths=torch.tensor([7]))[0], alone, rtol=1e-5, atol=1e-5)


def write_rows(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")


@pytest.mark.parametrize("rows, message", [
    ([{"text": "a", "label": "x"}, {"text": "b"}], "rows.jsonl:2 has no label"),
    ([{"text": "a", "label": "x"}, {"text": "b", "label": "x"}], "only one class"),
    ([{"txt": "a", "label": "x"}], "rows.jsonl:1 has no text"),
])
def test_prepare_classify_bad_rows(tmp_path, rows, message):
    write_rows(tmp_path / "rows.jsonl", rows)
    cmd = [sys.executable, "prepare/classify.py", f"--input={tmp_path / 'rows.jsonl'}", "--name=x",
           f"--data_root={tmp_path}", "--tokenizer=char"]
    res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=60)
    assert res.returncode == 1 and message in res.stderr and res.stderr.count("\n") == 1, res.stderr
    assert not (tmp_path / "x" / "meta.json").exists()


def test_task_and_data_must_agree(polarity, tiny_flags, capsys):
    err = error_of(train_mod.main, [f"--data_root={polarity / 'data'}", "--dataset=pol", "--device=cpu"], capsys)
    assert "holds 'classify' data but task='lm'" in err
    err = error_of(train_mod.main, tiny_flags + ["--task=classify"], capsys)
    assert "holds 'lm' data but task='classify'" in err


# ---- vocabulary growth (domain tokens) ------------------------------------------------------------------

def test_resize_vocab_from_gpt2_weights(gpt2_setup):
    model = finetune.start_model(gpt2_setup / "gpt2", vocab_size=50260)
    base = GPT.from_pretrained(gpt2_setup / "gpt2")
    w = model.transformer.wte.weight
    assert w.shape[0] == 50260 and model.lm_head.weight is w
    assert torch.equal(w[:50257], base.transformer.wte.weight)
    torch.testing.assert_close(w[50257:], base.transformer.wte.weight.mean(0).expand(3, -1))
    idx = torch.tensor([[1, 2, 50259]])
    assert model(idx)[0].shape == (1, 3, 50260)
    with pytest.raises(ValueError, match="cannot shrink"):
        model.resize_vocab(100)


def test_finetune_shakespeare_config_runs(gpt2_setup, tmp_path):
    from conftest import REPO
    run([str(REPO / "config" / "finetune_shakespeare.py"), f"--init_from={gpt2_setup / 'gpt2'}",
         f"--data_root={gpt2_setup / 'data'}", "--dataset=bpe", f"--out_dir={tmp_path / 'o'}", "--device=cpu",
         "--block_size=32", "--batch_size=2", "--gradient_accumulation_steps=1", "--max_iters=2",
         "--eval_interval=2", "--eval_iters=1", "--progress=False", "--sample_tokens=0"])
    ckpt = read_checkpoint(tmp_path / "o" / "ckpt.pt")
    assert ckpt["iter_num"] == 2 and ckpt["model_config"]["vocab_pad_multiple"] == 64
    assert ckpt["train_config"]["learning_rate"] == 3e-5


def test_domain_tokens_grow_gpt2_and_decode(gpt2_setup, tmp_path):
    """prepare/text.py --extra_tokens, then fine-tune GPT-2 weights: the embedding grows by the new terms, whose
    rows start at the mean, and sample.py decodes them."""
    terms = tmp_path / "terms.txt"
    terms.write_text("Bolingbroke\nNorthumberland\nthe\nBolingbroke\n", encoding="utf-8")  # 'the' is one token
    docs = tmp_path / "docs"
    docs.mkdir()
    text = SHAKESPEARE.read_text(encoding="utf-8")[:60_000]
    for i in range(20):
        (docs / f"{i}.txt").write_text(text[i * 3000:(i + 1) * 3000] + " Bolingbroke and Northumberland.",
                                       encoding="utf-8")
    cmd = [sys.executable, "prepare/text.py", str(docs), "--name=dom", f"--data_root={tmp_path / 'data'}",
           f"--extra_tokens={terms}", "--min_split_tokens=40", "--val_fraction=0.2"]
    res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    meta = json.loads((tmp_path / "data" / "dom" / "meta.json").read_text())
    assert meta["extra_tokens"] == ["Bolingbroke", "Northumberland"] and meta["vocab_size"] == 50259
    run([f"--data_root={tmp_path / 'data'}", "--dataset=dom", f"--out_dir={tmp_path / 'o'}", "--device=cpu",
         f"--init_from={gpt2_setup / 'gpt2'}", "--block_size=32", "--batch_size=2", "--max_iters=2",
         "--eval_interval=2", "--eval_iters=1", "--progress=False", "--sample_tokens=0"])
    ckpt = read_checkpoint(tmp_path / "o" / "ckpt.pt")
    assert ckpt["model_config"]["vocab_size"] == 50259
    texts = sample_mod.sample(load_config(sample_mod.SampleConfig, [f"--out_dir={tmp_path / 'o'}", "--device=cpu",
                                                                    "--start=Bolingbroke", "--num_samples=1",
                                                                    "--max_new_tokens=3", "--stream=False"]))
    assert texts[0].startswith("Bolingbroke")


def test_start_point_guards(tiny_flags, tmp_path, capsys, char_data):
    run(tiny_flags + ["--max_iters=2"])
    own = tmp_path / "out" / "ckpt.pt"
    before = own.read_bytes()
    # a new run in out_dir would overwrite its own start point
    err = error_of(train_mod.main, tiny_flags + [f"--init_from={own}", "--overwrite=True"], capsys)
    assert "this run's own checkpoint" in err and own.read_bytes() == before
    # a quantized file is not a start point for training
    res = subprocess.run([sys.executable, "quantize.py", "--ckpt", str(own), "--mode", "int8"], cwd=REPO,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    other = [f if not f.startswith("--out_dir") else f"--out_dir={tmp_path / 'o2'}" for f in tiny_flags]
    err = error_of(train_mod.main, other + [f"--init_from={tmp_path / 'out' / 'ckpt_int8.pt'}"], capsys)
    assert "is quantized (int8)" in err
    # resuming with a switch that changes which tensors train is refused
    err = error_of(train_mod.main, tiny_flags + ["--init_from=resume", "--freeze_layers=1"], capsys)
    assert "was trained with freeze_layers=0, not 1" in err
    # another character table: ids would mean other characters
    meta = json.loads((char_data / "tiny" / "meta.json").read_text())
    (tmp_path / "out" / "meta.json").write_text(json.dumps({**meta, "chars": meta["chars"][::-1]}))
    err = error_of(train_mod.main, other + [f"--init_from={own}"], capsys)
    assert "another tokenizer" in err and "chars differs" in err


def test_frozen_int8_base_checkpoint_loads_for_sampling(tiny_flags, tmp_path):
    run(tiny_flags + ["--max_iters=2"])
    other = [f if not f.startswith("--out_dir") else f"--out_dir={tmp_path / 'f'}" for f in tiny_flags]
    run(other + [f"--init_from={tmp_path / 'out' / 'ckpt.pt'}", "--max_iters=2", "--freeze_layers=1",
                 "--base_dtype=int8"])
    ckpt = read_checkpoint(tmp_path / "f" / "ckpt.pt")
    assert ckpt["model"]["transformer.h.0.attn.c_attn.weight"].dtype == torch.int8  # stored as trained
    model = finetune.load_model(ckpt)
    assert model.transformer.h[0].attn.c_attn.weight.dtype == torch.float32  # back to an ordinary model
    texts = sample_mod.sample(load_config(sample_mod.SampleConfig, [f"--out_dir={tmp_path / 'f'}", "--device=cpu",
                                                                    "--num_samples=1", "--max_new_tokens=5",
                                                                    "--stream=False"]))
    assert len(texts) == 1
