"""Start points and fine-tuning switches for train.py, and loading any sologpt checkpoint for sample.py.

Start points (train.py init_from): "scratch", "resume", a Hugging Face GPT-2 directory, or a sologpt checkpoint
file (e.g. out/ckpt.pt) whose weights start a new run with a fresh optimizer and schedule.
Switches, all off by default: freeze_layers / freeze_embeddings, LoRA adapters (lora.py), a classification head.

Checkpoint kinds that load_model() reads: a full model; a LoRA run, which stores only its adapters (plus any
other trainable tensor, e.g. a classification head) and the start point of its frozen base; a quantized model
(quantize.py).
"""

from pathlib import Path

import torch.nn as nn

from model import GPT, GPTConfig, read_checkpoint


def is_checkpoint_file(init_from):
    return init_from not in ("scratch", "resume") and Path(init_from).is_file()


def start_model(source, block_size=None, vocab_size=None, allow_quantized=False, **overrides):
    """The weights a run starts from: a GPT-2 directory or a sologpt checkpoint file. Crops the positions to
    block_size, grows the vocabulary to vocab_size (domain tokens; new rows start at the mean), and adds a new
    classification head when overrides ask for n_classes the source lacks. Raises ValueError with a hint."""
    head = {k: overrides.pop(k) for k in ("n_classes", "cls_pool") if k in overrides}
    if Path(source).is_dir():
        model = GPT.from_pretrained(source, **overrides)
    else:
        ckpt = read_checkpoint(source)
        if "quantization" in ckpt and not allow_quantized:
            raise ValueError(f"{source} is quantized ({ckpt['quantization']['mode']}): start training from the "
                             f"float checkpoint it came from")
        model = load_model(ckpt, source, dropout=overrides.get("dropout"), attn_impl=overrides.get("attn_impl"))
    if model.config.n_classes > 0 and head.get("n_classes", 0) == 0:
        raise ValueError(f"{source} is a classifier (task 'classify'): it cannot continue as a language model")
    if head.get("n_classes", 0) > 0 and (model.config.n_classes, model.config.cls_pool) != (
            head["n_classes"], head.get("cls_pool", "last")):
        set_classifier(model, head["n_classes"], head.get("cls_pool", "last"))
    if block_size is not None:
        if block_size > model.config.block_size:
            raise ValueError(f"block_size={block_size} is longer than the {model.config.block_size} positions of "
                             f"{source}: lower --block_size")
        model.crop_block_size(block_size)
    if vocab_size is not None and vocab_size > model.config.vocab_size:
        model.vocab_grown_from = model.config.vocab_size
        model.resize_vocab(vocab_size)
    return model


def set_classifier(model, n_classes, cls_pool="last"):
    """Put a fresh classification head on a language model (its lm_head stays, unused, tied to the embedding)."""
    model.config.n_classes, model.config.cls_pool = n_classes, cls_pool
    model.cls_head = nn.Linear(model.config.n_embd, n_classes, device=model.transformer.wte.weight.device)
    model._init_weights(model.cls_head)


def freeze(model, freeze_layers=0, freeze_embeddings=False):
    """Stop gradients for the first freeze_layers blocks and/or the embeddings. freeze_embeddings freezes the
    output layer too (with tied weights it is the token embedding itself). Frozen tensors get no .grad and
    no optimizer state (make_optimizer takes only parameters that require grad), so they stay bit-identical."""
    if freeze_layers > model.config.n_layer:
        raise ValueError(f"freeze_layers={freeze_layers} but the model has {model.config.n_layer} layers")
    for block in model.transformer.h[:freeze_layers]:
        block.requires_grad_(False)
    if freeze_embeddings:
        model.transformer.wte.requires_grad_(False)
        model.lm_head.requires_grad_(False)  # the same tensor when tied; the output embedding when not
        if "wpe" in model.transformer:  # rotary positions have no weights
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
        tc = ckpt.get("train_config", {})
        if tc.get("base_dtype", "fp32") != "fp32":  # frozen layers were saved in bf16 / int8: rebuild, then float
            import memory
            freeze(model, tc.get("freeze_layers", 0), tc.get("freeze_embeddings", False))
            memory.lower_frozen_weights(model, tc["base_dtype"])
            model.load_state_dict(ckpt["model"])
            memory.restore_float(model)
        else:
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


ARCH_FIELDS = ("rope", "norm", "qk_norm", "mlp_act", "tie_embeddings")  # train.py's modern options (model.py)
SHAPE_FIELDS = ("block_size", "vocab_size", "n_layer", "n_head", "n_embd", "bias", *ARCH_FIELDS)


def check_same_shape(ckpt_config, model_config, path):
    """Resuming: the checkpoint's model must have the shape the config (and the data) ask for."""
    if ckpt_config["vocab_size"] != model_config.vocab_size:
        raise ValueError(f"{path} holds a model for {ckpt_config['vocab_size']} tokens but the dataset's meta.json "
                         f"says {model_config.vocab_size}: resume on the dataset the checkpoint was trained on")
    for key in SHAPE_FIELDS:
        saved = ckpt_config.get(key, getattr(GPTConfig(), key))  # a field newer than the checkpoint: its default
        if saved != getattr(model_config, key):
            raise ValueError(f"{path} holds a model with {key}={saved!r} but the config asks for "
                             f"{key}={getattr(model_config, key)!r}: set --{key}={saved!r} or use another out_dir")
    saved = GPTConfig(**ckpt_config)
    if saved.padded_vocab_size != model_config.padded_vocab_size:
        raise ValueError(f"{path} holds an embedding of {saved.padded_vocab_size} rows (vocab_pad_multiple="
                         f"{saved.vocab_pad_multiple}) but the config makes {model_config.padded_vocab_size}: set "
                         f"--vocab_pad_multiple={saved.vocab_pad_multiple} or use another out_dir")


def check_same_tokenizer(meta_path, meta, dataset):
    """Fine-tuning another run's checkpoint: its token ids must mean the same text as the new dataset's."""
    import json
    if not meta_path.is_file():
        return  # nothing to compare (a checkpoint copied without its meta.json)
    src = json.loads(meta_path.read_text(encoding="utf-8"))
    for key in ("tokenizer", "chars", "extra_tokens"):
        if src.get(key) != meta.get(key):
            raise ValueError(f"{meta_path.parent} was trained with another tokenizer than {dataset} ({key} differs): "
                             f"token ids would mean other text; prepare {dataset} with the checkpoint's tokenizer")


def build_model(cfg, meta, max_id, ckpt=None, ckpt_path=None):
    """train.py's model: new, from a checkpoint being resumed (ckpt), or from pretrained weights; then the
    switches that change which weights train or how they are stored (freeze, LoRA, QAT, base_dtype, gradient
    checkpointing), then the resumed weights. Sets the shape fields of cfg from the weights when those fix it.
    Returns (model on the CPU, init_source). Raises ValueError with a hint."""
    import memory
    head = dict(n_classes=len(meta["labels"]) if cfg.task == "classify" else 0, cls_pool=cfg.cls_pool)
    init_source = cfg.init_from if ckpt is None else ckpt["init_source"]  # "scratch" or the weights it started from
    fixed = ("n_layer", "n_head", "n_embd", "bias", "vocab_pad_multiple", *ARCH_FIELDS)  # what weights decide
    if ckpt is not None and init_source != "scratch":  # those weights fixed the shape, not the config's fields
        for key in fixed:
            setattr(cfg, key, ckpt["model_config"].get(key, getattr(GPTConfig(), key)))
    arch = {key: getattr(cfg, key) for key in ARCH_FIELDS}
    if init_source == "scratch" or (ckpt is not None and "adapter" not in ckpt):
        model = GPT(GPTConfig(block_size=cfg.block_size, vocab_size=meta["vocab_size"], n_layer=cfg.n_layer,
                              n_head=cfg.n_head, n_embd=cfg.n_embd, dropout=cfg.dropout, bias=cfg.bias,
                              attn_impl=cfg.attn_impl, vocab_pad_multiple=cfg.vocab_pad_multiple, **arch, **head))
    else:  # GPT-2 weights or another run's checkpoint (also the frozen base of a LoRA run being resumed)
        if ckpt is None and Path(init_source).is_dir() and GPTConfig(**arch).modern_options():
            raise ValueError(f"GPT-2 weights have GPT-2's architecture, but the config sets "
                             f"{', '.join(GPTConfig(**arch).modern_options())}: leave those at their defaults")
        if Path(init_source).is_dir() and meta["tokenizer"] != "gpt2":
            raise ValueError(f"GPT-2 weights need GPT-2 tokens, but {cfg.dataset} uses tokenizer "
                             f"{meta['tokenizer']!r}: prepare the text with GPT-2 BPE (e.g. prepare/shakespeare.py)")
        if ckpt is None and Path(init_source).is_file():
            check_same_tokenizer(Path(init_source).parent / "meta.json", meta, cfg.dataset)
        model = start_model(init_source, block_size=cfg.block_size, vocab_size=meta["vocab_size"],
                            dropout=cfg.dropout, attn_impl=cfg.attn_impl, vocab_pad_multiple=cfg.vocab_pad_multiple,
                            **head)
        for key in ARCH_FIELDS:  # an option set in the config that the start point's weights do not have
            if arch[key] != getattr(GPTConfig(), key) and arch[key] != getattr(model.config, key):
                raise ValueError(f"{init_source} has {key}={getattr(model.config, key)!r}, but the config sets "
                                 f"{key}={arch[key]!r}: the weights fix the architecture, so drop --{key}")
        for key in fixed:  # record the real shape and architecture
            setattr(cfg, key, getattr(model.config, key))
        if ckpt is None and (cfg.lora_rank or cfg.freeze_embeddings) and getattr(model, "vocab_grown_from", None):
            print("warning: the new vocabulary rows start at the mean embedding and stay frozen with lora_rank or "
                  "freeze_embeddings: domain tokens will not be learned (train the embeddings, or drop the new tokens)")
        if ckpt is None:
            print(f"starting from {init_source}: n_layer={cfg.n_layer} n_head={cfg.n_head} n_embd={cfg.n_embd}"
                  f", vocab_size={model.config.vocab_size}")
    if max_id >= model.config.vocab_size:
        raise ValueError(f"{cfg.dataset} holds token id {max_id}, beyond the model's vocab_size="
                         f"{model.config.vocab_size}: prepare the data with the model's tokenizer")
    if ckpt is not None:
        check_same_shape(ckpt["model_config"], model.config, ckpt_path)
    freeze(model, cfg.freeze_layers, cfg.freeze_embeddings)
    if cfg.lora_rank:  # resuming: the saved adapters, else new ones
        add_lora(model, cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_targets,
                 adapter=ckpt.get("adapter") if ckpt is not None else None)
    if cfg.qat:
        import quantize
        try:
            quantize.enable_qat(model, cfg.qat, cfg.qat_group_size)  # same parameters and checkpoint keys
        except ValueError as e:
            raise ValueError(f"qat: {e}")
    memory.lower_frozen_weights(model, cfg.base_dtype)  # before loading: a checkpoint holds them lowered already
    model.grad_checkpointing = cfg.grad_checkpointing
    if cfg.chunked_loss and type(model.lm_head) is not nn.Linear:  # qat's fake-quantized or a lowered untied head
        raise ValueError(f"chunked_loss computes the output layer from its float weight, but this untied output "
                         f"layer is a {type(model.lm_head).__name__} (qat or base_dtype): set chunked_loss=0")
    model.loss_chunk = cfg.chunked_loss
    model.residual_bf16 = cfg.residual_bf16
    if ckpt is not None:
        model.load_state_dict(ckpt["model"], strict="adapter" not in ckpt)
    if cfg.freeze_layers or cfg.freeze_embeddings or cfg.lora_rank:
        print(trainable_report(model)[2])
    return model, init_source
