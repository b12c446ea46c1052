//! `concord queue ...`: the durable queues (`concord.queue.v1`, JetStream's model:
//! streams with durable pull consumers) from the command line — add, edit, inspect,
//! list and remove streams and consumers, publish, and fetch-and-acknowledge.
//!
//! Any member answers (it forwards to one holding the stream). A gRPC error prints
//! as `concord queue: <status message>` on stderr with exit code 1; a bad flag
//! exits 2.

mod show;

use std::io::{IsTerminal, Read};
use std::time::Duration;

use super::group::{connect, runtime};
use crate::proto::queue::queue_client::QueueClient;
use crate::proto::queue::{
    AckRequest, ConsumerConfig, ConsumerInfoRequest, CreateConsumerRequest, CreateStreamRequest, DeleteConsumerRequest,
    DeleteStreamRequest, DeliverPolicy, Discard, FetchRequest, Header, Lease, ListConsumersRequest, ListStreamsRequest,
    PublishRequest, PurgeRequest, Retention, StreamConfig, StreamInfoRequest,
};
use crate::server::config::parse_duration;
use clap::{Args, Parser, Subcommand};
use show::{
    consumer_json, consumer_text, deliver_name, human_size, parse_rfc3339_ms, retention_name, stream_json, stream_text,
    table,
};

/// Most messages one `pub --count` publishes.
const MAX_PUB_COUNT: u64 = 10_000_000;
/// Most messages one `sub` fetch asks for.
const MAX_FETCH_BATCH: u32 = 10_000;
/// Largest payload read from stdin.
const MAX_STDIN_BYTES: u64 = 64 * 1024 * 1024;

#[derive(Parser, Debug)]
#[command(name = "concord queue", about = "Durable queues: streams, consumers, publish, fetch and acknowledge")]
struct QueueArgs {
    /// Comma-separated client endpoints; the first that answers is used.
    #[arg(long, default_value = "127.0.0.1:2379", value_delimiter = ',', global = true)]
    endpoints: Vec<String>,
    /// Per-request timeout, in milliseconds (`sub` adds its --wait).
    #[arg(long, default_value_t = 5000, global = true)]
    timeout_ms: u64,
    #[command(subcommand)]
    command: Command,
}

/// Stream settings; on `edit`, those not given keep their values.
#[derive(Args, Debug, Default)]
struct StreamFlags {
    /// limits, workqueue or interest.
    #[arg(long)]
    retention: Option<String>,
    /// Messages kept at most (0: unlimited).
    #[arg(long)]
    max_msgs: Option<u64>,
    /// Bytes kept at most (0: unlimited; suffixes K, M, G, KiB, MiB, GiB).
    #[arg(long)]
    max_bytes: Option<String>,
    /// Oldest message kept (`1h`, `30s`, `500ms`; 0: unlimited).
    #[arg(long)]
    max_age: Option<String>,
    /// Largest message accepted (0: the server's limit).
    #[arg(long)]
    max_msg_size: Option<String>,
    /// What a full stream does: old (drop the oldest) or new (refuse the publish).
    #[arg(long)]
    discard: Option<String>,
    /// Window in which a repeated --msg-id is a duplicate (0: 2m).
    #[arg(long)]
    dupe_window: Option<String>,
    /// Stream that receives messages past max deliveries (empty: NAME.dlq).
    #[arg(long)]
    dead_letter: Option<String>,
}

/// The leases an `ack`/`nak`/`progress`/`term` acts on.
#[derive(Args, Debug)]
struct LeaseArgs {
    stream: String,
    consumer: String,
    /// Leases as SEQ:DELIVERIES (as `sub --no-ack` prints them).
    #[arg(required = true)]
    leases: Vec<String>,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Creates stream NAME.
    Add {
        name: String,
        #[command(flatten)]
        flags: StreamFlags,
    },
    /// Changes stream NAME's limits and retention.
    Edit {
        name: String,
        #[command(flatten)]
        flags: StreamFlags,
    },
    /// Shows stream NAME's configuration and state.
    Info {
        name: String,
        #[arg(long)]
        json: bool,
    },
    /// Lists the streams.
    Ls {
        #[arg(long)]
        json: bool,
    },
    /// Deletes stream NAME with its messages and consumers.
    Rm { name: String },
    /// Removes stream NAME's messages (those below --keep-from, or all).
    Purge {
        name: String,
        #[arg(long)]
        keep_from: Option<u64>,
    },
    /// Publishes PAYLOAD (or stdin when omitted and not a terminal) to stream NAME.
    Pub {
        name: String,
        payload: Option<String>,
        /// Idempotency key ({n} is replaced by the index with --count).
        #[arg(long)]
        msg_id: Option<String>,
        /// A header as key=value (repeatable).
        #[arg(long = "header", short = 'H')]
        headers: Vec<String>,
        /// Refused unless the stream's last sequence is this (+1 per message with --count).
        #[arg(long)]
        expect_last_seq: Option<u64>,
        /// Publishes N messages, {n} in the payload, headers and msg id replaced by 1..=N.
        #[arg(long)]
        count: Option<u64>,
    },
    /// Consumers of a stream.
    #[command(subcommand)]
    Consumer(ConsumerCommand),
    /// Fetches from a consumer, prints and acknowledges each message.
    Sub {
        stream: String,
        consumer: String,
        /// Messages asked for per fetch.
        #[arg(long, default_value_t = 10)]
        batch: u32,
        /// How long a fetch waits for a message; an empty fetch ends the loop.
        #[arg(long, default_value = "5s")]
        wait: String,
        /// Stops after this many messages.
        #[arg(long)]
        count: Option<u64>,
        /// Leaves the leases held (prints them as SEQ:DELIVERIES for `ack`).
        #[arg(long, conflicts_with_all = ["nak", "term"])]
        no_ack: bool,
        /// Naks instead of acking (redelivered at once).
        #[arg(long, conflicts_with = "term")]
        nak: bool,
        /// Terminates instead of acking (never redelivered).
        #[arg(long)]
        term: bool,
    },
    /// Acknowledges leases.
    Ack(LeaseArgs),
    /// Hands leases back for redelivery.
    Nak {
        #[command(flatten)]
        leases: LeaseArgs,
        /// Redeliver no sooner than this (`5s`).
        #[arg(long)]
        delay: Option<String>,
    },
    /// Extends leases by another ack wait.
    Progress(LeaseArgs),
    /// Terminates leases: the messages are never redelivered.
    Term(LeaseArgs),
}

#[derive(Subcommand, Debug)]
enum ConsumerCommand {
    /// Adds durable consumer NAME to STREAM.
    Add {
        stream: String,
        name: String,
        /// all, new, seq:N or time:RFC3339 (or time:MS since the epoch).
        #[arg(long, default_value = "all")]
        deliver: String,
        /// How long a lease lasts before redelivery (0: 30s).
        #[arg(long)]
        ack_wait: Option<String>,
        /// Deliveries before dead-lettering (0: 5).
        #[arg(long, default_value_t = 0)]
        max_deliver: u64,
        /// Leases outstanding at most (0: 1000).
        #[arg(long, default_value_t = 0)]
        max_ack_pending: u64,
    },
    /// Shows consumer NAME of STREAM.
    Info {
        stream: String,
        name: String,
        #[arg(long)]
        json: bool,
    },
    /// Lists STREAM's consumers.
    Ls {
        stream: String,
        #[arg(long)]
        json: bool,
    },
    /// Deletes consumer NAME of STREAM.
    Rm { stream: String, name: String },
}

/// Why a command failed: a bad argument (exit 2) or the server's answer (exit 1).
enum Failure {
    Usage(String),
    Server(String),
}

impl From<tonic::Status> for Failure {
    fn from(s: tonic::Status) -> Self {
        Failure::Server(s.message().to_string())
    }
}

fn usage(e: impl Into<String>) -> Failure {
    Failure::Usage(e.into())
}

/// A duration flag in milliseconds; "0" is 0 (unlimited or the default).
fn millis(flag: &str, s: &str) -> Result<u64, Failure> {
    if s.trim() == "0" {
        return Ok(0);
    }
    let d = parse_duration(s).map_err(|e| usage(format!("--{flag}: {e}")))?;
    Ok(u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// A size flag in bytes: a number with an optional K/M/G (1000s) or KiB/MiB/GiB suffix.
fn bytes(flag: &str, s: &str) -> Result<u64, Failure> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let scale: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" => 1000,
        "m" | "mb" => 1000 * 1000,
        "g" | "gb" => 1000 * 1000 * 1000,
        "kib" => 1 << 10,
        "mib" => 1 << 20,
        "gib" => 1 << 30,
        other => return Err(usage(format!("--{flag}: unknown unit {other:?}"))),
    };
    let n: u64 = num.parse().map_err(|_| usage(format!("--{flag}: {s:?} is not a size")))?;
    n.checked_mul(scale).ok_or_else(|| usage(format!("--{flag}: {s:?} is too large")))
}

/// Applies the given flags over `c` (a new config's defaults, or the stream's own).
fn apply(c: &mut StreamConfig, f: &StreamFlags) -> Result<(), Failure> {
    if let Some(r) = &f.retention {
        c.retention = match r.as_str() {
            "limits" => Retention::Limits,
            "workqueue" | "work-queue" => Retention::WorkQueue,
            "interest" => Retention::Interest,
            _ => return Err(usage(format!("--retention {r:?}: limits, workqueue or interest"))),
        } as i32;
    }
    if let Some(d) = &f.discard {
        c.discard = match d.as_str() {
            "old" => Discard::Old,
            "new" => Discard::New,
            _ => return Err(usage(format!("--discard {d:?}: old or new"))),
        } as i32;
    }
    if let Some(n) = f.max_msgs {
        c.max_msgs = n;
    }
    if let Some(s) = &f.max_bytes {
        c.max_bytes = bytes("max-bytes", s)?;
    }
    if let Some(s) = &f.max_age {
        c.max_age_ms = millis("max-age", s)?;
    }
    if let Some(s) = &f.max_msg_size {
        c.max_msg_bytes = bytes("max-msg-size", s)?;
    }
    if let Some(s) = &f.dupe_window {
        c.duplicate_window_ms = millis("dupe-window", s)?;
    }
    if let Some(s) = &f.dead_letter {
        c.dead_letter = s.clone();
    }
    Ok(())
}

/// `seq:N` or `seq:DELIVERIES` pairs for the ack verbs.
fn leases(args: &[String]) -> Result<Vec<Lease>, Failure> {
    args.iter()
        .map(|a| {
            let (s, d) = a.split_once(':').ok_or_else(|| usage(format!("lease {a:?}: expected SEQ:DELIVERIES")))?;
            match (s.parse(), d.parse()) {
                (Ok(seq), Ok(deliveries)) => Ok(Lease { seq, deliveries }),
                _ => Err(usage(format!("lease {a:?}: expected SEQ:DELIVERIES (numbers)"))),
            }
        })
        .collect()
}

/// `--deliver`: the policy, start sequence and start time.
fn deliver(s: &str) -> Result<(DeliverPolicy, u64, u64), Failure> {
    let bad = || usage(format!("--deliver {s:?}: all, new, seq:N or time:RFC3339|MS"));
    match s.split_once(':') {
        None if s == "all" => Ok((DeliverPolicy::All, 0, 0)),
        None if s == "new" => Ok((DeliverPolicy::New, 0, 0)),
        Some(("seq", n)) => Ok((DeliverPolicy::ByStartSeq, n.parse().map_err(|_| bad())?, 0)),
        Some(("time", t)) => {
            let ms = t.parse::<u64>().ok().or_else(|| parse_rfc3339_ms(t)).ok_or_else(bad)?;
            Ok((DeliverPolicy::ByStartTime, 0, ms))
        }
        _ => Err(bad()),
    }
}

/// The message bodies of `pub`: PAYLOAD, stdin when omitted and not a terminal, else empty.
fn payload(given: Option<String>) -> Result<Vec<u8>, Failure> {
    if let Some(p) = given {
        return Ok(p.into_bytes());
    }
    let stdin = std::io::stdin();
    if stdin.is_terminal() {
        return Ok(Vec::new());
    }
    let mut buf = Vec::new();
    stdin.lock().take(MAX_STDIN_BYTES + 1).read_to_end(&mut buf).map_err(|e| usage(format!("stdin: {e}")))?;
    if buf.len() as u64 > MAX_STDIN_BYTES {
        return Err(usage(format!("stdin holds more than {MAX_STDIN_BYTES} bytes")));
    }
    Ok(buf)
}

fn with_index(bytes: &[u8], n: u64) -> Vec<u8> {
    match std::str::from_utf8(bytes) {
        Ok(s) if s.contains("{n}") => s.replace("{n}", &n.to_string()).into_bytes(),
        _ => bytes.to_vec(),
    }
}

/// Runs `concord queue ...`; returns the process exit code.
pub fn main(args: &[String]) -> i32 {
    let args = match QueueArgs::try_parse_from(std::iter::once("concord queue".to_string()).chain(args.iter().cloned()))
    {
        Ok(a) => a,
        Err(e) => e.exit(),
    };
    match runtime().block_on(run(args)) {
        Ok(()) => 0,
        Err(Failure::Usage(e)) => {
            eprintln!("concord queue: {e}");
            2
        }
        Err(Failure::Server(e)) => {
            eprintln!("concord queue: {e}");
            1
        }
    }
}

async fn run(args: QueueArgs) -> Result<(), Failure> {
    let extra_ms = match &args.command {
        Command::Sub { wait, .. } => millis("wait", wait)?,
        _ => 0,
    };
    let timeout = Duration::from_millis(args.timeout_ms.max(1).saturating_add(extra_ms));
    let channel = connect(&args.endpoints, timeout).await.map_err(Failure::Server)?;
    let mut c = QueueClient::new(channel);
    match args.command {
        Command::Add { name, flags } => {
            let mut config = StreamConfig { name, ..Default::default() };
            apply(&mut config, &flags)?;
            let info = c.create_stream(CreateStreamRequest { config: Some(config) }).await?.into_inner();
            print!("{}", stream_text(&info));
        }
        Command::Edit { name, flags } => {
            let info = c.get_stream(StreamInfoRequest { name: name.clone() }).await?.into_inner();
            let mut config = info.config.unwrap_or_default();
            config.name = name;
            apply(&mut config, &flags)?;
            let info = c.update_stream(CreateStreamRequest { config: Some(config) }).await?.into_inner();
            print!("{}", stream_text(&info));
        }
        Command::Info { name, json } => {
            let info = c.get_stream(StreamInfoRequest { name }).await?.into_inner();
            if json {
                println!("{}", stream_json(&info));
            } else {
                print!("{}", stream_text(&info));
            }
        }
        Command::Ls { json } => {
            let streams = c.list_streams(ListStreamsRequest {}).await?.into_inner().streams;
            if json {
                println!("{}", serde_json::Value::Array(streams.iter().map(stream_json).collect()));
                return Ok(());
            }
            let rows: Vec<Vec<String>> = streams
                .iter()
                .map(|i| {
                    let (c, s) = (i.config.clone().unwrap_or_default(), i.state.unwrap_or_default());
                    vec![
                        c.name,
                        retention_name(c.retention).into(),
                        s.messages.to_string(),
                        human_size(s.bytes as i64),
                        s.first_seq.to_string(),
                        s.last_seq.to_string(),
                        s.consumers.to_string(),
                    ]
                })
                .collect();
            let header = ["NAME", "RETENTION", "MESSAGES", "BYTES", "FIRST", "LAST", "CONSUMERS"];
            print!("{}", table(&header, &rows));
        }
        Command::Rm { name } => {
            c.delete_stream(DeleteStreamRequest { name: name.clone() }).await?;
            println!("Stream {name} deleted");
        }
        Command::Purge { name, keep_from } => {
            let r = c.purge(PurgeRequest { name: name.clone(), keep_from_seq: keep_from.unwrap_or(0) }).await?;
            println!("Purged {} messages from {name}", r.into_inner().purged);
        }
        Command::Pub { name, payload: given, msg_id, headers, expect_last_seq, count } => {
            let numbered = count.is_some();
            let count = count.unwrap_or(1);
            if !(1..=MAX_PUB_COUNT).contains(&count) {
                return Err(usage(format!("--count must be 1..={MAX_PUB_COUNT}")));
            }
            let headers = headers
                .iter()
                .map(|h| match h.split_once('=') {
                    Some((k, v)) if !k.is_empty() => Ok(Header { key: k.into(), value: v.into() }),
                    _ => Err(usage(format!("--header {h:?}: expected key=value"))),
                })
                .collect::<Result<Vec<_>, _>>()?;
            let body = payload(given)?;
            for i in 0..count {
                let n = i + 1;
                let one = |s: &str| if numbered { s.replace("{n}", &n.to_string()) } else { s.to_string() };
                let request = PublishRequest {
                    stream: name.clone(),
                    payload: if numbered { with_index(&body, n) } else { body.clone() },
                    headers: headers.iter().map(|h| Header { key: h.key.clone(), value: one(&h.value) }).collect(),
                    msg_id: msg_id.as_deref().map(one).unwrap_or_default(),
                    expected_last_seq: expect_last_seq.map(|s| s.saturating_add(i)),
                };
                let ack = c.publish(request).await?.into_inner();
                println!("Published {} seq {}{}", ack.stream, ack.seq, if ack.duplicate { " (duplicate)" } else { "" });
            }
        }
        Command::Consumer(cmd) => consumer(&mut c, cmd).await?,
        Command::Sub { stream, consumer, batch, wait: _, count, no_ack, nak, term } => {
            if !(1..=MAX_FETCH_BATCH).contains(&batch) {
                return Err(usage(format!("--batch must be 1..={MAX_FETCH_BATCH}")));
            }
            let mut left = count.unwrap_or(u64::MAX);
            while left > 0 {
                let want = u32::try_from(left.min(u64::from(batch))).unwrap_or(batch);
                let request = FetchRequest {
                    stream: stream.clone(),
                    consumer: consumer.clone(),
                    batch: want,
                    max_wait_ms: extra_ms,
                };
                let got = c.fetch(request).await?.into_inner().deliveries;
                if got.is_empty() {
                    break;
                }
                left = left.saturating_sub(got.len() as u64);
                let mut held = Vec::with_capacity(got.len());
                for d in &got {
                    let m = d.message.clone().unwrap_or_default();
                    // One trailing newline (a payload piped from `echo`) is not shown.
                    let body = m.payload.strip_suffix(b"\n").unwrap_or(&m.payload);
                    println!("[seq {}, delivery {}] {}", m.seq, d.deliveries, String::from_utf8_lossy(body));
                    for h in &m.headers {
                        println!("  {}: {}", h.key, h.value);
                    }
                    if no_ack {
                        println!("  lease {}:{}", m.seq, d.deliveries);
                    }
                    held.push(Lease { seq: m.seq, deliveries: d.deliveries });
                }
                if no_ack {
                    continue;
                }
                let request = AckRequest {
                    stream: stream.clone(),
                    consumer: consumer.clone(),
                    leases: held.clone(),
                    delay_ms: 0,
                };
                let done = if nak {
                    c.nak(request).await?
                } else if term {
                    c.term(request).await?
                } else {
                    c.ack(request).await?
                };
                for (l, ok) in held.iter().zip(done.into_inner().done) {
                    if !ok {
                        eprintln!("concord queue: seq {} delivery {}: lease no longer held", l.seq, l.deliveries);
                    }
                }
            }
        }
        Command::Ack(a) => lease_verb(&mut c, "acked", a, 0).await?,
        Command::Nak { leases, delay } => {
            let delay_ms = match delay {
                Some(d) => millis("delay", &d)?,
                None => 0,
            };
            lease_verb(&mut c, "nakked", leases, delay_ms).await?
        }
        Command::Progress(a) => lease_verb(&mut c, "extended", a, 0).await?,
        Command::Term(a) => lease_verb(&mut c, "terminated", a, 0).await?,
    }
    Ok(())
}

type Client = QueueClient<tonic::transport::Channel>;

/// `ack`/`nak`/`progress`/`term`: acts on the leases, prints one line per lease.
async fn lease_verb(c: &mut Client, verb: &str, a: LeaseArgs, delay_ms: u64) -> Result<(), Failure> {
    let held = leases(&a.leases)?;
    let request = AckRequest { stream: a.stream, consumer: a.consumer, leases: held.clone(), delay_ms };
    let done = match verb {
        "acked" => c.ack(request).await?,
        "nakked" => c.nak(request).await?,
        "extended" => c.in_progress(request).await?,
        _ => c.term(request).await?,
    }
    .into_inner()
    .done;
    for (i, l) in held.iter().enumerate() {
        let state = if done.get(i).copied().unwrap_or(false) { verb } else { "not held" };
        println!("{}:{} {state}", l.seq, l.deliveries);
    }
    Ok(())
}

async fn consumer(c: &mut Client, cmd: ConsumerCommand) -> Result<(), Failure> {
    match cmd {
        ConsumerCommand::Add { stream, name, deliver: policy, ack_wait, max_deliver, max_ack_pending } => {
            let (policy, opt_start_seq, opt_start_time_ms) = deliver(&policy)?;
            let ack_wait_ms = match ack_wait {
                Some(w) => millis("ack-wait", &w)?,
                None => 0,
            };
            let config = ConsumerConfig {
                name,
                deliver_policy: policy as i32,
                opt_start_seq,
                opt_start_time_ms,
                ack_wait_ms,
                max_deliver,
                max_ack_pending,
            };
            let info = c.create_consumer(CreateConsumerRequest { stream, config: Some(config) }).await?.into_inner();
            print!("{}", consumer_text(&info));
        }
        ConsumerCommand::Info { stream, name, json } => {
            let info = c.get_consumer(ConsumerInfoRequest { stream, name }).await?.into_inner();
            if json {
                println!("{}", consumer_json(&info));
            } else {
                print!("{}", consumer_text(&info));
            }
        }
        ConsumerCommand::Ls { stream, json } => {
            let list = c.list_consumers(ListConsumersRequest { stream }).await?.into_inner().consumers;
            if json {
                println!("{}", serde_json::Value::Array(list.iter().map(consumer_json).collect()));
                return Ok(());
            }
            let rows: Vec<Vec<String>> = list
                .iter()
                .map(|i| {
                    let c = i.config.clone().unwrap_or_default();
                    vec![
                        c.name.clone(),
                        deliver_name(&c),
                        i.next_seq.to_string(),
                        i.num_pending.to_string(),
                        i.ack_pending.to_string(),
                        i.delivered.to_string(),
                        i.acked.to_string(),
                    ]
                })
                .collect();
            let header = ["NAME", "DELIVER", "NEXT", "PENDING", "ACK PENDING", "DELIVERED", "ACKED"];
            print!("{}", table(&header, &rows));
        }
        ConsumerCommand::Rm { stream, name } => {
            c.delete_consumer(DeleteConsumerRequest { stream: stream.clone(), name: name.clone() }).await?;
            println!("Consumer {name} of {stream} deleted");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_sizes_durations_and_leases() {
        assert!(matches!(bytes("x", "1KiB"), Ok(1024)));
        assert!(matches!(bytes("x", "2M"), Ok(2_000_000)));
        assert!(matches!(bytes("x", "12"), Ok(12)));
        assert!(bytes("x", "1 parsec").is_err());
        assert!(bytes("x", "99999999999999999999G").is_err());
        assert!(matches!(millis("x", "1h"), Ok(3_600_000)));
        assert!(matches!(millis("x", "500ms"), Ok(500)));
        assert!(matches!(millis("x", "0"), Ok(0)));
        assert!(millis("x", "soon").is_err());
        let l = leases(&["5:2".into(), "7:1".into()]).ok().unwrap_or_default();
        assert_eq!(l, vec![Lease { seq: 5, deliveries: 2 }, Lease { seq: 7, deliveries: 1 }]);
        assert!(leases(&["5".into()]).is_err());
    }

    #[test]
    fn parses_deliver_policies() {
        assert!(matches!(deliver("seq:10"), Ok((DeliverPolicy::ByStartSeq, 10, 0))));
        assert!(matches!(deliver("time:5000"), Ok((DeliverPolicy::ByStartTime, 0, 5000))));
        assert!(deliver("sometimes").is_err());
    }
}
