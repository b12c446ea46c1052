//! The etcd `Watch` service.
//!
//! Design (why it is fair and bounded):
//! - One feed task per member reads each new revision's events from storage once
//!   (with their previous versions) into [`EventCache`], a ring of the most recent
//!   [`EVENT_CACHE_EVENTS`] events — only while the member has watchers; without
//!   any it skips the revisions (no reads, an empty ring), and a watcher created
//!   later reads anything older than its creation from storage.
//! - Every watcher is its own task that *pulls* the events after the revision it last
//!   delivered: from the ring when they are still there, otherwise from the stored
//!   history (etcd's "unsynced" path). There is no per-watcher event queue to grow:
//!   a watcher whose client does not read simply stops pulling and later catches up
//!   from history. Writes never wait for watchers, and one stalled watcher never
//!   delays another.
//! - Memory per stream is bounded by [`WATCH_STREAM_BUFFER`] responses of at most
//!   [`MAX_EVENTS_PER_RESPONSE`] events (never splitting a revision), plus one batch
//!   per watcher in flight. The number of watchers per stream is bounded by
//!   [`MAX_WATCHERS_PER_STREAM`].
//! - A watcher that falls behind the compaction point is canceled with
//!   `compact_revision`, as etcd does.
//!
//! Guarantees: events are delivered in revision order, without gaps or duplicates,
//! all events of one revision in one response (unless the client asked for
//! fragments), and a watch can resume from any revision not yet compacted — on any
//! member, since every member holds the same history.

use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use prost::Message;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use super::Node;
use crate::etcd_store::mvcc::events::{prev_kv, read_events};
use crate::etcd_store::mvcc::keys::KeyRange;
use crate::etcd_store::mvcc::{ReadView, Rev};
use crate::proto::etcdserverpb::watch_create_request::FilterType;
use crate::proto::etcdserverpb::watch_request::RequestUnion;
use crate::proto::etcdserverpb::watch_server::Watch;
use crate::proto::etcdserverpb::{ResponseHeader, WatchCreateRequest, WatchRequest, WatchResponse};
use crate::proto::mvccpb::{event::EventType, Event};

/// Responses buffered per stream before watchers wait for the client to read.
pub const WATCH_STREAM_BUFFER: usize = 128;
/// Events read from history per pull (a revision is never split).
pub const MAX_EVENTS_PER_RESPONSE: usize = 1000;
/// Watchers one stream may hold.
pub const MAX_WATCHERS_PER_STREAM: usize = 100_000;
/// Recent events kept in memory for synced watchers (older ones come from storage).
pub const EVENT_CACHE_EVENTS: usize = 20_000;

/// How etcd words a watch refused for lack of read permission (the gRPC error
/// rendered as text, which clients print).
const PERMISSION_DENIED_REASON: &str = "rpc error: code = PermissionDenied desc = etcdserver: permission denied";
const COMPACTED_REASON: &str = "etcdserver: mvcc: required revision has been compacted";

type Tx = mpsc::Sender<Result<WatchResponse, Status>>;

pub struct WatchService {
    pub node: Arc<Node>,
    pub cache: Arc<EventCache>,
    /// etcd `--experimental-watch-progress-notify-interval`.
    pub progress_interval: Duration,
}

struct WatcherHandle {
    task: JoinHandle<()>,
    /// Counts this watcher in `etcd_debugging_mvcc_watcher_total` while it exists.
    _gauge: super::metrics::GaugeGuard,
    /// Highest revision this watcher has fully delivered.
    delivered: Arc<AtomicI64>,
}

#[tonic::async_trait]
impl Watch for WatchService {
    type WatchStream = ReceiverStream<Result<WatchResponse, Status>>;

    async fn watch(&self, req: Request<Streaming<WatchRequest>>) -> Result<Response<Self::WatchStream>, Status> {
        let creds = super::auth::Credentials::of(&req);
        Ok(Response::new(self.open(creds, req.into_inner())))
    }
}

impl WatchService {
    /// Serves one watch stream fed by `inbound` (gRPC or the JSON gateway).
    pub fn open<S>(&self, creds: super::auth::Credentials, inbound: S) -> ReceiverStream<Result<WatchResponse, Status>>
    where
        S: futures::Stream<Item = Result<WatchRequest, Status>> + Unpin + Send + 'static,
    {
        let (tx, rx) = mpsc::channel(WATCH_STREAM_BUFFER);
        self.node.stats.watch_queues.lock().expect("stats lock poisoned").push(tx.downgrade());
        tokio::spawn(serve_stream(self.node.clone(), self.cache.clone(), self.progress_interval, creds, inbound, tx));
        ReceiverStream::new(rx)
    }
}

fn header(node: &Node, rev: Rev) -> Option<ResponseHeader> {
    let mut h = Some(ResponseHeader { revision: rev, ..Default::default() });
    node.fill_header(&mut h);
    h
}

fn current_rev(node: &Node) -> Rev {
    *node.group.revision.borrow()
}

/// The most recent events, read from storage once for all watchers.
pub struct EventCache {
    /// A std lock: held only to copy events in or out, never across an await.
    ring: std::sync::RwLock<Ring>,
    /// The last revision the ring covers; watchers wait on it.
    covered: tokio::sync::watch::Sender<Rev>,
    /// Watchers on this member. While zero the feed does not read events back
    /// (under a write load that was 8% of a member's CPU, for nobody).
    watchers: AtomicUsize,
    /// Wakes the feed when the first watcher registers. Without watchers the feed
    /// sleeps on this rather than on the revision: waking it on every write cost
    /// a task wake-up per apply batch, between the apply and the client's answer.
    first_watcher: tokio::sync::Notify,
}

/// Counts one watcher in [`EventCache::watchers`] while it exists.
struct Registered(Arc<EventCache>);

impl Drop for Registered {
    fn drop(&mut self) {
        self.0.watchers.fetch_sub(1, Ordering::AcqRel);
    }
}

struct Ring {
    /// Every event of revisions `first..=last` is in `events`.
    first: Rev,
    last: Rev,
    events: std::collections::VecDeque<(Rev, Event)>,
}

impl EventCache {
    /// An empty cache starting after the store's current revision, and its feed task.
    pub fn start(node: Arc<Node>, supervisor: &crate::supervisor::Supervisor) -> Arc<EventCache> {
        let rev = current_rev(&node);
        let (covered, _) = tokio::sync::watch::channel(rev);
        let cache = Arc::new(EventCache {
            ring: std::sync::RwLock::new(Ring { first: rev + 1, last: rev, events: Default::default() }),
            covered,
            watchers: AtomicUsize::new(0),
            first_watcher: tokio::sync::Notify::new(),
        });
        supervisor.spawn("watch-feed", cache.clone().feed(node));
        cache
    }

    async fn feed(self: Arc<Self>, node: Arc<Node>) {
        let mut rev_rx = node.group.revision.clone();
        loop {
            let current = *rev_rx.borrow_and_update();
            if self.watchers.load(Ordering::Acquire) == 0 {
                // A watcher registers before it reads `covered`, so one that missed
                // this check finds the ring restarted and reads storage instead.
                self.restart_if_behind(current);
                // Sleep until a watcher registers (one that raced the check above
                // left a permit), then restart after the revision reached meanwhile,
                // as the writes without watchers would have.
                self.first_watcher.notified().await;
                self.restart_if_behind(*rev_rx.borrow_and_update());
                continue;
            }
            let last = self.ring.read().expect("event cache poisoned").last;
            if current > last {
                match self.read_into(&node, last + 1) {
                    Ok(covered) => {
                        self.covered.send_replace(covered);
                        continue;
                    }
                    Err(e) => tracing::warn!("watch event cache: {e}"),
                }
            }
            if rev_rx.changed().await.is_err() {
                return;
            }
        }
    }

    /// Restarts the ring after `current` if it ends before it, and says it covers
    /// `current`.
    fn restart_if_behind(&self, current: Rev) {
        if current > self.ring.read().expect("event cache poisoned").last {
            self.restart_after(current);
            self.covered.send_replace(current);
        }
    }

    /// Empties the ring, which then starts after `rev`.
    fn restart_after(&self, rev: Rev) {
        let mut ring = self.ring.write().expect("event cache poisoned");
        ring.events.clear();
        ring.first = rev + 1;
        ring.last = rev;
    }

    fn register(self: &Arc<Self>) -> Registered {
        if self.watchers.fetch_add(1, Ordering::AcqRel) == 0 {
            self.first_watcher.notify_one();
        }
        Registered(self.clone())
    }

    fn read_into(&self, node: &Node, from: Rev) -> Result<Rev, String> {
        let view = ReadView::open(&node.group.backend, &node.group.index).map_err(|e| e.to_string())?;
        let mut ring = self.ring.write().expect("event cache poisoned");
        if from < view.compacted_rev() {
            // History this member never saw (a snapshot install): restart the ring;
            // watchers behind it take the storage path, which reports compaction.
            ring.events.clear();
            ring.first = view.current_rev() + 1;
            ring.last = view.current_rev();
            return Ok(ring.last);
        }
        let (raw, last) =
            read_events(&view, from, view.current_rev(), MAX_EVENTS_PER_RESPONSE).map_err(|e| e.to_string())?;
        for (rev, prev, mut ev) in raw {
            ev.prev_kv = prev_kv(&view, prev).map_err(|e| e.to_string())?;
            ring.events.push_back((rev, ev));
        }
        ring.last = last;
        while ring.events.len() > EVENT_CACHE_EVENTS {
            let Some((rev, _)) = ring.events.pop_front() else { break };
            // Drop the rest of that revision too: the ring holds whole revisions only.
            while ring.events.front().is_some_and(|(r, _)| *r == rev) {
                ring.events.pop_front();
            }
            ring.first = rev + 1;
        }
        Ok(last)
    }

    /// Events of revisions `next..` from the ring (whole revisions, at most about
    /// `MAX_EVENTS_PER_RESPONSE`), or `None` if `next` has left the ring.
    fn get(&self, next: Rev, filter: &Filter) -> Option<(Vec<Event>, Rev)> {
        let ring = self.ring.read().expect("event cache poisoned");
        if next < ring.first {
            return None;
        }
        let start = ring.events.partition_point(|(r, _)| *r < next);
        let mut out = Vec::new();
        let mut last = ring.last;
        let mut iter = ring.events.range(start..).enumerate().peekable();
        while let Some((taken, (rev, ev))) = iter.next() {
            if filter.accepts(ev) {
                let mut ev = ev.clone();
                if !filter.prev_kv {
                    ev.prev_kv = None;
                }
                out.push(ev);
            }
            // Stop once the budget is spent, but only at a revision boundary.
            if taken + 1 >= MAX_EVENTS_PER_RESPONSE && iter.peek().is_some_and(|(_, (r, _))| r != rev) {
                last = *rev;
                break;
            }
        }
        Some((out, last))
    }
}

async fn serve_stream<S>(
    node: Arc<Node>,
    cache: Arc<EventCache>,
    progress: Duration,
    creds: super::auth::Credentials,
    mut inbound: S,
    tx: Tx,
) where
    S: futures::Stream<Item = Result<WatchRequest, Status>> + Unpin,
{
    let _stream = super::metrics::GaugeGuard::new(node.stats.clone(), |s| &s.watch_streams);
    let mut watchers: HashMap<i64, WatcherHandle> = HashMap::new();
    let mut next_id: i64 = 0;
    loop {
        let msg = tokio::select! {
            m = futures::StreamExt::next(&mut inbound) => m.transpose(),
            _ = tx.closed() => break,
        };
        let req = match msg {
            Ok(Some(r)) => r,
            Ok(None) | Err(_) => break,
        };
        watchers.retain(|_, w| !w.task.is_finished());
        match req.request_union {
            Some(RequestUnion::CreateRequest(c)) => {
                let rev = current_rev(&node);
                let id = if c.watch_id != 0 {
                    c.watch_id
                } else {
                    while watchers.contains_key(&next_id) {
                        next_id += 1;
                    }
                    next_id
                };
                let refusal = if watchers.contains_key(&id) {
                    Some("mvcc: duplicate watch ID provided on the WatchStream".to_string())
                } else if watchers.len() >= MAX_WATCHERS_PER_STREAM {
                    Some(format!("concord: more than {MAX_WATCHERS_PER_STREAM} watchers on one stream"))
                } else {
                    // etcd's `isWatchPermitted`: read on the whole watched range; a
                    // refused watch is created and canceled at once.
                    let permitted = node
                        .caller(&creds)
                        .and_then(|caller| caller.check(&c.key, &c.range_end, crate::etcd_store::auth::Access::Read));
                    permitted.err().map(|_| PERMISSION_DENIED_REASON.to_string())
                };
                let created = WatchResponse {
                    header: header(&node, rev),
                    watch_id: id,
                    created: true,
                    canceled: refusal.is_some(),
                    cancel_reason: refusal.clone().unwrap_or_default(),
                    ..Default::default()
                };
                if tx.send(Ok(created)).await.is_err() {
                    break;
                }
                if refusal.is_none() {
                    let start = if c.start_revision > 0 { c.start_revision } else { rev + 1 };
                    let delivered = Arc::new(AtomicI64::new(start - 1));
                    let task = tokio::spawn(run_watcher(
                        node.clone(),
                        cache.clone(),
                        id,
                        c,
                        start,
                        progress,
                        delivered.clone(),
                        tx.clone(),
                    ));
                    let _gauge = super::metrics::GaugeGuard::new(node.stats.clone(), |s| &s.watchers);
                    watchers.insert(id, WatcherHandle { task, delivered, _gauge });
                }
            }
            Some(RequestUnion::CancelRequest(c)) => {
                if let Some(w) = watchers.remove(&c.watch_id) {
                    w.task.abort();
                    let resp = WatchResponse {
                        header: header(&node, current_rev(&node)),
                        watch_id: c.watch_id,
                        canceled: true,
                        ..Default::default()
                    };
                    if tx.send(Ok(resp)).await.is_err() {
                        break;
                    }
                }
            }
            Some(RequestUnion::ProgressRequest(_)) => {
                // Only a revision every watcher on the stream has fully delivered is
                // reported, so a client may treat it as "all events up to here seen".
                let rev = watchers
                    .values()
                    .map(|w| w.delivered.load(Ordering::Acquire))
                    .min()
                    .unwrap_or_else(|| current_rev(&node));
                let resp = WatchResponse { header: header(&node, rev), watch_id: -1, ..Default::default() };
                if tx.send(Ok(resp)).await.is_err() {
                    break;
                }
            }
            None => {}
        }
    }
    for (_, w) in watchers {
        w.task.abort();
    }
}

/// What to read for one watcher, and how to shape its events.
struct Filter {
    range: KeyRange,
    no_put: bool,
    no_delete: bool,
    prev_kv: bool,
}

impl Filter {
    fn accepts(&self, ev: &Event) -> bool {
        let key = ev.kv.as_ref().map(|kv| kv.key.as_slice()).unwrap_or_default();
        let is_put = ev.r#type == EventType::Put as i32;
        self.range.contains(key) && !((is_put && self.no_put) || (!is_put && self.no_delete))
    }

    fn new(c: &WatchCreateRequest) -> Self {
        let key = if c.key.is_empty() { vec![0] } else { c.key.clone() };
        Filter {
            range: KeyRange::new(&key, &c.range_end),
            no_put: c.filters.contains(&(FilterType::Noput as i32)),
            no_delete: c.filters.contains(&(FilterType::Nodelete as i32)),
            prev_kv: c.prev_kv,
        }
    }
}

enum Pull {
    Events(Vec<Event>, Rev),
    Compacted(Rev),
}

fn pull(node: &Node, filter: &Filter, next: Rev) -> Result<Pull, String> {
    let view = ReadView::open(&node.group.backend, &node.group.index).map_err(|e| e.to_string())?;
    if next < view.compacted_rev() {
        return Ok(Pull::Compacted(view.compacted_rev()));
    }
    let (raw, last) =
        read_events(&view, next, view.current_rev(), MAX_EVENTS_PER_RESPONSE).map_err(|e| e.to_string())?;
    let mut out = Vec::new();
    for (_, prev, mut ev) in raw {
        if !filter.accepts(&ev) {
            continue;
        }
        if filter.prev_kv {
            ev.prev_kv = prev_kv(&view, prev).map_err(|e| e.to_string())?;
        }
        out.push(ev);
    }
    Ok(Pull::Events(out, last))
}

/// Splits `events` into responses of at most `max_bytes` each (etcd's fragment
/// option); every response but the last is marked as a fragment.
fn fragments(base: WatchResponse, events: Vec<Event>, max_bytes: usize) -> Vec<WatchResponse> {
    let mut out = Vec::new();
    let mut cur = Vec::new();
    let mut size = base.encoded_len();
    for ev in events {
        let n = ev.encoded_len() + 4;
        if !cur.is_empty() && size + n > max_bytes {
            out.push(WatchResponse { events: std::mem::take(&mut cur), fragment: true, ..base.clone() });
            size = base.encoded_len();
        }
        size += n;
        cur.push(ev);
    }
    out.push(WatchResponse { events: cur, fragment: false, ..base });
    out
}

#[allow(clippy::too_many_arguments)]
async fn run_watcher(
    node: Arc<Node>,
    cache: Arc<EventCache>,
    id: i64,
    create: WatchCreateRequest,
    start: Rev,
    progress: Duration,
    delivered: Arc<AtomicI64>,
    tx: Tx,
) {
    let filter = Filter::new(&create);
    let _registered = cache.register();
    let mut rev_rx = cache.covered.subscribe();
    let mut next = start;
    // A watcher starting in the past reads storage (which reports compaction, as
    // etcd's unsynced watchers do) until it has caught up; then it reads the ring.
    let mut synced = start > *rev_rx.borrow();
    let mut ticker = tokio::time::interval(progress);
    ticker.tick().await;
    loop {
        let current = *rev_rx.borrow_and_update();
        if next <= current {
            let cached = if synced { cache.get(next, &filter) } else { None };
            let pulled = match cached {
                Some((events, last)) => Ok(Pull::Events(events, last)),
                None => pull(&node, &filter, next),
            };
            match pulled {
                Err(e) => {
                    let _ = tx.send(Err(Status::internal(format!("watch read failed: {e}")))).await;
                    return;
                }
                Ok(Pull::Compacted(compacted)) => {
                    let resp = WatchResponse {
                        header: header(&node, current),
                        watch_id: id,
                        canceled: true,
                        compact_revision: compacted,
                        cancel_reason: COMPACTED_REASON.to_string(),
                        ..Default::default()
                    };
                    let _ = tx.send(Ok(resp)).await;
                    return;
                }
                Ok(Pull::Events(events, last)) => {
                    if !events.is_empty() {
                        let base = WatchResponse { header: header(&node, last), watch_id: id, ..Default::default() };
                        let responses = if create.fragment {
                            fragments(base, events, node.config.max_request_bytes as usize)
                        } else {
                            vec![WatchResponse { events, ..base }]
                        };
                        for r in responses {
                            if tx.send(Ok(r)).await.is_err() {
                                return;
                            }
                        }
                    }
                    next = last + 1;
                    synced = next > current;
                    delivered.store(last, Ordering::Release);
                    continue;
                }
            }
        }
        delivered.store(current, Ordering::Release);
        tokio::select! {
            changed = rev_rx.changed() => {
                if changed.is_err() {
                    return;
                }
            }
            _ = ticker.tick(), if create.progress_notify => {
                let resp = WatchResponse { header: header(&node, current), watch_id: id, ..Default::default() };
                if tx.send(Ok(resp)).await.is_err() {
                    return;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::mvccpb::KeyValue;

    #[test]
    fn fragments_respect_the_size_limit_and_mark_all_but_last() {
        let ev = |n: usize| Event {
            kv: Some(KeyValue { value: vec![b'x'; n], ..Default::default() }),
            ..Default::default()
        };
        let base = WatchResponse { watch_id: 3, ..Default::default() };
        let parts = fragments(base.clone(), vec![ev(400), ev(400), ev(400)], 1000);
        assert_eq!(parts.len(), 2);
        assert!(parts[0].fragment && !parts[1].fragment);
        assert_eq!(parts.iter().map(|p| p.events.len()).sum::<usize>(), 3);
        assert!(parts.iter().all(|p| p.encoded_len() <= 1000 && p.watch_id == 3));
        let one = fragments(base, vec![ev(5000)], 1000);
        assert_eq!(one.len(), 1, "an event larger than the limit still travels, alone");
    }
}
