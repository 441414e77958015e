"""The checkpoint format, in one place: what out_dir/ckpt.pt holds, how it is written (atomically) and read
(weights_only), what a resumed run restores from it, and load_model, which rebuilds the model of every kind.

    {format_version, model_config, model, optimizer, scaler, iter_num, init_source, best_val_loss, best_iter,
     last_eval_iter, skipped_steps, elapsed_s, guard, train_config, rng: {torch, cuda, batches}}

Tensors and plain values only, so torch.load(weights_only=True) reads it: no pickled code is ever run. Kinds:
- full: "model" is the whole state dict (model_config's n_classes > 0: a classifier, sologpt/classify.py; n_tags > 0:
  a tagger, sologpt/tag.py);
- LoRA run: "model" holds only the trainable tensors that are not adapters (e.g. a classification head), "adapter"
  the adapter file's contents (sologpt/lora.py); the frozen base is rebuilt from "init_source";
- low-precision base (train_config base_dtype bf16/int8/nf4): frozen block weights saved as they were trained;
- quantized (tools/quantize.py): "quantization" = {mode, group_size, skip, head}, no optimizer or RNG state.
"""

import dataclasses
import glob
import json
import math
import os
import pickle
import pickletools
import re
import shutil
import time
import warnings
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
                "lora_targets", "optim_state", "base_dtype", "qat", "qat_group_size", "fp8", "fp8_head", "optimizer",
                "galore_rank", "weights_dtype", "update_in_backward")
ARCH_FIELDS = ("rope", "norm", "qk_norm", "mlp_act", "tie_embeddings")  # model.py's architecture options
SHAPE_FIELDS = ("block_size", "vocab_size", "n_layer", "n_head", "n_embd", "bias", *ARCH_FIELDS)
# GPTConfig fields left out of a checkpoint while at their defaults, so a plain model's checkpoint stays readable by
# versions that predate them (GPTConfig fills them back in)
OPTIONAL_FIELDS = ("rope", "rope_base", "norm", "qk_norm", "mlp_act", "tie_embeddings", "grad_checkpointing",
                   "residual_bf16", "n_tags")
RESUME_ONLY_KEYS = ("optimizer", "scaler", "rng")  # training state, which a quantized file drops
GUARD_KEYS = ("evals_since_best", "rollbacks", "lr_scale", "loss_mean")  # Progress fields saved under "guard"


# ---- writing and reading ----------------------------------------------------------------------------------------

def save(path, state):
    """Write to a temporary file in the same folder, fsync, rename over the old file, fsync the folder: a crash or a
    full disk mid-write leaves the previous checkpoint untouched, and a completed save survives a power cut. A failed
    write raises the OSError behind it (no space, read-only, ...), a Ctrl-C the KeyboardInterrupt."""
    _atomic_write(Path(path), lambda f: torch.save(state, f))


def write_json(path, obj):
    """A JSON file (config.json, meta.json) written as atomically as a checkpoint."""
    write_text(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def write_text(path, text):
    """A text file (metrics.jsonl when a resume cuts it) written as atomically as a checkpoint."""
    _atomic_write(Path(path), lambda f: f.write(text.encode("utf-8")))


def link(src, dst):
    """dst becomes the same file as src (best.pt = ckpt.pt): a hard link, so no second write, or a copy on a
    filesystem without links; published with a rename like every write here, so dst is always whole."""
    def hard_link(tmp):
        try:
            os.link(src, tmp)
        except OSError:
            shutil.copyfile(src, tmp)
    _atomic_write(Path(dst), None, make=hard_link)


def _atomic_write(path, write, make=None):
    # the writer's pid in the temp name: two writers never share one, and a temp file left by a killed writer is
    # recognised (its pid runs no more) and removed after the next successful write of the same file
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        if make is not None:  # the temp file made another way (a link)
            tmp.unlink(missing_ok=True)
            make(tmp)
        else:
            with open(tmp, "wb") as f:
                write(f)
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass
        cause = _root_cause(e)
        if cause is not None and cause is not e:  # torch's zip writer turns a failed write (or a Ctrl-C in one)
            raise cause from None  # into a RuntimeError raised while handling it: raise what really happened
        raise
    fd = os.open(path.parent, os.O_RDONLY)  # the rename itself is durable only once the folder is synced
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    remove_stale_temps(path)


def _root_cause(e):
    """The OSError or KeyboardInterrupt behind an exception (itself, or one it was raised while handling), or None."""
    seen = set()
    while e is not None and id(e) not in seen and not isinstance(e, (OSError, KeyboardInterrupt)):
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return e


def remove_stale_temps(path):
    """Delete the temp files of `path` that no running writer owns: NAME.<pid>.tmp of a pid that is gone (a writer
    killed mid-write), and NAME.tmp (the fixed temp name of earlier versions)."""
    for tmp in [path.with_name(path.name + ".tmp"), *path.parent.glob(glob.escape(path.name) + ".*.tmp")]:
        pid = tmp.name[len(path.name) + 1:-len(".tmp")]
        if not (pid.isdigit() and pid_running(int(pid))):
            try:
                tmp.unlink(missing_ok=True)
            except OSError:
                pass


def pid_running(pid):
    """Whether a process with this id runs on this machine."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        return True
    except OverflowError:
        return False
    return True


def read(path):
    """A sologpt checkpoint dict, read with weights_only=True (tensors and plain values, no code) and checked by
    validate(); ValueError with a hint when the file is missing, empty, damaged, unsafe or not of this format."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path} does not exist: train first (python train.py ...) or check --out_dir")
    ckpt = load_file(path)
    if not isinstance(ckpt, dict) or ckpt.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path} is not a sologpt checkpoint of format {FORMAT_VERSION}")
    validate(ckpt, path)
    return ckpt


def load_file(path):
    """torch.load(path, weights_only=True), its failures as one ValueError line: an empty file, one that asks to run
    code (refused), and a damaged one."""
    if path.stat().st_size == 0:
        raise ValueError(f"{path} is empty (0 bytes): restore it from a backup or start a new run")
    try:
        with warnings.catch_warnings():  # torch warns (several lines) about the pickle protocol of foreign files
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, bad pickle opcode, ...: the file is damaged, unless it asks for code
        code = _code_in(path, e)
        if code:
            raise ValueError(f"{path} was refused as unsafe: it asks to {code}, which could run code; sologpt "
                             f"checkpoints hold only tensors and plain values: never load files you do not trust")
        raise ValueError(f"{path} is corrupt or truncated ({type(e).__name__}: {_first_line(e)}): restore it from a "
                         f"backup or start a new run")


def _code_in(path, error):
    """What code a file that torch.load(weights_only=True) refused asks for ("import posix.system"), or "": its
    message names a GLOBAL that a zip checkpoint's pickle imports; a bare pickle is scanned for the opcodes that
    import or call (without running it). Random or damaged bytes name none."""
    if not isinstance(error, pickle.UnpicklingError):
        return ""
    found = re.search(r"GLOBAL ([\w.]+)", str(error))
    if found:
        return f"import {found.group(1)}"
    with open(path, "rb") as f:
        data = f.read(1 << 20)
    if not data.startswith(b"\x80"):  # a pickle of protocol 2 or later starts with PROTO
        return ""
    try:
        for op, arg, _ in pickletools.genops(data):
            if op.name in ("GLOBAL", "STACK_GLOBAL", "INST", "OBJ", "REDUCE"):
                return "import or call an object"
    except Exception:  # the bytes stop being a pickle: damaged, not code
        pass
    return ""


def _first_line(e):
    return (str(e).splitlines() or [""])[0][:120]


# ---- what a checkpoint must hold ------------------------------------------------------------------------------------

def damaged(path, what):
    return ValueError(f"{path} is damaged ({what}): restore it from a backup or start a new run")


def validate(ckpt, path):
    """The parts every reader needs, of the right types: model_config (a buildable GPTConfig that the embedding's
    shape agrees with), model (tensors), and the kind's own entry (quantization, or adapter + init_source). A
    well-formed file with missing keys or wrong shapes is one ValueError here instead of a KeyError or torch's
    size-mismatch list later. The training state is checked by check_resumable, the tensors by load_state."""
    config = ckpt.get("model_config")
    if not isinstance(config, dict):
        raise damaged(path, "no model_config")
    fields = {f.name: f for f in dataclasses.fields(GPTConfig)}
    for key, value in config.items():
        if key not in fields:
            raise damaged(path, f"model_config has an unknown field {key!r}")
        want = type(fields[key].default)
        if not (type(value) is want or (want is float and type(value) is int)):
            raise damaged(path, f"model_config {key}={value!r} is not a {want.__name__}")
    for key, least in (("block_size", 1), ("vocab_size", 1), ("n_layer", 1), ("n_head", 1), ("n_embd", 1),
                       ("n_classes", 0)):
        if config.get(key, least) < least:
            raise damaged(path, f"model_config {key}={config[key]!r} is below {least}")
    try:
        gpt_config = GPTConfig(**config)
    except ValueError as e:
        raise damaged(path, f"model_config: {e}")
    state = ckpt.get("model")
    if not isinstance(state, dict) or not all(isinstance(k, str) and torch.is_tensor(v) for k, v in state.items()):
        raise damaged(path, "'model' is not a dict of tensors")
    if "adapter" in ckpt:
        if not isinstance(ckpt["adapter"], dict) or not isinstance(ckpt.get("init_source"), str):
            raise damaged(path, "a LoRA run's checkpoint needs its adapter and init_source")
        return  # its "model" holds only the trainable tensors besides the adapters; lora.load_adapter checks the rest
    if "quantization" in ckpt:
        info = ckpt["quantization"]
        if not isinstance(info, dict) or info.get("mode") not in quantize.MODES or \
                not isinstance(info.get("group_size"), (int, type(None))) or \
                not isinstance(info.get("skip", []), (list, tuple)):
            raise damaged(path, f"quantization={info!r} is not {{mode, group_size, skip}}")
    wte = state.get("transformer.wte.weight")  # a cheap check before a model of that config is built
    if wte is None:
        raise damaged(path, "the token embedding transformer.wte.weight is missing")
    if tuple(wte.shape) != (gpt_config.padded_vocab_size, gpt_config.n_embd):
        raise damaged(path, f"transformer.wte.weight has shape {tuple(wte.shape)}, but model_config makes "
                            f"{(gpt_config.padded_vocab_size, gpt_config.n_embd)}")
    blocks = {k.split(".")[2] for k in state if k.startswith("transformer.h.")}
    if blocks != {str(i) for i in range(gpt_config.n_layer)}:
        raise damaged(path, f"it holds {len(blocks)} blocks, but model_config says n_layer={gpt_config.n_layer}")


# the training state a resume reads, and the types it must have
RESUME_STATE = {"optimizer": dict, "scaler": dict, "rng": dict, "iter_num": int, "best_val_loss": (int, float),
                "last_eval_iter": int, "elapsed_s": (int, float), "train_config": dict, "init_source": str}


def check_resumable(ckpt, path):
    """A checkpoint a run can continue: the training state of RESUME_STATE, with the random generators' states."""
    if "quantization" in ckpt:
        raise ValueError(f"{path} is quantized ({ckpt['quantization']['mode']}): it holds no training state to resume; "
                         f"resume from the float checkpoint it came from")
    for key, types in RESUME_STATE.items():
        if key not in ckpt:
            raise damaged(path, f"the training state has no {key!r}")
        if not isinstance(ckpt[key], types) or isinstance(ckpt[key], bool):
            raise damaged(path, f"{key}={ckpt[key]!r} has the wrong type")
    rng = ckpt["rng"]
    if not (torch.is_tensor(rng.get("torch")) and torch.is_tensor(rng.get("batches"))
            and isinstance(rng.get("cuda", []), (list, tuple))):
        raise damaged(path, "the random generators' states are missing")
    if not {"state", "param_groups"} <= set(ckpt["optimizer"]) and set(ckpt["optimizer"]) != {"muon", "adamw"}:
        raise damaged(path, "the optimizer state is not a state dict")


def load_state(model, state, path, strict=True):
    """model.load_state_dict(state), after checking the names and shapes against the model: a damaged file is one
    ValueError naming the first tensor that is wrong. strict=False: state may hold a part of the model's tensors."""
    expected = model.state_dict()
    for name, t in state.items():
        if name not in expected:
            raise damaged(path, f"it has a tensor {name!r} that a model of its model_config lacks")
        if tuple(t.shape) != tuple(expected[name].shape):
            raise damaged(path, f"{name} has shape {tuple(t.shape)}, but its model_config makes "
                                f"{tuple(expected[name].shape)}")
    missing = [name for name in expected if name not in state]
    if strict and missing:
        raise damaged(path, f"the tensor {missing[0]} is missing" + (f" (and {len(missing) - 1} more)"
                                                                        if len(missing) > 1 else ""))
    model.load_state_dict(state, strict=strict)


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
    best_iter: int = -1  # the step of the best val loss (-1: unknown, a checkpoint older than this field)
    # the guard's counters (sologpt/guard.py)
    evals_since_best: int = 0  # evaluations since the best val loss (early stopping's patience counts them)
    rollbacks: int = 0  # times the spike guard rolled the run back
    lr_scale: float = 1.0  # the learning rate's factor, lowered by rollbacks with spike_lr_factor < 1
    loss_mean: float = 0.0  # the running mean of the logged losses that spikes are measured against (0: none yet)


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
        "best_iter": progress.best_iter,
        "last_eval_iter": progress.last_eval_iter,
        "skipped_steps": scaler.skipped_steps,
        "elapsed_s": time.time() - t_start,
        "guard": {k: getattr(progress, k) for k in GUARD_KEYS},
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


def restore(ckpt, model, optimizer, scaler, batch_gen, cfg, d=Dist(), path="checkpoint"):
    """Put a resumed run's optimizer, loss scaler and random generators back as they were; returns its Progress.
    A state that does not fit (damaged) is a ValueError, before any step."""
    check_moments(optimizer, ckpt["optimizer"], path)
    try:
        distributed.load_optimizer_state(model, optimizer, ckpt["optimizer"], cfg, d)
        if ckpt["scaler"]:  # empty when the checkpoint's run did not use float16
            scaler.load_state_dict(ckpt["scaler"])
        torch.set_rng_state(ckpt["rng"]["torch"])
        batch_gen.set_state(ckpt["rng"]["batches"])
    except (KeyError, TypeError, RuntimeError) as e:  # torch's loaders, given a state of another shape or type
        raise damaged(path, f"its training state does not load: {type(e).__name__}: {_first_line(e)}")
    if ckpt.get("world_size", 1) != d.world:
        print(f"note: the checkpoint was trained on {ckpt.get('world_size', 1)} rank(s), this run has {d.world}: the "
              f"same batches and schedule, but sums in another order, so not bit-exact")
    for group in optimizer.param_groups:  # the saved groups may come from a run with or without CUDA graphs
        group["lr"] = float(group["lr"])
        group["capturable"] = cfg.cuda_graphs is True
    scaler.skipped_steps = ckpt.get("skipped_steps", 0)  # absent in checkpoints of earlier versions
    if cfg.device.startswith("cuda") and ckpt["rng"]["cuda"]:
        if d.world == 1:
            torch.cuda.set_rng_state_all(ckpt["rng"]["cuda"])
        else:
            torch.cuda.set_rng_state(ckpt["rng"]["cuda"][0])
    return Progress(ckpt["iter_num"], ckpt["best_val_loss"], ckpt["last_eval_iter"], ckpt["elapsed_s"],
                    ckpt.get("best_iter", -1), **ckpt.get("guard", {}))  # absent in checkpoints of earlier versions


def rewind(ckpt, model, optimizer, scaler, cfg, d=Dist()):
    """The spike guard's rollback (sologpt/guard.py): the weights, optimizer, loss scaler and RNG states of a
    training_state dict put back into the live run, in place. The batch generator is left where it stands, past the
    batches that led to the spike, which are so skipped; the run's Progress stays the live one."""
    if "adapter" in ckpt:  # a LoRA run: the adapters, then the other trainable tensors below
        with torch.no_grad():
            for key, t in lora.lora_state_dict(model).items():
                t.copy_(ckpt["adapter"]["adapter"][key])  # state_dict tensors share storage with the parameters
    model.load_state_dict(ckpt["model"], strict="adapter" not in ckpt)
    restore(ckpt, model, optimizer, scaler, torch.Generator(), cfg, d)  # the saved batch state goes to a spare


def check_moments(optimizer, state, path):
    """The saved optimizer state must fit the optimizer: as many parameters, and each moment (AdamW's exp_avg and
    exp_avg_sq, Muon's momentum) of its parameter's shape. torch's loader checks only the counts, so a damaged
    moment would fail inside the first step."""
    if set(state) == {"muon", "adamw"} and hasattr(optimizer, "muon"):
        check_moments(optimizer.muon, state["muon"], path)
        check_moments(optimizer.adamw, state["adamw"], path)
        return
    params = [p for g in optimizer.param_groups for p in g["params"]]
    try:
        ids = [i for g in state["param_groups"] for i in g["params"]]
        moments = state["state"]
    except (KeyError, TypeError):
        raise damaged(path, "its optimizer state is not a state dict")
    if len(ids) != len(params):
        raise ValueError(f"{path} holds optimizer state for {len(ids)} parameters, this run trains {len(params)}: "
                         f"resume with the settings it was trained with")
    for i, p in zip(ids, params):
        if "projection" in moments.get(i, {}):  # GaLore: the moments have the projected shape (sologpt/galore.py)
            continue
        for key, t in moments.get(i, {}).items():
            if key in ("exp_avg", "exp_avg_sq", "momentum_buffer") and tuple(t.shape) != tuple(p.shape):
                raise damaged(path, f"the optimizer's {key} of parameter {i} has shape {tuple(t.shape)}, the "
                                    f"parameter {tuple(p.shape)}")


def check_same_shape(ckpt_config, config, path, meta_path="the dataset's meta.json"):
    """Resuming: the checkpoint's model must have the shape the config (and the data) ask for."""
    if ckpt_config["vocab_size"] != config.vocab_size:
        raise ValueError(f"{path} holds a model for {ckpt_config['vocab_size']} tokens but {meta_path} says "
                         f"vocab_size={config.vocab_size}: resume on the dataset the checkpoint was trained on")
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
        load_state(model, ckpt["model"], path)
        return model
    tc = ckpt.get("train_config", {})
    if tc.get("base_dtype", "fp32") != "fp32":  # frozen layers saved in bf16/int8/nf4: rebuild, load, then float
        freeze(model, tc.get("freeze_layers", 0), tc.get("freeze_embeddings", False))
        memory.lower_frozen_weights(model, tc["base_dtype"])
        load_state(model, ckpt["model"], path)
        return memory.restore_float(model)
    load_state(model, ckpt["model"], path)
    return model


def _load_lora_run(ckpt, config, path, merge):
    source, c = ckpt["init_source"], GPTConfig(**config)
    behaviour = {k: getattr(c, k) for k in ("dropout", "attn_impl", "grad_checkpointing", "residual_bf16")}
    try:
        base = load_source(source, allow_quantized=False, vocab_pad_multiple=c.vocab_pad_multiple, **behaviour)
        fit(base, source, block_size=c.block_size, vocab_size=c.vocab_size, n_classes=c.n_classes, cls_pool=c.cls_pool,
            n_tags=c.n_tags)
    except ValueError as e:
        raise ValueError(f"{path} holds LoRA adapters for the base {source}, which cannot be loaded: {e}")
    try:
        lora.load_adapter(base, ckpt["adapter"])
    except ValueError as e:
        raise ValueError(f"{path}: {e}")
    load_state(base, ckpt["model"], path, strict=False)  # the trainable non-adapter tensors (e.g. the head)
    base_dtype = (ckpt.get("train_config") or {}).get("base_dtype", "fp32")
    if base_dtype != "fp32":  # the adapters learned on the base as training held it (bf16, int8, nf4): round it alike
        memory.lower_frozen_weights(base, base_dtype)
        memory.restore_float(base)
    if merge:
        lora.merge_lora(base)
    return base


def load_with_meta(spec, also=(), flag="--ckpt"):
    """(model, meta.json dict, ModelPath) of any model source, for the tools that read text (sample.py,
    tools/score.py, tools/evaluate.py). A checkpoint's meta.json is the one beside it, in the folders of `also`, or
    in the dataset folder its train_config names; a Hugging Face directory's is its own meta.json (tools/export.py
    writes one) or else GPT-2's tokenizer."""
    ckpt, where = load_checkpoint(spec, flag)
    return load_model(ckpt, where.path), find_tokenizer(ckpt, where, also), where


def find_tokenizer(ckpt, where, also=()):
    """The meta.json dict that decodes a model's token ids (see load_with_meta). A checkpoint made from a Hugging
    Face directory (tools/quantize.py) without a meta.json of its own takes that directory's. Raises
    tokenizer.TokenizerError when there is none."""
    hf_dir = where.path
    if where.kind == "checkpoint":
        try:
            return tokenizer.load_meta(tokenizer.find_meta(where.path, ckpt, also))
        except tokenizer.TokenizerError:
            hf_dir = Path(str(ckpt.get("init_source") or "scratch"))
            if ckpt.get("train_config") or not hf_dir.is_dir():  # trained, or not made from a directory
                raise
    own = hf_dir / "meta.json"
    return tokenizer.load_meta(own) if own.is_file() else tokenizer.gpt2_meta()


def load_source(source, allow_quantized=True, vocab_pad_multiple=None, flag="init_from", **overrides):
    """The model of a start point (init_from, teacher, a LoRA run's base): a run folder, a sologpt checkpoint file
    or a Hugging Face GPT-2 directory (see locate). overrides as in load_model; vocab_pad_multiple applies to a GPT-2
    directory (a checkpoint keeps its own)."""
    overrides = {k: v for k, v in overrides.items() if v is not None}
    where = locate(source, flag)
    if where.kind == "hf":
        pad = {} if vocab_pad_multiple is None else {"vocab_pad_multiple": vocab_pad_multiple}
        return hf_gpt2.load(where.path, **overrides, **pad)
    ckpt = read(where.path)
    if "quantization" in ckpt and not allow_quantized:
        raise ValueError(f"{where.path} is quantized ({ckpt['quantization']['mode']}): start training from the "
                         f"float checkpoint it came from")
    return load_model(ckpt, where.path, **overrides)


# ---- where a model lives: a run folder, a checkpoint file or a Hugging Face directory ----------------------------

HF_WEIGHTS = ("model.safetensors", "pytorch_model.bin")


@dataclass(frozen=True)
class ModelPath:
    """What locate() found: kind "checkpoint" (a sologpt checkpoint file, or a run folder's ckpt.pt) or "hf" (a
    Hugging Face GPT-2 directory), and path: that file or that directory."""
    kind: str
    path: Path


def locate(spec, flag="--ckpt"):
    """Every place that takes a model (init_from, teacher, the tools' --out_dir and --ckpt) asks here what `spec`
    is, by what is inside it, not by its name:

    - a folder holding ckpt.pt: a run's out_dir; its ckpt.pt is the model (meta.json lies beside it);
    - a folder holding config.json (transformers' keys) and model.safetensors or pytorch_model.bin: Hugging Face;
    - a file that torch.save wrote (a zip archive, or the legacy pickle format): a sologpt checkpoint.

    Anything else raises ValueError with one line naming what was found there (flag names the setting)."""
    path, where = Path(spec), f"{flag}={spec}"
    hint = "give a run folder (out_dir), a checkpoint file (e.g. out/ckpt.pt) or a Hugging Face GPT-2 directory"
    if not str(spec) or not path.exists():
        raise ValueError(f"{where} does not exist: {hint}")
    if path.is_file():
        found = _file_kind(path)
        if found is None:
            return ModelPath("checkpoint", path)
        raise ValueError(f"{where} is {found}: {hint}")
    if (path / "ckpt.pt").is_file():
        return ModelPath("checkpoint", path / "ckpt.pt")
    config = _json_or_none(path / "config.json")
    if config is None and (path / "config.json").is_file():
        raise ValueError(f"{where} holds a config.json that is not valid JSON (UTF-8): repair or re-export it")
    if config is not None and ("model_type" in config or "n_positions" in config):  # what transformers writes
        if any((path / name).is_file() for name in HF_WEIGHTS):
            return ModelPath("hf", path)
        sharded = any(path.glob("*.index.json"))
        raise ValueError(f"{where} has a Hugging Face config.json but no model.safetensors or pytorch_model.bin"
                         + (": sharded weights do not load here; save them as one file (save_pretrained with a "
                            "larger max_shard_size)" if sharded else ": copy the weights file beside it"))
    if config is not None and "init_from" in config and "out_dir" in config:  # train.py's config.json
        last = (": it holds last.pt, an interrupted run's resume point; pass that file, or resume the run"
                if (path / "last.pt").is_file() else ": the run has not saved one yet (it does at its first "
                                                     "evaluation), or the file was moved")
        raise ValueError(f"{where} is a sologpt run folder without ckpt.pt{last}")
    names = sorted(p.name for p in path.iterdir())
    held = ", ".join(names[:6]) + (f" and {len(names) - 6} more" if len(names) > 6 else "") if names else "nothing"
    raise ValueError(f"{where} is a folder with neither ckpt.pt (a sologpt run) nor config.json with "
                     f"model.safetensors (a Hugging Face GPT-2 directory); it holds {held}")


def _file_kind(path):
    """What a file that is plainly no checkpoint looks like (for the error message), or None: a file torch.save
    wrote, or one read() must judge (a damaged checkpoint)."""
    with open(path, "rb") as f:
        head = f.read(512)
    if head.startswith(b"PK\x03\x04") or head[:1] == b"\x80":  # torch.save's zip archive / legacy pickle
        return None
    if len(head) > 8 and head[8:9] == b"{" and path.suffix == ".safetensors":
        return f"a safetensors weights file: give the folder that holds it with its config.json ({path.parent})"
    if path.name == "config.json":
        return f"a config.json: give the folder that holds it ({path.parent})"
    if not head:
        return "empty (0 bytes)"
    try:
        head.decode("utf-8")
        text = b"\0" not in head
    except UnicodeDecodeError as e:  # a character cut by the end of the sample still counts as text
        text = b"\0" not in head and len(head) == 512 and e.start >= len(head) - 3
    return "a text file, not a checkpoint" if text else None


def _json_or_none(path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None


def load_checkpoint(spec, flag="--ckpt"):
    """(checkpoint dict, ModelPath) of any model source: a Hugging Face directory becomes the dict of a full
    checkpoint without training state (from_model), so every tool handles one kind."""
    where = locate(spec, flag)
    if where.kind == "hf":
        return from_model(hf_gpt2.load(where.path), init_source=str(where.path)), where
    return read(where.path), where


def from_model(model, init_source="scratch", **extra):
    """A full checkpoint dict of a model without training state (as tools/export.py --merged_ckpt writes)."""
    return {"format_version": FORMAT_VERSION, "model_config": model_config(model), "model": model.state_dict(),
            "init_source": init_source, "iter_num": 0, "best_val_loss": math.inf, "train_config": {}, **extra}


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
