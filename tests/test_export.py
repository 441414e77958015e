"""tools/export.py: a Hugging Face GPT-2 directory with the same logits, and its errors."""

import json
import os
import stat

import pytest
import torch

import sample as sample_mod
from conftest import error_of, run_train as run
from model import GPT, GPTConfig
from sologpt import checkpoint
from sologpt.checkpoint import read as read_checkpoint
from sologpt.configurator import load_config
from tools import export as export_mod


# ---- export ------------------------------------------------------------------------------------------------

def test_export_to_hugging_face_gives_identical_logits(tiny_flags, tmp_path, capsys):
    transformers = pytest.importorskip("transformers")
    run(tiny_flags + ["--max_iters=3"])
    export_mod.main([f"--out_dir={tmp_path / 'out'}", f"--hf_dir={tmp_path / 'hf'}"])
    ours = checkpoint.load_model(read_checkpoint(tmp_path / "out" / "ckpt.pt")).eval()
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "hf").eval()
    idx = torch.randint(0, ours.config.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(hf(idx).logits, ours(idx)[0], rtol=1e-5, atol=1e-5)
    assert "nothing to do" in error_of(export_mod.main, [f"--out_dir={tmp_path / 'out'}"], capsys)


def test_merged_checkpoint_of_a_low_precision_base_run_loads(tiny_flags, tmp_path, capsys):
    run(tiny_flags + ["--max_iters=2"])
    flags = [f if not f.startswith("--out_dir") else f"--out_dir={tmp_path / 'f'}" for f in tiny_flags]
    run(flags + [f"--init_from={tmp_path / 'out' / 'ckpt.pt'}", "--max_iters=2", "--freeze_layers=1",
                 "--base_dtype=int8"])
    export_mod.main([f"--out_dir={tmp_path / 'f'}", f"--merged_ckpt={tmp_path / 'm.pt'}"])
    merged = checkpoint.load_model(read_checkpoint(tmp_path / "m.pt")).eval()
    ours = checkpoint.load_model(read_checkpoint(tmp_path / "f" / "ckpt.pt")).eval()
    idx = torch.randint(0, 65, (1, 8))
    assert torch.equal(merged(idx)[0], ours(idx)[0])
    err = error_of(export_mod.main, [f"--out_dir={tmp_path / 'f'}", f"--merged_ckpt={tmp_path / 'no' / 'm.pt'}"],
                   capsys)
    assert "does not exist" in err


# ---- the tokenizer files ---------------------------------------------------------------------------------------

TEXTS = ["hello world", "ROMEO:\nWhat, ho! Apothecary!\n\n", "  two spaces,\tthree   spaces\n\n\n  ", "trailing  ",
         "café naïve 日本語 😀 — “quotes”", "it's I'M we'll they've", "a<|endoftext|>b", "<|endoftext|>",
         "3.14159 12,345", "\r\nwindows\r\n", "x" * 300]


def round_trip(hf_dir, enc, texts):
    """AutoTokenizer of the exported folder against sologpt's tokenizer: the same ids, and back to the same text."""
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(hf_dir)
    for text in texts:
        ids = enc.encode(text)
        assert hf.encode(text) == ids, text
        assert hf.decode(ids) == text == enc.decode(ids), text
    return hf


def gpt2_run(folder, meta, vocab_size):
    """A run folder holding a tiny GPT of GPT-2's vocabulary (plus any domain tokens) and its meta.json."""
    folder.mkdir(parents=True)
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=vocab_size, block_size=32, n_layer=1, n_head=1, n_embd=8))
    checkpoint.save(folder / "ckpt.pt", checkpoint.from_model(model))
    (folder / "meta.json").write_text(json.dumps(meta))
    return folder


def test_export_writes_tokenizer_files_that_encode_as_sologpt(trained, tmp_path, capsys):
    from sologpt import tokenizer
    old = os.umask(0o027)  # the files get the user's umask (safetensors alone would make the weights 0600)
    try:
        export_mod.main([f"--out_dir={trained}", f"--hf_dir={tmp_path / 'char'}"])
        run = gpt2_run(tmp_path / "bpe", tokenizer.gpt2_meta(), 50257)
        export_mod.main([f"--out_dir={run}", f"--hf_dir={tmp_path / 'gpt2'}"])
    finally:
        os.umask(old)
    for name in ("model.safetensors", "config.json", "vocab.json", "merges.txt", "tokenizer_config.json"):
        assert stat.S_IMODE(os.stat(tmp_path / "gpt2" / name).st_mode) == 0o640, name
    # GPT-2 BPE: vocab.json + merges.txt rebuilt from tiktoken's ranks; <|endoftext|> in text is the special token
    enc = tokenizer.from_meta(tokenizer.gpt2_meta())
    hf = round_trip(tmp_path / "gpt2", enc, TEXTS)
    assert hf.eos_token_id == 50256 and hf.convert_ids_to_tokens(enc.encode(" world")) == ["Ġworld"]
    # characters: tokenizer.json, one token per character
    meta = json.loads((trained / "meta.json").read_text())
    round_trip(tmp_path / "char", tokenizer.from_meta(meta), [TEXTS[1], "  two spaces,  three   spaces\n\n\n  "])
    # the folder also holds meta.json, so sologpt's tools read the export with its tokenizer
    out = sample_mod.sample(load_config(sample_mod.SampleConfig, [f"--out_dir={tmp_path / 'char'}", "--start=ROMEO:",
                                                                  "--num_samples=1", "--max_new_tokens=5"]))
    assert out[0].startswith("ROMEO:")
    # an export never goes over a run or other files; an earlier export is replaced
    err = error_of(export_mod.main, [f"--out_dir={trained}", f"--hf_dir={trained}"], capsys)
    assert "holds files an export does not write (best.pt, ckpt.pt" in err
    export_mod.main([f"--out_dir={trained}", f"--hf_dir={tmp_path / 'gpt2'}"])  # char over the BPE export
    assert not (tmp_path / "gpt2" / "vocab.json").exists() and (tmp_path / "gpt2" / "tokenizer.json").exists()


def test_domain_tokens_are_added_tokens(tmp_path):
    from sologpt import tokenizer
    meta = {**tokenizer.gpt2_meta(), "vocab_size": 50260, "extra_tokens": ["GPU cluster", "Kubernetes", "naïve-term"]}
    export_mod.main([f"--out_dir={gpt2_run(tmp_path / 'run', meta, 50260)}", f"--hf_dir={tmp_path / 'hf'}"])
    enc = tokenizer.from_meta(meta)
    round_trip(tmp_path / "hf", enc, ["the GPU cluster runs Kubernetes", "GPU clusters and Kubernetes's pods",
                                      "a GPU clusterGPU cluster<|endoftext|>x", "GPU clus"])
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert hf.encode("a naïve-term here") == enc.encode("a naïve-term here")  # the ids match; decoding does not:
    assert "non-ASCII" in (tmp_path / "hf" / "TOKENIZER.md").read_text()  # the folder says so


# ---- a padded vocabulary (vocab_pad_multiple, "auto" -> 64 on CUDA) -------------------------------------------

def test_padded_vocabulary_samples_scores_and_exports_as_unpadded(tiny_flags, tmp_path):
    """A run trained with padding rows behaves as the same weights without them: greedy samples, scores and the
    exported Hugging Face model agree, and the export holds the real rows only."""
    from tools import score as score_mod
    run(tiny_flags + ["--max_iters=3", "--vocab_pad_multiple=64"])
    padded = read_checkpoint(tmp_path / "out" / "ckpt.pt")
    vocab = padded["model_config"]["vocab_size"]
    rows = padded["model"]["transformer.wte.weight"].shape[0]
    assert rows % 64 == 0 and vocab < rows
    plain = tmp_path / "plain"  # the same run folder, its weights cropped to the real rows
    plain.mkdir()
    (plain / "meta.json").write_bytes((tmp_path / "out" / "meta.json").read_bytes())
    crop = {k: v[:vocab] if k in ("transformer.wte.weight", "lm_head.weight") else v
            for k, v in padded["model"].items()}
    torch.save({**padded, "model": crop, "model_config": {**padded["model_config"], "vocab_pad_multiple": 1}},
               plain / "ckpt.pt")
    greedy = ["--num_samples=1", "--max_new_tokens=20", "--temperature=0", "--top_k=None", "--device=cpu",
              "--start=ROMEO:"]
    a, b = (sample_mod.sample(load_config(sample_mod.SampleConfig, [f"--out_dir={d}", *greedy]))
            for d in (tmp_path / "out", plain))
    assert a == b and len(a[0]) == len("ROMEO:") + 20
    text = tmp_path / "text.txt"
    text.write_text("ROMEO:\nWhat light through yonder window breaks?\n" * 4, encoding="utf-8")
    s, t = (score_mod.score(load_config(score_mod.ScoreConfig, [f"--out_dir={d}", f"--input={text}",
                                                                "--device=cpu", "--progress=False"]))
            for d in (tmp_path / "out", plain))
    assert s["tokens"] == t["tokens"] and s["total_nll"] == pytest.approx(t["total_nll"], rel=1e-6)
    transformers = pytest.importorskip("transformers")
    export_mod.main([f"--out_dir={tmp_path / 'out'}", f"--hf_dir={tmp_path / 'hf'}"])
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "hf").eval()
    assert hf.config.vocab_size == vocab and hf.transformer.wte.weight.shape[0] == vocab
    ours = checkpoint.load_model(padded).eval()
    idx = torch.randint(0, vocab, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(hf(idx).logits, ours(idx)[0], rtol=1e-5, atol=1e-5)
