"""sologpt/galore.py: GaLore-projected AdamW, updates in backward, bf16 weights with stochastic rounding. Each
update rule against torch.optim.AdamW where the math says they agree, the in-backward updates against the
ordinary step, tracking on a tiny GPT, the refused combinations and exact resume."""

import copy

import pytest
import torch

import train as train_mod
from conftest import assert_resume_is_exact, error_of, make_model, perturb, rand_ids, run_train
from sologpt import galore
from sologpt.checkpoint import read as read_checkpoint
from sologpt.galore import GaLoreAdamW, UpdateInBackward, galore_groups, projection
from sologpt.lean_optim import state_bytes
from sologpt.memory import optimizer_bytes

NO_CLIP = ["--grad_clip=0"]


def adamw_groups(model, wd=0.1):
    params = list(model.parameters())
    return [{"params": [p for p in params if p.dim() >= 2], "weight_decay": wd},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]


def loss_of(model, seed, ctx=None):
    x = rand_ids(4, 16, seed=seed)
    with ctx or torch.autocast("cpu", enabled=False):
        return model(x, torch.roll(x, -1, dims=1))[1]


def test_rank0_is_torch_adamw_bit_for_bit():
    """No projection and fp32 moments: exactly torch.optim.AdamW (the same ops in the same order)."""
    a = perturb(make_model())
    b = copy.deepcopy(a)
    ref = torch.optim.AdamW(adamw_groups(a), lr=1e-2, betas=(0.9, 0.95), foreach=False)
    opt = GaLoreAdamW(adamw_groups(b), lr=1e-2, betas=(0.9, 0.95), state_dtype="fp32")
    for step in range(5):
        for model, o in ((a, ref), (b, opt)):
            loss_of(model, step).backward()
            o.step()
            o.zero_grad(set_to_none=True)
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), name


@pytest.mark.parametrize("state_dtype", ["fp32", "int8"])
def test_large_tensors_in_row_chunks_are_the_same_update(monkeypatch, state_dtype):
    """An unprojected tensor above CHUNK_NUMEL values (the embedding of a large model) is updated a few rows at a
    time, whole int8 code blocks per chunk: the same weights and moments, bit for bit, as in one piece."""
    a = perturb(make_model())
    b = copy.deepcopy(a)
    opts = [GaLoreAdamW(adamw_groups(m), lr=1e-2, state_dtype=state_dtype) for m in (a, b)]
    for step in range(3):
        for i, (model, opt) in enumerate(zip((a, b), opts)):
            monkeypatch.setattr(galore, "CHUNK_NUMEL", 1 << 24 if i == 0 else 200)  # b: wte (64 x 32) in 8 chunks
            loss_of(model, step).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    assert galore.chunk_rows(b.transformer.wte.weight, 256) == 8
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), name
    for sa, sb in zip(opts[0].state_dict()["state"].values(), opts[1].state_dict()["state"].values()):
        assert all(torch.equal(sa[k], sb[k]) for k in sa if torch.is_tensor(sa[k]))


@pytest.mark.parametrize("shape", [(40, 24), (24, 40)])
def test_projection_is_the_top_singular_subspace(shape):
    """The eigenvectors of the smaller Gram matrix span the top-r singular subspace of the SVD, on the shorter side."""
    g = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    p = projection(g, 5)
    u, _, vh = torch.linalg.svd(g, full_matrices=False)
    ref = vh[:5].mT if shape[0] >= shape[1] else u[:, :5]
    assert p.shape == (min(shape), 5)
    assert torch.allclose(p @ p.mT, ref @ ref.mT, atol=1e-4)


@pytest.mark.parametrize("shape", [(12, 6), (6, 12)])
def test_full_rank_is_adamw_in_the_rotated_space(shape):
    """At rank min(m, n) nothing is lost (Q Q^T = I), but AdamW's element-wise normalisation does not commute with
    the rotation: full-rank GaLore equals AdamW run on the rotated gradient G Q (P^T G), rotated back, and not
    AdamW on G itself."""
    m, n = shape
    g = torch.Generator().manual_seed(0)
    grads = [torch.randn(shape, generator=g) * (1 + torch.arange(n)) for _ in range(6)]  # columns of other scales
    w = torch.nn.Parameter(torch.randn(shape, generator=g))
    opt = GaLoreAdamW([w], lr=1e-2, weight_decay=0.0, rank=min(shape), gap=1000, scale=1.0, state_dtype="fp32")
    w0 = w.detach().clone()
    proj = projection(grads[0], min(shape))  # the subspace the optimizer fixes at step 1 (gap 1000)
    low = torch.nn.Parameter(torch.zeros(shape))  # at full rank, G Q (m >= n) and P^T G (m < n) are m x n too
    ref = torch.optim.AdamW([low], lr=1e-2, weight_decay=0.0, foreach=False)
    plain_w = torch.nn.Parameter(w0.clone())
    plain = torch.optim.AdamW([plain_w], lr=1e-2, weight_decay=0.0, foreach=False)
    for grad in grads:
        w.grad = grad.clone()
        opt.step()
        low.grad = grad @ proj if m >= n else proj.mT @ grad
        ref.step()
        plain_w.grad = grad.clone()
        plain.step()
    rotated_back = w0 + (low.detach() @ proj.mT if m >= n else proj @ low.detach())
    assert torch.allclose(proj.mT @ proj, torch.eye(min(shape)), atol=1e-5)  # orthonormal
    assert torch.allclose(w.detach(), rotated_back, atol=1e-6)
    assert (w.detach() - plain_w.detach()).abs().max() > 1e-3  # not AdamW in the weight's own coordinates


def test_low_rank_tracks_adamw_on_tiny_gpt(tiny_flags, tmp_path):
    """A rank-8 projection of the 32-wide tiny GPT's matrices (a quarter of their rank; SVD every 10 steps), 60
    steps on the characters: val loss within 3% of fp32 AdamW's, also with int8 moments, bf16 weights and updates
    in backward (measured 3.068 AdamW, 3.112 and 3.125; docs/memory.md)."""
    steps = ["--max_iters=60", "--eval_interval=60", "--eval_iters=8"]
    adamw = run_train(tiny_flags + steps + [f"--out_dir={tmp_path / 'adamw'}"])
    flags = tiny_flags + steps + ["--optimizer=galore", "--galore_rank=8", "--galore_gap=10", "--galore_scale=1.0"]
    low = run_train(flags + [f"--out_dir={tmp_path / 'galore'}"])
    lean = run_train(flags + NO_CLIP + [f"--out_dir={tmp_path / 'lean'}", "--optim_state=int8", "--weights_dtype=bf16",
                                        "--dtype=bfloat16", "--update_in_backward=True"])
    assert adamw < 3.2  # it learns (ln 65 = 4.17 at the start)
    assert abs(low - adamw) / adamw < 0.03 and abs(lean - adamw) / adamw < 0.03, (low, lean, adamw)


@pytest.mark.parametrize("weights, accum, ckpt", [("fp32", 1, 0), ("fp32", 3, 1), ("bf16", 2, 1)])
def test_updates_in_backward_equal_the_ordinary_step(weights, accum, ckpt):
    """The same optimizer, updates run by the hooks in backward (on the last micro-batch only) or by step() after
    it: bit for bit the same weights, with gradient accumulation, activation checkpointing (the recompute reads
    weights not yet updated), a tied embedding, projection refreshes (gap 2) and bf16 weights."""
    a = perturb(make_model(grad_checkpointing=ckpt)).train()
    galore.lower_weights(a, weights)
    b = copy.deepcopy(a)
    ctx = torch.autocast("cpu", dtype=torch.bfloat16, enabled=weights == "bf16")

    def opt_for(model):
        groups = galore_groups(model, 0.1, rank=4, gap=2, scale=0.25)
        return GaLoreAdamW(groups, lr=1e-2, betas=(0.9, 0.95), state_dtype="int8")

    ordinary, hooked = opt_for(a), UpdateInBackward(opt_for(b), accum)
    for step in range(5):
        for model, opt in ((a, ordinary), (b, hooked)):
            for micro in range(accum):
                (loss_of(model, step * 10 + micro, ctx) / accum).backward()
                if model is b and micro == accum - 1:  # the hooks used every gradient and dropped it
                    assert all(p.grad is None for p in b.parameters())
            opt.step()
            opt.zero_grad(set_to_none=True)
    assert a.lm_head.weight is a.transformer.wte.weight and b.lm_head.weight is b.transformer.wte.weight
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert p.dtype == (torch.bfloat16 if weights == "bf16" else torch.float32)
        assert torch.equal(p, q), name
    assert torch.equal(ordinary.state_dict()["state"][5]["projection"], hooked.state_dict()["state"][5]["projection"])


def test_updates_in_backward_through_train_py(tiny_flags, tmp_path):
    """train.py with update_in_backward on and off (2 micro-batches per step, bf16 weights, int8 moments, GaLore):
    the same checkpoint weights, bit for bit."""
    flags = tiny_flags + NO_CLIP + ["--max_iters=6", "--gradient_accumulation_steps=2", "--optimizer=galore",
                                    "--galore_rank=4", "--galore_gap=3", "--optim_state=int8",
                                    "--weights_dtype=bf16", "--dtype=bfloat16"]
    run_train(flags + [f"--out_dir={tmp_path / 'a'}"])
    run_train(flags + [f"--out_dir={tmp_path / 'b'}", "--update_in_backward=True"])
    a, b = (read_checkpoint(tmp_path / d / "ckpt.pt") for d in "ab")
    for k, v in a["model"].items():
        assert v.dtype == torch.bfloat16 or not v.is_floating_point(), k
        assert torch.equal(v, b["model"][k]), k


def test_bf16_stochastic_rounding_tracks_fp32_weights(monkeypatch):
    """Weights near 1 with AdamW steps of ~1e-4, a fortieth of a bf16 step there (2^-7): round-to-nearest never
    moves them, stochastic rounding follows the fp32 weights on average."""
    def run(dtype):
        torch.manual_seed(0)
        w = torch.nn.Parameter((1 + 0.5 * torch.rand(4096)).to(dtype))
        opt = GaLoreAdamW([w], lr=1e-4, weight_decay=0.0, state_dtype="fp32")
        g = torch.Generator().manual_seed(1)
        for _ in range(400):
            w.grad = (torch.randn(4096, generator=g) * 0.1 + 1.0).to(dtype)  # a steady push downwards
            opt.step()
        return w.detach().float()

    start = (1 + 0.5 * torch.rand(4096, generator=torch.Generator().manual_seed(0)))
    exact = run(torch.float32)
    stochastic = run(torch.bfloat16)
    monkeypatch.setattr(galore, "to_bf16_stochastic", lambda x, gen: x.to(torch.bfloat16))
    nearest = run(torch.bfloat16)
    assert (start - exact).mean() > 0.035  # the weights moved by ~400 x 1e-4
    err_sr, err_rn = (stochastic - exact).abs().mean(), (nearest - exact).abs().mean()
    print(f"mean |error|: stochastic {err_sr:.4f}, nearest {err_rn:.4f}; mean drift error "
          f"{(stochastic - exact).mean():.5f} / {(nearest - exact).mean():.5f}")
    assert err_rn > 0.03 and err_sr < err_rn / 2, (err_sr, err_rn)
    assert (stochastic - exact).mean().abs() < 0.002  # unbiased: the mean drift is kept
    assert torch.equal(run(torch.float32), exact)


def test_optimizer_bytes_is_the_state_held():
    """memory.optimizer_bytes for GaLore (fp32 moments): exactly the bytes of the optimizer's state tensors, far
    below AdamW's 8 per parameter."""
    model = make_model()
    cfg = train_mod.TrainConfig(optimizer="galore", galore_rank=4, optim_state="fp32")
    opt = GaLoreAdamW(galore_groups(model, 0.1, 4, 10, 0.25), state_dtype="fp32")
    loss_of(model, 0).backward()
    opt.step()
    assert state_bytes(opt) == optimizer_bytes(model, cfg)
    blocks = sum(p.numel() for n, p in model.named_parameters() if n.startswith("transformer.h.") and p.dim() == 2)
    assert optimizer_bytes(model, cfg) < 8 * sum(p.numel() for p in model.parameters()) - 8 * blocks * 0.6


def test_resume_is_exact(tiny_flags, tmp_path, capsys):
    """GaLore (SVD every 3 steps, a refresh after the resume point), int8 moments, bf16 weights, updates in
    backward, 2 micro-batches: stopped after 4 steps and resumed, bit for bit the weights of 8 straight steps. The
    checkpoint holds the projections; another galore_rank is refused on resume."""
    flags = tiny_flags + NO_CLIP + ["--gradient_accumulation_steps=2", "--optimizer=galore", "--galore_rank=4",
                                    "--galore_gap=3", "--optim_state=int8", "--weights_dtype=bf16",
                                    "--dtype=bfloat16", "--update_in_backward=True", "--dropout=0.1",
                                    "--lr_decay_iters=8"]
    other = assert_resume_is_exact(flags, tmp_path)
    state = read_checkpoint(tmp_path / "r" / "ckpt.pt")["optimizer"]["state"]
    assert sum("projection" in s for s in state.values()) == 8  # 4 matrices in each of the 2 blocks
    err = error_of(train_mod.main, other + ["--max_iters=9", "--init_from=resume", "--galore_rank=8"], capsys)
    assert "galore_rank=4" in err


@pytest.mark.parametrize("extra, message", [
    (["--update_in_backward=True"], "cannot clip it (grad_clip=1.0): set grad_clip=0"),
    (["--update_in_backward=True", "--grad_clip=0", "--compile=True"], "set compile=False"),
    (["--update_in_backward=True", "--grad_clip=0", "--optimizer=muon"], "use optimizer='adamw' or 'galore'"),
    (["--weights_dtype=bf16"], "set dtype=bfloat16"),
    (["--weights_dtype=fp16"], "weights_dtype='fp16' is unknown"),
    (["--optimizer=galore", "--galore_rank=0"], "must be at least 1"),
    (["--optimizer=galore", "--galore_scale=0"], "must be positive"),
    (["--optimizer=adamw8"], "use 'adamw', 'muon' or 'galore'"),
])
def test_refused_combinations_one_line(tiny_flags, capsys, extra, message):
    assert message in error_of(train_mod.main, tiny_flags + extra, capsys)


def test_refused_under_torchrun_and_with_lora(tiny_flags, trained, capsys, monkeypatch):
    lora = ["--lora_rank=4", f"--init_from={trained}", "--optimizer=galore"]
    assert "drop lora_rank" in error_of(train_mod.main, tiny_flags + lora, capsys)
    monkeypatch.setenv("RANK", "0")
    err = error_of(train_mod.main, tiny_flags + NO_CLIP + ["--update_in_backward=True"], capsys)
    assert "start with plain python" in err


def test_frozen_parameters_get_no_hook_and_stay():
    """freeze: a frozen parameter is in no optimizer group, so it gets no hook and keeps its value."""
    model = perturb(make_model()).train()
    model.transformer.h[0].requires_grad_(False)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    params = [p for p in model.parameters() if p.requires_grad]
    opt = UpdateInBackward(GaLoreAdamW([{"params": params}], lr=1e-2), 1)
    loss_of(model, 0).backward()
    opt.step()
    for n, p in model.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]) and p.grad is None, n
    assert len(opt.handles) == len(params)


def test_spike_guard_rolls_back_exactly(tiny_flags, tmp_path, monkeypatch, capsys):
    """The spike guard needs no gradients: a spike at step 10 rolls GaLore's weights (bf16), moments and
    projections back to step 5's, exactly, with the updates applied in backward."""
    from test_guard import poison
    poison(monkeypatch, steps={9})  # logged at step 10, an evaluation step
    run_train(tiny_flags + NO_CLIP + ["--max_iters=12", "--spike_guard=True", "--optimizer=galore", "--galore_rank=4",
                                      "--galore_gap=3", "--optim_state=int8", "--weights_dtype=bf16",
                                      "--dtype=bfloat16", "--update_in_backward=True"])
    assert "rolled back to the state of step 5 (memory)" in capsys.readouterr().out
    from sologpt.rundir import read_metrics
    evals = {m["iter"]: m for m in read_metrics(tmp_path / "out")}
    assert evals[10]["val_loss"] == evals[5]["val_loss"]


@pytest.mark.parametrize("mode", ["full_bwd", "full_galore"])
def test_bench_memory_modes_are_valid_configs(mode):
    """bench/memory.py (CUDA only) builds its all-parameter modes' configs with mode_config: they pass the checks,
    and train.py's make_optimizer hooks the updates into backward."""
    import argparse
    from bench.memory import mode_config
    cfg = mode_config(mode, 2, argparse.Namespace(block_size=16, nproc=0, galore_rank=8), device="cpu")
    galore.check(cfg)
    model = make_model()
    opt = train_mod.make_optimizer(model, cfg, "cpu")
    assert isinstance(opt, UpdateInBackward) and cfg.grad_clip == 0 and cfg.weights_dtype == "bf16"
    assert any(g["rank"] == 8 for g in opt.param_groups) == (mode == "full_galore")


def test_a_non_finite_gradient_on_a_refresh_step_reaches_the_spike_guard(tiny_flags, tmp_path, monkeypatch, capsys):
    """A NaN gradient has no subspace: projection() says None (instead of a decomposition error inside backward),
    the last projection stays, and the NaN reaches the loss, where the spike guard rolls the step back. A width of
    16 is where the CPU's eigh and SVD raise on a NaN matrix rather than return NaN vectors."""
    assert projection(torch.full((8, 4), float("nan")), 2) is None
    assert projection(torch.tensor([[1.0, float("inf")], [0.0, 1.0]]), 1) is None
    from test_guard import poison
    poison(monkeypatch, steps={9}, factor=float("nan"))  # step 10: (10 - 1) % 3 == 0, a projection refresh
    flags = [f for f in tiny_flags if not f.startswith("--n_embd")] + ["--n_embd=16"]
    run_train(flags + NO_CLIP + ["--max_iters=12", "--spike_guard=True", "--optimizer=galore", "--galore_rank=4",
                                 "--galore_gap=3", "--update_in_backward=True"])
    assert "rolled back" in capsys.readouterr().out


def test_accumulation_keeps_the_gradients_and_the_estimate_says_so(tiny_flags, capsys):
    """With gradient_accumulation_steps > 1 every gradient lives from the first micro-batch to the last one's
    backward: the estimate counts all of them, and a note says the saving is gone."""
    from sologpt.configurator import load_config
    from sologpt.memory import estimate
    model = make_model(n_layer=4, n_embd=32)
    one = load_config(train_mod.TrainConfig, tiny_flags + NO_CLIP + ["--update_in_backward=True"])
    two = load_config(train_mod.TrainConfig, tiny_flags + NO_CLIP + ["--update_in_backward=True",
                                                                     "--gradient_accumulation_steps=2"])
    plain = load_config(train_mod.TrainConfig, tiny_flags)
    galore.check(two)
    assert "saves no gradient memory" in capsys.readouterr().out
    grads = {name: estimate(model, c)[0]["gradients"] for name, c in (("one", one), ("two", two), ("plain", plain))}
    assert grads["one"] < grads["two"] == grads["plain"]


def test_resuming_with_update_in_backward_toggled_names_the_switch(tiny_flags, tmp_path, capsys):
    """A run trained with step() after backward (torch AdamW's state) resumed with update_in_backward: one line
    that names update_in_backward, not an unrelated galore_rank."""
    run_train(tiny_flags + NO_CLIP + ["--max_iters=4"])
    err = error_of(train_mod.main, tiny_flags + NO_CLIP + ["--max_iters=6", "--init_from=resume",
                                                          "--update_in_backward=True"], capsys)
    assert "update_in_backward=False" in err and "galore_rank" not in err


def test_bench_memory_refuses_the_one_process_modes_with_nproc():
    import subprocess
    import sys
    from conftest import REPO
    res = subprocess.run([sys.executable, "-m", "bench.memory", "--nproc", "2", "--modes", "full", "full_galore"],
                         cwd=REPO, capture_output=True, text=True)
    assert res.returncode == 1 and res.stderr.strip().splitlines() == [
        "error: --modes full_galore run in one process (updates in backward, whole matrices for GaLore): drop "
        "--nproc for them"]
