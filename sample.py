"""Generate text from a trained checkpoint.

    python sample.py --out_dir=out-small --start="ROMEO:" --num_samples=3 --max_new_tokens=200
    python sample.py --out_dir=out-small --start=FILE:prompt.txt --temperature=0

Reads out_dir/ckpt.pt (weights_only=True) and the tokenizer from out_dir/meta.json, which train.py copies there.
Any checkpoint kind loads: a full model, a LoRA run (its base is rebuilt and the adapters merged in) or a quantized
file (--ckpt=out/ckpt_int8.pt). A classifier (train.py task="classify") prints each prompt line's label instead.
"""

import sys
from dataclasses import dataclass
from pathlib import Path

import torch

import tokenizer as tok
from configurator import UserError, autocast_context, load_config, resolve_device
import finetune
from model import read_checkpoint


@dataclass
class SampleConfig:
    out_dir: str = "out"  # folder with ckpt.pt and meta.json
    ckpt: str = ""  # another checkpoint file to load (e.g. out/ckpt_int8.pt from quantize.py); "" is out_dir/ckpt.pt
    start: str = "\n"  # the prompt, or FILE:path to read it from a file; "" starts from the end-of-text token
    num_samples: int = 3
    max_new_tokens: int = 500
    temperature: float = 0.8  # 1.0 samples the model's distribution; lower is more conservative; 0 is greedy
    top_k: int | None = 200  # sample only among the k most likely tokens; None for all
    top_p: float = 1.0  # nucleus sampling: the smallest set of tokens with this much probability; 1.0 is off
    seed: int = 1337  # same seed, same checkpoint, same device: same text
    device: str = "auto"  # "auto" picks cuda, then mps, then cpu
    dtype: str = "auto"  # "auto": bfloat16 on GPUs that have it (else float16), float32 elsewhere


def load_model(cfg, device):
    """The checkpoint's model, and the tokenizer that goes with it."""
    path = Path(cfg.ckpt) if cfg.ckpt else Path(cfg.out_dir) / "ckpt.pt"
    try:
        ckpt = read_checkpoint(path)
        model = finetune.load_model(ckpt, path)
    except ValueError as e:
        raise UserError(str(e))
    # meta.json lies next to the checkpoint; older runs may only have it in the dataset folder
    train_cfg = ckpt["train_config"]
    candidates = [Path(cfg.out_dir) / "meta.json", Path(train_cfg["data_root"]) / train_cfg["dataset"] / "meta.json"]
    meta_path = next((p for p in candidates if p.is_file()), None)
    if meta_path is None:
        raise UserError(f"no meta.json in {cfg.out_dir} or the dataset folder: the tokenizer is unknown")
    try:
        meta = tok.load_meta(meta_path)
        enc = tok.from_meta(meta)
    except tok.TokenizerError as e:
        raise UserError(str(e))
    enc.labels = meta.get("labels")  # class names of a classifier
    return model.to(device).eval(), enc


def encode_prompt(cfg, enc):
    text = cfg.start
    if text.startswith("FILE:"):
        path = Path(text[len("FILE:"):])
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise UserError(f"cannot read the prompt file {path}: {e}")
    try:
        ids = enc.encode(text)
    except tok.TokenizerError as e:
        raise UserError(f"prompt: {e}")
    if not ids:  # start from the end-of-text token (GPT-2) or token 0, which is not printed
        return [enc.eot_token if enc.eot_token is not None else 0], 1
    return ids, 0


def sample(cfg):
    cfg.device, device_type, cfg.dtype = resolve_device(cfg.device, cfg.dtype)
    if cfg.temperature < 0 or not 0 < cfg.top_p <= 1 or (cfg.top_k is not None and cfg.top_k < 1):
        raise UserError("need temperature >= 0, 0 < top_p <= 1 and top_k >= 1 (or None)")
    ctx = autocast_context(device_type, cfg.dtype)

    model, enc = load_model(cfg, cfg.device)
    if model.config.n_classes > 0:
        return classify_lines(cfg, model, enc, ctx)
    prompt, skip = encode_prompt(cfg, enc)
    torch.manual_seed(cfg.seed)
    gen = torch.Generator(device=cfg.device).manual_seed(cfg.seed)
    idx = torch.tensor([prompt], dtype=torch.long, device=cfg.device)  # (1, T)
    texts = []
    for _ in range(cfg.num_samples):
        with ctx:
            out = model.generate(idx, cfg.max_new_tokens, temperature=cfg.temperature, top_k=cfg.top_k,
                                 top_p=cfg.top_p, generator=gen)
        text = enc.decode(out[0, skip:].tolist())
        texts.append(text)
        print(text)
        print("-" * 40)
    return texts


@torch.no_grad()
def classify_lines(cfg, model, enc, ctx):
    """A classifier's label for each non-empty line of the prompt, with the class probabilities."""
    text = cfg.start
    if text.startswith("FILE:"):
        try:
            text = Path(text[len("FILE:"):]).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise UserError(f"cannot read the prompt file {text[len('FILE:'):]}: {e}")
    lines = [line for line in text.splitlines() if line.strip()]
    if not lines:
        raise UserError("nothing to classify: pass --start='some text' or --start=FILE:lines.txt")
    end = enc.eot_token if enc.eot_token is not None else enc.encode("\n")[0]  # as prepare/classify.py ends rows
    results = []
    for line in lines:
        try:
            ids = (enc.encode(line) + [end])[-model.config.block_size:]
        except tok.TokenizerError as e:
            raise UserError(f"prompt: {e}")
        with ctx:
            logits, _ = model(torch.tensor([ids], device=cfg.device))
        probs = logits.float().softmax(-1)[0].tolist()
        label = enc.labels[max(range(len(probs)), key=probs.__getitem__)]
        results.append(label)
        print(f"{label}\t" + " ".join(f"{name}={p:.3f}" for name, p in zip(enc.labels, probs)) + f"\t{line}")
    return results


def main(argv=None):
    try:
        sample(load_config(SampleConfig, sys.argv[1:] if argv is None else argv))
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
