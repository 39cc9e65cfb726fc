#!/usr/bin/env bash
# Runs every cargo-fuzz target under fuzz/ for a bounded time: first the
# committed crash inputs in fuzz/regressions/<target>/ (each must now pass),
# then FUZZ_SECONDS (default 60) of fuzzing from seeds built from the test
# vectors. Exits non-zero, naming the saved input, if any target crashes.
#
#   FUZZ_SECONDS=600 bash scripts/fuzz.sh            # every target, longer
#   FUZZ_SECONDS=600 bash scripts/fuzz.sh psbt       # one target
#
# The fuzz crate builds in fuzz/target, apart from the main target/. See
# fuzz/README.md.
set -euo pipefail
cd "$(dirname "$0")/.."

seconds="${FUZZ_SECONDS:-60}"
all_targets=(ethereum_tx psbt policy_document approval_message grpc_requests)
targets=("${all_targets[@]}")
if [ "$#" -gt 0 ]; then targets=("$@"); fi

bash scripts/ensure-deps.sh --fuzz

# libFuzzer's instrumentation (-Z flags) on the stable toolchain.
export RUSTC_BOOTSTRAP=1
# AddressSanitizer (cargo-fuzz's default), release optimizations, and debug
# assertions with overflow checks as in custos's own release profile.
build_flags=(-O --debug-assertions --sanitizer address)
# Rust code is memory-safe and leak checking flags caches held for the
# process's life, so leaks are not findings here.
export ASAN_OPTIONS="${ASAN_OPTIONS:-detect_leaks=0}"

started=$(date +%s)
# `server` adds the gRPC request target, the only one that needs the server
# crate; the others fuzz custos-core alone.
cargo fuzz build "${build_flags[@]}" --features server
echo "fuzz: built ${#all_targets[@]} targets in $(($(date +%s) - started)) s"
# Run the binaries just built, not `cargo fuzz run`, which would rebuild
# first: every target then fuzzes the same code, and the time stays bounded.
bin="fuzz/target/$(rustc -vV | sed -n 's/^host: //p')/release"

logs=fuzz/artifacts/logs
mkdir -p "$logs"
marker="$logs/.started"
touch "$marker"
python3 fuzz/make_seeds.py fuzz/corpus

failed=()
summary=()
for target in "${targets[@]}"; do
    corpus="fuzz/corpus/$target"
    mkdir -p "$corpus"
    if [ -d "fuzz/seeds/$target" ]; then
        cp -n "fuzz/seeds/$target"/* "$corpus"/ 2>/dev/null || true
    fi

    regressions=()
    if [ -d "fuzz/regressions/$target" ]; then
        mapfile -t regressions < <(find "fuzz/regressions/$target" -type f ! -name '.*' | sort)
    fi
    if [ "${#regressions[@]}" -gt 0 ]; then
        echo "fuzz: $target: replaying ${#regressions[@]} regression inputs"
        if ! "$bin/$target" -runs=1 "${regressions[@]}" >"$logs/$target.regressions.log" 2>&1; then
            tail -n 40 "$logs/$target.regressions.log" >&2
            echo "fuzz: $target: a committed regression input fails again (log: $logs/$target.regressions.log)" >&2
            failed+=("$target (regression)")
            continue
        fi
    fi

    echo "fuzz: $target: fuzzing for $seconds s"
    status=0
    mkdir -p "fuzz/artifacts/$target"
    "$bin/$target" -artifact_prefix="fuzz/artifacts/$target/" -max_total_time="$seconds" \
        -rss_limit_mb=2048 -timeout=30 -print_final_stats=1 "$corpus" \
        >"$logs/$target.log" 2>&1 || status=$?
    runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$logs/$target.log" | tail -n 1)
    rate=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$logs/$target.log" | tail -n 1)
    corpus_size=$(find "$corpus" -type f | wc -l)
    summary+=("$(printf '%-18s %10s runs %8s exec/s %6s corpus' "$target" "${runs:-?}" "${rate:-?}" "$corpus_size")")
    if [ "$status" -ne 0 ]; then
        tail -n 60 "$logs/$target.log" >&2
        echo "fuzz: $target: CRASH (exit $status); full log: $logs/$target.log" >&2
        while IFS= read -r artifact; do
            echo "fuzz: $target: crash input saved at $artifact" >&2
            echo "fuzz:   reproduce: RUSTC_BOOTSTRAP=1 cargo fuzz run ${build_flags[*]} --features server $target $artifact" >&2
            echo "fuzz:   once fixed, commit it as fuzz/regressions/$target/$(basename "$artifact")" >&2
        done < <(find "fuzz/artifacts/$target" -type f -newer "$marker" 2>/dev/null)
        failed+=("$target")
    fi
done

echo "fuzz: summary (${seconds} s per target, $(($(date +%s) - started)) s in all)"
if [ "${#summary[@]}" -gt 0 ]; then printf '  %s\n' "${summary[@]}"; fi
if [ "${#failed[@]}" -gt 0 ]; then
    echo "fuzz: FAILED: ${failed[*]}" >&2
    exit 1
fi
echo "fuzz: no crashes"
