#!/usr/bin/env bash
# Large inputs for the device tool (a GGUF, a data set, a wheel too big for one call), cut into
# parts that each fit a call beside the working tree, with their SHA-256:
#   bash bench/stage.sh NAME FILE [PART_MB]     # -> .stage/NAME/part-aa, part-ab, ..., SHA256
# Each part then travels in a call of its own (carry [".stage/NAME/part-aa"], ...) running
#   bash bench/unstage.sh NAME                  # copies the parts it was given to /tmp/stage/NAME
# and the call that needs the file, on the same warm machine, runs
#   bash bench/unstage.sh NAME --join OUT_FILE  # joins them and checks the SHA-256
# (.stage/ is ignored by git; the parts never land in the repository.)
set -euo pipefail
cd "$(dirname "$0")/.."
name=${1:?a name for the staged file}; file=${2:?the file to stage}; mb=${3:-33}
dir=.stage/$name
rm -rf "$dir" && mkdir -p "$dir"
split -b "${mb}M" -a 2 "$file" "$dir/part-"
sha256sum "$file" | cut -d' ' -f1 > "$dir/SHA256"
ls -la "$dir"
