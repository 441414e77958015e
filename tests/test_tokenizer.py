"""Tests for tokenizer.py: GPT-2 extended with domain terms (round trips, ids, longest match, the terms file),
and meta.json compatibility: datasets written before extra tokens existed still load."""

import json

import pytest

from sologpt import tokenizer
from sologpt.tokenizer import CharTokenizer, TiktokenTokenizer, TokenizerError, from_meta, load_meta, read_extra_tokens

from conftest import SHARED

TERMS = ["Kubernetes", "GPU cluster", "GPU", "ReLU²", "量子计算"]


def test_extra_tokens_round_trip():
    tok = TiktokenTokenizer("gpt2", TERMS)
    assert tok.vocab_size == 50257 + len(TERMS) and tok.eot_token == 50256
    assert tok.extra_ids == {t: 50257 + i for i, t in enumerate(TERMS)}
    text = "Our GPU cluster runs Kubernetes; one GPU uses ReLU². 量子计算 too.\n"
    ids = tok.encode_ordinary(text)
    assert [i for i in ids if i >= 50257] == [50258, 50257, 50259, 50260, 50261]  # "GPU cluster" beat "GPU"
    assert tok.decode(ids) == text
    assert all(i < 50257 for i in tok.encode_ordinary("plain text, no terms"))
    assert tok.encode_ordinary("plain text") == TiktokenTokenizer("gpt2").encode_ordinary("plain text")


def test_terms_match_anywhere_and_endoftext():
    tok = TiktokenTokenizer("gpt2", ["GPU"])
    ids = tok.encode_ordinary("GPUs")  # inside a longer word too, like a special token
    assert ids[0] == 50257 and tok.decode(ids) == "GPUs"
    # training text: "<|endoftext|>" is plain text; a prompt: the separator token
    assert 50256 not in tok.encode_ordinary("a<|endoftext|>GPU")
    assert tok.encode("a<|endoftext|>GPU") == [64, 50256, 50257]
    plain = TiktokenTokenizer("gpt2")
    assert plain.encode("a<|endoftext|>b") == [64, 50256, 65]  # unchanged without extra tokens


def test_read_extra_tokens(tmp_path):
    path = tmp_path / "terms.txt"
    path.write_text("Kubernetes\n\n  GPU cluster  \nthe\nKubernetes\n<|endoftext|>\n  \nHyperparameter\n",
                    encoding="utf-8")
    terms, warnings = read_extra_tokens(path)
    assert terms == ["Kubernetes", "GPU cluster", "Hyperparameter"]  # file order, stripped, blank lines gone
    assert warnings == [f"{path}:4: 'the' is already a single gpt2 token; skipped",
                        f"{path}:5: 'Kubernetes' is listed twice; kept once",
                        f"{path}:6: '<|endoftext|>' is already a single gpt2 token; skipped"]
    path.write_bytes(b"caf\xe9\n")
    with pytest.raises(TokenizerError, match="UTF-8"):
        read_extra_tokens(path)
    with pytest.raises(TokenizerError, match="cannot read"):
        read_extra_tokens(tmp_path / "missing.txt")


def test_meta_with_extra_tokens(tmp_path):
    meta = {"tokenizer": "gpt2", "vocab_size": 50257 + len(TERMS), "extra_tokens": TERMS, "eot_token": 50256}
    path = tmp_path / "meta.json"
    path.write_text(json.dumps(meta, ensure_ascii=False), encoding="utf-8")
    tok = from_meta(load_meta(path))
    text = "GPU cluster and 量子计算"
    assert tok.decode(tok.encode(text)) == text and max(tok.encode(text)) >= 50257
    with pytest.raises(TokenizerError, match="vocab_size=50258 but gpt2 plus 5 extra tokens makes 50262"):
        from_meta({**meta, "vocab_size": 50258})
    with pytest.raises(TokenizerError, match="list of non-empty strings"):
        from_meta({**meta, "extra_tokens": "GPU"})
    for bad in (["GPU", "GPU"], ["<|endoftext|>"]):  # would give two ids one meaning
        with pytest.raises(TokenizerError, match="distinct and not gpt2's own special tokens"):
            from_meta({**meta, "extra_tokens": bad, "vocab_size": 50257 + len(bad)})


def test_old_meta_files_still_load(tmp_path):
    gpt2 = from_meta({"tokenizer": "gpt2", "vocab_size": 50257})  # as prepare/shakespeare.py writes it
    assert isinstance(gpt2, TiktokenTokenizer) and gpt2.vocab_size == 50257 and gpt2.extra_tokens == []
    assert gpt2.decode(gpt2.encode("To be, or not")) == "To be, or not"
    char = from_meta({"tokenizer": "char", "vocab_size": 3, "chars": "\nab"})  # as shakespeare_char.py does
    assert isinstance(char, CharTokenizer) and char.eot_token is None and char.decode(char.encode("ab\n")) == "ab\n"
    char = from_meta({"tokenizer": "char", "vocab_size": 3, "chars": "\x03ab", "eot_token": 0})  # text.py's
    assert char.eot_token == 0


@pytest.mark.parametrize("lang", ["cmn_hans", "arb", "hin", "jpn"])
def test_extended_tokenizer_round_trips_every_script(lang):
    text = (SHARED / "data" / "udhr" / f"{lang}.txt").read_text(encoding="utf-8")
    tok = tokenizer.TiktokenTokenizer("gpt2", [text.split()[3][:4]])  # a term from the text itself
    ids = tok.encode_ordinary(text)
    assert tok.decode(ids) == text and max(ids) == 50257
