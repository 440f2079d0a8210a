#!/usr/bin/env bash
# The sweeps' wall time, table by table: runs `ddps sweep experiments/<table>.yaml --preset P` for every table
# in order (what one table reuses from an earlier one is not trained again), appends "<table> <seconds>" to
# the times file, then runs `ddps sweep --all` (which should find nothing left to run) and prints the total.
# An interrupted run resumes where it stopped: run it again; finished tables take seconds.
# With --one-schedule it times `ddps sweep --all` instead (every table in one schedule: all bases, then all
# first stages, ...) and appends "all <seconds>", then the rerun.
#   usage: benchmarks/sweep_all.sh [--one-schedule] [PRESET] [TIMES_FILE] [-- SWEEP OPTIONS...]
#          (defaults: cpu, $DDPS_HOME/sweep-times-<preset>.tsv; e.g. `-- --workers 1`: two trainings side by side)
set -euo pipefail
together=0
if [ "${1:-}" = "--one-schedule" ]; then together=1; shift; fi
preset=${1:-cpu}
home=${DDPS_HOME:-${XDG_CACHE_HOME:-$HOME/.cache}/ddps}
times=${2:-$home/sweep-times-$preset.tsv}
options=()
if [ "${3:-}" = "--" ]; then options=("${@:4}"); fi
ddps=${DDPS:-ddps}
mkdir -p "$(dirname "$times")"
schedule=$([ $together = 1 ] && echo ", one schedule" || echo "")
echo "# $(date -u +%FT%TZ) commit $(git rev-parse --short HEAD 2>/dev/null || echo '?') preset $preset ${options[*]}$schedule" >> "$times"
if [ $together = 1 ]; then
    start=$(date +%s)
    $ddps sweep --all --preset "$preset" "${options[@]}"
    printf '%s\t%s\n' "all" $(( $(date +%s) - start )) | tee -a "$times"
else
    for file in experiments/table*.yaml; do
        table=$(basename "$file" .yaml)
        start=$(date +%s)
        $ddps sweep "$file" --preset "$preset" "${options[@]}"
        printf '%s\t%s\n' "$table" $(( $(date +%s) - start )) | tee -a "$times"
    done
fi
start=$(date +%s)
$ddps sweep --all --preset "$preset" "${options[@]}"
printf '%s\t%s\n' "all (rerun)" $(( $(date +%s) - start )) | tee -a "$times"
# the total of this run: the lines after its own header
awk -F'\t' '/^#/ {s = 0; next} $1 != "all (rerun)" {s += $2} END {printf "total: %d s = %d h %d min\n", s, s / 3600, (s % 3600) / 60}' "$times"
