"""The checkpoint format, in one place: what out_dir/ckpt.pt holds, how it is written (atomically) and read
(weights_only), what a resumed run restores from it, and load_model, which rebuilds the model of every kind.

    {format_version, model_config, model, optimizer, scaler, iter_num, init_source, best_val_loss,
     last_eval_iter, skipped_steps, elapsed_s, train_config, rng: {torch, cuda, batches}}

Tensors and plain values only, so torch.load(weights_only=True) reads it: no pickled code is ever run. Kinds:
- full: "model" is the whole state dict (model_config's n_classes > 0: a classifier, sologpt/classify.py; n_tags > 0:
  a tagger, sologpt/tag.py);
- LoRA run: "model" holds only the trainable tensors that are not adapters (e.g. a classification head), "adapter"
  the adapter file's contents (sologpt/lora.py); the frozen base is rebuilt from "init_source";
- low-precision base (train_config base_dtype bf16/int8): frozen block weights saved as they were trained;
- quantized (tools/quantize.py): "quantization" = {mode, group_size, skip, head}, no optimizer or RNG state.
"""

import dataclasses
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from model import GPT, GPTConfig
from sologpt import distributed, hf_gpt2, lora, memory, quantize, tokenizer
from sologpt.classify import Classifier, set_classifier
from sologpt.distributed import Dist
from sologpt.freeze import freeze
from sologpt.tag import Tagger, set_tagger

FORMAT_VERSION = 1  # bump when the layout changes

# train_config fields a resumed run must share with its checkpoint: they decide which tensors exist, train, or how
# they are stored
RESUME_FIXED = ("task", "cls_pool", "sft_loss", "freeze_layers", "freeze_embeddings", "lora_rank", "lora_alpha",
                "lora_targets", "optim_state", "base_dtype", "qat", "qat_group_size", "fp8", "fp8_head", "optimizer")
ARCH_FIELDS = ("rope", "norm", "qk_norm", "mlp_act", "tie_embeddings")  # model.py's architecture options
SHAPE_FIELDS = ("block_size", "vocab_size", "n_layer", "n_head", "n_embd", "bias", *ARCH_FIELDS)
# GPTConfig fields left out of a checkpoint while at their defaults, so a plain model's checkpoint stays readable by
# versions that predate them (GPTConfig fills them back in)
OPTIONAL_FIELDS = ("rope", "rope_base", "norm", "qk_norm", "mlp_act", "tie_embeddings", "grad_checkpointing",
                   "residual_bf16", "n_tags")
RESUME_ONLY_KEYS = ("optimizer", "scaler", "rng")  # training state, which a quantized file drops


# ---- writing and reading ----------------------------------------------------------------------------------------

def save(path, state):
    """Write to a temporary file in the same folder, fsync, rename over the old file, fsync the folder: a crash or a
    full disk mid-write leaves the previous checkpoint untouched, and a completed save survives a power cut."""
    _atomic_write(Path(path), lambda f: torch.save(state, f))


def write_json(path, obj):
    """A JSON file (config.json, meta.json) written as atomically as a checkpoint."""
    text = json.dumps(obj, indent=2, ensure_ascii=False) + "\n"
    _atomic_write(Path(path), lambda f: f.write(text.encode("utf-8")))


def _atomic_write(path, write):
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fd = os.open(path.parent, os.O_RDONLY)  # the rename itself is durable only once the folder is synced
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read(path):
    """A sologpt checkpoint dict, read with weights_only=True (tensors and plain values, no code); ValueError with a
    hint when the file is missing, damaged or not a checkpoint of this format."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path} does not exist: train first (python train.py ...) or check --out_dir")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, bad pickle opcode, ...: all mean the file is damaged
        reason = (str(e).splitlines() or [""])[0][:120]
        raise ValueError(f"{path} is corrupt or truncated ({type(e).__name__}: {reason}): "
                         f"restore it from a backup or start a new run")
    if not isinstance(ckpt, dict) or ckpt.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path} is not a sologpt checkpoint of format {FORMAT_VERSION}")
    return ckpt


def model_config(model):
    """The model's config as a checkpoint stores it (OPTIONAL_FIELDS left out while at their defaults)."""
    d, default = dataclasses.asdict(model.config), GPTConfig()
    return {k: v for k, v in d.items() if not (k in OPTIONAL_FIELDS and v == getattr(default, k))}


# ---- training state: what a resumed run needs to continue exactly -------------------------------------------------

@dataclass
class Progress:
    """Where a run stands; saved in every checkpoint."""
    iter_num: int = 0  # optimizer steps done
    best_val_loss: float = math.inf
    last_eval_iter: int = -1  # the step of the last evaluation, so a resumed run does not repeat or skip one
    elapsed_s: float = 0.0  # seconds of training before this process (time_s in metrics.jsonl continues)


def training_state(model, optimizer, scaler, batch_gen, progress, cfg, init_source, t_start, d=Dist()):
    """The checkpoint dict of a training run: tensors and plain values only. A LoRA run saves its adapters and
    other trainable tensors; its frozen base is rebuilt from init_source. Under FSDP every rank must call it (the
    full state is gathered to rank 0, which alone writes it)."""
    state = {
        "format_version": FORMAT_VERSION,
        "model_config": model_config(model),
        "model": distributed.model_state(model, cfg, d),
        "optimizer": distributed.optimizer_state(model, optimizer, cfg, d),
        "world_size": d.world,  # ranks that trained it: a resume with another number is not bit-exact
        "scaler": scaler.state_dict(),
        "iter_num": progress.iter_num,
        "init_source": init_source,  # "scratch", or the GPT-2 directory or checkpoint the run started from
        "best_val_loss": progress.best_val_loss,
        "last_eval_iter": progress.last_eval_iter,
        "skipped_steps": scaler.skipped_steps,
        "elapsed_s": time.time() - t_start,
        "train_config": dataclasses.asdict(cfg),
        "rng": {
            "torch": torch.get_rng_state(),
            # several ranks: each drew alike on its own GPU, so rank 0's device stands for all
            "cuda": ([] if not cfg.device.startswith("cuda") else torch.cuda.get_rng_state_all() if d.world == 1
                     else [torch.cuda.get_rng_state()]),
            "batches": batch_gen.get_state(),
        },
    }
    if cfg.lora_rank:
        state["adapter"] = lora.adapter_checkpoint(model, base_info={"init_source": init_source})
        state["model"] = trainable_state(model)
    return state


def trainable_state(model):
    """The tensors a LoRA run saves besides its adapters: the other trainable ones (e.g. a classification head)."""
    return {name: p.detach() for name, p in model.named_parameters() if p.requires_grad and ".lora_" not in name}


def check_resume(ckpt, cfg, path):
    """The switches that decide which tensors exist or train must be what the checkpoint's run had."""
    saved = ckpt["train_config"]
    for key in RESUME_FIXED:
        was = saved.get(key, getattr(type(cfg)(), key))  # a field newer than the checkpoint: its default
        if was != getattr(cfg, key):
            raise ValueError(f"{path} was trained with {key}={was!r}, not {getattr(cfg, key)!r}: "
                             f"resume with --{key}={was!r}")


def restore(ckpt, model, optimizer, scaler, batch_gen, cfg, d=Dist()):
    """Put a resumed run's optimizer, loss scaler and random generators back as they were; returns its Progress."""
    distributed.load_optimizer_state(model, optimizer, ckpt["optimizer"], cfg, d)
    if ckpt.get("world_size", 1) != d.world:
        print(f"note: the checkpoint was trained on {ckpt.get('world_size', 1)} rank(s), this run has {d.world}: the "
              f"same batches and schedule, but sums in another order, so not bit-exact")
    for group in optimizer.param_groups:  # the saved groups may come from a run with or without CUDA graphs
        group["lr"] = float(group["lr"])
        group["capturable"] = cfg.cuda_graphs
    if ckpt["scaler"]:  # empty when the checkpoint's run did not use float16
        scaler.load_state_dict(ckpt["scaler"])
    scaler.skipped_steps = ckpt.get("skipped_steps", 0)  # absent in checkpoints of earlier versions
    torch.set_rng_state(ckpt["rng"]["torch"])
    if cfg.device.startswith("cuda") and ckpt["rng"]["cuda"]:
        if d.world == 1:
            torch.cuda.set_rng_state_all(ckpt["rng"]["cuda"])
        else:
            torch.cuda.set_rng_state(ckpt["rng"]["cuda"][0])
    batch_gen.set_state(ckpt["rng"]["batches"])
    return Progress(ckpt["iter_num"], ckpt["best_val_loss"], ckpt["last_eval_iter"], ckpt["elapsed_s"])


def check_same_shape(ckpt_config, config, path):
    """Resuming: the checkpoint's model must have the shape the config (and the data) ask for."""
    if ckpt_config["vocab_size"] != config.vocab_size:
        raise ValueError(f"{path} holds a model for {ckpt_config['vocab_size']} tokens but the dataset's meta.json "
                         f"says {config.vocab_size}: resume on the dataset the checkpoint was trained on")
    for key in SHAPE_FIELDS:
        saved = ckpt_config.get(key, getattr(GPTConfig(), key))  # a field newer than the checkpoint: its default
        if saved != getattr(config, key):
            raise ValueError(f"{path} holds a model with {key}={saved!r} but the config asks for "
                             f"{key}={getattr(config, key)!r}: set --{key}={saved!r} or use another out_dir")
    saved = GPTConfig(**ckpt_config)
    if saved.padded_vocab_size != config.padded_vocab_size:
        raise ValueError(f"{path} holds an embedding of {saved.padded_vocab_size} rows (vocab_pad_multiple="
                         f"{saved.vocab_pad_multiple}) but the config makes {config.padded_vocab_size}: set "
                         f"--vocab_pad_multiple={saved.vocab_pad_multiple} or use another out_dir")


# ---- the model of any checkpoint ----------------------------------------------------------------------------------

def new_model(config):
    """An untrained model of this config: a GPT, a classifier when config.n_classes > 0, a tagger when n_tags > 0."""
    return (Classifier if config.n_classes > 0 else Tagger if config.n_tags > 0 else GPT)(config)


def load_model(ckpt, path="checkpoint", merge=True, **overrides):
    """A model from any sologpt checkpoint dict: full, classifier, LoRA (base rebuilt from its start point, adapter
    applied and, with merge, folded in), low-precision base, or quantized. overrides replace saved GPTConfig fields
    that leave the weights as they are (dropout, attn_impl, grad_checkpointing, residual_bf16). Raises ValueError
    with a hint."""
    config = {**ckpt["model_config"], **{k: v for k, v in overrides.items() if v is not None}}
    if "adapter" in ckpt:
        return _load_lora_run(ckpt, config, path, merge)
    model = new_model(GPTConfig(**config))
    if "quantization" in ckpt:  # rebuild the quantized layers (the module types its tensors belong to), then load
        info = ckpt["quantization"]
        skip = tuple(info.get("skip", ()))
        if not info.get("head"):  # written before untied heads were quantized: the head stayed float
            skip += ("lm_head",)
        quantize.quantize_model(model, info["mode"], info["group_size"] or 128, skip)
        model.load_state_dict(ckpt["model"])
        return model
    tc = ckpt.get("train_config", {})
    if tc.get("base_dtype", "fp32") != "fp32":  # frozen layers were saved in bf16 / int8: rebuild, load, then float
        freeze(model, tc.get("freeze_layers", 0), tc.get("freeze_embeddings", False))
        memory.lower_frozen_weights(model, tc["base_dtype"])
        model.load_state_dict(ckpt["model"])
        return memory.restore_float(model)
    model.load_state_dict(ckpt["model"])
    return model


def _load_lora_run(ckpt, config, path, merge):
    source = ckpt["init_source"]
    behaviour = {k: config.get(k) for k in ("dropout", "attn_impl", "grad_checkpointing", "residual_bf16")}
    try:
        base = load_source(source, allow_quantized=False, vocab_pad_multiple=config["vocab_pad_multiple"], **behaviour)
        fit(base, source, block_size=config["block_size"], vocab_size=config["vocab_size"],
            n_classes=config["n_classes"], cls_pool=config["cls_pool"], n_tags=config.get("n_tags", 0))
    except ValueError as e:
        raise ValueError(f"{path} holds LoRA adapters for the base {source}, which cannot be loaded: {e}")
    lora.load_adapter(base, ckpt["adapter"])
    missing = set(ckpt["model"]) - set(base.state_dict())
    if missing:
        raise ValueError(f"{path} has tensors the base lacks: {sorted(missing)[:3]}")
    base.load_state_dict(ckpt["model"], strict=False)  # the trainable non-adapter tensors (e.g. the head)
    if merge:
        lora.merge_lora(base)
    return base


def load_with_meta(path, also=()):
    """(model, meta.json dict) of a checkpoint file, for the tools that read text (sample.py, tools/score.py): the
    meta.json beside it, in the folders of `also`, or in the dataset folder its train_config names."""
    ckpt = read(path)
    model = load_model(ckpt, path)
    return model, tokenizer.load_meta(tokenizer.find_meta(path, ckpt, also))


def load_source(source, allow_quantized=True, vocab_pad_multiple=None, **overrides):
    """The model of a start point: a Hugging Face GPT-2 directory or a sologpt checkpoint file. overrides as in
    load_model; vocab_pad_multiple applies to a GPT-2 directory (a checkpoint keeps its own)."""
    overrides = {k: v for k, v in overrides.items() if v is not None}
    if Path(source).is_dir():
        pad = {} if vocab_pad_multiple is None else {"vocab_pad_multiple": vocab_pad_multiple}
        return hf_gpt2.load(source, **overrides, **pad)
    ckpt = read(source)
    if "quantization" in ckpt and not allow_quantized:
        raise ValueError(f"{source} is quantized ({ckpt['quantization']['mode']}): start training from the "
                         f"float checkpoint it came from")
    return load_model(ckpt, source, **overrides)


def fit(model, source, block_size=None, vocab_size=None, n_classes=0, cls_pool="last", n_tags=0):
    """Fit a start point to a run: crop its positions to block_size, grow its vocabulary to vocab_size (domain
    tokens; new rows start at the mean), and put a new classification or tagging head on when the run asks for
    classes or tags the start point lacks. Raises ValueError with a hint."""
    if model.config.n_classes > 0 and n_classes == 0:
        raise ValueError(f"{source} is a classifier (task 'classify'): it cannot continue as a language model")
    if model.config.n_tags > 0 and n_tags == 0:
        raise ValueError(f"{source} is a tagger (task 'tag'): it cannot continue as another kind of model")
    if n_classes > 0 and (model.config.n_classes, model.config.cls_pool) != (n_classes, cls_pool):
        set_classifier(model, n_classes, cls_pool)
    if n_tags > 0 and model.config.n_tags != n_tags:
        set_tagger(model, n_tags)
    if block_size is not None:
        if block_size > model.config.block_size:
            raise ValueError(f"block_size={block_size} is longer than the {model.config.block_size} positions of "
                             f"{source}: lower --block_size")
        model.crop_block_size(block_size)
    if vocab_size is not None and vocab_size > model.config.vocab_size:
        model.vocab_grown_from = model.config.vocab_size
        model.resize_vocab(vocab_size)
    return model


def quantized(ckpt, mode, group_size=128, skip=()):
    """A float checkpoint dict -> the quantized one (tools/quantize.py): the same layout without the training state,
    plus "quantization": {"mode", "group_size", "skip", "head"}."""
    if "quantization" in ckpt:
        raise ValueError(f"the checkpoint is already quantized ({ckpt['quantization']['mode']}): "
                         f"quantize the float checkpoint it came from")
    model = quantize.quantize_model(load_model(ckpt), mode, group_size, skip)  # a LoRA run: merged first
    out = {k: v for k, v in ckpt.items() if k not in RESUME_ONLY_KEYS and k != "adapter"}
    out["model_config"] = model_config(model)
    out["model"] = model.state_dict()
    # "head": True marks files from the version that quantizes an untied lm_head (unless skip names it)
    out["quantization"] = {"mode": mode, "group_size": group_size if mode == "int4" else None, "skip": list(skip),
                           "head": True}
    return out
