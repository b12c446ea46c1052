//! `concord bench`: a load generator for any etcd-v3 endpoint set (concord or
//! etcd), the equivalent of etcd's `benchmark` tool.
//!
//! Workloads: `put`, `range` (`--consistency l|s`), `txn-put` (a txn with one put),
//! `watch` (watchers on one prefix while puts run; latency is put → event), and
//! `lease-keepalive`. Clients are spread over `--conns` gRPC connections; each
//! client sends one request at a time. Output: throughput, latency percentiles and
//! errors as text, or one JSON line with `--json`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use tonic::transport::{Channel, Endpoint};

use crate::proto::etcdserverpb::kv_client::KvClient;
use crate::proto::etcdserverpb::lease_client::LeaseClient;
use crate::proto::etcdserverpb::watch_client::WatchClient;
use crate::proto::etcdserverpb::{
    request_op, watch_request, LeaseGrantRequest, LeaseKeepAliveRequest, PutRequest, RangeRequest, RequestOp,
    TxnRequest, WatchCreateRequest, WatchRequest,
};

#[derive(Parser, Debug, Clone)]
#[command(name = "concord bench", about = "Load generator for etcd-v3 endpoints")]
pub struct BenchArgs {
    /// put, range, txn-put, watch or lease-keepalive.
    pub workload: String,
    #[arg(long, default_value = "127.0.0.1:2379", value_delimiter = ',')]
    pub endpoints: Vec<String>,
    /// gRPC connections, spread over the endpoints round-robin.
    #[arg(long, default_value_t = 1)]
    pub conns: usize,
    /// Concurrent clients, spread over the connections.
    #[arg(long, default_value_t = 1)]
    pub clients: usize,
    /// Total requests (ignored when --duration-s is given).
    #[arg(long, default_value_t = 10_000)]
    pub total: u64,
    /// Run for this many seconds instead of a request count.
    #[arg(long)]
    pub duration_s: Option<u64>,
    #[arg(long, default_value_t = 8)]
    pub key_size: usize,
    #[arg(long, default_value_t = 256)]
    pub val_size: usize,
    /// Distinct keys written or read (keys are chosen uniformly).
    #[arg(long, default_value_t = 10_000)]
    pub key_space_size: u64,
    /// Requests per second over all clients (0: as fast as possible).
    #[arg(long, default_value_t = 0)]
    pub rate: u64,
    /// Range consistency: l (linearizable) or s (serializable).
    #[arg(long, default_value = "l")]
    pub consistency: String,
    /// Watchers for the watch workload (spread over the connections).
    #[arg(long, default_value_t = 100)]
    pub watchers: usize,
    /// Print one JSON line instead of text.
    #[arg(long)]
    pub json: bool,
}

/// The result of one run.
#[derive(Debug, serde::Serialize)]
pub struct Report {
    pub workload: String,
    pub requests: u64,
    pub errors: u64,
    pub seconds: f64,
    pub throughput_per_s: f64,
    pub mean_ms: f64,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub max_ms: f64,
    /// Watch workload: events delivered to watchers (expected: puts × watchers).
    pub events: Option<u64>,
}

fn key(i: u64, size: usize) -> Vec<u8> {
    let mut k = format!("{i:0size$}").into_bytes();
    k.truncate(size.max(1));
    k
}

async fn connect(endpoint: &str) -> Result<Channel, String> {
    let url = if endpoint.contains("://") { endpoint.to_string() } else { format!("http://{endpoint}") };
    Endpoint::from_shared(url.clone())
        .map_err(|e| format!("{url}: {e}"))?
        .tcp_nodelay(true)
        .connect()
        .await
        .map_err(|e| format!("{url}: {e}"))
}

/// Hands out request slots: a count or a deadline, and an optional rate.
struct Budget {
    issued: AtomicU64,
    total: Option<u64>,
    deadline: Option<Instant>,
    start: Instant,
    rate: u64,
}

impl Budget {
    /// Waits for the next slot; `None` when the run is over.
    async fn next(&self) -> Option<u64> {
        let n = self.issued.fetch_add(1, Ordering::Relaxed);
        if self.total.is_some_and(|t| n >= t) || self.deadline.is_some_and(|d| Instant::now() >= d) {
            return None;
        }
        if self.rate > 0 {
            let due = self.start + Duration::from_secs_f64(n as f64 / self.rate as f64);
            tokio::time::sleep_until(due.into()).await;
        }
        Some(n)
    }
}

fn percentile(sorted_us: &[u32], q: f64) -> f64 {
    if sorted_us.is_empty() {
        return 0.0;
    }
    let i = ((sorted_us.len() as f64 * q).ceil() as usize).clamp(1, sorted_us.len()) - 1;
    f64::from(sorted_us[i]) / 1000.0
}

fn report(workload: &str, mut lat_us: Vec<u32>, errors: u64, seconds: f64, events: Option<u64>) -> Report {
    lat_us.sort_unstable();
    let n = lat_us.len() as u64;
    let mean = if n == 0 { 0.0 } else { lat_us.iter().map(|v| f64::from(*v)).sum::<f64>() / n as f64 / 1000.0 };
    Report {
        workload: workload.to_string(),
        requests: n,
        errors,
        seconds,
        throughput_per_s: n as f64 / seconds.max(1e-9),
        mean_ms: mean,
        p50_ms: percentile(&lat_us, 0.50),
        p90_ms: percentile(&lat_us, 0.90),
        p99_ms: percentile(&lat_us, 0.99),
        p999_ms: percentile(&lat_us, 0.999),
        max_ms: lat_us.last().map_or(0.0, |v| f64::from(*v) / 1000.0),
        events,
    }
}

/// Runs one workload and returns its report.
pub async fn run(args: &BenchArgs) -> Result<Report, String> {
    if args.endpoints.is_empty() || args.conns == 0 || args.clients == 0 {
        return Err("need at least one endpoint, connection and client".into());
    }
    let mut channels = Vec::new();
    for i in 0..args.conns {
        channels.push(connect(&args.endpoints[i % args.endpoints.len()]).await?);
    }
    let budget = Arc::new(Budget {
        issued: AtomicU64::new(0),
        total: if args.duration_s.is_some() { None } else { Some(args.total) },
        deadline: args.duration_s.map(|s| Instant::now() + Duration::from_secs(s)),
        start: Instant::now(),
        rate: args.rate,
    });
    let value = vec![b'v'; args.val_size];
    if args.workload == "range" {
        // Something to read: every key in the key space once, written by
        // PRELOAD_WRITERS concurrent writers.
        const PRELOAD_WRITERS: u64 = 32;
        let keys = args.key_space_size.min(100_000);
        let mut writers = Vec::new();
        for w in 0..PRELOAD_WRITERS {
            let mut kv = KvClient::new(channels[w as usize % channels.len()].clone());
            let (value, key_size) = (value.clone(), args.key_size);
            writers.push(tokio::spawn(async move {
                for i in (w..keys).step_by(PRELOAD_WRITERS as usize) {
                    kv.put(PutRequest { key: key(i, key_size), value: value.clone(), ..Default::default() })
                        .await
                        .map_err(|e| format!("preload: {}", e.message()))?;
                }
                Ok::<(), String>(())
            }));
        }
        for w in writers {
            w.await.map_err(|e| e.to_string())??;
        }
    }
    let watch_events = Arc::new(AtomicU64::new(0));
    let watch_lat = Arc::new(std::sync::Mutex::new(Vec::<u32>::new()));
    let mut watch_tasks = Vec::new();
    if args.workload == "watch" {
        // Each put carries its send time (µs since start) as the value; a watcher's
        // latency sample is receive time − send time.
        for w in 0..args.watchers {
            let mut client = WatchClient::new(channels[w % channels.len()].clone());
            let (tx, rx) = tokio::sync::mpsc::channel(1);
            let create = WatchRequest {
                request_union: Some(watch_request::RequestUnion::CreateRequest(WatchCreateRequest {
                    key: b"bench-watch/".to_vec(),
                    range_end: b"bench-watch0".to_vec(),
                    ..Default::default()
                })),
            };
            tx.send(create).await.map_err(|e| e.to_string())?;
            let mut stream = client
                .watch(tokio_stream::wrappers::ReceiverStream::new(rx))
                .await
                .map_err(|e| format!("watch: {}", e.message()))?
                .into_inner();
            let (events, lat, start) = (watch_events.clone(), watch_lat.clone(), budget.start);
            watch_tasks.push(tokio::spawn(async move {
                let _keep_open = tx;
                while let Ok(Some(resp)) = stream.message().await {
                    let now_us = start.elapsed().as_micros() as u64;
                    let mut batch = Vec::new();
                    for ev in resp.events {
                        events.fetch_add(1, Ordering::Relaxed);
                        let sent = ev.kv.and_then(|kv| std::str::from_utf8(&kv.value).ok()?.parse::<u64>().ok());
                        if let Some(sent) = sent {
                            batch.push(now_us.saturating_sub(sent).min(u64::from(u32::MAX)) as u32);
                        }
                    }
                    lat.lock().expect("latency lock").extend(batch);
                }
            }));
        }
    }
    let mut lease_ids = Vec::new();
    if args.workload == "lease-keepalive" {
        let mut lease = LeaseClient::new(channels[0].clone());
        for _ in 0..args.clients {
            let r = lease
                .lease_grant(LeaseGrantRequest { ttl: 60, id: 0 })
                .await
                .map_err(|e| format!("lease grant: {}", e.message()))?;
            lease_ids.push(r.into_inner().id);
        }
    }
    let errors = Arc::new(AtomicU64::new(0));
    let progress = Arc::new(AtomicU64::new(0));
    let show_progress = !args.json && std::io::IsTerminal::is_terminal(&std::io::stderr());
    let started = Instant::now();
    let mut tasks = Vec::new();
    for c in 0..args.clients {
        let channel = channels[c % channels.len()].clone();
        let (budget, errors, progress, args, value) =
            (budget.clone(), errors.clone(), progress.clone(), args.clone(), value.clone());
        let lease_id = lease_ids.get(c).copied();
        tasks.push(tokio::spawn(async move {
            let mut kv = KvClient::new(channel.clone());
            let mut keepalive = match lease_id {
                Some(id) => {
                    // The first keep-alive is queued before the call: a grpc-go server
                    // sends response headers only with its first response.
                    let (tx, rx) = tokio::sync::mpsc::channel(1);
                    let _ = tx.send(LeaseKeepAliveRequest { id }).await;
                    let stream = LeaseClient::new(channel.clone())
                        .lease_keep_alive(tokio_stream::wrappers::ReceiverStream::new(rx))
                        .await
                        .map(|r| r.into_inner());
                    match stream {
                        Ok(mut s) => matches!(s.message().await, Ok(Some(_))).then_some((tx, s, id)),
                        Err(_) => None,
                    }
                }
                None => None,
            };
            let mut lat = Vec::new();
            let mut rng_state = 0x9e3779b97f4a7c15u64 ^ (c as u64).wrapping_mul(0xbf58476d1ce4e5b9);
            while let Some(n) = budget.next().await {
                rng_state ^= rng_state << 13;
                rng_state ^= rng_state >> 7;
                rng_state ^= rng_state << 17;
                let k = key(rng_state % args.key_space_size.max(1), args.key_size);
                let t = Instant::now();
                let ok = match args.workload.as_str() {
                    "put" => kv.put(PutRequest { key: k, value: value.clone(), ..Default::default() }).await.is_ok(),
                    "range" => kv
                        .range(RangeRequest { key: k, serializable: args.consistency == "s", ..Default::default() })
                        .await
                        .is_ok(),
                    "txn-put" => {
                        let put = PutRequest { key: k, value: value.clone(), ..Default::default() };
                        let op = RequestOp { request: Some(request_op::Request::RequestPut(put)) };
                        kv.txn(TxnRequest { success: vec![op], ..Default::default() }).await.is_ok()
                    }
                    "watch" => {
                        let sent = budget.start.elapsed().as_micros().to_string().into_bytes();
                        let key = format!("bench-watch/{}", n % args.key_space_size.max(1)).into_bytes();
                        kv.put(PutRequest { key, value: sent, ..Default::default() }).await.is_ok()
                    }
                    "lease-keepalive" => match keepalive.as_mut() {
                        Some((tx, stream, id)) => {
                            tx.send(LeaseKeepAliveRequest { id: *id }).await.is_ok()
                                && matches!(stream.message().await, Ok(Some(_)))
                        }
                        None => false,
                    },
                    _ => false,
                };
                if ok {
                    lat.push(t.elapsed().as_micros().min(u128::from(u32::MAX)) as u32);
                } else {
                    errors.fetch_add(1, Ordering::Relaxed);
                }
                progress.fetch_add(1, Ordering::Relaxed);
            }
            lat
        }));
    }
    let ticker = show_progress.then(|| {
        let (progress, total) = (progress.clone(), args.duration_s.map_or(args.total, |_| 0));
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_millis(250)).await;
                let done = progress.load(Ordering::Relaxed);
                if total > 0 {
                    let width = 40;
                    let filled = (done.min(total) * width / total.max(1)) as usize;
                    eprint!("\r[{}{}] {done}/{total}", "#".repeat(filled), ".".repeat(width as usize - filled));
                } else {
                    eprint!("\r{done} requests");
                }
            }
        })
    });
    let mut lat = Vec::new();
    for t in tasks {
        lat.extend(t.await.map_err(|e| e.to_string())?);
    }
    let seconds = started.elapsed().as_secs_f64();
    if let Some(t) = ticker {
        t.abort();
        eprintln!();
    }
    let errors = errors.load(Ordering::Relaxed);
    if args.workload == "watch" {
        // Give the last events time to arrive, then report put → event latency.
        let expected = lat.len() as u64 * args.watchers as u64;
        let wait_until = Instant::now() + Duration::from_secs(10);
        while watch_events.load(Ordering::Relaxed) < expected && Instant::now() < wait_until {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        for t in &watch_tasks {
            t.abort();
        }
        let events = watch_events.load(Ordering::Relaxed);
        let lat = std::mem::take(&mut *watch_lat.lock().expect("latency lock"));
        let puts = expected / args.watchers.max(1) as u64;
        let mut r = report("watch", lat, errors, seconds, Some(events));
        // Requests are the puts; throughput is events delivered per second and the
        // latencies are put → event.
        r.requests = puts;
        r.throughput_per_s = events as f64 / seconds.max(1e-9);
        return Ok(r);
    }
    Ok(report(&args.workload, lat, errors, seconds, None))
}

/// Runs `concord bench ...`; returns the process exit code.
pub fn main(args: &[String]) -> i32 {
    let args = match BenchArgs::try_parse_from(std::iter::once("concord bench".to_string()).chain(args.iter().cloned()))
    {
        Ok(a) => a,
        Err(e) => e.exit(),
    };
    if !["put", "range", "txn-put", "watch", "lease-keepalive"].contains(&args.workload.as_str()) {
        eprintln!("Error: unknown workload {:?} (put, range, txn-put, watch, lease-keepalive)", args.workload);
        return 2;
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("Error: {e}");
            return 1;
        }
    };
    match runtime.block_on(run(&args)) {
        Ok(r) if args.json => {
            println!("{}", serde_json::to_string(&r).unwrap_or_default());
            0
        }
        Ok(r) => {
            println!("{}: {} requests in {:.2}s, {} errors", r.workload, r.requests, r.seconds, r.errors);
            println!("  throughput {:.1}/s", r.throughput_per_s);
            if let Some(e) = r.events {
                println!("  events delivered {e}");
            }
            println!(
                "  latency ms: mean {:.3} p50 {:.3} p90 {:.3} p99 {:.3} p99.9 {:.3} max {:.3}",
                r.mean_ms, r.p50_ms, r.p90_ms, r.p99_ms, r.p999_ms, r.max_ms
            );
            0
        }
        Err(e) => {
            eprintln!("Error: {e}");
            1
        }
    }
}
