#!/bin/sh
# A churn soak: for each mode, forkd (release build) under many short
# connections and a few long streams at once for DURATION, every byte
# checked by forkd-load; the dispatcher's memory and descriptors are read
# before and after, and must come back flat.
#
# usage: scripts/soak.sh [MODE...]     (default: fork thread)
#   DURATION (default 60s) per mode. Loopback only; stops by itself.
# Prints one line per mode: connections, bytes, errors, the dispatcher's
# RSS and descriptors before and after, and zombies left.
# Exit status: 0 every mode clean (no error, no zombie, descriptors back to
# where they were, RSS grown by less than 1 MiB), 1 otherwise.
set -eu
cd "$(dirname "$0")/.."
cargo build --release --bins >&2
bin=${CARGO_TARGET_DIR:-target}/release
duration=${DURATION:-60s}
[ $# -gt 0 ] || set -- fork thread
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
status=0

rss() { awk '/^VmRSS:/ { print $2 }' "/proc/$1/status"; }
fds() { ls "/proc/$1/fd" | wc -l; }
zombies() { ps -o stat= --ppid "$1" | grep -c '^Z' || true; }

for mode in "$@"; do
	"$bin/forkd" --mode "$mode" -q -l 127.0.0.1:0 --print-addr \
		--max-per-ip 0 --max-per-net 0 --early-drop off >"$work/addr" 2>"$work/log" &
	pid=$!
	for _ in $(seq 100); do [ -s "$work/addr" ] && break; sleep 0.1; done
	addr=$(head -1 "$work/addr")
	# Warm up, so that what is measured is the steady state.
	"$bin/forkd-load" rate --addr "$addr" --duration 2s --json >/dev/null
	rss0=$(rss "$pid")
	fds0=$(fds "$pid")
	"$bin/forkd-load" stream --addr "$addr" --duration "$duration" --conns 4 --json >"$work/stream" &
	stream=$!
	"$bin/forkd-load" rate --addr "$addr" --duration "$duration" --concurrency 32 --size 4KiB --json >"$work/rate"
	wait "$stream"
	sleep 1
	rss1=$(rss "$pid")
	fds1=$(fds "$pid")
	z=$(zombies "$pid")
	kill -TERM "$pid"
	wait "$pid" || true
	python3 - "$mode" "$work/rate" "$work/stream" "$rss0" "$rss1" "$fds0" "$fds1" "$z" <<'PY' || status=1
import json, sys
mode, rate, stream = sys.argv[1], json.load(open(sys.argv[2])), json.load(open(sys.argv[3]))
rss0, rss1, fds0, fds1, z = map(int, sys.argv[4:])
conns = rate["conns"] + stream["conns"]
gib = (rate["bytes"] + stream["bytes"]) / 2**30
errors = rate["errors"]["total"] + stream["errors"]["total"]
print(f"{mode}: {conns} connections, {gib:.1f} GiB checked, {errors} errors; "
      f"dispatcher RSS {rss0} -> {rss1} KiB, descriptors {fds0} -> {fds1}, zombies {z}")
ok = errors == 0 and z == 0 and fds1 == fds0 and rss1 - rss0 < 1024
sys.exit(0 if ok else 1)
PY
done
exit "$status"
