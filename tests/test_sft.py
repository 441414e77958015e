"""Task "sft" on tiny CPU runs: the chat template (mask, Jinja, BPE pieces), prepare/instruct.py and its errors, the
batches (mask, cut, drop), a model that learns to answer (exact match), resume, the switches it trains with, chat
sampling (prompt files, the interactive mode's context) and the export of the template."""

import io
import os
import json
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

import sample as sample_mod
import train as train_mod
from conftest import REPO, assert_resume_is_exact, bpe_flags, error_of, perturbed_model, run_train
from sologpt import chat, examples, sft, tokenizer
from sologpt.checkpoint import read as read_checkpoint
from sologpt.configurator import load_config
from tools import export as export_mod

CONVERSATION = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"},
                {"role": "assistant", "content": "Hi."}, {"role": "user", "content": "Is 2 > 1?"},
                {"role": "assistant", "content": " Yes, it is."}]


def evaluations(out):
    """The evaluation records of a run's metrics.jsonl (lines without a "kind" are evaluations)."""
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return [m for m in lines if m.get("kind", "eval") == "eval"]


def write_rows(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def prepare(tmp, rows, val_rows, *extra, name="s"):
    write_rows(tmp / f"{name}_train.jsonl", rows)
    write_rows(tmp / f"{name}_val.jsonl", val_rows)
    cmd = [sys.executable, "prepare/instruct.py", f"--input={tmp / f'{name}_train.jsonl'}",
           f"--val_input={tmp / f'{name}_val.jsonl'}", f"--name={name}", f"--data_root={tmp / 'data'}", *extra]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)


def copy_rows(n, seed):
    """A task a tiny model learns in a few dozen steps: answer with the first letter of the prompt, twice."""
    rng = np.random.default_rng(seed)
    words = ["".join(rng.choice(list("abcdefgh"), size=6)) for _ in range(n)]
    return [{"prompt": w, "response": w[0] * 2, "task": "even" if i % 2 else "odd"} for i, w in enumerate(words)]


@pytest.fixture(scope="module")
def copy_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("sft")
    res = prepare(root, copy_rows(600, 0), copy_rows(64, 1), "--tokenizer=char")
    assert res.returncode == 0, res.stderr
    return root


def flags(root, out, *extra):
    return [f"--data_root={root / 'data'}", "--dataset=s", f"--out_dir={out}", "--device=cpu", "--task=sft",
            "--n_layer=1", "--n_head=2", "--n_embd=32", "--block_size=48", "--batch_size=32", "--eval_iters=2",
            "--learning_rate=1e-2", "--warmup_iters=5", "--progress=False", "--log_interval=10", *extra]


@pytest.fixture(scope="module")
def copy_model(copy_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("sftrun") / "out"
    run_train(flags(copy_data, out, "--max_iters=50", "--eval_interval=50"))
    return out


# ---- the template --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["char", "gpt2"])
def test_the_mask_covers_the_answers_and_their_end_token_only(kind):
    template = chat.default_template(kind)
    text = chat.render(template, CONVERSATION)
    meta = {"tokenizer": "char", "vocab_size": len(set(text)), "chars": "".join(sorted(set(text)))} \
        if kind == "char" else {"tokenizer": "gpt2", "vocab_size": 50257}
    enc = tokenizer.from_meta(meta)
    ids, learn = chat.encode(enc, template, CONVERSATION)
    end = chat.end_id(enc, template)
    assert enc.decode(ids) == text
    learned = [i for i, f in zip(ids, learn) if f]
    assert enc.decode(learned) == "Hi." + template["end"] + " Yes, it is." + template["end"]
    assert ids.count(end) == len(CONVERSATION) and learned.count(end) == 2
    # a prompt ends with the assistant's prefix, where the answer starts
    prompt, _ = chat.encode(enc, template, CONVERSATION[:-1], generation_prompt=True)
    assert prompt == ids[:len(prompt)] and enc.decode(prompt).endswith(template["assistant"])
    if kind == "gpt2":  # each piece tokenized alone gives the tokens of the whole text here
        import tiktoken
        assert ids == tiktoken.get_encoding("gpt2").encode(text, allowed_special="all")
        # "<|endoftext|>" written in a message is text, not the end token
        ids, _ = chat.encode(enc, template, [{"role": "user", "content": "a <|endoftext|> b"},
                                             {"role": "assistant", "content": "ok"}])
        assert ids.count(end) == 2


def test_hugging_face_renders_the_exported_template_as_sologpt_does():
    render = pytest.importorskip("transformers.utils.chat_template_utils").render_jinja_template
    for kind in ("char", "gpt2"):
        template = chat.default_template(kind)
        hf = chat.hf_template(template)
        for convo, gen in ((CONVERSATION, False), (CONVERSATION[:-1], True)):
            out = render([convo], chat_template=hf, add_generation_prompt=gen)
            assert (out[0] if isinstance(out, tuple) else out)[0] == chat.render(template, convo, gen)


@pytest.mark.parametrize("row, message", [
    ({"prompt": "a"}, "message 2 (assistant) has no text"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]}, "turns by turns"),
    ({"messages": [{"role": "bot", "content": "a"}]}, "role 'bot'"),
    ({"text": "a"}, "none of 'prompt', 'instruction' or 'messages'"),
])
def test_rows_that_are_not_conversations(row, message):
    with pytest.raises(chat.ChatError, match=re.escape(message)):
        chat.messages_of(row)


def test_the_row_formats_and_dropping_old_turns():
    alpaca, task = chat.messages_of({"instruction": "Sum", "input": "1 2", "output": "3", "system": "s", "task": "t"})
    assert task == "t" and alpaca == [{"role": "system", "content": "s"}, {"role": "user", "content": "Sum\n\n1 2"},
                                      {"role": "assistant", "content": "3"}]
    prompt, _ = chat.messages_of({"prompt": "q", "response": "a"}, final="user")  # a prompt file with answers
    assert prompt == [{"role": "user", "content": "q"}]
    template = chat.default_template("char")
    text = chat.render(template, CONVERSATION)
    enc = tokenizer.from_meta({"tokenizer": "char", "vocab_size": len(set(text)), "chars": "".join(sorted(set(text)))})
    convo = CONVERSATION[:-1]
    full = len(chat.encode(enc, template, convo, generation_prompt=True)[0])
    assert chat.fit(enc, template, convo, 10, full + 10) == (convo, 0)
    kept, dropped = chat.fit(enc, template, convo, 10, full + 9)  # one token short: the first turn goes
    assert dropped == 1 and kept == [CONVERSATION[0], CONVERSATION[3]]
    with pytest.raises(chat.ChatError, match="too long"):
        chat.fit(enc, template, convo, 10, 20)


# ---- prepare/instruct.py --------------------------------------------------------------------------------------

def test_prepare_writes_the_mask_and_appends_new_characters_to_a_models_table(copy_data, tmp_path):
    meta = json.loads((copy_data / "data" / "s" / "meta.json").read_text(encoding="utf-8"))
    assert meta["task"] == "sft" and meta["chat_template"] == chat.default_template("char")
    assert meta["tasks"] == ["even", "odd"] and meta["train_examples"] == 600
    split = sft.load_split(copy_data / "data" / "s", "train", meta)
    enc = tokenizer.from_meta(meta)
    tokens, mask = split.example(0)
    assert enc.decode(tokens[mask.astype(bool)].tolist()) == copy_rows(1, 0)[0]["response"] + chat.CHAR_END
    # --vocab_from: the model's characters keep their ids, new ones come after them
    res = prepare(tmp_path, [{"prompt": "xzQ!", "response": "abc"}] * 3, [{"prompt": "a", "response": "b"}],
                  f"--vocab_from={copy_data / 'data' / 's'}", name="more")
    assert res.returncode == 0 and "appended" in res.stdout, res.stderr
    chars = json.loads((tmp_path / "data" / "more" / "meta.json").read_text(encoding="utf-8"))["chars"]
    assert chars.startswith(meta["chars"]) and set(chars[len(meta["chars"]):]) == set("xzQ!")


@pytest.mark.parametrize("rows, message", [
    ([{"prompt": "a", "response": "b"}, {"prompt": "c"}], "s_train.jsonl:2 message 2 (assistant) has no text"),
    ([{"prompt": "a", "response": "b", "task": "t"}, {"prompt": "c", "response": "d"}], "some rows name a 'task'"),
    ([{"prompt": "a", "response": "b\u2403"}], "holds the end-of-turn token"),
])
def test_prepare_bad_rows_are_one_line_and_write_nothing(tmp_path, rows, message):
    res = prepare(tmp_path, rows, [{"prompt": "a", "response": "b"}], "--tokenizer=char")
    assert res.returncode == 1 and message in res.stderr and res.stderr.count("\n") == 1, res.stderr
    assert not (tmp_path / "data" / "s").exists()


# ---- batches ---------------------------------------------------------------------------------------------------

def test_batches_mask_the_prompt_cut_long_examples_and_drop_those_with_nothing_to_learn():
    tokens = np.arange(1, 13, dtype=np.uint16)  # examples [1..5], [6..12]
    mask = np.array([0, 0, 0, 1, 1, 0, 0, 0, 0, 0, 1, 1], dtype=np.uint8)
    split = examples.Split(tokens, np.array([0, 5, 12]), mask, None)
    x, y = sft.make_batch(split, np.array([0, 1]), 6, False, "cpu")
    assert x.tolist() == [[1, 2, 3, 4, 0, 0], [6, 7, 8, 9, 10, 11]]
    assert y.tolist() == [[-1, -1, 4, 5, -1, -1], [-1, -1, -1, -1, 11, 12]]  # example 2 cut to 7 tokens
    _, y_all = sft.make_batch(split, np.array([0, 1]), 6, True, "cpu")  # sft_loss="all": every real token
    assert y_all.tolist() == [[2, 3, 4, 5, -1, -1], [7, 8, 9, 10, 11, 12]]
    assert sft.learned_within(split, 6).tolist() == [2, 2] and sft.learned_within(split, 4).tolist() == [2, 0]
    assert sft.last_answer(*split.example(1)) == ([6, 7, 8, 9, 10], [11, 12])


# ---- training, evaluation, sampling -----------------------------------------------------------------------------

def test_sft_learns_to_answer_and_sample_chats(copy_model, capsys, tmp_path):
    lines = evaluations(copy_model)
    assert lines[0]["val_exact_match"] == 0.0 and lines[-1]["val_exact_match"] >= 0.9, lines
    assert lines[-1]["val_exact_match_even"] >= 0.9 and lines[-1]["val_exact_match_odd"] >= 0.9
    assert lines[-1]["val_loss"] < 0.2 * lines[0]["val_loss"]
    (tmp_path / "p.txt").write_text("gabcde\n\nbcdefa\n", encoding="utf-8")
    (tmp_path / "p.jsonl").write_text(json.dumps({"prompt": "hgfedc", "response": "ignored"}) + "\n", encoding="utf-8")
    for prompts, answers in (("p.txt", ["gg", "bb"]), ("p.jsonl", ["hh"])):
        argv = [f"--out_dir={copy_model}", "--device=cpu", f"--prompts={tmp_path / prompts}", "--temperature=0"]
        assert sample_mod.sample(load_config(sample_mod.SampleConfig, argv)) == answers
    # the fallback that FSDP uses (the model's own generate, row by row) answers the same
    model, enc = sample_mod.load_model(load_config(sample_mod.SampleConfig, [f"--out_dir={copy_model}"]), "cpu")
    template = chat.template_of({"chat_template": enc.chat})
    prompts = [chat.encode(enc, template, [{"role": "user", "content": w}], True)[0] for w in ("abcdef", "hh")]
    end = chat.end_id(enc, template)
    ctx = torch.autocast("cpu", enabled=False)
    assert sft.respond(model, prompts, 6, end, ctx, "cpu") == sft.respond(model, prompts, 6, end, ctx, "cpu",
                                                                          batched=False)


def test_interactive_keeps_the_conversation_within_the_context(copy_model, monkeypatch, capsys):
    monkeypatch.setattr(sys, "stdin", io.StringIO("abcdef\nbcdefg\n/reset\nzz\ncdefgh\n\nnot read\n"))
    cfg = load_config(sample_mod.SampleConfig, [f"--out_dir={copy_model}", "--device=cpu", "--interactive=True",
                                                "--temperature=0", "--max_new_tokens=3"])
    assert sample_mod.sample(cfg) == ["aa", "bb", "cc"]
    out = capsys.readouterr().out
    # 48 tokens hold one exchange: the first one left the context for the second; 'z' is not in the vocabulary
    assert out.count("left the context") == 1 and "vocabulary lacks: 'z'" in out


def test_resume_is_exact(copy_data, tmp_path):
    assert_resume_is_exact(flags(copy_data, tmp_path / "out", "--eval_interval=4", "--dropout=0.1"), tmp_path,
                           learns_below=10.0)


@pytest.mark.parametrize("extra", [["--lora_rank=2", "--grad_checkpointing=1"],
                                   ["--qat=int8", "--freeze_layers=1", "--chunked_loss=16"]])
def test_sft_trains_with_the_fine_tuning_switches(copy_data, copy_model, tmp_path, extra):
    out = tmp_path / "out"
    run_train(flags(copy_data, out, f"--init_from={copy_model / 'ckpt.pt'}", "--max_iters=4", "--eval_interval=4",
                    "--learning_rate=1e-3", *extra))
    m = evaluations(out)
    assert m[-1]["val_exact_match"] >= 0.9  # starting from the trained model, the switches keep what it knows
    assert read_checkpoint(out / "ckpt.pt")["train_config"]["task"] == "sft"


def test_one_line_errors(copy_data, trained, tiny_flags, capsys):
    assert "holds 'sft' data but task='lm'" in error_of(train_mod.main, [
        f for f in flags(copy_data, "unused") if f != "--task=sft"], capsys)
    assert "prepare/instruct.py" in error_of(train_mod.main, tiny_flags + ["--task=sft"], capsys)
    assert "sft_loss='all' applies to task 'sft'" in error_of(train_mod.main, tiny_flags + ["--sft_loss=all"], capsys)
    assert "raise block_size" in error_of(train_mod.main, flags(copy_data, "unused", "--block_size=8"), capsys)
    assert "needs a model fine-tuned on conversations" in error_of(
        sample_mod.main, [f"--out_dir={trained}", "--device=cpu", "--chat=True"], capsys)
    assert "interactive=True is a chat mode" in error_of(
        sample_mod.main, [f"--out_dir={trained}", "--device=cpu", "--interactive=True"], capsys)


# ---- export --------------------------------------------------------------------------------------------------

def test_an_sft_model_exports_with_its_chat_template(gpt2_setup, tmp_path, capsys):
    render = pytest.importorskip("transformers.utils.chat_template_utils").render_jinja_template
    res = prepare(tmp_path, [{"prompt": "To be or not", "response": " to be"}] * 8,
                  [{"prompt": "To be", "response": " or not"}])
    assert res.returncode == 0, res.stderr
    run_train(bpe_flags(gpt2_setup, tmp_path / "out", "--task=sft", "--dataset=s", f"--data_root={tmp_path / 'data'}",
                        "--max_iters=2"))
    export_mod.main([f"--out_dir={tmp_path / 'out'}", f"--hf_dir={tmp_path / 'hf'}"])
    config = json.loads((tmp_path / "hf" / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert config["eos_token"] == "<|endoftext|>"
    out = render([CONVERSATION[:-1]], chat_template=config["chat_template"], add_generation_prompt=True)
    assert (out[0] if isinstance(out, tuple) else out)[0] == chat.render(chat.default_template("gpt2"),
                                                                         CONVERSATION[:-1], True)
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["eos_token_id"] == 50256


def test_two_ranks_evaluate_and_train_as_one_process(copy_data, tmp_path):
    """torchrun with 2 gloo ranks (DDP): each rank takes its share of the step's micro-batches and of the evaluation's
    batches; the sums over ranks give one process's numbers (exact match and loss at step 0, the loss after 2 steps).
    The start is a model half way to learning the task, so that the exact match of one rank's share would differ."""
    run_train(flags(copy_data, tmp_path / "start", "--max_iters=16", "--eval_interval=16"))
    common = flags(copy_data, tmp_path / "one", "--max_iters=2", "--eval_interval=2", "--batch_size=16",
                   "--gradient_accumulation_steps=2", "--eval_iters=4", f"--init_from={tmp_path / 'start' / 'ckpt.pt'}",
                   "--learning_rate=1e-3")
    run_train(common)
    two = [f if not f.startswith("--out_dir") else f"--out_dir={tmp_path / 'two'}" for f in common]
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          str(REPO / "train.py"), *two], cwd=REPO, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr[-2000:]
    a, b = (evaluations(tmp_path / n) for n in ("one", "two"))
    assert 0.1 < a[0]["val_exact_match"] < 0.9 and a[0]["val_exact_match"] == b[0]["val_exact_match"]
    assert abs(a[0]["val_loss"] - b[0]["val_loss"]) < 1e-5 and abs(a[1]["val_loss"] - b[1]["val_loss"]) < 2e-3
    assert read_checkpoint(tmp_path / "two" / "ckpt.pt")["world_size"] == 2


def test_exact_match_batches_only_what_fits_the_context():
    """A long prompt with a short answer and a short prompt with a long answer each fit block_size, together they do
    not: they are asked in separate batches. The references are the model's own greedy answers, so every one is a
    hit, asked together or one at a time; the last one is wrong in its last token."""
    from types import SimpleNamespace
    model = perturbed_model(block_size=48)
    rng = np.random.default_rng(0)
    ctx = torch.autocast("cpu", enabled=False)
    rows = []
    for p, r in [(44, 3), (10, 30), (20, 5), (40, 8)]:  # (prompt, answer) lengths
        prompt = rng.integers(1, 64, p).tolist()
        rows.append((prompt, sft.respond(model, [prompt], r, -1, ctx, "cpu")[0]))  # -1: no end token
    rows[-1][1][-1] = (rows[-1][1][-1] + 1) % 64
    tokens = np.array([t for p, a in rows for t in p + a], dtype=np.uint16)
    mask = np.array([f for p, a in rows for f in [0] * len(p) + [1] * len(a)], dtype=np.uint8)
    split = examples.Split(tokens, np.r_[0, np.cumsum([len(p) + len(a) for p, a in rows])], mask, None)
    for b in (4, 1):
        cfg = SimpleNamespace(batch_size=b, block_size=48, device="cpu", dtype="float32")
        assert sft.exact_match(model, split, cfg, ctx, end=-1) == {"val_exact_match": 0.75}


def test_system_message_and_chat_off(copy_model, tmp_path):
    rows = [{"messages": [{"role": "system", "content": "own"}, {"role": "user", "content": "q"}]}, {"prompt": "p"}]
    (tmp_path / "p.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    cfg = load_config(sample_mod.SampleConfig, [f"--prompts={tmp_path / 'p.jsonl'}", "--system=Be brief."])
    assert [[m["content"] for m in c] for c in sft.read_conversations(cfg, sample_mod.read_file)] == [
        ["own", "q"], ["Be brief.", "p"]]
    cfg = load_config(sample_mod.SampleConfig, ["--start=hi", "--num_samples=2"])
    assert sft.read_conversations(cfg, sample_mod.read_file) == [[{"role": "user", "content": "hi"}]] * 2
    # --chat=False: the plain language model that the fine-tuned weights still are
    out = sample_mod.sample(load_config(sample_mod.SampleConfig, [f"--out_dir={copy_model}", "--device=cpu",
                                                                  "--chat=False", "--start=abc", "--num_samples=1",
                                                                  "--max_new_tokens=3"]))
    assert len(out) == 1 and out[0].startswith("abc") and len(out[0]) == 6
