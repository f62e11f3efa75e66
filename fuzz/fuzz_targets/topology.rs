//! Fuzz target for the routing part of the topology file: the `[[service]]`, `[[route]]`,
//! `[middleware.NAME]` and `[mesh]` sections as TOML, deserialised into phoenix-proxy's config
//! types, then built into a route table the way the mesh and gateway do before serving.
//!
//! The binary crate's own `topology::parse` is not reachable from here (the binary has no library
//! target); this covers everything it delegates to: the serde shapes with their defaults and
//! `deny_unknown_fields`, humantime durations, IP networks, server URLs, rules and middlewares.
//! Properties beyond "no panic, no stack overflow": a table that builds routes only to services
//! of the file, and a refused file always says why.
#![no_main]

use std::collections::BTreeMap;
use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use phoenix_proxy::config::{
    MeshConfig, MiddlewareConfig, RouteConfig, RoutingConfig, ServiceConfig,
};
use phoenix_proxy::table::{BuildContext, RouteTable};
use phoenix_proxy::upstream::UpstreamContext;
use serde::Deserialize;

#[derive(Deserialize)]
struct File {
    #[serde(default)]
    domain: Option<String>,
    #[serde(default)]
    mesh: Option<MeshConfig>,
    #[serde(default)]
    service: Vec<ServiceConfig>,
    #[serde(default)]
    route: Vec<RouteConfig>,
    #[serde(default)]
    middleware: BTreeMap<String, MiddlewareConfig>,
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(file) = toml::from_str::<File>(text) else {
        return;
    };
    let plaintext = file
        .mesh
        .as_ref()
        .map(|m| m.plaintext_networks.clone())
        .unwrap_or_else(|| vec!["127.0.0.0/8".parse().expect("valid network")]);
    let routing = RoutingConfig {
        domain: file.domain,
        services: file.service,
        routes: file.route,
        middlewares: file.middleware,
    };
    let ctx = BuildContext {
        plaintext_networks: &plaintext,
        upstream: UpstreamContext {
            internal_roots: None,
            connect_timeout: Duration::from_secs(1),
            default_timeout: Duration::from_secs(1),
            client_cert: None,
        },
        previous: None,
    };
    match RouteTable::build(&routing, &ctx) {
        Ok(table) => {
            let names: Vec<&str> = routing.services.iter().map(|s| s.name.as_str()).collect();
            for service in table.services() {
                assert!(
                    names.contains(&service.name()),
                    "table has a service {:?} the file does not",
                    service.name()
                );
            }
        }
        Err(problems) => {
            assert!(!problems.is_empty(), "refused without a problem");
            for p in problems {
                assert!(!p.place.is_empty() && !p.message.is_empty(), "{p:?}");
            }
        }
    }
});
