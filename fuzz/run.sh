#!/bin/sh
# Runs every libFuzzer target for SECONDS (default 600) with the committed seeds in
# fuzz/corpus/<target> and a scratch corpus under ${FUZZ_WORK:-/tmp/modula-fuzz}; prints each
# target's last status line. Needs the nightly toolchain and `cargo install cargo-fuzz`.
#   sh fuzz/run.sh [SECONDS] [TARGET...]
set -e
cd "$(dirname "$0")"
secs=${1:-600}
[ $# -gt 0 ] && shift
targets=${*:-"safetensors checkpoint peft_config peft_folder model_config library_index cli_input model_folder"}
work=${FUZZ_WORK:-/tmp/modula-fuzz}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$HOME/.cache/modula-fuzz-target}
for t in $targets; do
    mkdir -p "$work/$t"
    cargo +nightly fuzz run --fuzz-dir . -O "$t" "$work/$t" "corpus/$t" -- \
        -max_total_time="$secs" -rss_limit_mb=4096 -max_len=65536 2>"$work/$t.log" || {
        echo "$t: crashed, see $work/$t.log and artifacts/$t/"; continue; }
    echo "$t: $(grep -E '^#[0-9]+' "$work/$t.log" | tail -1)"
done
