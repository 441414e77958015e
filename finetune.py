"""Start points and fine-tuning switches for train.py, and loading any sologpt checkpoint for sample.py.

Start points (train.py init_from): "scratch", "resume", a Hugging Face GPT-2 directory, or a sologpt checkpoint
file (e.g. out/ckpt.pt) whose weights start a new run with a fresh optimizer and schedule.
Switches, all off by default: freeze_layers / freeze_embeddings, LoRA adapters (lora.py), a classification head.

Checkpoint kinds that load_model() reads: a full model; a LoRA run, which stores only its adapters (plus any
other trainable tensor, e.g. a classification head) and the start point of its frozen base; a quantized model
(quantize.py).
"""

from pathlib import Path

import torch
import torch.nn as nn

from model import GPT, GPTConfig, read_checkpoint


def is_checkpoint_file(init_from):
    return init_from not in ("scratch", "resume") and Path(init_from).is_file()


def start_model(source, block_size=None, vocab_size=None, **overrides):
    """The weights a run starts from: a GPT-2 directory or a sologpt checkpoint file. Crops the positions to
    block_size, grows the vocabulary to vocab_size (domain tokens; new rows start at the mean), and adds a new
    classification head when overrides ask for n_classes the source lacks. Raises ValueError with a hint."""
    head = {k: overrides.pop(k) for k in ("n_classes", "cls_pool") if k in overrides}
    if Path(source).is_dir():
        model = GPT.from_pretrained(source, **overrides)
    else:
        ckpt = read_checkpoint(source)
        model = load_model(ckpt, source, dropout=overrides.get("dropout"), attn_impl=overrides.get("attn_impl"))
    if head.get("n_classes", 0) > 0 and (model.config.n_classes, model.config.cls_pool) != (
            head["n_classes"], head.get("cls_pool", "last")):
        set_classifier(model, head["n_classes"], head.get("cls_pool", "last"))
    if block_size is not None:
        if block_size > model.config.block_size:
            raise ValueError(f"block_size={block_size} is longer than the {model.config.block_size} positions of "
                             f"{source}: lower --block_size")
        model.crop_block_size(block_size)
    if vocab_size is not None and vocab_size > model.config.vocab_size:
        model.resize_vocab(vocab_size)
    return model


def set_classifier(model, n_classes, cls_pool="last"):
    """Put a fresh classification head on a language model (its lm_head stays, unused, tied to the embedding)."""
    model.config.n_classes, model.config.cls_pool = n_classes, cls_pool
    model.cls_head = nn.Linear(model.config.n_embd, n_classes, device=model.transformer.wte.weight.device)
    model._init_weights(model.cls_head)


def freeze(model, freeze_layers=0, freeze_embeddings=False):
    """Stop gradients for the first freeze_layers blocks and/or the embeddings. With tied weights the token
    embedding is also the output layer, so freeze_embeddings freezes that too. Frozen tensors get no .grad and
    no optimizer state (make_optimizer takes only parameters that require grad), so they stay bit-identical."""
    if freeze_layers > model.config.n_layer:
        raise ValueError(f"freeze_layers={freeze_layers} but the model has {model.config.n_layer} layers")
    for block in model.transformer.h[:freeze_layers]:
        block.requires_grad_(False)
    if freeze_embeddings:
        model.transformer.wte.requires_grad_(False)
        model.transformer.wpe.requires_grad_(False)


def add_lora(model, rank, alpha, dropout, targets, adapter=None):
    """LoRA adapters on the target layers (or those of a saved adapter, to resume); every other weight freezes,
    except a classification head, which is new and must learn. Returns the adapted layer names."""
    import lora
    if adapter is not None:
        names = lora.load_adapter(model, adapter)
    else:
        names = lora.apply_lora(model, rank, alpha, dropout, targets)
    if model.config.n_classes > 0:
        model.cls_head.requires_grad_(True)
    return names


def trainable_report(model):
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total, f"trainable parameters: {trainable:,} of {total:,} ({100 * trainable / total:.2f}%)"


def trainable_state(model):
    """The tensors a LoRA run saves: adapters are in "adapter"; these are the other trainable ones (a head)."""
    return {name: p.detach() for name, p in model.named_parameters() if p.requires_grad and ".lora_" not in name}


def load_model(ckpt, path="checkpoint", dropout=None, attn_impl=None, merge=True):
    """A GPT from any sologpt checkpoint dict: full, LoRA (base rebuilt from its start point, adapter applied and,
    with merge, folded in) or quantized. dropout / attn_impl replace the saved values when given."""
    config = dict(ckpt["model_config"])
    for key, value in (("dropout", dropout), ("attn_impl", attn_impl)):
        if value is not None:
            config[key] = value
    if "quantization" in ckpt:
        import quantize
        return quantize.load_quantized_model({**ckpt, "model_config": config})
    if "adapter" not in ckpt:
        model = GPT(GPTConfig(**config))
        model.load_state_dict(ckpt["model"])
        return model
    import lora
    source = ckpt["init_source"]
    try:
        base = start_model(source, block_size=config["block_size"], vocab_size=config["vocab_size"],
                           dropout=config["dropout"], attn_impl=config["attn_impl"],
                           vocab_pad_multiple=config["vocab_pad_multiple"], n_classes=config["n_classes"],
                           cls_pool=config["cls_pool"])
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

