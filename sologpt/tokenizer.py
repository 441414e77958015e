"""Text <-> token ids, rebuilt from a dataset's meta.json (written by the prepare/ scripts).

meta["tokenizer"] is "char" (meta["chars"] lists the characters in id order) or a tiktoken encoding name
such as "gpt2". An optional meta["extra_tokens"] lists domain terms added as whole tokens after the
encoding's own ids (prepare/text.py --extra_tokens): GPT-2 plus 3 terms has ids 0..50259. Everything
needed to decode lives in meta.json, so a checkpoint plus its meta.json is enough to sample.
"""

import json
import re
from pathlib import Path

import tiktoken

EOT = "<|endoftext|>"


class TokenizerError(ValueError):
    """Text or a meta.json the tokenizer cannot handle; the message says what and how to fix it."""


class CharTokenizer:
    def __init__(self, chars, eot_token=None):
        self.chars = chars
        self.stoi = {ch: i for i, ch in enumerate(chars)}
        self.vocab_size = len(chars)
        self.eot_token = eot_token  # the id of the document separator, if the dataset has one

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
    """A tiktoken encoding, optionally extended with whole-word extra tokens after its own ids."""

    def __init__(self, name, extra_tokens=()):
        base = tiktoken.get_encoding(name)
        self.name, self.extra_tokens, self.eot_token = name, list(extra_tokens), base.eot_token
        self.extra_ids = {term: base.n_vocab + i for i, term in enumerate(self.extra_tokens)}
        if len(self.extra_ids) < len(self.extra_tokens) or base.special_tokens_set & set(self.extra_ids):
            raise TokenizerError(f"extra tokens must be distinct and not {name}'s own special tokens: "
                                 "run the dataset's prepare/ script again")
        if self.extra_tokens:
            # tiktoken's README extends an encoding this way; as special tokens the terms decode like any id
            self.enc = tiktoken.Encoding(f"{name}+extra", pat_str=base._pat_str,
                                         mergeable_ranks=base._mergeable_ranks,
                                         special_tokens={**base._special_tokens, **self.extra_ids})
        else:
            self.enc = base
        self.vocab_size = self.enc.n_vocab
        # Longest first, so "GPU cluster" wins over "GPU": a regex alternation takes the first that matches.
        terms = sorted(self.extra_ids, key=len, reverse=True)
        self._extra = re.compile("|".join(map(re.escape, terms))) if terms else None
        self._extra_or_eot = re.compile("|".join(map(re.escape, [*terms, EOT])))

    def _encode_split(self, text, pattern, ids):
        """encode_ordinary between the matches of pattern; each match becomes its id."""
        out, pos = [], 0
        for m in pattern.finditer(text):
            out += self.enc.encode_ordinary(text[pos:m.start()])
            out.append(ids[m.group()])
            pos = m.end()
        return out + self.enc.encode_ordinary(text[pos:])

    def encode_ordinary(self, text):
        """Ids for training text: "<|endoftext|>" in it is plain text, each extra term its own id
        wherever it occurs (also inside a longer word: "GPUs" is GPU + "s")."""
        if self._extra is None:
            return self.enc.encode_ordinary(text)
        return self._encode_split(text, self._extra, self.extra_ids)

    def encode(self, text):
        # "<|endoftext|>" written in a prompt means the special token, as GPT-2 was trained with it
        if self._extra is None:
            return self.enc.encode(text, allowed_special={EOT})
        return self._encode_split(text, self._extra_or_eot, {**self.extra_ids, EOT: self.eot_token})

    def decode(self, ids):
        return self.enc.decode(ids)


def example_ids(enc, text, drop_unknown=False):
    """The ids of one classification example (prepare/classify.py, sample.py, tools/evaluate.py): its tokens, with
    "<|endoftext|>" in the text read as plain text, then the end marker the classification head reads: the
    tokenizer's end-of-text token, or "\\n" for characters without one. drop_unknown: characters a character
    vocabulary lacks are left out instead of refused."""
    if isinstance(enc, CharTokenizer):
        if drop_unknown:
            text = "".join(ch for ch in text if ch in enc.stoi)
        end = enc.eot_token if enc.eot_token is not None else enc.stoi.get("\n")
        if end is None:
            raise TokenizerError("the character vocabulary has neither an end-of-text token nor \"\\n\" to end an "
                                 "example with: prepare the text with a tokenizer that has one")
        return enc.encode(text) + [end]
    return enc.encode_ordinary(text) + [enc.eot_token]


def read_extra_tokens(path, name="gpt2"):
    """The terms in a file (one per line; blank lines and surrounding spaces ignored) that become new
    tokens, in file order, and one warning per line skipped: a repeated term, or one the encoding
    already has as a single token (a new id would never be trained)."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise TokenizerError(f"cannot read the extra tokens file {path} ({e}): "
                             "give a UTF-8 text file, one term a line")
    base = tiktoken.get_encoding(name)
    terms, warnings = {}, []  # a dict keeps file order and finds repeats fast
    for lineno, line in enumerate(lines, 1):
        term = line.strip()
        if not term:
            continue
        if term in terms:
            warnings.append(f"{path}:{lineno}: {term!r} is listed twice; kept once")
        elif term in base.special_tokens_set or len(base.encode_ordinary(term)) == 1:
            warnings.append(f"{path}:{lineno}: {term!r} is already a single {name} token; skipped")
        else:
            terms[term] = None
    return list(terms), warnings


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
        return CharTokenizer(meta["chars"], meta.get("eot_token"))
    extra = meta.get("extra_tokens", [])
    if not isinstance(extra, list) or not all(isinstance(t, str) and t for t in extra):
        raise TokenizerError("meta.json's 'extra_tokens' must be a list of non-empty strings: "
                             "run the dataset's prepare/ script again")
    try:
        tok = TiktokenTokenizer(kind, extra)
    except Exception as e:  # unknown name, or the BPE files cannot be fetched offline
        raise TokenizerError(f"tokenizer {kind!r} from meta.json cannot be loaded ({type(e).__name__}: {e}); "
                             f"offline, set TIKTOKEN_CACHE_DIR to a tiktoken cache")
    if extra and tok.vocab_size != meta["vocab_size"]:  # a hand-edited list would shift every id after it
        raise TokenizerError(f"meta.json says vocab_size={meta['vocab_size']} but {kind} plus {len(extra)} extra "
                             f"tokens makes {tok.vocab_size}: run the dataset's prepare/ script again")
    return tok


def gpt2_meta():
    """The meta.json of GPT-2's own tokenizer, for a Hugging Face GPT-2 directory that has none."""
    return {"tokenizer": "gpt2", "vocab_size": 50257, "eot_token": 50256}


def find_meta(ckpt_path, ckpt, also=()):
    """The meta.json that goes with a checkpoint: beside it (train.py copies it there), then in the folders of
    `also`, then in the dataset folder its train_config names (older runs)."""
    train_cfg = ckpt.get("train_config") or {}
    candidates = [Path(ckpt_path).parent / "meta.json", *(Path(d) / "meta.json" for d in also)]
    if "data_root" in train_cfg and "dataset" in train_cfg:
        candidates.append(Path(train_cfg["data_root"]) / train_cfg["dataset"] / "meta.json")
    path = next((p for p in candidates if p.is_file()), None)
    if path is None:
        raise TokenizerError(f"no meta.json beside {ckpt_path} or in the dataset folder: the tokenizer is unknown")
    return path
