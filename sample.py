"""Generate text from a trained checkpoint.

    python sample.py --out_dir=out-small --start="ROMEO:" --num_samples=3 --max_new_tokens=200
    python sample.py --out_dir=out-small --start=FILE:prompt.txt --temperature=0

Reads out_dir/ckpt.pt (weights_only=True) and the tokenizer from out_dir/meta.json, which train.py copies there.
"""

import sys
from dataclasses import dataclass
from pathlib import Path

import torch

import tokenizer as tok
from configurator import UserError, autocast_context, load_config, resolve_device
from model import GPT, read_checkpoint


@dataclass
class SampleConfig:
    out_dir: str = "out"  # folder with ckpt.pt and meta.json
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
    try:
        ckpt = read_checkpoint(Path(cfg.out_dir) / "ckpt.pt")
    except ValueError as e:
        raise UserError(str(e))
    model = GPT.from_checkpoint(ckpt)
    # meta.json lies next to the checkpoint; older runs may only have it in the dataset folder
    train_cfg = ckpt["train_config"]
    candidates = [Path(cfg.out_dir) / "meta.json", Path(train_cfg["data_root"]) / train_cfg["dataset"] / "meta.json"]
    meta_path = next((p for p in candidates if p.is_file()), None)
    if meta_path is None:
        raise UserError(f"no meta.json in {cfg.out_dir} or the dataset folder: the tokenizer is unknown")
    try:
        enc = tok.from_meta(tok.load_meta(meta_path))
    except tok.TokenizerError as e:
        raise UserError(str(e))
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


def main(argv=None):
    try:
        sample(load_config(SampleConfig, sys.argv[1:] if argv is None else argv))
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
