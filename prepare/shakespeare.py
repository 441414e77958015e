"""Tiny-shakespeare with GPT-2's BPE tokenizer (tiktoken "gpt2", 50257 tokens).

    python prepare/shakespeare.py [--input my.txt] [--name my_bpe]

writes data/shakespeare/{train.bin, val.bin, meta.json}. The text is tokenized in streamed
chunks that give exactly the tokens of the whole text (see SAFE_CUT), so memory stays
flat for any file size. Offline, point TIKTOKEN_CACHE_DIR at a folder holding tiktoken's cache.
"""

import re
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as `python prepare/shakespeare.py`: make `prepare` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import tiktoken

from prepare.common import PrepareError, TokenWriter, iter_text, publish, run, token_dtype

NAME = "shakespeare"
URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"

# Where can the text be cut without changing the tokens? tiktoken first splits the text with
# GPT-2's regex (tiktoken 0.14's gpt2 pattern)
#     '(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s
# and runs BPE inside each piece. Only the all-whitespace alternatives can match "\n" or "\r",
# so a piece holding a non-space character never runs on into a line break after it: a piece
# always ends right before a line break that follows a non-space character. The look-aheads
# ((?!\S) and $) only look past a whitespace run, and no run ends at such a cut, so the pieces
# before the cut come out the same; the regex has no look-behind, so neither do the pieces after
# it. Tokenizing the two sides separately thus gives exactly the tokens of the whole text
# (tests/test_prepare.py checks it). "\r" counts too, else a CRLF file would have no cut at all.
# Python's \S is slightly narrower than the regex's (U+001C..U+001F count as space here), which
# only makes us skip a few valid cuts, never take a bad one.
SAFE_CUT = re.compile(r"\S(?=[\r\n])")  # the text may be cut right after this match


def last_safe_cut(text):
    """The largest i > 0 such that text[:i] | text[i:] is a safe cut, or 0 if there is none."""
    cut = 0
    for m in SAFE_CUT.finditer(text):
        cut = m.end()
    return cut


def first_safe_cut(text, lo):
    """The smallest i >= lo such that text[:i] | text[i:] is a safe cut, or None."""
    m = SAFE_CUT.search(text, max(lo - 1, 0))
    return m.end() if m else None


def load_gpt2():
    try:
        return tiktoken.get_encoding("gpt2")
    except Exception as e:  # offline without a cache, tiktoken fails inside its downloader
        raise PrepareError(f"could not load tiktoken's gpt2 encoding ({e}): connect to the internet once, "
                           "or set TIKTOKEN_CACHE_DIR to a folder holding its cached files") from None


def write_dataset(input_path, data_dir, val_fraction=0.1, chunk_bytes=1 << 20):
    """Write train.bin, val.bin and meta.json into data_dir and return the meta dict.
    Train ends at the first safe cut at or after (1 - val_fraction) of the characters."""
    data_dir = Path(data_dir)
    enc = load_gpt2()
    n_chars = sum(len(piece) for piece in iter_text(input_path, chunk_bytes))  # pass 1
    split_at = int(n_chars * (1 - val_fraction))
    dtype = token_dtype(enc.n_vocab)
    data_dir.mkdir(parents=True, exist_ok=True)
    with TokenWriter(data_dir / "train.bin", dtype) as train, TokenWriter(data_dir / "val.bin", dtype) as val:
        out = train
        pending, start = "", 0  # text not tokenized yet, and its offset (in characters) in the file
        for piece in iter_text(input_path, chunk_bytes):  # pass 2
            pending += piece
            if out is train and start + len(pending) > split_at:  # the split may lie in pending
                cut = first_safe_cut(pending, split_at - start)
                if cut is not None:
                    train.write(enc.encode_ordinary(pending[:cut]))
                    pending, start, out = pending[cut:], start + cut, val
            # Tokenize up to the last safe cut; the tail waits for the next piece. While still on
            # train, this cut lies before split_at (else first_safe_cut would have found one).
            cut = last_safe_cut(pending)
            out.write(enc.encode_ordinary(pending[:cut]))
            pending, start = pending[cut:], start + cut
        out.write(enc.encode_ordinary(pending))
    meta = {
        "tokenizer": "gpt2",
        "vocab_size": enc.n_vocab,
        "dtype": np.dtype(dtype).name,
        "eot_token": enc.eot_token,
    }
    return publish(data_dir, train, val, input_path, meta)


def main(argv=None):
    return run(argv, __doc__.splitlines()[0], NAME, URL, SHA256, write_dataset)


if __name__ == "__main__":
    main()
