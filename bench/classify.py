"""The baseline a text classifier must beat: logistic regression on bag-of-words features (docs/finetuning.md).

    python -m bench.classify                      # the shared sentence-polarity set: train.jsonl -> val.jsonl
    python -m bench.classify --features words     # word unigrams only (default: unigrams + bigrams)

Features are the presence (0/1) of each lower-cased word (runs of letters, digits and apostrophes, or single other
characters) and, by default, each pair of neighbouring words, kept when seen in at least --min_count training
texts. The model is multinomial logistic regression with an L2 penalty, trained full-batch with L-BFGS in
torch; the penalty is picked from a small grid on a held-out tenth of the training rows, then the model is trained
again on all of them and scored once on the validation file. Prints accuracy, macro-F1 and the seconds it took.
"""

import argparse
import re
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from prepare.classify import read_rows
from sologpt.classify import confusion, macro_f1_of

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "sentence_polarity"
WORD = re.compile(r"[\w']+|[^\w\s]")


def features(text, bigrams):
    words = WORD.findall(text.lower())
    return set(words) | ({f"{a} {b}" for a, b in zip(words, words[1:])} if bigrams else set())


def matrix(rows, vocab, bigrams):
    """(N, V) sparse presence matrix of the rows' features that are in vocab (a few dozen per row)."""
    index = [(i, vocab[f]) for i, (text, _) in enumerate(rows) for f in features(text, bigrams) if f in vocab]
    ij = torch.tensor(index, dtype=torch.long).t()  # (2, nnz)
    return torch.sparse_coo_tensor(ij, torch.ones(ij.shape[1]), (len(rows), len(vocab)),
                                   check_invariants=False).coalesce()


def take(x, rows):
    """Rows of a sparse matrix, still sparse."""
    return torch.index_select(x, 0, rows).coalesce()


def fit(x, y, n_classes, l2, steps=100):
    """Weights (V, C) and bias (C,) of L2-penalised logistic regression, by full-batch L-BFGS."""
    w = torch.zeros(x.shape[1], n_classes, requires_grad=True)
    b = torch.zeros(n_classes, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(torch.sparse.mm(x, w) + b, y) + l2 * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach(), b.detach()


def score(x, y, w, b, n_classes):
    pred = (torch.sparse.mm(x, w) + b).argmax(-1).numpy()
    counts = confusion(pred, y.numpy(), n_classes)
    return float(np.trace(counts) / len(pred)), macro_f1_of(counts)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--train", default=str(SHARED / "train.jsonl"), help="labelled rows, .jsonl or .csv")
    p.add_argument("--val", default=str(SHARED / "val.jsonl"), help="labelled rows scored once at the end")
    p.add_argument("--features", choices=("words", "bigrams"), default="bigrams")
    p.add_argument("--min_count", type=int, default=2, help="keep features seen in this many training texts")
    p.add_argument("--seed", type=int, default=1337)
    args = p.parse_args(argv)
    t0 = time.time()
    torch.manual_seed(args.seed)
    train, val = read_rows(args.train, "text", "label"), read_rows(args.val, "text", "label")
    labels = sorted({label for _, label in train})
    bigrams = args.features == "bigrams"
    counts = Counter(f for text, _ in train for f in features(text, bigrams))
    vocab = {f: i for i, f in enumerate(sorted(f for f, n in counts.items() if n >= args.min_count))}
    x, y = matrix(train, vocab, bigrams), torch.tensor([labels.index(label) for _, label in train])
    # the penalty: picked on a held-out tenth of the training rows, never on the validation file
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(args.seed))
    held, rest = order[:len(train) // 10], order[len(train) // 10:]
    grid = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2)
    picked = max(grid, key=lambda l2: score(take(x, held), y[held], *fit(take(x, rest), y[rest], len(labels), l2),
                                                len(labels))[0])
    w, b = fit(x, y, len(labels), picked)
    xv = matrix(val, vocab, bigrams)
    yv = torch.tensor([labels.index(label) for _, label in val])
    acc, f1 = score(xv, yv, w, b, len(labels))
    print(f"bag of {args.features} ({len(vocab):,} features, min_count {args.min_count}), logistic regression, "
          f"L2 {picked:g} (picked on held-out training rows): val accuracy {acc:.4f}, macro-F1 {f1:.4f} on "
          f"{len(val):,} rows; {time.time() - t0:.1f} s")
    return acc, f1


if __name__ == "__main__":
    main()
