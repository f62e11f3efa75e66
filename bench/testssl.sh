#!/usr/bin/env bash
# TLS scan of Phoenix's three TLS listeners (gateway, mesh, CA) with testssl.sh.
#
# Starts a CA, a mesh, a gateway and a whoami backend from the `phoenix` binary on free loopback
# ports (certificates over ACME, as in production), then runs a focused testssl.sh scan against
# each listener: protocols (-p), cipher categories (-s), forward secrecy (-f), server defaults and
# the certificate chain (-S) and every vulnerability check (-U). Fails when testssl reports any
# finding of severity MEDIUM or above (except the short leaf lifetime and the absent CRL/OCSP URI,
# which are policy), any offered protocol other than TLS 1.2/1.3, any weak cipher category, or a
# chain that does not verify against the Phoenix root.
#
# Needs: Debian packages testssl.sh, openssl, curl, python3 (for the JSON summary).
# Usage: bench/testssl.sh [path/to/phoenix]     (default target/debug/phoenix)
# Takes a few minutes: testssl opens hundreds of handshakes per target.
set -euo pipefail

cd "$(dirname "$0")/.."
PHOENIX=$(realpath "${1:-target/debug/phoenix}")
command -v testssl >/dev/null || { echo "testssl not found: apt-get install testssl.sh" >&2; exit 2; }
[ -x "$PHOENIX" ] || { echo "no phoenix binary at $PHOENIX (cargo build -p phoenix)" >&2; exit 2; }

work=$(mktemp -d)
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
CA=$(free_port); GW=$(free_port); GW_HTTP=$(free_port); GW_ADMIN=$(free_port)
MESH=$(free_port); MESH_ADMIN=$(free_port); BACKEND=$(free_port)

# The mesh here does not require a client certificate: testssl cannot present one, and without it
# rustls ends every handshake. The TLS configuration is otherwise the one of a production mesh.
cat > "$work/phoenix.toml" <<TOML
domain = "phoenix.test"
[ca]
listen = "127.0.0.1:$CA"
data_dir = "ca"
domains = ["phoenix.test"]
networks = ["127.0.0.0/8"]
names = ["ca.phoenix.test"]
[gateway]
listen = "127.0.0.1:$GW"
http_listen = "127.0.0.1:$GW_HTTP"
admin_listen = "127.0.0.1:$GW_ADMIN"
ca_url = "https://127.0.0.1:$CA"
mesh = "https://127.0.0.1:$MESH"
mesh_name = "mesh.phoenix.test"
[mesh]
listen = "127.0.0.1:$MESH"
admin_listen = "127.0.0.1:$MESH_ADMIN"
name = "mesh.phoenix.test"
ca_url = "https://127.0.0.1:$CA"
trusted_proxies = ["127.0.0.1/32"]
plaintext_networks = ["127.0.0.0/8"]
[[service]]
name = "app"
servers = ["http://127.0.0.1:$BACKEND"]
TOML

cd "$work"
fp=$("$PHOENIX" ca init --config phoenix.toml | sed -n 's/^Root fingerprint (SHA-256): //p')
export PHOENIX_CA_FINGERPRINT=$fp PHOENIX_LOG=warn
"$PHOENIX" whoami --listen "127.0.0.1:$BACKEND" >whoami.log 2>&1 & pids+=($!)
"$PHOENIX" ca serve --config phoenix.toml >ca.log 2>&1 & pids+=($!)
sleep 1
"$PHOENIX" mesh --config phoenix.toml >mesh.log 2>&1 & pids+=($!)
"$PHOENIX" gateway --config phoenix.toml >gateway.log 2>&1 & pids+=($!)
for _ in $(seq 120); do
    code=$(curl -s -o /dev/null -w '%{http_code}' --cacert ca/root.pem \
        --resolve "app.phoenix.test:$GW:127.0.0.1" "https://app.phoenix.test:$GW/" || true)
    [ "$code" = 200 ] && break
    sleep 0.5
done
[ "$code" = 200 ] || { echo "the flow never came up"; tail -n 20 ./*.log; exit 1; }

status=0
scan() { # name host port
    local name=$1 host=$2 port=$3
    echo "== $name: $host:$port"
    testssl --quiet --color 0 --warnings off --openssl-timeout 10 --ip 127.0.0.1 \
        --add-ca "$work/ca/root.pem" --jsonfile "$work/$name.json" \
        -p -s -f -S -U "https://$host:$port" >"$work/$name.txt" 2>&1 || true
    python3 - "$work/$name.json" "$name" <<'PY' || status=1
import json, sys
findings = json.load(open(sys.argv[1]))
name = sys.argv[2]
bad = []
rank = {"OK": 0, "INFO": 0, "LOW": 1, "MEDIUM": 2, "HIGH": 3, "CRITICAL": 4, "WARN": 0, "DEBUG": 0}
by_id = {f["id"]: f for f in findings}
# Policy, not weakness: leaves live 24 hours (testssl flags anything under 30 days) and carry no
# CRL/OCSP URI because a short life replaces revocation checking (docs/SECURITY.md).
by_design = {"cert_expirationStatus", "cert_notAfter", "cert_revocation"}
for f in findings:
    sev, fid, text = f.get("severity", ""), f["id"], f.get("finding", "")
    if rank.get(sev, 0) >= 2:
        if fid in by_design:
            print(f"  by design: {fid}: {text}")
        else:
            bad.append(f"{fid}: {sev} {text}")
for proto in ("SSLv2", "SSLv3", "TLS1", "TLS1_1"):
    if proto in by_id and "not offered" not in by_id[proto]["finding"]:
        bad.append(f"{proto} offered: {by_id[proto]['finding']}")
for cat in ("cipherlist_NULL", "cipherlist_aNULL", "cipherlist_EXPORT", "cipherlist_LOW",
            "cipherlist_3DES_IDEA", "cipherlist_AVERAGE", "cipherlist_OBSOLETED"):
    if cat in by_id and "not offered" not in by_id[cat]["finding"]:
        bad.append(f"{cat}: {by_id[cat]['finding']}")
chain = [f for f in findings if f["id"].startswith("cert_chain_of_trust")]
if not chain or any("passed" not in f["finding"] for f in chain):
    bad.append(f"chain of trust: {[f['finding'] for f in chain]}")
offered = [p for p in ("TLS1_2", "TLS1_3") if p in by_id and "offered" in by_id[p]["finding"]
           and "not offered" not in by_id[p]["finding"]]
vulns = [f for f in findings if f.get("severity") == "OK" and f["id"] in (
    "heartbleed", "CCS", "ticketbleed", "ROBOT", "secure_renego", "secure_client_renego",
    "CRIME_TLS", "POODLE_SSL", "fallback_SCSV", "SWEET32", "FREAK", "DROWN", "LOGJAM",
    "BEAST", "LUCKY13", "RC4")]
print(f"{name}: protocols {offered}; {len(vulns)} vulnerability checks OK; "
      f"chain {'complete and trusted' if chain and not any('passed' not in f['finding'] for f in chain) else 'PROBLEM'}")
for b in bad:
    print(f"  FINDING {b}")
sys.exit(1 if bad else 0)
PY
}
scan gateway app.phoenix.test "$GW"
scan mesh mesh.phoenix.test "$MESH"
scan ca ca.phoenix.test "$CA"
if [ $status -ne 0 ]; then
    echo "testssl reported findings; full reports:"; for n in gateway mesh ca; do cat "$work/$n.txt"; done
fi
exit $status
