//! `phoenix graph`: Mermaid derived from the seed example names every service and the protocol on
//! every edge, and a real Mermaid renderer (@mermaid-js/mermaid-cli driving Debian's chromium) turns
//! it into an SVG.
//!
//! The renderer is installed once into `target/mermaid-cli` (npm, no browser download) and reused.
//! Without npm or chromium this test FAILS with the commands that install them: a diagram nobody
//! rendered is not known to be valid Mermaid.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;

const CHROMIUM: &str = "/usr/bin/chromium";
const INSTALL_HINT: &str = "install the renderer's prerequisites: `apt-get install -y nodejs npm chromium`; \
     the test then runs `PUPPETEER_SKIP_DOWNLOAD=1 npm install --prefix target/mermaid-cli @mermaid-js/mermaid-cli@11` itself";

fn seed() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/phoenix-hypervisor.toml")
}

fn graph(path: &Path) -> String {
    let mut cmd = phoenix();
    cmd.args(["graph", "--config"]).arg(path);
    String::from_utf8(run_ok(cmd).stdout).unwrap()
}

#[test]
fn graph_names_every_service_and_every_edge_protocol() {
    let text = graph(&seed());
    assert!(text.starts_with("flowchart LR\n"), "{text}");
    for node in ["client([", "gateway[", "mesh[", "ca[("] {
        assert!(text.contains(node), "missing node {node:?}:\n{text}");
    }
    for (service, protocol) in [
        ("qdrant", "3. HTTP"),
        ("qdrant_grpc", "3. H2C"),
        ("vllm", "3. HTTP"),
        ("portainer", "3. HTTPS, NOT VERIFIED"),
    ] {
        assert!(
            text.contains(&format!("    svc_{service}[\"")),
            "node of {service}:\n{text}"
        );
        let edge = text
            .lines()
            .find(|l| {
                l.trim_start().starts_with("mesh -->")
                    && l.trim_end().ends_with(&format!("| svc_{service}"))
            })
            .unwrap_or_else(|| panic!("no edge to {service}:\n{text}"));
        assert!(edge.contains(protocol), "{edge}");
    }
    assert!(text.contains("client -->|\"1. HTTPS\"| gateway"), "{text}");
    assert!(
        text.contains("gateway -->|\"2. HTTPS (mTLS)\"| mesh"),
        "{text}"
    );
    assert!(
        text.contains("ca -.->|\"certificate (ACME)\"| gateway"),
        "{text}"
    );
    // Every edge carries a label.
    for line in text.lines().filter(|l| l.contains("->")) {
        assert!(line.contains("|\""), "edge without a protocol: {line}");
    }
}

/// `target/`, from the test binary's path (`target/debug/deps/graph-...`).
fn target_dir() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    exe.ancestors()
        .find(|p| p.file_name().is_some_and(|n| n == "target"))
        .map(Path::to_owned)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target"))
}

/// `mmdc`, installed into `target/mermaid-cli` on first use.
fn mmdc() -> PathBuf {
    let prefix = target_dir().join("mermaid-cli");
    let bin = prefix.join("node_modules/.bin/mmdc");
    if bin.exists() {
        return bin;
    }
    std::fs::create_dir_all(&prefix).unwrap();
    let out = Command::new("npm")
        .args([
            "install",
            "--no-audit",
            "--no-fund",
            "--loglevel=error",
            "--prefix",
        ])
        .arg(&prefix)
        .arg("@mermaid-js/mermaid-cli@11")
        .env("PUPPETEER_SKIP_DOWNLOAD", "1")
        .output()
        .unwrap_or_else(|e| panic!("cannot run npm ({e}): {INSTALL_HINT}"));
    assert!(
        out.status.success() && bin.exists(),
        "npm install @mermaid-js/mermaid-cli failed: {}\n{INSTALL_HINT}",
        String::from_utf8_lossy(&out.stderr)
    );
    bin
}

#[test]
fn graph_renders_with_mermaid_cli() {
    assert!(
        Path::new(CHROMIUM).exists(),
        "{CHROMIUM} is missing: {INSTALL_HINT}"
    );
    let mmdc = mmdc();
    let tmp = tempfile::tempdir().unwrap();
    let input = tmp.path().join("flow.mmd");
    let output = tmp.path().join("flow.svg");
    let config = tmp.path().join("puppeteer.json");
    std::fs::write(&input, graph(&seed())).unwrap();
    std::fs::write(
        &config,
        format!(
            r#"{{"executablePath": "{CHROMIUM}", "args": ["--no-sandbox", "--headless=new", "--disable-gpu", "--disable-dev-shm-usage"]}}"#
        ),
    )
    .unwrap();
    let out = Command::new(&mmdc)
        .arg("-i")
        .arg(&input)
        .arg("-o")
        .arg(&output)
        .arg("-p")
        .arg(&config)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "mmdc failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let svg = std::fs::read_to_string(&output).unwrap();
    assert!(svg.contains("<svg"), "not an SVG");
    // Mermaid reports syntax errors as an SVG with "Syntax error" in it, not as a failure.
    assert!(
        !svg.contains("Syntax error"),
        "Mermaid could not parse the diagram"
    );
    for text in [
        "Gateway",
        "Mesh",
        "qdrant-grpc",
        "vllm",
        "portainer",
        "2. HTTPS (mTLS)",
        "NOT VERIFIED",
    ] {
        assert!(svg.contains(text), "the rendered diagram lacks {text:?}");
    }
}
