"""Tables of the DreamBooth proxy from its runs.jsonl (docs/results.md's protocol).

    python summary.py runs.jsonl > summary.md

Per (targets, method, rank, lr): mean ± sd over seeds of each score. Then the paired
differences (by seed) SingLoRA r8 − LoRA r8, SingLoRA r8 − DoRA r8 (equal rank) and
SingLoRA r16 − LoRA r8 (equal parameters), with a 95% t-interval over the seeds.
"""
import json
import math
import statistics
import sys
from collections import defaultdict

T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}
SCORES = ["subject_fidelity", "diversity", "subject_as_class", "prompt_fidelity"]

runs = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
base = next((r for r in runs if r["run"] == "base"), None)
ok = [r for r in runs if r["run"] != "base" and not r.get("failed")]
failed = [r["run"] for r in runs if r.get("failed")]
groups = defaultdict(dict)
for r in ok:
    groups[(r["targets"], r["method"], r["rank"], r["lr"])][r["seed"]] = r


def ms(v):
    if len(v) < 2:
        return f"{v[0]:.4f}" if v else "–"
    return f"{statistics.mean(v):.4f} ± {statistics.stdev(v):.4f}"


def interval(d):
    n = len(d)
    if n < 2:
        return "–"
    m, s = statistics.mean(d), statistics.stdev(d)
    h = T95.get(n - 1, 1.96) * s / math.sqrt(n)
    return f"{m:+.4f} [{m - h:+.4f}, {m + h:+.4f}] (n={n})"


print("| targets | method | r | lr | params | seeds | " + " | ".join(SCORES) + " |")
print("|---|---|---|---|---|---|" + "---|" * len(SCORES))
if base:
    print("| – | base (no adapter) | – | – | 0 | – | " + " | ".join(f"{base['scores'][s]:.4f}" for s in SCORES) + " |")
for (t, m, r, lr), seeds in sorted(groups.items()):
    rs = list(seeds.values())
    params = rs[0].get("params")
    print(f"| {t} | {m} | {r} | {lr:g} | {params} | {len(rs)} | "
          + " | ".join(ms([x['scores'][s] for x in rs]) for s in SCORES) + " |")
print()
print("Paired differences by seed, 95% t-interval:")
print()
print("| targets | lr | comparison | " + " | ".join(SCORES) + " |")
print("|---|---|---|" + "---|" * len(SCORES))
pairs = [(("singlora", 8), ("lora", 8), "SingLoRA r8 − LoRA r8"),
         (("singlora", 8), ("dora", 8), "SingLoRA r8 − DoRA r8"),
         (("singlora", 16), ("lora", 8), "SingLoRA r16 − LoRA r8 (equal params)"),
         (("singlora", 16), ("dora", 8), "SingLoRA r16 − DoRA r8")]
for t, lr in sorted({(k[0], k[3]) for k in groups}):
    for a, b, name in pairs:
        ga, gb = groups.get((t, *a, lr), {}), groups.get((t, *b, lr), {})
        common = sorted(set(ga) & set(gb))
        cells = [interval([ga[s]["scores"][sc] - gb[s]["scores"][sc] for s in common]) for sc in SCORES]
        print(f"| {t} | {lr:g} | {name} | " + " | ".join(cells) + " |")
if failed:
    print()
    print("Failed runs: " + ", ".join(failed))
