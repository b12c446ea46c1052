//! A durable work queue under the nemesis (partitions, one-way blocks, packet
//! loss, SIGSTOP, kill -9; members in network namespaces, so it needs root):
//! publishers retry each message with its msg-id until acknowledged, fetchers
//! lease, acknowledge and record. Afterwards the queue is drained and checked:
//! - every acknowledged publish has one sequence (its retries were duplicates);
//! - every sequence the stream assigned was acknowledged by a fetcher exactly
//!   once (nothing lost, nothing acknowledged twice), so in a work queue no
//!   message left without an acknowledgement;
//! - the stream ends empty, with no lease outstanding.
//!
//! The checker's own negative control runs on a doctored copy of the history
//! (one acknowledgement dropped, one doubled): it must object to both. A
//! control that makes the server acknowledge before fsync needs a power cut
//! (un-synced writes survive kill -9 in the page cache): the power-cut harness
//! is the reliability issue's.
//!
//! The test prints its seed (`CONCORD_TEST_SEED` replays the nemesis schedule).

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use concord::proto::queue as pb;
use concord::proto::queue::queue_client::QueueClient;
use concord_testkit::nemesis::{self, Options};
use concord_testkit::workload::seed_from_env;
use concord_testkit::{netns, ClusterOptions, ProcessCluster};
use tonic::transport::Channel;

const STREAM: &str = "work";
const CONSUMER: &str = "workers";

/// What the clients saw.
#[derive(Default, Clone)]
struct History {
    /// msg-id → sequences its publish was acknowledged with (retries included).
    published: BTreeMap<String, BTreeSet<u64>>,
    /// Sequences whose acknowledgement the server confirmed (`done`), in order.
    acked: Vec<u64>,
    /// Sequences of acknowledgements that got no answer: applied or not.
    uncertain: BTreeSet<u64>,
}

/// The checks of the module doc, given the stream's last sequence.
fn check(h: &History, last_seq: u64) -> Result<(), String> {
    for (id, seqs) in &h.published {
        if seqs.len() != 1 {
            return Err(format!("msg-id {id} was acknowledged with sequences {seqs:?}"));
        }
    }
    let mut seen = BTreeSet::new();
    for seq in &h.acked {
        if !seen.insert(*seq) {
            return Err(format!("sequence {seq} was acknowledged twice"));
        }
    }
    // An unanswered acknowledgement may have been applied: such a sequence counts
    // as acknowledged once when no confirmed one exists.
    let covered: BTreeSet<u64> = seen.union(&h.uncertain).copied().collect();
    let seen = covered;
    if let Some(missing) = (1..=last_seq).find(|s| !seen.contains(s)) {
        return Err(format!("sequence {missing} of 1..={last_seq} was never acknowledged (lost)"));
    }
    if let Some(extra) = seen.iter().find(|s| **s > last_seq) {
        return Err(format!("sequence {extra} acknowledged beyond the last sequence {last_seq}"));
    }
    let published: BTreeSet<u64> = h.published.values().flatten().copied().collect();
    if let Some(lost) = published.iter().find(|s| !seen.contains(s)) {
        return Err(format!("acknowledged publish at sequence {lost} was never delivered"));
    }
    Ok(())
}

async fn connect(endpoint: &str) -> Option<QueueClient<Channel>> {
    let channel = tonic::transport::Endpoint::from_shared(endpoint.to_string())
        .ok()?
        .connect_timeout(Duration::from_secs(1))
        .timeout(Duration::from_secs(5));
    channel.connect().await.ok().map(QueueClient::new)
}

async fn publisher(endpoints: Vec<String>, p: usize, stop: Arc<std::sync::atomic::AtomicBool>, h: Arc<Mutex<History>>) {
    let mut which = p;
    let mut client = None;
    let mut i = 0u64;
    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
        let id = format!("p{p}-{i}");
        let c = match client.as_mut() {
            Some(c) => c,
            None => match connect(&endpoints[which % endpoints.len()]).await {
                Some(c) => client.insert(c),
                None => {
                    which += 1;
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let req = pb::PublishRequest {
            stream: STREAM.into(),
            payload: id.clone().into_bytes(),
            msg_id: id.clone(),
            ..Default::default()
        };
        match c.publish(req).await {
            Ok(ack) => {
                h.lock().expect("lock").published.entry(id).or_default().insert(ack.into_inner().seq);
                i += 1;
            }
            // The same msg-id again, maybe through another member.
            Err(_) => {
                client = None;
                which += 1;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// Fetches, acknowledges and records until `stop`.
async fn fetcher(endpoints: Vec<String>, f: usize, stop: Arc<std::sync::atomic::AtomicBool>, h: Arc<Mutex<History>>) {
    let mut which = f;
    let mut client = None;
    loop {
        if stop.load(std::sync::atomic::Ordering::Relaxed) {
            return;
        }
        let c = match client.as_mut() {
            Some(c) => c,
            None => match connect(&endpoints[which % endpoints.len()]).await {
                Some(c) => client.insert(c),
                None => {
                    which += 1;
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let req = pb::FetchRequest { stream: STREAM.into(), consumer: CONSUMER.into(), batch: 16, max_wait_ms: 300 };
        let leases: Vec<pb::Lease> = match c.fetch(req).await {
            Ok(r) => r
                .into_inner()
                .deliveries
                .iter()
                .map(|d| pb::Lease { seq: d.message.as_ref().map_or(0, |m| m.seq), deliveries: d.deliveries })
                .collect(),
            Err(_) => {
                client = None;
                which += 1;
                continue;
            }
        };
        if leases.is_empty() {
            continue;
        }
        let req =
            pb::AckRequest { stream: STREAM.into(), consumer: CONSUMER.into(), leases: leases.clone(), delay_ms: 0 };
        match c.ack(req).await {
            Ok(r) => {
                let mut h = h.lock().expect("lock");
                for (l, done) in leases.iter().zip(r.into_inner().done) {
                    if done {
                        h.acked.push(l.seq);
                    }
                }
            }
            // Unknown outcome: applied (the messages are gone) or not (the leases
            // run out and the messages come back).
            Err(_) => {
                h.lock().expect("lock").uncertain.extend(leases.iter().map(|l| l.seq));
                client = None;
                which += 1;
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn work_queue_under_nemesis_loses_nothing_and_acknowledges_once() {
    if let Some(why) = netns::unavailable() {
        panic!("fault tests need network namespaces: {why}");
    }
    let seed = seed_from_env();
    println!("seed {seed} (CONCORD_TEST_SEED={seed} replays the nemesis schedule)");
    let options = ClusterOptions { netns: true, ..ClusterOptions::default() };
    let mut cluster = ProcessCluster::start(Path::new(env!("CARGO_BIN_EXE_concord")), 3, options);
    cluster.wait_leader(Duration::from_secs(30)).await;
    let endpoints = cluster.endpoints();
    let mut c = connect(&endpoints[0]).await.expect("connect");
    let config =
        pb::StreamConfig { name: STREAM.into(), retention: pb::Retention::WorkQueue as i32, ..Default::default() };
    c.create_stream(pb::CreateStreamRequest { config: Some(config) }).await.expect("create stream");
    // Leases run out quickly, so the drain does not wait long; no dead letters.
    let consumer =
        pb::ConsumerConfig { name: CONSUMER.into(), ack_wait_ms: 2_000, max_deliver: 1_000_000, ..Default::default() };
    c.create_consumer(pb::CreateConsumerRequest { stream: STREAM.into(), config: Some(consumer) })
        .await
        .expect("consumer");

    let history = Arc::new(Mutex::new(History::default()));
    let stop_pub = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stop_fetch = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut tasks = Vec::new();
    for p in 0..3 {
        tasks.push(tokio::spawn(publisher(endpoints.clone(), p, stop_pub.clone(), history.clone())));
    }
    let mut fetchers = Vec::new();
    for f in 0..3 {
        fetchers.push(tokio::spawn(fetcher(endpoints.clone(), f, stop_fetch.clone(), history.clone())));
    }
    let epoch = Instant::now();
    let report = nemesis::run(&mut cluster, seed, Duration::from_secs(40), epoch, &Options::default()).await;
    stop_pub.store(true, std::sync::atomic::Ordering::Relaxed);
    for t in tasks {
        t.await.expect("publisher");
    }
    // Drain: until the stream is empty with no lease outstanding.
    let deadline = Instant::now() + Duration::from_secs(60);
    let last_seq = loop {
        let info = match connect(&endpoints[0]).await {
            Some(mut c) => {
                c.get_stream(pb::StreamInfoRequest { name: STREAM.into() }).await.ok().map(|r| r.into_inner())
            }
            None => None,
        };
        let consumer = match connect(&endpoints[0]).await {
            Some(mut c) => c
                .get_consumer(pb::ConsumerInfoRequest { stream: STREAM.into(), name: CONSUMER.into() })
                .await
                .ok()
                .map(|r| r.into_inner()),
            None => None,
        };
        if let (Some(info), Some(consumer)) = (info, consumer) {
            let s = info.state.unwrap_or_default();
            if s.messages == 0 && consumer.ack_pending == 0 {
                break s.last_seq;
            }
        }
        assert!(Instant::now() < deadline, "seed {seed}: the queue did not drain within 60 s");
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    stop_fetch.store(true, std::sync::atomic::Ordering::Relaxed);
    for f in fetchers {
        f.await.expect("fetcher");
    }
    let crashed = cluster.crashed();
    if !crashed.is_empty() {
        cluster.dump_logs();
        panic!("seed {seed}: members exited by themselves: {crashed:?}");
    }
    let h = history.lock().expect("lock").clone();
    let verdict = check(&h, last_seq);
    println!(
        "queue nemesis: runs 1, publishes acknowledged {}, sequences {last_seq}, acknowledgements {}, faults {}, violations {}",
        h.published.len(),
        h.acked.len(),
        report.faults.len(),
        usize::from(verdict.is_err())
    );
    assert!(report.faults.len() >= 5, "the nemesis injected too few faults: {:?}", report.faults);
    assert!(h.published.len() > 200, "the workload made too little progress: {} publishes", h.published.len());
    if let Err(v) = verdict {
        cluster.dump_logs();
        panic!("seed {seed}: {v}");
    }
    // The negative control: the same history with one acknowledgement dropped,
    // and with one doubled, must fail the check.
    let mut dropped = h.clone();
    dropped.acked.remove(dropped.acked.len() / 2);
    assert!(check(&dropped, last_seq).is_err(), "a lost message was not detected");
    let mut doubled = h.clone();
    doubled.acked.push(doubled.acked[0]);
    assert!(check(&doubled, last_seq).is_err(), "a double acknowledgement was not detected");
}
