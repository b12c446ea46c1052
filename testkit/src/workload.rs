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

use etcd_client::{Client, Compare, CompareOp, ConnectOptions, GetOptions, LockOptions, Txn, TxnOp};

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

/// One event as a watcher saw it: (mod revision, key, value; `None` for a delete).
pub type WatchedEvent = (u64, String, Option<String>);

/// Watchers on a key prefix, each bound to one member, that resume after every
/// broken stream from the revision after the last one they saw; see
/// [`Watchers::finish`] and [`check_watches`].
pub struct Watchers {
    tasks: Vec<(usize, tokio::task::JoinHandle<Vec<WatchedEvent>>)>,
    target: tokio::sync::watch::Sender<u64>,
}

impl Watchers {
    /// Starts `per_endpoint` watchers on each endpoint, watching `prefix` from
    /// revision 1.
    pub fn start(endpoints: &[String], prefix: &str, per_endpoint: usize) -> Watchers {
        let (target, target_rx) = tokio::sync::watch::channel(u64::MAX);
        let mut tasks = Vec::new();
        for (m, endpoint) in endpoints.iter().enumerate() {
            for _ in 0..per_endpoint {
                let task = tokio::spawn(watch_one(endpoint.clone(), prefix.to_string(), target_rx.clone()));
                tasks.push((m, task));
            }
        }
        Watchers { tasks, target }
    }

    /// Lets every watcher run until it has seen `revision`, for at most `timeout`;
    /// returns each watcher's events, or which watchers (by member) fell short.
    pub async fn finish(self, revision: u64, timeout: Duration) -> Result<Vec<Vec<WatchedEvent>>, String> {
        self.target.send_replace(revision);
        let mut out = Vec::new();
        let mut stuck = Vec::new();
        let deadline = tokio::time::Instant::now() + timeout;
        for (m, mut task) in self.tasks {
            match tokio::time::timeout_at(deadline, &mut task).await {
                // Only up to the target: a straggling write may land later, seen by some.
                Ok(Ok(mut events)) => {
                    events.retain(|e| e.0 <= revision);
                    out.push(events);
                }
                Ok(Err(e)) => stuck.push(format!("watcher on member {m} failed: {e}")),
                Err(_) => {
                    task.abort();
                    stuck.push(format!("watcher on member {m} did not reach revision {revision}"));
                }
            }
        }
        if stuck.is_empty() {
            Ok(out)
        } else {
            Err(stuck.join("; "))
        }
    }
}

/// One watcher: (re)connects, resumes, and returns once it has seen the target.
async fn watch_one(
    endpoint: String,
    prefix: String,
    mut target: tokio::sync::watch::Receiver<u64>,
) -> Vec<WatchedEvent> {
    let mut events: Vec<WatchedEvent> = Vec::new();
    let mut next: u64 = 1;
    loop {
        if next > *target.borrow_and_update() {
            return events;
        }
        let opts = ConnectOptions::new().with_connect_timeout(Duration::from_secs(2));
        let Ok(mut client) = Client::connect([endpoint.as_str()], Some(opts)).await else {
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        };
        let wopts = etcd_client::WatchOptions::new().with_prefix().with_start_revision(next as i64);
        let Ok(Ok((_watcher, mut stream))) =
            tokio::time::timeout(Duration::from_secs(3), client.watch(prefix.as_str(), Some(wopts))).await
        else {
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        };
        loop {
            tokio::select! {
                msg = stream.message() => match msg {
                    Ok(Some(resp)) if !resp.canceled() => {
                        for ev in resp.events() {
                            let Some(kv) = ev.kv() else { continue };
                            let value = match ev.event_type() {
                                etcd_client::EventType::Put => Some(String::from_utf8_lossy(kv.value()).into_owned()),
                                etcd_client::EventType::Delete => None,
                            };
                            let rev = kv.mod_revision() as u64;
                            events.push((rev, String::from_utf8_lossy(kv.key()).into_owned(), value));
                            next = next.max(rev + 1);
                        }
                        if next > *target.borrow() {
                            return events;
                        }
                    }
                    // Canceled, ended or broken: resume on a new stream.
                    _ => break,
                },
                changed = target.changed() => {
                    if changed.is_err() || next > *target.borrow_and_update() {
                        return events;
                    }
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Every watcher must have seen the same events in the same order: revisions
/// never go back, no event twice, none missing compared with the others.
pub fn check_watches(streams: &[Vec<WatchedEvent>]) -> Result<(), String> {
    for (w, s) in streams.iter().enumerate() {
        if let Some(pair) = s.windows(2).find(|p| (p[1].0, &p[1].1) <= (p[0].0, &p[0].1)) {
            return Err(format!("watcher {w}: {:?} after {:?} (out of order or repeated)", pair[1], pair[0]));
        }
    }
    let Some(first) = streams.first() else { return Ok(()) };
    for (w, s) in streams.iter().enumerate().skip(1) {
        if s != first {
            let at = s.iter().zip(first).position(|(a, b)| a != b).unwrap_or(s.len().min(first.len()));
            return Err(format!(
                "watcher {w} differs from watcher 0 at event {at}: {:?} vs {:?} ({} vs {} events)",
                s.get(at),
                first.get(at),
                s.len(),
                first.len()
            ));
        }
    }
    Ok(())
}

/// A write to the shared resource made while holding the lock, guarded by the
/// lock key: it only takes effect if the key still exists with the creation
/// revision the holder was granted (its fencing token).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FencedWrite {
    pub client: usize,
    /// The lock key's create revision: etcd's fencing token for this holder.
    pub token: u64,
    /// Revision of the write.
    pub revision: u64,
}

/// What a [`locks`] run did.
#[derive(Clone, Debug, Default)]
pub struct LockRun {
    /// Fenced writes that took effect.
    pub writes: Vec<FencedWrite>,
    /// Times a client was granted the lock.
    pub acquired: usize,
    /// Fenced writes refused because the holder had lost the lock.
    pub fenced_off: usize,
}

/// Lock workload: `clients` clients (spread over `endpoints`) repeatedly take the
/// lock `name` on a short lease, write the resource twice under the fence and
/// unlock. Holders write twice so that two simultaneous holders would interleave.
/// The resource is `<name>.resource`, outside the lock's queue prefix `<name>/`
/// (a key under it would queue ahead of every waiter forever).
pub async fn locks(endpoints: Vec<String>, clients: usize, name: &str, duration: Duration) -> LockRun {
    let run: Arc<Mutex<LockRun>> = Arc::default();
    let deadline = Instant::now() + duration;
    let mut tasks = Vec::new();
    for c in 0..clients {
        let endpoint = endpoints[c % endpoints.len()].clone();
        let (run, name) = (run.clone(), name.to_string());
        tasks.push(tokio::spawn(async move {
            let t = Duration::from_secs(3);
            let opts = ConnectOptions::new().with_connect_timeout(t).with_timeout(t);
            while Instant::now() < deadline {
                let Ok(mut client) = Client::connect([endpoint.as_str()], Some(opts.clone())).await else {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    continue;
                };
                hold_once(&mut client, c, &name, &run).await;
            }
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
    let r = run.lock().expect("lock run");
    r.clone()
}

/// One lease, one lock acquisition, two fenced writes, unlock; any failure ends it.
async fn hold_once(client: &mut Client, c: usize, name: &str, run: &Mutex<LockRun>) -> Option<()> {
    let t = Duration::from_secs(5);
    let lease = tokio::time::timeout(t, client.lease_grant(2, None)).await.ok()?.ok()?.id();
    let acquired = tokio::time::timeout(t, client.lock(name, Some(LockOptions::new().with_lease(lease)))).await;
    let Ok(Ok(lock)) = acquired else {
        let _ = tokio::time::timeout(t, client.lease_revoke(lease)).await;
        return None;
    };
    let key = lock.key().to_vec();
    run.lock().expect("lock run").acquired += 1;
    let token =
        tokio::time::timeout(t, client.get(key.clone(), None)).await.ok()?.ok()?.kvs().first()?.create_revision();
    for _ in 0..2 {
        let txn = Txn::new()
            .when([Compare::create_revision(key.clone(), CompareOp::Equal, token)])
            .and_then([TxnOp::put(format!("{name}.resource"), format!("{c}:{token}"), None)]);
        let resp = tokio::time::timeout(t, client.txn(txn)).await.ok()?.ok()?;
        {
            let mut r = run.lock().expect("lock run");
            if resp.succeeded() {
                let revision = resp.header().map_or(0, |h| h.revision() as u64);
                r.writes.push(FencedWrite { client: c, token: token as u64, revision });
            } else {
                r.fenced_off += 1;
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let _ = tokio::time::timeout(t, client.unlock(key)).await;
    let _ = tokio::time::timeout(t, client.lease_revoke(lease)).await;
    Some(())
}

/// Mutual exclusion through fencing: in revision order, the tokens of the
/// writes that took effect never go back (once a later holder wrote, no
/// earlier holder writes again), and one token belongs to one client.
pub fn check_fencing(writes: &[FencedWrite]) -> Result<(), String> {
    let mut sorted = writes.to_vec();
    sorted.sort_by_key(|w| w.revision);
    if let Some(p) = sorted.windows(2).find(|p| p[1].token < p[0].token || p[1].revision == p[0].revision) {
        return Err(format!("lock held twice at once: {:?} after {:?}", p[1], p[0]));
    }
    let mut owner: HashMap<u64, usize> = HashMap::new();
    for w in &sorted {
        if *owner.entry(w.token).or_insert(w.client) != w.client {
            return Err(format!("token {} used by clients {} and {}", w.token, owner[&w.token], w.client));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(rev: u64, key: &str) -> WatchedEvent {
        (rev, key.to_string(), Some(format!("v{rev}")))
    }

    #[test]
    fn watchers_must_agree_on_ordered_complete_events() {
        let a = vec![ev(2, "a"), ev(3, "b"), ev(3, "c"), ev(4, "a")];
        assert!(check_watches(&[a.clone(), a.clone()]).is_ok());
        let mut gap = a.clone();
        gap.remove(1);
        assert!(check_watches(&[a.clone(), gap]).unwrap_err().contains("differs"));
        let mut dup = a.clone();
        dup.insert(1, ev(2, "a"));
        assert!(check_watches(&[dup]).unwrap_err().contains("out of order or repeated"));
        let back = vec![ev(3, "b"), ev(2, "a")];
        assert!(check_watches(&[back]).is_err());
    }

    #[test]
    fn fenced_writes_must_not_go_back_to_an_earlier_holder() {
        let w = |client, token, revision| FencedWrite { client, token, revision };
        assert!(check_fencing(&[w(0, 5, 6), w(0, 5, 7), w(1, 8, 9), w(1, 8, 10)]).is_ok());
        // Holder 5 writes again after holder 8 did: both held the lock at once.
        assert!(check_fencing(&[w(0, 5, 6), w(1, 8, 9), w(0, 5, 10)]).is_err());
        assert!(check_fencing(&[w(0, 5, 6), w(1, 5, 7)]).unwrap_err().contains("token 5"));
    }

    #[test]
    fn seeded_rng_replays() {
        let mut a = SeededRng::new(42);
        let mut b = SeededRng::new(42);
        let xs: Vec<u64> = (0..5).map(|_| a.below(1000)).collect();
        let ys: Vec<u64> = (0..5).map(|_| b.below(1000)).collect();
        assert_eq!(xs, ys);
        assert!(xs.iter().all(|&x| x < 1000));
    }
}
