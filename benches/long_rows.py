"""Writes N labelled rows of 200 random words of the bundled corpus (cut at 128 tokens
by the BERT config) to PATH: the long-sequence data the speed and memory benches train on.
Usage: python3 benches/long_rows.py PATH N"""
import json
import random
import sys

words = open("data/corpus/train.txt").read().split()
rng = random.Random(0)
with open(sys.argv[1], "w") as f:
    for i in range(int(sys.argv[2])):
        text = " ".join(rng.choice(words) for _ in range(200))
        f.write(json.dumps({"text": text, "label": ["negative", "positive"][i % 2]}) + "\n")
