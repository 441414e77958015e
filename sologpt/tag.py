"""Token-level tagging (train.py task="tag", entity recognition style): the Tagger model, its data (prepare/tags.py),
its batches and its evaluation (per-class precision, recall and F1), and sample.py's tagging of lines.

The Tagger is a GPT with a head on every position's hidden state: a subclass, so it keeps GPT's weights and
state-dict keys (plus tag_head.*) and a language model becomes one by a class swap (set_tagger), as the Classifier
of sologpt/classify.py does. Each word's tag is read at its last token (sologpt/bio.py): a causal model has then
read the word and what came before it, never what follows, which bidirectional taggers see (say so when comparing).
"""

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from model import GPT
from sologpt import bio, examples
from sologpt.distributed import Dist


class Tagger(GPT):
    """forward(idx (B, T), targets (B, T) tag ids, -1 where none) -> ((B, T, n_tags), loss over the tagged tokens)."""

    def add_task_head(self, config):  # GPT.__init__ calls it before initialising the weights
        self.tag_head = nn.Linear(config.n_embd, config.n_tags)

    def forward(self, idx, targets=None):
        x = self.hidden_states(idx)  # (B, T, C)
        logits = self.tag_head(x)  # (B, T, n_tags)
        loss = None
        if targets is not None:
            # (B*T, n_tags) against (B*T,): untagged tokens and padding (-1) count nothing
            loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)
        return logits, loss


def set_tagger(model, n_tags):
    """Make a language model a tagger with a fresh head (its lm_head stays, unused, tied to the embedding)."""
    model.config.n_tags = n_tags
    model.__class__ = Tagger
    model.tag_head = nn.Linear(model.config.n_embd, n_tags, device=model.transformer.wte.weight.device)
    model._init_weights(model.tag_head)
    return model


# ---- data and batches ------------------------------------------------------------------------------------------

def load_split(data_dir, split, meta):
    data = examples.load_split(data_dir, split, meta, "tags", np.int16, "tags")
    if data.values.max() >= len(meta["tags"]) or data.values.min() < -1:
        raise examples.ExampleError(f"{data_dir}/{split}_tags.bin has a tag id outside -1..{len(meta['tags']) - 1}: "
                                    f"run prepare/tags.py again")
    return data


def make_batch(split, rows, block_size, device):
    """Examples -> x (B, T) right-padded with 0 and y (B, T) tag ids, -1 on untagged tokens and padding. An example
    longer than block_size keeps its first block_size tokens (the words after them are not tagged)."""
    x = np.zeros((len(rows), block_size), dtype=np.int64)  # (B, T)
    y = np.full((len(rows), block_size), -1, dtype=np.int64)  # (B, T)
    for b, i in enumerate(rows):
        tokens, tags = split.example(i)
        n = min(len(tokens), block_size)
        x[b, :n] = tokens[:n]
        y[b, :n] = tags[:n]
    return examples.to_device((x, y), device)


def source(split, cfg, generator, d=Dist()):
    """The batch source of task "tag", after saying how many examples block_size cuts or drops."""
    T = cfg.block_size
    lengths = np.diff(split.offsets)
    tagged = np.flatnonzero(np.asarray(split.values) >= 0)  # token positions that carry a tag
    owner = np.searchsorted(split.offsets, tagged, side="right") - 1  # their examples
    first = np.full(len(split), np.iinfo(np.int64).max)
    np.minimum.at(first, owner, tagged - split.offsets[owner])  # each example's first tagged token
    pool = np.flatnonzero(first < T)
    if not len(pool):
        raise ValueError(f"no training example has a tagged word within block_size={T} tokens: raise block_size")
    if d.main:
        print(f"tag: {len(pool):,} of {len(split):,} train examples; {int((lengths > T).sum()):,} longer than "
              f"block_size = {T} tokens, cut there (their later words untagged); {len(split) - len(pool):,} dropped; "
              f"{examples.padding_line(lengths[pool], T)}")
    return examples.Source(pool, lambda rows: make_batch(split, rows, T, cfg.device), cfg, generator, d)


# ---- evaluation ------------------------------------------------------------------------------------------------

@torch.no_grad()
def evaluate(model, split, rows, cfg, ctx, tag_names, d=Dist()):
    """Loss, accuracy over the tagged words, and per-class counts (true positives, predicted, gold: entities for BIO
    tags, else words) over the given examples; each rank takes every world-th batch and the sums are added up."""
    model.eval()
    classes = bio.classes(tag_names)
    sums = torch.zeros(3 + 3 * len(classes), dtype=torch.float64)  # loss sum, words, correct, then counts per class
    for k, start in enumerate(range(0, len(rows), cfg.batch_size)):
        if k % d.world != d.rank:
            continue
        x, y = make_batch(split, rows[start:start + cfg.batch_size], cfg.block_size, cfg.device)
        with ctx:
            logits, loss = model(x, y)
        pred, y = logits.argmax(-1).cpu().numpy(), y.cpu().numpy()
        n = int((y != -1).sum())
        sums[:3] += torch.tensor([loss.item() * n, n, int(((pred == y) & (y != -1)).sum())], dtype=torch.float64)
        for b in range(len(y)):
            tagged = y[b] != -1
            c = bio.counts([tag_names[t] for t in y[b][tagged]], [tag_names[t] for t in pred[b][tagged]], tag_names)
            sums[3:] += torch.tensor([v for name in classes for v in c[name]], dtype=torch.float64)
    model.train()
    sums = d.sum(sums).cpu()
    per_class = bio.scores({name: sums[3 + 3 * j:6 + 3 * j].tolist() for j, name in enumerate(classes)})
    return {"loss": float(sums[0] / sums[1]), "accuracy": float(sums[2] / sums[1]),
            "macro_f1": sum(f for _, _, f in per_class.values()) / len(per_class)}, per_class


def evaluate_splits(model, splits, cfg, ctx, tag_names, d=Dist()):
    """train (eval_iters batches of examples spread over it) and val (all of it): loss, accuracy, macro-F1; and for
    val each class's precision, recall and F1."""
    out = {}
    for split, data in splits.items():
        rows = examples.spread(len(data), cfg.eval_iters * cfg.batch_size) if split == "train" else np.arange(len(data))
        summary, per_class = evaluate(model, data, rows, cfg, ctx, tag_names, d)
        out.update({f"{split}_{k}": v for k, v in summary.items()})
    for name, (p, r, f) in per_class.items():
        out.update({f"val_precision_{name}": p, f"val_recall_{name}": r, f"val_f1_{name}": f})
    return out


# ---- sample.py -------------------------------------------------------------------------------------------------

@torch.no_grad()
def tag_lines(model, enc, tag_names, lines, ctx, device):
    """Each line's words with their tags, printed as word/TAG; words beyond block_size tokens are left untagged."""
    results = []
    for line in lines:
        words = line.split()
        ids, last = bio.encode_words(enc, words)
        ids = ids[:model.config.block_size]
        with ctx:
            logits, _ = model(torch.tensor([ids], device=device))
        pred = logits[0].argmax(-1).tolist()
        tags = [tag_names[pred[j]] if j < len(ids) else "?" for j in last]
        results.append(list(zip(words, tags)))
        print(" ".join(f"{w}/{t}" for w, t in results[-1]))
    return results
