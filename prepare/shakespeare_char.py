"""Tiny-shakespeare at character level: every distinct character is one token.

    python prepare/shakespeare_char.py [--input my.txt] [--name my_chars]

writes data/shakespeare_char/{train.bin, val.bin, meta.json}; meta.json's "chars" string
is the whole vocabulary (id i is chars[i]), so it is all sample.py needs to decode.
Two streaming passes (vocabulary, then encoding) keep memory flat for any file size.
"""

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as `python prepare/shakespeare_char.py`: make `prepare` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np

from prepare.common import TokenWriter, iter_text, publish, run, token_dtype

NAME = "shakespeare_char"
URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"


def scan_chars(path, chunk_bytes):
    """Pass 1: the sorted distinct characters and the number of characters."""
    seen, n_chars = set(), 0
    for piece in iter_text(path, chunk_bytes):
        seen.update(piece)
        n_chars += len(piece)
    return "".join(sorted(seen)), n_chars


def encode(piece, code_points):
    """Map each character to its index in the sorted code-point table, without a Python loop."""
    cps = np.frombuffer(piece.encode("utf-32-le"), dtype=np.uint32)  # one code point per character
    return np.searchsorted(code_points, cps)


def write_dataset(input_path, data_dir, val_fraction=0.1, chunk_bytes=1 << 20):
    """Write train.bin, val.bin and meta.json into data_dir and return the meta dict."""
    data_dir = Path(data_dir)
    chars, n_chars = scan_chars(input_path, chunk_bytes)
    code_points = np.array([ord(c) for c in chars], dtype=np.uint32)  # sorted, so searchsorted works
    dtype = token_dtype(len(chars))
    n_train = int(n_chars * (1 - val_fraction))  # the first n_train characters train, the rest validate
    data_dir.mkdir(parents=True, exist_ok=True)
    with TokenWriter(data_dir / "train.bin", dtype) as train, TokenWriter(data_dir / "val.bin", dtype) as val:
        pos = 0  # characters encoded so far
        for piece in iter_text(input_path, chunk_bytes):  # pass 2
            ids = encode(piece, code_points)
            cut = min(max(n_train - pos, 0), len(ids))  # part of this piece that still goes to train
            train.write(ids[:cut])
            val.write(ids[cut:])
            pos += len(ids)
    meta = {
        "tokenizer": "char",
        "vocab_size": len(chars),
        "dtype": np.dtype(dtype).name,
        "chars": chars,
    }
    return publish(data_dir, train, val, input_path, meta)


def main(argv=None):
    return run(argv, __doc__.splitlines()[0], NAME, URL, SHA256, write_dataset)


if __name__ == "__main__":
    main()
