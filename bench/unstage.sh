#!/usr/bin/env bash
# The device side of bench/stage.sh: keeps the parts a call carried in /tmp/stage/NAME, and
# with --join OUT_FILE joins every part there into OUT_FILE and checks it against the SHA-256
# (fails, leaving no OUT_FILE, when a part is missing or damaged).
#   bash bench/unstage.sh NAME [--join OUT_FILE]
set -euo pipefail
cd "$(dirname "$0")/.."
name=${1:?the staged name}
keep=/tmp/stage/$name
mkdir -p "$keep"
for p in .stage/"$name"/part-*; do
  [ -f "$p" ] && cp "$p" "$keep/"
done
[ -f ".stage/$name/SHA256" ] && cp ".stage/$name/SHA256" "$keep/"
if [ "${2:-}" = --join ]; then
  out=${3:?the joined file}
  cat "$keep"/part-* > "$out.tmp"
  got=$(sha256sum "$out.tmp" | cut -d' ' -f1)
  if [ -f "$keep/SHA256" ] && [ "$got" != "$(cat "$keep/SHA256")" ]; then
    rm -f "$out.tmp"
    echo "unstage $name: SHA-256 $got does not match $(cat "$keep/SHA256") (parts: $(ls "$keep" | tr '\n' ' '))" >&2
    exit 1
  fi
  mv "$out.tmp" "$out"
  echo "unstage $name: $out ($(stat -c %s "$out") bytes, SHA-256 checked)"
else
  ls "$keep"
fi
