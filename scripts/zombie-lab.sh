#!/usr/bin/env bash
# zombie-lab: watch forkd's connection processes end, linger as zombies, and
# get reaped, in each of the three --reap modes (handler, lazy, off); then a
# prefork pool (mode prefork) whose worker is killed and replaced.
#
# For each mode the lab starts forkd on a free port of 127.0.0.1, opens three
# connections, closes them, opens one more, and shows the process tree after
# each step with ps. It pauses between steps only when stdin is a terminal,
# so `scripts/zombie-lab.sh </dev/null` runs straight through (as docs/zombies.md
# was made). Everything it starts is stopped on exit. A watchdog bounds the
# lab's own waiting: it gives up once its steps have taken LAB_TIMEOUT
# seconds (default 120) in all. The watchdog does not run while the lab waits
# at an [Enter to go on] prompt, so reading takes as long as the reader likes,
# nor during the build of forkd, whose progress cargo shows.
#
# Usage: scripts/zombie-lab.sh [MODE...]     (default: handler lazy off prefork)
# Environment: FORKD=/path/to/forkd to skip the build; LAB_TIMEOUT=seconds.
set -euo pipefail
cd "$(dirname "$0")/.."

modes=("$@")
[ ${#modes[@]} -gt 0 ] || modes=(handler lazy off prefork)

work=$(mktemp -d "${TMPDIR:-/tmp}/zombie-lab.XXXXXX")
forkd_pid=""
fds=()

cleanup() {
    for fd in "${fds[@]}"; do
        exec {fd}>&- 2>/dev/null || true
    done
    if [ -n "$forkd_pid" ] && kill -0 "$forkd_pid" 2>/dev/null; then
        kill -TERM "$forkd_pid" 2>/dev/null || true
        for _ in $(seq 50); do kill -0 "$forkd_pid" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$forkd_pid" 2>/dev/null || true
    fi
    if [ -n "${watchdog:-}" ] && kill "$watchdog" 2>/dev/null; then
        wait "$watchdog" 2>/dev/null || true
    fi
    rm -rf "$work"
}
trap cleanup EXIT
trap 'echo "zombie-lab: interrupted" >&2; exit 130' INT TERM

# ---- the watchdog: bounds the lab's own waiting, whatever happens, but
# not the reader's. It runs while the lab works; pause() stops it and starts
# it again with what is left of LAB_TIMEOUT.
limit=${LAB_TIMEOUT:-120}
case $limit in '' | *[!0-9]*) echo "zombie-lab: LAB_TIMEOUT must be whole seconds, not '$limit'" >&2; exit 64 ;; esac
left_ms=$((limit * 1000))
watchdog=""
now_ms() { local t=${EPOCHREALTIME/[.,]/}; echo $((t / 1000)); }
arm() {
    armed_ms=$(now_ms)
    # (The watchdog stops its own sleep when it is stopped, leaving nothing behind.)
    (
        trap 'kill "$nap" 2>/dev/null; exit 0' TERM
        # Not a copy of the lab's connections: they must close when the lab closes them.
        for fd in "${fds[@]}"; do exec {fd}>&-; done
        sleep "$((left_ms / 1000)).$(printf '%03d' $((left_ms % 1000)))" &
        nap=$!
        if wait "$nap"; then
            echo "zombie-lab: gave up: its steps took more than ${limit} s (LAB_TIMEOUT)" >&2
            kill -TERM $$ 2>/dev/null
        fi
    ) &
    watchdog=$!
}
disarm() {
    [ -n "$watchdog" ] || return 0
    kill "$watchdog" 2>/dev/null || true
    wait "$watchdog" 2>/dev/null || true
    watchdog=""
    left_ms=$((left_ms - ($(now_ms) - armed_ms)))
    [ "$left_ms" -gt 0 ] || left_ms=0
}

if [ -t 1 ]; then bold=$'\033[1m' plain=$'\033[0m'; else bold="" plain=""; fi
say() { printf '\n%s%s%s\n' "$bold" "$*" "$plain"; }
note() { printf '  %s\n' "$@"; }
# Wait for the reader (on a terminal only), with the watchdog stopped.
pause() {
    if [ -t 0 ]; then
        disarm
        read -r -p "  [Enter to go on] " _ || true
        arm
    fi
}

# ---- the forkd binary
if [ -n "${FORKD:-}" ]; then
    forkd=$FORKD
elif command -v cargo >/dev/null 2>&1; then
    echo "building forkd (cargo build --bin forkd) ..."
    cargo build --quiet --bin forkd
    forkd="${CARGO_TARGET_DIR:-target}/debug/forkd"
else
    forkd=$(ls -t target*/*/forkd 2>/dev/null | head -1 || true)
fi
if [ -z "$forkd" ] || [ ! -x "$forkd" ]; then
    echo "zombie-lab: no forkd binary (set FORKD=/path/to/forkd, or install cargo)" >&2
    exit 1
fi

# From here on, the lab's steps are timed.
arm

# The dispatcher and its children, as ps shows them.
show() {
    echo
    echo "    \$ ps -o pid,ppid,stat,comm,args -p $forkd_pid --ppid $forkd_pid"
    ps -o pid,ppid,stat,comm,args -p "$forkd_pid" --ppid "$forkd_pid" | sed 's/^/    /'
    echo
}

# The same as a tree, the way `ps -ef --forest` draws it.
show_forest() {
    echo "    \$ ps -f --forest -p $forkd_pid --ppid $forkd_pid"
    ps -f --forest -p "$forkd_pid" --ppid "$forkd_pid" | sed 's/^/    /'
    echo
}

# Ask forkd for a status line (SIGUSR1) and print it.
status() {
    local before
    before=$(grep -c "status:" "$work/log" || true)
    kill -USR1 "$forkd_pid"
    for _ in $(seq 50); do
        [ "$(grep -c "status:" "$work/log" || true)" -gt "$before" ] && break
        sleep 0.1
    done
    grep "status:" "$work/log" | tail -1 | sed -E 's/^[^ ]+ /    /'
}

# Open a connection on a new descriptor, echo one line through it (waiting
# up to ${2:-5} seconds for the echo), and keep it open.
open_conn() {
    local fd line wait=${2:-5}
    exec {fd}<>"/dev/tcp/127.0.0.1/$port"
    fds+=("$fd")
    printf 'hello %s\n' "$1" >&"$fd"
    if read -r -t "$wait" -u "$fd" line; then
        note "connection $1: sent 'hello $1', got back '$line'"
    else
        note "connection $1: sent 'hello $1', no echo within $wait s"
    fi
}

close_all() {
    for fd in "${fds[@]}"; do
        exec {fd}>&-
    done
    fds=()
}

run_mode() {
    local mode=$1 cap=1024 line
    [ "$mode" = off ] && cap=4
    : >"$work/addr"
    : >"$work/log"
    say "=== --reap $mode ==="
    case $mode in
    handler) note "forkd reaps in its SIGCHLD handler: a child is collected the moment it exits." ;;
    lazy) note "forkd reaps only just before it accepts a new client, like the textbook loop" \
        "'accept; fork; waitpid(-1, WNOHANG)': finished children wait for the next client." ;;
    off) note "forkd never reaps until it stops. Zombies pile up, and since each still" \
        "holds a place, they count against --max-conns (here -c $cap)." ;;
    esac
    "$forkd" --reap "$mode" -c "$cap" --early-drop off -l 127.0.0.1:0 --print-addr --log stderr -v \
        >"$work/addr" 2>"$work/log" &
    forkd_pid=$!
    for _ in $(seq 100); do
        [ -s "$work/addr" ] && break
        sleep 0.1
    done
    line=$(head -1 "$work/addr")
    port=${line##*:}
    [ -n "$port" ] || { echo "zombie-lab: forkd did not start:" >&2; cat "$work/log" >&2; exit 1; }
    echo "\$ $forkd --reap $mode -c $cap -l 127.0.0.1:0 --print-addr --log stderr -v &"
    note "pid $forkd_pid, listening on port $port"

    say "1. Three clients connect and stay connected"
    for i in 1 2 3; do open_conn "$i"; done
    show
    note "The dispatcher (comm forkd) has one child per connection (comm forkd-conn," \
        "command line 'forkd: conn PEER'). STAT S: sleeping in read(2), waiting for bytes."
    pause

    say "2. The three clients hang up"
    close_all
    sleep 0.5
    show
    show_forest
    case $mode in
    handler) note "No children left: each exit raised SIGCHLD, and the handler called" \
        "waitpid(-1, WNOHANG) until none was left. Nothing to see, which is the point." ;;
    lazy | off) note "The children have exited, but nobody has called waitpid() for them yet:" \
        "STAT Z, args [forkd-conn] <defunct>. A zombie holds no memory or descriptors," \
        "only its pid and exit status, kept for the parent to read." ;;
    esac
    note "" "forkd's own count (SIGUSR1 logs a status line):"
    status
    pause

    say "3. A fourth client connects"
    open_conn 4
    sleep 0.3
    show
    case $mode in
    handler) note "Just the new client's child." ;;
    lazy) note "Accepting the new client first reaped the three zombies (forkd logged an" \
        "'end pid' line for each); only the new child remains." ;;
    off) note "The zombies are still there, next to the new child: 3 zombies + 1 live" \
        "= 4 = the cap. forkd has stopped accepting." ;;
    esac
    if [ "$mode" = off ]; then
        note "A fifth client now connects: the kernel completes the handshake and parks it"
        note "in the listen backlog, but forkd does not accept it while at the cap:"
        open_conn 5 1
    fi
    pause

    say "4. forkd's log so far"
    status >/dev/null
    grep -E "end pid|status:|cap" "$work/log" | sed -E 's/^[^ ]+ /    /'
    pause

    say "5. Stop: SIGTERM"
    note "The clients hang up and forkd is told to stop; whatever the mode, it reaps" \
        "every child it still has before it exits."
    local seen
    seen=$(wc -l <"$work/log")
    close_all
    kill -TERM "$forkd_pid"
    wait "$forkd_pid" || true
    forkd_pid=""
    tail -n +"$((seen + 1))" "$work/log" | sed -E 's/^[^ ]+ /    /'
    pause
}

# The pool's workers, one pid a line.
workers() { ps -o pid= --ppid "$forkd_pid" | tr -d ' '; }

run_prefork() {
    local line victim new
    : >"$work/addr"
    : >"$work/log"
    say "=== --mode prefork ==="
    note "A pool of worker processes forked at start, each serving one connection at a" \
        "time (Apache's prefork). The parent never touches a connection: it keeps the pool."
    "$forkd" --mode prefork --workers 3 -l 127.0.0.1:0 --print-addr --log stderr -v \
        >"$work/addr" 2>"$work/log" &
    forkd_pid=$!
    for _ in $(seq 100); do
        [ -s "$work/addr" ] && break
        sleep 0.1
    done
    line=$(head -1 "$work/addr")
    port=${line##*:}
    [ -n "$port" ] || { echo "zombie-lab: forkd did not start:" >&2; cat "$work/log" >&2; exit 1; }
    for _ in $(seq 50); do [ "$(workers | wc -l)" -ge 3 ] && break; sleep 0.1; done
    echo "\$ $forkd --mode prefork --workers 3 -l 127.0.0.1:0 --print-addr --log stderr -v &"
    note "pid $forkd_pid, listening on port $port"

    say "1. The pool, idle, and one client connected"
    open_conn 1
    sleep 0.2
    show
    note "Three workers (comm forkd-worker) forked before any client came; one of them" \
        "holds the client ('forkd: worker N conn PEER'), the others wait ('idle')."
    pause

    say "2. A worker is killed (SIGKILL) and replaced"
    victim=$(ps -o pid=,args= --ppid "$forkd_pid" | awk '/idle/ { print $1; exit }')
    note "kill -KILL $victim"
    kill -KILL "$victim"
    for _ in $(seq 50); do
        new=$(workers | grep -vx "$victim" | wc -l)
        [ "$new" -ge 3 ] && break
        sleep 0.1
    done
    show
    note "The parent reaped it (no zombie), logged how it died, and forked a new worker" \
        "into its place; a worker that dies within a second of its start is replaced" \
        "after a delay that doubles each time, so a crashing worker cannot fork-bomb:"
    grep -E "worker [0-9]+ pid" "$work/log" | sed -E 's/^[^ ]+ /    /'
    pause

    say "3. Stop: SIGTERM"
    note "The pool drains: idle workers leave at once, busy ones when their client is done."
    local seen
    seen=$(wc -l <"$work/log")
    close_all
    kill -TERM "$forkd_pid"
    wait "$forkd_pid" || true
    forkd_pid=""
    tail -n +"$((seen + 1))" "$work/log" | sed -E 's/^[^ ]+ /    /'
    pause
}

for mode in "${modes[@]}"; do
    case $mode in
    handler | lazy | off) run_mode "$mode" ;;
    prefork) run_prefork ;;
    *) echo "zombie-lab: unknown mode '$mode' (handler, lazy, off or prefork)" >&2; exit 64 ;;
    esac
done
say "Done."
note "To watch by hand: '$forkd --reap off -l 127.0.0.1:7007' in one terminal;" \
    "in another, connect and hang up with 'nc 127.0.0.1 7007' (Debian: apt-get" \
    "install netcat-openbsd), and look with 'ps -o pid,ppid,stat,comm,args -C forkd,forkd-conn'."
