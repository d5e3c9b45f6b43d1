#!/usr/bin/env bash
# Side by side, in one run and one folder: kiln's tensor file I/O against dd, Python
# safetensors and torch. See benches/README.md.
#
#   benches/compare.sh
#
# Environment:
#   KILN_BENCH_BYTES  total tensor size (default 1GiB; binary suffixes K/M/G, KiB/MiB/GiB)
#   KILN_BENCH_DIR    folder to write in (default target/bench-tmp in the repository);
#                     a fresh subfolder is made and removed at the end
#   KILN_BENCH_RUNS   runs per measurement, the median is reported (default 3)
#   KILN_PYTHON       Python with torch, safetensors and numpy
#                     (default /root/.cache/kiln/venv/bin/python); without one the
#                     Python rows are skipped, and the script says so
#
# kiln's saves always fsync (file and folder); they are compared to the others + fsync,
# and, run under eatmydata (fsync a no-op) when it is installed, to the others as they are.
# Each measurement runs in its own process under /usr/bin/time -v (peak RSS), after a
# `sync` and with its output file deleted first; the timed part is the save (or open, or
# read) only, never building the tensors. Reads are warm-cache: the files were just
# written and fit in RAM; nothing drops the page cache (that needs root and would
# disturb everyone else on the machine).
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(dirname "$here")
runs=${KILN_BENCH_RUNS:-3}
export KILN_BENCH_BYTES=${KILN_BENCH_BYTES:-1GiB}
py=${KILN_PYTHON:-/root/.cache/kiln/venv/bin/python}

echo "== building io_compare (release, cargo bench --no-run)"
bin=$(cd "$repo" && cargo bench --bench io_compare --no-run --message-format=json-render-diagnostics |
    grep '"name":"io_compare"' | sed -n 's/.*"executable":"\([^"]*\)".*/\1/p' | tail -n 1)
if [[ -z "$bin" || ! -x "$bin" ]]; then
    echo "compare.sh: could not find the io_compare executable" >&2
    exit 1
fi

base=${KILN_BENCH_DIR:-$repo/target/bench-tmp}
mkdir -p "$base"
work=$(mktemp -d "$base/compare-XXXXXX")
trap 'rm -rf "$work"' EXIT

"$bin" layout >"$work/layout.json"
expected=$("$bin" checksum | sed -n 's/.*"checksum":\([0-9]*\).*/\1/p')
bytes=$(sed -n 's/^{"bytes":\([0-9]*\),.*/\1/p' "$work/layout.json")
mib=$(awk -v b="$bytes" 'BEGIN { printf "%.0f", b / 1048576 }')

have_py=0
if [[ -x "$py" ]] && "$py" -c 'import torch, safetensors, numpy' 2>/dev/null; then
    have_py=1
    pyver=$("$py" -c 'import sys, torch, safetensors, numpy
print("python %d.%d, torch %s, safetensors %s, numpy %s" % (sys.version_info[:2] + (torch.__version__, safetensors.__version__, numpy.__version__)))')
else
    pyver="none"
    echo "== Python rows skipped: $py has no torch/safetensors/numpy (set KILN_PYTHON)"
fi

echo "== $bytes bytes (${mib} MiB) of f32 in 32 tensors, in $work"
echo "== $runs runs per measurement, median reported; Python: $pyver"
load0=$(cut -d' ' -f1-3 /proc/loadavg)
echo "== $(nproc) CPUs, load average $load0 (others' work on the machine adds noise)"

declare -A SEC MIN RUNS PEAK HWM DELTA TBYTES JSON

field() { # field NAME FILE: a number from a one-line JSON object
    sed -n "s/.*\"$1\": *\([0-9.eE+-]*\).*/\1/p" "$2" | head -n 1
}

median() {
    printf '%s\n' "$@" | sort -g | awk '{ v[NR] = $1 } END { if (NR % 2) print v[(NR + 1) / 2]; else printf "%.9g\n", (v[NR / 2] + v[NR / 2 + 1]) / 2 }'
}

# measure KEY OUTPUT_FILE_OR_- COMMAND...: runs COMMAND $runs times; records the median
# seconds, the largest peak RSS (KiB, /usr/bin/time -v) and, for saves, the largest
# growth of the resident set during the save itself.
measure() {
    local key=$1 out=$2
    shift 2
    local times=() peak=0 hwm=0 delta=0 r s rss h
    for ((r = 1; r <= runs; r++)); do
        [[ "$out" != - ]] && rm -f "$out"
        sync
        if ! /usr/bin/time -v -o "$work/time.txt" "$@" >"$work/out.json" 2>"$work/err.txt"; then
            echo "   $key: failed: $(tail -n 1 "$work/err.txt")"
            return 0
        fi
        s=$(field seconds "$work/out.json")
        if [[ -z "$s" ]]; then # dd reports its own time on stderr
            s=$(LC_ALL=C sed -n 's/.* copied, \([0-9.eE+-]*\) s,.*/\1/p' "$work/err.txt")
        fi
        times+=("$s")
        rss=$(awk -F': ' '/Maximum resident set size/ { print $2 }' "$work/time.txt")
        ((rss > peak)) && peak=$rss
        h=$(field hwm_kib "$work/out.json")
        if [[ -n "$h" ]]; then
            ((h > hwm)) && hwm=$h
            local d=$((h - $(field rss_before_kib "$work/out.json")))
            ((d > delta)) && delta=$d
            TBYTES[$key]=$(field tensor_bytes "$work/out.json")
        fi
        JSON[$key]=$(cat "$work/out.json")
    done
    SEC[$key]=$(median "${times[@]}")
    MIN[$key]=$(printf '%s\n' "${times[@]}" | sort -g | head -n 1)
    RUNS[$key]="${times[*]}"
    PEAK[$key]=$peak
    HWM[$key]=$hwm
    DELTA[$key]=$delta
    echo "   $key: ${SEC[$key]} s (runs: ${RUNS[$key]})"
}

st="$work/model.safetensors"
# kiln's saves always fsync (temporary file, fsync, rename, fsync of the folder). Their
# un-fsync'd variant runs under eatmydata, which turns fsync into a no-op (LD_PRELOAD).
nosync=()
if command -v eatmydata >/dev/null; then
    nosync=(eatmydata)
else
    echo "== no eatmydata on PATH: the un-fsync'd kiln rows are skipped (kiln's saves always fsync)"
fi
echo "== writes"
# dd writes the same bytes as kiln: a copy of a file kiln wrote, read from the page cache
# (warmed first). On this machine's virtual disk zeros from /dev/zero write faster than
# other bytes (0.36-0.42 s against 0.47-0.59 s for 512 MiB), so that row is context only.
same="$work/same-bytes.safetensors"
"$bin" save-st "$same" >/dev/null
cat "$same" >/dev/null
measure dd "$work/dd.out" env LC_ALL=C dd if="$same" of="$work/dd.out" bs=1M
measure dd_fsync "$work/dd.out" env LC_ALL=C dd if="$same" of="$work/dd.out" bs=1M conv=fsync
measure dd_zero_fsync "$work/dd.out" env LC_ALL=C dd if=/dev/zero of="$work/dd.out" bs=1M count="$bytes" iflag=count_bytes conv=fsync
rm -f "$work/dd.out" "$same"
measure kiln_bin_fsync "$work/kiln.bin" "$bin" save-bin "$work/kiln.bin"
measure kiln_st_fsync "$st" "$bin" save-st "$st"
if ((${#nosync[@]})); then
    measure kiln_bin "$work/kiln.bin" "${nosync[@]}" "$bin" save-bin "$work/kiln.bin"
    measure kiln_st "$st" "${nosync[@]}" "$bin" save-st "$st"
fi
if ((have_py)); then
    pyst="$work/py.safetensors"
    measure py_st "$pyst" "$py" "$here/py_io.py" save-st "$work/layout.json" "$pyst"
    measure py_st_fsync "$pyst" "$py" "$here/py_io.py" save-st "$work/layout.json" "$pyst" --fsync
    rm -f "$pyst"
    measure torch_save_fsync "$work/torch.bin" "$py" "$here/py_io.py" save-pt "$work/layout.json" "$work/torch.bin" --fsync
    measure torch_save "$work/torch.bin" "$py" "$here/py_io.py" save-pt "$work/layout.json" "$work/torch.bin"
fi

echo "== reads (warm page cache: each file was just written)"
# The common input of the .bin reads: the file torch.save wrote, else kiln's own.
if ((have_py)) && [[ -f "$work/torch.bin" ]]; then
    binfile="$work/torch.bin" binwho="torch.save's file"
else
    binfile="$work/kiln.bin" binwho="kiln's file"
fi
[[ -f "$binfile" ]] && measure kiln_read_bin - "$bin" read-bin "$binfile"
if ((have_py)) && [[ -f "$binfile" ]]; then
    measure torch_load - "$py" "$here/py_io.py" load-pt "$binfile"
    measure torch_load_mmap - "$py" "$here/py_io.py" load-pt "$binfile" --mmap
fi
[[ "$binfile" != "$work/kiln.bin" && -f "$work/kiln.bin" ]] &&
    measure kiln_read_own_bin - "$bin" read-bin "$work/kiln.bin"
[[ -f "$st" ]] && measure kiln_read_st - "$bin" read-st "$st"

echo "== header open (median of 51 opens per process)"
small="$work/small.safetensors"
KILN_BENCH_BYTES=64MiB "$bin" save-st "$small" >/dev/null 2>&1 || true
[[ -f "$st" ]] && measure open_big - "$bin" open-st "$st"
[[ -f "$small" ]] && measure open_small - "$bin" open-st "$small"
rm -f "$work"/*.safetensors "$work"/*.bin "$work"/*.out

# ---------------------------------------------------------------------------- table
fmt_t() { # seconds -> "1.512 s", "512.3 ms" or "0.031 ms"
    [[ -z "${1:-}" ]] && { printf -- "-"; return; }
    awk -v s="$1" 'BEGIN { if (s < 0.01) printf "%.3f ms", s * 1000; else if (s < 1) printf "%.1f ms", s * 1000; else printf "%.3f s", s }'
}

section() {
    echo "$1"
}

# row LABEL KILN_KEY OTHER_KEY OP LIMIT: median ratio kiln/other against "ratio OP LIMIT";
# the ratio of the best runs is shown beside it.
row() {
    local label=$1 k=${SEC[$2]:-} o=${SEC[$3]:-} op=$4 lim=$5 ratio="-" best="-" ok="n/a"
    if [[ -n "$k" && -n "$o" ]]; then
        ratio=$(awk -v a="$k" -v b="$o" 'BEGIN { printf "%.2f", a / b }')
        best=$(awk -v a="${MIN[$2]}" -v b="${MIN[$3]}" 'BEGIN { printf "%.2f", a / b }')
        ok=$(awk -v a="$k" -v b="$o" -v l="$lim" -v op="$op" \
            'BEGIN { r = a / b; print ((op == "<" ? r < l : r <= l) ? "yes" : "NO") }')
    fi
    line "$label" "$(fmt_t "$k")" "$(fmt_t "$o")" "$ratio" "$best" "$op $lim" "$ok"
}

line() {
    printf "  %-46s %10s %10s %6s %6s  %-7s %s\n" "$@"
}

echo
echo "kiln vs others, ${mib} MiB of f32 in 32 tensors; times are medians of $runs runs;"
echo "ratio = kiln/other of the medians (judged against the target), best = of the fastest runs"
echo "load average (1/5/15 min) at start: $load0, at end: $(cut -d' ' -f1-3 /proc/loadavg), $(nproc) CPUs"
printf "%-48s %10s %10s %6s %6s  %-7s %s\n" "measurement (kiln vs other)" "kiln" "other" "ratio" "best" "target" "ok"
printf '%.0s-' {1..96}
echo
section "fsync'd: kiln's saves as they are (file and folder synced) vs the others + fsync"
row "safetensors save vs dd conv=fsync" kiln_st_fsync dd_fsync "<=" 1.1
row "  (dd of zeros from /dev/zero, context)" kiln_st_fsync dd_zero_fsync "<=" 1.2
row "safetensors save vs save_file + fsync" kiln_st_fsync py_st_fsync "<" 1.0
row ".bin save vs kiln safetensors save" kiln_bin_fsync kiln_st_fsync "<=" 1.3
row ".bin save vs torch.save + fsync" kiln_bin_fsync torch_save_fsync "<" 1.0
section "un-fsync'd: kiln under eatmydata (fsync a no-op) vs the others as they are"
row "safetensors save vs dd bs=1M" kiln_st dd "<=" 1.1
row "safetensors save vs Python save_file" kiln_st py_st "<" 1.0
row ".bin save vs kiln safetensors save" kiln_bin kiln_st "<=" 1.3
row ".bin save vs torch.save" kiln_bin torch_save "<" 1.0
section "reads, warm page cache (.bin: the file torch.save wrote, if any)"
row ".bin read all bytes vs torch.load mmap=False" kiln_read_bin torch_load "<=" 1.0
row ".bin read all bytes vs torch.load mmap=True" kiln_read_bin torch_load_mmap "<=" 1.0
section "header open: SafetensorsFile::open + tensor list, median of 51 per process"
row "${mib} MiB file vs 64 MiB file" open_big open_small "<=" 1.5
for k in open_big open_small; do
    s=${SEC[$k]:-}
    [[ -z "$s" ]] && continue
    ok=$(awk -v s="$s" 'BEGIN { print (s < 0.005 ? "yes" : "NO") }')
    line "$([[ $k == open_big ]] && echo "${mib} MiB" || echo "64 MiB") file (absolute)" "$(fmt_t "$s")" "-" "-" "-" "< 5 ms" "$ok"
done
echo
echo ".bin reads use $binwho; all reads are warm-cache (page cache holds the file)."
[[ -n "${SEC[kiln_read_own_bin]:-}" ]] && echo "kiln .bin read of kiln's own file: $(fmt_t "${SEC[kiln_read_own_bin]}")"
[[ -n "${SEC[kiln_read_st]:-}" ]] && echo "kiln safetensors read, all bytes:   $(fmt_t "${SEC[kiln_read_st]}")"
bad="" nreads=0
for k in kiln_read_bin torch_load torch_load_mmap kiln_read_own_bin kiln_read_st; do
    [[ -z "${JSON[$k]:-}" ]] && continue
    sum=$(field checksum <(echo "${JSON[$k]}"))
    nreads=$((nreads + 1))
    [[ "$sum" != "$expected" ]] && bad+=" $k=$sum"
done
if [[ -n "$bad" ]]; then
    echo "CHECKSUM MISMATCH (expected $expected):$bad"
elif ((nreads)); then
    echo "every read returned the checksum of the tensors written ($expected)"
fi

echo
echo "peak memory of each save (own process; MiB; tensors = $((bytes / 1048576)) MiB)"
printf "%-30s %14s %15s %19s %13s\n" "save" "peak in save" "peak - tensors" "growth during save" "time -v max"
declare -A NAME=(
    [kiln_st_fsync]="kiln safetensors" [kiln_st]="kiln safetensors (eatmydata)"
    [kiln_bin_fsync]="kiln .bin" [kiln_bin]="kiln .bin (eatmydata)"
    [py_st]="Python save_file" [py_st_fsync]="Python save_file + fsync"
    [torch_save]="torch.save" [torch_save_fsync]="torch.save + fsync"
)
for k in kiln_st_fsync kiln_st kiln_bin_fsync kiln_bin py_st py_st_fsync torch_save torch_save_fsync; do
    [[ -z "${SEC[$k]:-}" ]] && continue
    awk -v k="${NAME[$k]}" -v h="${HWM[$k]}" -v d="${DELTA[$k]}" -v p="${PEAK[$k]}" \
        -v t="${TBYTES[$k]:-$bytes}" 'BEGIN {
        printf "%-30s %14.1f %15.1f %19.1f %13.1f\n", k, h / 1024, h / 1024 - t / 1048576, d / 1024, p / 1024 }'
done
echo "peak in save: the process's VmHWM right after the save; the high-water mark is reset"
echo "(/proc/self/clear_refs) just before it, so it is the larger of the resident set before"
echo "the save (tensors + program) and the peak during it. growth during save: that peak minus"
echo "VmRSS just before the save. time -v max: /usr/bin/time -v's maximum resident set size"
echo "of the whole process (the reset applies to it too; Python's also holds the interpreter,"
echo "torch (~0.5 GiB) and whatever it allocates at exit). Largest over the runs, in MiB."
