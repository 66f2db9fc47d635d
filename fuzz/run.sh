#!/bin/sh
# Runs every fuzz target for the given number of seconds (default 60), starting from the
# seeds. Stops at the first target that finds a crash.
set -eu
seconds="${1:-60}"
cd "$(dirname "$0")"
for target in duration cli_flags route_patterns state_file control_json chunked_body; do
    mkdir -p "corpus/$target" "seeds/$target"
    echo "== $target ($seconds s)"
    RUSTC_BOOTSTRAP=1 cargo fuzz run -O "$target" "corpus/$target" "seeds/$target" -- \
        -max_total_time="$seconds" -rss_limit_mb=2048 -print_final_stats=1 2>&1 \
        | grep -E '^(Done|stat::number_of_executed_units|SUMMARY|thread|.*Test unit written)' || true
    if ls "artifacts/$target"/crash-* >/dev/null 2>&1; then
        echo "$target found a crash: see fuzz/artifacts/$target" >&2
        exit 1
    fi
done
