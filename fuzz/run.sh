#!/usr/bin/env bash
# Builds and runs one kiln fuzz target with libFuzzer (cargo fuzz), one job, bounded time.
#
#   fuzz/run.sh TARGET [SECONDS]        fuzz TARGET for SECONDS (default 300)
#   fuzz/run.sh TARGET repro FILE...    run TARGET once on each FILE (reproduce a crash)
#   fuzz/run.sh TARGET cmin             minimize corpus/TARGET with what runs found
#   fuzz/run.sh list                    the targets
#
# Stable Rust only: cargo fuzz needs -Zsanitizer and friends, which RUSTC_BOOTSTRAP=1
# unlocks on the stable compiler. New inputs go to target/corpus/TARGET (not committed);
# crashes, timeouts and out-of-memory inputs go to artifacts/TARGET/ — copy each one
# that reveals a bug to artifacts-regressions/TARGET/, where tests/fuzz_regressions.rs
# replays it in `cargo test --workspace`.
set -euo pipefail
here=$PWD
cd "$(dirname "${BASH_SOURCE[0]}")"

# Every allocation over 1 GiB, an RSS over 2 GiB, or one input taking over 10 s is a
# finding, not noise.
LIMITS=(-rss_limit_mb=2048 -malloc_limit_mb=1024 -timeout=10)

target=${1:?usage: fuzz/run.sh TARGET [SECONDS | repro FILE... | cmin] (fuzz/run.sh list)}
if [[ $target == list ]]; then
    sed -n 's/^name = "\(.*\)"/\1/p' Cargo.toml | grep -v kiln-fuzz
    exit 0
fi
mode=${2:-300}

if ! command -v cargo-fuzz >/dev/null; then
    cargo install cargo-fuzz --locked
fi
export RUSTC_BOOTSTRAP=1
export CARGO_BUILD_JOBS=${CARGO_BUILD_JOBS:-1}
build=(-O --debug-assertions)

# The harness writes the inputs to files: keep them on a tmpfs, and remove them after.
base=/dev/shm
[[ -d $base && -w $base ]] || base=${TMPDIR:-/tmp}
scratch=$(mktemp -d "$base/kiln-fuzz.XXXXXX")
trap 'rm -rf "$scratch"' EXIT
export TMPDIR=$scratch

cargo fuzz build "${build[@]}" "$target"
mkdir -p "target/corpus/$target" "corpus/$target" "artifacts/$target"

case $mode in
repro)
    shift 2
    files=()
    for f in "$@"; do
        [[ $f == /* ]] || f=$here/$f
        files+=("$f")
    done
    cargo fuzz run "${build[@]}" "$target" "${files[@]}" -- "${LIMITS[@]}" -runs=1
    ;;
cmin)
    # Rebuild the committed corpus: the named seeds (make_seeds.py) stay, and of the
    # other inputs under 4 KiB (earlier merges and what runs found) only those that add
    # edges to them come back (libFuzzer's merge, smallest inputs first; edges only,
    # not hit counts, to keep the committed corpus small).
    old=$(mktemp -d "$scratch/old.XXXXXX")
    pool=$(mktemp -d "$scratch/pool.XXXXXX")
    find "corpus/$target" -maxdepth 1 -type f ! -name 'seed-*' -exec mv -t "$old" {} +
    for dir in "$old" "target/corpus/$target"; do
        find "$dir" -maxdepth 1 -type f -size -4097c -exec cp -f -t "$pool" {} +
    done
    bin=target/x86_64-unknown-linux-gnu/release/$target
    "$bin" "${LIMITS[@]}" -merge=1 -use_counters=0 "corpus/$target" "$pool"
    echo "corpus/$target: $(find "corpus/$target" -type f | wc -l) files, $(du -sb "corpus/$target" | cut -f1) bytes"
    ;;
*[!0-9]*)
    echo "fuzz/run.sh: SECONDS must be a number, got $mode" >&2
    exit 2
    ;;
*)
    cargo fuzz run "${build[@]}" "$target" "target/corpus/$target" "corpus/$target" -- \
        "${LIMITS[@]}" -max_total_time="$mode" -print_final_stats=1
    ;;
esac
