#!/usr/bin/env python3
"""Paired top-token agreement of two runs against one base, from KL-divergence base files.

    scripts/top1-paired.py BASE.kld A.kld B.kld

Each file is a llama-perplexity base file (`--kl-divergence-base`, written by llama-perplexity
or by `airlock perplexity`) of the same text and context size: BASE from the reference model,
A and B from two runs being compared (two engines on one file, or one engine with two settings).
Prints how often A's and B's top token equals BASE's, the positions where only one of them
agrees, and the exact two-sided McNemar p-value of the difference. Two runs over the same
tokens are paired, so their difference is judged by those discordant positions, not by the
standard error each run's figure carries alone.

The top tokens come from the stored 16-bit codes (argmax of the codes, first on ties), so a
figure can differ from the engines' own "Same top p" (taken from their float logits) by a few
positions. Standard library only.
"""

import struct
import sys
from array import array
from math import comb


def tops(path):
    """The argmax of every record's codes."""
    with open(path, "rb") as f:
        head = f.read(20)
        if len(head) != 20 or head[:8] != b"_logits_":
            sys.exit(f"{path}: not a KL-divergence base file (no _logits_ header)")
        n_ctx, n_vocab, n_chunk = struct.unpack("<3i", head[8:])
        if n_ctx <= 0 or n_vocab <= 0 or n_chunk <= 0:
            sys.exit(f"{path}: header n_ctx {n_ctx}, n_vocab {n_vocab}, n_chunk {n_chunk}")
        start = 20 + 4 * n_ctx * n_chunk
        size = f.seek(0, 2)
        if size < start:
            sys.exit(f"{path}: shorter than its header's {n_chunk} x {n_ctx} tokens")
        # Checked against the file's length before any read, so a hostile n_vocab cannot size one.
        rec = 2 * (2 * ((n_vocab + 1) // 2) + 4)
        records, rest = divmod(size - start, rec)
        if records == 0 or rest:
            sys.exit(f"{path}: {size - start} bytes after the tokens, not whole records of {rec}")
        f.seek(start)
        out = []
        for _ in range(records):
            codes = array("H", f.read(rec)[8 : 8 + 2 * n_vocab])
            if sys.byteorder != "little":
                codes.byteswap()
            out.append(codes.index(max(codes)))
    return (n_ctx, n_vocab, n_chunk), out


def main():
    if len(sys.argv) != 4:
        sys.exit(__doc__.strip().splitlines()[2].strip())
    (hb, base), (ha, a), (hc, c) = (tops(p) for p in sys.argv[1:])
    if not (hb == ha == hc and len(base) == len(a) == len(c)):
        sys.exit(f"the files differ in shape: {hb} {len(base)}, {ha} {len(a)}, {hc} {len(c)}")
    n = len(base)
    sa = [x == y for x, y in zip(a, base)]
    sc = [x == y for x, y in zip(c, base)]
    only_a = sum(x and not y for x, y in zip(sa, sc))
    only_c = sum(y and not x for x, y in zip(sa, sc))
    d = only_a + only_c
    k = min(only_a, only_c)
    p = min(1.0, 2 * sum(comb(d, i) for i in range(k + 1)) / 2**d) if d else 1.0
    print(f"positions: {n}")
    print(f"A same top: {100 * sum(sa) / n:.3f}%  ({sys.argv[2]})")
    print(f"B same top: {100 * sum(sc) / n:.3f}%  ({sys.argv[3]})")
    print(f"only A agrees: {only_a}, only B agrees: {only_c}, exact McNemar p = {p:.3f}")
    print(f"A and B differ in top token at {100 * sum(x != y for x, y in zip(a, c)) / n:.2f}%")


if __name__ == "__main__":
    main()
