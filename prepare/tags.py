"""Tagged text for a token-level head (train.py task="tag", entity recognition style): JSONL of words and their tags,
or of texts with character spans.

    python prepare/tags.py --input train.jsonl --val_input val.jsonl --name ner
    python prepare/tags.py --input rows.jsonl --name ner --tokenizer char --vocab_from out-small

A row is {"tokens": ["Paris", "is", "nice"], "tags": ["B-LOC", "O", "O"]} (words and one tag each, CoNLL style) or
{"text": "Paris is nice", "spans": [{"start": 0, "end": 5, "label": "LOC"}]} (character offsets, end exclusive;
sologpt/bio.py turns them into BIO tags of words). Tags named O, B-X and I-X are evaluated by entity (exact spans,
per type X); any other tag set tag by tag. The words are joined by spaces and tokenized one by one; each word's tag
sits on its last token (there a causal model has read the whole word), the other tokens carry -1 (not learned).

Writes data/NAME/{train,val}.bin (tokens), {train,val}_offsets.bin (int64 example boundaries), {train,val}_tags.bin
(int16 per token, -1 where none) and meta.json (task "tag", the tag names in id order, O first).
"""

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as `python prepare/tags.py`: make `prepare` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np

from prepare import examples
from prepare.common import PrepareError, token_dtype
from sologpt import bio


def parse(path, line, row):
    """A row -> (words, tags), or one error line naming the file and line."""
    try:
        if not isinstance(row, dict):
            raise bio.TagError("is not a JSON object")
        if "tokens" in row:
            words, tags = row["tokens"], row.get("tags")
            if not isinstance(words, list) or not words or \
                    not all(isinstance(w, str) and bio.WORD.fullmatch(w) for w in words):
                raise bio.TagError("has 'tokens' that is not a list of words (non-empty, without spaces)")
            if not isinstance(tags, list) or len(tags) != len(words) or not all(isinstance(t, str) and t.strip()
                                                                                for t in tags):
                raise bio.TagError(f"needs 'tags': one tag per word ({len(words)} words)")
            return words, tags
        if "text" in row:
            if not isinstance(row["text"], str) or not row["text"].strip():
                raise bio.TagError("has no text")
            words, tags = bio.spans_to_tags(row["text"], row.get("spans", []))
            return words, tags
        raise bio.TagError("has neither 'tokens' and 'tags' nor 'text' and 'spans'")
    except bio.TagError as e:
        raise PrepareError(f"{path}:{line} {e}")


def write_dataset(args):
    rows = examples.split(args, parse)
    seen = {t for split in rows.values() for _, tags in split for t in tags}
    names = sorted(seen - {"O"})
    names = (["O"] if "O" in seen or bio.scheme(names) == "bio" else []) + names
    if len(names) < 2:
        raise PrepareError(f"{args.input} has only the tag {names[0]!r}: a tagger needs at least two")
    unseen = sorted({t for _, tags in rows["val"] for t in tags} - {t for _, tags in rows["train"] for t in tags})
    if unseen:
        raise PrepareError(f"the validation rows have tags the training rows lack: {unseen[:3]}")
    enc, meta = examples.make_tokenizer(args, [" ".join(words) for split in rows.values() for words, _ in split])
    ids = {t: i for i, t in enumerate(names)}
    arrays, max_id = {}, 0
    for name, split in rows.items():
        encoded = []
        for words, tags in split:
            tokens, last = bio.encode_words(enc, words)
            values = np.full(len(tokens), -1, dtype=np.int16)
            values[last] = [ids[t] for t in tags]
            encoded.append((tokens, values))
        a, stats, lengths, top = examples.token_arrays(name, encoded, meta["vocab_size"], "tags", np.int16)
        arrays.update(a)
        max_id = max(max_id, top)
        meta.update(stats, **{f"{name}_words": sum(len(w) for w, _ in split)})
    meta.update(task="tag", tags=names, tag_scheme=bio.scheme(names),
                dtype=np.dtype(token_dtype(meta["vocab_size"])).name, max_token_id=max_id)
    data_dir, meta, lengths = examples.write(args, arrays, meta)
    print(f"{meta['train_examples']:,} train, {meta['val_examples']:,} val examples, {len(names)} tags "
          f"({meta['tag_scheme']}: {names[:8]}{' ...' if len(names) > 8 else ''}), tokenizer {meta['tokenizer']}; "
          f"train {examples.length_line(lengths)} -> {data_dir}")
    return data_dir, meta


def main(argv=None):
    examples.main(write_dataset, __doc__.splitlines()[0], argv)


if __name__ == "__main__":
    main()
