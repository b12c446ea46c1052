//! `concord bench-queue`: a load generator for concord's durable queues
//! (`concord.queue.v1` over gRPC), the counterpart of `bench-streams` for the
//! JetStream-model API; scripts/bench-queue runs the same workloads against NATS
//! JetStream.
//!
//! Workloads (each deletes and re-creates `--stream` first, limits retention):
//! `queue-pub-1` (one connection, one Publish at a time), `queue-pub-window`
//! (`--clients` connections, each keeping `--window` Publishes in flight) and
//! `queue-consume` (pre-publish `--ops` messages as queue-pub-window does, add a
//! durable consumer delivering all, then `--consumers` tasks each loop Fetch
//! `--batch` + one Ack of what they got until every message is acknowledged).
//! Connections are spread over `--endpoints` round-robin. A gRPC error status is a
//! failed op, counted and reported; a failed connection ends the run. Output: the
//! same report as `bench-streams` (text, or one JSON line with `--json`).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use tonic::transport::{Channel, Endpoint};

use super::bench_streams::{report, Report};
use crate::proto::queue::queue_client::QueueClient;
use crate::proto::queue::{
    AckRequest, ConsumerConfig, CreateConsumerRequest, CreateStreamRequest, DeleteStreamRequest, DeliverPolicy,
    FetchRequest, Lease, PublishRequest, StreamConfig,
};

/// Most connections.
const MAX_CLIENTS: usize = 1000;
/// Most publishes one connection keeps in flight.
const MAX_WINDOW: usize = 4096;
/// Most messages one Fetch asks for.
const MAX_BATCH: u32 = 10_000;
/// Largest payload accepted (`--payload-bytes`).
const MAX_PAYLOAD: usize = 1024 * 1024;
/// Error statuses in a row after which a consumer gives up.
const MAX_ERRORS_IN_A_ROW: u32 = 100;
/// How long a Fetch waits for a message; an empty answer ends that consumer.
const FETCH_WAIT_MS: u64 = 1000;

#[derive(Parser, Debug, Clone)]
#[command(name = "concord bench-queue", about = "Load generator for concord's durable queues (gRPC)")]
pub struct BenchQueueArgs {
    /// queue-pub-1, queue-pub-window or queue-consume.
    #[arg(long, default_value = "queue-pub-window")]
    pub workload: String,
    /// Client endpoints, `host:port` (or `http://host:port`); connections are
    /// spread over them round-robin.
    #[arg(long, default_value = "127.0.0.1:2379", value_delimiter = ',')]
    pub endpoints: Vec<String>,
    /// Publishes (queue-pub-*) or messages pre-published and consumed (queue-consume).
    #[arg(long, default_value_t = 10_000)]
    pub ops: u64,
    /// Publishing connections (queue-pub-window, the pre-fill of queue-consume).
    #[arg(long, default_value_t = 4)]
    pub clients: usize,
    /// Publishes each connection keeps in flight.
    #[arg(long, default_value_t = 64)]
    pub window: usize,
    /// queue-consume: fetching tasks sharing the one durable consumer, each on its
    /// own connection.
    #[arg(long, default_value_t = 4)]
    pub consumers: usize,
    /// queue-consume: messages asked for by each Fetch.
    #[arg(long, default_value_t = 64)]
    pub batch: u32,
    #[arg(long, default_value_t = 256)]
    pub payload_bytes: usize,
    /// The stream written (deleted and re-created first).
    #[arg(long, default_value = "bench")]
    pub stream: String,
    /// Seconds to wait for a connection or for any answer before giving up.
    #[arg(long, default_value_t = 30)]
    pub timeout_s: u64,
    /// Print one JSON line instead of text.
    #[arg(long)]
    pub json: bool,
}

type Client = QueueClient<Channel>;

fn micros(since: Instant) -> u32 {
    since.elapsed().as_micros().min(u128::from(u32::MAX)) as u32
}

async fn connect(endpoint: &str, timeout: Duration) -> Result<Client, String> {
    let url = if endpoint.contains("://") { endpoint.to_string() } else { format!("http://{endpoint}") };
    let channel = Endpoint::from_shared(url.clone())
        .map_err(|e| format!("{url}: {e}"))?
        .tcp_nodelay(true)
        .connect_timeout(timeout)
        .timeout(timeout)
        .connect()
        .await
        .map_err(|e| format!("{url}: {e}"))?;
    Ok(QueueClient::new(channel))
}

async fn connect_all(args: &BenchQueueArgs, n: usize) -> Result<Vec<Client>, String> {
    let timeout = Duration::from_secs(args.timeout_s.max(1));
    let mut clients = Vec::with_capacity(n);
    for i in 0..n {
        clients.push(connect(&args.endpoints[i % args.endpoints.len()], timeout).await?);
    }
    Ok(clients)
}

/// What a set of publishers or consumers saw.
#[derive(Default)]
struct Outcome {
    lat_us: Vec<u32>,
    ok: u64,
    errors: u64,
    first_error: Option<String>,
    /// When the last op succeeded.
    last_ok: Option<Instant>,
}

impl Outcome {
    fn fail(&mut self, s: &tonic::Status) {
        self.errors += 1;
        self.first_error.get_or_insert_with(|| format!("{:?}: {}", s.code(), s.message()));
    }

    fn merge(&mut self, o: Outcome) {
        self.lat_us.extend(o.lat_us);
        self.ok += o.ok;
        self.errors += o.errors;
        if self.first_error.is_none() {
            self.first_error = o.first_error;
        }
        self.last_ok = self.last_ok.max(o.last_ok);
    }
}

/// One publisher: Publishes one at a time until `budget` (shared) is spent.
async fn publisher(
    mut c: Client,
    stream: String,
    payload: Arc<Vec<u8>>,
    budget: Arc<AtomicU64>,
    total: u64,
) -> Outcome {
    let mut out = Outcome::default();
    while budget.fetch_add(1, Ordering::Relaxed) < total {
        let t = Instant::now();
        let request = PublishRequest { stream: stream.clone(), payload: payload.to_vec(), ..Default::default() };
        match c.publish(request).await {
            Ok(_) => {
                out.lat_us.push(micros(t));
                out.ok += 1;
                out.last_ok = Some(Instant::now());
            }
            Err(s) => out.fail(&s),
        }
    }
    out
}

/// Publishes `ops` messages over `clients`, `window` in flight on each (a tonic
/// client is a handle on its connection: clones multiplex over it); returns the
/// outcome and the seconds taken.
async fn run_publishes(args: &BenchQueueArgs, clients: Vec<Client>, window: usize, ops: u64) -> (Outcome, f64) {
    let payload = Arc::new(vec![b'x'; args.payload_bytes]);
    let budget = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let mut tasks = Vec::with_capacity(clients.len() * window);
    for c in &clients {
        for _ in 0..window {
            tasks.push(tokio::spawn(publisher(c.clone(), args.stream.clone(), payload.clone(), budget.clone(), ops)));
        }
    }
    let mut all = Outcome::default();
    for t in tasks {
        match t.await {
            Ok(o) => all.merge(o),
            Err(e) => {
                all.errors += 1;
                all.first_error.get_or_insert_with(|| format!("task failed: {e}"));
            }
        }
    }
    (all, started.elapsed().as_secs_f64())
}

/// One consumer task: Fetch then Ack what came until every message is acked, a
/// Fetch comes back empty, or `MAX_ERRORS_IN_A_ROW` errors in a row.
async fn consume(mut c: Client, stream: String, batch: u32, acked_total: Arc<AtomicU64>, total: u64) -> Outcome {
    let mut out = Outcome::default();
    let mut errors_in_a_row = 0u32;
    while acked_total.load(Ordering::Relaxed) < total && errors_in_a_row < MAX_ERRORS_IN_A_ROW {
        let t = Instant::now();
        let fetch = FetchRequest { stream: stream.clone(), consumer: "c".into(), batch, max_wait_ms: FETCH_WAIT_MS };
        let deliveries = match c.fetch(fetch).await {
            Ok(r) => r.into_inner().deliveries,
            Err(s) => {
                out.fail(&s);
                errors_in_a_row += 1;
                continue;
            }
        };
        if deliveries.is_empty() {
            break;
        }
        let leases: Vec<Lease> = deliveries
            .iter()
            .map(|d| Lease { seq: d.message.as_ref().map_or(0, |m| m.seq), deliveries: d.deliveries })
            .collect();
        let ack = AckRequest { stream: stream.clone(), consumer: "c".into(), leases, delay_ms: 0 };
        match c.ack(ack).await {
            Ok(r) => {
                let n = r.into_inner().done.iter().filter(|d| **d).count() as u64;
                out.ok += n;
                acked_total.fetch_add(n, Ordering::Relaxed);
                out.lat_us.push(micros(t));
                out.last_ok = Some(Instant::now());
                errors_in_a_row = 0;
            }
            Err(s) => {
                out.fail(&s);
                errors_in_a_row += 1;
            }
        }
    }
    out
}

/// Deletes the stream if it exists and creates it afresh.
async fn recreate_stream(c: &mut Client, name: &str) -> Result<(), String> {
    match c.delete_stream(DeleteStreamRequest { name: name.into() }).await {
        Ok(_) => {}
        Err(s) if s.code() == tonic::Code::NotFound => {}
        Err(s) => return Err(format!("DeleteStream: {}", s.message())),
    }
    let config = StreamConfig { name: name.into(), ..Default::default() };
    c.create_stream(CreateStreamRequest { config: Some(config) })
        .await
        .map_err(|s| format!("CreateStream: {}", s.message()))?;
    Ok(())
}

async fn run_consume(args: &BenchQueueArgs, mut setup: Client) -> Result<Report, String> {
    let clients = connect_all(args, args.clients).await?;
    let (fill, fill_s) = run_publishes(args, clients, args.window, args.ops).await;
    if fill.errors > 0 || fill.ok != args.ops {
        return Err(format!(
            "pre-fill: {} of {} publishes failed (first: {})",
            args.ops.saturating_sub(fill.ok),
            args.ops,
            fill.first_error.unwrap_or_default()
        ));
    }
    let pending = (args.consumers as u64 * u64::from(args.batch) * 2).max(1000);
    let config = ConsumerConfig {
        name: "c".into(),
        deliver_policy: DeliverPolicy::All as i32,
        ack_wait_ms: 30_000,
        max_deliver: 5,
        max_ack_pending: pending,
        ..Default::default()
    };
    setup
        .create_consumer(CreateConsumerRequest { stream: args.stream.clone(), config: Some(config) })
        .await
        .map_err(|s| format!("CreateConsumer: {}", s.message()))?;
    let clients = connect_all(args, args.consumers).await?;
    let acked = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let tasks: Vec<_> = clients
        .into_iter()
        .map(|c| tokio::spawn(consume(c, args.stream.clone(), args.batch, acked.clone(), args.ops)))
        .collect();
    let mut all = Outcome::default();
    for t in tasks {
        all.merge(t.await.map_err(|e| format!("task failed: {e}"))?);
    }
    // Until the last ack: a consumer whose Fetch waited in vain at the end does not count.
    let seconds = all.last_ok.map_or_else(|| started.elapsed(), |t| t.duration_since(started)).as_secs_f64();
    let missing = args.ops.saturating_sub(all.ok);
    let mut r = report(&args.workload, all.lat_us, all.ok, all.errors + missing, seconds);
    r.first_error = all.first_error;
    r.prefill_per_s = Some(fill.ok as f64 / fill_s.max(1e-9));
    Ok(r)
}

/// Runs one workload and returns its report.
pub async fn run(args: &BenchQueueArgs) -> Result<Report, String> {
    let mut setup = connect_all(args, 1).await?.pop().ok_or("no connection")?;
    recreate_stream(&mut setup, &args.stream).await?;
    match args.workload.as_str() {
        "queue-pub-1" | "queue-pub-window" => {
            let (clients, window) = if args.workload == "queue-pub-1" { (1, 1) } else { (args.clients, args.window) };
            let clients = connect_all(args, clients).await?;
            let (o, seconds) = run_publishes(args, clients, window, args.ops).await;
            let mut r = report(&args.workload, o.lat_us, o.ok, o.errors, seconds);
            r.first_error = o.first_error;
            Ok(r)
        }
        "queue-consume" => run_consume(args, setup).await,
        other => Err(format!("unknown workload {other:?}")),
    }
}

fn check(args: &BenchQueueArgs) -> Result<(), String> {
    if !["queue-pub-1", "queue-pub-window", "queue-consume"].contains(&args.workload.as_str()) {
        return Err(format!("unknown workload {:?} (queue-pub-1, queue-pub-window, queue-consume)", args.workload));
    }
    if args.endpoints.is_empty() || args.endpoints.iter().any(String::is_empty) {
        return Err("need at least one endpoint".into());
    }
    if !(1..=MAX_CLIENTS).contains(&args.clients) || !(1..=MAX_CLIENTS).contains(&args.consumers) {
        return Err(format!("--clients and --consumers must be 1..={MAX_CLIENTS}"));
    }
    if !(1..=MAX_WINDOW).contains(&args.window) {
        return Err(format!("--window must be 1..={MAX_WINDOW}"));
    }
    if !(1..=MAX_BATCH).contains(&args.batch) {
        return Err(format!("--batch must be 1..={MAX_BATCH}"));
    }
    if args.payload_bytes > MAX_PAYLOAD {
        return Err(format!("--payload-bytes must be at most {MAX_PAYLOAD}"));
    }
    if args.stream.is_empty() {
        return Err("--stream must not be empty".into());
    }
    Ok(())
}

/// Runs `concord bench-queue ...`; returns the process exit code.
pub fn main(args: &[String]) -> i32 {
    let args = match BenchQueueArgs::try_parse_from(
        std::iter::once("concord bench-queue".to_string()).chain(args.iter().cloned()),
    ) {
        Ok(a) => a,
        Err(e) => e.exit(),
    };
    if let Err(e) = check(&args) {
        eprintln!("Error: {e}");
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
            let unit = if r.workload == "queue-consume" { "messages consumed+acked" } else { "publishes" };
            super::bench_streams::print_report(&r, unit, "publishes/s; latency below is one Fetch + Ack round");
            0
        }
        Err(e) => {
            eprintln!("Error: {e}");
            1
        }
    }
}
