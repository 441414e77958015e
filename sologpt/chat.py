"""The chat template, in one place: how a conversation becomes tokens, for prepare/instruct.py (training data),
sologpt/sft.py (evaluation), sample.py (chat prompts and the interactive mode) and tools/export.py (the same
template as a Jinja string in the exported tokenizer_config.json).

A conversation is a list of messages {"role": "system" | "user" | "assistant", "content": text}: an optional system
message first, then user and assistant turns by turns. Each message is written as

    <role prefix><content><end><sep>          e.g.  "<|user|>\\nIs this review positive or negative?...␃\\n"

and a prompt for the model ends with the assistant's prefix, so the model writes the answer and then the end-of-turn
token, where generation stops. The template is a small dict stored in the dataset's meta.json ("chat_template"),
which train.py copies beside every checkpoint: sample.py renders prompts exactly as the training data was.

    {"system": "<|system|>\\n", "user": "<|user|>\\n", "assistant": "<|assistant|>\\n", "end": END, "sep": "\\n"}

END is one token: GPT-2's <|endoftext|> for GPT-2 BPE, the character U+2403 (the symbol for end of text) at character
level. The loss mask: only the assistant's content and its end token are learned; prefixes, separators, system and
user text are context. Each piece is tokenized on its own (content as ordinary text, so "<|endoftext|>" written in a
message is text, not the end token), and the pieces are joined, so the mask is exact.
"""

import json

from sologpt.tokenizer import EOT

ROLES = ("system", "user", "assistant")
KEYS = (*ROLES, "end", "sep")
CHAR_END = "\u2403"  # SYMBOL FOR END OF TEXT: one character that ordinary text does not use


class ChatError(ValueError):
    """A conversation or template that cannot be used; the message says what and how to fix it."""


def default_template(tokenizer_kind):
    """The template prepare/instruct.py writes into meta.json for a tokenizer ("char" or a tiktoken name)."""
    end = CHAR_END if tokenizer_kind == "char" else EOT
    return {"system": "<|system|>\n", "user": "<|user|>\n", "assistant": "<|assistant|>\n", "end": end, "sep": "\n"}


def template_of(meta):
    """meta.json's chat template (None when the dataset has none), checked."""
    t = meta.get("chat_template")
    if t is None:
        return None
    if not isinstance(t, dict) or set(t) != set(KEYS) or not all(isinstance(t[k], str) for k in KEYS) \
            or not all(t[k] for k in (*ROLES, "end")):
        raise ChatError(f"meta.json's chat_template must map {', '.join(KEYS)} to text (sep may be empty): "
                        f"run prepare/instruct.py again")
    return t


def end_id(enc, template):
    """The id of the end-of-turn token; it must be a single token of the tokenizer."""
    ids = enc.encode(template["end"])
    if len(ids) != 1:
        raise ChatError(f"the chat template's end {template['end']!r} is {len(ids)} tokens, not one: "
                        f"run prepare/instruct.py again")
    return ids[0]


# ---- conversations from data rows --------------------------------------------------------------------------

def messages_of(row, final="assistant"):
    """A data row -> (messages, task name or None). Rows are {"prompt", "response"}, Alpaca's {"instruction",
    "input", "output"}, or {"messages": [{"role", "content"}, ...]}; any may add "system" and "task". final: the
    role the conversation must end with ("assistant" for training data, "user" for a prompt to answer; a prompt
    row's response, if any, is dropped). Raises ChatError naming the problem."""
    if not isinstance(row, dict):
        raise ChatError("is not a JSON object")
    task = row.get("task")
    if task is not None and (not isinstance(task, str) or not task.strip()):
        raise ChatError("has a 'task' that is not a non-empty string")
    if "messages" in row:
        messages = row["messages"]
        if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
            raise ChatError("has 'messages' that is not a list of {\"role\", \"content\"} objects")
        messages = [{"role": m.get("role"), "content": m.get("content")} for m in messages]
    else:
        if "instruction" in row:  # Alpaca: the instruction, then the input it is about (if any)
            prompt = row["instruction"]
            if isinstance(prompt, str) and isinstance(row.get("input"), str) and row["input"].strip():
                prompt = f"{prompt}\n\n{row['input']}"
            response = row.get("output")
        elif "prompt" in row:
            prompt, response = row["prompt"], row.get("response")
        else:
            raise ChatError("has none of 'prompt', 'instruction' or 'messages'")
        messages = [{"role": "user", "content": prompt}]
        if final == "assistant" or response is not None:
            messages.append({"role": "assistant", "content": response})
    if isinstance(row.get("system"), str) and row["system"].strip() and messages and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": row["system"]})
    if final == "user" and messages and messages[-1]["role"] == "assistant":
        messages = messages[:-1]  # a prompt file may hold the reference answers too
    check_messages(messages, final)
    return messages, task


def check_messages(messages, final="assistant"):
    """Roles: an optional system message, then user and assistant alternating, ending with `final`; every content
    a non-empty string."""
    if not messages:
        raise ChatError("has no messages")
    for i, m in enumerate(messages):
        if m["role"] not in ROLES:
            raise ChatError(f"message {i + 1} has role {m['role']!r}: use system, user or assistant")
        if not isinstance(m["content"], str) or not m["content"].strip():
            raise ChatError(f"message {i + 1} ({m['role']}) has no text")
    turns = messages[1:] if messages[0]["role"] == "system" else messages
    expected = ["user", "assistant"] * len(turns)
    if not turns or [m["role"] for m in turns] != expected[:len(turns)]:
        raise ChatError("must be user and assistant turns by turns (after an optional system message), starting "
                        "with the user")
    if turns[-1]["role"] != final:
        raise ChatError(f"must end with a{'n' if final == 'assistant' else ''} {final} message")


# ---- tokens --------------------------------------------------------------------------------------------------

def encode(enc, template, messages, generation_prompt=False):
    """(ids, learn): the conversation's token ids and, per token, 1 where it is learned (the assistant's content
    and end token), else 0. generation_prompt: append the assistant's prefix, where the model is to answer."""
    ordinary = getattr(enc, "encode_ordinary", enc.encode)  # message text never becomes a special token
    end = end_id(enc, template)
    ids, learn = [], []
    for m in messages:
        answer = int(m["role"] == "assistant")
        content = ordinary(m["content"])
        if end in content:
            raise ChatError(f"a {m['role']} message holds the end-of-turn token {template['end']!r}: remove it")
        for piece, flag in ((ordinary(template[m["role"]]), 0), (content, answer), ([end], answer),
                            (ordinary(template["sep"]) if template["sep"] else [], 0)):
            ids += piece
            learn += [flag] * len(piece)
    if generation_prompt:
        prefix = ordinary(template["assistant"])
        ids += prefix
        learn += [0] * len(prefix)
    return ids, learn


def render(template, messages, generation_prompt=False):
    """The conversation as text, as the Jinja template of hf_template() writes it."""
    text = "".join(template[m["role"]] + m["content"] + template["end"] + template["sep"] for m in messages)
    return text + (template["assistant"] if generation_prompt else "")


def fit(enc, template, messages, room, block_size):
    """Drop the oldest user/assistant turns (never the system message nor the last user message) until the prompt
    plus `room` new tokens fits block_size. Returns (messages kept, turns dropped); raises ChatError when even the
    last message alone does not fit."""
    system = messages[:1] if messages[0]["role"] == "system" else []
    turns = messages[len(system):]
    dropped = 0
    while len(encode(enc, template, system + turns, generation_prompt=True)[0]) + room > block_size:
        if len(turns) <= 1:
            raise ChatError(f"the last message{' (with the system message)' if system else ''} is too long: with "
                            f"{room} tokens for the answer it does not fit block_size={block_size}; shorten it")
        turns = turns[2:]  # one user message and the assistant's answer
        dropped += 1
    return system + turns, dropped


# ---- export --------------------------------------------------------------------------------------------------

def hf_template(template):
    """The template as a Jinja string for a Hugging Face tokenizer_config.json ("chat_template"):
    tokenizer.apply_chat_template(messages, add_generation_prompt=True) then renders what render() does."""
    q = {k: json.dumps(v) for k, v in template.items()}  # JSON's string escapes are Jinja's too
    prefix = "".join(f"{'if' if i == 0 else 'elif'} message['role'] == '{role}' %}}{{{{ {q[role]} }}}}{{% "
                     for i, role in enumerate(ROLES))
    return ("{% for message in messages %}{% " + prefix + "else %}{{ raise_exception('unknown role ' + "
            "message['role']) }}{% endif %}{{ message['content'] + " + q["end"] + " + " + q["sep"] + " }}"
            "{% endfor %}{% if add_generation_prompt %}{{ " + q["assistant"] + " }}{% endif %}")
