"""Bad input at every entry point, as one table: prepare/*, train.py with every feature switch, sample.py, score,
export, quantize and the benchmarks' arguments; wrong types, NaN and infinity, out-of-range values, missing, empty,
short and odd-sized files, conflicting switches, and damaged checkpoints of every kind (full, LoRA, quantized,
classifier). Each case must end in one line on stderr, "error: ...", holding the fragment the table names (the
problem, and where it fits the fix), a non-zero exit, no traceback, and every file the user had unchanged, with
nothing new written.

The cases run in this process against one set of user files (a trained run, a LoRA run on it, a quantized file, a
classifier, their data and damaged copies), built once."""

import hashlib
import json
import os
import shlex
import shutil
import sys

import numpy as np
import pytest
import torch

import sample as sample_mod
import train as train_mod
from conftest import SHARED, run_train
from prepare import classify as prep_classify, shakespeare as prep_bpe, shakespeare_char as prep_char, text as prep_text
from tools import export as export_mod, quantize as quantize_mod, score as score_mod

BENCHES = ("compress", "curriculum", "finetune", "generate", "loss", "memory", "quantize", "scaling", "speed",
           "tokenizer_speed")


class Evil:
    """A pickle that would run a shell command if it were ever unpickled without weights_only."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def bench_main(name):
    def main(argv):
        import importlib
        module = importlib.import_module(f"bench.{name}")
        saved = sys.argv
        sys.argv = [f"bench/{name}.py", *argv]
        try:
            return module.main()
        finally:
            sys.argv = saved
    return main


ENTRIES = {"train": train_mod.main, "sample": sample_mod.main, "score": score_mod.main, "export": export_mod.main,
           "quantize": quantize_mod.main, "prep_char": prep_char.main, "prep_bpe": prep_bpe.main,
           "prep_text": prep_text.main, "prep_cls": prep_classify.main,
           **{f"bench.{name}": bench_main(name) for name in BENCHES}}


# ---- the user's files ---------------------------------------------------------------------------------------------

def save_variant(src, dst, change):
    """dst/ckpt.pt: src's checkpoint with change(ckpt) applied, and src's meta.json beside it."""
    ckpt = torch.load(src / "ckpt.pt", weights_only=True)
    change(ckpt)
    dst.mkdir(parents=True)
    torch.save(ckpt, dst / "ckpt.pt")
    shutil.copy(src / "meta.json", dst / "meta.json")


def char_dataset(root, name, ids, vocab, **meta):
    d = root / name
    d.mkdir(parents=True)
    np.asarray(ids, dtype=np.uint16).tofile(d / "train.bin")
    np.asarray(ids, dtype=np.uint16).tofile(d / "val.bin")
    chars = "".join(chr(65 + i) for i in range(vocab))
    (d / "meta.json").write_text(json.dumps({"tokenizer": "char", "vocab_size": vocab, "chars": chars,
                                             "dtype": "uint16", **meta}))
    return d


@pytest.fixture(scope="module")
def world(char_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("user")
    data = root / "data"
    shutil.copytree(char_data / "tiny", data / "tiny")
    train = (f"--data_root={data} --dataset=tiny --device=cpu --n_layer=2 --n_head=2 --n_embd=32 --block_size=32 "
             f"--batch_size=4 --eval_iters=1 --eval_interval=2 --max_iters=2 --progress=False --sample_tokens=0 "
             f"--compile=False")
    run_train(shlex.split(train) + [f"--out_dir={root / 'run'}"])
    run_train(shlex.split(train) + [f"--out_dir={root / 'lora'}", f"--init_from={root / 'run' / 'ckpt.pt'}",
                                    "--lora_rank=2"])
    (root / "q").mkdir()
    quantize_mod.main(["--ckpt", str(root / "run" / "ckpt.pt"), "--mode", "int8", "--out", str(root / "q" / "ckpt.pt")])
    shutil.copy(root / "run" / "meta.json", root / "q" / "meta.json")
    rng = np.random.default_rng(0)
    rows = [{"text": " ".join("".join(rng.choice(list("abcdefx"), size=4)) for _ in range(5)), "label": ["no", "yes"][i % 2]}
            for i in range(60)]
    (root / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    prep_classify.main(["--input", str(root / "rows.jsonl"), "--name", "cls", "--data_root", str(data),
                        "--tokenizer", "char"])
    run_train(shlex.split(train.replace("--dataset=tiny", "--dataset=cls")) + [f"--out_dir={root / 'cls'}",
                                                                                "--task=classify"])

    # damaged checkpoints: well-formed files with missing or wrong parts
    run, bad = root / "run", root / "bad"
    variants = {
        "missing_tensor": lambda c: c["model"].pop("transformer.h.0.attn.c_attn.weight"),
        "wrong_shape": lambda c: c["model"].__setitem__("transformer.h.1.mlp.c_fc.weight", torch.zeros(5, 5)),
        "wrong_width": lambda c: c["model"].__setitem__("transformer.h.0.attn.c_proj.weight", torch.zeros(32, 31)),
        "extra_tensor": lambda c: c["model"].__setitem__("transformer.h.0.attn.extra", torch.zeros(2)),
        "config_type": lambda c: c["model_config"].__setitem__("n_embd", "32"),
        "config_shape": lambda c: c["model_config"].__setitem__("n_embd", 48),
        "config_layers": lambda c: c["model_config"].__setitem__("n_layer", 3),
        "no_model": lambda c: c.pop("model"),
        "no_optimizer": lambda c: c.pop("optimizer"),
        "bad_moment": lambda c: c["optimizer"]["state"][0].__setitem__("exp_avg", torch.zeros(3)),
        "no_rng": lambda c: c.pop("rng"),
        "bad_rng": lambda c: c["rng"].__setitem__("torch", "x"),
        "bad_iter": lambda c: c.__setitem__("iter_num", "2"),
        "version_2": lambda c: c.__setitem__("format_version", 2),
    }
    for name, change in variants.items():
        save_variant(run, bad / name, change)
    save_variant(root / "lora", bad / "lora_settings", lambda c: c["adapter"].pop("lora"))
    save_variant(root / "lora", bad / "lora_tensor", lambda c: c["adapter"]["adapter"].__setitem__(
        "transformer.h.0.attn.c_attn.lora_A", torch.zeros(7, 7)))
    save_variant(root / "lora", bad / "lora_base", lambda c: c.__setitem__("init_source", str(root / "gone.pt")))
    save_variant(root / "q", bad / "q_scale", lambda c: c["model"].pop("transformer.h.0.attn.c_attn.scale"))
    save_variant(root / "q", bad / "q_shape", lambda c: c["model"].__setitem__("transformer.h.0.mlp.c_fc.weight",
                                                                             torch.zeros(3, 3, dtype=torch.int8)))
    save_variant(root / "q", bad / "q_mode", lambda c: c["quantization"].__setitem__("mode", "int3"))
    save_variant(root / "cls", bad / "cls_head", lambda c: c["model"].__setitem__("cls_head.weight", torch.zeros(3, 3)))
    save_variant(root / "cls", bad / "cls_classes", lambda c: c["model_config"].__setitem__("n_classes", -1))
    save_variant(run, bad / "nometa", lambda c: c["train_config"].__setitem__("data_root", str(root / "gone")))
    (bad / "nometa" / "meta.json").unlink()
    # damaged files: cut short, empty, random bytes, code to run, not ours
    whole = (run / "ckpt.pt").read_bytes()
    files = {"truncated": whole[:len(whole) // 2], "empty": b"",
             "random": bytes(np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8))}
    for name, content in files.items():
        (bad / name).mkdir()
        (bad / name / "ckpt.pt").write_bytes(content)
        shutil.copy(run / "meta.json", bad / name / "meta.json")
    for name, obj in (("unsafe", {"format_version": 1, "model": Evil(root / "PWNED")}), ("foreign", [1, 2, 3])):
        (bad / name).mkdir()
        torch.save(obj, bad / name / "ckpt.pt")
        shutil.copy(run / "meta.json", bad / name / "meta.json")

    # damaged data
    def copy_data(name, change):
        shutil.copytree(data / "tiny", data / name)
        change(data / name)

    def edit_meta(**fields):
        def change(d):
            meta = json.loads((d / "meta.json").read_text())
            meta.update(fields)
            (d / "meta.json").write_text(json.dumps(meta))
        return change

    copy_data("no_meta", lambda d: (d / "meta.json").unlink())
    copy_data("meta_not_json", lambda d: (d / "meta.json").write_text("{'tokenizer': 'char',"))
    copy_data("meta_empty", lambda d: (d / "meta.json").write_text(""))
    copy_data("meta_vocab_str", edit_meta(vocab_size="65"))
    copy_data("meta_dtype", edit_meta(dtype="uint8"))
    copy_data("meta_count", edit_meta(train_tokens=12))
    copy_data("odd_train", lambda d: (d / "train.bin").write_bytes((d / "train.bin").read_bytes() + b"\0"))
    copy_data("empty_val", lambda d: (d / "val.bin").write_bytes(b""))
    copy_data("short_train", lambda d: (d / "train.bin").write_bytes(b"\0\0" * 10))
    char_dataset(data, "beyond_vocab", [0, 1, 2, 70] * 50, 65, max_token_id=3)  # meta.json's max_token_id lies
    char_dataset(data, "other_vocab", list(range(10)) * 20, 10)
    d = char_dataset(data, "val_beyond_vocab", list(range(10)) * 20, 65)
    np.asarray([0, 1, 2, 70] * 50, dtype=np.uint16).tofile(d / "val.bin")  # only val.bin holds the bad id
    shutil.copytree(data / "cls", data / "cls_beyond")
    cls_vocab = json.loads((data / "cls" / "meta.json").read_text())["vocab_size"]
    tokens = np.fromfile(data / "cls_beyond" / "train.bin", dtype=np.uint16)
    tokens[0] = cls_vocab + 3  # meta.json's max_token_id still says every id fits
    tokens.tofile(data / "cls_beyond" / "train.bin")
    shutil.copytree(data / "cls", data / "cls_labels")
    labels = np.fromfile(data / "cls_labels" / "val_labels.bin", dtype=np.int64)
    np.full(len(labels), 9, dtype=np.int64).tofile(data / "cls_labels" / "val_labels.bin")  # 2 classes: 0 and 1
    shutil.copytree(data / "cls", data / "cls_offsets")
    (data / "cls_offsets" / "train_offsets.bin").write_bytes(b"\0" * 5)
    shutil.copytree(data / "cls", data / "cls_nolabels")
    edit_meta(labels=None)(data / "cls_nolabels")

    # other user files
    (root / "held.txt").write_text((SHARED / "data" / "shakespeare" / "input.txt").read_text()[:3000])
    (root / "one.txt").write_text("a")
    (root / "latin1.txt").write_bytes("caf\xe9 au lait\n".encode("latin-1") * 3)
    (root / "binary.txt").write_bytes(b"\0\1\2" * 100)
    (root / "empty.txt").write_text("")
    (root / "blank.txt").write_text("\n  \n")
    (root / "bad.jsonl").write_text('{"prompt": "ROMEO:"}\nnot json\n')
    (root / "one_class.jsonl").write_text("".join(json.dumps({"text": f"t{i}", "label": "a"}) + "\n" for i in range(9)))
    (root / "no_label.jsonl").write_text('{"text": "hello"}\n')
    (root / "bad_row.jsonl").write_text('{"text": "a", "label": "x"}\n{oops\n')
    (root / "rows.csv").write_text("sentence,label\nhello,x\nbye,y\n")
    (root / "unseen_val.jsonl").write_text(json.dumps({"text": "zz", "label": "maybe"}) + "\n")
    (root / "words.bin").write_bytes(b"\0\0")
    (root / "hf_bad").mkdir()
    (root / "hf_bad" / "config.json").write_text("{not json")
    (root / "hf_noweights").mkdir()
    (root / "hf_noweights" / "config.json").write_text(json.dumps(dict(n_positions=64, vocab_size=65, n_layer=2,
                                                                         n_head=2, n_embd=32)))
    for name, files in (("hf_zero", {"model.safetensors": b"not read: the config is judged first"}), ("hf_badst", {"model.safetensors": b"not safetensors"}),
                        ("hf_badbin", {"pytorch_model.bin": b"not a torch file"})):
        (root / name).mkdir()
        config = dict(n_positions=64, vocab_size=65, n_layer=2, n_head=0 if name == "hf_zero" else 2, n_embd=32)
        (root / name / "config.json").write_text(json.dumps(config))
        for file, content in files.items():
            (root / name / file).write_bytes(content)
    (root / "docs").mkdir()
    vocab = json.loads((run / "meta.json").read_text())["vocab_size"]
    return {"root": root, "data": data, "run": run, "T": train, "V": vocab}


def snapshot(root):
    """Every file under root and a hash of its bytes."""
    return {str(p.relative_to(root)): hashlib.sha1(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and "__pycache__" not in p.parts}


# ---- the table ----------------------------------------------------------------------------------------------
# (id, entry, arguments with {root} {data} {run} {T} filled in, a fragment of the one error line)

T = "{T} --out_dir={root}/new"  # a new run's flags
R = "{T} --init_from=resume --max_iters=4 --out_dir={root}/bad/"  # resume a damaged checkpoint (name appended)
CASES = [
    # -- train.py: the config parser
    ("unknown key", "train", T + " --n_layr=4", "did you mean 'n_layer'"),
    ("wrong type", "train", T + " --n_layer=two", "n_layer='two' in flag '--n_layer=two' has type str, expected int"),
    ("bool for int", "train", T + " --n_layer=True", "has type bool, expected int"),
    ("no value", "train", T + " --max_iters", "has no value: write --max_iters=VALUE"),
    ("config file missing", "train", "{root}/nope.py " + T, "config file {root}/nope.py does not exist"),
    ("nan flag", "train", T + " --min_lr=nan", "min_lr=nan in flag '--min_lr=nan' must be a finite number"),
    ("inf flag", "train", T + " --learning_rate=1e999", "learning_rate=inf in flag '--learning_rate=1e999' must be a finite"),
    ("-inf flag", "train", T + " --grad_clip=-inf", "grad_clip=-inf in flag '--grad_clip=-inf' must be a finite"),
    ("huge int for float", "train", T + " --weight_decay=" + "9" * 400, "must be a finite number"),
    ("nan weight decay", "train", T + " --weight_decay=NaN", "weight_decay=nan in flag"),
    ("nan lora alpha", "train", T + " --lora_alpha=nan", "lora_alpha=nan in flag '--lora_alpha=nan' must be a finite"),
    ("inf temperature", "train", T + " --distill_temperature=inf", "distill_temperature=inf in flag"),
    # -- train.py: values out of range and conflicting switches
    ("negative lr", "train", T + " --learning_rate=-1", "learning_rate=-1.0 must not be negative"),
    ("beta2 1", "train", T + " --beta2=1.0", "beta2=1.0 must be in [0, 1)"),
    ("dropout", "train", T + " --dropout=-0.1", "dropout=-0.1 must be in [0, 1)"),
    ("batch 0", "train", T + " --batch_size=0", "batch_size=0 must be a positive integer or 'auto'"),
    ("batch word", "train", T + " --batch_size=big", "batch_size='big' must be a positive integer or 'auto'"),
    ("block 0", "train", T + " --block_size=0", "block_size=0 must be at least 1"),
    ("eval interval 0", "train", T + " --eval_interval=0", "eval_interval=0 must be at least 1"),
    ("negative iters", "train", T + " --max_iters=-1", "max_iters=-1 must not be negative"),
    ("heads", "train", T + " --n_head=3", "n_embd=32 is not divisible by n_head=3"),
    ("pad 0", "train", T + " --vocab_pad_multiple=0", "vocab_pad_multiple=0 must be at least 1"),
    ("pad word", "train", T + " --vocab_pad_multiple=big", "vocab_pad_multiple='big' is unknown: use a positive"),
    ("device", "train", T + " --device=tpu", "device='tpu' is unknown"),
    ("no cuda", "train", T + " --device=cuda", "sees no CUDA GPU"),
    ("dtype", "train", T + " --dtype=float64", "dtype='float64' is unknown"),
    ("compile", "train", T + " --compile=maybe", "compile='maybe' is unknown: use True, False or 'auto'"),
    ("attn impl", "train", T + " --attn_impl=fast", "attn_impl='fast' is unknown"),
    ("attn backend", "train", T + " --attn_backend=xformers", "attn_backend='xformers' is unknown"),
    ("norm", "train", T + " --norm=batchnorm", "norm='batchnorm' is unknown"),
    ("mlp", "train", T + " --mlp_act=swish", "mlp_act='swish' is unknown"),
    ("rope type", "train", T + " --rope=1", "rope=1 in flag '--rope=1' has type int, expected bool"),
    ("init_from", "train", T + " --init_from={root}/nope", "is not 'scratch', 'resume' or an existing path: give a run folder"),
    ("task", "train", T + " --task=regress", "task='regress' is unknown"),
    ("cls_pool", "train", T + " --cls_pool=max", "cls_pool='max' is unknown"),
    ("freeze negative", "train", T + " --freeze_layers=-1", "freeze_layers=-1 must not be negative"),
    ("freeze too many", "train", T + " --init_from={run}/ckpt.pt --freeze_layers=5", "freeze_layers=5"),
    ("lora negative", "train", T + " --lora_rank=-1", "lora_rank=-1 must not be negative"),
    ("lora scratch", "train", T + " --lora_rank=2", "lora_rank > 0 adapts pretrained weights"),
    ("lora target", "train", T + " --init_from={run}/ckpt.pt --lora_rank=2 --lora_targets=c_proj", "is ambiguous"),
    ("lora alpha", "train", T + " --init_from={run}/ckpt.pt --lora_rank=2 --lora_alpha=0", "alpha=0.0 must be positive"),
    ("lora dropout", "train", T + " --init_from={run}/ckpt.pt --lora_rank=2 --lora_dropout=1.5", "dropout=1.5 must be in [0, 1)"),
    ("qat mode", "train", T + " --qat=int3", "qat='int3' is unknown"),
    ("qat + fp8", "train", T + " --qat=int8 --fp8=True", "qat cannot be combined with"),
    ("qat group", "train", T + " --qat=int4 --qat_group_size=3", "group_size=3 must be an even number"),
    ("teacher missing", "train", T + " --teacher={root}/nope.pt", "teacher={root}/nope.pt does not exist: give a run folder"),
    ("distill alpha", "train", T + " --teacher={run}/ckpt.pt --distill_alpha=1.5", "distill_alpha must be in [0, 1]"),
    ("chunked + teacher", "train", T + " --teacher={run}/ckpt.pt --chunked_loss=8", "chunked_loss must be >= 0, for task 'lm' or 'sft', without teacher"),
    ("chunked negative", "train", T + " --chunked_loss=-1", "chunked_loss must be >= 0"),
    ("checkpointing", "train", T + " --grad_checkpointing=-1", "grad_checkpointing=-1 must not be negative"),
    ("optim state", "train", T + " --optim_state=int4", "optim_state='int4' is unknown"),
    ("base dtype alone", "train", T + " --base_dtype=int8", "base_dtype='int8' applies to frozen weights"),
    ("nf4 base alone", "train", T + " --base_dtype=nf4", "base_dtype='nf4' applies to frozen weights"),
    ("base dtype unknown", "train", T + " --base_dtype=nf3 --lora_rank=4", "base_dtype='nf3' is unknown: use one of fp32, bf16, int8, nf4"),
    ("base bf16 cpu", "train", T + " --base_dtype=bf16 --freeze_layers=1", "base_dtype='bf16' needs 16-bit autocast"),
    ("auto batch cpu", "train", T + " --batch_size=auto", "batch_size='auto' probes for CUDA out-of-memory"),
    ("auto sequences", "train", T + " --auto_batch_sequences=-1", "auto_batch_sequences=-1 must not be negative"),
    ("optimizer", "train", T + " --optimizer=sgd", "optimizer='sgd' is unknown"),
    ("muon + lean", "train", T + " --optimizer=muon --optim_state=bf16", "optimizer='muon' trains whole matrices"),
    ("fp8 cpu", "train", T + " --fp8=True", "fp8"),
    ("fp8 head cpu", "train", T + " --fp8_head=True", "fp8_head"),
    ("residual bf16", "train", T + " --residual_bf16=True", "residual_bf16=True keeps the residual stream in bfloat16"),
    ("cuda graphs", "train", T + " --cuda_graphs=True", "cuda_graphs=True needs device cuda"),
    ("parallel", "train", T + " --parallel=tp", "parallel='tp'"),
    ("curriculum", "train", T + " --curriculum=hard", "curriculum='hard' is unknown"),
    ("seq warmup", "train", T + " --seq_warmup_iters=-1", "seq_warmup_iters=-1 must not be negative"),
    ("seq start", "train", T + " --seq_warmup_iters=10 --seq_warmup_start=0", "seq_warmup_start=0 must be between 1"),
    ("seq + curriculum", "train", T + " --seq_warmup_iters=10 --seq_warmup_start=8 --curriculum=unigram",
     "cannot be combined yet"),
    ("task vs data", "train", T + " --task=classify", "holds 'lm' data but task='classify'"),
    # -- train.py: out_dir and resume
    ("resume nothing", "train", T + " --init_from=resume", "{root}/new/ckpt.pt does not exist: train first"),
    ("no overwrite", "train", "{T} --out_dir={run}", "{run}/ckpt.pt already exists: continue it with --init_from=resume"),
    ("own start point", "train", "{T} --out_dir={run} --init_from={run}/ckpt.pt --overwrite=True", "is this run's own checkpoint"),
    ("out_dir a file", "train", "{T} --out_dir={root}/held.txt", "out_dir {root}/held.txt is a file, not a folder"),
    ("resume switch", "train", "{T} --out_dir={run} --init_from=resume --optim_state=bf16", "was trained with optim_state='fp32', not 'bf16'"),
    ("resume shape", "train", "{T} --out_dir={run} --init_from=resume --n_layer=3", "holds a model with n_layer=2 but the config asks for n_layer=3"),
    ("resume other vocab", "train", "{T} --out_dir={run} --init_from=resume --dataset=other_vocab --block_size=8",
     "holds a model for {V} tokens but {data}/other_vocab/meta.json says vocab_size=10"),
    ("resume quantized", "train", "{T} --out_dir={root}/q --init_from=resume", "is quantized (int8): it holds no training state to resume"),
    # -- train.py: the data
    ("no dataset", "train", T + " --dataset=nothing", "{data}/nothing/train.bin is missing: prepare it first"),
    ("no meta", "train", T + " --dataset=no_meta", "{data}/no_meta/meta.json is missing"),
    ("meta not json", "train", T + " --dataset=meta_not_json", "meta.json is not valid JSON"),
    ("meta empty", "train", T + " --dataset=meta_empty", "meta.json is not valid JSON"),
    ("meta vocab type", "train", T + " --dataset=meta_vocab_str", "vocab_size='65' is not a positive integer"),
    ("meta dtype", "train", T + " --dataset=meta_dtype", "has dtype='uint8'; token files are uint16 or uint32"),
    ("meta count", "train", T + " --dataset=meta_count", "tokens but meta.json says 12"),
    ("odd-sized bin", "train", T + " --dataset=odd_train", "train.bin is not a whole number of uint16 tokens"),
    ("empty val.bin", "train", T + " --dataset=empty_val", "val.bin has 0 tokens, fewer than block_size + 1 = 33"),
    ("short train.bin", "train", T + " --dataset=short_train", "train.bin has 10 tokens, fewer than block_size + 1"),
    ("ids beyond vocab", "train", T + " --dataset=beyond_vocab --block_size=8",
     "{data}/beyond_vocab holds token id 70 but {data}/beyond_vocab/meta.json says vocab_size=65"),
    ("ids beyond vocab in val", "train", T + " --dataset=val_beyond_vocab --block_size=8",
     "{data}/val_beyond_vocab holds token id 70 but"),
    ("classifier ids beyond vocab", "train", T + " --dataset=cls_beyond --task=classify", "{data}/cls_beyond holds token id"),
    ("labels out of range", "train", T + " --dataset=cls_labels --task=classify", "val_labels.bin has a label id outside"),
    ("offsets odd-sized", "train", T + " --dataset=cls_offsets --task=classify", "train_offsets.bin is empty or not a whole number"),
    ("no labels", "train", T + " --dataset=cls_nolabels --task=classify", "has no list of at least two label names"),
    # -- damaged checkpoints, at every reader
    *[(f"{name} {entry}", entry.split("-")[0], args + name + suffix, fragment) for name, fragment in [
        ("missing_tensor", "is damaged (the tensor transformer.h.0.attn.c_attn.weight is missing)"),
        ("wrong_shape", "is damaged (transformer.h.1.mlp.c_fc.weight has shape (5, 5), but its model_config makes (128, 32))"),
        ("wrong_width", "is damaged (transformer.h.0.attn.c_proj.weight has shape (32, 31), but its model_config makes (32, 32))"),
        ("config_type", "is damaged (model_config n_embd='32' is not a int)"),
        ("config_shape", "is damaged (transformer.wte.weight has shape ({V}, 32), but model_config makes ({V}, 48))"),
        ("config_layers", "is damaged (it holds 2 blocks, but model_config says n_layer=3)"),
        ("extra_tensor", "is damaged (it has a tensor 'transformer.h.0.attn.extra' that a model of its model_config lacks)"),
    ] for entry, args, suffix in [
        ("sample", "--device=cpu --out_dir={root}/bad/", ""),
        ("score", "--device=cpu --input={root}/held.txt --out_dir={root}/bad/", ""),
        ("export", "--merged_ckpt={root}/docs/m.pt --out_dir={root}/bad/", ""), ("train", R, ""),
        ("quantize", "--mode int8 --out {root}/docs/q.pt --ckpt {root}/bad/", "/ckpt.pt"),
        ("train-init", T + " --init_from={root}/bad/", "/ckpt.pt"),
        ("train-teacher", T + " --teacher={root}/bad/", "/ckpt.pt")]],
    *[(f"{name} {entry}", entry.split("-")[0], args + name + suffix, fragment) for name, fragment in [
        ("no_model", "is damaged ('model' is not a dict of tensors)"),
        ("truncated", "is corrupt or truncated"), ("empty", "is empty (0 bytes)"), ("random", "is corrupt or truncated"),
        ("unsafe", "was refused as unsafe: it asks to import posix.system"), ("foreign", "is not a sologpt checkpoint of format 1"),
        ("version_2", "is not a sologpt checkpoint of format 1"),
    ] for entry, args, suffix in [("sample", "--device=cpu --out_dir={root}/bad/", ""), ("train", R, ""),
                                  ("quantize", "--mode int8 --out {root}/docs/q.pt --ckpt {root}/bad/", "/ckpt.pt")]],
    ("no optimizer", "train", R + "no_optimizer", "is damaged (the training state has no 'optimizer')"),
    ("bad moment", "train", R + "bad_moment", "is damaged (the optimizer's exp_avg of parameter 0 has shape (3,)"),
    ("no rng", "train", R + "no_rng", "is damaged (the training state has no 'rng')"),
    ("bad rng", "train", R + "bad_rng", "is damaged (the random generators' states are missing)"),
    ("bad iter", "train", R + "bad_iter", "is damaged (iter_num='2' has the wrong type)"),
    ("no meta for sample", "sample", "--device=cpu --out_dir={root}/bad/nometa", "no meta.json beside"),
    *[(f"{name} {entry}", entry, args + name, fragment) for names, readers in [
        ([("lora_settings", "the adapter is damaged (its settings, base description or tensors are missing"),
          ("lora_tensor", "adapter file is inconsistent at transformer.h.0.attn.c_attn.lora_A")],
         [("sample", "--device=cpu --out_dir={root}/bad/"), ("export", "--merged_ckpt={root}/docs/m.pt --out_dir={root}/bad/"),
          ("train", R.replace("--init_from=resume", "--init_from=resume --lora_rank=2"))]),
        ([("lora_base", "holds LoRA adapters for the base {root}/gone.pt, which cannot be loaded")],
         [("sample", "--device=cpu --out_dir={root}/bad/"), ("export", "--merged_ckpt={root}/docs/m.pt --out_dir={root}/bad/")]),
        ([("lora_base", "the run being resumed started from {root}/gone.pt, which is gone")],
         [("train", R.replace("--init_from=resume", "--init_from=resume --lora_rank=2"))]),
        ([("q_scale", "is damaged (the tensor transformer.h.0.attn.c_attn.scale is missing)"),
          ("q_shape", "is damaged (transformer.h.0.mlp.c_fc.weight has shape (3, 3)"),
          ("q_mode", "is damaged (quantization=")],
         [("sample", "--device=cpu --out_dir={root}/bad/"), ("score", "--device=cpu --input={root}/held.txt --out_dir={root}/bad/")]),
        ([("cls_head", "is damaged (cls_head.weight has shape (3, 3)"),
          ("cls_classes", "is damaged (model_config n_classes=-1 is below 0)")],
         [("sample", "--device=cpu --out_dir={root}/bad/"),
          ("train", R.replace("--init_from=resume", "--init_from=resume --task=classify --dataset=cls"))]),
    ] for name, fragment in names for entry, args in readers],
    # -- sample.py
    ("sample no ckpt", "sample", "--out_dir={root}/nothing", "--out_dir={root}/nothing does not exist"),
    ("sample temperature", "sample", "--out_dir={run} --temperature=-1", "need temperature >= 0, 0 < top_p <= 1"),
    ("sample nan temperature", "sample", "--out_dir={run} --temperature=nan", "temperature=nan in flag"),
    ("sample top_p", "sample", "--out_dir={run} --top_p=0", "0 < top_p <= 1"),
    ("sample top_k", "sample", "--out_dir={run} --top_k=0", "top_k >= 1 (or None)"),
    ("sample count", "sample", "--out_dir={run} --num_samples=0", "must be at least 1"),
    ("sample stream", "sample", "--out_dir={run} --stream=maybe", "stream='maybe' is unknown"),
    ("sample prompt file", "sample", "--device=cpu --out_dir={run} --start=FILE:{root}/nope.txt", "cannot read the prompt file {root}/nope.txt"),
    ("sample prompts empty", "sample", "--device=cpu --out_dir={run} --prompts={root}/blank.txt", "has no prompts"),
    ("sample prompts jsonl", "sample", "--device=cpu --out_dir={run} --prompts={root}/bad.jsonl", 'bad.jsonl:2 is not a JSON object with a "prompt" field'),
    ("sample unknown char", "sample", "--device=cpu --out_dir={run} --start=€", "vocabulary lacks: '€' (U+20AC)"),
    ("sample classify empty", "sample", "--device=cpu --out_dir={root}/cls --start=", "nothing to classify"),
    # -- tools/score.py
    ("score no input", "score", "--out_dir={run}", "no text to score: pass --input=FILE"),
    ("score missing input", "score", "--out_dir={run} --input={root}/nope.txt", "cannot read --input {root}/nope.txt"),
    ("score latin-1", "score", "--out_dir={run} --input={root}/latin1.txt", "is not UTF-8 text (byte 3 is 0xe9)"),
    ("score one token", "score", "--device=cpu --out_dir={run} --input={root}/one.txt", "scoring needs at least 2"),
    ("score stride", "score", "--device=cpu --out_dir={run} --input={root}/held.txt --stride=1000", "stride=1000 must be between 1 and the model's block_size=32"),
    ("score batch", "score", "--out_dir={run} --input={root}/held.txt --batch_size=0", "batch_size=0 must be at least 1"),
    ("score hf dir", "score", "--input={root}/held.txt --hf_dir={root}/nope", "--hf_dir={root}/nope does not exist"),
    ("score hf json", "score", "--device=cpu --input={root}/held.txt --hf_dir={root}/hf_bad", "holds a config.json that is not valid JSON"),
    ("score hf weights", "score", "--device=cpu --input={root}/held.txt --hf_dir={root}/hf_noweights", "has a Hugging Face config.json but no model.safetensors or pytorch_model.bin"),
    ("score hf zero heads", "score", "--device=cpu --input={root}/held.txt --hf_dir={root}/hf_zero", "n_head=0 is not a positive integer"),
    ("score hf safetensors", "score", "--device=cpu --input={root}/held.txt --hf_dir={root}/hf_badst", "model.safetensors cannot be read"),
    ("score hf bin", "score", "--device=cpu --input={root}/held.txt --hf_dir={root}/hf_badbin", "pytorch_model.bin cannot be read as tensors only"),
    ("score classifier", "score", "--device=cpu --input={root}/held.txt --out_dir={root}/cls", "is a classifier: scoring needs a language model"),
    ("score unknown char", "score", "--device=cpu --input={root}/latin1.txt --ckpt={root}/cls/ckpt.pt", "UTF-8"),
    # -- tools/export.py
    ("export nothing", "export", "--out_dir={run}", "nothing to do: pass --hf_dir=DIR and/or --merged_ckpt=FILE"),
    ("export folder", "export", "--out_dir={run} --hf_dir={root}/no/such/dir", "the folder of {root}/no/such/dir does not exist"),
    ("export quantized", "export", "--ckpt={root}/q/ckpt.pt --hf_dir={root}/docs/hf", "is quantized; export the float checkpoint"),
    ("export classifier", "export", "--out_dir={root}/cls --hf_dir={root}/docs/hf", "a classifier (n_classes > 0) cannot be exported"),
    ("export onto input", "export", "--out_dir={run} --merged_ckpt={run}/ckpt.pt", "is the input checkpoint: pick another file"),
    ("export onto a file", "export", "--out_dir={run} --hf_dir={root}/held.txt", "--hf_dir={root}/held.txt is a file: give a folder"),
    # -- tools/quantize.py
    ("quantize no args", "quantize", "", "the following arguments are required: --ckpt, --mode"),
    ("quantize mode", "quantize", "--ckpt {run}/ckpt.pt --mode int3", "argument --mode: invalid choice: 'int3'"),
    ("quantize group type", "quantize", "--ckpt {run}/ckpt.pt --mode int4 --group_size abc", "argument --group_size: invalid int value: 'abc'"),
    ("quantize group odd", "quantize", "--ckpt {run}/ckpt.pt --mode int4 --group_size 3 --out {root}/docs/q.pt", "group_size=3 must be an even number"),
    ("quantize onto input", "quantize", "--ckpt {run}/ckpt.pt --mode int8 --out {run}/ckpt.pt", "is the input checkpoint"),
    ("quantize folder", "quantize", "--ckpt {run}/ckpt.pt --mode int8 --out {root}/no/q.pt", "the folder of --out {root}/no/q.pt does not exist"),
    ("quantize twice", "quantize", "--ckpt {root}/q/ckpt.pt --mode int8 --out {root}/docs/q.pt", "is already quantized (int8)"),
    ("quantize missing", "quantize", "--ckpt {root}/nope.pt --mode int8", "{root}/nope.pt does not exist"),
    # -- prepare/shakespeare_char.py and prepare/shakespeare.py
    ("char missing input", "prep_char", "--input {root}/nope.txt --data_root {root}/docs", "--input {root}/nope.txt does not exist"),
    ("char input a folder", "prep_char", "--input {root}/docs --data_root {root}/docs", "does not exist (or is not a file)"),
    ("char empty input", "prep_char", "--input {root}/empty.txt --data_root {root}/docs", "train.bin would be empty"),
    ("char latin-1", "prep_char", "--input {root}/latin1.txt --data_root {root}/docs", "is not valid UTF-8: bad byte 0xe9 at byte offset 3"),
    ("char val 0", "prep_char", "--input {root}/held.txt --val_fraction 0", "argument --val_fraction: 0 is not strictly between 0 and 1"),
    ("char val nan", "prep_char", "--input {root}/held.txt --val_fraction nan", "nan is not strictly between 0 and 1"),
    ("char chunk", "prep_char", "--input {root}/held.txt --chunk_bytes 0", "argument --chunk_bytes: 0 is not a positive integer"),
    ("char unknown flag", "prep_char", "--inptu {root}/held.txt", "unrecognized arguments: --inptu"),
    ("bpe no line breaks", "prep_bpe", "--input {root}/one.txt --data_root {root}/docs", "would be empty"),
    ("bpe latin-1", "prep_bpe", "--input {root}/latin1.txt --data_root {root}/docs", "is not valid UTF-8"),
    # -- prepare/text.py
    ("text no inputs", "prep_text", "--name x --data_root {root}/docs", "the following arguments are required: INPUT"),
    ("text no name", "prep_text", "{root}/held.txt", "the following arguments are required: --name"),
    ("text workers", "prep_text", "{root}/held.txt --name x --workers 0", "--workers must be at least 1"),
    ("text near dedup", "prep_text", "{root}/held.txt --name x --near_dedup 2", "argument --near_dedup: 2 is not between 0 and 1"),
    ("text val 1", "prep_text", "{root}/held.txt --name x --val_fraction 1", "1 is not strictly between 0 and 1"),
    ("text word length nan", "prep_text", "{root}/held.txt --name x --min_mean_word_length nan", "nan is not a finite number >= 0"),
    ("text tokenizer", "prep_text", "{root}/held.txt --name x --tokenizer bytes", "argument --tokenizer: invalid choice: 'bytes'"),
    ("text folder empty", "prep_text", "{root}/hf_bad --name x --data_root {root}/docs", "holds no .txt, .md, .jsonl files"),
    ("text missing", "prep_text", "{root}/nope.txt --name x --data_root {root}/docs", "{root}/nope.txt does not exist"),
    ("text binary strict", "prep_text", "{root}/binary.txt --name x --data_root {root}/docs --strict", "has NUL bytes, so it is binary"),
    ("text all removed", "prep_text", "{root}/blank.txt --name x --data_root {root}/docs", "all 1 documents were removed"),
    ("text extra tokens", "prep_text", "{root}/held.txt --name x --data_root {root}/docs --extra_tokens {root}/latin1.txt", "cannot read the extra tokens file"),
    # -- prepare/classify.py
    ("cls missing", "prep_cls", "--input {root}/nope.jsonl --name x --data_root {root}/docs", "{root}/nope.jsonl does not exist"),
    ("cls one class", "prep_cls", "--input {root}/one_class.jsonl --name x --data_root {root}/docs", "has only one class ('a')"),
    ("cls no label", "prep_cls", "--input {root}/no_label.jsonl --name x --data_root {root}/docs", "no_label.jsonl:1 has no label in 'label'"),
    ("cls bad row", "prep_cls", "--input {root}/bad_row.jsonl --name x --data_root {root}/docs", "bad_row.jsonl:2 is not valid JSON"),
    ("cls csv column", "prep_cls", "--input {root}/rows.csv --name x --data_root {root}/docs", "the header has no column 'text'"),
    ("cls val fraction", "prep_cls", "--input {root}/rows.jsonl --name x --val_fraction 1.5", "--val_fraction 1.5 is not strictly between 0 and 1"),
    ("cls unseen val", "prep_cls", "--input {root}/rows.jsonl --val_input {root}/unseen_val.jsonl --name x --data_root {root}/docs",
     "the validation rows have labels the training rows lack: ['maybe']"),
    ("cls not jsonl", "prep_cls", "--input {root}/held.txt --name x --data_root {root}/docs", "is neither .jsonl nor .csv"),
    ("cls latin-1", "prep_cls", "--input {root}/latin1.txt --name x --data_root {root}/docs", "is not valid UTF-8"),
    ("cls tokenizer", "prep_cls", "--input {root}/rows.jsonl --name x --tokenizer bytes", "invalid choice: 'bytes'"),
    # -- the benchmarks' arguments
    *[(f"bench {name} flag", f"bench.{name}", "--nope=1", "unrecognized arguments: --nope=1") for name in BENCHES],
    ("bench speed int", "bench.speed", "--steps=abc", "argument --steps: invalid int value: 'abc'"),
    ("bench speed chunked", "bench.speed", "--chunked_loss=-1", "--chunked_loss must be >= 0"),
    ("bench speed recipe target", "bench.speed", "--recipe=config/small.py --target=abc", "argument --target: invalid float value"),
    ("bench memory float", "bench.memory", "--cap_gib=lots", "argument --cap_gib: invalid float value: 'lots'"),
    ("bench memory cuda", "bench.memory", "", "measures CUDA memory: this torch sees no CUDA GPU"),
    ("bench scaling gpus", "bench.scaling", "--gpus 2", "--gpus 2 needs that many GPUs"),
    ("bench generate cuda", "bench.generate", "--device cuda", "--device cuda but this torch sees no CUDA GPU"),
    ("bench generate batch", "bench.generate", "--batch_sizes one", "argument --batch_sizes: invalid int value: 'one'"),
    ("bench quantize ckpt", "bench.quantize", "--ckpt {root}/bad/truncated/ckpt.pt", "is corrupt or truncated"),
    ("bench quantize int", "bench.quantize", "--max_tokens=many", "argument --max_tokens: invalid int value"),
    ("bench loss int", "bench.loss", "--n_layer=x", "argument --n_layer: invalid int value: 'x'"),
    ("bench tokenizer int", "bench.tokenizer_speed", "--mb=x", "argument --mb: invalid int value: 'x'"),
    ("bench curriculum int", "bench.curriculum", "--iters=x", "argument --iters: invalid int value: 'x'"),
    ("bench finetune int", "bench.finetune", "--pretrain_iters=x", "argument --pretrain_iters: invalid int value"),
    ("bench compress int", "bench.compress", "--iters=x", "argument --iters: invalid int value: 'x'"),
]


@pytest.mark.parametrize("case, entry, args, fragment", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_and_changes_nothing(world, capsys, case, entry, args, fragment):
    values = {k: str(v) for k, v in world.items()}
    argv, fragment = shlex.split(args.format(**values)), fragment.format(**values)
    before = snapshot(world["root"])
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        ENTRIES[entry](argv)
    err = capsys.readouterr().err
    if isinstance(exc.value.code, str):  # sys.exit("error: ...") prints its message when the script exits
        err, code = exc.value.code, 1
    else:
        code = exc.value.code
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith("warning: ")]
    assert code not in (0, None), err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert fragment in lines[0], lines[0]
    assert "Traceback" not in err
    assert snapshot(world["root"]) == before  # nothing the user had changed, nothing new written
    assert not (world["root"] / "PWNED").exists()  # the unsafe pickle never ran
