#!/usr/bin/env python3
"""Writes tests/fixtures/tasks/hellaswag-licenses.txt: 200 HellaSwag-style tasks in
llama-perplexity's --hellaswag text format (context, index of the right ending, four endings),
made from tests/fixtures/text/eval.txt (GPL-3 + Apache-2.0 license texts). Each task is the
first part of a sentence; the right ending is its real continuation, the three others are the
endings of other sentences, in a seeded random order. Deterministic: the same file every run.

    python3 scripts/make-hellaswag-fixture.py
"""
import random
import re
from pathlib import Path

root = Path(__file__).resolve().parent.parent
text = (root / "tests/fixtures/text/eval.txt").read_text()
words = " ".join(text.split())
sentences = [s.strip() for s in re.split(r"(?<=[.;:])\s+", words)]
sentences = [s for s in sentences if 8 <= len(s.split()) <= 60 and "  " not in s]
seen, uniq = set(), []
for s in sentences:
    if s not in seen:
        seen.add(s)
        uniq.append(s)
rng = random.Random(15)
picked = rng.sample(uniq, 200)
parts = []
for s in picked:
    w = s.split()
    cut = max(5, int(len(w) * 0.6))
    parts.append((" ".join(w[:cut]), " ".join(w[cut:])))
endings = [e for _, e in parts]
out = []
for i, (ctx, right) in enumerate(parts):
    others = rng.sample([e for j, e in enumerate(endings) if j != i and e != right], 3)
    label = rng.randrange(4)
    opts = others[:label] + [right] + others[label:]
    out += [ctx, str(label)] + opts
(root / "tests/fixtures/tasks/hellaswag-licenses.txt").write_text("\n".join(out) + "\n")
print(len(parts), "tasks")
