"""Export a trained checkpoint: a Hugging Face GPT-2 directory, or one plain sologpt checkpoint with any LoRA
adapters merged into the weights.

    python -m tools.export --out_dir=out --hf_dir=gpt2-mine           # GPT2LMHeadModel.from_pretrained loads it
    python -m tools.export --out_dir=out-lora --merged_ckpt=merged.pt  # adapters folded in: no base needed

A model fine-tuned on conversations (task="sft") takes its chat template along: tokenizer_config.json's
"chat_template" renders conversations as its training data was (tokenizer.apply_chat_template).
"""

import json
from dataclasses import dataclass
from pathlib import Path

from sologpt import chat, checkpoint, hf_gpt2, tokenizer
from sologpt.configurator import UserError, run_cli


@dataclass
class ExportConfig:
    out_dir: str = "out"  # folder with ckpt.pt
    ckpt: str = ""  # another checkpoint file; "" is out_dir/ckpt.pt
    hf_dir: str = ""  # write a Hugging Face GPT-2 directory here (config.json + model.safetensors)
    merged_ckpt: str = ""  # write a full sologpt checkpoint (LoRA adapters merged) to this file


def export(cfg):
    if not cfg.hf_dir and not cfg.merged_ckpt:
        raise UserError("nothing to do: pass --hf_dir=DIR and/or --merged_ckpt=FILE")
    path = Path(cfg.ckpt) if cfg.ckpt else Path(cfg.out_dir) / "ckpt.pt"
    for target in (cfg.hf_dir, cfg.merged_ckpt):
        if target and not Path(target).resolve().parent.is_dir():
            raise UserError(f"the folder of {target} does not exist: create it or pick another path")
    try:
        ckpt = checkpoint.read(path)
        if "quantization" in ckpt:
            raise ValueError(f"{path} is quantized; export the float checkpoint it came from")
        model = checkpoint.load_model(ckpt, path)  # LoRA adapters are merged here
        if cfg.hf_dir:
            hf_gpt2.save(model, cfg.hf_dir)
            print(f"wrote {cfg.hf_dir} (Hugging Face GPT-2)")
            write_chat_template(cfg.hf_dir, path, ckpt, [cfg.out_dir])
    except ValueError as e:
        raise UserError(str(e))
    except OSError as e:
        raise UserError(f"cannot write {cfg.hf_dir}: {e.strerror or e}")
    if cfg.merged_ckpt:
        if Path(cfg.merged_ckpt).resolve() == path.resolve():
            raise UserError(f"--merged_ckpt={cfg.merged_ckpt} is the input checkpoint: pick another file")
        checkpoint.save(cfg.merged_ckpt, {
            "format_version": checkpoint.FORMAT_VERSION, "model_config": checkpoint.model_config(model),
            "model": model.state_dict(),
            # the weights are all float now, whatever the run kept its frozen layers in
            "init_source": "scratch", "train_config": {**ckpt["train_config"], "base_dtype": "fp32"},
            "iter_num": ckpt["iter_num"],
            "best_val_loss": ckpt["best_val_loss"]})
        print(f"wrote {cfg.merged_ckpt} (sologpt checkpoint, full weights)")


def write_chat_template(hf_dir, path, ckpt, also):
    """The run's chat template (if its meta.json has one) as "chat_template" in hf_dir/tokenizer_config.json, added
    to what the file already holds (or a new file)."""
    try:
        meta = tokenizer.load_meta(tokenizer.find_meta(path, ckpt, also))
    except tokenizer.TokenizerError:
        return  # no meta.json: nothing says there is a template
    template = chat.template_of(meta)
    if template is None:
        return
    config_path = Path(hf_dir) / "tokenizer_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8")) if config_path.is_file() else {}
    config["chat_template"] = chat.hf_template(template)
    config.setdefault("eos_token", template["end"])  # where an answer ends: generation stops there
    checkpoint.write_json(config_path, config)
    print(f"wrote {config_path} (chat template; answers end with {template['end']!r})")


def main(argv=None):
    run_cli(export, ExportConfig, argv)


if __name__ == "__main__":
    main()
