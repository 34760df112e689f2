#!/bin/sh
# Install forkd and its systemd units, or remove exactly those files again.
#
#   scripts/install.sh              build (statically linked, see
#                                   scripts/build-static.sh) and install
#   scripts/install.sh --uninstall  remove the files an install put in place
#
# Environment:
#   PREFIX      where the binary goes, as $PREFIX/bin/forkd (default /usr/local);
#               the units' ExecStart= lines are rewritten to that path
#   DESTDIR     staging root prepended to every path written (default empty),
#               for packaging; ExecStart= still names $PREFIX/bin/forkd
#   UNITDIR     where the units go (default /etc/systemd/system, the directory
#               for units the administrator installs, which systemd always
#               reads whatever PREFIX is)
#   FORKD_BIN   install this forkd binary instead of building one
#   LINK        static (default) or dynamic (plain cargo build --release):
#               the static build accepts about 30 % more connections a
#               second, since every fork copies a smaller memory map
#
# Installed files (and the only ones --uninstall removes; give it the same
# PREFIX, DESTDIR and UNITDIR as the install):
#   $PREFIX/bin/forkd
#   $UNITDIR/forkd.socket, forkd.service, forkd-standalone.service,
#   $UNITDIR/forkd-inetd.socket, forkd-inetd@.service
#
# Nothing here talks to systemd: the systemctl commands to run are printed.
# Exit codes: 0 done, 100 usage, 111 a build or file operation failed.

set -eu

PREFIX=${PREFIX:-/usr/local}
DESTDIR=${DESTDIR:-}
UNITDIR=${UNITDIR:-/etc/systemd/system}
UNITS="forkd.socket forkd.service forkd-standalone.service forkd-inetd.socket forkd-inetd@.service"

here=$(cd "$(dirname "$0")/.." && pwd)
bindir=$DESTDIR$PREFIX/bin
unitdir=$DESTDIR$UNITDIR

die() {
    echo "install.sh: $1" >&2
    exit "${2:-111}"
}

uninstall() {
    for f in "$bindir/forkd" $(for u in $UNITS; do echo "$unitdir/$u"; done); do
        if [ -e "$f" ] || [ -L "$f" ]; then
            rm -f "$f" || die "cannot remove $f"
            echo "removed $f"
        fi
    done
    cat <<EOF

On a live system, stop and disable the units BEFORE running --uninstall:
  systemctl disable --now forkd.socket forkd.service forkd-standalone.service forkd-inetd.socket
and afterwards let systemd forget them:
  systemctl daemon-reload
EOF
}

install_all() {
    if [ -n "${FORKD_BIN:-}" ]; then
        binary=$FORKD_BIN
    else
        case ${LINK:-static} in
        static)
            binary=$("$here/scripts/build-static.sh") || die "scripts/build-static.sh failed" ;;
        dynamic)
            (cd "$here" && cargo build --release) || die "cargo build --release failed"
            binary=${CARGO_TARGET_DIR:-$here/target}/release/forkd ;;
        *) die "LINK must be static or dynamic, not ${LINK}" 100 ;;
        esac
    fi
    [ -x "$binary" ] || die "no forkd binary at $binary"

    install -d -m 0755 "$bindir" "$unitdir" || die "cannot create $bindir or $unitdir"
    install -m 0755 "$binary" "$bindir/forkd" || die "cannot install $bindir/forkd"
    echo "installed $bindir/forkd"
    for u in $UNITS; do
        sed "s|/usr/local/bin/forkd|$PREFIX/bin/forkd|g" "$here/systemd/$u" > "$unitdir/$u.tmp" &&
            chmod 0644 "$unitdir/$u.tmp" &&
            mv -f "$unitdir/$u.tmp" "$unitdir/$u" || die "cannot install $unitdir/$u"
        echo "installed $unitdir/$u"
    done
    cat <<EOF

forkd echoes on TCP port 7 (RFC 862). Pick ONE of the three deployments
(all use port 7):

  socket activated (recommended):
    systemctl daemon-reload
    systemctl enable --now forkd.socket

  forkd binds the port itself:
    systemctl daemon-reload
    systemctl enable --now forkd-standalone.service

  one forkd process per connection, started by systemd (Accept=yes):
    systemctl daemon-reload
    systemctl enable --now forkd-inetd.socket

Then: systemctl status forkd.service   journalctl -u forkd.service -f
EOF
}

case "${1:-}" in
    "") install_all ;;
    --uninstall) uninstall ;;
    -h | --help) sed -n '2,/^$/s/^# \{0,1\}//p' "$0" ;;
    *) die "unknown argument: $1 (try --help)" 100 ;;
esac
