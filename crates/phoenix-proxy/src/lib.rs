//! The data plane shared by the gateway and the mesh: TLS listeners with a hot-swappable certificate
//! resolver, the Traefik-compatible rule router, middlewares, upstream pools with load balancing and
//! health checks, and the streaming forwarder that ties them together.
#![forbid(unsafe_code)]

pub mod admin;
pub mod body;
pub mod config;
pub mod forward;
pub mod framing;
mod gate;
mod h1_server;
pub mod metrics;
pub mod middleware;
mod plain;
pub mod prefixed;
pub mod proxy;
mod readiness;
pub mod redirect;
pub mod router;
pub mod rule;
pub mod server;
pub mod table;
mod timers;
pub mod tls;
pub mod trace;
pub mod upstream;
pub mod whoami;
mod wire;
pub mod workers;
