#!/usr/bin/env python3
"""Writes small, valid seed inputs for every fuzz target into fuzz/corpus/<target>/.

The fuzzer grows the corpus from these; shrink_corpus.py then keeps a small part that adds coverage.
Run from anywhere: python3 fuzz/seeds.py
"""
import json
import os
import random
import struct

HERE = os.path.dirname(os.path.abspath(__file__))
rng = random.Random(1)


def out(target, name, data):
    d = os.path.join(HERE, "corpus", target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, "seed-" + name), "wb") as f:
        f.write(data)


# --- safetensors -------------------------------------------------------------------------------

BITS = {"BOOL": 8, "U8": 8, "I8": 8, "F8_E4M3": 8, "F8_E5M2": 8, "F8_E8M0": 8, "I16": 16,
        "U16": 16, "F16": 16, "BF16": 16, "I32": 32, "U32": 32, "F32": 32, "I64": 64, "U64": 64,
        "F64": 64, "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6, "C64": 64}


def safetensors(tensors, metadata=None):
    """tensors: [(name, dtype, shape, bytes or None)]"""
    header, blobs, off = {}, [], 0
    for name, dtype, shape, data in tensors:
        n = 1
        for s in shape:
            n *= s
        size = n * BITS[dtype] // 8
        if data is None:
            if dtype in ("F32",):
                data = b"".join(struct.pack("<f", rng.uniform(-1, 1)) for _ in range(n))
            else:
                data = bytes(rng.randrange(256) for _ in range(size))
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [off, off + len(data)]}
        blobs.append(data)
        off += len(data)
    if metadata is not None:
        header["__metadata__"] = metadata
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * (-len(h) % 8)
    return struct.pack("<Q", len(h)) + h + b"".join(blobs)


def seeds_safetensors():
    out("safetensors", "floats", safetensors([
        ("model.embed_tokens.weight", "F32", [3, 2], None),
        ("model.norm.weight", "F16", [4], None),
        ("lm_head.weight", "BF16", [2, 2], None),
        ("x.bias", "F64", [1], None)], {"format": "pt"}))
    out("safetensors", "ints", safetensors([
        ("a", "I64", [2], None), ("b", "U8", [3], None), ("c", "I32", [1, 1], None),
        ("d", "U16", [2], None), ("e", "I16", [2], None), ("f", "U32", [1], None),
        ("g", "BOOL", [2], None), ("h", "I8", [1], None), ("i", "U64", [1], None)]))
    out("safetensors", "small-floats", safetensors([
        ("a", "F8_E4M3", [2], None), ("b", "F8_E5M2", [2], None), ("c", "F4", [4], None),
        ("d", "F6_E2M3", [4], None), ("e", "F6_E3M2", [4], None), ("f", "F8_E8M0", [2], None),
        ("g", "C64", [1], None)]))
    out("safetensors", "empty", safetensors([]))
    out("safetensors", "scalar-and-zero", safetensors([
        ("s", "F32", [], None), ("z", "F32", [0, 5], b""), ("n", "F32", [1], struct.pack("<f", float("nan")))]))


def seeds_checkpoint():
    shard = safetensors([("model.embed_tokens.weight", "F32", [3, 2], None),
                         ("model.layers.0.mlp.up_proj.weight", "BF16", [2, 2], None),
                         ("model.norm.weight", "F16", [2], None)], {"format": "pt"})
    name = "model-00001-of-00001.safetensors"
    index = {"metadata": {"total_size": len(shard)},
             "weight_map": {"model.embed_tokens.weight": name,
                            "model.layers.0.mlp.up_proj.weight": name,
                            "model.norm.weight": name}}
    i = json.dumps(index).encode()
    out("checkpoint", "sharded", struct.pack("<I", len(i)) + i + shard)
    out("checkpoint", "single", struct.pack("<I", 0) + shard)


# --- adapter_config / adapter_file ---------------------------------------------------------------

SINGLORA = {"peft_type": "SINGLORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": "m",
            "r": 2, "lora_alpha": 4, "use_rslora": False, "ramp_steps": 10, "step": 3,
            "init": "kaiming_width", "target_modules": ["q_proj", "v_proj"],
            "exclude_modules": None, "fan_in_fan_out": False,
            "rank_pattern": {"v_proj": 1}, "alpha_pattern": {"layers\\.0\\..*": 2.5},
            "modules_to_save": None, "inference_mode": True,
            "layer_shapes": {"model.layers.0.self_attn.q_proj": [4, 3]}}
LORA = {"peft_type": "LORA", "task_type": "SEQ_CLS", "base_model_name_or_path": None,
        "revision": None, "inference_mode": True, "r": 2, "lora_alpha": 16, "lora_dropout": 0.0,
        "use_rslora": True, "use_dora": False, "target_modules": ".*\\.(query|value)",
        "exclude_modules": ["layers.1.query"], "fan_in_fan_out": False, "bias": "none",
        "modules_to_save": ["classifier"], "init_lora_weights": True,
        "layers_to_transform": None, "layers_pattern": None, "rank_pattern": {},
        "alpha_pattern": {}, "megatron_config": None, "megatron_core": "megatron.core",
        "loftq_config": {}, "layer_replication": None, "use_qalora": False, "lora_bias": False,
        "labels": ["neg", "pos"], "pooling": "cls"}
DORA = dict(LORA, use_dora=True, target_modules="all-linear", modules_to_save=None,
            labels=None, pooling=None, use_rslora=False)
P = "base_model.model."


def adapter(config, tensors):
    c = json.dumps(config).encode()
    return struct.pack("<I", len(c)) + c + safetensors(tensors)


def seeds_adapter():
    for name, c in [("singlora", SINGLORA), ("lora", LORA), ("dora", DORA)]:
        out("adapter_config", name, json.dumps(c, indent=2).encode())
    out("adapter_file", "singlora", adapter(SINGLORA, [
        (P + "model.layers.0.self_attn.q_proj.singlora_A.weight", "F32", [4, 2], None),
        (P + "model.layers.0.self_attn.v_proj.singlora_A.weight", "F32", [3, 1], None)]))
    out("adapter_file", "lora", adapter(LORA, [
        (P + "encoder.layer.0.attention.self.query.lora_A.weight", "F32", [2, 3], None),
        (P + "encoder.layer.0.attention.self.query.lora_B.weight", "F32", [4, 2], None),
        (P + "classifier.weight", "F32", [2, 4], None),
        (P + "classifier.bias", "F32", [2], None)]))
    out("adapter_file", "dora", adapter(DORA, [
        (P + "m.q.lora_A.weight", "F16", [2, 3], None),
        (P + "m.q.lora_B.weight", "BF16", [4, 2], None),
        (P + "m.q.lora_magnitude_vector.weight", "F32", [4], None)]))


# --- GGUF ----------------------------------------------------------------------------------------

def gstr(s):
    b = s.encode()
    return struct.pack("<Q", len(b)) + b


T_U8, T_I8, T_U16, T_I16, T_U32, T_I32, T_F32, T_BOOL, T_STR, T_ARR, T_U64, T_I64, T_F64 = range(13)
FMT = {T_U8: "<B", T_I8: "<b", T_U16: "<H", T_I16: "<h", T_U32: "<I", T_I32: "<i", T_F32: "<f",
       T_BOOL: "<?", T_U64: "<Q", T_I64: "<q", T_F64: "<d"}


def gval(t, v):
    if t == T_STR:
        return gstr(v)
    if t == T_ARR:
        et, items = v
        return struct.pack("<IQ", et, len(items)) + b"".join(gval(et, x) for x in items)
    return struct.pack(FMT[t], v)


# ggml type → (id, block size, bytes per block)
GGML = {"F32": (0, 1, 4), "F16": (1, 1, 2), "Q4_0": (2, 32, 18), "Q4_1": (3, 32, 20),
        "Q5_0": (6, 32, 22), "Q5_1": (7, 32, 24), "Q8_0": (8, 32, 34), "Q8_1": (9, 32, 36),
        "Q2K": (10, 256, 84), "Q3K": (11, 256, 110), "Q4K": (12, 256, 144),
        "Q5K": (13, 256, 176), "Q6K": (14, 256, 210), "Q8K": (15, 256, 292),
        "BF16": (30, 1, 2)}


def tensor_bytes(dtype, shape):
    _, bs, ts = GGML[dtype]
    n = 1
    for s in shape:
        n *= s
    if dtype == "F32":
        return b"".join(struct.pack("<f", rng.uniform(-1, 1)) for _ in range(n))
    if dtype == "F16":
        return b"".join(struct.pack("<e", rng.uniform(-1, 1)) for _ in range(n))
    if dtype == "BF16":
        return b"".join(struct.pack("<f", rng.uniform(-1, 1))[2:] for _ in range(n))
    out = b""
    for _ in range(n // bs):
        blk = bytearray(rng.randrange(256) for _ in range(ts))
        # keep the f16 scales small and finite
        for i in range(0, min(4, ts), 2):
            blk[i:i + 2] = struct.pack("<e", rng.uniform(-0.1, 0.1))
        out += bytes(blk)
    return out


def gguf(metadata, tensors, version=3, alignment=32):
    """metadata: [(key, type, value)]; tensors: [(name, dtype, hf-shape)]"""
    head = struct.pack("<IIQQ", 0x46554747, version, len(tensors), len(metadata))
    for k, t, v in metadata:
        head += gstr(k) + struct.pack("<I", t) + gval(t, v)
    data, off = b"", 0
    for name, dtype, shape in tensors:
        blob = tensor_bytes(dtype, shape)
        head += gstr(name) + struct.pack("<I", len(shape))
        head += b"".join(struct.pack("<Q", d) for d in reversed(shape))
        head += struct.pack("<IQ", GGML[dtype][0], off)
        pad = -len(blob) % alignment
        data += blob + b"\0" * pad
        off += len(blob) + pad
    head += b"\0" * (-len(head) % alignment)
    return head + data


TOKENS = ["<|endoftext|>", "<|im_start|>", "a", "b", "c", "Ġ", "1", "Ġa", "ab", "Ġab"]


def llama_meta(hidden, layers, ff, heads, kv, pre="smollm", extra=()):
    types = [3, 3] + [1] * (len(TOKENS) - 2)
    md = [("general.architecture", T_STR, "llama"),
          ("general.alignment", T_U32, 32),
          ("llama.block_count", T_U32, layers),
          ("llama.context_length", T_U32, 512),
          ("llama.embedding_length", T_U32, hidden),
          ("llama.feed_forward_length", T_U32, ff),
          ("llama.attention.head_count", T_U32, heads),
          ("llama.attention.head_count_kv", T_U32, kv),
          ("llama.attention.layer_norm_rms_epsilon", T_F32, 1e-5),
          ("llama.rope.freq_base", T_F32, 100000.0),
          ("tokenizer.ggml.model", T_STR, "gpt2"),
          ("tokenizer.ggml.pre", T_STR, pre),
          ("tokenizer.ggml.tokens", T_ARR, (T_STR, TOKENS)),
          ("tokenizer.ggml.token_type", T_ARR, (T_I32, types)),
          ("tokenizer.ggml.merges", T_ARR, (T_STR, ["Ġ a", "a b", "Ġa b"])),
          ("tokenizer.ggml.bos_token_id", T_U32, 1),
          ("tokenizer.ggml.eos_token_id", T_U32, 0),
          ("tokenizer.ggml.add_bos_token", T_BOOL, True),
          ("tokenizer.chat_template", T_STR, "{{ x }}")]
    return md + list(extra)


def seeds_gguf():
    v = len(TOKENS)
    # A whole tiny model: hidden 8, 2 heads of 4 (1 KV head), ff 16, one layer.
    h, ff, heads, kv = 8, 16, 2, 1
    hd = h // heads
    ts = [("token_embd.weight", "F32", [v, h]), ("output_norm.weight", "F32", [h]),
          ("output.weight", "F16", [v, h])]
    for name, dt, shape in [("attn_q", "F32", [heads * hd, h]), ("attn_k", "F32", [kv * hd, h]),
                            ("attn_v", "BF16", [kv * hd, h]), ("attn_output", "F32", [h, h]),
                            ("ffn_gate", "F32", [ff, h]), ("ffn_up", "F16", [ff, h]),
                            ("ffn_down", "F32", [h, ff]), ("attn_norm", "F32", [h]),
                            ("ffn_norm", "F32", [h])]:
        ts.append((f"blk.0.{name}.weight", dt, shape))
    out("gguf", "tiny", gguf(llama_meta(h, 1, ff, heads, kv), ts))
    out("gguf", "tiny-v2-llama3-tied", gguf(llama_meta(h, 1, ff, heads, kv, pre="llama-bpe", extra=[
        ("llama.rope.scaling.type", T_STR, "linear"),
        ("llama.rope.scaling.factor", T_F32, 2.0),
        ("llama.attention.key_length", T_U32, hd),
        ("llama.attention.value_length", T_U32, hd),
        ("llama.rope.dimension_count", T_U32, hd)]),
        [t for t in ts if t[0] != "output.weight"], version=2))
    # No layers: the embedding and the head in each quantised type.
    for q in ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q8_1"]:
        h = 32
        out("gguf", f"quant-{q}", gguf(llama_meta(h, 0, 64, 2, 2, pre="gpt2"), [
            ("token_embd.weight", q, [v, h]), ("output_norm.weight", "F32", [h]),
            ("output.weight", q, [v, h])]))
    for q in ["Q2K", "Q3K", "Q4K", "Q5K", "Q6K", "Q8K"]:
        h = 256
        out("gguf", f"quant-{q}", gguf(llama_meta(h, 0, 64, 2, 2), [
            ("token_embd.weight", q, [v, h]), ("output_norm.weight", "F16", [h])]))


# --- rows ----------------------------------------------------------------------------------------

def seeds_rows():
    # selector: & 3 → 0 jsonl, 1 csv, 2 tsv, 3 jsonl; 0x10 sft; 0x20 skip bad rows; 0x40 text_pair required
    out("rows", "jsonl-classify", bytes([0]) + b'{"text": "good", "label": "pos"}\n'
        b'{"text": "bad", "label": 0, "text_pair": "x"}\r\n\n{"text": "", "label": null}\n')
    out("rows", "jsonl-sft", bytes([0x30]) + "\ufeff{\"prompt\": \"Q?\", \"completion\": \"A\"}\n"
        "{\"prompt\": [1], \"completion\": 2.5}\nnot json\n".encode())
    out("rows", "csv-classify", bytes([1 + 0x40]) + b'text,label,text_pair\n"a, ""quoted""\nline",1,b\n'
        b'x,y\n,,\n')
    out("rows", "csv-sft", bytes([0x31]) + b"prompt,completion,extra\nhello,world,1\n\"open,x\n")
    out("rows", "tsv-classify", bytes([2 + 0x20]) + b"label\ttext\npos\thi there\n\t\nneg\t\xff\xfe\n")
    out("rows", "tsv-sft", bytes([0x32]) + b"prompt\tcompletion\nq\ta\n")


if __name__ == "__main__":
    seeds_safetensors()
    seeds_adapter()
    seeds_gguf()
    seeds_rows()
    seeds_checkpoint()
    for t in sorted(os.listdir(os.path.join(HERE, "corpus"))):
        files = os.listdir(os.path.join(HERE, "corpus", t))
        size = sum(os.path.getsize(os.path.join(HERE, "corpus", t, f)) for f in files)
        print(f"{t}: {len(files)} inputs, {size} bytes")
