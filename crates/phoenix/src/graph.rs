//! `phoenix graph`: the flow of a topology file as a Mermaid `flowchart LR`, like the seed's diagram
//! but derived from the file, so it cannot drift from what runs.
//!
//! Nodes: the client, the gateway, the mesh, the CA and one node per `[[service]]` (with its
//! servers). Edges carry the hop number and the protocol as the roles will speak it: HTTPS with mTLS
//! when the gateway presents its certificate, HTTP/H2C/HTTPS to each backend, and a warning on an
//! edge whose certificate is not verified. Dotted edges show where certificates come from.

use std::collections::BTreeSet;
use std::fmt::Write as _;

use crate::topology::Topology;

/// Mermaid node ids allow letters, digits and `_`.
fn node_id(prefix: &str, name: &str) -> String {
    let mut id = String::from(prefix);
    for c in name.chars() {
        id.push(if c.is_ascii_alphanumeric() { c } else { '_' });
    }
    id
}

/// A label inside `"..."`: Mermaid takes entity codes for the characters that would end it.
fn label(text: &str) -> String {
    text.replace('&', "#amp;")
        .replace('"', "#quot;")
        .replace('<', "#lt;")
        .replace('>', "#gt;")
        .replace('\n', "<br/>")
}

/// Renders the diagram.
pub fn render(topo: &Topology) -> String {
    let mut out = String::from("flowchart LR\n");
    let domain = topo.domain.as_deref().unwrap_or("");
    let _ = writeln!(out, "    client([\"External client\"])");
    let first = if let Some(gw) = &topo.gateway {
        let _ = writeln!(
            out,
            "    gateway[\"{}\"]",
            label(&format!("Gateway\n{}", gw.listen))
        );
        "gateway"
    } else {
        "mesh"
    };
    if let Some(mesh) = &topo.mesh {
        let name = crate::mesh::mesh_name(topo).unwrap_or_else(|| "mesh".into());
        let _ = writeln!(
            out,
            "    mesh[\"{}\"]",
            label(&format!("Mesh\n{name}\n{}", mesh.listen))
        );
    }
    if let Some(ca) = &topo.ca {
        let _ = writeln!(
            out,
            "    ca[(\"{}\")]",
            label(&format!("Certificate Authority\n{}\nACME", ca.listen))
        );
    }
    for s in &topo.services {
        let servers: Vec<&str> = s.servers.iter().map(|x| x.url()).collect();
        let host = if domain.is_empty() {
            s.name.clone()
        } else {
            format!("{}.{domain}", s.name)
        };
        let _ = writeln!(
            out,
            "    {}[\"{}\"]",
            node_id("svc_", &s.name),
            label(&format!("{}\n{host}\n{}", s.name, servers.join("\n")))
        );
    }

    // Edges.
    let mut hop = 1;
    if topo.gateway.is_some() || topo.mesh.is_some() {
        let _ = writeln!(out, "    client -->|\"{hop}. HTTPS\"| {first}");
        hop += 1;
    }
    if let (Some(gw), Some(_)) = (&topo.gateway, &topo.mesh) {
        let proto = if gw.mesh.starts_with("https://") {
            if gw.mtls {
                "HTTPS (mTLS)"
            } else {
                "HTTPS"
            }
        } else {
            "NOT HTTPS"
        };
        let _ = writeln!(out, "    gateway -->|\"{hop}. {proto}\"| mesh");
        hop += 1;
    }
    if topo.mesh.is_some() {
        for s in &topo.services {
            let mut protocols = BTreeSet::new();
            for server in &s.servers {
                let url = server.url().to_ascii_lowercase();
                let p = match url.split_once("://").map(|x| x.0) {
                    Some("http") => "HTTP".to_owned(),
                    Some("h2c") => "H2C (HTTP/2 cleartext)".to_owned(),
                    Some("https") if s.tls_insecure_skip_verify => "HTTPS, NOT VERIFIED".to_owned(),
                    Some("https") => "HTTPS".to_owned(),
                    _ => "?".to_owned(),
                };
                protocols.insert(p);
            }
            for p in protocols {
                let _ = writeln!(
                    out,
                    "    mesh -->|\"{hop}. {}\"| {}",
                    label(&p),
                    node_id("svc_", &s.name)
                );
            }
        }
    }
    if topo.ca.is_some() {
        if let Some(gw) = &topo.gateway {
            if gw.tls_cert.is_none() && gw.acme_directory.is_none() {
                let _ = writeln!(out, "    ca -.->|\"certificate (ACME)\"| gateway");
            }
        }
        if let Some(mesh) = &topo.mesh {
            if mesh.tls_cert.is_none() {
                let _ = writeln!(out, "    ca -.->|\"certificate (ACME)\"| mesh");
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_cannot_break_out_of_their_quotes() {
        assert_eq!(label("a\"b<c>&\nd"), "a#quot;b#lt;c#gt;#amp;<br/>d");
        assert_eq!(node_id("svc_", "qdrant-grpc.v1"), "svc_qdrant_grpc_v1");
    }
}
