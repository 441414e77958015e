"""Export a trained model: a Hugging Face GPT-2 directory (weights, config and tokenizer files), or one plain
sologpt checkpoint with any LoRA adapters merged into the weights.

    python -m tools.export --out_dir=out --hf_dir=gpt2-mine           # GPT2LMHeadModel and AutoTokenizer load it
    python -m tools.export --out_dir=out-lora --merged_ckpt=merged.pt  # adapters folded in: no base needed

The source is a run folder, a checkpoint file or a Hugging Face directory (sologpt/checkpoint.py's locate). The
tokenizer files come from the run's meta.json (sologpt/hf_tokenizer.py), which is copied into the folder too, so
sample.py and tools/score.py read the export with the right tokenizer. A model fine-tuned on conversations
(task="sft") takes its chat template along: tokenizer_config.json's "chat_template" renders conversations as its
training data was (tokenizer.apply_chat_template).
"""

import json
from dataclasses import dataclass
from pathlib import Path

from sologpt import chat, checkpoint, hf_gpt2, hf_tokenizer, tokenizer
from sologpt.configurator import UserError, run_cli

# every file an export may write: a folder holding only these is an earlier export, which may be replaced
EXPORT_FILES = ("config.json", *checkpoint.HF_WEIGHTS, "meta.json", "TOKENIZER.md", *hf_tokenizer.FILES)


@dataclass
class ExportConfig:
    out_dir: str = "out"  # a run folder (ckpt.pt and meta.json), a checkpoint file or a Hugging Face GPT-2 directory
    ckpt: str = ""  # another checkpoint (e.g. out/best.pt); "": out_dir's
    hf_dir: str = ""  # write a Hugging Face GPT-2 directory here (config.json, model.safetensors, tokenizer files)
    merged_ckpt: str = ""  # write a full sologpt checkpoint (LoRA adapters merged) to this file


def check_target(target):
    """An export goes into a new folder, an empty one or an earlier export: never over a run or other files."""
    path = Path(target)
    if not path.resolve().parent.is_dir():
        raise UserError(f"the folder of {target} does not exist: create it or pick another path")
    if path.exists() and not path.is_dir():
        raise UserError(f"--hf_dir={target} is a file: give a folder to write the Hugging Face files into")
    if path.is_dir():
        others = sorted(p.name for p in path.iterdir() if p.name not in EXPORT_FILES)
        if others:
            raise UserError(f"--hf_dir={target} holds files an export does not write ({', '.join(others[:4])}): "
                            f"export into a new or empty folder")


def source_meta(ckpt, where, also):
    """The meta.json dict of the model's tokenizer, or None when there is none to be found."""
    try:
        return checkpoint.find_tokenizer(ckpt, where, also)
    except tokenizer.TokenizerError:
        return None


def write_hf(model, meta, target):
    """config.json + weights (sologpt/hf_gpt2.py), the tokenizer files and meta.json; the files of an earlier
    export in that folder go first, so none of them is left stale."""
    target = Path(target)
    for name in EXPORT_FILES:
        (target / name).unlink(missing_ok=True)
    hf_gpt2.save(model, target)
    if meta is None:
        print(f"warning: no meta.json found for the model: {target} has no tokenizer files (AutoTokenizer cannot "
              f"load it); copy the run's meta.json beside the checkpoint and export again")
        return "no tokenizer files"
    checkpoint.write_json(target / "meta.json", meta)
    wrote = hf_tokenizer.save(meta, target, model.config.block_size)
    return wrote + write_chat_template(target, meta)


def export(cfg):
    if not cfg.hf_dir and not cfg.merged_ckpt:
        raise UserError("nothing to do: pass --hf_dir=DIR and/or --merged_ckpt=FILE")
    if cfg.hf_dir:
        check_target(cfg.hf_dir)
    if cfg.merged_ckpt and not Path(cfg.merged_ckpt).resolve().parent.is_dir():
        raise UserError(f"the folder of {cfg.merged_ckpt} does not exist: create it or pick another path")
    try:
        ckpt, where = checkpoint.load_checkpoint(cfg.ckpt or cfg.out_dir, "--ckpt" if cfg.ckpt else "--out_dir")
        if "quantization" in ckpt:
            raise ValueError(f"{where.path} is quantized; export the float checkpoint it came from")
        model = checkpoint.load_model(ckpt, where.path)  # LoRA adapters are merged here
        if cfg.hf_dir:
            hf_gpt2.check_exportable(model)
            wrote = write_hf(model, source_meta(ckpt, where, [cfg.out_dir]), cfg.hf_dir)
            print(f"wrote {cfg.hf_dir} (Hugging Face GPT-2: config.json, weights, {wrote})")
    except ValueError as e:
        raise UserError(str(e))
    except OSError as e:
        raise UserError(f"cannot write {cfg.hf_dir}: {e.strerror or e}")
    if cfg.merged_ckpt:
        if Path(cfg.merged_ckpt).resolve() == where.path.resolve():
            raise UserError(f"--merged_ckpt={cfg.merged_ckpt} is the input checkpoint: pick another file")
        try:  # the weights are all float now, whatever the run kept its frozen layers in
            checkpoint.save(cfg.merged_ckpt, checkpoint.from_model(
                model, train_config={**ckpt["train_config"], "base_dtype": "fp32"}, iter_num=ckpt["iter_num"],
                best_val_loss=ckpt["best_val_loss"]))
        except OSError as e:  # the file it would replace is unchanged (checkpoint.save is atomic)
            raise UserError(f"cannot write {cfg.merged_ckpt}: {e.strerror or e}: free disk space or pick another path")
        print(f"wrote {cfg.merged_ckpt} (sologpt checkpoint, full weights)")


def write_chat_template(hf_dir, meta):
    """The run's chat template (if its meta.json has one) as "chat_template" in hf_dir/tokenizer_config.json, added
    to what the file already holds (or a new file). Returns what it wrote, for the summary line."""
    template = chat.template_of(meta)
    if template is None:
        return ""
    config_path = Path(hf_dir) / "tokenizer_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8")) if config_path.is_file() else {}
    config["chat_template"] = chat.hf_template(template)
    config.setdefault("eos_token", template["end"])  # where an answer ends: generation stops there
    checkpoint.write_json(config_path, config)
    return f"; chat template (answers end with {template['end']!r})"


def main(argv=None):
    run_cli(export, ExportConfig, argv)


if __name__ == "__main__":
    main()
