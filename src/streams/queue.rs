//! Durable queues (the JetStream model) over the stream service's table: what
//! each queue write does, and the reads. Pure logic like [`super::model`]: a
//! write carries the proposer's `now_ms`, so every member applying it takes
//! the same decisions (expiry, lease deadlines, redelivery, dead-lettering).
//!
//! What it guarantees:
//! - Sequences are gapless: each publish that is not a duplicate takes the
//!   next one, whether or not the message is kept (an interest stream without
//!   consumers keeps nothing).
//! - A fetch is a replicated decision: it leases messages to the consumer until
//!   a deadline (`ack_wait` after the fetch), first those whose lease ran out,
//!   then new ones. A lease is named by `(seq, deliveries)`; acting on a lease
//!   that was taken back does nothing, so no message is acknowledged twice.
//! - After `max_deliver` deliveries a message whose lease runs out is not
//!   delivered again: it goes to the stream's dead-letter outbox, from which the
//!   queue keeper publishes it to the dead-letter stream (with a msg-id, so a
//!   retried move is a duplicate) and then forgets it.
//!
//! Layout (a name inside a key is length-prefixed, as in [`super::model`]; the
//! kind bytes differ from the Redis streams' `M E G C P`):
//! - `Q name` → [`QueueMeta`]
//! - `m name seq` → [`Msg`]
//! - `d name msg_id` → [`Dedup`]; `t name ts_ms msg_id` → () (dedup rows by age)
//! - `k name consumer` → [`Consumer`]
//! - `l name consumer seq` → [`Lease`]; `w name consumer deadline_ms seq` → () (leases by deadline)
//! - `x name seq consumer` → [`Dead`] (the dead-letter outbox)

use serde::{Deserialize, Serialize};

use super::model::{decode, delete_prefixed, encode, lp, prefix, prefix_end, Table, R};

/// How long publishes are remembered by msg-id unless configured (JetStream's 2 min).
pub const DEFAULT_DUPLICATE_WINDOW_MS: u64 = 120_000;
pub const DEFAULT_ACK_WAIT_MS: u64 = 30_000;
pub const DEFAULT_MAX_DELIVER: u64 = 5;
pub const DEFAULT_MAX_ACK_PENDING: u64 = 1_000;
/// Rows one write removes at most for expiry (age and dedup window): the rest
/// go with later writes or the keeper's next round.
pub const EXPIRE_BATCH: usize = 1_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum Retention {
    #[default]
    Limits,
    WorkQueue,
    Interest,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum Discard {
    #[default]
    Old,
    New,
}

/// A stream's configuration; zeros are "unlimited" / "the default".
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct QueueConfig {
    pub name: String,
    pub retention: Retention,
    pub max_msgs: u64,
    pub max_bytes: u64,
    pub max_age_ms: u64,
    pub max_msg_bytes: u64,
    pub discard: Discard,
    pub duplicate_window_ms: u64,
    pub dead_letter: String,
}

impl QueueConfig {
    pub fn duplicate_window_ms(&self) -> u64 {
        if self.duplicate_window_ms == 0 {
            DEFAULT_DUPLICATE_WINDOW_MS
        } else {
            self.duplicate_window_ms
        }
    }

    /// The dead-letter stream's name.
    pub fn dead_letter(&self) -> String {
        if self.dead_letter.is_empty() {
            format!("{}.dlq", self.name)
        } else {
            self.dead_letter.clone()
        }
    }
}

/// A stream's own record.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct QueueMeta {
    pub config: QueueConfig,
    pub created_ms: u64,
    pub msgs: u64,
    pub bytes: u64,
    /// The lowest sequence kept (`last_seq + 1` while empty).
    pub first_seq: u64,
    pub last_seq: u64,
    pub last_ts_ms: u64,
    pub consumers: u32,
    pub dead_lettered: u64,
    pub dead_waiting: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Msg {
    pub ts_ms: u64,
    pub headers: Vec<(String, String)>,
    #[serde(with = "crate::consensus::raw_bytes")]
    pub payload: Vec<u8>,
}

impl Msg {
    /// What the message counts for against `max_bytes` and `max_msg_bytes`.
    pub fn size(&self) -> u64 {
        let headers: usize = self.headers.iter().map(|(k, v)| k.len() + v.len()).sum();
        (self.payload.len() + headers) as u64
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Dedup {
    pub seq: u64,
    pub ts_ms: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum DeliverPolicy {
    #[default]
    All,
    New,
    BySeq(u64),
    ByTime(u64),
}

#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct ConsumerConfig {
    pub name: String,
    pub deliver: DeliverPolicy,
    pub ack_wait_ms: u64,
    pub max_deliver: u64,
    pub max_ack_pending: u64,
}

impl ConsumerConfig {
    /// Zeros replaced by the defaults, as stored and shown.
    pub fn with_defaults(mut self) -> ConsumerConfig {
        if self.ack_wait_ms == 0 {
            self.ack_wait_ms = DEFAULT_ACK_WAIT_MS;
        }
        if self.max_deliver == 0 {
            self.max_deliver = DEFAULT_MAX_DELIVER;
        }
        if self.max_ack_pending == 0 {
            self.max_ack_pending = DEFAULT_MAX_ACK_PENDING;
        }
        self
    }
}

/// A durable pull consumer.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Consumer {
    pub config: ConsumerConfig,
    pub created_ms: u64,
    /// The next sequence never delivered.
    pub next_seq: u64,
    /// Leases outstanding.
    pub pending: u64,
    pub delivered: u64,
    pub redelivered: u64,
    pub acked: u64,
    pub terminated: u64,
    pub dead_lettered: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lease {
    pub deliveries: u64,
    pub deadline_ms: u64,
}

/// A message waiting in the outbox for the dead-letter stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Dead {
    pub seq: u64,
    pub consumer: String,
    pub deliveries: u64,
    pub msg: Msg,
}

/// A delivered message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Delivery {
    pub seq: u64,
    pub deliveries: u64,
    pub deadline_ms: u64,
    pub msg: Msg,
}

/// What acting on leases does (Ack, Nak, InProgress, Term).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum LeaseAction {
    Ack,
    /// Redeliver no sooner than `delay_ms` from now.
    Nak {
        delay_ms: u64,
    },
    InProgress,
    Term,
}

/// A queue write: one log entry's command.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum QueueCommand {
    CreateStream {
        config: QueueConfig,
        now_ms: u64,
    },
    UpdateStream {
        config: QueueConfig,
        now_ms: u64,
    },
    DeleteStream {
        name: String,
    },
    Purge {
        name: String,
        keep_from_seq: u64,
    },
    Publish {
        name: String,
        msg: Msg,
        msg_id: String,
        expected_last_seq: Option<u64>,
        max_msg_bytes: u64,
    },
    CreateConsumer {
        name: String,
        config: ConsumerConfig,
        now_ms: u64,
    },
    DeleteConsumer {
        name: String,
        consumer: String,
    },
    Fetch {
        name: String,
        consumer: String,
        batch: u64,
        now_ms: u64,
    },
    Leases {
        name: String,
        consumer: String,
        leases: Vec<(u64, u64)>,
        action: LeaseAction,
        now_ms: u64,
    },
    /// Removes what max-age and the dedup window let go of (the keeper's round).
    Expire {
        name: String,
        now_ms: u64,
    },
    /// The keeper published these outbox entries `(seq, consumer)` to the dead-letter stream.
    ForgetDead {
        name: String,
        entries: Vec<(u64, String)>,
    },
    /// Publishes that reached one member at about the same time, in one entry:
    /// each applied as its own [`QueueCommand::Publish`], in order; the reply is
    /// a [`QueueReply::Batch`] with each one's reply.
    PublishBatch {
        name: String,
        items: Vec<PublishItem>,
        max_msg_bytes: u64,
    },
}

/// One publish of a [`QueueCommand::PublishBatch`].
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PublishItem {
    pub msg: Msg,
    pub msg_id: String,
    pub expected_last_seq: Option<u64>,
}

impl QueueCommand {
    pub fn name(&self) -> &str {
        match self {
            QueueCommand::CreateStream { config, .. } | QueueCommand::UpdateStream { config, .. } => &config.name,
            QueueCommand::DeleteStream { name }
            | QueueCommand::Purge { name, .. }
            | QueueCommand::Publish { name, .. }
            | QueueCommand::CreateConsumer { name, .. }
            | QueueCommand::DeleteConsumer { name, .. }
            | QueueCommand::Fetch { name, .. }
            | QueueCommand::Leases { name, .. }
            | QueueCommand::Expire { name, .. }
            | QueueCommand::ForgetDead { name, .. }
            | QueueCommand::PublishBatch { name, .. } => name,
        }
    }
}

/// Why a queue command was refused (nothing changed); JetStream's descriptions.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum QueueError {
    #[error("stream not found")]
    StreamNotFound,
    #[error("consumer not found")]
    ConsumerNotFound,
    #[error("stream name already in use with a different configuration")]
    StreamExists,
    #[error("consumer already exists with a different configuration")]
    ConsumerExists,
    #[error("wrong last sequence: {0}")]
    WrongLastSeq(u64),
    #[error("maximum messages exceeded")]
    MaxMsgs,
    #[error("maximum bytes exceeded")]
    MaxBytes,
    #[error("message size exceeds maximum allowed")]
    MsgTooBig,
    #[error("multiple non-filtered consumers not allowed on workqueue stream")]
    WorkQueueConsumers,
    #[error("{0}")]
    Invalid(String),
}

/// A queue write's reply.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum QueueReply {
    Stream(Box<QueueMeta>),
    Consumer(Box<Consumer>),
    PubAck {
        seq: u64,
        duplicate: bool,
    },
    Deliveries(Vec<Delivery>),
    /// Per lease acted on: whether it was still held.
    Done(Vec<bool>),
    /// Messages (or outbox entries) removed.
    Count(u64),
    Refused(QueueError),
    /// A [`QueueCommand::PublishBatch`]'s replies, one per publish.
    Batch(Vec<QueueReply>),
}

fn meta_key(name: &str) -> Vec<u8> {
    prefix(b'Q', name.as_bytes())
}

fn seq_key(kind: u8, name: &str, seq: u64) -> Vec<u8> {
    let mut k = prefix(kind, name.as_bytes());
    k.extend_from_slice(&seq.to_be_bytes());
    k
}

fn msg_key(name: &str, seq: u64) -> Vec<u8> {
    seq_key(b'm', name, seq)
}

fn dedup_key(name: &str, msg_id: &str) -> Vec<u8> {
    let mut k = prefix(b'd', name.as_bytes());
    k.extend_from_slice(msg_id.as_bytes());
    k
}

fn dedup_age_key(name: &str, ts_ms: u64, msg_id: &str) -> Vec<u8> {
    let mut k = seq_key(b't', name, ts_ms);
    k.extend_from_slice(msg_id.as_bytes());
    k
}

fn consumer_key(name: &str, consumer: &str) -> Vec<u8> {
    let mut k = prefix(b'k', name.as_bytes());
    k.extend_from_slice(consumer.as_bytes());
    k
}

fn lease_prefix(kind: u8, name: &str, consumer: &str) -> Vec<u8> {
    let mut k = prefix(kind, name.as_bytes());
    lp(&mut k, consumer.as_bytes());
    k
}

fn lease_key(name: &str, consumer: &str, seq: u64) -> Vec<u8> {
    let mut k = lease_prefix(b'l', name, consumer);
    k.extend_from_slice(&seq.to_be_bytes());
    k
}

fn deadline_key(name: &str, consumer: &str, deadline_ms: u64, seq: u64) -> Vec<u8> {
    let mut k = lease_prefix(b'w', name, consumer);
    k.extend_from_slice(&deadline_ms.to_be_bytes());
    k.extend_from_slice(&seq.to_be_bytes());
    k
}

fn dead_key(name: &str, seq: u64, consumer: &str) -> Vec<u8> {
    let mut k = seq_key(b'x', name, seq);
    k.extend_from_slice(consumer.as_bytes());
    k
}

fn u64_at(key: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_be_bytes(key.get(at..at + 8)?.try_into().ok()?))
}

fn corrupt(what: &str) -> super::model::Corrupt {
    super::model::Corrupt(format!("queue row: {what}"))
}

/// Every row kind of a stream, for deletion.
const KINDS: [u8; 8] = [b'm', b'd', b't', b'k', b'l', b'w', b'x', b'Q'];

/// Read-only queries.
pub struct QueueView<'a, T: Table + ?Sized> {
    pub table: &'a T,
}

impl<T: Table + ?Sized> QueueView<'_, T> {
    pub fn meta(&self, name: &str) -> R<Option<QueueMeta>> {
        self.table.get(&meta_key(name)).map(|b| decode(&b)).transpose()
    }

    /// The streams this table holds (one per group, as the catalog places them).
    pub fn names(&self) -> R<Vec<String>> {
        let (from, to) = (vec![b'Q'], vec![b'Q' + 1]);
        let mut out = Vec::new();
        for (_, v) in self.table.range(&from, &to, false, usize::MAX) {
            out.push(decode::<QueueMeta>(&v)?.config.name);
        }
        Ok(out)
    }

    pub fn consumer(&self, name: &str, consumer: &str) -> R<Option<Consumer>> {
        self.table.get(&consumer_key(name, consumer)).map(|b| decode(&b)).transpose()
    }

    pub fn consumers(&self, name: &str) -> R<Vec<Consumer>> {
        let p = prefix(b'k', name.as_bytes());
        self.table.range(&p, &prefix_end(&p), false, usize::MAX).iter().map(|(_, v)| decode(v)).collect()
    }

    pub fn message(&self, name: &str, seq: u64) -> R<Option<Msg>> {
        self.table.get(&msg_key(name, seq)).map(|b| decode(&b)).transpose()
    }

    /// The first message kept at or after `seq`.
    fn first_at(&self, name: &str, seq: u64) -> R<Option<(u64, Msg)>> {
        let end = prefix_end(&prefix(b'm', name.as_bytes()));
        match self.table.range(&msg_key(name, seq), &end, false, 1).pop() {
            Some((k, v)) => {
                let at = k.len() - 8;
                Ok(Some((u64_at(&k, at).ok_or_else(|| corrupt("message key"))?, decode(&v)?)))
            }
            None => Ok(None),
        }
    }

    /// Messages still to be delivered to `c` (at or after its next sequence).
    pub fn num_pending(&self, meta: &QueueMeta, c: &Consumer) -> u64 {
        if c.next_seq <= meta.first_seq {
            meta.msgs
        } else if c.next_seq > meta.last_seq {
            0
        } else if meta.msgs == meta.last_seq + 1 - meta.first_seq {
            // No gaps (nothing removed in the middle): counted, not scanned.
            meta.last_seq + 1 - c.next_seq
        } else {
            let from = msg_key(&meta.config.name, c.next_seq);
            let to = prefix_end(&prefix(b'm', meta.config.name.as_bytes()));
            self.table.range(&from, &to, false, usize::MAX).len() as u64
        }
    }

    /// The stream's consumers (only `only` when given), each with the messages
    /// it has still to be delivered; `None` when the stream does not exist.
    pub fn consumer_states(&self, name: &str, only: Option<&str>) -> R<Option<Vec<(Consumer, u64)>>> {
        let Some(meta) = self.meta(name)? else { return Ok(None) };
        let consumers = match only {
            Some(c) => self.consumer(name, c)?.into_iter().collect(),
            None => self.consumers(name)?,
        };
        Ok(Some(
            consumers
                .into_iter()
                .map(|c| {
                    let n = self.num_pending(&meta, &c);
                    (c, n)
                })
                .collect(),
        ))
    }

    /// Outbox entries waiting for the dead-letter stream, oldest first.
    pub fn dead(&self, name: &str, limit: usize) -> R<Vec<Dead>> {
        let p = prefix(b'x', name.as_bytes());
        self.table.range(&p, &prefix_end(&p), false, limit).iter().map(|(_, v)| decode(v)).collect()
    }

    /// Whether an [`QueueCommand::Expire`] at `now_ms` would remove anything.
    pub fn expirable(&self, name: &str, now_ms: u64) -> R<bool> {
        let Some(meta) = self.meta(name)? else { return Ok(false) };
        if meta.config.max_age_ms > 0 {
            if let Some((_, m)) = self.first_at(name, meta.first_seq)? {
                if m.ts_ms.saturating_add(meta.config.max_age_ms) <= now_ms {
                    return Ok(true);
                }
            }
        }
        let p = prefix(b't', name.as_bytes());
        Ok(match self.table.range(&p, &prefix_end(&p), false, 1).pop() {
            Some((k, _)) => {
                let ts = u64_at(&k, p.len()).ok_or_else(|| corrupt("dedup age key"))?;
                ts.saturating_add(meta.config.duplicate_window_ms()) <= now_ms
            }
            None => false,
        })
    }

    /// Whether a fetch by `consumer` at `now_ms` would deliver something.
    pub fn has_work(&self, name: &str, consumer: &str, now_ms: u64) -> R<bool> {
        let (Some(meta), Some(c)) = (self.meta(name)?, self.consumer(name, consumer)?) else { return Ok(true) };
        let p = lease_prefix(b'w', name, consumer);
        let mut due = p.clone();
        due.extend_from_slice(&now_ms.saturating_add(1).to_be_bytes());
        if !self.table.range(&p, &due, false, 1).is_empty() {
            return Ok(true);
        }
        Ok(c.pending < c.config.max_ack_pending && c.next_seq <= meta.last_seq && meta.msgs > 0)
    }

    /// The earliest lease deadline of `consumer` (a blocked fetch wakes then).
    pub fn next_deadline(&self, name: &str, consumer: &str) -> R<Option<u64>> {
        let p = lease_prefix(b'w', name, consumer);
        match self.table.range(&p, &prefix_end(&p), false, 1).pop() {
            Some((k, _)) => Ok(Some(u64_at(&k, p.len()).ok_or_else(|| corrupt("deadline key"))?)),
            None => Ok(None),
        }
    }
}

/// The model over a table.
pub struct Queues<'a, T: Table + ?Sized> {
    pub table: &'a mut T,
}

fn refused(e: QueueError) -> R<QueueReply> {
    Ok(QueueReply::Refused(e))
}

impl<T: Table + ?Sized> Queues<'_, T> {
    fn view(&self) -> QueueView<'_, T> {
        QueueView { table: self.table }
    }

    fn put<V: Serialize>(&mut self, key: &[u8], v: &V) {
        self.table.put(key, &encode(v));
    }

    /// Applies one write; its reply. `Err` only for corrupt state.
    pub fn apply(&mut self, cmd: QueueCommand) -> R<QueueReply> {
        match cmd {
            QueueCommand::CreateStream { config, now_ms } => self.create_stream(config, now_ms),
            QueueCommand::UpdateStream { config, now_ms } => {
                let Some(mut meta) = self.view().meta(&config.name)? else {
                    return refused(QueueError::StreamNotFound);
                };
                if config.retention != meta.config.retention {
                    return refused(QueueError::Invalid("stream configuration update can not change retention".into()));
                }
                meta.config = config;
                self.enforce_limits(&mut meta)?;
                self.expire(&mut meta, now_ms)?;
                self.put(&meta_key(&meta.config.name), &meta);
                Ok(QueueReply::Stream(Box::new(meta)))
            }
            QueueCommand::DeleteStream { name } => {
                if self.view().meta(&name)?.is_none() {
                    return refused(QueueError::StreamNotFound);
                }
                for kind in KINDS {
                    delete_prefixed(self.table, &prefix(kind, name.as_bytes()));
                }
                Ok(QueueReply::Count(1))
            }
            QueueCommand::Purge { name, keep_from_seq } => {
                let Some(mut meta) = self.view().meta(&name)? else { return refused(QueueError::StreamNotFound) };
                let upto = if keep_from_seq == 0 { meta.last_seq + 1 } else { keep_from_seq };
                let mut n = 0;
                while meta.msgs > 0 && meta.first_seq < upto {
                    let seq = meta.first_seq;
                    self.remove_msg(&mut meta, seq)?;
                    n += 1;
                }
                if meta.msgs == 0 && keep_from_seq == 0 {
                    meta.first_seq = meta.last_seq + 1;
                }
                self.put(&meta_key(&name), &meta);
                Ok(QueueReply::Count(n))
            }
            QueueCommand::Publish { name, msg, msg_id, expected_last_seq, max_msg_bytes } => {
                self.publish(&name, msg, &msg_id, expected_last_seq, max_msg_bytes)
            }
            QueueCommand::CreateConsumer { name, config, now_ms } => self.create_consumer(&name, config, now_ms),
            QueueCommand::DeleteConsumer { name, consumer } => self.delete_consumer(&name, &consumer),
            QueueCommand::Fetch { name, consumer, batch, now_ms } => self.fetch(&name, &consumer, batch, now_ms),
            QueueCommand::Leases { name, consumer, leases, action, now_ms } => {
                self.leases(&name, &consumer, &leases, action, now_ms)
            }
            QueueCommand::Expire { name, now_ms } => {
                let Some(mut meta) = self.view().meta(&name)? else { return Ok(QueueReply::Count(0)) };
                let n = self.expire(&mut meta, now_ms)?;
                self.put(&meta_key(&name), &meta);
                Ok(QueueReply::Count(n))
            }
            QueueCommand::PublishBatch { name, items, max_msg_bytes } => {
                let mut replies = Vec::with_capacity(items.len());
                for item in items {
                    replies.push(self.publish(&name, item.msg, &item.msg_id, item.expected_last_seq, max_msg_bytes)?);
                }
                Ok(QueueReply::Batch(replies))
            }
            QueueCommand::ForgetDead { name, entries } => {
                let Some(mut meta) = self.view().meta(&name)? else { return Ok(QueueReply::Count(0)) };
                let mut n = 0;
                for (seq, consumer) in entries {
                    let k = dead_key(&name, seq, &consumer);
                    if self.table.get(&k).is_some() {
                        self.table.delete(&k);
                        meta.dead_waiting = meta.dead_waiting.saturating_sub(1);
                        meta.dead_lettered += 1;
                        n += 1;
                    }
                }
                self.put(&meta_key(&name), &meta);
                Ok(QueueReply::Count(n))
            }
        }
    }

    fn create_stream(&mut self, config: QueueConfig, now_ms: u64) -> R<QueueReply> {
        if let Some(meta) = self.view().meta(&config.name)? {
            return match meta.config == config {
                true => Ok(QueueReply::Stream(Box::new(meta))),
                false => refused(QueueError::StreamExists),
            };
        }
        let meta = QueueMeta { config, created_ms: now_ms, first_seq: 1, ..QueueMeta::default() };
        self.put(&meta_key(&meta.config.name), &meta);
        Ok(QueueReply::Stream(Box::new(meta)))
    }

    /// Removes message `seq` (if kept) and keeps `first_seq` on the lowest kept.
    fn remove_msg(&mut self, meta: &mut QueueMeta, seq: u64) -> R<()> {
        let name = meta.config.name.clone();
        let k = msg_key(&name, seq);
        let Some(b) = self.table.get(&k) else {
            if seq == meta.first_seq {
                meta.first_seq = self.view().first_at(&name, seq)?.map_or(meta.last_seq + 1, |(s, _)| s);
            }
            return Ok(());
        };
        let msg: Msg = decode(&b)?;
        self.table.delete(&k);
        meta.msgs = meta.msgs.saturating_sub(1);
        meta.bytes = meta.bytes.saturating_sub(msg.size());
        if seq == meta.first_seq {
            meta.first_seq = self.view().first_at(&name, seq + 1)?.map_or(meta.last_seq + 1, |(s, _)| s);
        }
        Ok(())
    }

    /// Drops the oldest messages past max_msgs and max_bytes.
    fn enforce_limits(&mut self, meta: &mut QueueMeta) -> R<()> {
        let over = |m: &QueueMeta| {
            (m.config.max_msgs > 0 && m.msgs > m.config.max_msgs)
                || (m.config.max_bytes > 0 && m.bytes > m.config.max_bytes)
        };
        while meta.msgs > 0 && over(meta) {
            let seq = meta.first_seq;
            self.remove_msg(meta, seq)?;
        }
        Ok(())
    }

    /// Removes messages older than max_age and dedup rows older than the
    /// window, at most [`EXPIRE_BATCH`] of each.
    fn expire(&mut self, meta: &mut QueueMeta, now_ms: u64) -> R<u64> {
        let name = meta.config.name.clone();
        let mut n = 0;
        if meta.config.max_age_ms > 0 {
            while (n as usize) < EXPIRE_BATCH {
                match self.view().first_at(&name, meta.first_seq)? {
                    Some((seq, m)) if m.ts_ms.saturating_add(meta.config.max_age_ms) <= now_ms => {
                        self.remove_msg(meta, seq)?;
                        n += 1;
                    }
                    _ => break,
                }
            }
        }
        let window = meta.config.duplicate_window_ms();
        let p = prefix(b't', name.as_bytes());
        let end = prefix_end(&p);
        // Oldest first, a few rows at a time: usually the first is still young.
        let mut removed = 0;
        'rows: while removed < EXPIRE_BATCH {
            let rows = self.table.range(&p, &end, false, 16);
            if rows.is_empty() {
                break;
            }
            for (k, _) in rows {
                let ts = u64_at(&k, p.len()).ok_or_else(|| corrupt("dedup age key"))?;
                if ts.saturating_add(window) > now_ms {
                    break 'rows;
                }
                self.table.delete(&k);
                let id = std::str::from_utf8(&k[p.len() + 8..]).map_err(|_| corrupt("dedup msg id"))?;
                self.table.delete(&dedup_key(&name, id));
                removed += 1;
            }
        }
        Ok(n)
    }

    fn publish(
        &mut self,
        name: &str,
        msg: Msg,
        msg_id: &str,
        expected_last_seq: Option<u64>,
        server_max_msg_bytes: u64,
    ) -> R<QueueReply> {
        let Some(mut meta) = self.view().meta(name)? else { return refused(QueueError::StreamNotFound) };
        let limit = match meta.config.max_msg_bytes {
            0 => server_max_msg_bytes,
            n => n.min(server_max_msg_bytes),
        };
        let size = msg.size();
        if size > limit {
            return refused(QueueError::MsgTooBig);
        }
        self.expire(&mut meta, msg.ts_ms)?;
        if !msg_id.is_empty() {
            if let Some(b) = self.table.get(&dedup_key(name, msg_id)) {
                let d: Dedup = decode(&b)?;
                if d.ts_ms.saturating_add(meta.config.duplicate_window_ms()) > msg.ts_ms {
                    self.put(&meta_key(name), &meta);
                    return Ok(QueueReply::PubAck { seq: d.seq, duplicate: true });
                }
            }
        }
        if let Some(expected) = expected_last_seq {
            if expected != meta.last_seq {
                return refused(QueueError::WrongLastSeq(meta.last_seq));
            }
        }
        let keep = !(meta.config.retention == Retention::Interest && meta.consumers == 0);
        if keep && meta.config.discard == Discard::New {
            if meta.config.max_msgs > 0 && meta.msgs >= meta.config.max_msgs {
                return refused(QueueError::MaxMsgs);
            }
            if meta.config.max_bytes > 0 && meta.bytes + size > meta.config.max_bytes {
                return refused(QueueError::MaxBytes);
            }
        }
        let seq = meta.last_seq + 1;
        meta.last_seq = seq;
        meta.last_ts_ms = msg.ts_ms;
        if !msg_id.is_empty() {
            let d = Dedup { seq, ts_ms: msg.ts_ms };
            if let Some(old) = self.table.get(&dedup_key(name, msg_id)) {
                let old: Dedup = decode(&old)?;
                self.table.delete(&dedup_age_key(name, old.ts_ms, msg_id));
            }
            self.put(&dedup_key(name, msg_id), &d);
            self.table.put(&dedup_age_key(name, msg.ts_ms, msg_id), &[]);
        }
        if keep {
            if meta.msgs == 0 {
                meta.first_seq = seq;
            }
            meta.msgs += 1;
            meta.bytes += size;
            self.put(&msg_key(name, seq), &msg);
            self.enforce_limits(&mut meta)?;
        } else if meta.msgs == 0 {
            meta.first_seq = seq + 1;
        }
        self.put(&meta_key(name), &meta);
        Ok(QueueReply::PubAck { seq, duplicate: false })
    }

    fn create_consumer(&mut self, name: &str, config: ConsumerConfig, now_ms: u64) -> R<QueueReply> {
        let Some(mut meta) = self.view().meta(name)? else { return refused(QueueError::StreamNotFound) };
        let config = config.with_defaults();
        if let Some(c) = self.view().consumer(name, &config.name)? {
            return match c.config == config {
                true => Ok(QueueReply::Consumer(Box::new(c))),
                false => refused(QueueError::ConsumerExists),
            };
        }
        if meta.config.retention == Retention::WorkQueue && meta.consumers > 0 {
            return refused(QueueError::WorkQueueConsumers);
        }
        let next_seq = match config.deliver {
            DeliverPolicy::All => meta.first_seq,
            DeliverPolicy::New => meta.last_seq + 1,
            DeliverPolicy::BySeq(s) => s.max(1),
            DeliverPolicy::ByTime(t) => self.first_since(&meta, t)?,
        };
        let c = Consumer { config, created_ms: now_ms, next_seq, ..Consumer::default() };
        self.put(&consumer_key(name, &c.config.name), &c);
        meta.consumers += 1;
        self.put(&meta_key(name), &meta);
        Ok(QueueReply::Consumer(Box::new(c)))
    }

    /// The first sequence published at or after `ts_ms` (messages are in
    /// publish order, so their times never decrease).
    fn first_since(&self, meta: &QueueMeta, ts_ms: u64) -> R<u64> {
        // Binary search over sequences; a gap takes the next kept message.
        let (mut lo, mut hi) = (meta.first_seq, meta.last_seq + 1);
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            match self.view().first_at(&meta.config.name, mid)? {
                Some((seq, m)) if m.ts_ms < ts_ms => lo = seq + 1,
                _ => hi = mid,
            }
        }
        Ok(lo)
    }

    fn delete_consumer(&mut self, name: &str, consumer: &str) -> R<QueueReply> {
        let Some(mut meta) = self.view().meta(name)? else { return refused(QueueError::StreamNotFound) };
        if self.view().consumer(name, consumer)?.is_none() {
            return refused(QueueError::ConsumerNotFound);
        }
        self.table.delete(&consumer_key(name, consumer));
        for kind in [b'l', b'w'] {
            delete_prefixed(self.table, &lease_prefix(kind, name, consumer));
        }
        meta.consumers = meta.consumers.saturating_sub(1);
        if meta.config.retention == Retention::Interest {
            // Messages only this consumer still wanted go now (a walk over the
            // whole stream: deleting a consumer is rare).
            let mut seq = meta.first_seq;
            while let Some((s, _)) = self.view().first_at(name, seq)? {
                if self.acked_by_all(&meta, s)? {
                    self.remove_msg(&mut meta, s)?;
                }
                seq = s + 1;
            }
        }
        self.put(&meta_key(name), &meta);
        Ok(QueueReply::Count(1))
    }

    /// Whether every consumer is done with `seq` (delivered and not leased).
    fn acked_by_all(&self, meta: &QueueMeta, seq: u64) -> R<bool> {
        for c in self.view().consumers(&meta.config.name)? {
            if seq >= c.next_seq || self.table.get(&lease_key(&meta.config.name, &c.config.name, seq)).is_some() {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// A message is done with by consumer (acked or terminated): retention.
    fn settled(&mut self, meta: &mut QueueMeta, seq: u64) -> R<()> {
        match meta.config.retention {
            Retention::Limits => Ok(()),
            Retention::WorkQueue => self.remove_msg(meta, seq),
            Retention::Interest => match self.acked_by_all(meta, seq)? {
                true => self.remove_msg(meta, seq),
                false => Ok(()),
            },
        }
    }

    fn drop_lease(&mut self, name: &str, consumer: &str, seq: u64, lease: Lease) {
        self.table.delete(&lease_key(name, consumer, seq));
        self.table.delete(&deadline_key(name, consumer, lease.deadline_ms, seq));
    }

    fn set_lease(&mut self, name: &str, consumer: &str, seq: u64, lease: Lease) {
        self.put(&lease_key(name, consumer, seq), &lease);
        self.table.put(&deadline_key(name, consumer, lease.deadline_ms, seq), &[]);
    }

    fn fetch(&mut self, name: &str, consumer: &str, batch: u64, now_ms: u64) -> R<QueueReply> {
        let Some(mut meta) = self.view().meta(name)? else { return refused(QueueError::StreamNotFound) };
        let Some(mut c) = self.view().consumer(name, consumer)? else {
            return refused(QueueError::ConsumerNotFound);
        };
        self.expire(&mut meta, now_ms)?;
        let batch = batch.max(1) as usize;
        let mut out = Vec::new();
        // Leases that ran out, earliest deadline first.
        let p = lease_prefix(b'w', name, consumer);
        let mut due = p.clone();
        due.extend_from_slice(&now_ms.saturating_add(1).to_be_bytes());
        for (k, _) in self.table.range(&p, &due, false, batch) {
            let (Some(deadline_ms), Some(seq)) = (u64_at(&k, p.len()), u64_at(&k, p.len() + 8)) else {
                return Err(corrupt("deadline key"));
            };
            let lease = Lease { deadline_ms, ..self.lease(name, consumer, seq)? };
            self.drop_lease(name, consumer, seq, lease);
            let Some(msg) = self.view().message(name, seq)? else {
                // Removed meanwhile (limits, age, purge): nothing to redeliver.
                c.pending = c.pending.saturating_sub(1);
                continue;
            };
            if lease.deliveries >= c.config.max_deliver {
                c.pending = c.pending.saturating_sub(1);
                c.dead_lettered += 1;
                meta.dead_waiting += 1;
                let dead = Dead { seq, consumer: consumer.to_string(), deliveries: lease.deliveries, msg };
                self.put(&dead_key(name, seq, consumer), &dead);
                self.settled(&mut meta, seq)?;
                continue;
            }
            let lease = Lease { deliveries: lease.deliveries + 1, deadline_ms: now_ms + c.config.ack_wait_ms };
            self.set_lease(name, consumer, seq, lease);
            c.redelivered += 1;
            out.push(Delivery { seq, deliveries: lease.deliveries, deadline_ms: lease.deadline_ms, msg });
        }
        // New messages.
        while out.len() < batch && c.pending < c.config.max_ack_pending && c.next_seq <= meta.last_seq {
            let Some((seq, msg)) = self.view().first_at(name, c.next_seq)? else {
                c.next_seq = meta.last_seq + 1;
                break;
            };
            let lease = Lease { deliveries: 1, deadline_ms: now_ms + c.config.ack_wait_ms };
            self.set_lease(name, consumer, seq, lease);
            c.next_seq = seq + 1;
            c.pending += 1;
            c.delivered += 1;
            out.push(Delivery { seq, deliveries: 1, deadline_ms: lease.deadline_ms, msg });
        }
        self.put(&consumer_key(name, consumer), &c);
        self.put(&meta_key(name), &meta);
        Ok(QueueReply::Deliveries(out))
    }

    fn lease(&self, name: &str, consumer: &str, seq: u64) -> R<Lease> {
        match self.table.get(&lease_key(name, consumer, seq)) {
            Some(b) => decode(&b),
            None => Err(corrupt("a deadline without its lease")),
        }
    }

    fn leases(
        &mut self,
        name: &str,
        consumer: &str,
        leases: &[(u64, u64)],
        action: LeaseAction,
        now_ms: u64,
    ) -> R<QueueReply> {
        let Some(mut meta) = self.view().meta(name)? else { return refused(QueueError::StreamNotFound) };
        let Some(mut c) = self.view().consumer(name, consumer)? else {
            return refused(QueueError::ConsumerNotFound);
        };
        let mut done = Vec::with_capacity(leases.len());
        for &(seq, deliveries) in leases {
            let held = match self.table.get(&lease_key(name, consumer, seq)) {
                Some(b) => Some(decode::<Lease>(&b)?).filter(|l| l.deliveries == deliveries),
                None => None,
            };
            let Some(lease) = held else {
                done.push(false);
                continue;
            };
            match action {
                LeaseAction::Ack | LeaseAction::Term => {
                    self.drop_lease(name, consumer, seq, lease);
                    c.pending = c.pending.saturating_sub(1);
                    match action {
                        LeaseAction::Ack => c.acked += 1,
                        _ => c.terminated += 1,
                    }
                    self.put(&consumer_key(name, consumer), &c);
                    self.settled(&mut meta, seq)?;
                }
                LeaseAction::Nak { delay_ms } => {
                    self.drop_lease(name, consumer, seq, lease);
                    self.set_lease(
                        name,
                        consumer,
                        seq,
                        Lease { deadline_ms: now_ms.saturating_add(delay_ms), ..lease },
                    );
                }
                LeaseAction::InProgress => {
                    self.drop_lease(name, consumer, seq, lease);
                    let deadline_ms = now_ms.saturating_add(c.config.ack_wait_ms);
                    self.set_lease(name, consumer, seq, Lease { deadline_ms, ..lease });
                }
            }
            done.push(true);
        }
        self.put(&consumer_key(name, consumer), &c);
        self.put(&meta_key(name), &meta);
        Ok(QueueReply::Done(done))
    }
}

#[cfg(test)]
mod tests;
