"""Instruction data for supervised fine-tuning (train.py task="sft"): JSONL of prompt/response pairs or conversations.

    python prepare/instruct.py --input train.jsonl --val_input val.jsonl --name chat
    python prepare/instruct.py --input rows.jsonl --name chat --vocab_from out-small   # the tokenizer of a model

A row is {"prompt": ..., "response": ...}, Alpaca's {"instruction": ..., "input": ..., "output": ...}, or
{"messages": [{"role": "system" | "user" | "assistant", "content": ...}, ...]} (turns by turns, ending with the
assistant); any row may add "system" (a system message) and "task" (a name: evaluation then reports exact match per
task). Each conversation is written with the chat template of sologpt/chat.py, which meta.json stores
("chat_template") so that sample.py renders prompts the same way, and tokenized with a loss mask beside the tokens:
1 on the assistant's words and end-of-turn token (learned), 0 on everything else (context).

Writes data/NAME/{train,val}.bin (tokens), {train,val}_offsets.bin (int64 example boundaries), {train,val}_mask.bin
(uint8, one per token), {train,val}_tasks.bin (int64 per example, when rows name tasks) and meta.json. Lengths are
reported: train.py cuts examples longer than block_size + 1 tokens (docs/finetuning.md says how).
"""

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as `python prepare/instruct.py`: make `prepare` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np

from prepare import examples
from prepare.common import PrepareError, token_dtype
from sologpt import chat


def parse(path, line, row):
    """A row -> (messages, task), or one error line naming the file and line."""
    try:
        return chat.messages_of(row, final="assistant")
    except chat.ChatError as e:
        raise PrepareError(f"{path}:{line} {e}")


def write_dataset(args):
    rows = examples.split(args, parse)
    texts = [m["content"] for split in rows.values() for msgs, _ in split for m in msgs]
    enc, meta = examples.make_tokenizer(args, texts, extra=lambda kind: chat.default_template(kind).values())
    template = chat.default_template(meta["tokenizer"])
    tasks = sorted({task for split in rows.values() for _, task in split if task is not None})
    if tasks and any(task is None for split in rows.values() for _, task in split):
        raise PrepareError("some rows name a 'task' and others do not: give every row one, or none")
    arrays, max_id, report = {}, 0, []
    for name, split in rows.items():
        encoded = []
        for i, (msgs, _) in enumerate(split):
            try:
                encoded.append(chat.encode(enc, template, msgs))
            except chat.ChatError as e:
                raise PrepareError(f"{name} row {i + 1}: {e}")
        a, stats, lengths, top = examples.token_arrays(name, encoded, meta["vocab_size"], "mask", np.uint8)
        arrays.update(a)
        max_id = max(max_id, top)
        stats[f"{name}_learned_tokens"] = int(a[f"{name}_mask.bin"].sum())
        meta.update(stats)
        if tasks:
            arrays[f"{name}_tasks.bin"] = np.array([tasks.index(t) for _, t in split], dtype=np.int64)
        report.append(f"{len(split):,} {name} examples")
    meta.update(task="sft", chat_template=template, dtype=np.dtype(token_dtype(meta["vocab_size"])).name,
                max_token_id=max_id, **({"tasks": tasks} if tasks else {}))
    data_dir, meta, train_lengths = examples.write(args, arrays, meta)
    learned = meta["train_learned_tokens"] / meta["train_tokens"]
    print(f"{', '.join(report)}{f' ({len(tasks)} tasks: {tasks})' if tasks else ''}, tokenizer {meta['tokenizer']}; "
          f"train {examples.length_line(train_lengths)}; {100 * learned:.1f}% of the train tokens are learned "
          f"(responses) -> {data_dir}")
    return data_dir, meta


def main(argv=None):
    examples.main(write_dataset, __doc__.splitlines()[0], argv)


if __name__ == "__main__":
    main()
