#!/usr/bin/env python3
"""Writes kiln's bundled supervised fine-tuning data: small synthetic tasks (reverse,
sort, add, count, repeat a list of words or numbers) as

- sft/{train,validation}.jsonl: TRL's prompt/completion rows, {"prompt", "completion"};
- chat/{train,validation}.jsonl: conversations, {"messages": [{"role", "content"}...]},
  one or two user/assistant exchanges, some with a system message.

The answers follow from the prompts, so a tiny model's completion loss falls visibly
within a few epochs. Deterministic (a fixed seed and only random.Random.random()) and
stdlib only. `--check` fails if the committed files differ from what it would write.
"""

import json
import os
import random
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
WORDS = (
    "apple river stone cloud lamp tiger maple honey pencil garden window candle "
    "harbor violet copper meadow rocket silver thunder pebble lantern orchard "
    "falcon marble canyon ember frost willow"
).split()
SYSTEMS = [
    "You are a careful assistant. Answer with the result only.",
    "Reply briefly.",
]


class Draw:
    def __init__(self, seed):
        self.r = random.Random(seed)

    def int(self, lo, hi):
        """An integer in [lo, hi]."""
        return lo + int(self.r.random() * (hi - lo + 1))

    def pick(self, items):
        return items[self.int(0, len(items) - 1)]

    def words(self, n):
        return [self.pick(WORDS) for _ in range(n)]


def task(d):
    """One (question, answer) pair."""
    kind = d.int(0, 4)
    if kind == 0:
        w = d.words(d.int(2, 5))
        return f"Reverse: {' '.join(w)}", " ".join(reversed(w))
    if kind == 1:
        n = [d.int(0, 99) for _ in range(d.int(3, 6))]
        return f"Sort: {' '.join(map(str, n))}", " ".join(map(str, sorted(n)))
    if kind == 2:
        a, b = d.int(0, 99), d.int(0, 99)
        return f"Add: {a} + {b}", str(a + b)
    if kind == 3:
        w = d.words(d.int(1, 7))
        return f"Count the words: {' '.join(w)}", str(len(w))
    w = d.words(d.int(1, 3))
    k = d.int(2, 3)
    return f"Repeat {k} times: {' '.join(w)}", " ".join(w * k)


def prompt_completion(d):
    q, a = task(d)
    return {"prompt": f"{q}\nAnswer:", "completion": f" {a}"}


def conversation(d):
    messages = []
    if d.int(0, 2) == 0:
        messages.append({"role": "system", "content": d.pick(SYSTEMS)})
    for _ in range(d.int(1, 2)):
        q, a = task(d)
        messages.append({"role": "user", "content": q})
        messages.append({"role": "assistant", "content": a})
    return {"messages": messages}


def lines(make, seed, n):
    d = Draw(seed)
    return "".join(json.dumps(make(d), ensure_ascii=False) + "\n" for _ in range(n))


FILES = {
    "sft/train.jsonl": lambda: lines(prompt_completion, 1, 1200),
    "sft/validation.jsonl": lambda: lines(prompt_completion, 2, 120),
    "chat/train.jsonl": lambda: lines(conversation, 3, 800),
    "chat/validation.jsonl": lambda: lines(conversation, 4, 80),
}


def main():
    check = "--check" in sys.argv[1:]
    stale = []
    for name, make in FILES.items():
        path = os.path.join(HERE, name)
        text = make()
        if check:
            try:
                with open(path, encoding="utf-8") as f:
                    if f.read() != text:
                        stale.append(name)
            except FileNotFoundError:
                stale.append(name)
        else:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "w", encoding="utf-8", newline="\n") as f:
                f.write(text)
    if stale:
        sys.exit(f"stale: {', '.join(stale)} (run python3 data/make_sft.py)")


if __name__ == "__main__":
    main()
