"""Writes a copy of a Hugging Face checkpoint directory with its f32 safetensors weights in bf16
(round to nearest even, as candle converts), so that a model fits the device tool's 64 MiB
carry limit (all-MiniLM-L6-v2: 87 MiB -> 43 MiB). The GPU trainer keeps frozen weights in bf16
anyway, so runs on the copy see the same weights. Standard library only.

    python3 experiments/to_bf16.py SRC_DIR DST_DIR
"""
import array
import json
import os
import shutil
import struct
import sys


def to_bf16(raw: bytes) -> bytes:
    src = array.array("I")
    src.frombytes(raw)
    if sys.byteorder != "little":
        src.byteswap()
    out = array.array("H", bytes(2 * len(src)))
    for i, b in enumerate(src):
        if (b & 0x7F800000) == 0x7F800000 and (b & 0x007FFFFF):  # NaN stays NaN
            out[i] = (b >> 16) | 0x40
        else:
            out[i] = ((b + 0x7FFF + ((b >> 16) & 1)) >> 16) & 0xFFFF
    if sys.byteorder != "little":
        out.byteswap()
    return out.tobytes()


def convert(src: str, dst: str) -> None:
    with open(src, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
        data = f.read()
    meta = header.pop("__metadata__", None)
    new_header, chunks, off = {}, [], 0
    for name, t in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
        a, b = t["data_offsets"]
        raw = data[a:b]
        dtype = t["dtype"]
        if dtype == "F32":
            raw, dtype = to_bf16(raw), "BF16"
        new_header[name] = {"dtype": dtype, "shape": t["shape"], "data_offsets": [off, off + len(raw)]}
        chunks.append(raw)
        off += len(raw)
    if meta is not None:
        new_header["__metadata__"] = meta
    h = json.dumps(new_header, separators=(",", ":")).encode()
    h += b" " * (-len(h) % 8)
    tmp = dst + ".tmp"
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(h)))
        f.write(h)
        for c in chunks:
            f.write(c)
    os.replace(tmp, dst)


def main() -> None:
    src, dst = sys.argv[1], sys.argv[2]
    os.makedirs(dst, exist_ok=True)
    for name in os.listdir(src):
        s, d = os.path.join(src, name), os.path.join(dst, name)
        if name.endswith(".safetensors"):
            convert(s, d)
        elif os.path.isfile(s) and name.endswith((".json", ".txt")):
            shutil.copyfile(s, d)
        elif os.path.isdir(s) and not name.startswith("."):  # e.g. 1_Pooling/config.json
            shutil.copytree(s, d, dirs_exist_ok=True)
    print(f"wrote {dst}")


if __name__ == "__main__":
    main()
