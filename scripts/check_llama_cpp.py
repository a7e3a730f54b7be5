"""llama.cpp runs the GGUF files singlora writes, with our logits.

Needs torch, transformers, tokenizers and llama-cpp-python (built from its PyPI sdist, which
compiles llama.cpp: slow on 2 cores, so build it once outside the repository), and the
`singlora` binary (default: target/release/singlora):

    python scripts/check_llama_cpp.py [--singlora BIN] [--smollm2 SmolLM2-135M-Instruct.Q4_1.gguf]
        [--gemma3 gemma-3-270m-q4_k_m.gguf]

For each model (a tiny LLaMA of the `example` shape, a GQA shape with K-quant-sized rows and
linear RoPE scaling, one with LLaMA 3.1's RoPE scaling, one with a LLaMA 2-style
(SentencePiece, byte-fallback) vocabulary, a tiny Qwen2 with q/k/v biases and
tied embeddings, a tiny Qwen3 with
heads wider than hidden / heads, a tiny Gemma 3, a tiny Phi-3 and a tiny GPT-2, and SmolLM2-135M and Gemma 3 270M from their GGUF files when
given) it trains a SingLoRA adapter for 3 steps, then:
- the reference: `singlora merge --dtype f32` (safetensors) run by transformers, which computes
  singlora's logits (scripts/check_peft_loads.py and the Rust tests tie the two);
- `singlora merge --format gguf --quant Q` for each Q, run by llama.cpp: the largest logit
  difference over all positions of a fixed text, relative to the largest reference logit, and
  the perplexity of that text under each;
- `singlora export-lora --format gguf` applied by llama.cpp at scale 1 to the base written as an
  f32 GGUF, against the merged f32 GGUF in llama.cpp;
- the tokenizer (llama.cpp's token ids for the text = Hugging Face's) and the chat template
  (the file's template is the source's; llama.cpp's built-in renderer and llama-cpp-python's
  Jinja renderer give transformers' rendering).
Prints a table and exits non-zero when a tolerance below is exceeded.
"""
import argparse
import ctypes
import json
import math
import os
import subprocess
import sys
import tempfile

import numpy as np
import torch
import transformers
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

import llama_cpp
import llama_cpp.llama_cpp as C
from llama_cpp.llama_chat_format import Jinja2ChatFormatter

# llama.cpp's AMX kernels need a kernel permission some machines (and VMs) do not grant, and
# then crash; the repacking buffers are a speed matter only, so they are left off.
_default_params = C.llama_model_default_params


def _params():
    p = _default_params()
    p.use_extra_bufts = False
    return p


C.llama_model_default_params = _params

TEXT = (
    "The capital of France is Paris. Two plus two is four, and the sky is blue. Water is wet; "
    "in winter the lakes freeze and the days are short. A small town lay at the foot of the "
    "hills, where a river ran between old stone houses. Every morning the baker opened his shop "
    "before sunrise, and the smell of fresh bread drifted down the narrow streets. Children "
    "walked to school along the river, counting the boats that passed under the bridge. In the "
    "afternoon the market filled with farmers selling apples, cheese and honey, and travellers "
    "stopped to ask for directions to the castle on the hill. When the sun went down, the lights "
    "of the houses came on one by one, and the town grew quiet until the next morning."
)
CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content']"
    " + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
MESSAGES = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "What is the capital of France?"},
]
# relative to the largest reference logit; perplexity relative to the reference's
TOL = {"f32": 1e-4, "f16": 1e-2, "bf16": 5e-2, "adapter": 1e-4}
PPL_TOL = {"q8_0": 0.02, "q4_0": 0.15, "q4_k_m": 0.15, "same": 0.15}
# llama.cpp's own quantiser (llama_model_quantize) run on our f32 file, for comparison
FTYPE = {"q8_0": 7, "q4_0": 2, "q4_k_m": 15}

ap = argparse.ArgumentParser()
ap.add_argument("--singlora", default="target/release/singlora")
ap.add_argument("--smollm2", default=None, help="SmolLM2-135M-Instruct GGUF file")
ap.add_argument("--gemma3", default=None, help="Gemma 3 270M GGUF file (gemma-3-270m-q4_k_m.gguf)")
ap.add_argument("--only", default=None, help="only the models whose name starts with this")
ap.add_argument("--keep", default=None, help="work in this directory and keep it")
args = ap.parse_args()
tmp = args.keep or tempfile.mkdtemp()
os.makedirs(tmp, exist_ok=True)


def run(*a):
    r = subprocess.run([args.singlora, *map(str, a)], capture_output=True, text=True)
    if r.returncode != 0:
        print(r.stdout, r.stderr)
        raise SystemExit(f"singlora {' '.join(map(str, a))} failed")
    return r.stdout


def bpe_tokenizer(d):
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator([TEXT * 4, "hello world " * 20], trainer)
    tok.save(os.path.join(d, "tokenizer.json"))
    with open(os.path.join(d, "tokenizer_config.json"), "w") as f:
        json.dump({"bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "add_bos_token": False,
                   "chat_template": CHATML, "tokenizer_class": "PreTrainedTokenizerFast"}, f)
    return tok.get_vocab_size()


def spm_tokenizer(d):
    """A LLaMA 2-style tokenizer.json: SentencePiece pieces (a ▁ before the text and for every
    space), byte fallback, <unk> <s> </s> and the 256 byte pieces first."""
    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    specials = ["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)]
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=specials, show_progress=False)
    tok.train_from_iterator([TEXT * 4, "hello world " * 20], trainer)
    tok.save(os.path.join(d, "tokenizer.json"))
    with open(os.path.join(d, "tokenizer_config.json"), "w") as f:
        json.dump({"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "add_bos_token": True,
                   "chat_template": CHATML, "tokenizer_class": "LlamaTokenizerFast"}, f)
    return tok.get_vocab_size()


def hf_model(name, family="llama", spm=False, **shape):
    d = os.path.join(tmp, name, "base")
    os.makedirs(d, exist_ok=True)
    vocab = spm_tokenizer(d) if spm else bpe_tokenizer(d)
    config, model = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
        "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM),
        "gemma3": (transformers.Gemma3TextConfig, transformers.Gemma3ForCausalLM),
        "phi3": (transformers.Phi3Config, transformers.Phi3ForCausalLM),
        "gpt2": (transformers.GPT2Config, transformers.GPT2LMHeadModel),
    }[family]
    cfg = config(vocab_size=vocab, bos_token_id=1, eos_token_id=2, **shape)
    torch.manual_seed(0)
    m = model(cfg)
    with torch.no_grad():
        for n, p in m.named_parameters():
            if n.endswith(".bias"):  # transformers starts biases at 0
                p.normal_(0.0, 0.5)
            if n.endswith(("q_norm.weight", "k_norm.weight")):  # and norms at 1
                p.normal_(1.0, 0.2)
            if family == "gemma3" and n.endswith("norm.weight"):  # Gemma's offsets at 0
                p.normal_(0.0, 0.2)
    m.save_pretrained(d, safe_serialization=True)
    return d


def train(base, work, lr):
    data = os.path.join(work, "sft.jsonl")
    with open(data, "w") as f:
        for p, c in [("The capital of France is", " Paris."), ("Two plus two is", " four."),
                     ("The sky is", " blue."), ("Water is", " wet.")]:
            f.write(json.dumps({"prompt": p, "completion": c}) + "\n")
    out = os.path.join(work, "run")
    run("train", "--model", base, "--train", data, "--task", "sft", "--batch-size", 4,
        "--max-steps", 3, "--lr", lr, "--ramp-steps", 0, "--out", out, "--overwrite")
    return out


def ppl(logits, ids):
    lp = torch.log_softmax(torch.as_tensor(np.asarray(logits[:-1]), dtype=torch.float64), -1)
    nll = -lp[torch.arange(len(ids) - 1), torch.as_tensor(ids[1:])].mean().item()
    return math.exp(nll)


def llama_logits(path, ids, lora=None):
    kw = {"lora_path": lora, "lora_scale": 1.0} if lora else {}
    # an f32 KV cache (llama.cpp's default is f16), so that f32 files compare at f32 rounding
    llm = llama_cpp.Llama(model_path=path, n_ctx=1024, n_batch=1024, logits_all=True,
                          verbose=False, n_threads=2, seed=0, type_k=0, type_v=0, **kw)
    llm.eval(ids)
    out = np.array(llm.scores[: len(ids)], dtype=np.float64)
    return llm, out


def tensors(path):
    from gguf import GGUFReader

    return {t.name: (t.tensor_type.name, bytes(t.data.tobytes())) for t in GGUFReader(path).tensors}


rows = []
failed = False


def report(model, what, rel=None, p=None, p_ref=None, ok=True, note=""):
    global failed
    failed |= not ok
    rows.append((model, what, "" if rel is None else f"{rel:.2e}",
                 "" if p is None else f"{p:.3f}", "" if p_ref is None else f"{p_ref:.3f}",
                 "ok" if ok else "FAIL", note))


def check(name, base, quants, template, bos=False, lr="5e-3", tol=None):
    """`bos`: the text starts with the BOS token (Gemma computes garbage without it); `lr`: the
    adapter's training rate (5e-3 for 3 steps leaves Gemma 3 270M's perplexity at ~400); `tol`:
    tolerances of this model in place of TOL's."""
    tol = {**TOL, **(tol or {})}
    if args.only and not name.lower().startswith(args.only.lower()):
        return
    work = os.path.join(tmp, name.split()[0])
    os.makedirs(work, exist_ok=True)
    adapter = train(base, work, lr)
    ref_dir = os.path.join(work, "merged-f32")
    run("merge", "--base", base, "--adapter", adapter, "--out", ref_dir, "--dtype", "f32", "--overwrite")
    hf_tok = transformers.AutoTokenizer.from_pretrained(ref_dir)
    ids = hf_tok(TEXT, add_special_tokens=False)["input_ids"]
    if bos:
        ids = [hf_tok.bos_token_id] + ids
    ref_model = transformers.AutoModelForCausalLM.from_pretrained(ref_dir, torch_dtype=torch.float32)
    with torch.no_grad():
        ref = ref_model(torch.tensor([ids])).logits[0].double().numpy()
    scale = np.abs(ref).max()
    p_ref = ppl(ref, ids)

    files = {}
    for q in quants:
        f = os.path.join(work, f"merged-{q}.gguf")
        run("merge", "--base", base, "--adapter", adapter, "--out", f, "--quant", q, "--overwrite")
        files[q] = f
        llm, got = llama_logits(f, ids)
        rel = np.abs(got - ref).max() / scale
        p = ppl(got, ids)
        if q in tol:
            ok = rel <= tol[q]
            note = f"logits within {tol[q]:.0e}"
        else:
            ok = abs(p - p_ref) / p_ref <= PPL_TOL[q]
            note = f"perplexity within {PPL_TOL[q]:.0%}"
        report(name, f"merged {q}", rel, p, p_ref, ok, note)
        if q == quants[0]:
            toks = llm.tokenize(TEXT.encode(), add_bos=bos, special=False)
            report(name, "tokenizer", ok=toks == ids, note=f"{len(ids)} ids, llama.cpp's = HF's")
            # characters the toy vocabularies lack, split by tokenizer.json itself (as singlora
            # does; transformers 5's LlamaTokenizer rebuilds a LLaMA 2 normalizer as Metaspace,
            # which splits leading spaces otherwise)
            odd = "  Ωmega ÿes 1234 — “quoted” 日本\n\ttab"
            raw = Tokenizer.from_file(os.path.join(ref_dir, "tokenizer.json"))
            want_odd = raw.encode(odd, add_special_tokens=False).ids
            got_odd = llm.tokenize(odd.encode(), add_bos=False, special=False)
            report(name, "tokenizer, unseen characters", ok=got_odd == want_odd,
                   note=f"{len(want_odd)} ids, llama.cpp's = HF's")
            tmpl = llm.metadata.get("tokenizer.chat_template")
            if template is None:  # a base model without a chat format
                report(name, "no chat template, as the source", ok=tmpl is None)
                del llm
                continue
            want = hf_tok.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
            report(name, "chat template kept", ok=tmpl == template, note="file = source")
            msgs = (C.llama_chat_message * len(MESSAGES))(
                *[C.llama_chat_message(m["role"].encode(), m["content"].encode()) for m in MESSAGES])
            buf = (ctypes.c_char * 4096)()
            n = C.llama_chat_apply_template(tmpl.encode(), msgs, len(MESSAGES), True, buf, 4096)
            builtin = bytes(buf[:n]).decode() if n > 0 else f"<error {n}>"
            report(name, "chat: llama.cpp built-in", ok=builtin == want, note=repr(builtin[:40]))
            jinja = Jinja2ChatFormatter(template=tmpl, eos_token=hf_tok.eos_token or "",
                                        bos_token=hf_tok.bos_token or "")(messages=MESSAGES).prompt
            report(name, "chat: Jinja (llama-cpp-python)", ok=jinja == want)
        del llm

    for q in [q for q in quants if q in FTYPE]:
        theirs = os.path.join(work, f"llama-cpp-{q}.gguf")
        qp = C.llama_model_quantize_default_params()
        qp.ftype, qp.nthread = FTYPE[q], 2
        if C.llama_model_quantize(files["f32"].encode(), theirs.encode(), ctypes.byref(qp)) != 0:
            raise SystemExit(f"llama.cpp could not quantise {files['f32']}")
        ours, other = tensors(files[q]), tensors(theirs)
        same_type = sum(ours[n][0] == other[n][0] for n in ours)
        same_bytes = sum(ours[n] == other[n] for n in ours)
        _, got = llama_logits(theirs, ids)
        report(name, f"llama.cpp's own {q} of our f32", np.abs(got - ref).max() / scale,
               ppl(got, ids), p_ref, same_type == len(ours),
               f"types as ours {same_type}/{len(ours)}, bytes {same_bytes}/{len(ours)}")

    base_gguf = os.path.join(work, "base-f32.gguf")
    run("merge", "--base", base, "--out", base_gguf, "--quant", "f32", "--overwrite")
    lora = os.path.join(work, "adapter.gguf")
    run("export-lora", "--adapter", adapter, "--base", base, "--format", "gguf", "--out", lora, "--overwrite")
    _, merged = llama_logits(files["f32"], ids)
    _, applied = llama_logits(base_gguf, ids, lora=lora)
    rel = np.abs(applied - merged).max() / np.abs(merged).max()
    report(name, "adapter GGUF at scale 1 vs merged f32", rel, ppl(applied, ids), ppl(merged, ids),
           rel <= tol["adapter"], f"logits within {tol['adapter']:.0e}")


tiny = hf_model("tiny", hidden_size=64, intermediate_size=172, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
check("tiny (example shape)", tiny, ["f32", "f16", "bf16", "q8_0", "q4_0"], CHATML)
gqa = hf_model("gqa", hidden_size=256, intermediate_size=512, num_hidden_layers=4,
               num_attention_heads=8, num_key_value_heads=2, tie_word_embeddings=False,
               rope_scaling={"rope_type": "linear", "factor": 2.0})
check("gqa (8 q / 2 kv heads, linear RoPE x2)", gqa, ["f32", "f16", "q8_0", "q4_0", "q4_k_m"], CHATML)
llama31 = hf_model("llama31", hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
                   rope_theta=500000.0, max_position_embeddings=131072,
                   rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                 "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})
check("llama31 (LLaMA 3.1 RoPE scaling, heads of 64)", llama31, ["f32", "f16", "q8_0"], CHATML)
llama2 = hf_model("llama2", spm=True, hidden_size=64, intermediate_size=172, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
check("llama2 (SentencePiece-style vocabulary with byte fallback)", llama2, ["f32", "q8_0"], CHATML)
qwen2 = hf_model("qwen2", family="qwen2", hidden_size=64, intermediate_size=172,
                 num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 tie_word_embeddings=True)
check("qwen2 (q/k/v biases, tied embeddings)", qwen2, ["f32", "f16", "q8_0"], CHATML)
qwen3 = hf_model("qwen3", family="qwen3", hidden_size=64, intermediate_size=172,
                 num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                 tie_word_embeddings=True)
check("qwen3 (q/k norms, heads of 32 at hidden 64, tied)", qwen3, ["f32", "f16", "q8_0"], CHATML)
gemma3 = hf_model("gemma3", family="gemma3", hidden_size=64, intermediate_size=172,
                  num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                  query_pre_attn_scalar=32, sliding_window=512, tie_word_embeddings=True)
# llama.cpp's gemma3 differs from itself (base + adapter against merged) by ~2e-4 here
check("gemma3 (5 local layers and a global one, heads of 32)", gemma3, ["f32", "f16", "q8_0"], CHATML,
      tol={"f32": 1e-3, "adapter": 1e-3})
phi3 = hf_model("phi3", family="phi3", hidden_size=64, intermediate_size=172, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, pad_token_id=0, tie_word_embeddings=False)
check("phi3 (fused qkv and gate_up)", phi3, ["f32", "f16", "q8_0"], CHATML)
gpt2 = hf_model("gpt2", family="gpt2", n_embd=64, n_inner=256, n_layer=2, n_head=4, n_positions=1024)
check("gpt2 (Conv1D weights, learned positions, biases, tied)", gpt2, ["f32", "f16", "q8_0"], CHATML)
if args.smollm2:
    from gguf import GGUFReader

    field = GGUFReader(args.smollm2).fields["tokenizer.chat_template"]
    template = bytes(field.parts[field.data[0]]).decode()
    check("SmolLM2-135M-Instruct (Q4_1 GGUF)", args.smollm2,
          ["f32", "f16", "q8_0", "q4_k_m", "same"], template)

if args.gemma3:
    from gguf import GGUFReader

    field = GGUFReader(args.gemma3).fields.get("tokenizer.chat_template")
    template = bytes(field.parts[field.data[0]]).decode() if field else None
    check("Gemma 3 270M (Q4_K_M GGUF)", args.gemma3, ["f32", "f16", "q8_0", "q4_k_m", "same"], template,
          # llama.cpp's Gemma 3 is only this close to itself: base + adapter against the merged
          # file, both in llama.cpp, differ by 3.9e-4 where every other model's differ by < 2e-6
          bos=True, lr="5e-4", tol={"f32": 1e-3, "adapter": 1e-3})

w = [max(len(str(r[i])) for r in rows + [("model", "file", "max|dlogit|/max|logit|", "ppl", "ppl ref", "", "")]) for i in range(7)]
hdr = ("model", "file", "max|dlogit|/max|logit|", "ppl", "ppl ref", "", "")
print(" | ".join(h.ljust(w[i]) for i, h in enumerate(hdr)))
for r in rows:
    print(" | ".join(str(c).ljust(w[i]) for i, c in enumerate(r)))
print(f"llama-cpp-python {llama_cpp.__version__}; text of {len(TEXT)} characters; work in {tmp}")
sys.exit(1 if failed else 0)
