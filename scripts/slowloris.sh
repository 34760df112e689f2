#!/bin/sh
# Slowloris against forkd's defaults, as a benchmark: 1,100 connections from
# one /24 (127.0.0.2-251) that send nothing or a byte now and then, then an
# honest client from 127.0.9.1 echoing 4 KiB; in fork and thread mode. Prints
# how many attack connections were open and how long the honest echo took.
#
# usage: scripts/slowloris.sh
# Exit status: 0 the honest client was served within 2 s in both modes.
set -eu
cd "$(dirname "$0")/.."
status=0
out=$(cargo test --release --test abuse an_honest_client -- --nocapture 2>&1) || status=$?
echo "$out" | grep -E "attack connections|test result|panicked|failed" || true
exit "$status"
