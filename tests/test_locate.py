"""checkpoint.locate, the one place that tells a run folder, a checkpoint file and a Hugging Face directory apart by
what is inside them, and every entry point that takes a model through it: train.py's init_from and teacher,
sample.py, tools/score.py, tools/evaluate.py, tools/export.py and tools/quantize.py."""

import json
import shutil

import pytest
import torch

import sample as sample_mod
from conftest import error_of, run_train
from sologpt import checkpoint
from sologpt.checkpoint import locate, read as read_checkpoint
from sologpt.configurator import load_config
from tools import evaluate as evaluate_mod, export as export_mod, quantize as quantize_mod, score as score_mod


def message(spec, tmp_path=None):
    with pytest.raises(ValueError) as exc:
        locate(spec, "--ckpt")
    assert "\n" not in str(exc.value)
    return str(exc.value)


def test_locate_tells_the_kinds_apart_by_their_contents(trained, gpt2_setup, tmp_path):
    assert locate(trained) == checkpoint.ModelPath("checkpoint", trained / "ckpt.pt")  # a run folder
    assert locate(trained / "ckpt.pt") == checkpoint.ModelPath("checkpoint", trained / "ckpt.pt")
    odd = tmp_path / "weights.bin"  # a checkpoint under any name
    shutil.copy(trained / "ckpt.pt", odd)
    assert locate(odd).kind == "checkpoint"
    assert locate(gpt2_setup / "gpt2") == checkpoint.ModelPath("hf", gpt2_setup / "gpt2")
    # and what is none of them, in one line that says what was found
    assert message(tmp_path / "nope").endswith("nope does not exist: give a run folder (out_dir), a checkpoint file "
                                               "(e.g. out/ckpt.pt) or a Hugging Face GPT-2 directory")
    (tmp_path / "empty").mkdir()
    assert "is a folder with neither ckpt.pt (a sologpt run) nor config.json with model.safetensors (a Hugging " \
           "Face GPT-2 directory); it holds nothing" in message(tmp_path / "empty")
    assert "it holds empty, weights.bin" in message(tmp_path)
    run = tmp_path / "run"  # a run folder before its first checkpoint
    run.mkdir()
    shutil.copy(trained / "config.json", run / "config.json")
    assert "is a sologpt run folder without ckpt.pt: the run has not saved one yet" in message(run)
    shutil.copy(trained / "ckpt.pt", run / "last.pt")
    assert "it holds last.pt, an interrupted run's resume point" in message(run)
    hf = tmp_path / "hf"
    hf.mkdir()
    shutil.copy(gpt2_setup / "gpt2" / "config.json", hf / "config.json")
    assert "has a Hugging Face config.json but no model.safetensors or pytorch_model.bin" in message(hf)
    assert f"is a config.json: give the folder that holds it ({hf})" in message(hf / "config.json")
    weights = gpt2_setup / "gpt2" / "model.safetensors"
    assert "is a safetensors weights file: give the folder that holds it" in message(weights)
    (tmp_path / "notes.txt").write_text("ROMEO: hello\n")
    assert "notes.txt is a text file, not a checkpoint" in message(tmp_path / "notes.txt")


def test_the_tools_take_a_run_folder_a_checkpoint_file_or_a_hugging_face_directory(trained, gpt2_setup, tmp_path,
                                                                                   capsys):
    text = tmp_path / "t.txt"
    text.write_text("ROMEO:\nWhat light through yonder window breaks?\n" * 4, encoding="utf-8")
    # sample.py: --ckpt a folder, --out_dir a file
    argv = ["--num_samples=1", "--max_new_tokens=8", "--temperature=0", "--device=cpu"]
    a = sample_mod.sample(load_config(sample_mod.SampleConfig, argv + [f"--ckpt={trained}"]))
    b = sample_mod.sample(load_config(sample_mod.SampleConfig, argv + [f"--out_dir={trained / 'ckpt.pt'}"]))
    assert a == b and len(a[0]) > 8
    # tools/score.py: --out_dir=x/ckpt.pt no longer looks for x/ckpt.pt/ckpt.pt; --ckpt a folder
    score = [score_mod.score(load_config(score_mod.ScoreConfig, [flag, f"--input={text}", "--device=cpu"]))
             for flag in (f"--out_dir={trained / 'ckpt.pt'}", f"--ckpt={trained}")]
    assert score[0] == score[1]
    # a Hugging Face directory through --out_dir (GPT-2's tokenizer), in score and evaluate alike
    hf = gpt2_setup / "gpt2"
    s = score_mod.score(load_config(score_mod.ScoreConfig, [f"--out_dir={hf}", f"--input={text}", "--device=cpu"]))
    e = evaluate_mod.evaluate(load_config(evaluate_mod.EvaluateConfig, [f"--out_dir={hf}", f"--input={text}",
                                                                         "--device=cpu"]))
    assert e[str(text)]["perplexity"] == pytest.approx(s["perplexity"], rel=1e-6)
    # tools/quantize.py: a run folder (the file goes beside its ckpt.pt) and a Hugging Face directory (beside it),
    # whose quantized file sample.py reads with GPT-2's tokenizer
    quantize_mod.main(["--ckpt", str(trained), "--mode", "int8"])
    assert "quantization" in read_checkpoint(trained / "ckpt_int8.pt")
    copy = tmp_path / "gpt2"
    shutil.copytree(hf, copy)
    quantize_mod.main(["--ckpt", str(copy), "--mode", "int8"])
    out = sample_mod.sample(load_config(sample_mod.SampleConfig, argv + [f"--ckpt={tmp_path / 'gpt2_int8.pt'}",
                                                                         "--start=Hello"]))
    assert out[0].startswith("Hello")
    # tools/export.py: a run folder through --ckpt, and a Hugging Face directory made into a sologpt checkpoint
    export_mod.main([f"--ckpt={trained}", f"--merged_ckpt={tmp_path / 'm.pt'}"])
    export_mod.main([f"--out_dir={hf}", f"--merged_ckpt={tmp_path / 'hf.pt'}"])
    ours, theirs = checkpoint.load_model(read_checkpoint(tmp_path / "hf.pt")), checkpoint.load_source(hf)
    assert all(torch.equal(v, theirs.state_dict()[k]) for k, v in ours.state_dict().items())
    # what is none of them: one line, from every tool
    for main, argv in [(sample_mod.main, [f"--out_dir={tmp_path}"]),
                       (score_mod.main, [f"--ckpt={text}", f"--input={text}"]),
                       (evaluate_mod.main, [f"--out_dir={tmp_path / 'nope'}"]),
                       (export_mod.main, [f"--out_dir={tmp_path}", f"--hf_dir={tmp_path / 'x'}"]),
                       (quantize_mod.main, ["--ckpt", str(tmp_path), "--mode", "int8"])]:
        err = error_of(main, argv, capsys)
        assert "is a folder with neither ckpt.pt" in err or "does not exist: give a run folder" in err \
            or "is a text file" in err, err


def test_init_from_and_teacher_take_a_run_folder(trained, tiny_flags, tmp_path, capsys):
    run_train(tiny_flags + [f"--init_from={trained}", "--max_iters=2", "--n_layer=3", "--n_embd=48"])
    out = capsys.readouterr().out
    # the folder resolves to its ckpt.pt (logged with the resolved config); the shape flags the weights override
    # get one warning line each, naming the value used
    assert f"init_from = '{trained / 'ckpt.pt'}'" in out
    assert f"warning: n_layer=3 is ignored: the weights of {trained / 'ckpt.pt'} have n_layer=2, which this run " \
           f"uses" in out
    assert "warning: n_embd=48 is ignored" in out and "warning: n_head" not in out  # n_head: the default, unset
    ckpt = read_checkpoint(tmp_path / "out" / "ckpt.pt")
    assert ckpt["init_source"] == str(trained / "ckpt.pt") and ckpt["model_config"]["n_layer"] == 2
    flags = [f if not f.startswith("--out_dir") else f"--out_dir={tmp_path / 'student'}" for f in tiny_flags]
    run_train(flags + [f"--teacher={trained}", "--max_iters=2", "--n_layer=1"])
    assert json.loads((tmp_path / "student" / "config.json").read_text())["teacher"] == str(trained / "ckpt.pt")
    # the run's own folder as its start point would overwrite it: refused
    err = error_of(lambda a: run_train_cli(a), tiny_flags + [f"--init_from={tmp_path / 'out'}", "--overwrite=True"],
                   capsys)
    assert "is this run's own checkpoint" in err
    err = error_of(lambda a: run_train_cli(a), tiny_flags + [f"--teacher={tmp_path}", "--overwrite=True"], capsys)
    assert err.startswith(f"error: teacher={tmp_path} is a folder with neither ckpt.pt")


def run_train_cli(argv):
    import train as train_mod
    train_mod.main(argv)
