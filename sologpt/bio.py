"""Tags per word for task "tag" (entity recognition style), without torch: prepare/tags.py, sologpt/tag.py and
sample.py share it.

- Words are the whitespace-separated pieces of a text. Character spans ({"start", "end", "label"}) become BIO tags
  of words: the first word a span touches is B-label, the others I-label, words outside every span O.
- A word's tag sits on its LAST token (encode_words): the model is causal, so only there has it read the whole word
  (and everything before it, never what follows).
- Entities: the runs of one type in a sequence of BIO tags (B-X starts one; I-X continues one of type X, or starts
  one after another type, as conlleval counts it).
"""

import re

WORD = re.compile(r"\S+")


class TagError(ValueError):
    """A row whose tags cannot be used; the message says what."""


def words_of(text):
    """[(word, start, end)]: the whitespace-separated words of a text with their character offsets."""
    return [(m.group(), m.start(), m.end()) for m in WORD.finditer(text)]


def spans_to_tags(text, spans):
    """(words, BIO tags) of a text with character spans [{"start", "end", "label"}] (end exclusive)."""
    words = words_of(text)
    tags = ["O"] * len(words)
    taken = [None] * len(words)
    for s in spans:
        if not isinstance(s, dict) or not all(isinstance(s.get(k), int) for k in ("start", "end")) \
                or not isinstance(s.get("label"), str) or not s["label"].strip():
            raise TagError("has a span that is not {\"start\": int, \"end\": int, \"label\": text}")
        if not 0 <= s["start"] < s["end"] <= len(text):
            raise TagError(f"has a span {s['start']}..{s['end']} outside its text of {len(text)} characters")
        inside = [i for i, (_, a, b) in enumerate(words) if a < s["end"] and b > s["start"]]
        if not inside:
            raise TagError(f"has a span {s['start']}..{s['end']} that covers no word")
        for k, i in enumerate(inside):
            if taken[i] is not None:
                raise TagError(f"has overlapping spans at word {words[i][0]!r}")
            taken[i] = True
            tags[i] = ("B-" if k == 0 else "I-") + s["label"]
    return [w for w, _, _ in words], tags


def scheme(tag_names):
    """"bio" when every tag is O, B-X or I-X (evaluation by entity), else "plain" (evaluation by tag)."""
    return "bio" if all(t == "O" or t[:2] in ("B-", "I-") and len(t) > 2 for t in tag_names) else "plain"


def classes(tag_names):
    """The classes evaluation reports: entity types (bio) or the tags themselves (plain)."""
    if scheme(tag_names) == "bio":
        return sorted({t[2:] for t in tag_names if t != "O"})
    return list(tag_names)


def encode_words(enc, words):
    """(ids, last): the tokens of the words joined by spaces, each word tokenized on its own (with its leading
    space, as GPT-2's BPE splits text anyway), and the index of each word's last token."""
    ordinary = getattr(enc, "encode_ordinary", enc.encode)
    ids, last = [], []
    for i, word in enumerate(words):
        piece = ordinary(word if i == 0 else " " + word)
        if not piece:
            raise TagError(f"word {word!r} has no tokens")
        ids += piece
        last.append(len(ids) - 1)
    return ids, last


def entities(tags):
    """{(type, first word, last word)} of a BIO tag sequence."""
    out, start, kind = set(), None, None
    for i, t in enumerate([*tags, "O"]):
        if kind is not None and not (t[:2] == "I-" and t[2:] == kind):
            out.add((kind, start, i - 1))
            kind = None
        if kind is None and t != "O" and t[:2] in ("B-", "I-"):
            start, kind = i, t[2:]
    return out


def counts(gold, pred, tag_names):
    """{class: [true positives, predicted, gold]} of one sequence: entities (bio) or words (plain)."""
    names = classes(tag_names)
    c = {name: [0, 0, 0] for name in names}
    if scheme(tag_names) == "bio":
        g, p = entities(gold), entities(pred)
        for kind, *_ in p:
            c[kind][1] += 1
        for kind, *_ in g:
            c[kind][2] += 1
        for kind, *_ in g & p:
            c[kind][0] += 1
    else:
        for a, b in zip(gold, pred):
            c[b][1] += 1
            c[a][2] += 1
            c[a][0] += a == b
    return c


def scores(c):
    """Per class precision, recall, F1 from counts() summed over sequences; a class never predicted nor present
    scores 0."""
    out = {}
    for name, (tp, n_pred, n_gold) in c.items():
        p = tp / n_pred if n_pred else 0.0
        r = tp / n_gold if n_gold else 0.0
        out[name] = (p, r, 2 * p * r / (p + r) if p + r else 0.0)
    return out
