"""Text <-> token ids, rebuilt from a dataset's meta.json (written by the prepare/ scripts).

meta["tokenizer"] is "char" (meta["chars"] lists the characters in id order) or a tiktoken encoding name
such as "gpt2". Everything needed to decode lives in meta.json, so a checkpoint plus its meta.json is enough
to sample.
"""

import json
from pathlib import Path


class TokenizerError(ValueError):
    """Text or a meta.json the tokenizer cannot handle; the message says what and how to fix it."""


class CharTokenizer:
    def __init__(self, chars):
        self.chars = chars
        self.stoi = {ch: i for i, ch in enumerate(chars)}
        self.vocab_size = len(chars)
        self.eot_token = None

    def encode(self, text):
        unknown = sorted(set(text) - self.stoi.keys())
        if unknown:
            shown = ", ".join(f"{ch!r} (U+{ord(ch):04X})" for ch in unknown[:5])
            raise TokenizerError(f"the text has characters the {self.vocab_size}-character vocabulary lacks: {shown}; "
                                 f"use only characters from the training text")
        return [self.stoi[ch] for ch in text]

    def decode(self, ids):
        return "".join(self.chars[i] for i in ids)


class TiktokenTokenizer:
    def __init__(self, name):
        import tiktoken
        self.enc = tiktoken.get_encoding(name)
        self.vocab_size = self.enc.n_vocab
        self.eot_token = self.enc.eot_token

    def encode(self, text):
        # "<|endoftext|>" written in a prompt means the special token, as GPT-2 was trained with it
        return self.enc.encode(text, allowed_special={"<|endoftext|>"})

    def decode(self, ids):
        return self.enc.decode(ids)


def load_meta(path):
    path = Path(path)
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise TokenizerError(f"{path} is missing: run the dataset's prepare/ script")
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise TokenizerError(f"{path} is not valid JSON ({e}): run the dataset's prepare/ script again")
    for key in ("tokenizer", "vocab_size"):
        if key not in meta:
            raise TokenizerError(f"{path} has no {key!r}: run the dataset's prepare/ script again")
    if type(meta["vocab_size"]) is not int or meta["vocab_size"] < 1:
        raise TokenizerError(f"{path}: vocab_size={meta['vocab_size']!r} is not a positive integer")
    return meta


def from_meta(meta):
    kind = meta["tokenizer"]
    if kind == "char":
        if not isinstance(meta.get("chars"), str) or len(meta["chars"]) != meta["vocab_size"]:
            raise TokenizerError("meta.json of a char dataset needs 'chars' with vocab_size characters")
        return CharTokenizer(meta["chars"])
    try:
        return TiktokenTokenizer(kind)
    except Exception as e:  # unknown name, or the BPE files cannot be fetched offline
        raise TokenizerError(f"tokenizer {kind!r} from meta.json cannot be loaded ({type(e).__name__}: {e}); "
                             f"offline, set TIKTOKEN_CACHE_DIR to a tiktoken cache")
