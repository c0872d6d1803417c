#!/usr/bin/env bash
# Fuzzes kmsfs's parsers and block codec: every cargo-fuzz target in fuzz/
# (their checks are kmsfs::fuzzing) for a bounded time each.
#
#   scripts/fuzz.sh [SECONDS_PER_TARGET] [TARGET...]
#
# SECONDS_PER_TARGET defaults to 20 (scripts/test.sh uses 10); TARGETs
# default to all of them (`cargo fuzz list` in fuzz/). Installs what it needs
# if absent: the nightly toolchain (rustup) and cargo-fuzz (cargo install).
# Exits 1 if any target crashed, after running the others, and prints where
# each crashing input is and how to replay it. A crash is a bug in kmsfs:
# fix it, then add the input to fuzz/corpus/TARGET/ under a name that says
# what it found, so `cargo test --test fuzz_corpus` keeps checking it.
#
# Environment:
#   KMSFS_FUZZ_TARGET_DIR  build directory (default ~/.cache/kmsfs-fuzz-target,
#                          outside the clone so CI reuses it)
#   KMSFS_FUZZ_CORPUS      where runs keep the inputs they find, one
#                          directory per target (default ~/.cache/kmsfs-fuzz-corpus);
#                          the committed fuzz/corpus/TARGET seeds every run
set -euo pipefail

# shellcheck source=scripts/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

log() { printf 'fuzz: %s\n' "$*"; }
die() { printf 'fuzz: error: %s\n' "$*" >&2; exit 1; }

seconds=${1:-20}
[[ $seconds =~ ^[1-9][0-9]*$ ]] || { echo "usage: scripts/fuzz.sh [SECONDS_PER_TARGET] [TARGET...]" >&2; exit 2; }
shift $(($# > 0 ? 1 : 0))

target_dir=${KMSFS_FUZZ_TARGET_DIR:-$HOME/.cache/kmsfs-fuzz-target}
corpus_root=${KMSFS_FUZZ_CORPUS:-$HOME/.cache/kmsfs-fuzz-corpus}
fuzz_dir=$KMSFS_ROOT/fuzz

if ! rustup toolchain list | grep -q '^nightly'; then
    log "rustup toolchain install nightly (cargo-fuzz needs it)"
    rustup toolchain install nightly --profile minimal || die "could not install the nightly toolchain"
fi
if ! command -v cargo-fuzz >/dev/null 2>&1; then
    log "cargo install cargo-fuzz"
    cargo install cargo-fuzz --locked || die "cargo install cargo-fuzz failed"
fi

# No sanitizer: the targets are safe Rust over aws-lc (whose C code would
# not be instrumented anyway), so a panic or failed check is what we look
# for, and an uninstrumented build is about twice as fast to build and run.
# Debug assertions turn on overflow checks: a size computation that wraps
# is a crash, not a wrong answer.
fuzz_flags=(--sanitizer none --debug-assertions --target-dir "$target_dir")

cd "$fuzz_dir"
if (($# == 0)); then
    mapfile -t targets < <(cargo +nightly fuzz list)
else
    targets=("$@")
fi
((${#targets[@]})) || die "no fuzz targets found in $fuzz_dir"

log "build: cargo +nightly fuzz build ${fuzz_flags[*]}"
cargo +nightly fuzz build "${fuzz_flags[@]}" || die "the fuzz build failed"

crashed=()
for t in "${targets[@]}"; do
    [[ -d corpus/$t ]] || die "fuzz/corpus/$t does not exist: every target has a committed seed corpus"
    work=$corpus_root/$t
    mkdir -p "$work" "artifacts/$t"
    run_log=$(mktemp "/tmp/kmsfs-fuzz-$t.XXXXXX.log")
    log "$t: ${seconds}s (corpus $work, seeds fuzz/corpus/$t)"
    # New inputs go to the first directory only; the committed seeds stay as
    # they are. -timeout: one input taking this long is a hang, a bug too.
    if cargo +nightly fuzz run "${fuzz_flags[@]}" "$t" "$work" "corpus/$t" -- \
        -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 \
        -artifact_prefix="$fuzz_dir/artifacts/$t/" -print_final_stats=1 >"$run_log" 2>&1; then
        stats=$(grep -E '^stat::number_of_executed_units' "$run_log" | awk '{print $2}')
        log "$t: ok (${stats:-?} inputs run, $(find "$work" -type f | wc -l) in its corpus)"
        rm -f "$run_log"
    else
        tail -n 40 "$run_log" >&2
        input=$(grep -oE "$fuzz_dir/artifacts/$t/[a-z-]+-[0-9a-f]+" "$run_log" | tail -n 1 || true)
        log "$t: CRASHED; full log: $run_log"
        if [[ -n $input ]]; then
            log "$t: the crashing input is $input"
            log "$t: replay it: (cd fuzz && cargo +nightly fuzz run ${fuzz_flags[*]} $t $input)"
        fi
        crashed+=("$t")
    fi
done

if ((${#crashed[@]})); then
    die "${#crashed[@]} target(s) crashed: ${crashed[*]} (inputs under fuzz/artifacts/)"
fi
log "all ${#targets[@]} targets ran ${seconds}s each without a crash"
