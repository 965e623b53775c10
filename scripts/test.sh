#!/usr/bin/env bash
# Runs every check and test of the project. This is the README's second
# command and what CI runs (.ci/run). It prepares what the tests need:
# the guest image (built from Debian packages, cached outside the repo).
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n=== %s\n' "$*"; }

if [ ! -r /dev/kvm ] || [ ! -w /dev/kvm ]; then
    echo "error: /dev/kvm is not usable here; vmft's integration tests need KVM" >&2
    exit 1
fi

step "test dependencies (Debian packages)"
# etcd-server runs the arbiter's etcd tests; iproute2 (`ip`) builds the
# network namespaces of the network tests and the drill's hosts; iptables
# makes the drill's partitions between those hosts.
missing=()
command -v etcd >/dev/null 2>&1 || missing+=(etcd-server)
command -v ip >/dev/null 2>&1 || missing+=(iproute2)
command -v iptables >/dev/null 2>&1 || missing+=(iptables)
if [ ${#missing[@]} -gt 0 ]; then
    sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    $sudo apt-get update -qq || true
    $sudo apt-get install -y -qq "${missing[@]}"
fi
# The package may start a system etcd; the tests start their own on free ports.

step "guest image (built on first use, then cached)"
guest-images/build.sh

step "cargo fmt --check"
cargo fmt --all -- --check

step "cargo clippy --all-targets -- -D warnings"
cargo clippy --workspace --all-targets -- -D warnings

step "cargo test (unit and integration; integration tests boot real guests)"
cargo test --workspace --release -- --test-threads="${VMFT_TEST_THREADS:-2}"
