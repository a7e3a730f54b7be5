"""The GGUF metadata key names of llama.cpp's `gguf` Python package, as the Rust tests read them.

crates/singlora/tests/fixtures/gguf_keys.txt lists every key of `gguf.constants.Keys`, one a
line, with `{arch}` written as `llama` and `{id}` as 0; the tests check that every key singlora
writes is one of them and that llama.cpp's required keys are among them. CI has no Python, so
the list is kept in the repository; this script makes it and checks it:

    pip install gguf
    python scripts/gguf_keys.py           # rewrite the list from the installed package
    python scripts/gguf_keys.py --check   # exit 1 when the list and the package differ
"""
import inspect
import sys
from importlib.metadata import version
from pathlib import Path

from gguf.constants import Keys

OUT = Path(__file__).resolve().parent.parent / "crates/singlora/tests/fixtures/gguf_keys.txt"


def keys():
    out = set()
    for _, cls in inspect.getmembers(Keys, inspect.isclass):
        for name, value in vars(cls).items():
            if isinstance(value, str) and not name.startswith("_"):
                out.add(value.replace("{arch}", "llama").replace("{id}", "0"))
    return sorted(out)


def render():
    head = f"# GGUF metadata keys of the gguf package {version('gguf')} ({{arch}} = llama, {{id}} = 0); made by scripts/gguf_keys.py\n"
    return head + "".join(k + "\n" for k in keys())


if __name__ == "__main__":
    text = render()
    if "--check" in sys.argv:
        have = [l for l in OUT.read_text().splitlines() if l and not l.startswith("#")]
        want = keys()
        missing, extra = sorted(set(want) - set(have)), sorted(set(have) - set(want))
        for k in missing:
            print(f"in the package, not in {OUT.name}: {k}")
        for k in extra:
            print(f"in {OUT.name}, not in the package: {k}")
        print(f"{len(want)} keys in gguf {version('gguf')}; {len(missing)} missing, {len(extra)} extra")
        sys.exit(1 if missing or extra else 0)
    OUT.write_text(text)
    print(f"wrote {len(keys())} keys to {OUT}")
