"""Supervised fine-tuning on conversations (train.py task="sft"): the data (prepare/instruct.py), its batches, its
evaluation, and the answering of conversations that the evaluation and sample.py's chat modes share.

The model stays a plain GPT and the training step the plain step: the loss mask comes with the batch, as targets of
-1 where nothing is learned (prompts, template markers, padding), which GPT.forward's cross-entropy ignores. With
sft_loss="all" every real token is learned (the prompt too), as plain language-model fine-tuning on the same text.

Evaluation: the loss on the response tokens (train: eval_iters batches; val: the whole split; the same whatever
sft_loss, so runs compare), and exact match on every held-out conversation: the model answers the last user message
greedily, and a hit is an answer that is the reference token for token, end-of-turn token included (per task too,
when the rows name tasks).
"""

import json
import sys
from pathlib import Path

import numpy as np
import torch

from sologpt import chat, examples, tokenizer
from sologpt.distributed import Dist
from sologpt.inference import Engine

SFT_LOSSES = ("response", "all")


def check(cfg):
    if cfg.sft_loss not in SFT_LOSSES:
        raise ValueError(f"sft_loss={cfg.sft_loss!r} is unknown: use 'response' (the loss mask) or 'all'")
    if cfg.sft_loss != "response" and cfg.task != "sft":
        raise ValueError(f"sft_loss={cfg.sft_loss!r} applies to task 'sft', not {cfg.task!r}: drop it")


def load_split(data_dir, split, meta):
    """One split of prepare/instruct.py's data, with meta.json's chat template checked."""
    try:
        template = chat.template_of(meta)
        if template is None:
            raise chat.ChatError(f"{data_dir}/meta.json has no chat_template: run prepare/instruct.py again")
        chat.end_id(tokenizer.from_meta(meta), template)
    except ValueError as e:  # a tokenizer error is one too
        raise examples.ExampleError(str(e))
    return examples.load_split(data_dir, split, meta, "mask", np.uint8, "instruct")


# ---- batches -------------------------------------------------------------------------------------------------

def make_batch(split, rows, block_size, learn_all, device):
    """Examples -> x (B, T) right-padded with 0 and y (B, T): the next token where it is learned, else -1. An example
    longer than block_size + 1 tokens keeps its first block_size + 1 (the prompt and the start of the answer)."""
    T = block_size
    x = np.zeros((len(rows), T), dtype=np.int64)  # (B, T)
    y = np.full((len(rows), T), -1, dtype=np.int64)  # (B, T)
    for b, i in enumerate(rows):
        tokens, mask = split.example(i)
        tokens, mask = tokens[:T + 1].astype(np.int64), mask[:T + 1].astype(bool)
        n = len(tokens) - 1
        x[b, :n] = tokens[:-1]
        y[b, :n] = np.where(mask[1:] | learn_all, tokens[1:], -1)
    return examples.to_device((x, y), device)


def learned_within(split, block_size):
    """(n,) the learned tokens of each example that fall inside its first block_size + 1 tokens (as targets)."""
    c = np.concatenate([[0], np.cumsum(split.values, dtype=np.int64)])
    start = split.offsets[:-1] + 1  # the first token is never a target
    stop = np.minimum(split.offsets[:-1] + block_size + 1, split.offsets[1:])
    return c[stop] - c[start]


def source(splits, cfg, generator, d=Dist()):
    """The batch source of task "sft", after saying how many examples block_size cuts or drops (and how many val
    examples exact match cannot ask)."""
    T, split = cfg.block_size, splits["train"]
    lengths = np.diff(split.offsets)
    pool = np.flatnonzero(learned_within(split, T) > 0)
    if not len(pool):
        raise ValueError(f"no training example has a response token within block_size={T} tokens: raise block_size")
    if d.main:
        cut, dropped = int((lengths > T + 1).sum()), len(split) - len(pool)
        val = splits["val"]
        unasked = sum(sum(map(len, last_answer(*val.example(i)))) > T for i in range(len(val)))
        print(f"sft: {len(pool):,} of {len(split):,} train examples; {cut:,} longer than block_size + 1 = {T + 1} "
              f"tokens, cut there; {dropped:,} dropped (no response token within); "
              f"{examples.padding_line(lengths[pool] - 1, T)}. val: {len(val):,} examples, "
              f"{int((np.diff(val.offsets) > T + 1).sum()):,} cut; {unasked:,} too long for exact match")
    return examples.Source(pool, lambda rows: make_batch(split, rows, T, cfg.sft_loss == "all", cfg.device), cfg,
                           generator, d)


# ---- answering conversations -----------------------------------------------------------------------------------

@torch.no_grad()
def respond(model, prompts, max_new_tokens, end, ctx, device, temperature=0.0, top_k=None, top_p=None,
            generator=None, dtype=None, batched=True, on_token=None):
    """Each prompt's new tokens (lists of ids), generated until the end-of-turn token (kept) or max_new_tokens;
    prompt + max_new_tokens must fit block_size. batched: one KV-cache engine for all (sologpt/inference.py); else
    GPT.generate row by row, which runs only the model's forward (what FSDP's sharded weights need)."""
    if batched:
        engine = Engine(model, len(prompts), max(map(len, prompts)) + max_new_tokens, device, dtype)
        return engine.generate(prompts, max_new_tokens, temperature, top_k, top_p, generator, end, on_token, ctx)
    out = []
    for ids in prompts:
        with ctx:
            row = model.generate(torch.tensor([ids], device=device), max_new_tokens, temperature, top_k, top_p,
                                 generator=generator)[0, len(ids):].tolist()
        out.append(row[:row.index(end) + 1] if end in row else row)
    return out


def fitting_batches(items, sizes, batch_size, block_size):
    """items in order, batch_size at a time, each batch closed early where its longest prompt plus its longest answer
    would not fit block_size (the engine runs every row as long as the longest answer). sizes: (prompt length,
    answer length) of each item, which fit alone."""
    batches, longest = [[]], (0, 0)
    for item, (p, a) in zip(items, sizes):
        grown = (max(longest[0], p), max(longest[1], a))
        if batches[-1] and (len(batches[-1]) == batch_size or sum(grown) > block_size):
            batches.append([])
            grown = (p, a)
        batches[-1].append(item)
        longest = grown
    return batches


def last_answer(tokens, mask):
    """(prompt, reference) of an example: the last run of learned tokens is the final answer (with its end token);
    everything before it is the prompt that asks for it."""
    learned = np.flatnonzero(mask)
    stop = learned[-1] + 1
    start = stop
    while start > 0 and mask[start - 1]:
        start -= 1
    return tokens[:start].tolist(), tokens[start:stop].tolist()


@torch.no_grad()
def exact_match(model, split, cfg, ctx, end, task_names=None, d=Dist(), batched=True):
    """{"val_exact_match": ..., "val_exact_match_<task>": ...} over every val example: greedy answers to each one's
    last user message against its reference. Examples whose prompt and answer do not fit block_size are skipped (the
    run's setup line counts them)."""
    items = []
    for i in range(len(split)):
        prompt, ref = last_answer(*split.example(i))
        if len(prompt) + len(ref) <= cfg.block_size:
            items.append((i, prompt, ref))
    if not items:
        return {}
    batches = fitting_batches(items, [(len(p), len(r)) for _, p, r in items], cfg.batch_size, cfg.block_size)
    n_tasks = len(task_names or ())
    hits = torch.zeros(2, 1 + n_tasks, dtype=torch.float64)  # (hits, examples) overall and per task
    dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(cfg.dtype) if cfg.device.startswith("cuda") \
        else None
    for k, batch in enumerate(batches):
        if k % d.world != d.rank:
            continue
        answers = respond(model, [p for _, p, _ in batch], max(len(r) for _, _, r in batch), end, ctx, cfg.device,
                          dtype=dtype, batched=batched)
        for (i, _, ref), answer in zip(batch, answers):
            cols = [0] + ([1 + int(split.tasks[i])] if split.tasks is not None and n_tasks else [])
            hits[0, cols] += float(answer[:len(ref)] == ref)
            hits[1, cols] += 1
    hits = d.sum(hits).cpu()
    out = {"val_exact_match": float(hits[0, 0] / hits[1, 0])}
    for t, name in enumerate(task_names or ()):
        if hits[1, t + 1]:
            out[f"val_exact_match_{name}"] = float(hits[0, t + 1] / hits[1, t + 1])
    return out


# ---- evaluation ------------------------------------------------------------------------------------------------

@torch.no_grad()
def evaluate(model, raw_model, splits, cfg, ctx, meta, enc, d=Dist(), batched=True):
    """Response-token loss on train (eval_iters batches of examples spread over it) and val (all of it), then exact
    match on val. model: what the training step calls (maybe compiled or wrapped); raw_model: the GPT it wraps, whose
    layers the generation engine runs."""
    model.eval()
    out = {}
    for split, data in splits.items():
        rows = examples.spread(len(data), cfg.eval_iters * cfg.batch_size) if split == "train" else np.arange(len(data))
        total = torch.zeros(2, dtype=torch.float64)  # summed loss, learned tokens
        for k, start in enumerate(range(0, len(rows), cfg.batch_size)):
            if k % d.world != d.rank:
                continue
            x, y = make_batch(data, rows[start:start + cfg.batch_size], cfg.block_size, False, cfg.device)
            n = int((y != -1).sum())
            if n:
                with ctx:
                    _, loss = model(x, y)
                total += torch.tensor([loss.item() * n, n], dtype=torch.float64)
        total = d.sum(total).cpu()
        out[f"{split}_loss"] = float(total[0] / total[1]) if total[1] else float("nan")
    out.update(exact_match(raw_model, splits["val"], cfg, ctx, chat.end_id(enc, chat.template_of(meta)),
                           meta.get("tasks"), d, batched))
    model.train()
    return out


# ---- chat for sample.py ----------------------------------------------------------------------------------------

def read_conversations(cfg, text_of):
    """The conversations to answer: each line of --prompts (a .txt file: one user message a line; .jsonl: rows as
    prepare/instruct.py reads them, ending with a user message, or with a reference answer that is dropped), or
    --start num_samples times. --system adds a system message where a row has none."""
    if cfg.prompts:
        path = Path(cfg.prompts)
        lines = text_of(path).splitlines()
        if path.suffix == ".jsonl":
            convs = []
            for i, line in enumerate(lines, 1):
                if line.strip():
                    try:
                        convs.append(chat.messages_of(_json(line), final="user")[0])
                    except chat.ChatError as e:
                        raise chat.ChatError(f"{path}:{i} {e}")
        else:
            convs = [[{"role": "user", "content": line}] for line in lines if line.strip()]
        if not convs:
            raise chat.ChatError(f"{path} has no prompts (empty lines are skipped)")
    else:
        text = text_of(cfg.start[len("FILE:"):]) if cfg.start.startswith("FILE:") else cfg.start
        if not text.strip():
            raise chat.ChatError("chat needs a message: --start='...', --prompts=FILE or --interactive=True")
        convs = [[{"role": "user", "content": text}]] * cfg.num_samples
    if cfg.system:
        convs = [c if c[0]["role"] == "system" else [{"role": "system", "content": cfg.system}, *c] for c in convs]
    return convs


def _json(line):
    try:
        return json.loads(line)
    except json.JSONDecodeError as e:
        raise chat.ChatError(f"is not valid JSON ({e.msg})")


def prompt_ids(enc, template, messages, max_new_tokens, block_size):
    """(prompt ids, answer budget, turns dropped): the conversation with the assistant's prefix, its oldest turns
    dropped until the prompt leaves room for max_new_tokens (or a quarter of block_size, if less). The budget is
    max_new_tokens, or what block_size leaves: a last message too long for that room keeps what room there is."""
    room = min(max_new_tokens, block_size // 4)
    try:
        messages, dropped = chat.fit(enc, template, messages, room, block_size)
    except chat.ChatError:  # the last message alone leaves less: answer in what is left, if anything is
        messages, dropped = chat.fit(enc, template, messages, 1, block_size)
    ids = chat.encode(enc, template, messages, generation_prompt=True)[0]
    return ids, min(max_new_tokens, block_size - len(ids)), dropped


def chat_prompts(cfg, model, enc, template, ctx, text_of, generator, dtype=None):
    """sample.py's chat mode: answer each conversation (batch_size at a time) and print the answers; returns them."""
    end = chat.end_id(enc, template)
    bs = model.config.block_size
    jobs = [prompt_ids(enc, template, conv, cfg.max_new_tokens, bs) for conv in read_conversations(cfg, text_of)]
    for i, (_, budget, _) in enumerate(jobs):
        if budget < min(cfg.max_new_tokens, bs // 4):
            print(f"note: prompt {i + 1} leaves {budget} tokens of block_size={bs} for its answer", file=sys.stderr)
    answers = []
    for batch in fitting_batches(jobs, [(len(ids), budget) for ids, budget, _ in jobs], cfg.batch_size, bs):
        rows = respond(model, [ids for ids, _, _ in batch], max(b for _, b, _ in batch), end, ctx, cfg.device,
                       cfg.temperature, cfg.top_k, cfg.top_p, generator, dtype)
        for (_, budget, dropped), row in zip(batch, rows):
            if dropped:
                print(f"note: {dropped} oldest turn(s) left out to fit block_size={bs}", file=sys.stderr)
            answers.append(enc.decode([t for t in row[:budget] if t != end]))
            print(answers[-1])
            print("-" * 40)
    return answers


def interactive(cfg, model, enc, template, ctx, generator, dtype=None):
    """sample.py --interactive=True: a conversation on the terminal. Each answer streams until the end-of-turn token;
    the whole conversation is the next prompt, its oldest turns dropped when it would no longer fit the context."""
    end = chat.end_id(enc, template)
    bs = model.config.block_size
    system = [{"role": "system", "content": cfg.system}] if cfg.system else []
    history = list(system)
    print(f"chat ({bs} tokens of context): type a message; /reset starts over; an empty line or Ctrl-D ends")
    answers = []
    while True:
        try:
            line = input("> ")
        except EOFError:
            break
        if not line.strip():
            break
        if line.strip() == "/reset":
            history = list(system)
            continue
        history.append({"role": "user", "content": line})
        try:
            ids, budget, dropped = prompt_ids(enc, template, history, cfg.max_new_tokens, bs)
        except ValueError as e:  # too long, or a character the vocabulary lacks: say so and go on
            print(f"error: {e}")
            history.pop()
            continue
        if dropped:
            history = system + history[len(system) + 2 * dropped:]
            print(f"(the oldest {dropped} turn(s) left the context)")
        shown = Shown(enc, end)
        row = respond(model, [ids], budget, end, ctx, cfg.device, cfg.temperature, cfg.top_k, cfg.top_p, generator,
                      dtype, on_token=shown.add)[0]
        answer = enc.decode([t for t in row if t != end])
        shown.finish(answer)
        history.append({"role": "assistant", "content": answer if answer.strip() else "..."})
        answers.append(answer)
    return answers


class Shown:
    """Prints an answer as its tokens arrive, without the end-of-turn token (and nothing after it)."""

    def __init__(self, enc, end):
        self.enc, self.end, self.ids, self.text, self.done = enc, end, [], "", False

    def add(self, step, tokens):
        if self.done or int(tokens[0]) == self.end:  # the engine checks for the end only every few steps
            self.done = True
            return
        self.ids.append(int(tokens[0]))
        text = self.enc.decode(self.ids)
        if not text.endswith("\ufffd"):  # a multi-byte character not complete yet
            print(text[len(self.text):], end="", flush=True)
            self.text = text

    def finish(self, answer):
        print(answer[len(self.text):] if answer.startswith(self.text) else "\n" + answer)
