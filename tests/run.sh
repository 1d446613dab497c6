#!/usr/bin/env bash
# The README's test command: installs the real parts the tests need (BIRD 2, GoBGP, iproute2,
# tcpdump, ping, Prometheus and promtool; BIRD 1.6 unpacked beside them) from Debian when they are missing, then runs
# formatting, lints and every test.
# Interop and netns tests do not skip silently: with CI=true a missing daemon or missing root
# is a test failure.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PATH:/usr/sbin:/sbin"

need=()
command -v bird >/dev/null 2>&1 || need+=(bird2)
command -v gobgpd >/dev/null 2>&1 || need+=(gobgpd)
command -v ip >/dev/null 2>&1 || need+=(iproute2)
command -v tcpdump >/dev/null 2>&1 || need+=(tcpdump)
command -v ping >/dev/null 2>&1 || need+=(iputils-ping)
# prometheus and promtool for tests/prometheus.rs (the test starts its own server).
{ command -v prometheus >/dev/null 2>&1 && command -v promtool >/dev/null 2>&1; } || need+=(prometheus)
if [ ${#need[@]} -gt 0 ]; then
  echo "tests/run.sh: installing ${need[*]} from Debian" >&2
  if [ "$(id -u)" -ne 0 ]; then
    echo "tests/run.sh: need root to apt-get install ${need[*]} (run as root or install them)" >&2
    exit 1
  fi
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y --no-install-recommends "${need[@]}" >/dev/null 2>&1 || {
    apt-get update -qq >/dev/null && apt-get install -y --no-install-recommends "${need[@]}" >/dev/null
  }
fi
# BIRD 1.6 (Debian's `bird` package, as in calico-node) for tests/calico_bird16.rs. The package
# conflicts with bird2, so it is not installed: it is downloaded and unpacked once into
# $BIRD16_DIR (default /var/cache/podroute-test/bird1), which gives usr/sbin/bird and birdc.
BIRD16_DIR="${PODROUTE_BIRD16_DIR:-/var/cache/podroute-test/bird1}"
if [ ! -x "$BIRD16_DIR/usr/sbin/bird" ]; then
  echo "tests/run.sh: fetching BIRD 1.6 (apt-get download bird) into $BIRD16_DIR" >&2
  tmp="$(mktemp -d)"
  ( cd "$tmp" && { apt-get download bird >/dev/null 2>&1 || { apt-get update -qq >/dev/null && apt-get download bird >/dev/null; }; } )
  mkdir -p "$BIRD16_DIR"
  dpkg -x "$tmp"/bird_*.deb "$BIRD16_DIR"
  rm -rf "$tmp"
fi
export PODROUTE_BIRD16_DIR="$BIRD16_DIR"
# Debian's bird2 and prometheus packages may start system daemons; the tests start their own
# (BIRD on other ports, Prometheus inside a lab network namespace) and leave those alone.

cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings
if command -v cargo-nextest >/dev/null 2>&1; then
  cargo nextest run --workspace --locked --no-fail-fast
else
  cargo test --workspace --locked --no-fail-fast
fi
cargo test --workspace --locked --doc
