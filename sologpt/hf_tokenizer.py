"""The tokenizer files of an exported Hugging Face directory (tools/export.py), so that
transformers.AutoTokenizer.from_pretrained(dir) encodes text to the same ids as sologpt (tests/test_export.py checks
text -> ids -> text against transformers):

- GPT-2 BPE (tiktoken "gpt2"): vocab.json and merges.txt, GPT-2's own files, rebuilt from tiktoken's ranks;
- GPT-2 plus domain tokens (prepare/text.py --extra_tokens): the same, with the terms as added tokens;
- characters: tokenizer.json for transformers' PreTrainedTokenizerFast (the `tokenizers` format), one token per
  character: a BPE model with no merges, whose decoder joins the tokens without spaces.

Only plain files are written (json), so exporting needs neither transformers nor tokenizers installed.
"""

import functools
import json
from pathlib import Path

import tiktoken

from sologpt.tokenizer import EOT

FILES = ("vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def byte_symbols():
    """GPT-2's printable stand-in for each of the 256 bytes (its encoder.py, Radford et al. 2019): the printable
    Latin-1 bytes stand for themselves, the 68 others (controls, space, 0x7F-0xA0, 0xAD) for U+0100 onwards, in byte
    order. vocab.json and merges.txt spell tokens with these."""
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    symbols, extra = {}, 0
    for b in range(256):
        if b in printable:
            symbols[b] = chr(b)
        else:
            symbols[b] = chr(0x100 + extra)
            extra += 1
    return symbols


@functools.lru_cache(maxsize=None)  # about a second of work, the same every time
def gpt2_vocab_and_merges(name="gpt2"):
    """({token string: id}, ["left right", ...] in merge order) of a tiktoken BPE encoding. tiktoken keeps only each
    token's rank (= its id, the order in which the merges were learned); the merge that made a token of rank r is
    found by running BPE on its bytes with the merges of rank < r, which ends in exactly two parts."""
    ranks = tiktoken.get_encoding(name)._mergeable_ranks  # {token bytes: rank}
    symbols = byte_symbols()

    def spell(token):
        return "".join(symbols[b] for b in token)

    vocab, merges = {}, []
    for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        vocab[spell(token)] = rank
        if len(token) == 1:
            continue
        parts = [token[i:i + 1] for i in range(len(token))]
        while len(parts) > 2:  # merge the pair of lowest rank below this token's, as BPE would have
            best = min(range(len(parts) - 1), key=lambda i: ranks.get(parts[i] + parts[i + 1], 1 << 62))
            if ranks.get(parts[best] + parts[best + 1], 1 << 62) >= rank:
                raise ValueError(f"token {rank} of {name} is not the merge of two earlier tokens")
            parts[best:best + 2] = [parts[best] + parts[best + 1]]
        merges.append(f"{spell(parts[0])} {spell(parts[1])}")
    return vocab, merges


def save(meta, path, block_size):
    """Write the tokenizer files of meta.json's tokenizer into the export folder path; returns a one-line note of
    what was written (tokenizers transformers cannot load get a TOKENIZER.md instead, which says why)."""
    path = Path(path)
    kind = meta["tokenizer"]
    common = {"model_max_length": block_size, "clean_up_tokenization_spaces": False}
    if kind == "char":
        vocab = {ch: i for i, ch in enumerate(meta["chars"])}
        tokenizer = {"version": "1.0", "truncation": None, "padding": None, "added_tokens": [], "normalizer": None,
                     "pre_tokenizer": None, "post_processor": None, "decoder": {"type": "Fuse"},
                     "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                               "end_of_word_suffix": None, "fuse_unk": False, "vocab": vocab, "merges": []}}
        _write_json(path / "tokenizer.json", tokenizer)
        _write_json(path / "tokenizer_config.json", {"tokenizer_class": "PreTrainedTokenizerFast", **common})
        return f"tokenizer.json ({len(vocab)} characters; characters outside them are dropped, not refused)"
    if kind != "gpt2":
        note = (f"# Tokenizer\n\nThis model was trained with tiktoken's {kind!r} encoding, for which sologpt writes no "
                f"Hugging Face tokenizer files: encode text with tiktoken.get_encoding({kind!r}).\n")
        (path / "TOKENIZER.md").write_text(note, encoding="utf-8")
        return f"TOKENIZER.md (no Hugging Face files for tiktoken's {kind!r})"
    vocab, merges = gpt2_vocab_and_merges(kind)
    vocab = {**vocab, EOT: len(vocab)}  # 50256, after the 50256 BPE tokens
    extra = meta.get("extra_tokens", [])
    added = {str(vocab[EOT]): _added(EOT, special=True)}
    for i, term in enumerate(extra):  # ids 50257, 50258, ... as prepare/text.py assigned them
        added[str(len(vocab) + i)] = _added(term, special=False)
    _write_json(path / "vocab.json", vocab)
    (path / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    special = {"bos_token": EOT, "eos_token": EOT, "unk_token": EOT}
    _write_json(path / "tokenizer_config.json", {"tokenizer_class": "GPT2Tokenizer", "add_prefix_space": False,
                                                 "add_bos_token": False, "errors": "replace", **special, **common,
                                                 "added_tokens_decoder": added})
    _write_json(path / "special_tokens_map.json", special)
    wrote = f"vocab.json + merges.txt (GPT-2 BPE{f', {len(extra)} added domain tokens' if extra else ''})"
    unusual = [term for term in extra if not term.isascii()]
    if unusual:  # measured with transformers 5.24: the ids match, the decoded text does not
        (path / "TOKENIZER.md").write_text(
            "# Tokenizer\n\nAutoTokenizer encodes text to the same ids as sologpt. Decoding differs for the domain "
            f"tokens with non-ASCII characters ({', '.join(map(repr, unusual[:5]))}): transformers passes added "
            "tokens through GPT-2's byte-level decoder, which reads such characters as single bytes. Decode with "
            "sologpt (sample.py) or tiktoken to get them back.\n", encoding="utf-8")
        wrote += f"; TOKENIZER.md: transformers decodes the {len(unusual)} non-ASCII domain tokens wrongly"
    return wrote


def _added(content, special):
    return {"content": content, "lstrip": False, "rstrip": False, "normalized": False, "single_word": False,
            "special": special}


def _write_json(path, obj):
    path.write_text(json.dumps(obj, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
