"""The modern architecture options (rope, rmsnorm, qk_norm, relu2, untied head) and the Muon optimizer, on the
CPU: each option changes what it should and nothing else, rotary positions are relative, cached and batched
generation equal the plain path, train.py runs and resumes them exactly, GPT-2 tools refuse all but the untied
head, and the untied head round-trips through transformers."""

import copy

import pytest
import torch

from sologpt import checkpoint, checks, freeze, hf_gpt2, lora, memory, quantize
from sologpt import muon
from tools import quantize as quantize_cli
import train as train_mod
from sologpt.configurator import UserError, load_config
from conftest import assert_resume_is_exact, perturbed_model
from sologpt.inference import Engine
from model import GPT, GPTConfig, rotate
from sologpt.checkpoint import read as read_checkpoint

ALL = dict(rope=True, norm="rmsnorm", qk_norm=True, mlp_act="relu2", tie_embeddings=False)
OPTIONS = [dict(rope=True), dict(norm="rmsnorm"), dict(qk_norm=True), dict(mlp_act="relu2"),
           dict(tie_embeddings=False), ALL]


def run(flags):
    return train_mod.train(load_config(train_mod.TrainConfig, flags))


tiny = perturbed_model  # larger weights than the init, so a wrong position or mask changes the tokens


@pytest.mark.parametrize("opts", OPTIONS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()))
def test_option_changes_the_model_and_generation_stays_exact(opts):
    plain, model = tiny(), tiny(**opts)
    idx = torch.randint(0, 64, (2, 20), generator=torch.Generator().manual_seed(0))
    assert not torch.allclose(plain(idx)[0], model(idx)[0])  # the option is really in the forward pass
    keys = set(model.state_dict())
    assert ("transformer.wpe.weight" in keys) == (not model.config.rope)
    assert ("transformer.ln_f.bias" in keys) == (model.config.norm == "layernorm")
    assert (model.lm_head.weight is model.transformer.wte.weight) == model.config.tie_embeddings
    # cached decoding (positions continue from the cache) == recomputing the whole prefix, past block_size too
    prompt = idx[:, :5]
    cached = model.generate(prompt, 50, temperature=0, use_cache=True)
    assert torch.equal(cached, model.generate(prompt, 50, temperature=0, use_cache=False))
    # the batched engine: left-padded rows keep their own positions
    prompts = [[5, 9, 2], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11], [42]]
    rows = Engine(model, 3, 11 + 12, "cpu").generate(prompts, 12, temperature=0)
    for prompt, row in zip(prompts, rows):
        reference = model.generate(torch.tensor([prompt]), 12, temperature=0, use_cache=False)[0, len(prompt):]
        assert row == reference.tolist()


def test_math_and_sdpa_agree_and_checkpointing_keeps_gradients():
    sdpa = tiny(**ALL).train()
    math_ = tiny(**ALL, attn_impl="math").train()
    idx, y = torch.randint(0, 64, (2, 16)), torch.randint(0, 64, (2, 16))
    torch.testing.assert_close(math_(idx, y)[1], sdpa(idx, y)[1], rtol=1e-5, atol=1e-5)
    sdpa(idx, y)[1].backward()
    grads = [p.grad.clone() for p in sdpa.parameters()]
    checkpointed = tiny(**ALL, grad_checkpointing=1).train()
    checkpointed.load_state_dict(sdpa.state_dict())
    checkpointed(idx, y)[1].backward()
    for g, p in zip(grads, checkpointed.parameters()):
        torch.testing.assert_close(p.grad, g, rtol=1e-5, atol=1e-6)


def test_rotary_scores_depend_only_on_relative_position():
    model = tiny(rope=True)
    q, k = torch.randn(1, 1, 1, 16), torch.randn(1, 1, 1, 16)

    def score(m, n):  # q at position m against k at position n
        cq, sq = model.rotary(torch.tensor([m]))
        ck, sk = model.rotary(torch.tensor([n]))
        return (rotate(q, cq, sq) * rotate(k, ck, sk)).sum()

    torch.testing.assert_close(score(7, 3), score(27, 23))
    torch.testing.assert_close(score(0, 0), (q * k).sum())  # position 0 is no rotation
    assert not torch.allclose(score(7, 3), score(7, 4))
    assert rotate(q, *model.rotary(torch.tensor([5]))).norm().item() == pytest.approx(q.norm().item(), rel=1e-5)


def test_parameter_counts_and_flops():
    tied, untied, rope = tiny(), tiny(tie_embeddings=False), tiny(rope=True)
    assert untied.num_params() == tied.num_params() + 64 * 32  # the output layer's own weights
    assert untied.flops_per_token() == tied.flops_per_token()  # the embedding lookup is not a matmul
    assert rope.num_params() == tied.num_params()  # position tables are not counted either way
    assert sum(p.numel() for p in rope.parameters()) == sum(p.numel() for p in tied.parameters()) - 48 * 32


def test_untied_vocab_growth_and_crop():
    model = tiny(tie_embeddings=False, rope=True)
    model.resize_vocab(70)
    assert model.lm_head.weight.shape == (70, 32) and model.transformer.wte.weight.shape == (70, 32)
    torch.testing.assert_close(model.lm_head.weight[69], model.lm_head.weight[:64].mean(0))
    model.crop_block_size(16)
    assert model(torch.randint(0, 70, (1, 16)))[0].shape == (1, 16, 70)


def test_gpt2_export_refuses_modern_options(tmp_path):
    with pytest.raises(ValueError, match="rope, norm=rmsnorm cannot be exported as GPT-2"):
        hf_gpt2.save(tiny(rope=True, norm="rmsnorm"), tmp_path / "hf")


def test_unknown_option_values_are_one_line():
    with pytest.raises(ValueError, match="norm='batchnorm' is unknown"):
        GPTConfig(norm="batchnorm")
    with pytest.raises(ValueError, match="mlp_act='swish' is unknown"):
        GPTConfig(mlp_act="swish")
    with pytest.raises(ValueError, match="even head size"):
        GPTConfig(rope=True, n_embd=30, n_head=2)
    for bad, match in ((dict(norm="batchnorm"), "norm='batchnorm'"), (dict(optimizer="lion"), "optimizer='lion'"),
                       (dict(optimizer="muon", optim_state="int8"), "cannot be combined with lora_rank")):
        with pytest.raises(UserError, match=match):
            checks.resolve(train_mod.TrainConfig(device="cpu", **bad))


# ---- Muon ----------------------------------------------------------------------------------------------------

def test_orthogonalize_flattens_the_singular_values():
    m = torch.randn(24, 64) @ torch.diag(torch.logspace(-2, 1, 64))  # singular values spread over 3 decades
    s = torch.linalg.svdvals(muon.orthogonalize(m))
    assert s.min() > 0.5 and s.max() < 1.3  # all near 1 (the quintic's fixed band), none left tiny
    tall = torch.linalg.svdvals(muon.orthogonalize(m.t().contiguous()))
    torch.testing.assert_close(tall, s, rtol=1e-4, atol=1e-4)  # a tall matrix is done by its transpose


def test_muon_step_matches_torch_optim_muon():
    """The written-out step against PyTorch's (adjust_lr_fn match_rms_adamw): same direction and size. Torch's
    iterates in bfloat16 and ours in float32 on the CPU, so they agree to bf16 rounding, not bit for bit."""
    torch.manual_seed(0)
    w0 = torch.randn(48, 32)
    ours, ref = torch.nn.Parameter(w0.clone()), torch.nn.Parameter(w0.clone())
    a = muon.Muon([ours], lr=0.02, weight_decay=0.1)
    b = torch.optim.Muon([ref], lr=0.02, weight_decay=0.1, adjust_lr_fn="match_rms_adamw")
    for step in range(3):
        g = torch.randn(48, 32)
        ours.grad, ref.grad = g.clone(), g.clone()
        a.step()
        b.step()
    d_ours, d_ref = (ours - w0).detach().flatten(), (ref - w0).detach().flatten()
    assert torch.nn.functional.cosine_similarity(d_ours, d_ref, dim=0) > 0.99
    assert d_ours.norm().item() == pytest.approx(d_ref.norm().item(), rel=0.03)


def test_orthogonalize_does_each_matrix_of_a_stack_on_its_own():
    torch.manual_seed(0)
    stack = torch.randn(3, 16, 40)
    batched = muon.orthogonalize(stack)
    for k in range(3):
        torch.testing.assert_close(batched[k], muon.orthogonalize(stack[k]), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(muon.orthogonalize(stack.mT), batched.mT, rtol=1e-5, atol=1e-5)  # tall stacks too


def test_muon_split_weight_steps_like_its_blocks_as_separate_weights():
    """A (3n, n) weight with splits=3 (GPT-2's fused q, k, v) moves exactly as three (n, n) weights would; and
    weights of different shapes in one group (batched by shape) each move as they would alone."""
    torch.manual_seed(0)
    fused, other = torch.randn(24, 8), torch.randn(8, 20)
    a = [torch.nn.Parameter(fused.clone()), torch.nn.Parameter(other.clone())]
    b = [torch.nn.Parameter(block.clone()) for block in fused.split(8)] + [torch.nn.Parameter(other.clone())]
    opt_a = muon.Muon(a, lr=0.02, weight_decay=0.1, splits={a[0]: 3})
    opt_b = muon.Muon(b, lr=0.02, weight_decay=0.1)
    for step in range(3):
        g, g_other = torch.randn(24, 8), torch.randn(8, 20)
        a[0].grad, a[1].grad = g.clone(), g_other.clone()
        for p, block in zip(b, [*g.split(8), g_other]):
            p.grad = block.clone()
        opt_a.step()
        opt_b.step()
    torch.testing.assert_close(a[0].data, torch.cat([p.data for p in b[:3]]), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(a[1].data, b[3].data, rtol=1e-5, atol=1e-6)
    p = torch.nn.Parameter(torch.zeros(10, 4))
    for k in (3, 0):
        with pytest.raises(ValueError, match="equal row blocks"):
            muon.Muon([p], splits={p: k})
    clone = copy.deepcopy(opt_a)  # the splits travel with a copy (Optimizer's own pickling drops extra fields)
    assert list(clone.splits.values()) == [3] and clone.splits.keys() == {clone.param_groups[0]["params"][0]}


def test_muon_takes_block_matrices_only():
    model = tiny()
    opt = muon.MuonWithAdamW(model, 1e-3, 0.1, (0.9, 0.95))
    in_muon = {id(p) for g in opt.muon.param_groups for p in g["params"]}
    for name, p in model.named_parameters():
        assert (id(p) in in_muon) == (name.startswith("transformer.h.") and p.dim() == 2), name
    assert len(opt.param_groups) == 3  # one Muon group, AdamW's decayed and undecayed groups
    split = [n for n, p in model.named_parameters() if opt.muon.splits.get(p) == 3]
    assert split == [f"transformer.h.{i}.attn.c_attn.weight" for i in range(model.config.n_layer)]  # q, k, v apart
    with pytest.raises(ValueError, match="2-D weights only"):
        muon.Muon([torch.nn.Parameter(torch.zeros(3))])


@pytest.mark.parametrize("flags", [["--optimizer=muon"], ["--rope=True", "--norm=rmsnorm", "--qk_norm=True",
                                   "--mlp_act=relu2", "--tie_embeddings=False", "--optimizer=muon"]],
                         ids=["muon", "all"])
def test_train_runs_learns_and_resumes_exactly(tiny_flags, tmp_path, flags):
    flags = tiny_flags + flags + ["--lr_decay_iters=8"]
    other = assert_resume_is_exact(flags, tmp_path)
    # resuming without the options: one line naming the field
    plain = [f for f in other if f not in flags[len(tiny_flags):]]
    with pytest.raises(UserError, match="optimizer='muon'|rope=True"):
        run(plain + ["--max_iters=10", "--init_from=resume"])


def test_gpt2_weights_refuse_modern_options(tmp_path, tiny_flags):
    transformers = pytest.importorskip("transformers")
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_head=2, n_embd=32, n_positions=32,
                                                              vocab_size=65))
    hf.save_pretrained(tmp_path / "gpt2")
    with pytest.raises(UserError, match="GPT-2 weights have GPT-2's architecture, but the config sets rope"):
        run(tiny_flags + [f"--init_from={tmp_path / 'gpt2'}", "--rope=True", "--max_iters=1"])


def test_plain_checkpoint_config_leaves_the_options_out_and_modern_round_trips():
    plain, modern = tiny(), tiny(**ALL)
    assert not {"rope", "norm", "qk_norm", "mlp_act", "tie_embeddings"} & set(checkpoint.model_config(plain))
    again = GPT(GPTConfig(**checkpoint.model_config(modern)))
    again.load_state_dict(modern.state_dict())
    idx = torch.randint(0, 64, (1, 10))
    torch.testing.assert_close(again(idx)[0], modern(idx)[0])


def test_freeze_embeddings_freezes_an_untied_head():
    model = tiny(tie_embeddings=False)
    freeze.freeze(model, 0, True)
    assert not model.lm_head.weight.requires_grad and not model.transformer.wte.weight.requires_grad


def test_lora_and_quantization_on_a_modern_model():
    model = tiny(**ALL)
    idx = torch.randint(0, 64, (2, 12))
    ref = model(idx)[0]
    q = quantize.quantize_model(tiny(**ALL), "int8")
    assert (q(idx)[0] - ref).abs().max() < 0.05 * ref.abs().max()  # int8 rounding, not another function
    lora.apply_lora(model, 4, 8.0, 0.0, "all")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lora_B"):
                p.normal_(0, 0.1)  # B starts at zero: give the adapters something to add
    adapted = model(idx)[0]
    file = lora.adapter_checkpoint(model)
    other = tiny(**{**ALL, "rope": False})
    with pytest.raises(ValueError, match="rope=True, base has rope=False"):
        lora.load_adapter(other, file)
    lora.merge_lora(model)
    torch.testing.assert_close(model(idx)[0], adapted, rtol=1e-4, atol=1e-4)


def test_muon_with_every_block_frozen_and_conflicting_start_point_are_one_line(tiny_flags, tmp_path):
    with pytest.raises(UserError, match="no trainable weight matrices"):
        run(tiny_flags + ["--optimizer=muon", "--freeze_layers=2", "--max_iters=1"])
    run(tiny_flags + ["--max_iters=2", "--rope=True"])
    other = [f if not f.startswith("--out_dir") else f"--out_dir={tmp_path / 'ft'}" for f in tiny_flags]
    with pytest.raises(UserError, match="has norm='layernorm', but the config sets norm='rmsnorm'"):
        run(other + [f"--init_from={tmp_path / 'out' / 'ckpt.pt'}", "--norm=rmsnorm", "--max_iters=1"])
    run(other + [f"--init_from={tmp_path / 'out' / 'ckpt.pt'}", "--max_iters=1"])  # the options come from it
    assert read_checkpoint(tmp_path / "ft" / "ckpt.pt")["model_config"]["rope"] is True


def test_qat_fake_quantizes_an_untied_head_so_chunked_loss_is_refused(tiny_flags):
    with pytest.raises(UserError, match=r"output layer is a QATLinear \(qat or base_dtype\): set chunked_loss=0"):
        run(tiny_flags + ["--tie_embeddings=False", "--qat=int8", "--chunked_loss=64", "--max_iters=1"])
    run(tiny_flags + ["--tie_embeddings=False", "--qat=int8", "--max_iters=2"])  # qat alone trains it


def test_quantize_a_lora_run_checkpoint(tiny_flags, tmp_path):
    run(tiny_flags + ["--max_iters=3"])
    other = [f if not f.startswith("--out_dir") else f"--out_dir={tmp_path / 'lora'}" for f in tiny_flags]
    run(other + [f"--init_from={tmp_path / 'out' / 'ckpt.pt'}", "--lora_rank=2", "--max_iters=3"])
    ckpt = read_checkpoint(tmp_path / "lora" / "ckpt.pt")
    merged = checkpoint.load_model(ckpt)
    q = checkpoint.load_model(checkpoint.quantized(ckpt, "int8"))
    idx = torch.randint(0, merged.config.vocab_size, (1, 16))
    ref = merged(idx)[0]
    assert (q(idx)[0] - ref).abs().max() < 0.05 * ref.abs().max()
    quantize_cli.main(["--ckpt", str(tmp_path / "lora" / "ckpt.pt"), "--mode", "int8"])  # the CLI reports sizes too
    assert 'quantization' in read_checkpoint(tmp_path / "lora" / "ckpt_int8.pt")


def test_memory_estimate_counts_one_momentum_per_muon_matrix():
    model = tiny()
    adamw = memory.estimate(model, train_mod.TrainConfig(device="cpu"))[0]["optimizer"]
    mu = memory.estimate(model, train_mod.TrainConfig(device="cpu", optimizer="muon"))[0]["optimizer"]
    block_matrices = sum(p.numel() for n, p in model.named_parameters() if n.startswith("transformer.h.") and p.dim() == 2)
    assert adamw - mu == 4 * block_matrices


def test_untied_head_round_trips_through_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=2, n_head=2, n_embd=32, n_positions=32,
                                                              vocab_size=61, tie_word_embeddings=False)).eval()
    with torch.no_grad():
        hf.lm_head.weight.normal_(0, 0.5)  # unlike the embedding, so a tied load would give other logits
    hf.save_pretrained(tmp_path / "hf")
    ours = hf_gpt2.load(tmp_path / "hf", vocab_pad_multiple=64).eval()
    assert not ours.config.tie_embeddings and ours.lm_head.weight is not ours.transformer.wte.weight
    idx = torch.randint(0, 61, (2, 20))
    torch.testing.assert_close(ours(idx)[0], hf(idx).logits, rtol=1e-4, atol=1e-4)
    hf_gpt2.save(ours, tmp_path / "back")
    again = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "back").eval()
    assert not again.config.tie_word_embeddings
    torch.testing.assert_close(again(idx).logits, hf(idx).logits, rtol=1e-4, atol=1e-4)
