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
#   FORKD_ASSETS  take the manual page and completions from this directory
#               (as `cargo xtask assets DIR` writes them) instead of
#               generating them with cargo xtask
#   LINK        static (default) or dynamic (plain cargo build --release):
#               the static build accepts about 30 % more connections a
#               second, since every fork copies a smaller memory map
#
# Installed files (and the only ones --uninstall removes; give it the same
# PREFIX, DESTDIR and UNITDIR as the install):
#   $PREFIX/bin/forkd
#   $PREFIX/share/man/man8/forkd.8
#   $PREFIX/share/bash-completion/completions/forkd
#   $PREFIX/share/zsh/site-functions/_forkd
#   $PREFIX/share/fish/vendor_completions.d/forkd.fish
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
sharedir=$DESTDIR$PREFIX/share
# Each generated file: its place under `cargo xtask assets`' directory, and
# under $PREFIX/share.
ASSETS="man/forkd.8:man/man8/forkd.8
completions/bash/forkd:bash-completion/completions/forkd
completions/zsh/_forkd:zsh/site-functions/_forkd
completions/fish/forkd.fish:fish/vendor_completions.d/forkd.fish"

die() {
    echo "install.sh: $1" >&2
    exit "${2:-111}"
}

uninstall() {
    for f in "$bindir/forkd" $(for u in $UNITS; do echo "$unitdir/$u"; done) \
        $(for a in $ASSETS; do echo "$sharedir/${a#*:}"; done); do
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

    # The manual page and completions, generated from forkd's command line.
    assets=${FORKD_ASSETS:-}
    if [ -z "$assets" ]; then
        assets=$(mktemp -d) || die "cannot create a temporary directory"
        trap 'rm -rf "$assets"' EXIT
        (cd "$here" && cargo xtask assets "$assets" >/dev/null) || die "cargo xtask assets failed"
    fi

    install -d -m 0755 "$bindir" "$unitdir" || die "cannot create $bindir or $unitdir"
    install -m 0755 "$binary" "$bindir/forkd" || die "cannot install $bindir/forkd"
    echo "installed $bindir/forkd"
    for a in $ASSETS; do
        dest=$sharedir/${a#*:}
        install -D -m 0644 "$assets/${a%%:*}" "$dest" || die "cannot install $dest"
        echo "installed $dest"
    done
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
      man forkd   (when $PREFIX/share/man is on man's path, as /usr/local is)
EOF
}

case "${1:-}" in
    "") install_all ;;
    --uninstall) uninstall ;;
    -h | --help) sed -n '2,/^$/s/^# \{0,1\}//p' "$0" ;;
    *) die "unknown argument: $1 (try --help)" 100 ;;
esac
