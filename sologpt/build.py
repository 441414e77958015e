"""How train.py assembles a run, once, before the first step. Every feature is decided here and becomes a module
swap, a wrapper, a batch source or an evaluation, so the training loop itself names none of them.

1. build_model: the start point - new weights ("scratch"), the checkpoint being resumed, a Hugging Face GPT-2
   directory, or another run's checkpoint file (its weights, with a fresh optimizer and schedule) - then the
   switches that change which weights exist, train or how they are stored, in this fixed order: task head
   (classify.py, tag.py), freezing (freeze.py), LoRA adapters (lora.py), fake quantization (qat, quantize.py),
   low-precision frozen weights (base_dtype, memory.py), the resumed weights, bf16 trainable weights
   (weights_dtype, galore.py), fp8 matmuls (fp8.py). Checkpoint keys
   never change.
2. loss_model: what the training step calls, forward(x, y, **kw) -> (logits, loss): the model itself, or a
   wrapper that computes the loss chunk by chunk (chunked_loss, chunked_ce.py) or mixes in a teacher's soft labels
   (teacher, distill.py).
3. batch_source: each step's micro-batches: random windows (batches.py), classification rows (classify.py),
   padded conversations with the loss mask (sft.py) or tagged examples (tag.py), or a curriculum (curriculum.py).
4. evaluator: the evaluation that train.py runs every eval_interval steps, returning a dict of metrics.
"""

import json
from pathlib import Path

import torch

from model import GPTConfig
from sologpt import (batches, checkpoint, checks, classify, curriculum, distributed, fp8, galore, lora, memory,
                     quantize, sft, tag)
from sologpt.checkpoint import ARCH_FIELDS
from sologpt.chunked_ce import ChunkedLoss
from sologpt.distill import Distill, load_teacher
from sologpt.distributed import Dist
from sologpt.freeze import count_trainable, freeze

# what the weights of a start point decide, whatever the config says
WEIGHT_FIELDS = ("n_layer", "n_head", "n_embd", "bias", "vocab_pad_multiple", *ARCH_FIELDS)


def build_model(cfg, meta, max_id, ckpt=None, ckpt_path=None):
    """The run's model, on the CPU, and its init_source ("scratch" or the weights it started from). Sets the shape
    fields of cfg from the weights when those fix it. Raises ValueError with a hint."""
    head = dict(n_classes=len(meta["labels"]) if cfg.task == "classify" else 0, cls_pool=cfg.cls_pool,
                n_tags=len(meta["tags"]) if cfg.task == "tag" else 0)
    behaviour = dict(dropout=cfg.dropout, attn_impl=cfg.attn_impl, grad_checkpointing=cfg.grad_checkpointing,
                     residual_bf16=cfg.residual_bf16)  # GPTConfig fields that leave the weights as they are
    init_source = cfg.init_from if ckpt is None else ckpt["init_source"]
    if ckpt is not None and init_source != "scratch":  # those weights fixed the shape, not the config's fields
        adopt_weight_fields(cfg, {key: ckpt["model_config"].get(key, getattr(GPTConfig(), key))
                                  for key in WEIGHT_FIELDS}, ckpt_path)
    elif ckpt is not None:  # the padding rows are no token: a run padded on a GPU ("auto") resumes on the CPU too
        adopt_weight_fields(cfg, {"vocab_pad_multiple": ckpt["model_config"].get("vocab_pad_multiple", 1)}, ckpt_path)
    arch = {key: getattr(cfg, key) for key in ARCH_FIELDS}
    if init_source == "scratch" or (ckpt is not None and "adapter" not in ckpt):
        model = checkpoint.new_model(GPTConfig(
            block_size=cfg.block_size, vocab_size=meta["vocab_size"], n_layer=cfg.n_layer, n_head=cfg.n_head,
            n_embd=cfg.n_embd, bias=cfg.bias, vocab_pad_multiple=cfg.vocab_pad_multiple, **arch, **head, **behaviour))
    else:  # GPT-2 weights or another run's checkpoint (also the frozen base of a LoRA run being resumed)
        model = start_point(cfg, meta, init_source, arch, head, behaviour, resuming=ckpt is not None)
    if max_id >= model.config.vocab_size:
        raise ValueError(f"{cfg.dataset} holds token id {max_id}, beyond the model's vocab_size="
                         f"{model.config.vocab_size}: prepare the data with the model's tokenizer")
    if ckpt is not None:
        checkpoint.check_same_shape(ckpt["model_config"], model.config, ckpt_path,
                                    Path(cfg.data_root) / cfg.dataset / "meta.json")
    freeze(model, cfg.freeze_layers, cfg.freeze_embeddings)
    if cfg.lora_rank:  # resuming: the saved adapters, else new ones
        add_lora(model, cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_targets,
                 adapter=ckpt.get("adapter") if ckpt is not None else None)
    if cfg.qat:
        try:
            quantize.enable_qat(model, cfg.qat, cfg.qat_group_size)  # same parameters and checkpoint keys
        except ValueError as e:
            raise ValueError(f"qat: {e}")
    memory.lower_frozen_weights(model, cfg.base_dtype)  # before loading: a checkpoint holds them lowered already
    if ckpt is not None:
        checkpoint.load_state(model, ckpt["model"], ckpt_path, strict="adapter" not in ckpt)
    galore.lower_weights(model, cfg.weights_dtype)  # bf16 trainable weights (after loading: bf16 -> fp32 -> bf16)
    if cfg.fp8 or cfg.fp8_head:
        fp8.check_fp8_device(cfg.device, "fp8" if cfg.fp8 else "fp8_head")
        fp8.convert_to_fp8(model, head=cfg.fp8_head, blocks=cfg.fp8)  # same parameters and checkpoint keys
    if cfg.freeze_layers or cfg.freeze_embeddings or cfg.lora_rank:
        trainable, total = count_trainable(model)
        print(f"trainable parameters: {trainable:,} of {total:,} ({100 * trainable / total:.2f}%)")
    return model, init_source


def start_point(cfg, meta, source, arch, head, behaviour, resuming):
    """Pretrained weights (a GPT-2 directory or a sologpt checkpoint; checks.resolve made a run folder its ckpt.pt)
    fitted to the run: positions cropped,
    vocabulary grown, a task head added. Refuses a start point that cannot serve this run's data or config."""
    if resuming and not Path(source).exists():
        raise ValueError(f"the run being resumed started from {source}, which is gone: put it back at that path (a "
                         f"LoRA run's checkpoint holds its adapters, not the base they apply to)")
    where = checkpoint.locate(source, "init_from")  # a Hugging Face directory, or a checkpoint file
    if not resuming and where.kind == "hf" and GPTConfig(**arch).modern_options():
        raise ValueError(f"GPT-2 weights have GPT-2's architecture, but the config sets "
                         f"{', '.join(GPTConfig(**arch).modern_options())}: leave those at their defaults")
    if where.kind == "hf" and meta["tokenizer"] != "gpt2":
        raise ValueError(f"GPT-2 weights need GPT-2 tokens, but {cfg.dataset} uses tokenizer "
                         f"{meta['tokenizer']!r}: prepare the text with GPT-2 BPE (e.g. prepare/shakespeare.py)")
    if not resuming and where.kind == "checkpoint":
        check_same_tokenizer(where.path.parent / "meta.json", meta, cfg.dataset)
    model = checkpoint.load_source(source, allow_quantized=False, vocab_pad_multiple=cfg.vocab_pad_multiple,
                                   **behaviour)
    checkpoint.fit(model, source, block_size=cfg.block_size, vocab_size=meta["vocab_size"], **head)
    for key in ARCH_FIELDS:  # an option set in the config that the start point's weights do not have
        if arch[key] != getattr(GPTConfig(), key) and arch[key] != getattr(model.config, key):
            raise ValueError(f"{source} has {key}={getattr(model.config, key)!r}, but the config sets "
                             f"{key}={arch[key]!r}: the weights fix the architecture, so drop --{key}")
    adopt_weight_fields(cfg, {key: getattr(model.config, key) for key in WEIGHT_FIELDS}, source)
    if not resuming and (cfg.lora_rank or cfg.freeze_embeddings) and getattr(model, "vocab_grown_from", None):
        print("warning: the new vocabulary rows start at the mean embedding and stay frozen with lora_rank or "
              "freeze_embeddings: domain tokens will not be learned (train the embeddings, or drop the new tokens)")
    if not resuming:
        print(f"starting from {source}: n_layer={cfg.n_layer} n_head={cfg.n_head} n_embd={cfg.n_embd}"
              f", vocab_size={model.config.vocab_size}")
    return model


def adopt_weight_fields(cfg, weights, source):
    """Record in cfg the shape and architecture the start point's weights have (they decide, not the config); a
    field the config set to another value than its default gets one warning line naming the value used."""
    default = type(cfg)()
    unset = {key: {getattr(default, key)} for key in weights}
    unset.get("vocab_pad_multiple", set()).add(checks.resolve_vocab_pad("auto", cfg.device.split(":")[0]))
    for key, value in weights.items():
        if getattr(cfg, key) != value and getattr(cfg, key) not in unset[key]:  # "auto" resolved counts as unset
            print(f"warning: {key}={getattr(cfg, key)!r} is ignored: the weights of {source} have {key}={value!r}, "
                  f"which this run uses")
        setattr(cfg, key, value)


def check_same_tokenizer(meta_path, meta, dataset):
    """Fine-tuning another run's checkpoint: its token ids must mean the same text as the new dataset's. A character
    table may extend the checkpoint's (prepare/instruct.py and prepare/tags.py --vocab_from append new characters):
    the old ids keep their meaning and the embedding grows."""
    if not meta_path.is_file():
        return  # nothing to compare (a checkpoint copied without its meta.json)
    src = json.loads(meta_path.read_text(encoding="utf-8"))
    for key in ("tokenizer", "chars", "extra_tokens"):
        extends = key == "chars" and isinstance(src.get(key), str) and str(meta.get(key)).startswith(src[key])
        if src.get(key) != meta.get(key) and not extends:
            raise ValueError(f"{meta_path.parent} was trained with another tokenizer than {dataset} ({key} differs): "
                             f"token ids would mean other text; prepare {dataset} with the checkpoint's tokenizer")


def add_lora(model, rank, alpha, dropout, targets, adapter=None):
    """LoRA adapters on the target layers (or those of a saved adapter, to resume); every other weight freezes,
    except a classification or tagging head, which is new and must learn. Returns the adapted layer names."""
    names = lora.load_adapter(model, adapter) if adapter is not None else \
        lora.apply_lora(model, rank, alpha, dropout, targets)
    if model.config.n_classes > 0:
        model.cls_head.requires_grad_(True)
    if model.config.n_tags > 0:
        model.tag_head.requires_grad_(True)
    return names


def loss_model(model, cfg):
    """What the training step calls: forward(x, y, **kw) -> (logits, loss)."""
    if cfg.chunked_loss:  # the output layer and loss a chunk of tokens at a time
        return ChunkedLoss(model, cfg.chunked_loss)
    if cfg.teacher:  # the student also learns the teacher's soft labels
        teacher = load_teacher(cfg.teacher, cfg.device, model.config.vocab_size, cfg.block_size)
        return Distill(model, teacher, cfg.distill_alpha, cfg.distill_temperature)
    return model


def batch_source(cfg, data, d=Dist()):
    """The source of each step's micro-batches (this rank's share of them). Its generator draws them, seeded alike
    on every rank; its state is saved in checkpoints."""
    generator = torch.Generator().manual_seed(cfg.seed)
    train = data.splits["train"]
    if cfg.task == "classify":
        return classify.Rows(train, cfg, generator, d)
    if cfg.task == "sft":  # conversations, padded, with the loss mask in the targets
        return sft.source(data.splits, cfg, generator, d)
    if cfg.task == "tag":
        return tag.source(train, cfg, generator, d)
    if cfg.seq_warmup_iters:
        return curriculum.SeqWarmup(train, cfg, generator, d)
    if cfg.curriculum == "unigram":
        return curriculum.EasyFirstSource(train, cfg, generator, data.meta["vocab_size"], d)
    return batches.Windows(train, cfg, generator, d)


def evaluator(cfg, data, d=Dist(), raw_model=None):
    """evaluate(model, ctx) -> {"train_loss": ..., "val_loss": ..., ...}: loss and perplexity over eval_iters
    batches per split for a language model; loss, accuracy and macro-F1 for a classifier; response-token loss and
    exact match for sft (raw_model: the unwrapped model, which generates the answers); loss and per-class
    precision, recall and F1 for a tagger. With DDP each rank takes a share of the batches; FSDP's forward is a
    collective, so there every rank runs every batch (the same numbers)."""
    fsdp = distributed.fsdp(cfg, d)
    if fsdp:
        d = Dist()
    if cfg.task == "classify":
        n_classes = len(data.meta["labels"])
        return lambda model, ctx: classify.evaluate_splits(model, data.splits, cfg, ctx, n_classes, d)
    if cfg.task == "sft":  # FSDP: answers generated with the model's forward, row by row
        return lambda model, ctx: sft.evaluate(model, raw_model, data.splits, cfg, ctx, data.meta, data.enc, d,
                                               batched=not fsdp)
    if cfg.task == "tag":
        return lambda model, ctx: tag.evaluate_splits(model, data.splits, cfg, ctx, data.meta["tags"], d)
    return lambda model, ctx: batches.estimate_loss(model, data.splits, cfg, ctx, d)
