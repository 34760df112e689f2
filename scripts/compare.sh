#!/bin/sh
# Compare forkd's fork and thread modes under load, with the C floor servers
# and the peers (Python socketserver, socat, tcpserver) that are installed.
#
# usage: scripts/compare.sh [--install] [OUT_DIR] [-- more forkd-load compare options]
#   --install   first install the missing peers with apt-get (socat, ucspi-tcp)
#   OUT_DIR     where compare.md, compare.svg and compare.json go (default target/compare)
# Environment: DURATION (default 10s), HOLD (default 2000), LINK: static
#   (default: the forkd scripts/install.sh installs, from
#   scripts/build-static.sh) or dynamic (plain cargo build --release).
set -eu
cd "$(dirname "$0")/.."

install=no
out=target/compare
while [ $# -gt 0 ]; do
	case "$1" in
	--install) install=yes ;;
	--) shift; break ;;
	-h | --help) sed -n '2,10p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
	-*) echo "compare.sh: unknown option $1 (try --help)" >&2; exit 64 ;;
	*) out=$1 ;;
	esac
	shift
done

if [ "$install" = yes ]; then
	missing=""
	command -v socat >/dev/null 2>&1 || missing="$missing socat"
	command -v tcpserver >/dev/null 2>&1 || missing="$missing ucspi-tcp"
	command -v python3 >/dev/null 2>&1 || missing="$missing python3"
	if [ -n "$missing" ]; then
		sudo=""
		[ "$(id -u)" -eq 0 ] || sudo=sudo
		echo "compare.sh: installing$missing" >&2
		$sudo apt-get update -qq
		# shellcheck disable=SC2086 # one word per package
		$sudo apt-get install -y -qq $missing
	fi
fi

cargo build --release --bins
bin="${CARGO_TARGET_DIR:-target}/release"
case "${LINK:-static}" in
static) forkd=$(scripts/build-static.sh) ;;
dynamic) forkd="$bin/forkd" ;;
*) echo "compare.sh: LINK must be static or dynamic" >&2; exit 64 ;;
esac
exec "$bin/forkd-load" compare --forkd "$forkd" \
	--modes fork,thread,event --floor --peers \
	--duration "${DURATION:-10s}" --hold "${HOLD:-2000}" \
	--out "$out" "$@"
