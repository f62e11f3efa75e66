//! Soak: the whole flow (CA, mesh, gateway, whoami as separate processes) under sustained load at
//! 70 % of the peak throughput measured just before (the same 32 clients, each paced), with zero
//! failed requests and a flat resident memory in the gateway and the mesh. The test runs 30
//! seconds; `bench/soak.sh` runs the same test for 10 minutes (`PHOENIX_SOAK_SECS=600`).
//!
//! "Flat" is judged after a warm-up (the first third): the mean resident size of the last third
//! may exceed that of the middle third by at most 10 % + 4 MiB. A leak of a few hundred bytes per
//! request shows up well above that over 10 minutes; over 30 seconds only a gross one does.

mod common;
mod flow_support;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use flow_support::*;

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

fn mean(v: &[u64]) -> f64 {
    v.iter().sum::<u64>() as f64 / v.len().max(1) as f64
}

/// Concurrent clients, at peak and in the soak.
const CLIENTS: u64 = 32;

#[derive(Default)]
struct Counts {
    ok: AtomicU64,
    failed: AtomicU64,
}

async fn one(client: &reqwest::Client, url: &str, counts: &Counts) {
    let good = match client.get(url).send().await {
        Ok(r) => r.status() == 200 && r.bytes().await.is_ok_and(|b| !b.is_empty()),
        Err(_) => false,
    };
    let counter = if good { &counts.ok } else { &counts.failed };
    counter.fetch_add(1, Ordering::Relaxed);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn soak_at_70_percent_of_peak_fails_nothing_and_keeps_memory_flat() {
    let secs: u64 = std::env::var("PHOENIX_SOAK_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(30);
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let flow = Flow::start("warn");
    let root = reqwest::Certificate::from_pem(&std::fs::read(flow.root()).unwrap()).unwrap();
    let client = reqwest::Client::builder()
        .use_rustls_tls()
        .tls_built_in_root_certs(false)
        .add_root_certificate(root)
        .resolve("app.phoenix.test", addr(flow.ports.gw))
        .http1_only()
        .pool_max_idle_per_host(64)
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    let url = format!("https://app.phoenix.test:{}/soak", flow.ports.gw);

    // Peak: closed loop, 32 clients, 5 seconds.
    let peak_counts = Arc::new(Counts::default());
    let until = Instant::now() + Duration::from_secs(5);
    let mut tasks = Vec::new();
    for _ in 0..CLIENTS {
        let (client, url, counts) = (client.clone(), url.clone(), peak_counts.clone());
        tasks.push(tokio::spawn(async move {
            while Instant::now() < until {
                one(&client, &url, &counts).await;
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(
        peak_counts.failed.load(Ordering::Relaxed),
        0,
        "failures at peak"
    );
    let peak = peak_counts.ok.load(Ordering::Relaxed) as f64 / 5.0;
    let rate = (peak * 0.7).max(1.0);

    // Soak: 70 % of peak, memory sampled every second.
    let gateway = flow.gateway.as_ref().unwrap().child.id();
    let mesh = flow.mesh.as_ref().unwrap().child.id();
    let counts = Arc::new(Counts::default());
    // Sampled until the last request is answered, however long the load takes.
    let (stop_sampling, mut stopped) = tokio::sync::oneshot::channel::<()>();
    let sampler = tokio::spawn(async move {
        let mut samples = Vec::new();
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tokio::select! {
                _ = tick.tick() => samples.push((rss_kib(gateway), rss_kib(mesh))),
                _ = &mut stopped => break,
            }
        }
        samples
    });
    // The same 32 clients as at peak, each paced at its share of the rate: a request that is late
    // is sent at once (missed ticks burst), so the load is the rate unless the flow falls behind.
    // (A task spawned per request at the full rate cost the load generator more CPU than the
    // closed loop of the peak did, on the two cores it shares with the roles, and with a faster
    // flow the generator, not the flow, set the rate.)
    let started = Instant::now();
    let per_client = ((rate * secs as f64) as u64).div_ceil(CLIENTS);
    let total = per_client * CLIENTS;
    let mut load = Vec::new();
    for _ in 0..CLIENTS {
        let (client, url, counts) = (client.clone(), url.clone(), counts.clone());
        load.push(tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs_f64(CLIENTS as f64 / rate));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
            for _ in 0..per_client {
                tick.tick().await;
                one(&client, &url, &counts).await;
            }
        }));
    }
    for task in load {
        task.await.unwrap();
    }
    let elapsed = started.elapsed().as_secs_f64();
    let _ = stop_sampling.send(());
    let samples = sampler.await.unwrap();

    let (ok, failed) = (
        counts.ok.load(Ordering::Relaxed),
        counts.failed.load(Ordering::Relaxed),
    );
    let third = samples.len() / 3;
    // Mean resident size of the first (warm-up), middle and last thirds.
    let series = |pick: fn(&(u64, u64)) -> u64| -> (f64, f64, f64) {
        let v: Vec<u64> = samples.iter().map(pick).collect();
        (
            mean(&v[..third]),
            mean(&v[third..2 * third]),
            mean(&v[2 * third..]),
        )
    };
    let (gw_start, gw_mid, gw_end) = series(|s| s.0);
    let (mesh_start, mesh_mid, mesh_end) = series(|s| s.1);
    let mib = |kib: f64| kib / 1024.0;
    println!(
        "soak: peak {peak:.0} req/s, target {rate:.0} req/s, achieved {:.0} req/s over {elapsed:.0} s; \
         {ok} ok, {failed} failed; {} memory samples; gateway RSS {:.1} / {:.1} / {:.1} MiB, \
         mesh RSS {:.1} / {:.1} / {:.1} MiB (means of the first, middle and last thirds)",
        ok as f64 / elapsed,
        samples.len(),
        mib(gw_start),
        mib(gw_mid),
        mib(gw_end),
        mib(mesh_start),
        mib(mesh_mid),
        mib(mesh_end)
    );
    assert_eq!(failed, 0, "{failed} of {} requests failed", ok + failed);
    assert_eq!(ok, total);
    assert!(
        // 80 %, not 100 %: on a shared 2-core machine the load generator itself competes for CPU
        // with the roles, and the peak measured over 5 s is an optimistic figure.
        ok as f64 / elapsed >= rate * 0.8,
        "the flow did not keep up with 70 % of its peak: {:.0} of {rate:.0} req/s",
        ok as f64 / elapsed
    );
    for (role, mid, end) in [("gateway", gw_mid, gw_end), ("mesh", mesh_mid, mesh_end)] {
        assert!(mid > 0.0, "no memory samples for the {role}");
        assert!(
            end <= mid * 1.10 + 4096.0,
            "{role} memory grew from {:.1} MiB to {:.1} MiB under steady load",
            mid / 1024.0,
            end / 1024.0
        );
    }
}
