#!/usr/bin/env bash
# The sweeps' wall time, table by table: runs `ddps sweep experiments/<table>.yaml --preset P` for every table
# in order (what one table reuses from an earlier one is not trained again), appends "<table> <seconds>" to
# the times file, then runs `ddps sweep --all` (which should find nothing left to run) and prints the total.
# An interrupted run resumes where it stopped: run it again; finished tables take seconds.
#   usage: benchmarks/sweep_all.sh [PRESET] [TIMES_FILE] [-- SWEEP OPTIONS...]
#          (defaults: cpu, $DDPS_HOME/sweep-times-<preset>.tsv; e.g. `-- --workers 1`: two trainings side by side)
set -euo pipefail
preset=${1:-cpu}
home=${DDPS_HOME:-${XDG_CACHE_HOME:-$HOME/.cache}/ddps}
times=${2:-$home/sweep-times-$preset.tsv}
options=()
if [ "${3:-}" = "--" ]; then options=("${@:4}"); fi
ddps=${DDPS:-ddps}
mkdir -p "$(dirname "$times")"
echo "# $(date -u +%FT%TZ) commit $(git rev-parse --short HEAD 2>/dev/null || echo '?') preset $preset ${options[*]}" >> "$times"
for file in experiments/table*.yaml; do
    table=$(basename "$file" .yaml)
    start=$(date +%s)
    $ddps sweep "$file" --preset "$preset" "${options[@]}"
    printf '%s\t%s\n' "$table" $(( $(date +%s) - start )) | tee -a "$times"
done
start=$(date +%s)
$ddps sweep --all --preset "$preset" "${options[@]}"
printf '%s\t%s\n' "all (rerun)" $(( $(date +%s) - start )) | tee -a "$times"
awk -F'\t' '!/^#/ && $1 != "all (rerun)" {s += $2} END {printf "tables: %d s = %d h %d min\n", s, s / 3600, (s % 3600) / 60}' "$times"
