"""Side-by-side table of the GPU benchmark JSON lines (singlora-lab's bench-llama --json and
bench/torch_llama.py), with each step time as a ratio to PyTorch's frozen base (eager and
compiled) and to PEFT LoRA.

    python bench/compare.py results.jsonl [more.jsonl ...]
"""
import json
import sys

rows = []
for path in sys.argv[1:]:
    for line in open(path):
        line = line.strip()
        if line.startswith("{"):
            rows.append(json.loads(line))

def ms(r):
    return r["timing"]["median_ms"] if "timing" in r else r.get("median_ms")

for shape in sorted({r["shape"] for r in rows}):
    rs = [r for r in rows if r["shape"] == shape and "error" not in r]
    ref = {r["method"]: ms(r) for r in rs if r["impl"] == "pytorch"}
    base_e, base_c = ref.get("base"), ref.get("base compiled")
    lora = ref.get("peft-lora")
    print(f"\n### {shape}, batch {rs[0].get('batch', 8) if rs else 8} x {rs[0].get('seq', 512) if rs else 512}\n")
    print("| implementation | method | ms/step | tokens/s | peak GiB | vs torch base eager | vs torch base compiled | vs PEFT LoRA eager |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rs:
        t = ms(r)
        tok = r["timing"]["tokens_per_s"] if "timing" in r else r["tokens_per_s"]
        mem = r.get("peak_memory_gib")
        f = lambda b: f"{t / b:.2f}x" if b else "-"
        impl = r["impl"] + (f" (MFU {100 * r['mfu']:.0f}%)" if r.get("mfu") else "")
        print(f"| {impl} | {r['method']} | {t:.1f} | {tok:,.0f} | {mem:.1f} |" if mem else f"| {impl} | {r['method']} | {t:.1f} | {tok:,.0f} | - |", f"{f(base_e)} | {f(base_c)} | {f(lora)} |")
    for r in rows:
        if r["shape"] == shape and "error" in r:
            print(f"| {r['impl']} | {r['method']} | failed: {r['error'][:80]} | | | | | |")
