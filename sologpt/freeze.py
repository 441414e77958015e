"""Layer freezing for fine-tuning (train.py: freeze_layers, freeze_embeddings): frozen parameters get no gradient
and no optimizer state (make_optimizer takes only parameters that require grad), so they stay bit-identical."""


def check(cfg):
    """freeze_layers is checked against the model's depth in freeze(), once the start point is known."""
    if cfg.freeze_layers < 0:
        raise ValueError(f"freeze_layers={cfg.freeze_layers} must not be negative")


def freeze(model, freeze_layers=0, freeze_embeddings=False):
    """Stop gradients for the first freeze_layers blocks and/or the embeddings. freeze_embeddings freezes the
    output layer too (with tied weights it is the token embedding itself)."""
    if freeze_layers > model.config.n_layer:
        raise ValueError(f"freeze_layers={freeze_layers} but the model has {model.config.n_layer} layers")
    for block in model.transformer.h[:freeze_layers]:
        block.requires_grad_(False)
    if freeze_embeddings:
        model.transformer.wte.requires_grad_(False)
        model.lm_head.requires_grad_(False)  # the same tensor when tied; the output embedding when not
        if "wpe" in model.transformer:  # rotary positions have no weights
            model.transformer.wpe.requires_grad_(False)


def count_trainable(model):
    """(trainable, total) parameter counts; parameters() lists a tied embedding once."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)
