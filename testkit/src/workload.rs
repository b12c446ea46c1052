//! Client workloads that record histories for the checkers.
//!
//! [`register`]: clients spread over the given endpoints (one member each, no
//! client-side failover) read, put and compare-and-swap small integer registers.
//! Every operation is recorded with invocation and completion times and the
//! response's revision. A write without an answer is indeterminate
//! ([`Outcome::Unknown`]); a read without an answer tells nothing and is left out;
//! a request refused at connect never reached a server and is left out too.
//!
//! Keys rotate: the clients use a fresh set of keys every `key_window`, so each
//! key's history stays short and holds few indeterminate writes (the search is
//! exponential in indeterminate writes that overlap on one key, which is what
//! Jepsen's independent keys are for).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use etcd_client::{Client, Compare, CompareOp, ConnectOptions, GetOptions, Txn, TxnOp};

use crate::linearizability::{Event, Op, Outcome};

/// SplitMix64: a tiny seeded generator, so a printed seed replays client choices.
#[derive(Clone, Debug)]
pub struct SeededRng(u64);

impl SeededRng {
    pub fn new(seed: u64) -> SeededRng {
        SeededRng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (n > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        assert!(n > 0, "empty range");
        self.next_u64() % n
    }
}

/// The seed of a test run: `CONCORD_TEST_SEED` if set, else a fresh one.
pub fn seed_from_env() -> u64 {
    std::env::var("CONCORD_TEST_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(|| {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(1, |d| d.as_nanos() as u64)
    })
}

/// Shape of a [`register`] run.
#[derive(Clone, Debug)]
pub struct RegisterConfig {
    /// Concurrent clients; client `c` talks to endpoint `c % endpoints.len()`.
    pub clients: usize,
    /// Keys in use at any time.
    pub keys: u64,
    /// How long one set of keys is used before the next.
    pub key_window: Duration,
    /// A request without an answer after this long is indeterminate.
    pub op_timeout: Duration,
    /// Read with `serializable` (member-local, may be stale): the negative control.
    pub serializable_reads: bool,
    pub duration: Duration,
}

impl Default for RegisterConfig {
    fn default() -> Self {
        RegisterConfig {
            clients: 6,
            keys: 3,
            key_window: Duration::from_secs(3),
            op_timeout: Duration::from_secs(2),
            serializable_reads: false,
            duration: Duration::from_secs(10),
        }
    }
}

/// A request refused at connect (the member is down) never reached a server.
fn never_sent(e: &etcd_client::Error) -> bool {
    e.to_string().contains("Connection refused")
}

/// Runs the register workload against `endpoints`; returns the history. Times
/// are nanoseconds since `epoch`.
pub async fn register(endpoints: Vec<String>, config: RegisterConfig, seed: u64, epoch: Instant) -> Vec<Event> {
    let history: Arc<Mutex<Vec<Event>>> = Arc::default();
    let deadline = Instant::now() + config.duration;
    let mut tasks = Vec::new();
    for c in 0..config.clients {
        let endpoint = endpoints[c % endpoints.len()].clone();
        let history = history.clone();
        let config = config.clone();
        let mut rng = SeededRng::new(seed ^ (c as u64).wrapping_mul(0xA24B_AED4_963E_E407));
        tasks.push(tokio::spawn(async move {
            let opts = ConnectOptions::new().with_connect_timeout(config.op_timeout).with_timeout(config.op_timeout);
            let Ok(mut client) = Client::connect([endpoint.as_str()], Some(opts)).await else {
                return;
            };
            let mut last_seen: HashMap<String, u64> = HashMap::new();
            let mut seq = 0u64;
            while Instant::now() < deadline {
                seq += 1;
                let window = epoch.elapsed().as_nanos() / config.key_window.as_nanos().max(1);
                let key = format!("reg/{window}/{}", rng.below(config.keys));
                let value = (c as u64 + 1) * 1_000_000_000 + seq;
                let invoked = epoch.elapsed().as_nanos() as u64;
                let Some((op, outcome, revision)) =
                    one_op(&mut client, &config, &mut rng, &key, value, &mut last_seen).await
                else {
                    continue;
                };
                let completed = epoch.elapsed().as_nanos() as u64;
                history.lock().expect("history lock").push(Event {
                    client: c,
                    key,
                    op,
                    outcome,
                    invoked,
                    completed,
                    revision,
                });
                if outcome == Outcome::Unknown {
                    // Back off: a stream of timed-out writes adds nothing but search cost.
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            }
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
    let h = history.lock().expect("history lock");
    h.clone()
}

/// One read, put or compare-and-swap; `None` if it is to be left out.
async fn one_op(
    client: &mut Client,
    config: &RegisterConfig,
    rng: &mut SeededRng,
    key: &str,
    value: u64,
    last_seen: &mut HashMap<String, u64>,
) -> Option<(Op, Outcome, u64)> {
    let t = config.op_timeout;
    match rng.below(3) {
        0 => {
            let opts = config.serializable_reads.then(|| GetOptions::new().with_serializable());
            let resp = tokio::time::timeout(t, client.get(key, opts)).await.ok()?.ok()?;
            let v = resp.kvs().first().and_then(|kv| kv.value_str().ok()?.parse::<u64>().ok());
            if let Some(v) = v {
                last_seen.insert(key.to_string(), v);
            }
            let revision = resp.header().map_or(0, |h| h.revision() as u64);
            Some((Op::Read, Outcome::Value(v), revision))
        }
        1 => {
            let op = Op::Write(value);
            match tokio::time::timeout(t, client.put(key, value.to_string(), None)).await {
                Ok(Ok(resp)) => {
                    last_seen.insert(key.to_string(), value);
                    Some((op, Outcome::Written, resp.header().map_or(0, |h| h.revision() as u64)))
                }
                Ok(Err(e)) if never_sent(&e) => None,
                _ => Some((op, Outcome::Unknown, 0)),
            }
        }
        _ => {
            let expect = last_seen.get(key).copied().unwrap_or(0);
            let op = Op::Cas { expect, new: value };
            let txn = Txn::new()
                .when([Compare::value(key, CompareOp::Equal, expect.to_string())])
                .and_then([TxnOp::put(key, value.to_string(), None)]);
            match tokio::time::timeout(t, client.txn(txn)).await {
                Ok(Ok(resp)) => {
                    if resp.succeeded() {
                        last_seen.insert(key.to_string(), value);
                    }
                    let revision = resp.header().map_or(0, |h| h.revision() as u64);
                    Some((op, Outcome::Swapped(resp.succeeded()), revision))
                }
                Ok(Err(e)) if never_sent(&e) => None,
                _ => Some((op, Outcome::Unknown, 0)),
            }
        }
    }
}
