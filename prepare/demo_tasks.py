"""Small instruction and tagging sets made from the shared data, to show that task "sft" and task "tag" work
(docs/finetuning.md has the commands and the results). No such corpus can be downloaded here, so this script builds
them; it writes JSONL, which prepare/instruct.py and prepare/tags.py then turn into datasets.

    python prepare/demo_tasks.py --shared ../shared/data --out data/demo_tasks

writes into --out:
- pretrain.txt: the text a small base model is pretrained on (prepare/shakespeare_char.py --input): the first 90% of
  tiny-shakespeare's lines, the training reviews of sentence_polarity, and the first 80% of the lines of the
  Universal Declaration of Human Rights in 16 languages. Nothing of the held-out parts below is in it.
- instruct_{train,val}.jsonl: {"prompt", "response", "task"}, four tasks with one right answer each:
  sentiment   "Is this review positive or negative?" + a review (120 characters at most) -> positive / negative
              (all the training reviews that short; of the val reviews, those among the first 450)
  language    "Which language is this?" + 3 to 8 words (CJK: 6 to 16 characters) of one declaration -> English, ...
  first_word  "What is the first word of this line?" + a line of the play -> its first word (without punctuation)
  last_word   "Finish this line with one word." + a line without its last word -> that word (a continuation)
  The val rows come from held-out text: sentence_polarity's val file, the last 20% of each declaration's lines,
  the last 10% of the play's lines.
- tags_{train,val}.jsonl: {"tokens", "tags"}: a line of the play with one or two phrases of 1 to 4 words from a
  declaration in a Latin-script language spliced in; the phrase's words are tagged B-<lang> / I-<lang> (fra, deu,
  spa, pol, tur, swh, vie), the play's words O. An entity recognition task (find the foreign phrases and their
  language) that a character model can learn on a CPU.
"""

import argparse
import json
import random
import re
import sys
from pathlib import Path

LANGUAGES = {"arb": "Arabic", "cmn_hans": "Chinese", "deu": "German", "ell_monotonic": "Greek", "eng": "English",
             "fra": "French", "heb": "Hebrew", "hin": "Hindi", "jpn": "Japanese", "kor": "Korean", "pol": "Polish",
             "rus": "Russian", "spa": "Spanish", "swh": "Swahili", "tur": "Turkish", "vie": "Vietnamese"}
NO_SPACES = ("cmn_hans", "jpn")  # written without spaces between words: snippets are runs of characters
TAG_LANGUAGES = ("fra", "deu", "spa", "pol", "tur", "swh", "vie")  # Latin script: the spelling must tell them apart
COUNTS = {"sentiment": (None, 450), "language": (4000, 200), "first_word": (4000, 200), "last_word": (4000, 200),
          "tags": (6000, 600)}  # (train, val) rows per task; None: every training review short enough
MAX_REVIEW = 120  # characters: with the template, every example then fits block_size=192
PUNCT = ".,;:!?'\"-()"


def play_lines(path):
    """(train lines, val lines) of the play: lines of at least 4 words that are not speaker names, split 90/10."""
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    cut = int(len(lines) * 0.9)  # as prepare/shakespeare_char.py's 90/10 split (by lines here)
    keep = lambda part: [x.strip() for x in part if len(x.split()) >= 4 and not x.rstrip().endswith(":")]
    return lines[:cut], keep(lines[:cut]), keep(lines[cut:])


def declarations(folder):
    """{code: (train lines, val lines)}: each declaration's non-empty lines, the first 80% for training."""
    out = {}
    for code in LANGUAGES:
        lines = [x.strip() for x in (Path(folder) / f"{code}.txt").read_text(encoding="utf-8").splitlines()
                 if x.strip()]
        cut = int(len(lines) * 0.8)
        out[code] = (lines[:cut], lines[cut:])
    return out


def snippet(rng, code, lines):
    """3 to 8 consecutive words of a random line (CJK: 6 to 16 characters)."""
    while True:
        line = rng.choice(lines)
        if code in NO_SPACES:
            line = re.sub(r"\s+", "", line)
            n = rng.randint(6, 16)
            if len(line) >= n:
                i = rng.randint(0, len(line) - n)
                return line[i:i + n]
        else:
            words = line.split()
            n = rng.randint(3, 8)
            if len(words) >= n:
                i = rng.randint(0, len(words) - n)
                return " ".join(words[i:i + n])


def bare(word):
    return word.strip(PUNCT)


def instructions(rng, reviews, decl, lines, split):
    rows = []
    for r in reviews[:COUNTS["sentiment"][split == "val"]]:
        if len(r["text"]) <= MAX_REVIEW:
            rows.append({"prompt": f"Is this review positive or negative?\n{r['text']}",
                         "response": "positive" if r["label"] == "pos" else "negative", "task": "sentiment"})
    n = COUNTS["language"][split == "val"]
    codes = list(LANGUAGES)
    for k in range(n):
        code = codes[k % len(codes)]
        rows.append({"prompt": f"Which language is this?\n{snippet(rng, code, decl[code][split == 'val'])}",
                     "response": LANGUAGES[code], "task": "language"})
    for task in ("first_word", "last_word"):
        made = 0
        while made < COUNTS[task][split == "val"]:
            words = rng.choice(lines).split()
            answer = bare(words[0] if task == "first_word" else words[-1])
            if not answer.isalpha():
                continue
            if task == "first_word":
                rows.append({"prompt": f"What is the first word of this line?\n{' '.join(words)}",
                             "response": answer, "task": task})
            else:
                rows.append({"prompt": f"Finish this line with one word.\n{' '.join(words[:-1])}",
                             "response": answer, "task": task})
            made += 1
    rng.shuffle(rows)
    return rows


def tagged(rng, decl, lines, split, n):
    rows = []
    codes = list(TAG_LANGUAGES)  # (a list: rng.choice needs a sequence)
    while len(rows) < n:
        words = rng.choice(lines).split()
        tags = ["O"] * len(words)
        for _ in range(rng.choice((1, 1, 2))):
            code = rng.choice(codes)
            phrase = rng.choice(decl[code][split == "val"]).split()
            k = rng.randint(1, 4)
            if len(phrase) < k:
                continue
            i = rng.randint(0, len(phrase) - k)
            at = rng.randint(0, len(words))
            name = code
            words[at:at] = phrase[i:i + k]
            tags[at:at] = [f"B-{name}"] + [f"I-{name}"] * (k - 1)
        rows.append({"tokens": words, "tags": tags})
    return rows


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shared", default="../shared/data", help="the shared data folder (default: %(default)s)")
    p.add_argument("--out", default="data/demo_tasks", help="where the files go (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    shared, out = Path(args.shared), Path(args.out)
    needed = [shared / "shakespeare" / "input.txt", shared / "sentence_polarity" / "train.jsonl",
              shared / "sentence_polarity" / "val.jsonl", *(shared / "udhr" / f"{c}.txt" for c in LANGUAGES)]
    missing = [str(f) for f in needed if not f.is_file()]
    if missing:
        print(f"error: {missing[0]} is missing: point --shared at the shared data folder", file=sys.stderr)
        sys.exit(1)
    rng = random.Random(args.seed)
    play_train_text, play_train, play_val = play_lines(needed[0])
    reviews = {s: [json.loads(x) for x in needed[1 + i].read_text(encoding="utf-8").splitlines() if x.strip()]
               for i, s in enumerate(("train", "val"))}
    decl = declarations(shared / "udhr")
    out.mkdir(parents=True, exist_ok=True)
    pretrain = "\n".join(play_train_text) + "\n\n" + "\n".join(r["text"] for r in reviews["train"]) + "\n\n" + \
        "\n\n".join("\n".join(decl[c][0]) for c in LANGUAGES) + "\n"
    (out / "pretrain.txt").write_text(pretrain, encoding="utf-8")
    for split, lines in (("train", play_train), ("val", play_val)):
        rows = instructions(rng, reviews[split], decl, lines, split)
        write_jsonl(out / f"instruct_{split}.jsonl", rows)
        tags = tagged(rng, decl, lines, split, COUNTS["tags"][split == "val"])
        write_jsonl(out / f"tags_{split}.jsonl", tags)
        print(f"{split}: {len(rows):,} instructions, {len(tags):,} tagged lines")
    print(f"pretrain.txt: {len(pretrain):,} characters -> {out}")


if __name__ == "__main__":
    main()
