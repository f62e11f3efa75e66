//! testssl.sh (Debian package `testssl.sh`, command `testssl`) against the three TLS listeners of
//! the real processes (gateway, mesh, CA, certificates over ACME), the three scans in parallel, each
//! judged from its JSON findings: no finding of severity MEDIUM or above (the short leaf lifetime and
//! the absent CRL/OCSP URI are policy, see docs/SECURITY.md), SSLv2/SSLv3/TLS 1.0/TLS 1.1 not
//! offered and TLS 1.2/1.3 offered, every accepted cipher suite AEAD with forward secrecy, every
//! vulnerability check present, and the chain trusted by the Phoenix root (given with `--add-ca`).
//!
//! testssl 3.0 cannot present a client certificate, and rustls ends a handshake without one when
//! the mesh requires it; so the mesh is restarted with `require_client_cert = false` before the
//! scan. Its TLS configuration is otherwise the production one.
//!
//! Without `testssl` the test fails when `CI` is set and is skipped (with a message) otherwise.
//! `bench/testssl.sh` runs this test and keeps the reports (`PHOENIX_TESTSSL_REPORTS=<dir>`).

mod common;
mod flow_support;

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use flow_support::*;

/// Checks run: protocols (-p), standard cipher categories (-s), each cipher suite the server
/// accepts (-e), server defaults with certificate and chain (-S), every vulnerability (-U). Client
/// simulation and HTTP headers are left out: they judge nothing asserted here and cost time.
const CHECKS: [&str; 5] = ["-p", "-s", "-e", "-S", "-U"];

/// Every check of `-U` in testssl 3.0.
const VULNERABILITIES: [&str; 17] = [
    "heartbleed",
    "CCS",
    "ticketbleed",
    "ROBOT",
    "secure_renego",
    "secure_client_renego",
    "CRIME_TLS",
    "BREACH",
    "POODLE_SSL",
    "fallback_SCSV",
    "SWEET32",
    "FREAK",
    "DROWN",
    "LOGJAM",
    "BEAST",
    "LUCKY13",
    "RC4",
];

/// Findings of MEDIUM or above that are policy, not weakness: leaves live 24 hours (testssl flags
/// anything under 30 days) and carry no CRL/OCSP URI, because a short life replaces revocation
/// checking (docs/SECURITY.md).
const BY_DESIGN: [&str; 3] = ["cert_expirationStatus", "cert_notAfter", "cert_revocation"];

/// Cipher categories of `-s` that must all be "not offered" (AVERAGE: the CBC suites).
const WEAK_CATEGORIES: [&str; 6] = [
    "cipherlist_NULL",
    "cipherlist_aNULL",
    "cipherlist_EXPORT",
    "cipherlist_LOW",
    "cipherlist_3DES_IDEA",
    "cipherlist_AVERAGE",
];

#[derive(Debug, Clone, PartialEq)]
struct Finding {
    id: String,
    severity: String,
    finding: String,
}

/// The flat JSON testssl writes with `--jsonfile`: an array of {id, severity, finding, ...}.
fn parse_findings(json: &str) -> Result<Vec<Finding>, String> {
    let values: Vec<serde_json::Value> =
        serde_json::from_str(json).map_err(|e| format!("testssl JSON: {e}"))?;
    values
        .iter()
        .map(|v| {
            let field = |name: &str| {
                v.get(name)
                    .and_then(|s| s.as_str())
                    .map(str::to_owned)
                    .ok_or_else(|| format!("a finding without `{name}`: {v}"))
            };
            Ok(Finding {
                id: field("id")?,
                severity: field("severity")?,
                finding: field("finding")?,
            })
        })
        .collect()
}

fn rank(severity: &str) -> u8 {
    match severity {
        "LOW" => 1,
        "MEDIUM" => 2,
        "HIGH" => 3,
        "CRITICAL" => 4,
        _ => 0,
    }
}

/// testssl suffixes per-certificate findings: `cert_notAfter <cert#1>`.
fn base_id(id: &str) -> &str {
    id.split(' ').next().unwrap_or(id)
}

/// An offered suite (IANA name) is acceptable: AEAD, and forward secret (TLS 1.3 suites always
/// are; TLS 1.2 ones only with (EC)DHE), and none of the known weak families.
fn acceptable_suite(iana: &str) -> bool {
    let aead =
        iana.contains("_GCM_") || iana.contains("CHACHA20_POLY1305") || iana.contains("_CCM");
    let tls13 = !iana.contains("_WITH_");
    let forward_secret = tls13 || iana.starts_with("TLS_ECDHE_") || iana.starts_with("TLS_DHE_");
    let weak = ["CBC", "RC4", "NULL", "EXPORT", "anon", "DES", "IDEA", "RC2"]
        .iter()
        .any(|w| iana.contains(w));
    aead && forward_secret && !weak
}

/// The outcome for one listener: what fails it, what is tolerated as policy, a one-line summary.
#[derive(Debug, Default)]
struct Verdict {
    problems: Vec<String>,
    by_design: Vec<String>,
    summary: String,
}

fn judge(findings: &[Finding]) -> Verdict {
    let mut v = Verdict::default();
    let find = |id: &str| findings.iter().find(|f| f.id == id);

    for f in findings {
        if f.severity == "FATAL" {
            v.problems
                .push(format!("scan failed: {}: {}", f.id, f.finding));
        } else if rank(&f.severity) >= rank("MEDIUM") {
            let line = format!("{}: {} {}", f.id, f.severity, f.finding);
            if BY_DESIGN.contains(&base_id(&f.id)) {
                v.by_design.push(line);
            } else {
                v.problems.push(line);
            }
        }
    }

    let offered = |f: &Finding| f.finding.starts_with("offered");
    for proto in ["SSLv2", "SSLv3", "TLS1", "TLS1_1"] {
        match find(proto) {
            None => v.problems.push(format!("{proto}: not tested")),
            Some(f) if !f.finding.starts_with("not offered") => {
                v.problems.push(format!("{proto} offered: {}", f.finding))
            }
            Some(_) => {}
        }
    }
    let mut protocols = Vec::new();
    for proto in ["TLS1_2", "TLS1_3"] {
        match find(proto) {
            Some(f) if offered(f) => protocols.push(proto),
            Some(f) => v
                .problems
                .push(format!("{proto} not offered: {}", f.finding)),
            None => v.problems.push(format!("{proto}: not tested")),
        }
    }

    for cat in WEAK_CATEGORIES {
        match find(cat) {
            Some(f) if f.finding.starts_with("not offered") => {}
            Some(f) => v.problems.push(format!("{cat}: {}", f.finding)),
            None => v.problems.push(format!("{cat}: not tested")),
        }
    }

    // `-e`: one finding per accepted suite, "x1302 TLS_AES_256_GCM_SHA384 ECDH 253 AESGCM 256
    // TLS_AES_256_GCM_SHA384"; the IANA name is the word starting with TLS_.
    let suites: Vec<&str> = findings
        .iter()
        .filter(|f| f.id.starts_with("cipher_x"))
        .map(|f| {
            f.finding
                .split_whitespace()
                .rfind(|w| w.starts_with("TLS_") || w.starts_with("SSL_"))
                .unwrap_or(f.finding.as_str())
        })
        .collect();
    if suites.is_empty() {
        v.problems
            .push("no accepted cipher suite listed (-e did not run?)".to_owned());
    }
    for s in &suites {
        if !acceptable_suite(s) {
            v.problems.push(format!(
                "accepted suite is not AEAD with (EC)DHE key exchange, or is weak: {s}"
            ));
        }
    }

    // A vulnerability check passes only at OK or INFO: even LOW means "potentially vulnerable".
    let missing: Vec<&str> = VULNERABILITIES
        .iter()
        .copied()
        .filter(|id| find(id).is_none())
        .collect();
    for f in findings
        .iter()
        .filter(|f| VULNERABILITIES.contains(&f.id.as_str()) && rank(&f.severity) == rank("LOW"))
    {
        v.problems
            .push(format!("{}: {} {}", f.id, f.severity, f.finding));
    }
    if !missing.is_empty() {
        v.problems
            .push(format!("vulnerability checks not run: {missing:?}"));
    }

    let chain: Vec<&Finding> = findings
        .iter()
        .filter(|f| base_id(&f.id) == "cert_chain_of_trust")
        .collect();
    if chain.is_empty() {
        v.problems.push("chain of trust: not tested".to_owned());
    }
    for f in &chain {
        if !f.finding.starts_with("passed") {
            v.problems
                .push(format!("chain of trust: {} {}", f.severity, f.finding));
        }
    }

    // The name in the URI (or the IP address, for the CA) is on the certificate.
    match find("cert_trust") {
        Some(f) if f.finding.starts_with("Ok") => {}
        Some(f) => v
            .problems
            .push(format!("cert_trust: {} {}", f.severity, f.finding)),
        None => v.problems.push("cert_trust: not tested".to_owned()),
    }

    v.summary = format!(
        "protocols {protocols:?}; {} suites, all AEAD with (EC)DHE: {}; {} of {} vulnerability \
         checks run; chain {}; {} problem(s), {} by design",
        suites.len(),
        suites.iter().all(|s| acceptable_suite(s)),
        VULNERABILITIES.len() - missing.len(),
        VULNERABILITIES.len(),
        if !chain.is_empty() && chain.iter().all(|f| f.finding.starts_with("passed")) {
            "trusted"
        } else {
            "NOT trusted"
        },
        v.problems.len(),
        v.by_design.len(),
    );
    v
}

fn testssl_installed() -> bool {
    std::env::var_os("PATH")
        .is_some_and(|path| std::env::split_paths(&path).any(|d| d.join("testssl").is_file()))
}

/// One running scan: the listener's role, its JSON and text reports, the process.
struct Scan {
    role: &'static str,
    json: PathBuf,
    text: PathBuf,
    child: Child,
    started: Instant,
    took: Option<Duration>,
}

impl Scan {
    /// `uri` names the listener (the SNI name); `--ip` keeps every connection on loopback.
    fn start(role: &'static str, uri: &str, root: &Path, dir: &Path) -> Scan {
        let json = dir.join(format!("testssl-{role}.json"));
        let text = dir.join(format!("testssl-{role}.txt"));
        let out = std::fs::File::create(&text).unwrap();
        let child = Command::new("testssl")
            .args(["--quiet", "--color", "0", "--warnings", "off", "--sneaky"])
            .args(["--nodns", "none", "--ip", "127.0.0.1"])
            .args(["--connect-timeout", "10", "--openssl-timeout", "10"])
            .arg("--add-ca")
            .arg(root)
            .arg("--jsonfile")
            .arg(&json)
            .args(CHECKS)
            .arg(uri)
            .current_dir(dir)
            .stdin(Stdio::null())
            .stdout(Stdio::from(out.try_clone().unwrap()))
            .stderr(Stdio::from(out))
            // Its own process group, so a scan cut short takes its openssl children with it.
            .process_group(0)
            .spawn()
            .expect("starting testssl");
        Scan {
            role,
            json,
            text,
            child,
            started: Instant::now(),
            took: None,
        }
    }
}

impl Drop for Scan {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let group = format!("-{}", self.child.id());
            let _ = Command::new("kill").args(["-KILL", "--", &group]).status();
            let _ = self.child.wait();
        }
    }
}

#[test]
fn testssl_finds_only_tls12_tls13_aead_no_vulnerability_and_a_trusted_chain() {
    if !testssl_installed() {
        let ci = std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "false" && v != "0");
        assert!(
            !ci,
            "testssl is not installed and CI is set: apt-get install testssl.sh (.ci/run does)"
        );
        eprintln!(
            "SKIPPED hardening_testssl: `testssl` not found (apt-get install testssl.sh); \
             with CI set this is a failure"
        );
        return;
    }
    let all = Instant::now();
    let mut flow = Flow::start("warn");
    // testssl cannot present a client certificate: restart the mesh without requiring one.
    let config = std::fs::read_to_string(&flow.config).unwrap();
    let relaxed = config.replace("require_client_cert = true", "require_client_cert = false");
    assert_ne!(
        config, relaxed,
        "the flow's mesh no longer sets require_client_cert"
    );
    std::fs::write(&flow.config, relaxed).unwrap();
    flow.mesh.as_mut().unwrap().kill();
    flow.start_mesh();
    flow.wait_ok(Duration::from_secs(60));

    let root = flow.root();
    let mut scans = [
        Scan::start(
            "gateway",
            &format!("https://app.phoenix.test:{}/", flow.ports.gw),
            &root,
            &flow.dir,
        ),
        Scan::start(
            "mesh",
            &format!("https://mesh.phoenix.test:{}/", flow.ports.mesh),
            &root,
            &flow.dir,
        ),
        // The CA's certificate names its IP address, as ACME clients reach it.
        Scan::start(
            "ca",
            &format!("https://127.0.0.1:{}/", flow.ports.ca),
            &root,
            &flow.dir,
        ),
    ];
    // A full scan takes about two minutes here; a hung one must not hold the suite forever.
    let deadline = Instant::now() + Duration::from_secs(600);
    while scans.iter().any(|s| s.took.is_none()) {
        for s in scans.iter_mut().filter(|s| s.took.is_none()) {
            if s.child.try_wait().unwrap().is_some() {
                s.took = Some(s.started.elapsed());
            }
        }
        if Instant::now() > deadline {
            let hung: Vec<_> = scans
                .iter()
                .filter(|s| s.took.is_none())
                .map(|s| s.role)
                .collect();
            panic!("testssl did not finish within 10 minutes for {hung:?}");
        }
        std::thread::sleep(Duration::from_millis(200));
    }

    let reports = std::env::var_os("PHOENIX_TESTSSL_REPORTS").map(PathBuf::from);
    let mut failed = Vec::new();
    for s in &scans {
        let text = std::fs::read_to_string(&s.text).unwrap_or_default();
        if let Some(dir) = &reports {
            std::fs::create_dir_all(dir).unwrap();
            for f in [&s.json, &s.text] {
                let _ = std::fs::copy(f, dir.join(f.file_name().unwrap()));
            }
        }
        let findings = std::fs::read_to_string(&s.json)
            .map_err(|e| format!("no JSON report: {e}"))
            .and_then(|j| parse_findings(&j));
        let verdict = match findings {
            Ok(f) => judge(&f),
            Err(e) => Verdict {
                problems: vec![e],
                ..Verdict::default()
            },
        };
        println!(
            "testssl {}: {} ({:.0} s)",
            s.role,
            verdict.summary,
            s.took.unwrap().as_secs_f64()
        );
        for b in &verdict.by_design {
            println!("  by design: {b}");
        }
        for p in &verdict.problems {
            println!("  PROBLEM: {p}");
        }
        if !verdict.problems.is_empty() {
            failed.push(format!(
                "{}: {:?}\n---- testssl output ----\n{text}",
                s.role, verdict.problems
            ));
        }
    }
    println!(
        "testssl: all three listeners scanned in {:.0} s (flow start included)",
        all.elapsed().as_secs_f64()
    );
    assert!(
        failed.is_empty(),
        "testssl findings:\n{}",
        failed.join("\n")
    );
}

// The judging function against synthetic findings, so a weak listener is known to fail the test.

fn f(id: &str, severity: &str, finding: &str) -> Finding {
    Finding {
        id: id.to_owned(),
        severity: severity.to_owned(),
        finding: finding.to_owned(),
    }
}

/// What the scan of a sound listener reports, in testssl 3.0.8's words.
fn clean() -> Vec<Finding> {
    let mut v = vec![
        f("SSLv2", "OK", "not offered"),
        f("SSLv3", "OK", "not offered"),
        f("TLS1", "INFO", "not offered"),
        f("TLS1_1", "INFO", "not offered"),
        f("TLS1_2", "OK", "offered"),
        f("TLS1_3", "OK", "offered with final"),
        f("cipher_x1302", "INFO", "x1302   TLS_AES_256_GCM_SHA384  ECDH 253   AESGCM      256      TLS_AES_256_GCM_SHA384"),
        f("cipher_x1303", "INFO", "x1303   TLS_CHACHA20_POLY1305_SHA256  ECDH 253   ChaCha20    256      TLS_CHACHA20_POLY1305_SHA256"),
        f("cipher_xc02b", "INFO", "xc02b   ECDHE-ECDSA-AES128-GCM-SHA256     ECDH 253   AESGCM      128      TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256"),
        f("cert_trust", "OK", "Ok via SAN (same w/o SNI)"),
        f("cert_chain_of_trust", "OK", "passed."),
        f("cert_expirationStatus", "HIGH", "expires < 30 days (0)"),
        f("cert_revocation", "HIGH", "Neither CRL nor OCSP URI provided"),
    ];
    for cat in WEAK_CATEGORIES {
        v.push(f(cat, "OK", "not offered"));
    }
    for id in VULNERABILITIES {
        v.push(f(id, "OK", "not vulnerable"));
    }
    v
}

fn with(change: impl FnOnce(&mut Vec<Finding>)) -> Verdict {
    let mut v = clean();
    change(&mut v);
    judge(&v)
}

/// A change adding an accepted suite, as `-e` reports it.
fn suite(hex: &str, iana: &str) -> impl FnOnce(&mut Vec<Finding>) {
    let finding = f(
        &format!("cipher_{hex}"),
        "INFO",
        &format!("{hex}   SOME-OPENSSL-NAME   ECDH 253   AES   128   {iana}"),
    );
    move |v| v.push(finding)
}

fn set(v: &mut [Finding], id: &str, severity: &str, finding: &str) {
    let x = v.iter_mut().find(|x| x.id == id).unwrap();
    x.severity = severity.to_owned();
    x.finding = finding.to_owned();
}

#[test]
fn judge_passes_a_clean_scan_and_tolerates_only_the_policy_findings() {
    let v = judge(&clean());
    assert!(v.problems.is_empty(), "{:?}", v.problems);
    assert_eq!(v.by_design.len(), 2);
}

/// Each weakness fails the judgement, for the reason expected (a word of the problem it yields).
#[test]
fn judge_fails_each_weakness() {
    let cases: Vec<(&str, Verdict)> = vec![
        // LOW: only the protocol rule can catch it.
        (
            "TLS1 offered",
            with(|v| set(v, "TLS1", "LOW", "offered (deprecated)")),
        ),
        (
            "SSLv3 offered",
            with(|v| set(v, "SSLv3", "HIGH", "offered")),
        ),
        ("SSLv2: not tested", with(|v| v.retain(|x| x.id != "SSLv2"))),
        (
            "TLS1_3 not offered",
            with(|v| set(v, "TLS1_3", "MEDIUM", "not offered")),
        ),
        (
            "TLS_ECDHE_RSA_WITH_AES_128_CBC_SHA",
            with(suite("xc013", "TLS_ECDHE_RSA_WITH_AES_128_CBC_SHA")),
        ),
        (
            "TLS_RSA_WITH_AES_128_GCM_SHA256",
            with(suite("x9c", "TLS_RSA_WITH_AES_128_GCM_SHA256")),
        ),
        (
            "TLS_RSA_WITH_RC4_128_SHA",
            with(suite("x05", "TLS_RSA_WITH_RC4_128_SHA")),
        ),
        (
            "TLS_RSA_WITH_NULL_SHA",
            with(suite("x02", "TLS_RSA_WITH_NULL_SHA")),
        ),
        (
            "TLS_RSA_EXPORT_WITH_RC4_40_MD5",
            with(suite("x03", "TLS_RSA_EXPORT_WITH_RC4_40_MD5")),
        ),
        (
            "cipherlist_AVERAGE: offered",
            with(|v| set(v, "cipherlist_AVERAGE", "LOW", "offered")),
        ),
        (
            "cipherlist_EXPORT",
            with(|v| set(v, "cipherlist_EXPORT", "CRITICAL", "offered")),
        ),
        (
            "no accepted cipher suite",
            with(|v| v.retain(|x| !x.id.starts_with("cipher_x"))),
        ),
        (
            "ROBOT: HIGH",
            with(|v| set(v, "ROBOT", "HIGH", "VULNERABLE (NOT ok)")),
        ),
        (
            "LUCKY13: LOW",
            with(|v| set(v, "LUCKY13", "LOW", "potentially vulnerable")),
        ),
        (
            "BREACH: MEDIUM",
            with(|v| {
                set(
                    v,
                    "BREACH",
                    "MEDIUM",
                    "potentially VULNERABLE, gzip HTTP compression detected",
                )
            }),
        ),
        ("heartbleed", with(|v| v.retain(|x| x.id != "heartbleed"))),
        (
            "chain of trust: CRITICAL",
            with(|v| {
                set(
                    v,
                    "cert_chain_of_trust",
                    "CRITICAL",
                    "failed (chain incomplete).",
                )
            }),
        ),
        (
            "chain of trust: not tested",
            with(|v| v.retain(|x| x.id != "cert_chain_of_trust")),
        ),
        (
            "cert_trust",
            with(|v| {
                set(
                    v,
                    "cert_trust",
                    "INFO",
                    "certificate does not match supplied URI",
                )
            }),
        ),
        (
            "scan failed",
            with(|v| v.push(f("scanProblem", "FATAL", "Can't connect to 127.0.0.1:1"))),
        ),
        (
            "cert_keySize: HIGH",
            with(|v| v.push(f("cert_keySize", "HIGH", "RSA 1024 bits"))),
        ),
    ];
    for (expected, verdict) in cases {
        assert!(
            verdict.problems.iter().any(|p| p.contains(expected)),
            "expected a problem with {expected:?}, got {:?}",
            verdict.problems
        );
    }
}

#[test]
fn judge_reads_testssl_json() {
    let json = r#"[
        {"id" : "TLS1_2", "ip" : "app.phoenix.test/127.0.0.1", "port" : "443", "severity" : "OK", "finding" : "offered"},
        {"id" : "heartbleed", "ip" : "app.phoenix.test/127.0.0.1", "port" : "443", "severity" : "OK", "cve" : "CVE-2014-0160", "cwe" : "CWE-119", "finding" : "not vulnerable, no heartbeat extension"}
    ]"#;
    let findings = parse_findings(json).unwrap();
    assert_eq!(
        findings[1],
        f("heartbleed", "OK", "not vulnerable, no heartbeat extension")
    );
    assert!(parse_findings("[{\"id\": \"x\"}]").is_err());
    assert!(parse_findings("not json").is_err());
}
