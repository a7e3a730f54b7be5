#!/usr/bin/env python3
"""Rewrites fuzz/corpus/<target>/ as a small set of inputs that keeps the coverage of a run.

    python3 fuzz/shrink_corpus.py TARGET DIR... [--budget BYTES]

The target's fuzzer (built by `cargo +nightly fuzz build TARGET`) measures which code edges
each input of the committed corpus and of DIR... reaches (libFuzzer's merge, hit counts
ignored). The seeds (`seed-*`, written by seeds.py) stay; other inputs are then added greedily,
the most new edges per byte first, until every edge is kept or the next input would pass the
budget (100 000 bytes by default), so that the corpus the tests replay stays small.
"""
import argparse
import hashlib
import os
import shutil
import subprocess
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))


def edges_per_input(fuzzer, dirs):
    """{path: set of edges} from libFuzzer's merge control file."""
    with tempfile.TemporaryDirectory() as tmp:
        control = os.path.join(tmp, "control")
        out = os.path.join(tmp, "out")
        os.mkdir(out)
        subprocess.run([fuzzer, "-merge=1", "-use_counters=0", "-rss_limit_mb=2048",
                        "-timeout=10", f"-merge_control_file={control}", out, *dirs],
                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        lines = open(control).read().splitlines()
    n = int(lines[0])
    paths = lines[2:2 + n]
    edges = {}
    for line in lines[2 + n:]:
        if line.startswith("FT "):
            _, i, *fs = line.split()
            edges[paths[int(i)]] = set(map(int, fs))
    return edges


def pick(edges, budget):
    """The seeds, then the input with the most new edges per byte, while within the budget."""
    size = {p: os.path.getsize(p) for p in edges}
    chosen = [p for p in edges if os.path.basename(p).startswith("seed-")]
    covered = set().union(*(edges[p] for p in chosen))
    total = sum(size[p] for p in chosen)
    while True:
        gain = {p: len(edges[p] - covered) / max(size[p], 1) for p in edges if p not in chosen}
        best = max((p for p in gain if gain[p] > 0), key=gain.get, default=None)
        if best is None or total + size[best] > budget:
            break
        chosen.append(best)
        covered |= edges[best]
        total += size[best]
    everything = set().union(*edges.values())
    print(f"{len(chosen)} inputs, {total} bytes, {len(covered)} of {len(everything)} edges")
    return chosen


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("target")
    ap.add_argument("dirs", nargs="*", help="further inputs, e.g. the corpus of a fuzzing run")
    ap.add_argument("--budget", type=int, default=100_000)
    a = ap.parse_args()
    fuzzer = os.path.join(HERE, "target", "x86_64-unknown-linux-gnu", "release", a.target)
    corpus = os.path.join(HERE, "corpus", a.target)
    with tempfile.TemporaryDirectory() as tmp:
        # A copy, since the corpus directory is rewritten from it.
        pool = os.path.join(tmp, "pool")
        shutil.copytree(corpus, pool)
        chosen = pick(edges_per_input(fuzzer, [pool, *a.dirs]), a.budget)
        for f in os.listdir(corpus):
            if not f.startswith("seed-"):
                os.remove(os.path.join(corpus, f))
        for p in chosen:
            if os.path.basename(p).startswith("seed-"):
                continue
            data = open(p, "rb").read()
            with open(os.path.join(corpus, hashlib.sha1(data).hexdigest()), "wb") as f:
                f.write(data)


if __name__ == "__main__":
    main()
