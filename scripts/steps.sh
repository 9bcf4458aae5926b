# Shared by the GPU-machine scripts (sourced): a time budget and steps that each get what is left.
#   budget (s), out (log folder) must be set before sourcing; results collects one table row a step.
# step NAME LIMIT CMD...: runs CMD under min(LIMIT, what is left) seconds (a step with under 20 s
# left is skipped), logs to $out/NAME.log, and adds "| NAME | verdict | last pytest-like line (s) |".
start=$SECONDS
left() { echo $((budget - (SECONDS - start))); }
declare -a results=()

step() {
  local name=$1 limit=$2 rc t0=$SECONDS
  shift 2
  local avail
  avail=$(left)
  [ "$limit" -gt "$avail" ] && limit=$avail
  if [ "$limit" -lt 20 ]; then
    results+=("| $name | skipped (time budget) | |")
    return 99
  fi
  echo "=== $name (limit ${limit}s): $*"
  timeout -k 10 "$limit" "$@" 2>&1 | tee "$out/$name.log"
  rc=${PIPESTATUS[0]}
  local verdict
  case $rc in
    0) verdict=ok ;;
    124 | 137) verdict="TIMEOUT after ${limit}s (hang?)" ;;
    *) verdict="FAILED rc=$rc" ;;
  esac
  local last
  last=$(grep -E "passed|failed|error|skipped" "$out/$name.log" | tail -1 | tr -d '=' | sed 's/^ *//;s/ *$//')
  results+=("| $name | $verdict | ${last:-} ($((SECONDS - t0)) s) |")
  return "$rc"
}

