"""Generate text from a trained checkpoint.

    python sample.py --out_dir=out-small --start="ROMEO:" --num_samples=3 --max_new_tokens=200
    python sample.py --out_dir=out-small --start=FILE:prompt.txt --temperature=0
    python sample.py --out_dir=out --prompts=prompts.txt --max_new_tokens=64   # one prompt per line, batched
    python sample.py --out_dir=out --draft=out-small --draft_tokens=4          # speculative decoding (a small draft)

Reads out_dir/ckpt.pt (weights_only=True) and the tokenizer from out_dir/meta.json, which train.py copies there.
Any checkpoint kind loads (sologpt/checkpoint.py): a full model, a LoRA run (its base is rebuilt and the adapters
merged in) or a quantized file (--ckpt=out/ckpt_int8.pt). The prompts go through the batched engine
(sologpt/inference.py): KV cache, left padding, a CUDA-graph decode step. A classifier (train.py task="classify")
prints each prompt line's label instead, a tagger (task="tag") each word's tag. A model fine-tuned on conversations
(task="sft") chats: prompts are user messages rendered with the chat template of its meta.json, answers end at the
end-of-turn token (sologpt/sft.py):

    python sample.py --out_dir=out-sft --prompts=questions.txt --temperature=0   # one answer per line
    python sample.py --out_dir=out-sft --interactive=True                         # a conversation on the terminal
"""

import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from sologpt import chat, checkpoint, sft, tag, tokenizer as tok
from sologpt.configurator import UserError, resolve_auto_bool, run_cli
from sologpt.hardware import autocast_context, resolve_device
from sologpt.inference import Engine, MultiStepEngine
from sologpt.speculative import SpeculativeEngine, check_pair


@dataclass
class SampleConfig:
    out_dir: str = "out"  # a run folder (ckpt.pt and meta.json), a checkpoint file or a Hugging Face GPT-2 directory
    ckpt: str = ""  # another checkpoint (e.g. out/ckpt_int8.pt from tools/quantize.py, out/best.pt); "": out_dir's
    start: str = "\n"  # the prompt, or FILE:path to read it from a file; "" starts from the end-of-text token
    num_samples: int = 3
    max_new_tokens: int = 500
    temperature: float = 0.8  # 1.0 samples the model's distribution; lower is more conservative; 0 is greedy
    top_k: int | None = 200  # sample only among the k most likely tokens; None for all
    top_p: float = 1.0  # nucleus sampling: the smallest set of tokens with this much probability; 1.0 is off
    seed: int = 1337  # same seed, same checkpoint, same device: same text
    prompts: str = ""  # a file of prompts, one per line (or .jsonl with a "prompt" field), generated in batches
    batch_size: int = 16  # rows generated together (samples of one prompt, or prompts from the file)
    stop: str = ""  # cut each sample after this text; "<|endoftext|>" also stops generating at GPT-2's end token
    stream: bool | str = "auto"  # print tokens as they arrive (one prompt, one sample); "auto": on a terminal
    chat: bool | str = "auto"  # prompts are user messages in the chat template of meta.json (a task "sft" model);
    # answers stop at its end-of-turn token; "auto": when meta.json has a template
    interactive: bool = False  # chat on the terminal; the conversation is kept within block_size (oldest turns go)
    system: str = ""  # chat: a system message before each conversation
    cuda_graph: bool | str = "auto"  # replay the decode steps as a CUDA graph; "auto": on CUDA
    decode_steps: int = 16  # tokens per decode call, picked on the device with no host sync (one CUDA graph
    # replay with cuda_graph); the stop token is checked every decode_steps tokens. 0: the one-step engine
    draft: str = ""  # a smaller model with the same tokenizer (run folder or checkpoint file): speculative decoding,
    # the draft proposes draft_tokens tokens and the model keeps those its own distribution allows (one row at a time)
    draft_tokens: int = 4  # tokens the draft proposes per round (k)
    device: str = "auto"  # "auto" picks cuda, then mps, then cpu
    dtype: str = "auto"  # "auto": bfloat16 on GPUs that have it (else float16), float32 elsewhere


def load_model(cfg, device):
    """The model (of a run folder, a checkpoint file or a Hugging Face directory), and the tokenizer that goes with
    it."""
    try:
        model, meta, _ = checkpoint.load_with_meta(cfg.ckpt or cfg.out_dir, also=[cfg.out_dir],
                                                   flag="--ckpt" if cfg.ckpt else "--out_dir")
        enc = tok.from_meta(meta)
    except ValueError as e:  # a tokenizer error is one too
        raise UserError(str(e))
    enc.meta = meta
    enc.labels = meta.get("labels")  # class names of a classifier
    enc.tags = meta.get("tags")  # tag names of a tagger
    enc.chat = meta.get("chat_template")  # the chat template of a model fine-tuned on conversations
    return model.to(device).eval(), enc


def read_file(path):
    """A prompt file's text (UTF-8), or one clear line."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read the prompt file {path}: {e}")


def prompt_text(cfg):
    """--start, or the file it names with FILE:path."""
    return read_file(cfg.start[len("FILE:"):]) if cfg.start.startswith("FILE:") else cfg.start


def read_prompts(cfg, enc):
    """[(token ids, tokens not to print)]: the prompt file's lines, or --start num_samples times."""
    if cfg.prompts:
        path = Path(cfg.prompts)
        lines = read_file(path).splitlines()
        texts = []
        for i, line in enumerate(lines, 1):
            if path.suffix == ".jsonl" and line.strip():
                try:
                    line = json.loads(line)["prompt"]
                except (json.JSONDecodeError, KeyError, TypeError):
                    raise UserError(f"{path}:{i} is not a JSON object with a \"prompt\" field")
            if line.strip():
                texts.append(line)
        if not texts:
            raise UserError(f"{path} has no prompts (empty lines are skipped)")
    else:
        texts = [prompt_text(cfg)] * cfg.num_samples
    prompts = []
    for text in texts:
        try:
            ids = enc.encode(text)
        except tok.TokenizerError as e:
            raise UserError(f"prompt: {e}")
        if not ids:  # start from the end-of-text token (GPT-2) or token 0, which is not printed
            prompts.append(([enc.eot_token if enc.eot_token is not None else 0], 1))
        else:
            prompts.append((ids, 0))
    return prompts


def sample(cfg):
    cfg.device, device_type, cfg.dtype = resolve_device(cfg.device, cfg.dtype)
    if cfg.temperature < 0 or not 0 < cfg.top_p <= 1 or (cfg.top_k is not None and cfg.top_k < 1):
        raise UserError("need temperature >= 0, 0 < top_p <= 1 and top_k >= 1 (or None)")
    if cfg.batch_size < 1 or cfg.num_samples < 1 or cfg.max_new_tokens < 1:
        raise UserError("batch_size, num_samples and max_new_tokens must be at least 1")
    if cfg.decode_steps < 0:
        raise UserError(f"decode_steps={cfg.decode_steps} must be 0 (the one-step engine) or more")
    cfg.cuda_graph = resolve_auto_bool("cuda_graph", cfg.cuda_graph, device_type == "cuda")
    ctx = autocast_context(device_type, cfg.dtype)

    model, enc = load_model(cfg, cfg.device)
    if cfg.draft and (model.config.n_classes > 0 or model.config.n_tags > 0
                      or resolve_auto_bool("chat", cfg.chat, enc.chat is not None)):
        raise UserError("draft: speculative decoding is for plain generation, not a classifier, tagger or chat")
    if model.config.n_classes > 0:
        return classify_lines(cfg, model, enc, ctx)
    if model.config.n_tags > 0:
        try:
            return tag.tag_lines(model, enc, enc.tags, input_lines(cfg, "tag"), ctx, cfg.device)
        except ValueError as e:  # a word the tokenizer cannot encode
            raise UserError(f"prompt: {e}")
    if resolve_auto_bool("chat", cfg.chat, enc.chat is not None):
        return chat_mode(cfg, model, enc, ctx, device_type)
    if cfg.interactive:
        raise UserError("interactive=True is a chat mode: it needs a model fine-tuned with task='sft' (and chat on)")
    draft = load_draft(cfg, model, enc) if cfg.draft else None
    prompts = read_prompts(cfg, enc)
    bs = model.config.block_size
    for i, (ids, skip) in enumerate(prompts):
        if len(ids) > bs:  # the model cannot see more: keep the end, which the next tokens depend on most
            print(f"warning: prompt {i + 1} has {len(ids)} tokens, more than block_size={bs}; using its last {bs}",
                  file=sys.stderr)
            prompts[i] = (ids[-bs:], 0)
    stop_token = enc.eot_token if cfg.stop == "<|endoftext|>" else None
    # a stop string is only known once decoded, so such samples are printed whole
    stream = resolve_auto_bool("stream", cfg.stream, sys.stdout.isatty()) and len(prompts) == 1 and (
        not cfg.stop or stop_token is not None)
    torch.manual_seed(cfg.seed)
    gen = torch.Generator(device=cfg.device).manual_seed(cfg.seed)
    longest = max(len(ids) for ids, _ in prompts)
    engine = None
    dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(cfg.dtype) if device_type == "cuda" else None
    rows, max_len = min(cfg.batch_size, len(prompts)), longest + cfg.max_new_tokens
    if draft is not None:
        try:
            engine = SpeculativeEngine(model, draft, max_len, cfg.device, dtype, cfg.draft_tokens, cfg.cuda_graph)
        except ValueError as e:  # prompt + max_new_tokens past a block_size, draft_tokens < 1
            raise UserError(f"draft: {e}")
    elif max_len <= bs:  # the batched engine; beyond block_size GPT.generate slides the window
        if cfg.decode_steps:
            engine = MultiStepEngine(model, rows, max_len, cfg.device, dtype, cfg.cuda_graph, cfg.decode_steps)
        else:
            engine = Engine(model, rows, max_len, cfg.device, dtype, cuda_graph=cfg.cuda_graph)
    texts, seconds = [], 0.0
    for start in range(0, len(prompts), cfg.batch_size):
        batch = prompts[start:start + cfg.batch_size]
        printer = Streamer(enc, batch[0][0][batch[0][1]:], stop_token) if stream else None
        if engine is not None:
            t0 = time.perf_counter()
            new = engine.generate([ids for ids, _ in batch], cfg.max_new_tokens, cfg.temperature, cfg.top_k, cfg.top_p,
                                  gen, stop_token, printer and printer.add, ctx)
            seconds += time.perf_counter() - t0
        else:
            new = []
            for ids, _ in batch:
                idx = torch.tensor([ids], dtype=torch.long, device=cfg.device)
                with ctx:
                    out = model.generate(idx, cfg.max_new_tokens, cfg.temperature, cfg.top_k, cfg.top_p,
                                         generator=gen)
                row = out[0, len(ids):].tolist()
                new.append(row[:row.index(stop_token) + 1] if stop_token in row else row)
        for (ids, skip), row in zip(batch, new):
            prompt = enc.decode(ids[skip:])
            text = enc.decode(ids[skip:] + row)
            if cfg.stop and cfg.stop in text[len(prompt):]:
                text = text[:text.index(cfg.stop, len(prompt)) + len(cfg.stop)]
            texts.append(text)
            if printer is None:
                print(text)
            else:
                printer.finish(text)
            print("-" * 40)
    if draft is not None:
        s = engine.stats
        print(f"speculative decoding: {engine.acceptance():.1%} of {s['proposed']} draft tokens accepted "
              f"(draft_tokens={cfg.draft_tokens}), {s['tokens'] / s['target_forwards']:.2f} tokens per forward of "
              f"the model, {s['tokens'] / seconds:.1f} tokens/s", file=sys.stderr)
    return texts


def load_draft(cfg, model, enc):
    """The draft model of speculative decoding, checked against the model: same vocabulary and tokenizer."""
    if cfg.draft_tokens < 1:
        raise UserError(f"draft_tokens={cfg.draft_tokens} must be at least 1")
    try:
        draft, meta, _ = checkpoint.load_with_meta(cfg.draft, flag="--draft")
        check_pair(model, draft, enc.meta, meta)
    except ValueError as e:  # a missing file, no tokenizer, another vocabulary
        raise UserError(str(e))
    return draft.to(cfg.device).eval()


class Streamer:
    """Prints a sample as its tokens arrive. Decoding the whole row each time keeps multi-byte characters that
    span tokens intact; a trailing U+FFFD means the character is not complete yet, so it waits."""

    def __init__(self, enc, prompt_ids, stop_token=None):
        self.enc, self.ids, self.shown, self.stop_token, self.done = enc, list(prompt_ids), "", stop_token, False
        print(enc.decode(self.ids), end="", flush=True)
        self.shown = enc.decode(self.ids)

    def add(self, step, tokens):
        if self.done:  # the engine checks for the stop token only every few steps
            return
        self.ids.append(int(tokens[0]))
        self.done = self.ids[-1] == self.stop_token
        text = self.enc.decode(self.ids)
        if not text.endswith("\ufffd"):
            print(text[len(self.shown):], end="", flush=True)
            self.shown = text

    def finish(self, text):
        print(text[len(self.shown):] if text.startswith(self.shown) else "\n" + text)


def chat_mode(cfg, model, enc, ctx, device_type):
    """Answers to the prompts (sologpt/sft.py), or a conversation on the terminal with --interactive=True."""
    if enc.chat is None:
        raise UserError("chat=True needs a model fine-tuned on conversations (task='sft'): its meta.json has no "
                        "chat_template")
    torch.manual_seed(cfg.seed)
    gen = torch.Generator(device=cfg.device).manual_seed(cfg.seed)
    dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(cfg.dtype) if device_type == "cuda" else None
    try:
        template = chat.template_of({"chat_template": enc.chat})
        if cfg.interactive:
            return sft.interactive(cfg, model, enc, template, ctx, gen, dtype)
        return sft.chat_prompts(cfg, model, enc, template, ctx, read_file, gen, dtype)
    except ValueError as e:  # a bad prompt row, a message that does not fit, a character the vocabulary lacks
        raise UserError(f"chat: {e}")


def input_lines(cfg, what):
    """The non-empty lines of --prompts, or of --start."""
    text = read_file(cfg.prompts) if cfg.prompts else prompt_text(cfg)
    lines = [line for line in text.splitlines() if line.strip()]
    if not lines:
        raise UserError(f"nothing to {what}: pass --start='some text' or --start=FILE:lines.txt")
    return lines


@torch.no_grad()
def classify_lines(cfg, model, enc, ctx):
    """A classifier's label for each non-empty line of the prompt, with the class probabilities (texts of several
    lines, whole files of them, accuracy: python -m tools.evaluate --input=rows.jsonl)."""
    lines = input_lines(cfg, "classify")
    results = []
    for line in lines:
        try:  # the tokens and end marker prepare/classify.py gave the training rows
            ids = tok.example_ids(enc, line)[-model.config.block_size:]
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
    run_cli(sample, SampleConfig, argv)


if __name__ == "__main__":
    main()
