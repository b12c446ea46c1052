//! The durable-queue service `concord.queue.v1` on the client port: streams of
//! messages with durable pull consumers ([`crate::streams::queue`] holds the
//! semantics), each stream a Raft group of its own placed like any stream (see
//! [`super::stream_place`]).
//!
//! Any member answers: it runs a call on its replica of the stream's group, or
//! forwards it (a node call) to a member holding one. A write is forwarded to
//! one member only, so a lost answer never makes it apply twice; reads may be
//! asked of several. A member running a write stamps it with its clock; every
//! replica applies the same decisions.
//!
//! Guarantees: a publish is answered once a quorum of the stream's replicas
//! fsynced it; reads are linearizable; a fetch's leases are replicated, so a
//! new leader redelivers only what ran out.
//!
//! Limits (named settings): `--queue-max-msg-bytes` (one message),
//! `--queue-max-batch` (messages one fetch leases), [`FETCH_MAX_BYTES`] (bytes
//! one fetch returns), [`MAX_FETCH_WAIT`] (how long a fetch waits).
//!
//! The queue keeper ([`run_keeper`]) runs on every member: for the stream
//! groups this member leads it proposes expiry (max-age, the dedup window)
//! when due, and moves dead letters to their dead-letter stream.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot};
use tonic::{Request, Response, Status};

use super::auth::Credentials;
use super::groups::GroupHost;
use super::stream_place::{Place, PlaceError, StreamPlacement};
use super::Node;
use crate::consensus::{ConsensusError, MemberId};
use crate::etcd_store::catalog::{self, ServiceKind, MAX_NAME_BYTES};
use crate::proto::queue as pb;
use crate::streams::queue::{self as q, PublishItem, QueueCommand, QueueError, QueueReply};
use crate::streams::{StreamError, StreamGroup};

/// Longest a fetch waits for a message.
pub const MAX_FETCH_WAIT: Duration = Duration::from_secs(60);

/// Most payload and header bytes one fetch returns (at least one message).
pub const FETCH_MAX_BYTES: u64 = 8 << 20;

/// Publishes waiting for a batch, per stream, on the member running them.
pub const PUBLISH_QUEUE: usize = 4_096;

/// Most publishes one batch (one log entry) carries.
pub const MAX_PUBLISH_BATCH: usize = 256;

/// Batches of one stream being committed at once, per member.
pub const PUBLISH_BATCHES_IN_FLIGHT: usize = 4;

/// How often the keeper looks at the stream groups this member leads.
const KEEPER_INTERVAL: Duration = Duration::from_secs(1);

/// Dead letters the keeper moves per stream per round.
const KEEPER_DEAD_BATCH: usize = 64;

fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// A queue operation, run on a member holding the stream (and sent there).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum QueueCall {
    Write(QueueCommand),
    Fetch { name: String, consumer: String, batch: u64, max_wait_ms: u64 },
    Stream(String),
    Consumer(String, String),
    Consumers(String),
    Message(String, u64),
}

impl QueueCall {
    fn name(&self) -> &str {
        match self {
            QueueCall::Write(cmd) => cmd.name(),
            QueueCall::Fetch { name, .. }
            | QueueCall::Stream(name)
            | QueueCall::Consumer(name, _)
            | QueueCall::Consumers(name)
            | QueueCall::Message(name, _) => name,
        }
    }

    fn is_read(&self) -> bool {
        matches!(
            self,
            QueueCall::Stream(_) | QueueCall::Consumer(..) | QueueCall::Consumers(_) | QueueCall::Message(..)
        )
    }
}

/// A consumer with the count of messages it has still to be delivered.
type ConsumerState = (q::Consumer, u64);

#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum QueueAnswer {
    Reply(QueueReply),
    /// A stream, and its first kept message's time (0 when empty).
    Stream(Option<q::QueueMeta>, u64),
    Consumers(Vec<ConsumerState>),
    Message(Option<q::Msg>),
}

/// Why a call failed, as a gRPC status code and message (kept across a forward).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum Failure {
    NotFound(String),
    Invalid(String),
    Exists(String),
    Precondition(String),
    Unavailable(String),
    Internal(String),
}

impl From<Failure> for Status {
    fn from(f: Failure) -> Status {
        match f {
            Failure::NotFound(m) => Status::not_found(m),
            Failure::Invalid(m) => Status::invalid_argument(m),
            Failure::Exists(m) => Status::already_exists(m),
            Failure::Precondition(m) => Status::failed_precondition(m),
            Failure::Unavailable(m) => Status::unavailable(m),
            Failure::Internal(m) => Status::internal(m),
        }
    }
}

fn refusal(e: QueueError) -> Failure {
    let m = e.to_string();
    match e {
        QueueError::StreamNotFound | QueueError::ConsumerNotFound => Failure::NotFound(m),
        QueueError::StreamExists | QueueError::ConsumerExists => Failure::Exists(m),
        QueueError::WrongLastSeq(_) | QueueError::MaxMsgs | QueueError::MaxBytes | QueueError::WorkQueueConsumers => {
            Failure::Precondition(m)
        }
        QueueError::MsgTooBig | QueueError::Invalid(_) => Failure::Invalid(m),
    }
}

fn stream_failure(e: StreamError) -> Failure {
    match e {
        StreamError::Consensus(ConsensusError::Fatal(m)) => Failure::Internal(format!("raft group stopped: {m}")),
        StreamError::Consensus(e) => Failure::Unavailable(e.to_string()),
        StreamError::Storage(m) => Failure::Internal(m),
    }
}

fn place_failure(e: PlaceError) -> Failure {
    match e {
        PlaceError::Failed(m) => Failure::Internal(m),
        PlaceError::Unavailable(m) => Failure::Unavailable(m),
    }
}

/// Stream and consumer names: printable, no spaces or wildcards (JetStream's rule).
fn check_name(what: &str, name: &str) -> Result<(), Failure> {
    let bad = name.is_empty()
        || name.len() > MAX_NAME_BYTES
        || name.chars().any(|c| c.is_whitespace() || c.is_control() || c == '*' || c == '>');
    match bad {
        true => Err(Failure::Invalid(format!("invalid {what} name: {name:?}"))),
        false => Ok(()),
    }
}

/// The service; also the target of forwarded calls.
pub struct QueueService {
    pub node: Arc<Node>,
    pub host: Arc<GroupHost>,
    /// Per stream this member has run publishes for: where they wait to be
    /// batched (see [`run_publisher`]).
    publishers: std::sync::Mutex<HashMap<String, mpsc::Sender<Waiting>>>,
}

/// A publish waiting for its batch, and where its reply goes.
type Waiting = (PublishItem, oneshot::Sender<Result<QueueReply, Failure>>);

impl QueueService {
    pub fn new(node: Arc<Node>, host: Arc<GroupHost>) -> QueueService {
        QueueService { node, host, publishers: Default::default() }
    }

    /// Publishes `cmd` through the stream's batcher on this member: publishes
    /// arriving while earlier batches are being committed share one log entry.
    async fn publish_batched(&self, g: &StreamGroup, cmd: QueueCommand) -> Result<QueueReply, Failure> {
        let QueueCommand::Publish { name, msg, msg_id, expected_last_seq, .. } = cmd else {
            return Err(Failure::Internal("concord: a batched publish that is no publish".into()));
        };
        let tx = {
            let mut publishers = self.publishers.lock().unwrap_or_else(|e| e.into_inner());
            let tx = publishers.entry(name.clone()).or_insert_with(|| {
                let (tx, rx) = mpsc::channel(PUBLISH_QUEUE);
                let batch_bytes = self.node.config.max_request_bytes;
                let max_msg_bytes = self.node.config.queue_max_msg_bytes;
                tokio::spawn(run_publisher(g.clone(), name.clone(), rx, self.timeout(), batch_bytes, max_msg_bytes));
                tx
            });
            tx.clone()
        };
        let (reply_tx, reply_rx) = oneshot::channel();
        let item = PublishItem { msg, msg_id, expected_last_seq };
        if tx.send((item, reply_tx)).await.is_err() {
            self.publishers.lock().unwrap_or_else(|e| e.into_inner()).remove(&name);
            return Err(Failure::Unavailable("concord: the stream's publisher stopped; publish again".into()));
        }
        let reply = reply_rx
            .await
            .map_err(|_| Failure::Unavailable("concord: the publish was dropped; publish again".into()))?;
        if matches!(reply, Err(Failure::Internal(_))) {
            // A replica that stopped: the next publish looks the stream up again.
            self.publishers.lock().unwrap_or_else(|e| e.into_inner()).remove(&name);
        }
        reply
    }

    fn timeout(&self) -> Duration {
        self.node.config.request_timeout()
    }

    /// With auth enabled, a call needs an etcd user's token (any user: queues
    /// have no per-stream permissions yet); etcd's error without one.
    fn authorize<T>(&self, req: &Request<T>) -> Result<(), Status> {
        let caller = self.node.caller(&Credentials::of(req))?;
        match (caller.state.enabled, caller.user) {
            (true, None) => Err(super::errors::from_auth(crate::etcd_store::auth::AuthError::UserEmpty)),
            _ => Ok(()),
        }
    }

    fn placement(&self) -> StreamPlacement<'_> {
        StreamPlacement { node: &self.node, host: &self.host, service: ServiceKind::Stream }
    }

    /// Runs `call` where stream `name` is; `create` makes the stream's group
    /// when it has none.
    pub async fn call(&self, call: QueueCall, create: bool) -> Result<QueueAnswer, Failure> {
        let name = call.name().to_string();
        match self.placement().place(name.as_bytes(), create, true).await.map_err(place_failure)? {
            Place::Here(g) => self.run_here(&g, call).await,
            Place::Missing => Err(Failure::NotFound(QueueError::StreamNotFound.to_string())),
            Place::Elsewhere(replicas) => self.forward(&replicas, call).await,
        }
    }

    async fn forward(&self, replicas: &[MemberId], call: QueueCall) -> Result<QueueAnswer, Failure> {
        let idempotent = call.is_read();
        let wait = match &call {
            QueueCall::Fetch { max_wait_ms, .. } => Duration::from_millis(*max_wait_ms).min(MAX_FETCH_WAIT),
            _ => Duration::ZERO,
        };
        // The member asked may first wait for its replica to start, then for
        // the commit: twice the request timeout, plus a fetch's own wait.
        let timeout = self.timeout() * 2 + wait;
        let body = super::stream_place::node_call(super::stream_place::NodeCall::Queue, &call)
            .map_err(|e| Failure::Internal(e.to_string()))?;
        let mut last = String::from("no replica");
        for member in self.placement().call_order(replicas, idempotent) {
            match self.node.group.call_node(member, body.clone(), timeout).await {
                Ok(bytes) => match crate::consensus::decode_bounded::<Result<QueueAnswer, Failure>>(&bytes) {
                    Ok((answer, _)) => return answer,
                    Err(e) => last = e.to_string(),
                },
                Err(e) => last = e,
            }
        }
        Err(Failure::Unavailable(match idempotent {
            true => format!("concord: no member holding the stream answered: {last}"),
            false => format!(
                "concord: the member holding the stream did not answer; the call may or may not have been applied: {last}"
            ),
        }))
    }

    /// A call forwarded here by another member.
    pub async fn run_forwarded(&self, call: QueueCall) -> Result<QueueAnswer, Failure> {
        let name = call.name().to_string();
        match self.placement().place(name.as_bytes(), false, true).await.map_err(place_failure)? {
            Place::Here(g) => self.run_here(&g, call).await,
            Place::Missing => Err(Failure::NotFound(QueueError::StreamNotFound.to_string())),
            Place::Elsewhere(_) => {
                Err(Failure::Unavailable("concord: a forwarded call reached a member without the stream".into()))
            }
        }
    }

    async fn run_here(&self, g: &StreamGroup, call: QueueCall) -> Result<QueueAnswer, Failure> {
        let timeout = self.timeout();
        let answer = match call {
            QueueCall::Write(mut cmd) => {
                stamp(&mut cmd, now_ms(), self.node.config.queue_max_msg_bytes);
                if matches!(cmd, QueueCommand::Publish { .. }) {
                    return self.publish_batched(g, cmd).await.map(QueueAnswer::Reply);
                }
                g.queue_write(cmd, timeout).await.map(QueueAnswer::Reply)
            }
            QueueCall::Fetch { name, consumer, batch, max_wait_ms } => {
                let batch = batch.clamp(1, self.node.config.queue_max_batch);
                let wait = Duration::from_millis(max_wait_ms).min(MAX_FETCH_WAIT);
                return fetch(g, &name, &consumer, batch, wait, timeout).await.map(QueueAnswer::Reply);
            }
            QueueCall::Stream(name) => {
                g.queue_read(timeout, true, |v| {
                    let meta = v.meta(&name)?;
                    let first_ts_ms = match &meta {
                        Some(m) if m.msgs > 0 => v.message(&name, m.first_seq)?.map_or(0, |msg| msg.ts_ms),
                        _ => 0,
                    };
                    Ok(QueueAnswer::Stream(meta, first_ts_ms))
                })
                .await
            }
            QueueCall::Consumer(name, consumer) => {
                g.queue_read(timeout, true, |v| Ok(consumers_answer(v.consumer_states(&name, Some(&consumer))?))).await
            }
            QueueCall::Consumers(name) => {
                g.queue_read(timeout, true, |v| Ok(consumers_answer(v.consumer_states(&name, None)?))).await
            }
            QueueCall::Message(name, seq) => {
                g.queue_read(timeout, true, |v| Ok(QueueAnswer::Message(v.message(&name, seq)?))).await
            }
        };
        answer.map_err(stream_failure)
    }

    async fn write(&self, cmd: QueueCommand, create: bool) -> Result<QueueReply, Status> {
        match self.call(QueueCall::Write(cmd), create).await? {
            QueueAnswer::Reply(QueueReply::Refused(e)) => Err(refusal(e).into()),
            QueueAnswer::Reply(r) => Ok(r),
            other => Err(Status::internal(format!("concord: unexpected answer {other:?}"))),
        }
    }

    async fn stream_info(&self, name: &str) -> Result<pb::StreamInfo, Status> {
        check_name("stream", name)?;
        match self.call(QueueCall::Stream(name.to_string()), false).await? {
            QueueAnswer::Stream(Some(meta), first_ts_ms) => {
                let mut info = self.info(&meta)?;
                if let Some(state) = info.state.as_mut() {
                    state.first_ts_ms = first_ts_ms;
                }
                Ok(info)
            }
            QueueAnswer::Stream(None, _) => Err(Failure::NotFound(QueueError::StreamNotFound.to_string()).into()),
            other => Err(Status::internal(format!("concord: unexpected answer {other:?}"))),
        }
    }

    /// A stream's info, with its group and replicas from the catalog as applied here.
    fn info(&self, meta: &q::QueueMeta) -> Result<pb::StreamInfo, Status> {
        let internal = |e: String| Status::internal(e);
        let txn = self.node.group.backend.begin_read().map_err(|e| internal(e.to_string()))?;
        let group = catalog::named(&txn, ServiceKind::Stream, meta.config.name.as_bytes())
            .map_err(|e| internal(e.to_string()))?
            .unwrap_or_default();
        let replicas = catalog::groups(&txn)
            .map_err(|e| internal(e.to_string()))?
            .into_iter()
            .find(|(id, _)| *id == group)
            .map(|(_, spec)| spec.replicas)
            .unwrap_or_default();
        Ok(stream_info(meta, group, replicas))
    }

    async fn consumers(&self, stream: &str, consumer: Option<&str>) -> Result<Vec<pb::ConsumerInfo>, Status> {
        check_name("stream", stream)?;
        let call = match consumer {
            Some(c) => QueueCall::Consumer(stream.to_string(), c.to_string()),
            None => QueueCall::Consumers(stream.to_string()),
        };
        match self.call(call, false).await? {
            QueueAnswer::Consumers(list) => Ok(list.iter().map(|(c, n)| consumer_info(stream, c, *n)).collect()),
            QueueAnswer::Stream(None, _) => Err(Failure::NotFound(QueueError::StreamNotFound.to_string()).into()),
            other => Err(Status::internal(format!("concord: unexpected answer {other:?}"))),
        }
    }

    async fn leases(
        &self,
        req: Request<pb::AckRequest>,
        action: q::LeaseAction,
    ) -> Result<Response<pb::AckResponse>, Status> {
        self.authorize(&req)?;
        let r = req.into_inner();
        check_name("stream", &r.stream)?;
        let leases = r.leases.iter().map(|l| (l.seq, l.deliveries)).collect();
        let action = match action {
            q::LeaseAction::Nak { .. } => q::LeaseAction::Nak { delay_ms: r.delay_ms },
            other => other,
        };
        let cmd = QueueCommand::Leases { name: r.stream, consumer: r.consumer, leases, action, now_ms: 0 };
        match self.write(cmd, false).await? {
            QueueReply::Done(done) => Ok(Response::new(pb::AckResponse { done })),
            other => Err(Status::internal(format!("concord: unexpected reply {other:?}"))),
        }
    }
}

fn consumers_answer(states: Option<Vec<ConsumerState>>) -> QueueAnswer {
    match states {
        Some(list) => QueueAnswer::Consumers(list),
        None => QueueAnswer::Stream(None, 0),
    }
}

/// Stamps a write with the clock of the member running it (and the server's
/// message size limit).
fn stamp(cmd: &mut QueueCommand, now: u64, max_msg_bytes: u64) {
    match cmd {
        QueueCommand::CreateStream { now_ms, .. }
        | QueueCommand::UpdateStream { now_ms, .. }
        | QueueCommand::CreateConsumer { now_ms, .. }
        | QueueCommand::Fetch { now_ms, .. }
        | QueueCommand::Leases { now_ms, .. }
        | QueueCommand::Expire { now_ms, .. } => *now_ms = now,
        QueueCommand::Publish { msg, max_msg_bytes: limit, .. } => {
            msg.ts_ms = now;
            *limit = max_msg_bytes;
        }
        QueueCommand::PublishBatch { items, max_msg_bytes: limit, .. } => {
            for item in items {
                item.msg.ts_ms = now;
            }
            *limit = max_msg_bytes;
        }
        QueueCommand::DeleteStream { .. }
        | QueueCommand::DeleteConsumer { .. }
        | QueueCommand::Purge { .. }
        | QueueCommand::ForgetDead { .. } => {}
    }
}

/// Publishes one stream's batches from this member: takes the publishes that
/// wait (at most [`MAX_PUBLISH_BATCH`] and `batch_bytes` of messages) into one
/// [`QueueCommand::PublishBatch`], with at most [`PUBLISH_BATCHES_IN_FLIGHT`]
/// batches being committed at once; while they are, the next batch fills.
/// Each publish is answered with its own reply once its batch committed, so a
/// publish is still acknowledged only after a quorum fsynced it.
async fn run_publisher(
    g: StreamGroup,
    name: String,
    mut rx: mpsc::Receiver<Waiting>,
    timeout: Duration,
    batch_bytes: u64,
    max_msg_bytes: u64,
) {
    let in_flight = Arc::new(tokio::sync::Semaphore::new(PUBLISH_BATCHES_IN_FLIGHT));
    while let Some(first) = rx.recv().await {
        let Ok(permit) = in_flight.clone().acquire_owned().await else { return };
        let mut bytes = first.0.msg.size();
        let mut batch = vec![first];
        while batch.len() < MAX_PUBLISH_BATCH && bytes < batch_bytes {
            match rx.try_recv() {
                Ok(w) => {
                    bytes += w.0.msg.size();
                    batch.push(w);
                }
                Err(_) => break,
            }
        }
        let (g, name) = (g.clone(), name.clone());
        tokio::spawn(async move {
            let _permit = permit;
            let (items, waiters): (Vec<PublishItem>, Vec<_>) = batch.into_iter().unzip();
            let cmd = QueueCommand::PublishBatch { name, items, max_msg_bytes };
            match g.queue_write(cmd, timeout).await {
                Ok(QueueReply::Batch(replies)) if replies.len() == waiters.len() => {
                    for (w, r) in waiters.into_iter().zip(replies) {
                        let _ = w.send(Ok(r));
                    }
                }
                Ok(other) => {
                    for w in waiters {
                        let _ = w.send(Err(Failure::Internal(format!("concord: unexpected reply {other:?}"))));
                    }
                }
                Err(e) => {
                    let failure = stream_failure(e);
                    for w in waiters {
                        let _ = w.send(Err(failure.clone()));
                    }
                }
            }
        });
    }
}

/// Leases up to `batch` messages, waiting up to `wait` for one: a fetch is
/// proposed only when this member's state shows something to deliver (or on
/// the first round when not waiting), and otherwise waits for an apply or the
/// next lease deadline.
async fn fetch(
    g: &StreamGroup,
    name: &str,
    consumer: &str,
    batch: u64,
    wait: Duration,
    timeout: Duration,
) -> Result<QueueReply, Failure> {
    let until = tokio::time::Instant::now() + wait;
    loop {
        // Subscribed before the look: no apply between the look and the wait is missed.
        let mut applied = g.applied();
        let now = now_ms();
        let (work, next_deadline) = g
            .queue_read(timeout, false, |v| Ok((v.has_work(name, consumer, now)?, v.next_deadline(name, consumer)?)))
            .await
            .map_err(stream_failure)?;
        if work || wait.is_zero() {
            let cmd = QueueCommand::Fetch { name: name.into(), consumer: consumer.into(), batch, now_ms: now_ms() };
            let reply = g.queue_write(cmd, timeout).await.map_err(stream_failure)?;
            match reply {
                QueueReply::Deliveries(d) if d.is_empty() && tokio::time::Instant::now() < until => {}
                other => return Ok(trim_bytes(other)),
            }
        }
        let now = tokio::time::Instant::now();
        if now >= until {
            return Ok(QueueReply::Deliveries(Vec::new()));
        }
        let wake = match next_deadline {
            Some(ms) => until.min(now + Duration::from_millis(ms.saturating_sub(now_ms()).max(1))),
            None => until,
        };
        tokio::select! {
            _ = applied.changed() => {}
            () = tokio::time::sleep_until(wake) => {}
        }
    }
}

/// A fetch reply as sent: the model leases `batch` messages, and the bytes
/// bound is the answer's (a lease not sent simply runs out and is redelivered).
fn trim_bytes(reply: QueueReply) -> QueueReply {
    let QueueReply::Deliveries(mut d) = reply else { return reply };
    let mut total = 0u64;
    let keep = d
        .iter()
        .position(|x| {
            total += x.msg.size();
            total > FETCH_MAX_BYTES
        })
        .map_or(d.len(), |i| i.max(1));
    d.truncate(keep);
    QueueReply::Deliveries(d)
}

/// Answers queue calls forwarded by other members (a node call).
pub struct ForwardedQueueCalls(pub std::sync::Weak<QueueService>);

impl crate::consensus::MemberCalls for ForwardedQueueCalls {
    fn call(&self, req: Vec<u8>) -> openraft::base::BoxFuture<'static, Result<Vec<u8>, String>> {
        let service = self.0.upgrade();
        Box::pin(async move {
            let service = service.ok_or("the queue service has stopped")?;
            let (call, _) = crate::consensus::decode_bounded::<QueueCall>(&req).map_err(|e| e.to_string())?;
            let answer = service.run_forwarded(call).await;
            bincode::serde::encode_to_vec(&answer, bincode::config::standard()).map_err(|e| e.to_string())
        })
    }
}

fn retention_to_pb(r: q::Retention) -> pb::Retention {
    match r {
        q::Retention::Limits => pb::Retention::Limits,
        q::Retention::WorkQueue => pb::Retention::WorkQueue,
        q::Retention::Interest => pb::Retention::Interest,
    }
}

fn config_from_pb(c: pb::StreamConfig) -> Result<q::QueueConfig, Status> {
    check_name("stream", &c.name)?;
    if !c.dead_letter.is_empty() {
        check_name("dead-letter stream", &c.dead_letter)?;
    }
    let retention = match pb::Retention::try_from(c.retention) {
        Ok(pb::Retention::Limits) => q::Retention::Limits,
        Ok(pb::Retention::WorkQueue) => q::Retention::WorkQueue,
        Ok(pb::Retention::Interest) => q::Retention::Interest,
        Err(_) => return Err(Status::invalid_argument(format!("invalid retention {}", c.retention))),
    };
    let discard = match pb::Discard::try_from(c.discard) {
        Ok(pb::Discard::Old) => q::Discard::Old,
        Ok(pb::Discard::New) => q::Discard::New,
        Err(_) => return Err(Status::invalid_argument(format!("invalid discard {}", c.discard))),
    };
    Ok(q::QueueConfig {
        name: c.name,
        retention,
        max_msgs: c.max_msgs,
        max_bytes: c.max_bytes,
        max_age_ms: c.max_age_ms,
        max_msg_bytes: c.max_msg_bytes,
        discard,
        duplicate_window_ms: c.duplicate_window_ms,
        dead_letter: c.dead_letter,
    })
}

fn config_to_pb(c: &q::QueueConfig) -> pb::StreamConfig {
    pb::StreamConfig {
        name: c.name.clone(),
        retention: retention_to_pb(c.retention) as i32,
        max_msgs: c.max_msgs,
        max_bytes: c.max_bytes,
        max_age_ms: c.max_age_ms,
        max_msg_bytes: c.max_msg_bytes,
        discard: match c.discard {
            q::Discard::Old => pb::Discard::Old,
            q::Discard::New => pb::Discard::New,
        } as i32,
        duplicate_window_ms: c.duplicate_window_ms(),
        dead_letter: c.dead_letter(),
    }
}

fn stream_info(meta: &q::QueueMeta, group: u64, replicas: Vec<u64>) -> pb::StreamInfo {
    pb::StreamInfo {
        config: Some(config_to_pb(&meta.config)),
        state: Some(pb::StreamState {
            messages: meta.msgs,
            bytes: meta.bytes,
            first_seq: if meta.msgs == 0 { 0 } else { meta.first_seq },
            last_seq: meta.last_seq,
            first_ts_ms: 0,
            last_ts_ms: meta.last_ts_ms,
            consumers: meta.consumers,
            dead_lettered: meta.dead_lettered,
            dead_waiting: meta.dead_waiting,
        }),
        created_ms: meta.created_ms,
        group,
        replicas,
    }
}

fn consumer_config_to_pb(c: &q::ConsumerConfig) -> pb::ConsumerConfig {
    let (policy, seq, time) = match c.deliver {
        q::DeliverPolicy::All => (pb::DeliverPolicy::All, 0, 0),
        q::DeliverPolicy::New => (pb::DeliverPolicy::New, 0, 0),
        q::DeliverPolicy::BySeq(s) => (pb::DeliverPolicy::ByStartSeq, s, 0),
        q::DeliverPolicy::ByTime(t) => (pb::DeliverPolicy::ByStartTime, 0, t),
    };
    pb::ConsumerConfig {
        name: c.name.clone(),
        deliver_policy: policy as i32,
        opt_start_seq: seq,
        opt_start_time_ms: time,
        ack_wait_ms: c.ack_wait_ms,
        max_deliver: c.max_deliver,
        max_ack_pending: c.max_ack_pending,
    }
}

fn consumer_info(stream: &str, c: &q::Consumer, num_pending: u64) -> pb::ConsumerInfo {
    pb::ConsumerInfo {
        stream: stream.to_string(),
        config: Some(consumer_config_to_pb(&c.config)),
        created_ms: c.created_ms,
        next_seq: c.next_seq,
        ack_pending: c.pending,
        num_pending,
        delivered: c.delivered,
        redelivered: c.redelivered,
        acked: c.acked,
        terminated: c.terminated,
        dead_lettered: c.dead_lettered,
    }
}

fn headers_from_pb(h: Vec<pb::Header>) -> Vec<(String, String)> {
    h.into_iter().map(|h| (h.key, h.value)).collect()
}

fn message_to_pb(seq: u64, m: q::Msg) -> pb::Message {
    pb::Message {
        seq,
        ts_ms: m.ts_ms,
        headers: m.headers.into_iter().map(|(key, value)| pb::Header { key, value }).collect(),
        payload: m.payload,
    }
}

#[tonic::async_trait]
impl pb::queue_server::Queue for Arc<QueueService> {
    async fn create_stream(&self, req: Request<pb::CreateStreamRequest>) -> Result<Response<pb::StreamInfo>, Status> {
        self.authorize(&req)?;
        let config = config_from_pb(req.into_inner().config.unwrap_or_default())?;
        match self.write(QueueCommand::CreateStream { config, now_ms: 0 }, true).await? {
            QueueReply::Stream(meta) => Ok(Response::new(self.info(&meta)?)),
            other => Err(Status::internal(format!("concord: unexpected reply {other:?}"))),
        }
    }

    async fn update_stream(&self, req: Request<pb::CreateStreamRequest>) -> Result<Response<pb::StreamInfo>, Status> {
        self.authorize(&req)?;
        let config = config_from_pb(req.into_inner().config.unwrap_or_default())?;
        match self.write(QueueCommand::UpdateStream { config, now_ms: 0 }, false).await? {
            QueueReply::Stream(meta) => Ok(Response::new(self.info(&meta)?)),
            other => Err(Status::internal(format!("concord: unexpected reply {other:?}"))),
        }
    }

    async fn delete_stream(
        &self,
        req: Request<pb::DeleteStreamRequest>,
    ) -> Result<Response<pb::DeleteStreamResponse>, Status> {
        self.authorize(&req)?;
        let name = req.into_inner().name;
        check_name("stream", &name)?;
        self.write(QueueCommand::DeleteStream { name }, false).await?;
        Ok(Response::new(pb::DeleteStreamResponse {}))
    }

    async fn get_stream(&self, req: Request<pb::StreamInfoRequest>) -> Result<Response<pb::StreamInfo>, Status> {
        self.authorize(&req)?;
        Ok(Response::new(self.stream_info(&req.into_inner().name).await?))
    }

    async fn list_streams(
        &self,
        req: Request<pb::ListStreamsRequest>,
    ) -> Result<Response<pb::ListStreamsResponse>, Status> {
        self.authorize(&req)?;
        let txn = self.node.linearizable_txn().await?;
        let names = catalog::names(&txn, ServiceKind::Stream).map_err(|e| Status::internal(e.to_string()))?;
        drop(txn);
        let mut streams = Vec::new();
        for (name, _) in names {
            let Ok(name) = String::from_utf8(name) else { continue };
            // A Redis stream's group holds no queue: skipped.
            match self.stream_info(&name).await {
                Ok(info) => streams.push(info),
                Err(s) if s.code() == tonic::Code::NotFound || s.code() == tonic::Code::InvalidArgument => {}
                Err(s) => return Err(s),
            }
        }
        Ok(Response::new(pb::ListStreamsResponse { streams }))
    }

    async fn purge(&self, req: Request<pb::PurgeRequest>) -> Result<Response<pb::PurgeResponse>, Status> {
        self.authorize(&req)?;
        let r = req.into_inner();
        check_name("stream", &r.name)?;
        match self.write(QueueCommand::Purge { name: r.name, keep_from_seq: r.keep_from_seq }, false).await? {
            QueueReply::Count(purged) => Ok(Response::new(pb::PurgeResponse { purged })),
            other => Err(Status::internal(format!("concord: unexpected reply {other:?}"))),
        }
    }

    async fn publish(&self, req: Request<pb::PublishRequest>) -> Result<Response<pb::PubAck>, Status> {
        self.authorize(&req)?;
        let r = req.into_inner();
        check_name("stream", &r.stream)?;
        if r.msg_id.len() > MAX_NAME_BYTES {
            return Err(Status::invalid_argument(format!("msg_id longer than {MAX_NAME_BYTES} bytes")));
        }
        let msg = q::Msg { ts_ms: 0, headers: headers_from_pb(r.headers), payload: r.payload };
        if msg.size() > self.node.config.queue_max_msg_bytes {
            return Err(refusal(QueueError::MsgTooBig).into());
        }
        let cmd = QueueCommand::Publish {
            name: r.stream.clone(),
            msg,
            msg_id: r.msg_id,
            expected_last_seq: r.expected_last_seq,
            max_msg_bytes: 0,
        };
        match self.write(cmd, false).await? {
            QueueReply::PubAck { seq, duplicate } => Ok(Response::new(pb::PubAck { stream: r.stream, seq, duplicate })),
            other => Err(Status::internal(format!("concord: unexpected reply {other:?}"))),
        }
    }

    async fn get_message(&self, req: Request<pb::GetMessageRequest>) -> Result<Response<pb::Message>, Status> {
        self.authorize(&req)?;
        let r = req.into_inner();
        check_name("stream", &r.stream)?;
        match self.call(QueueCall::Message(r.stream, r.seq), false).await? {
            QueueAnswer::Message(Some(m)) => Ok(Response::new(message_to_pb(r.seq, m))),
            QueueAnswer::Message(None) => Err(Status::not_found("no message found")),
            other => Err(Status::internal(format!("concord: unexpected answer {other:?}"))),
        }
    }

    async fn create_consumer(
        &self,
        req: Request<pb::CreateConsumerRequest>,
    ) -> Result<Response<pb::ConsumerInfo>, Status> {
        self.authorize(&req)?;
        let r = req.into_inner();
        check_name("stream", &r.stream)?;
        let c = r.config.unwrap_or_default();
        check_name("consumer", &c.name)?;
        let deliver = match pb::DeliverPolicy::try_from(c.deliver_policy) {
            Ok(pb::DeliverPolicy::All) => q::DeliverPolicy::All,
            Ok(pb::DeliverPolicy::New) => q::DeliverPolicy::New,
            Ok(pb::DeliverPolicy::ByStartSeq) => q::DeliverPolicy::BySeq(c.opt_start_seq),
            Ok(pb::DeliverPolicy::ByStartTime) => q::DeliverPolicy::ByTime(c.opt_start_time_ms),
            Err(_) => return Err(Status::invalid_argument(format!("invalid deliver policy {}", c.deliver_policy))),
        };
        let config = q::ConsumerConfig {
            name: c.name,
            deliver,
            ack_wait_ms: c.ack_wait_ms,
            max_deliver: c.max_deliver,
            max_ack_pending: c.max_ack_pending,
        };
        let stream = r.stream.clone();
        match self.write(QueueCommand::CreateConsumer { name: r.stream, config, now_ms: 0 }, false).await? {
            QueueReply::Consumer(c) => {
                let pending = self.consumers(&stream, Some(&c.config.name)).await?;
                Ok(Response::new(pending.into_iter().next().unwrap_or_else(|| consumer_info(&stream, &c, 0))))
            }
            other => Err(Status::internal(format!("concord: unexpected reply {other:?}"))),
        }
    }

    async fn delete_consumer(
        &self,
        req: Request<pb::DeleteConsumerRequest>,
    ) -> Result<Response<pb::DeleteConsumerResponse>, Status> {
        self.authorize(&req)?;
        let r = req.into_inner();
        check_name("stream", &r.stream)?;
        self.write(QueueCommand::DeleteConsumer { name: r.stream, consumer: r.name }, false).await?;
        Ok(Response::new(pb::DeleteConsumerResponse {}))
    }

    async fn get_consumer(&self, req: Request<pb::ConsumerInfoRequest>) -> Result<Response<pb::ConsumerInfo>, Status> {
        self.authorize(&req)?;
        let r = req.into_inner();
        match self.consumers(&r.stream, Some(&r.name)).await?.pop() {
            Some(c) => Ok(Response::new(c)),
            None => Err(refusal(QueueError::ConsumerNotFound).into()),
        }
    }

    async fn list_consumers(
        &self,
        req: Request<pb::ListConsumersRequest>,
    ) -> Result<Response<pb::ListConsumersResponse>, Status> {
        self.authorize(&req)?;
        let consumers = self.consumers(&req.into_inner().stream, None).await?;
        Ok(Response::new(pb::ListConsumersResponse { consumers }))
    }

    async fn fetch(&self, req: Request<pb::FetchRequest>) -> Result<Response<pb::FetchResponse>, Status> {
        self.authorize(&req)?;
        let r = req.into_inner();
        check_name("stream", &r.stream)?;
        let call = QueueCall::Fetch {
            name: r.stream,
            consumer: r.consumer,
            batch: u64::from(r.batch),
            max_wait_ms: r.max_wait_ms,
        };
        match self.call(call, false).await? {
            QueueAnswer::Reply(QueueReply::Deliveries(d)) => Ok(Response::new(pb::FetchResponse {
                deliveries: d
                    .into_iter()
                    .map(|d| pb::Delivery {
                        message: Some(message_to_pb(d.seq, d.msg)),
                        deliveries: d.deliveries,
                        deadline_ms: d.deadline_ms,
                    })
                    .collect(),
            })),
            QueueAnswer::Reply(QueueReply::Refused(e)) => Err(refusal(e).into()),
            other => Err(Status::internal(format!("concord: unexpected answer {other:?}"))),
        }
    }

    async fn ack(&self, req: Request<pb::AckRequest>) -> Result<Response<pb::AckResponse>, Status> {
        self.leases(req, q::LeaseAction::Ack).await
    }

    async fn nak(&self, req: Request<pb::AckRequest>) -> Result<Response<pb::AckResponse>, Status> {
        self.leases(req, q::LeaseAction::Nak { delay_ms: 0 }).await
    }

    async fn in_progress(&self, req: Request<pb::AckRequest>) -> Result<Response<pb::AckResponse>, Status> {
        self.leases(req, q::LeaseAction::InProgress).await
    }

    async fn term(&self, req: Request<pb::AckRequest>) -> Result<Response<pb::AckResponse>, Status> {
        self.leases(req, q::LeaseAction::Term).await
    }
}

/// The queue keeper: each round, for every stream group this member leads,
/// proposes expiry when something is due and moves dead letters to their
/// dead-letter stream (created when missing, limits retention). A move is a
/// publish with msg-id `dead:<stream>:<seq>:<consumer>`, then a
/// [`QueueCommand::ForgetDead`]: a crash between the two publishes again,
/// which the dead-letter stream's dedup window answers as a duplicate.
pub async fn run_keeper(service: Arc<QueueService>) {
    let mut tick = tokio::time::interval(KEEPER_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        for g in service.host.streams() {
            if g.group.metrics().current_leader != Some(service.node.member_id) {
                continue;
            }
            if let Err(e) = keep(&service, &g).await {
                tracing::debug!(group = g.group.id, "queue keeper: {e:?}");
            }
        }
    }
}

async fn keep(service: &QueueService, g: &StreamGroup) -> Result<(), Failure> {
    let timeout = service.timeout();
    let now = now_ms();
    let streams = g
        .queue_read(timeout, false, |v| {
            let mut out = Vec::new();
            for name in v.names()? {
                let expire = v.expirable(&name, now)?;
                let dead = v.dead(&name, KEEPER_DEAD_BATCH)?;
                let config = v.meta(&name)?.map(|m| m.config);
                out.push((name, expire, dead, config));
            }
            Ok(out)
        })
        .await
        .map_err(stream_failure)?;
    for (name, expire, dead, config) in streams {
        if expire {
            g.queue_write(QueueCommand::Expire { name: name.clone(), now_ms: now_ms() }, timeout)
                .await
                .map_err(stream_failure)?;
        }
        let (Some(config), false) = (config, dead.is_empty()) else { continue };
        let target = config.dead_letter();
        let create = q::QueueConfig { name: target.clone(), ..q::QueueConfig::default() };
        match service.call(QueueCall::Write(QueueCommand::CreateStream { config: create, now_ms: 0 }), true).await? {
            // An existing stream of another configuration is fine.
            QueueAnswer::Reply(QueueReply::Stream(_) | QueueReply::Refused(QueueError::StreamExists)) => {}
            QueueAnswer::Reply(QueueReply::Refused(e)) => return Err(refusal(e)),
            other => return Err(Failure::Internal(format!("unexpected answer {other:?}"))),
        }
        let mut moved = Vec::new();
        for d in dead {
            let mut headers = d.msg.headers.clone();
            headers.push(("Concord-Dead-Stream".into(), name.clone()));
            headers.push(("Concord-Dead-Seq".into(), d.seq.to_string()));
            headers.push(("Concord-Dead-Consumer".into(), d.consumer.clone()));
            headers.push(("Concord-Deliveries".into(), d.deliveries.to_string()));
            let cmd = QueueCommand::Publish {
                name: target.clone(),
                msg: q::Msg { ts_ms: 0, headers, payload: d.msg.payload.clone() },
                msg_id: format!("dead:{name}:{}:{}", d.seq, d.consumer),
                expected_last_seq: None,
                max_msg_bytes: 0,
            };
            match service.call(QueueCall::Write(cmd), false).await? {
                QueueAnswer::Reply(QueueReply::PubAck { .. }) => moved.push((d.seq, d.consumer)),
                // Refused by the dead-letter stream's limits: kept for a later round.
                QueueAnswer::Reply(QueueReply::Refused(e)) => {
                    tracing::warn!(stream = %name, "dead letter not moved to {target}: {e}");
                    break;
                }
                other => return Err(Failure::Internal(format!("unexpected answer {other:?}"))),
            }
        }
        if !moved.is_empty() {
            g.queue_write(QueueCommand::ForgetDead { name, entries: moved }, timeout).await.map_err(stream_failure)?;
        }
    }
    Ok(())
}
