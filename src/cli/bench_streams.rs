//! `concord bench-streams`: a load generator for Redis Streams over RESP2 on plain
//! TCP, against any Redis-protocol server (redis-server or concord's
//! `--listen-redis-urls`), so one tool measures both.
//!
//! Workloads: `xadd-1` (one connection, one `XADD` at a time), `xadd-window`
//! (`--clients` connections, each keeping `--window` `XADD`s pipelined in flight) and
//! `consume-ack` (pre-fill the stream, create group `g` at 0, then `--clients`
//! consumers each loop `XREADGROUP ... COUNT 64` then `XACK` of what they got until
//! every entry is acknowledged). Connections are spread over `--endpoints`
//! round-robin. A Redis error reply is a failed op, counted and reported; a broken
//! connection or a malformed reply ends the run with an error. Output: throughput,
//! latency percentiles and errors as text, or one JSON line with `--json`.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Most bytes of one bulk string accepted in a reply.
const MAX_BULK_BYTES: usize = 16 * 1024 * 1024;
/// Most elements of one array accepted in a reply.
const MAX_ARRAY_LEN: usize = 1 << 20;
/// Deepest nesting of arrays accepted (an `XREADGROUP` reply is 4 deep).
const MAX_DEPTH: usize = 8;
/// Longest `+`, `-` or `:` line accepted, and longest length header.
const MAX_LINE_BYTES: usize = 64 * 1024;
/// Most bytes buffered while waiting for the rest of a reply.
const MAX_READ_BUFFER: usize = 64 * 1024 * 1024;
/// Most commands one connection keeps in flight.
const MAX_WINDOW: usize = 4096;
/// Most connections.
const MAX_CLIENTS: usize = 10_000;
/// Largest payload accepted (`--payload-bytes`).
const MAX_PAYLOAD: usize = 1024 * 1024;
/// Entries asked for by each `XREADGROUP` of the consume-ack workload.
const READ_COUNT: usize = 64;

#[derive(Parser, Debug, Clone)]
#[command(name = "concord bench-streams", about = "Load generator for Redis Streams (RESP2 over TCP)")]
pub struct BenchStreamsArgs {
    /// xadd-1, xadd-window or consume-ack.
    #[arg(long, default_value = "xadd-window")]
    pub workload: String,
    /// Redis endpoints, `host:port` (or `redis://host:port`); connections are
    /// spread over them round-robin.
    #[arg(long, default_value = "127.0.0.1:6379", value_delimiter = ',')]
    pub endpoints: Vec<String>,
    /// XADDs (xadd-1, xadd-window) or entries pre-filled and consumed (consume-ack).
    #[arg(long, default_value_t = 10_000)]
    pub ops: u64,
    /// Connections (xadd-window, and the pre-fill of consume-ack) or consumers
    /// (consume-ack). xadd-1 always uses one.
    #[arg(long, default_value_t = 16)]
    pub clients: usize,
    /// Commands each connection keeps in flight (xadd-window, consume-ack pre-fill).
    #[arg(long, default_value_t = 16)]
    pub window: usize,
    #[arg(long, default_value_t = 256)]
    pub payload_bytes: usize,
    /// The stream written (consume-ack deletes it first).
    #[arg(long, default_value = "bench")]
    pub stream: String,
    /// Seconds to wait for a connection or for any reply before giving up.
    #[arg(long, default_value_t = 30)]
    pub timeout_s: u64,
    /// Print one JSON line instead of text.
    #[arg(long)]
    pub json: bool,
}

/// Why a run stopped.
#[derive(Debug, thiserror::Error)]
pub enum BenchStreamsError {
    #[error("{0}: {1}")]
    Io(String, std::io::Error),
    #[error("{0}: timed out")]
    Timeout(String),
    #[error("{0}: connection closed by the server")]
    Closed(String),
    #[error("{0}: protocol error: {1}")]
    Protocol(String, String),
    #[error("{0}: unexpected reply to {1}: {2}")]
    Unexpected(String, &'static str, String),
    #[error("{0}")]
    Setup(String),
    #[error("task failed: {0}")]
    Join(String),
}

/// One RESP2 reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    Simple(Vec<u8>),
    Error(String),
    Int(i64),
    Bulk(Option<Vec<u8>>),
    Array(Option<Vec<Reply>>),
}

impl Reply {
    fn describe(&self) -> String {
        let s = format!("{self:?}");
        if s.chars().count() > 200 {
            format!("{}...", s.chars().take(200).collect::<String>())
        } else {
            s
        }
    }
}

/// Appends a command as an array of bulk strings.
pub fn encode(out: &mut Vec<u8>, args: &[&[u8]]) {
    out.extend_from_slice(format!("*{}\r\n", args.len()).as_bytes());
    for a in args {
        out.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
        out.extend_from_slice(a);
        out.extend_from_slice(b"\r\n");
    }
}

/// Parses one reply from the front of `buf`: `Ok(None)` if it is incomplete,
/// else the reply and the bytes it took.
pub fn parse(buf: &[u8]) -> Result<Option<(Reply, usize)>, String> {
    parse_at(buf, 0, 0)
}

fn line(buf: &[u8], at: usize) -> Result<Option<(&[u8], usize)>, String> {
    let rest = &buf[at.min(buf.len())..];
    let window = &rest[..rest.len().min(MAX_LINE_BYTES + 2)];
    match window.windows(2).position(|w| w == b"\r\n") {
        Some(end) => Ok(Some((&rest[..end], at + end + 2))),
        None if rest.len() >= MAX_LINE_BYTES + 2 => Err(format!("line longer than {MAX_LINE_BYTES} bytes")),
        None => Ok(None),
    }
}

fn int(s: &[u8]) -> Result<i64, String> {
    std::str::from_utf8(s)
        .ok()
        .and_then(|s| s.parse::<i64>().ok())
        .ok_or_else(|| format!("bad integer {:?}", String::from_utf8_lossy(s)))
}

/// A length header: -1 is `None` (null), anything else negative or above `max`
/// is an error.
fn length(s: &[u8], max: usize) -> Result<Option<usize>, String> {
    match int(s)? {
        -1 => Ok(None),
        n if n < 0 => Err(format!("negative length {n}")),
        n => match usize::try_from(n) {
            Ok(n) if n <= max => Ok(Some(n)),
            _ => Err(format!("length {n} above the limit {max}")),
        },
    }
}

fn parse_at(buf: &[u8], at: usize, depth: usize) -> Result<Option<(Reply, usize)>, String> {
    if depth > MAX_DEPTH {
        return Err(format!("arrays nested deeper than {MAX_DEPTH}"));
    }
    let Some(&kind) = buf.get(at) else { return Ok(None) };
    let Some((head, next)) = line(buf, at + 1)? else { return Ok(None) };
    match kind {
        b'+' => Ok(Some((Reply::Simple(head.to_vec()), next))),
        b'-' => Ok(Some((Reply::Error(String::from_utf8_lossy(head).into_owned()), next))),
        b':' => Ok(Some((Reply::Int(int(head)?), next))),
        b'$' => match length(head, MAX_BULK_BYTES)? {
            None => Ok(Some((Reply::Bulk(None), next))),
            Some(n) => {
                let end = next + n;
                if buf.len() < end + 2 {
                    return Ok(None);
                }
                if &buf[end..end + 2] != b"\r\n" {
                    return Err("bulk string not followed by CRLF".into());
                }
                Ok(Some((Reply::Bulk(Some(buf[next..end].to_vec())), end + 2)))
            }
        },
        b'*' => match length(head, MAX_ARRAY_LEN)? {
            None => Ok(Some((Reply::Array(None), next))),
            Some(n) => {
                // Each element takes at least 3 bytes: do not reserve for more
                // elements than the buffer could hold.
                let mut items = Vec::with_capacity(n.min(buf.len() / 3 + 1));
                let mut pos = next;
                for _ in 0..n {
                    match parse_at(buf, pos, depth + 1)? {
                        Some((item, after)) => {
                            items.push(item);
                            pos = after;
                        }
                        None => return Ok(None),
                    }
                }
                Ok(Some((Reply::Array(Some(items)), pos)))
            }
        },
        other => Err(format!("unknown reply type byte 0x{other:02x}")),
    }
}

/// One RESP2 connection: commands are written as they come, replies are read in
/// order.
struct Conn {
    peer: String,
    stream: TcpStream,
    buf: Vec<u8>,
    /// Bytes of `buf` already handed out as replies.
    consumed: usize,
    timeout: Duration,
}

impl Conn {
    async fn connect(endpoint: &str, timeout: Duration) -> Result<Conn, BenchStreamsError> {
        let addr = endpoint.strip_prefix("redis://").unwrap_or(endpoint).trim_end_matches('/').to_string();
        let stream = match tokio::time::timeout(timeout, TcpStream::connect(&addr)).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => return Err(BenchStreamsError::Io(addr, e)),
            Err(_) => return Err(BenchStreamsError::Timeout(addr)),
        };
        stream.set_nodelay(true).map_err(|e| BenchStreamsError::Io(addr.clone(), e))?;
        Ok(Conn { peer: addr, stream, buf: Vec::with_capacity(64 * 1024), consumed: 0, timeout })
    }

    async fn send(&mut self, bytes: &[u8]) -> Result<(), BenchStreamsError> {
        match tokio::time::timeout(self.timeout, self.stream.write_all(bytes)).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(BenchStreamsError::Io(self.peer.clone(), e)),
            Err(_) => Err(BenchStreamsError::Timeout(self.peer.clone())),
        }
    }

    /// The next complete reply already buffered, if any.
    fn buffered(&mut self) -> Result<Option<Reply>, BenchStreamsError> {
        match parse(&self.buf[self.consumed..]) {
            Ok(Some((reply, used))) => {
                self.consumed += used;
                Ok(Some(reply))
            }
            Ok(None) => Ok(None),
            Err(e) => Err(BenchStreamsError::Protocol(self.peer.clone(), e)),
        }
    }

    /// Reads more bytes from the socket (waiting at most the timeout).
    async fn fill(&mut self) -> Result<(), BenchStreamsError> {
        if self.consumed > 0 {
            self.buf.drain(..self.consumed);
            self.consumed = 0;
        }
        if self.buf.len() >= MAX_READ_BUFFER {
            let e = format!("a reply larger than {MAX_READ_BUFFER} bytes");
            return Err(BenchStreamsError::Protocol(self.peer.clone(), e));
        }
        let mut chunk = [0u8; 64 * 1024];
        let want = chunk.len().min(MAX_READ_BUFFER - self.buf.len());
        match tokio::time::timeout(self.timeout, self.stream.read(&mut chunk[..want])).await {
            Ok(Ok(0)) => Err(BenchStreamsError::Closed(self.peer.clone())),
            Ok(Ok(n)) => {
                self.buf.extend_from_slice(&chunk[..n]);
                Ok(())
            }
            Ok(Err(e)) => Err(BenchStreamsError::Io(self.peer.clone(), e)),
            Err(_) => Err(BenchStreamsError::Timeout(self.peer.clone())),
        }
    }

    /// Waits for the next reply.
    async fn recv(&mut self) -> Result<Reply, BenchStreamsError> {
        loop {
            if let Some(r) = self.buffered()? {
                return Ok(r);
            }
            self.fill().await?;
        }
    }

    /// Sends one command and waits for its reply.
    async fn call(&mut self, args: &[&[u8]]) -> Result<Reply, BenchStreamsError> {
        let mut out = Vec::new();
        encode(&mut out, args);
        self.send(&out).await?;
        self.recv().await
    }
}

/// The result of one run.
#[derive(Debug, serde::Serialize)]
pub struct Report {
    pub workload: String,
    /// Ops that succeeded (consume-ack: entries acknowledged).
    pub requests: u64,
    /// Redis error replies (consume-ack: also entries never acknowledged).
    pub errors: u64,
    pub seconds: f64,
    pub throughput_per_s: f64,
    pub mean_ms: f64,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub max_ms: f64,
    /// The first error reply seen, if any.
    pub first_error: Option<String>,
    /// consume-ack: XADDs per second of the pre-fill.
    pub prefill_per_s: Option<f64>,
}

fn percentile(sorted_us: &[u32], q: f64) -> f64 {
    if sorted_us.is_empty() {
        return 0.0;
    }
    let i = ((sorted_us.len() as f64 * q).ceil() as usize).clamp(1, sorted_us.len()) - 1;
    f64::from(sorted_us[i]) / 1000.0
}

/// The report of a run: `lat_us` are the latencies in µs (sorted here), `done` the
/// ops that succeeded.
pub fn report(workload: &str, mut lat_us: Vec<u32>, done: u64, errors: u64, seconds: f64) -> Report {
    lat_us.sort_unstable();
    let n = lat_us.len();
    let mean = if n == 0 { 0.0 } else { lat_us.iter().map(|v| f64::from(*v)).sum::<f64>() / n as f64 / 1000.0 };
    Report {
        workload: workload.to_string(),
        requests: done,
        errors,
        seconds,
        throughput_per_s: done as f64 / seconds.max(1e-9),
        mean_ms: mean,
        p50_ms: percentile(&lat_us, 0.50),
        p90_ms: percentile(&lat_us, 0.90),
        p99_ms: percentile(&lat_us, 0.99),
        p999_ms: percentile(&lat_us, 0.999),
        max_ms: lat_us.last().map_or(0.0, |v| f64::from(*v) / 1000.0),
        first_error: None,
        prefill_per_s: None,
    }
}

fn micros(since: Instant) -> u32 {
    since.elapsed().as_micros().min(u128::from(u32::MAX)) as u32
}

/// What one pipelined XADD connection saw.
#[derive(Default)]
struct XaddOutcome {
    lat_us: Vec<u32>,
    ok: u64,
    errors: u64,
    first_error: Option<String>,
}

/// Sends `command` over `conn` until `budget` (shared by all connections) is
/// spent, keeping up to `window` in flight; each reply must be a bulk string (the
/// new entry's ID) or an error reply.
async fn xadd_pipelined(
    mut conn: Conn,
    command: Arc<Vec<u8>>,
    window: usize,
    budget: Arc<AtomicU64>,
    total: u64,
) -> Result<XaddOutcome, BenchStreamsError> {
    let claim = |budget: &AtomicU64| budget.fetch_add(1, Ordering::Relaxed) < total;
    let mut out = XaddOutcome::default();
    let mut sent_at: VecDeque<Instant> = VecDeque::with_capacity(window);
    let mut batch = Vec::with_capacity(command.len() * window);
    while sent_at.len() < window && claim(&budget) {
        batch.extend_from_slice(&command);
        sent_at.push_back(Instant::now());
    }
    conn.send(&batch).await?;
    while !sent_at.is_empty() {
        conn.fill().await?;
        batch.clear();
        while let Some(reply) = conn.buffered()? {
            let Some(t) = sent_at.pop_front() else {
                return Err(BenchStreamsError::Protocol(conn.peer.clone(), "a reply to no command".into()));
            };
            match reply {
                Reply::Bulk(Some(_)) => {
                    out.ok += 1;
                    out.lat_us.push(micros(t));
                }
                Reply::Error(e) => {
                    out.errors += 1;
                    out.first_error.get_or_insert(e);
                }
                other => return Err(BenchStreamsError::Unexpected(conn.peer.clone(), "XADD", other.describe())),
            }
            if claim(&budget) {
                batch.extend_from_slice(&command);
                sent_at.push_back(Instant::now());
            }
        }
        if !batch.is_empty() {
            conn.send(&batch).await?;
        }
    }
    Ok(out)
}

async fn connect_all(args: &BenchStreamsArgs, n: usize) -> Result<Vec<Conn>, BenchStreamsError> {
    let timeout = Duration::from_secs(args.timeout_s.max(1));
    let mut conns = Vec::with_capacity(n);
    for i in 0..n {
        conns.push(Conn::connect(&args.endpoints[i % args.endpoints.len()], timeout).await?);
    }
    Ok(conns)
}

/// Runs pipelined XADDs of `ops` entries over `conns`; returns the outcomes and
/// the seconds taken.
async fn run_xadds(
    args: &BenchStreamsArgs,
    conns: Vec<Conn>,
    window: usize,
    ops: u64,
) -> Result<(XaddOutcome, f64), BenchStreamsError> {
    let payload = vec![b'x'; args.payload_bytes];
    let mut command = Vec::new();
    encode(&mut command, &[b"XADD", args.stream.as_bytes(), b"*", b"p", &payload]);
    let command = Arc::new(command);
    let budget = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let mut tasks = Vec::with_capacity(conns.len());
    for conn in conns {
        tasks.push(tokio::spawn(xadd_pipelined(conn, command.clone(), window, budget.clone(), ops)));
    }
    let mut all = XaddOutcome::default();
    for t in tasks {
        let o = t.await.map_err(|e| BenchStreamsError::Join(e.to_string()))??;
        all.lat_us.extend(o.lat_us);
        all.ok += o.ok;
        all.errors += o.errors;
        if all.first_error.is_none() {
            all.first_error = o.first_error;
        }
    }
    Ok((all, started.elapsed().as_secs_f64()))
}

/// The entry IDs of an `XREADGROUP` reply for one stream (none for a null reply).
fn entry_ids(reply: &Reply) -> Option<Vec<Vec<u8>>> {
    let streams = match reply {
        Reply::Array(None) => return Some(Vec::new()),
        Reply::Array(Some(s)) => s,
        _ => return None,
    };
    let mut ids = Vec::new();
    for s in streams {
        let Reply::Array(Some(pair)) = s else { return None };
        let [_, Reply::Array(entries)] = pair.as_slice() else { return None };
        for e in entries.iter().flatten() {
            let Reply::Array(Some(fields)) = e else { return None };
            let Some(Reply::Bulk(Some(id))) = fields.first() else { return None };
            ids.push(id.clone());
        }
    }
    Some(ids)
}

/// What one consumer saw.
#[derive(Default)]
struct ConsumeOutcome {
    lat_us: Vec<u32>,
    acked: u64,
    errors: u64,
    first_error: Option<String>,
}

/// Reads with `XREADGROUP ... >` and acknowledges what it got until a read comes
/// back empty (the stream was filled before the group was created, so an empty
/// read means every entry has been delivered), every entry is acknowledged, or
/// 100 error replies come in a row.
async fn consume(
    mut conn: Conn,
    stream: String,
    consumer: String,
    acked_total: Arc<AtomicU64>,
    total: u64,
) -> Result<ConsumeOutcome, BenchStreamsError> {
    let mut out = ConsumeOutcome::default();
    let count = READ_COUNT.to_string();
    let mut errors_in_a_row = 0u32;
    while acked_total.load(Ordering::Relaxed) < total {
        let t = Instant::now();
        let read: [&[u8]; 9] = [
            b"XREADGROUP",
            b"GROUP",
            b"g",
            consumer.as_bytes(),
            b"COUNT",
            count.as_bytes(),
            b"STREAMS",
            stream.as_bytes(),
            b">",
        ];
        let reply = conn.call(&read).await?;
        if let Reply::Error(e) = reply {
            out.errors += 1;
            out.first_error.get_or_insert(e);
            errors_in_a_row += 1;
            if errors_in_a_row >= 100 {
                break;
            }
            continue;
        }
        let Some(ids) = entry_ids(&reply) else {
            return Err(BenchStreamsError::Unexpected(conn.peer.clone(), "XREADGROUP", reply.describe()));
        };
        if ids.is_empty() {
            break;
        }
        let mut ack: Vec<&[u8]> = vec![b"XACK", stream.as_bytes(), b"g"];
        ack.extend(ids.iter().map(Vec::as_slice));
        match conn.call(&ack).await? {
            Reply::Int(n) => {
                let n = u64::try_from(n).unwrap_or(0);
                out.acked += n;
                acked_total.fetch_add(n, Ordering::Relaxed);
                out.lat_us.push(micros(t));
                errors_in_a_row = 0;
            }
            Reply::Error(e) => {
                out.errors += 1;
                out.first_error.get_or_insert(e);
                errors_in_a_row += 1;
                if errors_in_a_row >= 100 {
                    break;
                }
            }
            other => return Err(BenchStreamsError::Unexpected(conn.peer.clone(), "XACK", other.describe())),
        }
    }
    Ok(out)
}

async fn run_consume_ack(args: &BenchStreamsArgs) -> Result<Report, BenchStreamsError> {
    let mut setup = connect_all(args, 1).await?.pop().ok_or(BenchStreamsError::Setup("no connection".into()))?;
    match setup.call(&[b"DEL", args.stream.as_bytes()]).await? {
        Reply::Int(_) => {}
        other => return Err(BenchStreamsError::Unexpected(setup.peer.clone(), "DEL", other.describe())),
    }
    let conns = connect_all(args, args.clients).await?;
    let (fill, fill_s) = run_xadds(args, conns, args.window, args.ops).await?;
    if fill.errors > 0 || fill.ok != args.ops {
        return Err(BenchStreamsError::Setup(format!(
            "pre-fill: {} of {} XADDs failed (first: {})",
            args.ops - fill.ok,
            args.ops,
            fill.first_error.unwrap_or_default()
        )));
    }
    match setup.call(&[b"XGROUP", b"CREATE", args.stream.as_bytes(), b"g", b"0"]).await? {
        Reply::Simple(_) => {}
        other => return Err(BenchStreamsError::Unexpected(setup.peer.clone(), "XGROUP CREATE", other.describe())),
    }
    let conns = connect_all(args, args.clients).await?;
    let acked = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let mut tasks = Vec::with_capacity(conns.len());
    for (i, conn) in conns.into_iter().enumerate() {
        tasks.push(tokio::spawn(consume(conn, args.stream.clone(), format!("c{i}"), acked.clone(), args.ops)));
    }
    let (mut lat, mut errors, mut first_error, mut done) = (Vec::new(), 0, None, 0);
    for t in tasks {
        let o = t.await.map_err(|e| BenchStreamsError::Join(e.to_string()))??;
        lat.extend(o.lat_us);
        errors += o.errors;
        done += o.acked;
        if first_error.is_none() {
            first_error = o.first_error;
        }
    }
    let seconds = started.elapsed().as_secs_f64();
    // Entries never acknowledged count as failed too.
    let missing = args.ops.saturating_sub(done);
    let mut r = report("consume-ack", lat, done, errors + missing, seconds);
    r.first_error = first_error;
    r.prefill_per_s = Some(fill.ok as f64 / fill_s.max(1e-9));
    Ok(r)
}

/// Runs one workload and returns its report.
pub async fn run(args: &BenchStreamsArgs) -> Result<Report, BenchStreamsError> {
    match args.workload.as_str() {
        "xadd-1" | "xadd-window" => {
            let (clients, window) = if args.workload == "xadd-1" { (1, 1) } else { (args.clients, args.window) };
            let conns = connect_all(args, clients).await?;
            let (o, seconds) = run_xadds(args, conns, window, args.ops).await?;
            let mut r = report(&args.workload, o.lat_us, o.ok, o.errors, seconds);
            r.first_error = o.first_error;
            Ok(r)
        }
        "consume-ack" => run_consume_ack(args).await,
        other => Err(BenchStreamsError::Setup(format!("unknown workload {other:?}"))),
    }
}

fn check(args: &BenchStreamsArgs) -> Result<(), String> {
    if !["xadd-1", "xadd-window", "consume-ack"].contains(&args.workload.as_str()) {
        return Err(format!("unknown workload {:?} (xadd-1, xadd-window, consume-ack)", args.workload));
    }
    if args.endpoints.is_empty() || args.endpoints.iter().any(String::is_empty) {
        return Err("need at least one endpoint".into());
    }
    if !(1..=MAX_CLIENTS).contains(&args.clients) {
        return Err(format!("--clients must be 1..={MAX_CLIENTS}"));
    }
    if !(1..=MAX_WINDOW).contains(&args.window) {
        return Err(format!("--window must be 1..={MAX_WINDOW}"));
    }
    if args.payload_bytes > MAX_PAYLOAD {
        return Err(format!("--payload-bytes must be at most {MAX_PAYLOAD}"));
    }
    if args.stream.is_empty() {
        return Err("--stream must not be empty".into());
    }
    Ok(())
}

/// Prints a run as text: `unit` names what was counted, `prefill` what a
/// consume run's pre-fill rate is of.
pub fn print_report(r: &Report, unit: &str, prefill: &str) {
    println!("{}: {} {unit} in {:.2}s, {} errors", r.workload, r.requests, r.seconds, r.errors);
    if let Some(e) = &r.first_error {
        println!("  first error: {e}");
    }
    println!("  throughput {:.1}/s", r.throughput_per_s);
    if let Some(p) = r.prefill_per_s {
        println!("  pre-fill {p:.1} {prefill}");
    }
    println!(
        "  latency ms: mean {:.3} p50 {:.3} p90 {:.3} p99 {:.3} p99.9 {:.3} max {:.3}",
        r.mean_ms, r.p50_ms, r.p90_ms, r.p99_ms, r.p999_ms, r.max_ms
    );
}

/// Runs `concord bench-streams ...`; returns the process exit code.
pub fn main(args: &[String]) -> i32 {
    let args = match BenchStreamsArgs::try_parse_from(
        std::iter::once("concord bench-streams".to_string()).chain(args.iter().cloned()),
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
            let unit = if r.workload == "consume-ack" { "entries consumed+acked" } else { "XADDs" };
            print_report(&r, unit, "XADDs/s; latency below is one XREADGROUP + XACK round");
            0
        }
        Err(e) => {
            eprintln!("Error: {e}");
            1
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_replies_and_waits_for_incomplete_ones() {
        let wire = b"+OK\r\n-ERR no\r\n:42\r\n$3\r\nabc\r\n$-1\r\n*-1\r\n*2\r\n$1\r\na\r\n:1\r\n";
        let mut at = 0;
        let mut got = Vec::new();
        while let Some((r, used)) = parse(&wire[at..]).expect("valid") {
            got.push(r);
            at += used;
        }
        assert_eq!(at, wire.len());
        assert_eq!(
            got,
            vec![
                Reply::Simple(b"OK".to_vec()),
                Reply::Error("ERR no".into()),
                Reply::Int(42),
                Reply::Bulk(Some(b"abc".to_vec())),
                Reply::Bulk(None),
                Reply::Array(None),
                Reply::Array(Some(vec![Reply::Bulk(Some(b"a".to_vec())), Reply::Int(1)])),
            ]
        );
        for cut in 0..wire.len() {
            // Every prefix parses to either nothing or a whole reply, never an error.
            assert!(parse(&wire[..cut]).is_ok());
        }
        assert_eq!(parse(b"$3\r\nab").expect("incomplete"), None);
    }

    #[test]
    fn rejects_bad_and_oversized_replies() {
        assert!(parse(b"?x\r\n").is_err());
        assert!(parse(b"$-2\r\n").is_err());
        assert!(parse(b"$3\r\nabcd\r\n").is_err());
        assert!(parse(format!("${}\r\n", MAX_BULK_BYTES + 1).as_bytes()).is_err());
        assert!(parse(format!("*{}\r\n", MAX_ARRAY_LEN + 1).as_bytes()).is_err());
        assert!(parse(&b"*1\r\n".repeat(MAX_DEPTH + 2)).is_err());
        assert!(parse(&vec![b'+'; MAX_LINE_BYTES + 8]).is_err());
    }

    #[test]
    fn encodes_commands_and_extracts_ids() {
        let mut out = Vec::new();
        encode(&mut out, &[b"XACK", b"s", b"g"]);
        assert_eq!(out, b"*3\r\n$4\r\nXACK\r\n$1\r\ns\r\n$1\r\ng\r\n");
        let entry = |id: &str| {
            Reply::Array(Some(vec![
                Reply::Bulk(Some(id.as_bytes().to_vec())),
                Reply::Array(Some(vec![Reply::Bulk(Some(b"p".to_vec())), Reply::Bulk(Some(b"x".to_vec()))])),
            ]))
        };
        let reply = Reply::Array(Some(vec![Reply::Array(Some(vec![
            Reply::Bulk(Some(b"s".to_vec())),
            Reply::Array(Some(vec![entry("1-0"), entry("1-1")])),
        ]))]));
        assert_eq!(entry_ids(&reply), Some(vec![b"1-0".to_vec(), b"1-1".to_vec()]));
        assert_eq!(entry_ids(&Reply::Array(None)), Some(Vec::new()));
        assert_eq!(entry_ids(&Reply::Int(1)), None);
    }
}
