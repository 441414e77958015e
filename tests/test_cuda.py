"""GPU-only paths (CUDA graphs, compile, bf16/fp16 autocast, fused AdamW). Skipped where torch sees no CUDA GPU,
as on the CPU CI machine; run them on a GPU with: pytest tests/test_cuda.py"""

import pytest
import torch

import train as train_mod
from sologpt.configurator import load_config
from sologpt.checkpoint import read as read_checkpoint

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def run(flags):
    return train_mod.train(load_config(train_mod.TrainConfig, flags))


def metrics(out):
    from sologpt.rundir import read_metrics
    return {m["iter"]: m for m in read_metrics(out)}


@pytest.fixture
def gpu_flags(tiny_flags):
    """Eager steps (cuda_graphs is on by default on CUDA): a test asks for a graph with --cuda_graphs=True."""
    return [f for f in tiny_flags if not f.startswith("--device")] + ["--device=cuda", "--eval_interval=4",
                                                                        "--max_iters=12", "--cuda_graphs=False"]


def test_default_cuda_run_replays_a_graph_and_matches_eager(gpu_flags, tmp_path):
    """train.py's defaults on CUDA: compile, one CUDA graph per step and a padded vocabulary, resolved at setup;
    the graph's losses track the same run's eager steps."""
    import json
    defaults = [f for f in gpu_flags if not f.startswith(("--compile", "--cuda_graphs"))]
    run(defaults + [f"--out_dir={tmp_path / 'graph'}"])
    run(defaults + [f"--out_dir={tmp_path / 'eager'}", "--cuda_graphs=False"])
    cfg = json.loads((tmp_path / "graph" / "config.json").read_text())
    assert (cfg["compile"], cfg["cuda_graphs"], cfg["vocab_pad_multiple"], cfg["dtype"]) == (True, True, 64, "bfloat16")
    a, b = metrics(tmp_path / "eager"), metrics(tmp_path / "graph")
    for it in (4, 8, 12):
        assert abs(a[it]["val_loss"] - b[it]["val_loss"]) < 2e-2
    assert b[12]["val_loss"] < b[0]["val_loss"] - 0.3


@pytest.mark.parametrize("dtype, accum", [("float32", 1), ("bfloat16", 1), ("bfloat16", 3)])
def test_cuda_graph_step_matches_eager(gpu_flags, tmp_path, dtype, accum):
    common = gpu_flags + [f"--dtype={dtype}", f"--gradient_accumulation_steps={accum}"]
    run(common + [f"--out_dir={tmp_path / 'eager'}"])
    run(common + [f"--out_dir={tmp_path / 'graph'}", "--cuda_graphs=True"])
    a, b = metrics(tmp_path / "eager"), metrics(tmp_path / "graph")
    tol = 1e-4 if dtype == "float32" else 2e-2
    for it in (4, 8, 12):  # after warm-up (3 eager steps) the replays must keep computing the same steps
        assert abs(a[it]["val_loss"] - b[it]["val_loss"]) < tol
    assert b[12]["val_loss"] < b[0]["val_loss"] - 0.3


def test_cuda_graph_with_dropout_compile_and_resume(gpu_flags, tmp_path):
    flags = gpu_flags + ["--dropout=0.1", "--cuda_graphs=True", "--compile=True"]
    run(flags + ["--max_iters=8"])
    run(flags + ["--max_iters=12", "--init_from=resume"])
    run(gpu_flags + ["--max_iters=16", "--init_from=resume"])  # and on without graphs
    m = metrics(tmp_path / "out")
    assert sorted(m) == [0, 4, 8, 12, 16] and m[16]["val_loss"] < m[0]["val_loss"] - 0.3
    assert read_checkpoint(tmp_path / "out" / "ckpt.pt")["iter_num"] == 16


def test_resume_across_graph_modes_keeps_the_schedule(gpu_flags, tmp_path):
    """A checkpoint from an eager run resumed with graphs, and back, follows the same learning-rate schedule as
    eager resumes (a graph that froze the learning rate at capture would drift away)."""
    import shutil
    common = gpu_flags + ["--dtype=float32", "--warmup_iters=0", "--learning_rate=1e-2", "--min_lr=0"]
    run(common + ["--max_iters=8", f"--out_dir={tmp_path / 'a'}"])
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    run(common + ["--max_iters=16", "--lr_decay_iters=16", f"--out_dir={tmp_path / 'a'}", "--init_from=resume",
                  "--cuda_graphs=True"])
    run(common + ["--max_iters=16", "--lr_decay_iters=16", f"--out_dir={tmp_path / 'b'}", "--init_from=resume"])
    a, b = metrics(tmp_path / "a"), metrics(tmp_path / "b")
    for it in (12, 16):
        assert abs(a[it]["val_loss"] - b[it]["val_loss"]) < 1e-3
    ckpt = read_checkpoint(tmp_path / "a" / "ckpt.pt")
    assert ckpt["optimizer"]["param_groups"][0]["capturable"] is True
    run(common + ["--max_iters=20", "--lr_decay_iters=16", f"--out_dir={tmp_path / 'a'}", "--init_from=resume"])


def test_cuda_graphs_only_on_the_first_visible_gpu(gpu_flags, tmp_path, capsys):
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs")
    flags = [f for f in gpu_flags if f != "--device=cuda"] + ["--device=cuda:1"]
    with pytest.raises(SystemExit):
        train_mod.main(flags + ["--cuda_graphs=True"])
    assert "CUDA_VISIBLE_DEVICES" in capsys.readouterr().err
    run(flags + ["--cuda_graphs=auto"])  # auto: off on cuda:1, trains eagerly there
    m = metrics(tmp_path / "out")
    assert m[12]["val_loss"] < m[0]["val_loss"] - 0.3


def test_float16_with_loss_scaling(gpu_flags, tmp_path):
    run(gpu_flags + ["--dtype=float16"])
    ckpt = read_checkpoint(tmp_path / "out" / "ckpt.pt")
    assert ckpt["scaler"]["scale"] > 0 and metrics(tmp_path / "out")[12]["val_loss"] < 3.9


def test_fp8_training_tracks_bf16(gpu_flags, tmp_path):
    cap = torch.cuda.get_device_capability()
    if cap < (8, 9):
        pytest.skip("fp8 needs compute capability 8.9+")
    flags = [f for f in gpu_flags if not f.startswith("--n_embd")] + ["--n_embd=64", "--dtype=bfloat16",
                                                                      "--max_iters=30", "--eval_interval=30"]
    run(flags)
    plain = metrics(tmp_path / "out")[30]["val_loss"]
    run([f if not f.startswith("--out_dir") else f"--out_dir={tmp_path / 'fp8'}" for f in flags] + ["--fp8=True"])
    low = metrics(tmp_path / "fp8")[30]["val_loss"]
    assert abs(low - plain) < 0.05 * plain


@pytest.mark.parametrize("extra", [["--fp8=True", "--fp8_head=True"], ["--fp8_head=True"], ["--residual_bf16=True"],
                                   ["--fp8_head=True", "--residual_bf16=True", "--cuda_graphs=True"]],
                         ids=["fp8+head", "head", "residual_bf16", "head+residual_bf16+graphs"])
def test_fp8_head_and_bf16_residual_training_tracks_bf16(gpu_flags, tmp_path, extra):
    if "--fp8_head=True" in extra and torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("fp8 needs compute capability 8.9+")
    flags = [f for f in gpu_flags if not f.startswith("--n_embd")] + [
        "--n_embd=64", "--dtype=bfloat16", "--max_iters=30", "--eval_interval=30", "--vocab_pad_multiple=64"]
    run(flags)
    plain = metrics(tmp_path / "out")[30]["val_loss"]
    run([f if not f.startswith("--out_dir") else f"--out_dir={tmp_path / 'fp8'}" for f in flags] + extra)
    assert abs(metrics(tmp_path / "fp8")[30]["val_loss"] - plain) < 0.05 * plain


@pytest.mark.parametrize("extra", [["--curriculum=unigram"], ["--grad_checkpointing=1"]],
                         ids=["easy_first", "grad_checkpointing"])
def test_sources_and_switches_in_a_cuda_graph_match_eager(gpu_flags, tmp_path, extra):
    """The graph records train.py's own train_step, so what the step gets from a batch source or a switch is
    recorded too: the easy-first curriculum and gradient checkpointing (refused before the step was one)."""
    common = gpu_flags + ["--dtype=float32"] + extra
    run(common + [f"--out_dir={tmp_path / 'eager'}"])
    run(common + [f"--out_dir={tmp_path / 'graph'}", "--cuda_graphs=True"])
    a, b = metrics(tmp_path / "eager"), metrics(tmp_path / "graph")
    for it in (4, 8, 12):
        assert abs(a[it]["val_loss"] - b[it]["val_loss"]) < 1e-4
    assert b[12]["val_loss"] < b[0]["val_loss"] - 0.3


def test_teacher_in_a_cuda_graph_matches_eager(gpu_flags, tmp_path):
    run(gpu_flags + ["--dtype=float32", f"--out_dir={tmp_path / 'teacher'}"])
    common = gpu_flags + ["--dtype=float32", f"--teacher={tmp_path / 'teacher' / 'ckpt.pt'}", "--distill_alpha=0.7"]
    run(common + [f"--out_dir={tmp_path / 'eager'}"])
    run(common + [f"--out_dir={tmp_path / 'graph'}", "--cuda_graphs=True"])
    a, b = metrics(tmp_path / "eager"), metrics(tmp_path / "graph")
    for it in (4, 8, 12):
        assert abs(a[it]["val_loss"] - b[it]["val_loss"]) < 1e-4


def test_classifier_in_a_cuda_graph_matches_eager(tmp_path):
    """Classification rows carry their lengths as a keyword argument: the graph copies it in with the batch."""
    import json
    import subprocess
    import sys
    from conftest import REPO, SHARED
    rows = (SHARED / "data" / "sentence_polarity" / "train.jsonl").read_text(encoding="utf-8").splitlines()[:300]
    (tmp_path / "rows.jsonl").write_text("\n".join(rows) + "\n", encoding="utf-8")
    subprocess.run([sys.executable, "prepare/classify.py", f"--input={tmp_path / 'rows.jsonl'}", "--name=pol",
                    f"--data_root={tmp_path / 'data'}", "--tokenizer=char"], cwd=REPO, check=True)
    common = [f"--data_root={tmp_path / 'data'}", "--dataset=pol", "--task=classify", "--device=cuda",
              "--dtype=float32", "--n_layer=2", "--n_head=2", "--n_embd=32", "--block_size=64", "--batch_size=16",
              "--max_iters=12", "--eval_interval=4", "--eval_iters=2", "--progress=False", "--compile=False",
              "--cuda_graphs=False"]
    run(common + [f"--out_dir={tmp_path / 'eager'}"])
    run(common + [f"--out_dir={tmp_path / 'graph'}", "--cuda_graphs=True"])
    a, b = metrics(tmp_path / "eager"), metrics(tmp_path / "graph")
    for it in (4, 8, 12):
        assert abs(a[it]["val_loss"] - b[it]["val_loss"]) < 1e-4
    assert json.loads((tmp_path / "graph" / "config.json").read_text())["cuda_graphs"] is True


@pytest.mark.parametrize("task", ["sft", "tag"])
def test_sft_and_tagger_in_a_cuda_graph_match_eager(tmp_path, task):
    """Padded examples with targets of -1 (the loss mask, untagged tokens) go through the recorded step as any batch;
    exact match generates its answers on the GPU in bf16."""
    import json
    import random
    import subprocess
    import sys
    from conftest import REPO
    rng = random.Random(0)
    words = ["".join(rng.choice("abcdefgh") for _ in range(6)) for _ in range(300)]
    rows = [{"prompt": w, "response": w[0] * 2} for w in words] if task == "sft" else \
        [{"tokens": [w, "xx", w[:3]], "tags": ["O", "B-X", "O"]} for w in words]
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    script = "prepare/instruct.py" if task == "sft" else "prepare/tags.py"
    subprocess.run([sys.executable, script, f"--input={tmp_path / 'rows.jsonl'}", "--name=d", "--tokenizer=char",
                    f"--data_root={tmp_path / 'data'}"], cwd=REPO, check=True)
    common = [f"--data_root={tmp_path / 'data'}", "--dataset=d", f"--task={task}", "--device=cuda", "--n_layer=2",
              "--n_head=2", "--n_embd=32", "--block_size=48", "--batch_size=16", "--max_iters=12", "--eval_interval=4",
              "--eval_iters=2", "--progress=False", "--compile=False", "--learning_rate=3e-3", "--cuda_graphs=False"]
    for dtype, tol in (("float32", 1e-4), ("bfloat16", 2e-2)):
        run(common + [f"--dtype={dtype}", f"--out_dir={tmp_path / dtype / 'eager'}"])
        run(common + [f"--dtype={dtype}", f"--out_dir={tmp_path / dtype / 'graph'}", "--cuda_graphs=True"])
        a, b = metrics(tmp_path / dtype / "eager"), metrics(tmp_path / dtype / "graph")
        for it in (4, 8, 12):
            assert abs(a[it]["val_loss"] - b[it]["val_loss"]) < tol
        assert b[12]["val_loss"] < b[0]["val_loss"]
        assert ("val_exact_match" if task == "sft" else "val_f1_X") in b[12]


def test_auto_batch_size_with_cuda_graphs(gpu_flags, tmp_path):
    flags = [f for f in gpu_flags if not f.startswith("--batch_size")]
    run(flags + ["--batch_size=auto", "--auto_batch_sequences=16", "--cuda_graphs=True", "--dtype=bfloat16"])
    ckpt = read_checkpoint(tmp_path / "out" / "ckpt.pt")
    assert ckpt["train_config"]["batch_size"] * ckpt["train_config"]["gradient_accumulation_steps"] >= 16
    assert metrics(tmp_path / "out")[12]["val_loss"] < metrics(tmp_path / "out")[0]["val_loss"] - 0.3


@pytest.mark.parametrize("extra", [["--optimizer=muon"], ["--rope=True", "--norm=rmsnorm", "--qk_norm=True",
                                   "--mlp_act=relu2", "--tie_embeddings=False"], ["--chunked_loss=64"]],
                         ids=["muon", "architecture", "chunked_loss"])
def test_options_in_a_cuda_graph_match_eager(gpu_flags, tmp_path, extra):
    """Muon (tensor learning rate), the architecture options and the chunked loss inside a captured step compute
    what the eager step does, in bf16 with compile."""
    common = gpu_flags + ["--dtype=bfloat16", "--compile=True"] + extra
    run(common + [f"--out_dir={tmp_path / 'eager'}"])
    run(common + [f"--out_dir={tmp_path / 'graph'}", "--cuda_graphs=True"])
    a, b = metrics(tmp_path / "eager"), metrics(tmp_path / "graph")
    for it in (4, 8, 12):
        assert abs(a[it]["val_loss"] - b[it]["val_loss"]) < 2e-2
    assert b[12]["val_loss"] < b[0]["val_loss"] - 0.3


def test_chunked_loss_matches_plain_on_cuda():
    from model import GPT, GPTConfig
    from sologpt.chunked_ce import ChunkedLoss
    torch.manual_seed(0)
    plain = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=64, block_size=64, vocab_size=500, vocab_pad_multiple=64)).cuda()
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=64, block_size=64, vocab_size=500,
                          vocab_pad_multiple=64)).cuda()
    model.load_state_dict(plain.state_dict())
    chunked = ChunkedLoss(model, 100)
    x, y = torch.randint(0, 500, (4, 64), device="cuda"), torch.randint(0, 500, (4, 64), device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        l0, l1 = plain(x, y)[1], torch.compile(chunked)(x, y)[1]
    l0.backward()
    l1.backward()
    assert abs(l0.item() - l1.item()) < 1e-2
    g0 = torch.cat([p.grad.flatten() for p in plain.parameters()])
    g1 = torch.cat([p.grad.flatten() for p in chunked.parameters()])
    assert torch.nn.functional.cosine_similarity(g0, g1, dim=0) > 0.999


def test_engine_cuda_graph_equals_eager():
    from sologpt.inference import Engine
    from model import GPT, GPTConfig
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=64, block_size=64, vocab_size=128)).cuda().eval()
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8, 9], [10]]
    eager = Engine(model, 3, 40, "cuda").generate(prompts, 24, temperature=0)
    graphed = Engine(model, 3, 40, "cuda", cuda_graph=True).generate(prompts, 24, temperature=0)
    assert graphed == eager
    for p, row in zip(prompts, eager):
        alone = model.generate(torch.tensor([p], device="cuda"), 24, temperature=0, use_cache=False)[0, len(p):]
        assert row == alone.tolist()


@pytest.mark.parametrize("steps", [0, 8])
def test_a_bf16_decode_graph_keeps_its_weight_copies_when_memory_is_reused(steps):
    """Under autocast a graph that read the warm-up's cached bf16 weight copies would read freed memory once the
    autocast context ends: fill the freed memory with garbage between calls, the greedy tokens must not change."""
    from sologpt.inference import Engine, MultiStepEngine
    from model import GPT, GPTConfig
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=64, block_size=64, vocab_size=128)).cuda().eval()
    ctx = torch.autocast("cuda", dtype=torch.bfloat16)
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8, 9]]
    eager = Engine(model, 2, 40, "cuda", torch.bfloat16).generate(prompts, 24, temperature=0, ctx=ctx)
    engine = (MultiStepEngine(model, 2, 40, "cuda", torch.bfloat16, cuda_graph=True, steps=steps) if steps else
              Engine(model, 2, 40, "cuda", torch.bfloat16, cuda_graph=True))
    assert engine.generate(prompts, 24, temperature=0, ctx=ctx) == eager  # records the graph
    junk = [torch.full((64, 64), float("nan"), device="cuda", dtype=torch.bfloat16) for _ in range(64)]
    assert engine.generate(prompts, 24, temperature=0, ctx=ctx) == eager  # replays it
    del junk


@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
def test_multi_step_graph_decoder_equals_the_eager_engine(dtype):
    """MultiStepEngine's K-step CUDA graph gives the eager one-step engine's greedy tokens (float32, and bf16 under
    autocast), across calls that replay the recorded graph; its sampled rows are reproducible with the same seed."""
    from sologpt.inference import Engine, MultiStepEngine
    from model import GPT, GPTConfig
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=64, block_size=64, vocab_size=128)).cuda().eval()
    ctx = torch.autocast("cuda", dtype=torch.bfloat16, enabled=dtype is not None)
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8, 9], [10]]
    eager = Engine(model, 3, 40, "cuda", dtype).generate(prompts, 30, temperature=0, ctx=ctx)
    graphed = MultiStepEngine(model, 3, 40, "cuda", dtype, cuda_graph=True, steps=8)
    for _ in range(2):
        assert graphed.generate(prompts, 30, temperature=0, ctx=ctx) == eager
    assert graphed.generate(prompts[:1], 5, temperature=0, ctx=ctx) == [eager[0][:5]]
    stop = eager[1][4]
    cut = [row[:row.index(stop) + 1] if stop in row else row for row in eager]
    assert graphed.generate(prompts, 30, temperature=0, stop_token=stop, ctx=ctx) == cut
    sampled = [graphed.generate(prompts, 30, temperature=0.8, top_k=20, top_p=0.9, ctx=ctx,
                                generator=torch.Generator(device="cuda").manual_seed(1)) for _ in range(2)]
    assert sampled[0] == sampled[1] and all(0 <= t < 128 for row in sampled[0] for t in row)


def torchrun_gpu(flags, nproc, timeout=600):
    """torchrun --standalone --nproc_per_node=nproc train.py flags on this machine's GPUs."""
    import os
    import subprocess
    import sys

    from conftest import REPO
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           str(REPO / "train.py"), *flags]
    return subprocess.run(cmd, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_torchrun_on_gpus_tracks_one_process(gpu_flags, tmp_path, parallel):
    """NCCL on every GPU of the machine (1 or 2): bf16, compile, dropout and 4 micro-batches per step, against one
    plain process with the same global batch; its checkpoint samples in one process."""
    nproc = min(2, torch.cuda.device_count())
    common = gpu_flags + ["--dtype=bfloat16", "--compile=True", "--gradient_accumulation_steps=4", "--dropout=0.1"]
    run(common + [f"--out_dir={tmp_path / 'one'}"])
    res = torchrun_gpu(common + [f"--out_dir={tmp_path / 'n'}", f"--parallel={parallel}"], nproc)
    assert res.returncode == 0, res.stderr[-3000:]
    a, b = metrics(tmp_path / "one"), metrics(tmp_path / "n")
    for it in (4, 8, 12):  # bf16 rounding, reduction order and (with 2 ranks) dropout masks differ
        assert abs(a[it]["val_loss"] - b[it]["val_loss"]) < 0.05, (it, a[it], b[it])
    assert b[12]["val_loss"] < b[0]["val_loss"] - 0.3
    ckpt = read_checkpoint(tmp_path / "n" / "ckpt.pt")
    assert ckpt["world_size"] == nproc and all(type(t) is torch.Tensor for t in ckpt["model"].values())
    import sample
    sample.main([f"--out_dir={tmp_path / 'n'}", "--num_samples=1", "--max_new_tokens=8", "--device=cuda"])


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_torchrun_on_gpus_resumes_exactly(gpu_flags, tmp_path, parallel):
    """8 steps, a stop, 4 more under torchrun on the GPUs equal 12 straight (bf16, dropout, eager)."""
    nproc = min(2, torch.cuda.device_count())
    common = gpu_flags + ["--dtype=bfloat16", "--gradient_accumulation_steps=4", "--dropout=0.1",
                          "--lr_decay_iters=12", f"--parallel={parallel}"]
    for extra in ([f"--out_dir={tmp_path / 'straight'}"], [f"--out_dir={tmp_path / 's'}", "--max_iters=8"],
                  [f"--out_dir={tmp_path / 's'}", "--init_from=resume"]):
        res = torchrun_gpu(common + extra, nproc)
        assert res.returncode == 0, res.stderr[-3000:]
    assert metrics(tmp_path / "s")[12]["val_loss"] == metrics(tmp_path / "straight")[12]["val_loss"]


# ---- sologpt/galore.py: updates in backward, bf16 weights, GaLore (issue 19) -----------------------------------

def galore_step_peak(hooked, steps=3):
    """A 4 x 512 GPT in bf16 weights on the GPU, GaLore rank 32, int8 moments, checkpointing: `steps` steps with
    updates in backward (hooked) or step() after backward; returns (weights, peak bytes of the last step, bytes of
    the non-embedding gradients)."""
    from model import GPT, GPTConfig
    from sologpt import galore
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=4, n_head=8, n_embd=512, block_size=64, vocab_size=4096,
                          grad_checkpointing=1)).cuda().train()
    galore.lower_weights(model, "bf16")
    opt = galore.GaLoreAdamW(galore.galore_groups(model, 0.1, 32, 2, 0.25), lr=1e-3, betas=(0.9, 0.95),
                             state_dtype="int8")
    opt = galore.UpdateInBackward(opt, 1) if hooked else opt  # one micro-batch: with more, all gradients live on
    g = torch.Generator().manual_seed(0)
    for step in range(steps):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        x = torch.randint(4096, (4, 64), generator=g).cuda()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(x, torch.roll(x, -1, 1))[1]
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    grads = sum(p.numel() * 2 for n, p in model.named_parameters() if "wte" not in n and "wpe" not in n)
    return [p.detach().float().cpu() for p in model.parameters()], torch.cuda.max_memory_allocated(), grads


def test_galore_updates_in_backward_match_the_step_in_less_memory():
    """On the GPU in bf16: the in-backward updates give the weights of step() after backward (to a bf16 step: the
    embedding's backward adds with atomics, so a gradient may differ in its last bit and round the other way),
    and the step's peak memory is lower by at least half the gradients of the blocks."""
    plain, plain_peak, grads = galore_step_peak(hooked=False)
    hooked, hooked_peak, _ = galore_step_peak(hooked=True)
    for a, b in zip(plain, hooked):
        assert (a - b).abs().max() <= 1e-2 * a.abs().max() + 1e-6
    assert hooked_peak < plain_peak - grads / 2, (hooked_peak, plain_peak, grads)


def test_galore_train_py_run_on_cuda(gpu_flags, tmp_path):
    """train.py's all-parameter switches on CUDA: compile "auto" turns off (the compiled backward would hand over
    all gradients at once), the run learns and resumes."""
    import json
    flags = gpu_flags + ["--optimizer=galore", "--galore_rank=8", "--galore_gap=4", "--optim_state=int8",
                         "--weights_dtype=bf16", "--dtype=bfloat16", "--update_in_backward=True", "--grad_clip=0",
                         "--grad_checkpointing=1"]
    flags = [f for f in flags if not f.startswith("--compile")]
    run(flags + ["--max_iters=8"])
    run(flags + ["--init_from=resume"])
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["compile"] is False
    m = metrics(tmp_path / "out")
    assert m[12]["val_loss"] < m[0]["val_loss"] - 0.3


def test_nf4_linear_on_cuda_eager_and_compiled_matches_the_cpu(gpu_flags, tmp_path):
    """An NF4Linear moved to CUDA computes what it computes on the CPU (eager, bf16 autocast, torch.compile), and a
    LoRA run on an nf4 base trains on CUDA."""
    from sologpt import nf4
    torch.manual_seed(0)
    linear = torch.nn.Linear(256, 192)
    with torch.no_grad():
        linear.weight.mul_(0.1)
    layer = nf4.NF4Linear.from_linear(linear)
    x = torch.randn(4, 7, 256)
    want = layer(x)
    gpu = nf4.NF4Linear.from_linear(linear).cuda()
    torch.testing.assert_close(gpu.dequantize().cpu(), layer.dequantize(), rtol=0, atol=1e-6)
    torch.testing.assert_close(gpu(x.cuda()).cpu(), want, rtol=1e-4, atol=1e-4)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        eager = gpu(x.cuda())
        compiled = torch.compile(gpu)(x.cuda())
    assert eager.dtype == compiled.dtype == torch.bfloat16
    torch.testing.assert_close(eager.float().cpu(), want, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(compiled.float(), eager.float(), rtol=2e-2, atol=2e-2)
    base = tmp_path / "base"
    run(gpu_flags + [f"--out_dir={base}", "--max_iters=8"])
    out = tmp_path / "lora"
    run(gpu_flags + [f"--out_dir={out}", f"--init_from={base / 'ckpt.pt'}", "--lora_rank=4", "--lora_targets=all",
                     "--base_dtype=nf4", "--dtype=bfloat16", "--learning_rate=3e-3"])
    losses = [m["val_loss"] for m in metrics(out).values()]
    assert read_checkpoint(out / "ckpt.pt")["train_config"]["base_dtype"] == "nf4"
    assert all(v == v for v in losses) and losses[-1] < losses[0]


@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
def test_speculative_greedy_equals_the_engine_on_cuda(dtype, monkeypatch):
    """Speculative decoding (sologpt/speculative.py) on CUDA, eager and as a CUDA graph per round: in float32 its
    greedy tokens are exactly the eager engine's, with a draft that often disagrees and with a copy of the model
    (every draft accepted), on the first call and on replays; sampled rows repeat with the same seed. Under bf16
    autocast the k + 1-token forward rounds differently from a one-token step, so a near-tie may part the two:
    there it must run, keep the rows' lengths and accept most of a copy's drafts."""
    # train() in earlier tests turned TF32 on for the process: float32 here means float32 matmuls in both forwards
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    import copy
    from conftest import perturbed_model
    from sologpt.inference import Engine
    from sologpt.speculative import SpeculativeEngine
    model = perturbed_model(block_size=64, vocab_size=128).cuda()
    other = perturbed_model(seed=5, n_layer=1, n_embd=16, block_size=64, vocab_size=128).cuda()
    ctx = torch.autocast("cuda", dtype=torch.bfloat16, enabled=dtype is not None)
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8, 9]]
    eager = Engine(model, 2, 40, "cuda", dtype).generate(prompts, 30, temperature=0, ctx=ctx)
    for draft in (other, copy.deepcopy(model)):
        for k, graph in ((1, False), (4, False), (1, True), (4, True)):
            spec = SpeculativeEngine(model, draft, 40, "cuda", dtype, draft_tokens=k, cuda_graph=graph)
            for _ in range(2):  # the second call replays the graph the first recorded
                got = spec.generate(prompts, 30, temperature=0, ctx=ctx)
                if dtype is None:
                    assert got == eager, (k, graph, draft is other)
                else:
                    assert [len(row) for row in got] == [30, 30]
                    assert draft is other or spec.acceptance() > 0.8
    for graph in (False, True):
        sampled = SpeculativeEngine(model, other, 40, "cuda", dtype, draft_tokens=4, cuda_graph=graph)
        rows = [sampled.generate(prompts, 30, temperature=0.8, top_k=20, ctx=ctx,
                                 generator=torch.Generator(device="cuda").manual_seed(0)) for _ in range(2)]
        assert rows[0] == rows[1] and all(len(row) == 30 for row in rows[0])  # same seed, same text
