"""sologpt/distributed.py on the CPU: torchrun with 2 gloo processes. A 2-rank run (DDP and FSDP2) computes the
gradients of a 1-process run with the same global batch, resumes exactly, and its checkpoint resumes in one process;
SIGTERM stops every rank after the same step; two simulated nodes train; a rank that fails ends the job."""

import functools
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch
import torch.distributed as dist

from conftest import REPO, SHARED, run_train
from sologpt.checkpoint import read as read_checkpoint
from sologpt.rundir import read_metrics


@pytest.fixture
def flags(char_data):
    return [f"--data_root={char_data}", "--dataset=tiny", "--device=cpu", "--n_layer=2", "--n_head=2", "--n_embd=32",
            "--block_size=32", "--batch_size=4", "--gradient_accumulation_steps=4", "--eval_iters=3",
            "--eval_interval=4", "--log_interval=2", "--progress=False", "--sample_tokens=0", "--warmup_iters=2",
            "--learning_rate=3e-3"]


def torchrun(args, nproc=2, timeout=120, extra=()):
    """torchrun --standalone --nproc_per_node=nproc train.py args; returns the finished process (stdout+stderr)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", *(extra or ["--standalone"]), f"--nproc_per_node={nproc}",
           str(REPO / "train.py"), *args]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def metrics(out):
    return {m["iter"]: m for m in read_metrics(out)}


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_ranks_compute_what_one_process_does(flags, tmp_path, parallel):
    """The same global batch (4 micro-batches: 2 per rank) gives the same gradients (AdamW's first moment after one
    step is 0.1 x the gradient) and, over 8 steps, the same losses within float32 rounding."""
    one = flags + ["--grad_clip=0"]
    run_train(one + ["--max_iters=1", f"--out_dir={tmp_path / 'a1'}"])
    res = torchrun(one + ["--max_iters=1", f"--out_dir={tmp_path / 'b1'}", f"--parallel={parallel}"])
    assert res.returncode == 0, res.stderr[-6000:]
    a, b = (read_checkpoint(tmp_path / n / "ckpt.pt")["optimizer"]["state"] for n in ("a1", "b1"))
    for k in a:
        torch.testing.assert_close(b[k]["exp_avg"], a[k]["exp_avg"], rtol=1e-4, atol=1e-8)
    run_train(flags + ["--max_iters=8", f"--out_dir={tmp_path / 'a'}"])
    res = torchrun(flags + ["--max_iters=8", f"--out_dir={tmp_path / 'b'}", f"--parallel={parallel}"])
    assert res.returncode == 0, res.stderr[-6000:]
    ma, mb = metrics(tmp_path / "a"), metrics(tmp_path / "b")
    assert sorted(mb) == [0, 4, 8]
    # The gradients agree to float32 rounding (above), but AdamW's first steps divide a gradient by its own size:
    # where it is near zero (the attention's q and k weights at init, ~1e-9) rounding moves the update by a fraction
    # of the learning rate, and a 3e-3 rate on a tiny model amplifies that. DDP happens to sum in the same order as one
    # process (identical losses); FSDP's reduce-scatter does not (measured: 0.02 apart at step 4).
    tol = 2e-3 if parallel == "ddp" else 5e-2
    for it in (0, 4, 8):
        assert abs(ma[it]["val_loss"] - mb[it]["val_loss"]) < tol
    ckpt = read_checkpoint(tmp_path / "b" / "ckpt.pt")
    assert ckpt["world_size"] == 2 and ckpt["iter_num"] == 8
    assert all(type(t) is torch.Tensor for t in ckpt["model"].values())  # full tensors: one file for one process
    assert not dist.is_initialized()  # the 1-process runs in this test ran no distributed code


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_rank_resume_is_exact_and_one_process_resumes_it(flags, tmp_path, parallel, capsys):
    common = flags + ["--dropout=0.1", "--lr_decay_iters=10", f"--parallel={parallel}"]
    assert torchrun(common + ["--max_iters=8", f"--out_dir={tmp_path / 'straight'}"]).returncode == 0
    assert torchrun(common + ["--max_iters=4", f"--out_dir={tmp_path / 'split'}"]).returncode == 0
    res = torchrun(common + ["--max_iters=8", f"--out_dir={tmp_path / 'split'}", "--init_from=resume"])
    assert res.returncode == 0, res.stderr[-6000:]
    a, b = (read_checkpoint(tmp_path / n / "ckpt.pt")["model"] for n in ("straight", "split"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert metrics(tmp_path / "split")[8]["val_loss"] == metrics(tmp_path / "straight")[8]["val_loss"]
    capsys.readouterr()
    run_train([f for f in common if not f.startswith("--parallel")] + ["--max_iters=10", "--init_from=resume",
                                                                        f"--out_dir={tmp_path / 'split'}"])
    assert "trained on 2 rank(s), this run has 1" in capsys.readouterr().out
    m = metrics(tmp_path / "split")
    assert read_checkpoint(tmp_path / "split" / "ckpt.pt")["world_size"] == 1 and m[10]["val_loss"] < m[0]["val_loss"]


def test_sigterm_stops_every_rank_after_the_same_step(flags, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             str(REPO / "train.py"), *flags, "--max_iters=100000", "--eval_interval=100000",
                             f"--out_dir={tmp_path / 'out'}"], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.startswith("step"):  # training runs on both ranks
            break
    proc.send_signal(signal.SIGTERM)  # what a scheduler does; torchrun passes it on to every rank
    out = "".join(lines) + proc.communicate(timeout=60)[0]
    assert "SIGTERM: saved" in out, out[-3000:]
    ckpt = read_checkpoint(tmp_path / "out" / "ckpt.pt")
    assert ckpt["iter_num"] % 2 == 0 and ckpt["iter_num"] > 0  # at a log step, where the ranks agree to stop
    assert out.count("SIGTERM: saved") == 1  # rank 0 alone saves and says so


def free_port():
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_two_simulated_nodes(flags, tmp_path):
    """The multi-node command (--nnodes, --node_rank, a rendezvous endpoint), both nodes on this machine."""
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes=2", f"--node_rank={rank}",
                               "--nproc_per_node=1", "--rdzv_backend=c10d", f"--rdzv_endpoint=localhost:{port}",
                               "--rdzv_id=test", str(REPO / "train.py"), *flags, "--max_iters=4",
                               f"--out_dir={tmp_path / 'out'}"], cwd=REPO, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for rank in (0, 1)]
    outs = [p.communicate(timeout=180) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs[0][1][-2000:] + outs[1][1][-2000:]
    assert read_checkpoint(tmp_path / "out" / "ckpt.pt")["world_size"] == 2


def test_a_failing_rank_ends_the_job(flags, tmp_path):
    """Rank 1 raises in its third step: the whole job ends (torchrun stops rank 0, which would otherwise wait in the
    gradient exchange), quickly and with rank 1's error in the output."""
    script = tmp_path / "fail.py"
    script.write_text(f"""import os, sys
sys.path.insert(0, {str(REPO)!r})
import train
step = train.train_step
def failing(*args, **kwargs):
    failing.calls = getattr(failing, "calls", 0) + 1
    if os.environ["RANK"] == "1" and failing.calls == 3:
        raise RuntimeError("rank 1 broke on purpose")
    return step(*args, **kwargs)
train.train_step = failing
train.main()
""")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    t = time.time()
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          str(script), *flags, "--max_iters=20", f"--out_dir={tmp_path / 'out'}"], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode != 0 and "rank 1 broke on purpose" in res.stdout + res.stderr
    assert time.time() - t < 90


def test_settings_that_cannot_run_on_several_ranks_are_one_line(flags, tmp_path):
    res = torchrun(flags + ["--gradient_accumulation_steps=3", f"--out_dir={tmp_path / 'o'}"])
    assert res.returncode != 0 and "must be a multiple of the 2 ranks" in res.stderr
    res = torchrun(flags + ["--parallel=fsdp", "--optimizer=muon", f"--out_dir={tmp_path / 'o'}"])
    assert res.returncode != 0 and "optimizer='muon' orthogonalises whole matrices" in res.stderr


def test_fsdp_needs_torchrun(flags, tmp_path, capsys):
    import train
    with pytest.raises(SystemExit):
        train.main(flags + ["--parallel=fsdp", f"--out_dir={tmp_path / 'o'}"])
    assert "start with torchrun" in capsys.readouterr().err


def test_the_switches_train_under_both(flags, tmp_path, gpt2_setup):
    """Every feature switch either trains with 2 ranks or is refused in one line (the refusals: above). Several
    switches share a run to keep the suite short; each run must learn and leave a checkpoint one process reads.
    (compile works too, but compiling takes 30 s on this CPU: it is checked on a GPU.)"""
    run_train(flags + ["--max_iters=2", f"--out_dir={tmp_path / 'start'}"])
    start = tmp_path / "start" / "ckpt.pt"
    rows = (SHARED / "data" / "sentence_polarity" / "train.jsonl").read_text(encoding="utf-8").splitlines()[:200]
    (tmp_path / "rows.jsonl").write_text("\n".join(rows) + "\n", encoding="utf-8")
    subprocess.run([sys.executable, "prepare/classify.py", f"--input={tmp_path / 'rows.jsonl'}", "--name=pol",
                    f"--data_root={tmp_path / 'data'}", "--tokenizer=char"], cwd=REPO, check=True, capture_output=True)
    bpe = [f"--data_root={gpt2_setup / 'data'}", "--dataset=bpe", f"--init_from={gpt2_setup / 'gpt2'}"]
    cls = [f"--data_root={tmp_path / 'data'}", "--dataset=pol", "--task=classify", "--block_size=64"]
    runs = {
        "ddp_lean_ckpt_curriculum_freeze": ["--optim_state=int8", "--grad_checkpointing=1", "--curriculum=unigram",
                                            f"--init_from={start}", "--freeze_layers=1"],
        "ddp_teacher_seq_warmup": [f"--teacher={start}", "--seq_warmup_iters=2", "--seq_warmup_start=8"],
        "ddp_lora": bpe + ["--lora_rank=2", "--lora_targets=all"],
        "ddp_classify": cls,
        "fsdp_teacher_ckpt_qat_curriculum": ["--parallel=fsdp", f"--teacher={start}", "--grad_checkpointing=1",
                                             "--qat=int8", "--curriculum=unigram"],
        "fsdp_classify_freeze": cls + ["--parallel=fsdp", "--freeze_embeddings=True"],
    }
    for name, extra in runs.items():
        res = torchrun(flags + ["--max_iters=4", f"--out_dir={tmp_path / name}"] + extra)
        assert res.returncode == 0, (name, res.stderr[-6000:])
        m = metrics(tmp_path / name)
        assert m[4]["train_loss"] < m[0]["train_loss"] or "classify" in name, name  # 4 steps: too few for a head
        assert "classify" not in name or 0 <= m[4]["val_accuracy"] <= 1
        ckpt = read_checkpoint(tmp_path / name / "ckpt.pt")
        assert ckpt["world_size"] == 2 and ckpt["iter_num"] == 4, name


def test_ddp_exchanges_gradients_only_after_the_last_micro_batch(tmp_path):
    """sync_on_last: 3 micro-batches, one gradient exchange (counted with a DDP communication hook), and the same
    gradients as without DDP."""
    import train
    from model import GPT, GPTConfig
    from sologpt import distributed as sd
    from sologpt.hardware import LossScaler
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=8, vocab_size=32))
        plain = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=8, vocab_size=32))
        plain.load_state_dict(model.state_dict())
        ddp = torch.nn.parallel.DistributedDataParallel(model, broadcast_buffers=False)
        exchanged = []

        def count(state, bucket):
            exchanged.append(1)
            fut = torch.futures.Future()
            fut.set_result(bucket.buffer())
            return fut

        ddp.register_comm_hook(None, count)
        micro = [(torch.randint(0, 32, (2, 8)), torch.randint(0, 32, (2, 8)), {}) for _ in range(3)]
        grads = {}

        def keep_grads(opt_model):
            class Keep(torch.optim.SGD):
                def step(self, closure=None):
                    grads[opt_model] = [p.grad.clone() for p in opt_model.parameters()]
            return Keep(opt_model.parameters(), lr=0.0)

        scaler = LossScaler("cpu", enabled=False)
        ctx = torch.autocast("cpu", enabled=False)
        step = functools.partial(train.train_step, ddp, keep_grads(model), scaler, ctx=ctx, grad_clip=0)
        sd.sync_on_last(step, ddp)(micro)
        assert len(exchanged) == 1  # one bucket (a tiny model), exchanged once: after the third micro-batch
        train.train_step(plain, keep_grads(plain), scaler, micro, ctx, grad_clip=0)
        for a, b in zip(grads[model], grads[plain]):
            torch.testing.assert_close(a, b)
    finally:
        dist.destroy_process_group()
