#!/bin/sh
# Build forkd linked statically (a static PIE against glibc's libc.a), the
# build that scripts/install.sh installs and scripts/bench.sh measures.
#
# usage: scripts/build-static.sh
#   Prints the binary's absolute path: target/static/release/forkd (under
#   $CARGO_TARGET_DIR/static when that is set).
#
# Why: every fork copies the dispatcher's memory map, and every exit tears
# the child's down. Linked dynamically, forkd maps 31 regions (its own, the
# loader's, libc's, libgcc_s's); statically, 14. A statically linked forkd
# accepts about 30 % more connections a second (README, "Performance").
#
# Only the forkd binary gets +crt-static (through `cargo rustc`), so the
# proc-macro crates still build as the dylibs they must be. It has its own
# target directory, so it never evicts the ordinary dynamic build.
# Needs glibc's static library (libc.a, Debian's libc6-dev).
# Exit codes: 0 built, 1 the build failed.
set -eu
cd "$(dirname "$0")/.."
dir=${CARGO_TARGET_DIR:-target}/static
case $dir in /*) ;; *) dir=$(pwd)/$dir ;; esac
cargo rustc --quiet --release --bin forkd --target-dir "$dir" -- -C target-feature=+crt-static >&2
echo "$dir/release/forkd"
