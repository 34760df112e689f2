#!/bin/sh
# How far each model goes on this machine: hold many idle connections at
# once and report the whole memory of one (the server's PSS, page tables,
# kernel stacks and kernel objects), the ramp, and the limit that stops it.
#
# usage: scripts/scale.sh [--raise-kernel-limits] [OUT_DIR]
#   OUT_DIR defaults to target/scale. CONNS (default 100000) is what fork
#   mode and the C fork floor (benches/floor_fork.c) hold; thread and event
#   mode hold as many as one process's descriptor limit allows (the hard
#   RLIMIT_NOFILE, less a few for the server itself). The client side is
#   spread over processes and loopback addresses by forkd-load hold.
#   --raise-kernel-limits raises kernel.pid_max and kernel.threads-max for
#   the run when they leave too little room for CONNS processes (root
#   only), says so, and puts the old values back when it ends (Ctrl-C
#   too); without it, too low a limit stops the script before it starts.
# forkd is the installed build, linked statically (scripts/build-static.sh).
# Exit status: 0 every hold clean (every connection echoed, no error, no
# zombie after closing), 1 a hold failed, 2 a kernel limit too low.
set -eu
cd "$(dirname "$0")/.."

raise=no
out=target/scale
for arg in "$@"; do
	case $arg in
	-h | --help) sed -n '2,20p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
	--raise-kernel-limits) raise=yes ;;
	-*) echo "scale.sh: unknown option $arg (see --help)" >&2; exit 2 ;;
	*) out=$arg ;;
	esac
done
conns=${CONNS:-100000}
mkdir -p "$out"

# The kernel's task limits: room for CONNS processes beside what runs now.
tasks=$(cut -d' ' -f4 /proc/loadavg | cut -d/ -f2)
need=$(((conns + tasks) * 5 / 4 + 1024))
restore="" # PATH=OLD pairs to write back
put_back() {
	for kv in $restore; do
		echo "${kv#*=}" >"${kv%=*}"
		echo "scale.sh: put $(sysctl_name "${kv%=*}") back to ${kv#*=}" >&2
	done
	restore=""
}
sysctl_name() { echo "${1#/proc/sys/}" | tr / .; }
trap put_back EXIT
trap 'put_back; exit 130' INT TERM
for path in /proc/sys/kernel/pid_max /proc/sys/kernel/threads-max; do
	name=$(sysctl_name "$path")
	old=$(cat "$path")
	[ "$old" -ge "$need" ] && continue
	if [ "$raise" != yes ]; then
		echo "scale.sh: $name is $old, too few for $conns processes beside the $tasks running;" \
			"rerun with --raise-kernel-limits to raise it for the run" >&2
		exit 2
	fi
	echo "$need" >"$path"
	restore="$path=$old $restore"
	echo "scale.sh: raised $name from $old to $need for this run" >&2
done

cargo build --release --bins
bin="${CARGO_TARGET_DIR:-target}/release"
forkd=$(scripts/build-static.sh)
cc -O2 -o "$out/floor_fork" benches/floor_fork.c
# Thread and event mode: one process holds every connection.
fds=$(($(sh -c 'ulimit -Hn') - 96))
[ "$fds" -lt "$conns" ] || fds=$conns
status=0
: >"$out/scale.jsonl"

# hold NAME CONNS SERVER...: start the server, hold CONNS, stop it.
hold() {
	name=$1 n=$2
	shift 2
	"$@" >"$out/$name.addr" 2>"$out/$name.log" &
	pid=$!
	i=0
	while [ ! -s "$out/$name.addr" ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i + 1)); done
	addr=$(head -n 1 "$out/$name.addr")
	echo "scale.sh: $name on $addr (pid $pid): holding $n" >&2
	"$bin/forkd-load" hold --addr "$addr" --conns "$n" --pid "$pid" --timeout 120s \
		--settle 120s --json >"$out/$name.json" || status=1
	kill -TERM "$pid" 2>/dev/null || true
	wait "$pid" || true
	python3 -c 'import json,sys; r=json.load(open(sys.argv[1])); r["target"]=sys.argv[2]; print(json.dumps(r))' \
		"$out/$name.json" "$name" >>"$out/scale.jsonl"
}
lax="--max-per-ip 0 --max-per-net 0 --early-drop off --idle-timeout 0 --log stderr -q"
# shellcheck disable=SC2086
hold forkd-fork "$conns" "$forkd" -l 127.0.0.1:0 --print-addr --mode fork --max-conns $((conns + 64)) $lax
hold floor-fork "$conns" "$out/floor_fork" 0
# shellcheck disable=SC2086
hold forkd-thread "$fds" "$forkd" -l 127.0.0.1:0 --print-addr --mode thread --max-conns "$fds" $lax
# shellcheck disable=SC2086
hold forkd-event "$fds" "$forkd" -l 127.0.0.1:0 --print-addr --mode event --max-conns "$fds" $lax
put_back

python3 - "$out" "$conns" <<'PY' | tee "$out/scale.md"
import json, os, sys

out, asked = sys.argv[1], int(sys.argv[2])
rows = [json.loads(l) for l in open(f"{out}/scale.jsonl") if l.strip()]
nofile = os.popen("sh -c 'ulimit -Hn'").read().strip()
avail = next(int(l.split()[1]) for l in open("/proc/meminfo") if l.startswith("MemAvailable:"))
limit = {
    "forkd-fork": f"a process each: kernel.pid_max and threads-max first (raised here); then memory, about {{}} on the {avail // 1024} MiB available",
    "floor-fork": "as fork mode",
    "forkd-thread": f"the descriptor limit: RLIMIT_NOFILE hard {nofile} for the one process (threads-max next)",
    "forkd-event": f"the descriptor limit: RLIMIT_NOFILE hard {nofile} for the one process (memory next, far off)",
}
print("| server | held | ramp conn/s | whole KiB/conn | PSS | page tables | kernel stacks | kernel objects | zombies after | errors | what stops it |")
print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
for r in rows:
    c = r.get("cost") or {}
    whole = c.get("whole")
    what = limit.get(r["target"], "")
    if whole and "{}" in what:
        what = what.format(f"{int(avail / whole):,}")
    f = lambda v: "–" if v is None else f"{v:.1f}"
    print(f"| {r['target']} | {r['held']:,} | {r['ramp_per_s'] or 0:,.0f} | {f(whole)} | {f(c.get('pss'))} | "
          f"{f(c.get('page_tables'))} | {f(c.get('kernel_stacks'))} | {f(c.get('kernel_objects'))} | "
          f"{r['zombies_after']} | {r['errors']['total']} | {what} |")
print()
for r in rows:
    ramp = ", ".join(f"{p['held']:,} at {p['s']:.1f} s" for p in r.get("ramp") or [])
    print(f"- {r['target']}: ramp {ramp}")
    for n in r.get("notes") or []:
        print(f"  - {n}")
PY
exit $status
