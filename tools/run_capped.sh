#!/usr/bin/env bash
# Run a command inside a fresh cgroup v2 with a RAM cap, then report its peak memory and OOM kills.
#
#   tools/run_capped.sh CAP_GIB OUT_DIR -- command args...
#
# Creates /sys/fs/cgroup/zo2tier-$$ with memory.max = CAP_GIB GiB and memory.swap.max = 0, runs the
# command in it (a subshell writes its own PID into cgroup.procs, then execs the command, so the command
# and all its children are charged, page cache included), and afterwards prints one JSON line and writes it
# to OUT_DIR/capped.json:
#   {"cap_gib", "memory_peak_gib", "memory_events": {"low", "high", "max", "oom", "oom_kill", ...},
#    "exit_code", "oom_killed", "command"}
# then removes the cgroup. The script exits with the command's exit code.
#
# Needs root and cgroup v2 at /sys/fs/cgroup with the memory controller available to children
# (it is on the GPU machine). Anything else fails at once with a message saying what is missing.
# CAP_GIB may be fractional (e.g. 0.5).
set -u

die() { echo "run_capped.sh: $*" >&2; exit 2; }

[ $# -ge 4 ] && [ "$3" = "--" ] || die "usage: tools/run_capped.sh CAP_GIB OUT_DIR -- command args..."
CAP_GIB=$1
OUT_DIR=$2
shift 3

ROOT=/sys/fs/cgroup
CG=$ROOT/zo2tier-$$

CAP_BYTES=$(awk -v g="$CAP_GIB" 'BEGIN { if (g + 0 <= 0) exit 1; printf "%d", g * 1073741824 }') \
    || die "CAP_GIB must be a positive number of GiB, got '$CAP_GIB'"
[ "$(stat -fc %T "$ROOT" 2>/dev/null)" = "cgroup2fs" ] \
    || die "$ROOT is not a cgroup v2 mount (found '$(stat -fc %T "$ROOT" 2>/dev/null)'; a v1 or hybrid host): no memory.max to set"
[ "$(id -u)" = 0 ] || die "needs root to create a cgroup under $ROOT"
grep -qw memory "$ROOT/cgroup.controllers" 2>/dev/null \
    || die "the memory controller is not available in $ROOT/cgroup.controllers"
if ! grep -qw memory "$ROOT/cgroup.subtree_control"; then
    echo +memory > "$ROOT/cgroup.subtree_control" 2>/dev/null \
        || die "cannot enable the memory controller for children of $ROOT (+memory in cgroup.subtree_control)"
fi
mkdir "$CG" 2>/dev/null || die "cannot create $CG (cgroup v2 not writable)"
cleanup() { [ -d "$CG" ] && rmdir "$CG" 2>/dev/null; }
trap cleanup EXIT
echo "$CAP_BYTES" > "$CG/memory.max" || die "cannot set $CG/memory.max"
echo 0 > "$CG/memory.swap.max" 2>/dev/null || echo "run_capped.sh: note: no memory.swap.max (no swap accounting)" >&2
mkdir -p "$OUT_DIR" || die "cannot create $OUT_DIR"

# The subshell moves itself into the cgroup, then becomes the command.
( echo "$BASHPID" > "$CG/cgroup.procs" || { echo "run_capped.sh: cannot join $CG" >&2; exit 2; }
  exec "$@" )
RC=$?

# Wait until every process charged to the cgroup is gone (children the command left behind).
for _ in $(seq 50); do
    [ -z "$(cat "$CG/cgroup.procs" 2>/dev/null)" ] && break
    sleep 0.1
done

PEAK=$(cat "$CG/memory.peak" 2>/dev/null || echo "")
EVENTS=$(awk 'BEGIN { sep = "" } { printf "%s\"%s\": %s", sep, $1, $2; sep = ", " }' "$CG/memory.events" 2>/dev/null)
OOM_KILL=$(awk '$1 == "oom_kill" { print $2 }' "$CG/memory.events" 2>/dev/null)
if [ -n "$PEAK" ]; then
    PEAK_GIB=$(awk -v b="$PEAK" 'BEGIN { printf "%.3f", b / 1073741824 }')
else
    PEAK_GIB=null  # kernels before 5.19 have no memory.peak
fi
CMD_JSON=$(printf '%s\n' "$*" | sed 's/\\/\\\\/g; s/"/\\"/g')
JSON="{\"cap_gib\": $CAP_GIB, \"memory_peak_gib\": $PEAK_GIB, \"memory_events\": {${EVENTS}}, \"exit_code\": $RC, \"oom_killed\": $([ "${OOM_KILL:-0}" -gt 0 ] && echo true || echo false), \"cgroup\": \"$CG\", \"command\": \"$CMD_JSON\"}"
echo "$JSON"
echo "$JSON" > "$OUT_DIR/capped.json"
exit "$RC"
