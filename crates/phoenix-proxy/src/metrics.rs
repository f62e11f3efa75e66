//! Prometheus metrics of the data plane.
//!
//! Request counters and latency histograms are updated on the request path: each route resolves its
//! own once ([`RouteMetrics`]), so recording a request is an increment and an observation, with no
//! lookup by labels and no allocation. Upstream health and certificate expiry change outside the
//! request path; rather than keeping gauges in sync with every health transition and certificate
//! swap, they are read from their sources when `/metrics` is scraped (a prometheus-client
//! `Collector`), so they can never be stale.

use std::sync::{Arc, OnceLock, RwLock, Weak};
use std::time::Duration;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

use crate::tls::CertResolver;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub role: &'static str,
    pub route: Arc<str>,
    pub service: Arc<str>,
    pub code: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabels {
    pub role: &'static str,
    pub route: Arc<str>,
    pub service: Arc<str>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RoleLabels {
    pub role: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct UpstreamLabels {
    service: String,
    server: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CertLabels {
    name: String,
}

/// The counters and histogram of one route, resolved once (see [`Metrics::route`]) so that recording
/// a request looks nothing up by its labels: that lookup hashed the label strings and took the
/// family's lock, shared by every worker thread, twice per request.
pub struct RouteMetrics {
    duration: Histogram,
    requests: Family<RequestLabels, Counter>,
    labels: RouteLabels,
    /// The counters of the first status codes this route answered with; others are looked up.
    codes: [OnceLock<(u16, Counter)>; 8],
}

impl std::fmt::Debug for RouteMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RouteMetrics")
            .field("labels", &self.labels)
            .finish_non_exhaustive()
    }
}

impl RouteMetrics {
    /// Counts one answered request and its latency.
    pub fn record(&self, code: u16, elapsed: Duration) {
        self.duration.observe(elapsed.as_secs_f64());
        for slot in &self.codes {
            let (slot_code, counter) = slot.get_or_init(|| (code, self.lookup(code)));
            if *slot_code == code {
                counter.inc();
                return;
            }
        }
        self.lookup(code).inc();
    }

    fn lookup(&self, code: u16) -> Counter {
        let labels = RequestLabels {
            role: self.labels.role,
            route: self.labels.route.clone(),
            service: self.labels.service.clone(),
            code,
        };
        self.requests.get_or_create(&labels).clone()
    }
}

/// One upstream server's health, as reported by a source registered with
/// [`Metrics::watch_upstreams`].
#[derive(Debug, Clone)]
pub struct UpstreamHealth {
    pub service: String,
    pub server: String,
    pub up: bool,
}

type UpstreamSource = Arc<dyn Fn() -> Vec<UpstreamHealth> + Send + Sync>;

/// The metric families of one process (all roles share it; the `role` label tells them apart).
pub struct Metrics {
    requests_total: Family<RequestLabels, Counter>,
    request_duration: Family<RouteLabels, Histogram, fn() -> Histogram>,
    connections_open: Family<RoleLabels, Gauge>,
    sources: Arc<Sources>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

#[derive(Default)]
struct Sources {
    upstreams: RwLock<Vec<UpstreamSource>>,
    certificates: RwLock<Vec<Weak<CertResolver>>>,
}

impl std::fmt::Debug for Sources {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sources").finish_non_exhaustive()
    }
}

fn latency_histogram() -> Histogram {
    // 1 ms .. ~65 s: proxied requests range from cache hits to LLM completions.
    Histogram::new(exponential_buckets(0.001, 2.0, 17))
}

impl Metrics {
    /// Registers the families in `registry`.
    pub fn new(registry: &mut Registry) -> Arc<Metrics> {
        let requests_total = Family::<RequestLabels, Counter>::default();
        let request_duration =
            Family::<RouteLabels, Histogram, fn() -> Histogram>::new_with_constructor(
                latency_histogram as fn() -> Histogram,
            );
        let connections_open = Family::<RoleLabels, Gauge>::default();
        registry.register(
            "requests",
            "Requests answered, by role, route, service and status code",
            requests_total.clone(),
        );
        registry.register(
            "request_duration_seconds",
            "Time from request head to response head, by role, route and service",
            request_duration.clone(),
        );
        registry.register(
            "connections_open",
            "Client connections currently open",
            connections_open.clone(),
        );
        let sources = Arc::new(Sources::default());
        registry.register_collector(Box::new(SourcesCollector(sources.clone())));
        Arc::new(Metrics {
            requests_total,
            request_duration,
            connections_open,
            sources,
        })
    }

    /// The request metrics of one route, for [`RouteMetrics::record`].
    pub fn route(&self, role: &'static str, route: &Arc<str>, service: &Arc<str>) -> RouteMetrics {
        let labels = RouteLabels {
            role,
            route: route.clone(),
            service: service.clone(),
        };
        RouteMetrics {
            duration: self.request_duration.get_or_create(&labels).clone(),
            requests: self.requests_total.clone(),
            labels,
            codes: Default::default(),
        }
    }

    /// The open-connections gauge of a role.
    pub fn connections_open(&self, role: &'static str) -> Gauge {
        self.connections_open
            .get_or_create(&RoleLabels { role })
            .clone()
    }

    /// Value of `requests_total` for a label set (tests, `/health`).
    pub fn requests_count(&self, labels: &RequestLabels) -> u64 {
        self.requests_total
            .get(labels)
            .map(|c| c.get())
            .unwrap_or(0)
    }

    /// Adds a source of `upstream_up`, read at every scrape.
    pub fn watch_upstreams(&self, source: Arc<dyn Fn() -> Vec<UpstreamHealth> + Send + Sync>) {
        self.sources
            .upstreams
            .write()
            .expect("metrics lock")
            .push(source);
    }

    /// Adds a certificate resolver whose certificates are reported as
    /// `tls_certificate_not_after_seconds{name}`. Held weakly: a dropped resolver disappears.
    pub fn watch_certificates(&self, resolver: &Arc<CertResolver>) {
        self.sources
            .certificates
            .write()
            .expect("metrics lock")
            .push(Arc::downgrade(resolver));
    }
}

#[derive(Debug)]
struct SourcesCollector(Arc<Sources>);

impl Collector for SourcesCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let upstreams: Vec<UpstreamHealth> = {
            let sources = self.0.upstreams.read().expect("metrics lock").clone();
            sources.iter().flat_map(|source| source()).collect()
        };
        {
            let mut metric = encoder.encode_descriptor(
                "upstream_up",
                "1 when the upstream server is considered healthy, 0 when it is ejected",
                None,
                prometheus_client::metrics::MetricType::Gauge,
            )?;
            for u in upstreams {
                let labels = UpstreamLabels {
                    service: u.service,
                    server: u.server,
                };
                ConstGauge::new(i64::from(u.up)).encode(metric.encode_family(&labels)?)?;
            }
        }
        let certs: Vec<(String, time::OffsetDateTime)> = {
            let resolvers = self.0.certificates.read().expect("metrics lock");
            resolvers
                .iter()
                .filter_map(Weak::upgrade)
                .flat_map(|r| r.not_after())
                .collect()
        };
        let mut metric = encoder.encode_descriptor(
            "tls_certificate_not_after_seconds",
            "Expiry (notAfter) of each served certificate, as a Unix timestamp",
            None,
            prometheus_client::metrics::MetricType::Gauge,
        )?;
        for (name, not_after) in certs {
            let labels = CertLabels { name };
            ConstGauge::new(not_after.unix_timestamp()).encode(metric.encode_family(&labels)?)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_requests_and_sources() {
        let mut registry = Registry::default();
        let metrics = Metrics::new(&mut registry);
        let route: Arc<str> = Arc::from("web");
        let service: Arc<str> = Arc::from("app");
        let web = metrics.route("mesh", &route, &service);
        web.record(200, Duration::from_millis(3));
        web.record(200, Duration::from_millis(3));
        metrics.watch_upstreams(Arc::new(|| {
            vec![UpstreamHealth {
                service: "app".into(),
                server: "http://127.0.0.1:1".into(),
                up: false,
            }]
        }));
        let gauge = metrics.connections_open("mesh");
        gauge.inc();
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        assert!(
            text.contains(r#"requests_total{role="mesh",route="web",service="app",code="200"} 2"#),
            "{text}"
        );
        assert!(
            text.contains(r#"upstream_up{service="app",server="http://127.0.0.1:1"} 0"#),
            "{text}"
        );
        assert!(
            text.contains(r#"connections_open{role="mesh"} 1"#),
            "{text}"
        );
        assert!(text.contains("request_duration_seconds_bucket"), "{text}");
    }

    #[test]
    fn route_metrics_count_every_code_past_the_cached_ones() {
        let mut registry = Registry::default();
        let metrics = Metrics::new(&mut registry);
        let (route, service): (Arc<str>, Arc<str>) = (Arc::from("web"), Arc::from("app"));
        let web = metrics.route("gateway", &route, &service);
        // Twelve codes, more than the route caches, each recorded as many times as its index + 1.
        let codes = [200, 201, 204, 301, 302, 304, 400, 403, 404, 429, 500, 502];
        for (i, code) in codes.iter().enumerate() {
            for _ in 0..=i {
                web.record(*code, Duration::from_millis(1));
            }
        }
        // A second handle for the same labels counts into the same series.
        metrics
            .route("gateway", &route, &service)
            .record(502, Duration::from_millis(1));
        for (i, code) in codes.iter().enumerate() {
            let labels = RequestLabels {
                role: "gateway",
                route: route.clone(),
                service: service.clone(),
                code: *code,
            };
            let extra = u64::from(*code == 502);
            assert_eq!(
                metrics.requests_count(&labels),
                i as u64 + 1 + extra,
                "code {code}"
            );
        }
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        assert!(
            text.contains(
                r#"request_duration_seconds_count{role="gateway",route="web",service="app"} 79"#
            ),
            "{text}"
        );
    }
}
