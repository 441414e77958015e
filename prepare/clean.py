"""Cleaning rules and quality filters for prepare/text.py: plain functions of one document's text.

clean(text, rules) applies the cleaning rules that are switched on and names the ones that changed the
text; quality_problem(text, words, limits) names the first quality filter the text fails, or None.
Both see one document at a time, so they run in any worker process and memory stays per document.

Nothing here may damage text in other scripts: the rules touch only markup, control characters,
URLs, e-mail addresses and whitespace, and the word-based filters know that Chinese, Japanese and
Thai are written without spaces between words (tests/test_text_prep.py runs them on the UDHR in
16 languages).
"""

import html
import re
import unicodedata
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

# --- cleaning ------------------------------------------------------------------------------

CLEAN_RULES = ("nfc", "control", "html", "urls", "emails", "whitespace")  # in the order they run

# Line breaks spelled differently: CRLF and CR (Windows and old Mac files), NEL (U+0085, from
# EBCDIC and Latin-1 files; webtext/wine.txt has one), Unicode's line and paragraph separators.
LINE_BREAK = re.compile("\r\n|[\r\x85\u2028\u2029]")
# C0 and C1 control characters except tab and newline. Format characters (Cf: zero-width joiner,
# soft hyphen, bidi marks) stay: Hindi, Persian and emoji sequences need them.
CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f]")

# Only real HTML element names count as tags, so "<Ctrl-N>", "<name>" or "x <y> z" in plain text survive.
_TAGS = ("a abbr address article aside b bdi bdo big blockquote body br button caption center cite code col "
         "colgroup dd del details dfn div dl dt em embed fieldset figcaption figure font footer form h1 h2 h3 h4 "
         "h5 h6 head header hr html i iframe img input ins kbd label legend li link main mark meta nav noscript "
         "object ol optgroup option p param pre q s samp section select small source span strike strong sub "
         "summary sup table tbody td textarea tfoot th thead time title tr tt u ul var video wbr").split()
# Tags that end a block of text become a line break, the rest vanish: "<p>a</p><p>b</p>" -> "a\nb".
_BLOCK_TAGS = "address article blockquote br div dl dt dd footer h1 h2 h3 h4 h5 h6 header hr li ol p pre " \
              "section table tr ul".split()
SCRIPT_OR_STYLE = re.compile(r"<(script|style)\b[^>]*>.*?</\1\s*>", re.IGNORECASE | re.DOTALL)  # code, not text
HTML_COMMENT = re.compile(r"<!--.*?-->", re.DOTALL)
HTML_TAG = re.compile(rf"</?({'|'.join(sorted(_TAGS, key=len, reverse=True))})\b[^<>]*>", re.IGNORECASE)
HTML_ENTITY = re.compile(r"&(?:[A-Za-z][A-Za-z0-9]{1,31}|#[0-9]{1,7}|#[xX][0-9A-Fa-f]{1,6});")  # "AT&T" is not one

# Up to the first space, then give back the punctuation that ends the sentence: "see http://x.org/a."
URL = re.compile(r"\b(?:https?://|ftp://|www\.)\S+?(?=[.,;:!?)\]'\"]*(?:\s|$))", re.IGNORECASE)
EMAIL = re.compile(r"\b[\w.+-]+@[\w-]+(?:\.[\w-]+)*\.[A-Za-z]{2,}\b")

TRAILING_SPACE = re.compile(r"[^\S\n]+$", re.MULTILINE)
INNER_SPACE_RUN = re.compile(r"(?<=\S)[^\S\n]{2,}(?=\S)")  # inside a line; indentation stays (code, poems)
BLANK_LINES = re.compile(r"\n{3,}")  # at most one empty line between paragraphs


def _html_tag(m):
    return "\n" if m.group(1).lower() in _BLOCK_TAGS else ""


def clean(text, rules):
    """Apply the cleaning rules named in `rules` (a set, see CLEAN_RULES); return the new text and the
    list of rules that changed it (the report counts documents changed per rule)."""
    changed = []

    def apply(rule, new):
        nonlocal text
        if new != text:
            changed.append(rule)
            text = new

    if "nfc" in rules and not unicodedata.is_normalized("NFC", text):
        apply("nfc", unicodedata.normalize("NFC", text))  # composed form: "e" + U+0301 -> "é"
    if "control" in rules:
        new = text
        if any(c in text for c in "\r\x85\u2028\u2029"):  # `in` is much faster than a regex scan
            new = LINE_BREAK.sub("\n", text)
        apply("control", CONTROL.sub("", new))
    if "html" in rules and ("<" in text or "&" in text):
        new = HTML_TAG.sub(_html_tag, HTML_COMMENT.sub("", SCRIPT_OR_STYLE.sub("", text)))
        # entities last, so an escaped "&lt;b&gt;" becomes the text "<b>" instead of a removed tag
        apply("html", HTML_ENTITY.sub(lambda m: html.unescape(m.group()), new))
    if "urls" in rules and ("://" in text or "www." in text.lower()):
        apply("urls", URL.sub("", text))
    if "emails" in rules and "@" in text:
        apply("emails", EMAIL.sub("", text))
    if "whitespace" in rules:
        new = INNER_SPACE_RUN.sub(" ", TRAILING_SPACE.sub("", text))
        if "\n\n\n" in new:
            new = BLANK_LINES.sub("\n\n", new)
        apply("whitespace", new.strip())
    return text, changed


# --- quality filters -------------------------------------------------------------------------

@dataclass(frozen=True)
class Limits:
    """Quality thresholds; 0 switches a rule off. Defaults in text.py's flags, reasons in docs/data.md."""
    min_chars: int = 0
    min_words: int = 0
    max_symbol_ratio: float = 0.0
    max_digit_ratio: float = 0.0
    max_repeated_lines: float = 0.0
    max_repeated_ngrams: float = 0.0
    ngram_size: int = 5
    min_mean_word_length: float = 0.0
    max_mean_word_length: float = 0.0

    @property
    def uses_words(self):
        return bool(self.min_words or self.max_repeated_ngrams or self.min_mean_word_length
                    or self.max_mean_word_length)


FILTERS = ("min_chars", "min_words", "symbol_ratio", "digit_ratio", "repeated_lines", "repeated_ngrams",
           "mean_word_length")  # in the order they run; the report counts a document under the first it fails

# Scripts written without spaces between words (Thai, Lao, Myanmar, Khmer, CJK punctuation, kana,
# CJK ideographs, fullwidth forms): each character counts as one word, so a Chinese sentence has
# about as many "words" as its meaning suggests instead of one enormous word. (U+3000, the
# ideographic space, is left out: it separates words.)
NO_SPACE = "\u0e00-\u0eff\u1000-\u109f\u1780-\u17ff\u3001-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uff01-\uffef"
WORD = re.compile(rf"[{NO_SPACE}]|[^\s{NO_SPACE}]+")
SPACED_WORD = re.compile(rf"[^\s{NO_SPACE}]+")


@lru_cache(maxsize=1)
def char_classes():
    """A table from code point to 0 (letter, mark, space, ...), 1 (digit) or 2 (punctuation or symbol), so
    that counting digits and symbols is one numpy lookup instead of a Python loop per character. The last
    digit, punctuation or symbol is U+1FBF9 (Unicode 15; planes 2 and up hold ideographs, tags, variation
    selectors, private use), so classifying 0x20000 code points suffices: 0.1 s once per process, not 0.8 s."""
    table = np.zeros(0x110000, dtype=np.uint8)
    cats = [unicodedata.category(chr(cp)) for cp in range(0x20000)]
    table[:0x20000] = [1 if cat == "Nd" else 2 if cat[0] in "PS" else 0 for cat in cats]
    return table


def digit_and_symbol_ratios(text):
    """Shares of the non-space characters that are digits (Nd) and punctuation or symbols (P*, S*)."""
    cps = np.frombuffer("".join(text.split()).encode("utf-32-le"), dtype=np.uint32)  # one per character
    if cps.size == 0:
        return 0.0, 0.0
    counts = np.bincount(char_classes()[cps], minlength=3)
    return counts[1] / cps.size, counts[2] / cps.size


def repeated_line_ratio(text):
    """Share of the characters (in non-empty lines) that sit in lines repeating an earlier line: menus,
    boilerplate, spam. Counting characters, not lines, lets a play's short speaker names ("ROMEO:")
    repeat freely (Gopher, Rae et al. 2021, also measures duplicate lines by characters)."""
    seen, repeated, total = set(), 0, 0
    for line in text.split("\n"):
        line = line.strip()
        total += len(line)
        if line in seen:
            repeated += len(line)
        seen.add(line)
    return repeated / total if total else 0.0


def repeated_ngram_ratio(words, n):
    """Share of the word n-grams that repeat an earlier one ("buy now buy now buy now ...")."""
    grams = list(zip(*(words[i:] for i in range(n))))
    return 1 - len(set(grams)) / len(grams) if grams else 0.0


def mean_word_length(text, words):
    """Mean length of the space-separated words, or None when most of the text is in a script without
    spaces (Chinese, Japanese, Thai): there the rule has nothing sensible to measure."""
    spaced = SPACED_WORD.findall(text)
    if not spaced or len(spaced) < len(words) / 2:
        return None
    return sum(map(len, spaced)) / len(spaced)


def quality_problem(text, words, limits):
    """The name of the first quality filter the text fails (see FILTERS), or None if it passes all.
    words = WORD.findall(text) (near dedup needs them too), or [] when no rule of limits uses words."""
    if limits.min_chars and len(text) < limits.min_chars:
        return "min_chars"
    if limits.min_words and len(words) < limits.min_words:
        return "min_words"
    if limits.max_symbol_ratio or limits.max_digit_ratio:
        digits, symbols = digit_and_symbol_ratios(text)
        if limits.max_symbol_ratio and symbols > limits.max_symbol_ratio:
            return "symbol_ratio"
        if limits.max_digit_ratio and digits > limits.max_digit_ratio:
            return "digit_ratio"
    if limits.max_repeated_lines and repeated_line_ratio(text) > limits.max_repeated_lines:
        return "repeated_lines"
    if limits.max_repeated_ngrams and repeated_ngram_ratio(words, limits.ngram_size) > limits.max_repeated_ngrams:
        return "repeated_ngrams"
    if limits.min_mean_word_length or limits.max_mean_word_length:
        mean = mean_word_length(text, words)
        if mean is not None and (mean < limits.min_mean_word_length
                                 or limits.max_mean_word_length and mean > limits.max_mean_word_length):
            return "mean_word_length"
    return None
