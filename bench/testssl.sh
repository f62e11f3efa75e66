#!/usr/bin/env bash
# TLS scan of Phoenix's three TLS listeners (gateway, mesh, CA) with testssl.sh, run by hand.
#
# The scan and its judgement live in one place, the end-to-end test
# crates/phoenix/tests/hardening_testssl.rs, which is part of the test suite (CI installs
# testssl.sh). It starts a CA, a mesh, a gateway and a whoami backend from the `phoenix` binary on
# free loopback ports (certificates over ACME, as in production), runs testssl against the three
# listeners in parallel (-p -s -e -S -U) and fails on any finding of severity MEDIUM or above
# (except the short leaf lifetime and the absent CRL/OCSP URI, which are policy), any offered
# protocol other than TLS 1.2/1.3, any accepted suite that is not AEAD with (EC)DHE, any weak cipher
# category, a missing vulnerability check, or a chain that does not verify against the Phoenix root.
# The mesh is scanned without `require_client_cert`: testssl 3.0 cannot present a client
# certificate.
#
# This script runs that test with its output shown, makes a missing testssl an error (CI=true),
# and keeps testssl's JSON and text reports of each listener in the report directory.
#
# Needs: Debian packages testssl.sh, openssl, curl; the Rust toolchain.
# Usage: bench/testssl.sh [report-dir]        (default target/testssl)
#        SCAN_PROFILE=release bench/testssl.sh   to scan an optimised build
# Takes about two minutes on 2 cores: testssl opens hundreds of handshakes per listener.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v testssl >/dev/null || { echo "testssl not found: apt-get install testssl.sh" >&2; exit 2; }
reports=$(realpath -m "${1:-target/testssl}")
rm -rf "$reports"
profile=()
[ "${SCAN_PROFILE:-dev}" = release ] && profile=(--release)
CI=true PHOENIX_TESTSSL_REPORTS=$reports cargo test "${profile[@]}" -p phoenix --test hardening_testssl \
    -- --nocapture testssl_finds_only
echo "testssl reports: $reports"
