//! Redis Streams semantics over one ordered key-value table: what every write
//! command does to a stream, its consumer groups and their pending entries, and
//! what the reads return. Pure logic, no Raft and no clock: a write carries the
//! proposer's `now_ms`, so every member applying it computes the same state and
//! the same reply (ids made from `*`, idle times, claim decisions).
//!
//! Layout of the table (every key starts with a kind byte; a name inside a key
//! is length-prefixed, so no name is a prefix of another's rows):
//! - `M name` → [`StreamMeta`]
//! - `E len name id` → the entry's fields
//! - `G len name group` → [`GroupMeta`]
//! - `C len name len group consumer` → [`ConsumerMeta`]
//! - `P len name len group id` → [`Pending`] (the group's pending entries list)
//!
//! Replies are [`Value`]s with Redis 7's shapes and error strings; the gateway
//! turns them into RESP.

use std::cmp::Ordering;
use std::fmt;

use serde::{Deserialize, Serialize};

/// A stream entry id: milliseconds and a sequence number.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize)]
pub struct StreamId {
    pub ms: u64,
    pub seq: u64,
}

impl StreamId {
    pub const MIN: StreamId = StreamId { ms: 0, seq: 0 };
    pub const MAX: StreamId = StreamId { ms: u64::MAX, seq: u64::MAX };

    pub fn new(ms: u64, seq: u64) -> StreamId {
        StreamId { ms, seq }
    }

    fn to_bytes(self) -> [u8; 16] {
        let mut b = [0u8; 16];
        b[..8].copy_from_slice(&self.ms.to_be_bytes());
        b[8..].copy_from_slice(&self.seq.to_be_bytes());
        b
    }

    fn from_bytes(b: &[u8]) -> Option<StreamId> {
        let ms = u64::from_be_bytes(b.get(..8)?.try_into().ok()?);
        let seq = u64::from_be_bytes(b.get(8..16)?.try_into().ok()?);
        Some(StreamId { ms, seq })
    }

    /// The next id after this one, if any.
    pub fn next(self) -> Option<StreamId> {
        match self.seq.checked_add(1) {
            Some(seq) => Some(StreamId { ms: self.ms, seq }),
            None => self.ms.checked_add(1).map(|ms| StreamId { ms, seq: 0 }),
        }
    }

    /// The id before this one, if any.
    pub fn prev(self) -> Option<StreamId> {
        match self.seq.checked_sub(1) {
            Some(seq) => Some(StreamId { ms: self.ms, seq }),
            None => self.ms.checked_sub(1).map(|ms| StreamId { ms, seq: u64::MAX }),
        }
    }

    pub fn bulk(self) -> Value {
        Value::Bulk(self.to_string().into_bytes())
    }
}

impl fmt::Display for StreamId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.ms, self.seq)
    }
}

/// A reply, in Redis's terms (the gateway encodes it as RESP2 or RESP3).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Value {
    Ok,
    Error(String),
    Integer(i64),
    Bulk(Vec<u8>),
    Nil,
    NilArray,
    Array(Vec<Value>),
    /// A map in RESP3, a flat array of keys and values in RESP2.
    Map(Vec<(Value, Value)>),
    /// Streams and their entries (XREAD, XREADGROUP): a map in RESP3, an array of
    /// `[name, entries]` pairs in RESP2.
    StreamMap(Vec<(Value, Value)>),
}

impl Value {
    pub fn err(s: impl Into<String>) -> Value {
        Value::Error(s.into())
    }

    fn text(s: &str) -> Value {
        Value::Bulk(s.as_bytes().to_vec())
    }

    fn count(n: u64) -> Value {
        Value::Integer(i64::try_from(n).unwrap_or(i64::MAX))
    }
}

pub const ERR_SMALLER_ID: &str = "ERR The ID specified in XADD is equal or smaller than the target stream top item";
pub const ERR_ZERO_ID: &str = "ERR The ID specified in XADD must be greater than 0-0";
pub const ERR_EXHAUSTED: &str = "ERR The stream has exhausted the last possible ID, unable to add more items";
pub const ERR_GROUP_NEEDS_KEY: &str = "ERR The XGROUP subcommand requires the key to exist. Note that for CREATE you may want to use the MKSTREAM option to create an empty stream automatically.";
pub const ERR_BUSYGROUP: &str = "BUSYGROUP Consumer Group name already exists";
pub const ERR_NO_SUCH_KEY: &str = "ERR no such key";

fn nogroup(key: &[u8], group: &[u8]) -> Value {
    Value::err(format!(
        "NOGROUP No such consumer group '{}' for key name '{}'",
        String::from_utf8_lossy(group),
        String::from_utf8_lossy(key)
    ))
}

/// How an XADD names the new entry's id.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum IdSpec {
    /// `*`: from the clock.
    Auto,
    /// `ms-*`: the given milliseconds, the next sequence.
    AutoSeq(u64),
    Explicit(StreamId),
}

/// Where XGROUP CREATE/SETID puts the group's last delivered id.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum GroupStart {
    /// `$`: the stream's last id.
    Last,
    At(StreamId),
}

/// XADD's and XTRIM's trimming.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Trim {
    pub strategy: TrimStrategy,
    /// `~`: trim only whole nodes of [`NODE_ENTRIES`] entries, as Redis trims
    /// only whole radix-tree nodes.
    pub approx: bool,
    /// At most this many entries (`~` only; `None`: no limit).
    pub limit: Option<u64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum TrimStrategy {
    MaxLen(u64),
    MinId(StreamId),
}

/// Entries per node for approximate trimming: Redis's default
/// `stream-node-max-entries`.
pub const NODE_ENTRIES: u64 = 100;

/// What `~` trims at most without a LIMIT: Redis's default, 100 nodes.
pub const DEFAULT_APPROX_LIMIT: u64 = 100 * NODE_ENTRIES;

/// Where an XREADGROUP reads from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum GroupRead {
    /// `>`: entries never delivered to the group.
    New,
    /// An id: the consumer's pending entries after it.
    History(StreamId),
}

/// XCLAIM's options.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClaimOptions {
    /// The delivery time to set: IDLE (now - idle) or TIME.
    pub delivery_time_ms: Option<u64>,
    pub retry_count: Option<u64>,
    pub force: bool,
    pub just_id: bool,
    pub last_id: Option<StreamId>,
}

/// A write: one log entry's command.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum StreamCommand {
    Add {
        key: Vec<u8>,
        id: IdSpec,
        fields: Vec<(Vec<u8>, Vec<u8>)>,
        no_mkstream: bool,
        trim: Option<Trim>,
        now_ms: u64,
    },
    Trim {
        key: Vec<u8>,
        trim: Trim,
    },
    DelEntries {
        key: Vec<u8>,
        ids: Vec<StreamId>,
    },
    DelKey {
        key: Vec<u8>,
    },
    GroupCreate {
        key: Vec<u8>,
        group: Vec<u8>,
        start: GroupStart,
        mkstream: bool,
        entries_read: Option<u64>,
    },
    GroupSetId {
        key: Vec<u8>,
        group: Vec<u8>,
        start: GroupStart,
        entries_read: Option<u64>,
    },
    GroupDestroy {
        key: Vec<u8>,
        group: Vec<u8>,
    },
    CreateConsumer {
        key: Vec<u8>,
        group: Vec<u8>,
        consumer: Vec<u8>,
        now_ms: u64,
    },
    DelConsumer {
        key: Vec<u8>,
        group: Vec<u8>,
        consumer: Vec<u8>,
    },
    ReadGroup {
        key: Vec<u8>,
        group: Vec<u8>,
        consumer: Vec<u8>,
        from: GroupRead,
        count: Option<u64>,
        no_ack: bool,
        now_ms: u64,
    },
    Ack {
        key: Vec<u8>,
        group: Vec<u8>,
        ids: Vec<StreamId>,
    },
    Claim {
        key: Vec<u8>,
        group: Vec<u8>,
        consumer: Vec<u8>,
        min_idle_ms: u64,
        ids: Vec<StreamId>,
        options: ClaimOptions,
        now_ms: u64,
    },
    AutoClaim {
        key: Vec<u8>,
        group: Vec<u8>,
        consumer: Vec<u8>,
        min_idle_ms: u64,
        start: StreamId,
        count: u64,
        just_id: bool,
        now_ms: u64,
    },
    /// A durable-queue command (see [`super::queue`]): the same service and
    /// table, its own rows; appended last so earlier commands keep their encoding.
    Queue(super::queue::QueueCommand),
    /// A blob bucket's metadata command (see [`crate::streams::bucket`]): a bucket's
    /// group runs this service with only these commands; appended last.
    Blob(crate::streams::bucket::BlobCommand),
}

impl StreamCommand {
    /// The stream the command changes.
    pub fn key(&self) -> &[u8] {
        match self {
            StreamCommand::Add { key, .. }
            | StreamCommand::Trim { key, .. }
            | StreamCommand::DelEntries { key, .. }
            | StreamCommand::DelKey { key }
            | StreamCommand::GroupCreate { key, .. }
            | StreamCommand::GroupSetId { key, .. }
            | StreamCommand::GroupDestroy { key, .. }
            | StreamCommand::CreateConsumer { key, .. }
            | StreamCommand::DelConsumer { key, .. }
            | StreamCommand::ReadGroup { key, .. }
            | StreamCommand::Ack { key, .. }
            | StreamCommand::Claim { key, .. }
            | StreamCommand::AutoClaim { key, .. } => key,
            StreamCommand::Queue(q) => q.name().as_bytes(),
            StreamCommand::Blob(_) => &[],
        }
    }
}

/// A stream's own record.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StreamMeta {
    pub length: u64,
    pub last_id: StreamId,
    pub max_deleted_id: StreamId,
    pub entries_added: u64,
    /// The first entry's id as recorded (0-0 while empty).
    pub first_id: StreamId,
}

/// A stream at a glance (see [`View::summaries`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamSummary {
    pub name: Vec<u8>,
    pub length: u64,
    pub groups: u64,
    /// Entries delivered and not acknowledged, over all its groups.
    pub pending: u64,
}

/// A consumer group.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupMeta {
    pub last_delivered: StreamId,
    /// Entries the group has read (Redis's `entries-read`), when known.
    pub entries_read: Option<u64>,
}

/// A consumer of a group.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConsumerMeta {
    /// Last time the consumer was seen by a command (ms).
    pub seen_ms: u64,
}

/// An entry delivered to a consumer and not yet acknowledged.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pending {
    pub consumer: Vec<u8>,
    pub delivery_ms: u64,
    pub deliveries: u64,
}

/// The ordered table the model works on (a redb table in the service, a
/// `BTreeMap` in tests).
pub trait Table {
    fn get(&self, key: &[u8]) -> Option<Vec<u8>>;
    fn put(&mut self, key: &[u8], value: &[u8]);
    fn delete(&mut self, key: &[u8]);
    /// Rows with keys in `[from, to)`, in order (reversed when `reverse`), at most `limit`.
    fn range(&self, from: &[u8], to: &[u8], reverse: bool, limit: usize) -> Vec<(Vec<u8>, Vec<u8>)>;
}

impl Table for std::collections::BTreeMap<Vec<u8>, Vec<u8>> {
    fn get(&self, key: &[u8]) -> Option<Vec<u8>> {
        std::collections::BTreeMap::get(self, key).cloned()
    }
    fn put(&mut self, key: &[u8], value: &[u8]) {
        self.insert(key.to_vec(), value.to_vec());
    }
    fn delete(&mut self, key: &[u8]) {
        self.remove(key);
    }
    fn range(&self, from: &[u8], to: &[u8], reverse: bool, limit: usize) -> Vec<(Vec<u8>, Vec<u8>)> {
        if from >= to {
            return Vec::new();
        }
        let r = std::collections::BTreeMap::range(self, from.to_vec()..to.to_vec());
        let pick = |(k, v): (&Vec<u8>, &Vec<u8>)| (k.clone(), v.clone());
        match reverse {
            false => r.take(limit).map(pick).collect(),
            true => r.rev().take(limit).map(pick).collect(),
        }
    }
}

pub(super) fn encode<T: Serialize>(v: &T) -> Vec<u8> {
    bincode::serde::encode_to_vec(v, bincode::config::standard()).expect("in-memory encode")
}

/// Decodes a row the model wrote itself; a row that does not decode is corrupt
/// state, which the service refuses to serve (it stops the group).
pub(super) fn decode<T: serde::de::DeserializeOwned>(b: &[u8]) -> Result<T, Corrupt> {
    crate::consensus::decode_bounded(b).map(|(v, _)| v).map_err(|e| Corrupt(e.to_string()))
}

/// The table holds a row the model cannot read.
#[derive(Debug, thiserror::Error)]
#[error("stream state is corrupt: {0}")]
pub struct Corrupt(pub String);

pub(super) type R<T> = Result<T, Corrupt>;

pub(super) fn lp(out: &mut Vec<u8>, s: &[u8]) {
    out.extend_from_slice(&u32::try_from(s.len()).unwrap_or(u32::MAX).to_be_bytes());
    out.extend_from_slice(s);
}

fn meta_key(key: &[u8]) -> Vec<u8> {
    let mut k = vec![b'M'];
    k.extend_from_slice(key);
    k
}

pub(super) fn prefix(kind: u8, key: &[u8]) -> Vec<u8> {
    let mut k = vec![kind];
    lp(&mut k, key);
    k
}

fn entry_key(key: &[u8], id: StreamId) -> Vec<u8> {
    let mut k = prefix(b'E', key);
    k.extend_from_slice(&id.to_bytes());
    k
}

fn group_key(key: &[u8], group: &[u8]) -> Vec<u8> {
    let mut k = prefix(b'G', key);
    k.extend_from_slice(group);
    k
}

fn consumers_prefix(key: &[u8], group: &[u8]) -> Vec<u8> {
    let mut k = prefix(b'C', key);
    lp(&mut k, group);
    k
}

fn consumer_key(key: &[u8], group: &[u8], consumer: &[u8]) -> Vec<u8> {
    let mut k = consumers_prefix(key, group);
    k.extend_from_slice(consumer);
    k
}

fn pel_prefix(key: &[u8], group: &[u8]) -> Vec<u8> {
    let mut k = prefix(b'P', key);
    lp(&mut k, group);
    k
}

fn pel_key(key: &[u8], group: &[u8], id: StreamId) -> Vec<u8> {
    let mut k = pel_prefix(key, group);
    k.extend_from_slice(&id.to_bytes());
    k
}

/// Deletes every row whose key starts with `p`, a bounded batch at a time.
pub(super) fn delete_prefixed<T: Table + ?Sized>(table: &mut T, p: &[u8]) {
    let end = prefix_end(p);
    loop {
        let rows = table.range(p, &end, false, 1024);
        if rows.is_empty() {
            break;
        }
        for (k, _) in rows {
            table.delete(&k);
        }
    }
}

/// The first key after every key starting with `p`.
pub(super) fn prefix_end(p: &[u8]) -> Vec<u8> {
    let mut end = p.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0xff; p.len() + 1]
}

fn range_keys(p: &[u8], from: StreamId, to: StreamId) -> (Vec<u8>, Vec<u8>) {
    let mut a = p.to_vec();
    a.extend_from_slice(&from.to_bytes());
    let b = match to.next() {
        Some(n) => {
            let mut b = p.to_vec();
            b.extend_from_slice(&n.to_bytes());
            b
        }
        None => prefix_end(p),
    };
    (a, b)
}

type Fields = Vec<(Vec<u8>, Vec<u8>)>;

/// The model over a table.
pub struct Streams<'a, T: Table + ?Sized> {
    pub table: &'a mut T,
}

/// Read-only queries over a table.
pub struct View<'a, T: Table + ?Sized> {
    pub table: &'a T,
}

fn entry_value(id: StreamId, fields: &Fields) -> Value {
    let mut flat = Vec::with_capacity(fields.len() * 2);
    for (f, v) in fields {
        flat.push(Value::Bulk(f.clone()));
        flat.push(Value::Bulk(v.clone()));
    }
    Value::Array(vec![id.bulk(), Value::Array(flat)])
}

impl<T: Table + ?Sized> View<'_, T> {
    pub fn meta(&self, key: &[u8]) -> R<Option<StreamMeta>> {
        self.table.get(&meta_key(key)).map(|b| decode(&b)).transpose()
    }

    fn group(&self, key: &[u8], group: &[u8]) -> R<Option<GroupMeta>> {
        self.table.get(&group_key(key, group)).map(|b| decode(&b)).transpose()
    }

    /// Entries with ids in `[from, to]`, at most `count`, newest first when `reverse`.
    pub fn entries(
        &self,
        key: &[u8],
        from: StreamId,
        to: StreamId,
        count: usize,
        reverse: bool,
    ) -> R<Vec<(StreamId, Fields)>> {
        if from > to {
            return Ok(Vec::new());
        }
        let p = prefix(b'E', key);
        let (a, b) = range_keys(&p, from, to);
        let mut out = Vec::new();
        for (k, v) in self.table.range(&a, &b, reverse, count) {
            let id = StreamId::from_bytes(&k[p.len()..]).ok_or_else(|| Corrupt("entry key".into()))?;
            out.push((id, decode(&v)?));
        }
        Ok(out)
    }

    fn entry(&self, key: &[u8], id: StreamId) -> R<Option<Fields>> {
        self.table.get(&entry_key(key, id)).map(|b| decode(&b)).transpose()
    }

    fn pending(
        &self,
        key: &[u8],
        group: &[u8],
        from: StreamId,
        to: StreamId,
        count: usize,
    ) -> R<Vec<(StreamId, Pending)>> {
        if from > to {
            return Ok(Vec::new());
        }
        let p = pel_prefix(key, group);
        let (a, b) = range_keys(&p, from, to);
        let mut out = Vec::new();
        for (k, v) in self.table.range(&a, &b, false, count) {
            let id = StreamId::from_bytes(&k[p.len()..]).ok_or_else(|| Corrupt("pending key".into()))?;
            out.push((id, decode(&v)?));
        }
        Ok(out)
    }

    fn groups(&self, key: &[u8]) -> R<Vec<(Vec<u8>, GroupMeta)>> {
        let p = prefix(b'G', key);
        let mut out = Vec::new();
        for (k, v) in self.table.range(&p, &prefix_end(&p), false, usize::MAX) {
            out.push((k[p.len()..].to_vec(), decode(&v)?));
        }
        Ok(out)
    }

    fn consumers(&self, key: &[u8], group: &[u8]) -> R<Vec<(Vec<u8>, ConsumerMeta)>> {
        let p = consumers_prefix(key, group);
        let mut out = Vec::new();
        for (k, v) in self.table.range(&p, &prefix_end(&p), false, usize::MAX) {
            out.push((k[p.len()..].to_vec(), decode(&v)?));
        }
        Ok(out)
    }

    /// Every stream in the table with its length, consumer groups and pending
    /// entries (for metrics).
    pub fn summaries(&self) -> R<Vec<StreamSummary>> {
        let mut out = Vec::new();
        for (k, v) in self.table.range(b"M", b"N", false, usize::MAX) {
            let name = k[1..].to_vec();
            let meta: StreamMeta = decode(&v)?;
            let groups = self.groups(&name)?;
            let mut pending = 0u64;
            for (g, _) in &groups {
                let p = pel_prefix(&name, g);
                pending += self.table.range(&p, &prefix_end(&p), false, usize::MAX).len() as u64;
            }
            out.push(StreamSummary { name, length: meta.length, groups: groups.len() as u64, pending });
        }
        Ok(out)
    }

    /// XLEN.
    pub fn len(&self, key: &[u8]) -> R<Value> {
        Ok(Value::count(self.meta(key)?.map_or(0, |m| m.length)))
    }

    /// XRANGE / XREVRANGE (`from <= to` in id order either way).
    pub fn range(&self, key: &[u8], from: StreamId, to: StreamId, count: Option<u64>, reverse: bool) -> R<Value> {
        let limit = count.map_or(usize::MAX, |c| usize::try_from(c).unwrap_or(usize::MAX));
        if limit == 0 {
            return Ok(Value::NilArray);
        }
        let entries = self.entries(key, from, to, limit, reverse)?;
        Ok(Value::Array(entries.iter().map(|(id, f)| entry_value(*id, f)).collect()))
    }

    /// One stream's part of XREAD: entries after `after`, or `None` when there are none.
    pub fn read_after(&self, key: &[u8], after: StreamId, count: Option<u64>) -> R<Option<Value>> {
        let Some(from) = after.next() else { return Ok(None) };
        let limit = count.filter(|c| *c > 0).map_or(usize::MAX, |c| usize::try_from(c).unwrap_or(usize::MAX));
        let entries = self.entries(key, from, StreamId::MAX, limit, false)?;
        if entries.is_empty() {
            return Ok(None);
        }
        Ok(Some(Value::Array(entries.iter().map(|(id, f)| entry_value(*id, f)).collect())))
    }

    /// The stream's last id (`$` in XREAD), 0-0 when it does not exist.
    pub fn last_id(&self, key: &[u8]) -> R<StreamId> {
        Ok(self.meta(key)?.map_or(StreamId::MIN, |m| m.last_id))
    }

    /// Whether the group has entries it has not delivered yet (an XREADGROUP `>`
    /// would deliver something).
    pub fn group_has_new(&self, key: &[u8], group: &[u8]) -> R<bool> {
        let Some(g) = self.group(key, group)? else { return Ok(true) };
        let Some(start) = g.last_delivered.next() else { return Ok(false) };
        Ok(!self.entries(key, start, StreamId::MAX, 1, false)?.is_empty())
    }

    /// Whether the group exists on the stream.
    pub fn has_group(&self, key: &[u8], group: &[u8]) -> R<bool> {
        Ok(self.group(key, group)?.is_some())
    }

    /// XPENDING, summary form.
    pub fn pending_summary(&self, key: &[u8], group: &[u8]) -> R<Value> {
        if self.meta(key)?.is_none() || self.group(key, group)?.is_none() {
            return Ok(nogroup_xpending(key, group));
        }
        let all = self.pending(key, group, StreamId::MIN, StreamId::MAX, usize::MAX)?;
        let (Some(first), Some(last)) = (all.first(), all.last()) else {
            return Ok(Value::Array(vec![Value::Integer(0), Value::Nil, Value::Nil, Value::NilArray]));
        };
        let mut per: std::collections::BTreeMap<Vec<u8>, u64> = Default::default();
        for (_, p) in &all {
            *per.entry(p.consumer.clone()).or_default() += 1;
        }
        Ok(Value::Array(vec![
            Value::count(all.len() as u64),
            first.0.bulk(),
            last.0.bulk(),
            Value::Array(
                per.into_iter().map(|(c, n)| Value::Array(vec![Value::Bulk(c), Value::text(&n.to_string())])).collect(),
            ),
        ]))
    }

    /// XPENDING, extended form.
    #[allow(clippy::too_many_arguments)]
    pub fn pending_range(
        &self,
        key: &[u8],
        group: &[u8],
        min_idle_ms: Option<u64>,
        from: StreamId,
        to: StreamId,
        count: u64,
        consumer: Option<&[u8]>,
        now_ms: u64,
    ) -> R<Value> {
        if self.meta(key)?.is_none() || self.group(key, group)?.is_none() {
            return Ok(nogroup_xpending(key, group));
        }
        let mut out = Vec::new();
        if count == 0 {
            return Ok(Value::Array(out));
        }
        for (id, p) in self.pending(key, group, from, to, usize::MAX)? {
            if consumer.is_some_and(|c| c != p.consumer.as_slice()) {
                continue;
            }
            let idle = now_ms.saturating_sub(p.delivery_ms);
            if min_idle_ms.is_some_and(|m| idle < m) {
                continue;
            }
            out.push(Value::Array(vec![
                id.bulk(),
                Value::Bulk(p.consumer.clone()),
                Value::count(idle),
                Value::count(p.deliveries),
            ]));
            if out.len() as u64 >= count {
                break;
            }
        }
        Ok(Value::Array(out))
    }

    /// A group's lag as Redis 7 computes it: exact while the group's read counter
    /// is valid and no tombstone lies ahead of it, estimated otherwise, nil when
    /// it cannot be known.
    fn lag(&self, meta: &StreamMeta, g: &GroupMeta) -> Value {
        if meta.entries_added == 0 {
            return Value::Integer(0);
        }
        let read = match g.entries_read {
            Some(n) if !has_tombstones(meta, g.last_delivered) => Some(n),
            _ => distance_from_first_ever(meta, g.last_delivered),
        };
        // Negative when ENTRIESREAD claimed more than was ever added, as in Redis.
        read.map_or(Value::Nil, |n| Value::Integer((meta.entries_added as i128 - n as i128) as i64))
    }

    /// XINFO STREAM (without FULL).
    pub fn info_stream(&self, key: &[u8]) -> R<Value> {
        let Some(meta) = self.meta(key)? else { return Ok(Value::err(ERR_NO_SUCH_KEY)) };
        let first = self.entries(key, StreamId::MIN, StreamId::MAX, 1, false)?;
        let last = self.entries(key, StreamId::MIN, StreamId::MAX, 1, true)?;
        let nodes = meta.length.div_ceil(NODE_ENTRIES);
        let entry = |e: Option<&(StreamId, Fields)>| e.map_or(Value::Nil, |(id, f)| entry_value(*id, f));
        Ok(Value::Map(vec![
            (Value::text("length"), Value::count(meta.length)),
            (Value::text("radix-tree-keys"), Value::count(nodes)),
            (Value::text("radix-tree-nodes"), Value::count(nodes + 1)),
            (Value::text("last-generated-id"), meta.last_id.bulk()),
            (Value::text("max-deleted-entry-id"), meta.max_deleted_id.bulk()),
            (Value::text("entries-added"), Value::count(meta.entries_added)),
            (Value::text("recorded-first-entry-id"), meta.first_id.bulk()),
            (Value::text("groups"), Value::count(self.groups(key)?.len() as u64)),
            (Value::text("first-entry"), entry(first.first())),
            (Value::text("last-entry"), entry(last.first())),
        ]))
    }

    /// XINFO STREAM FULL: the stream, its first `count` entries (all when 0),
    /// every group with its first `count` pending entries and its consumers.
    pub fn info_stream_full(&self, key: &[u8], count: u64) -> R<Value> {
        let Some(meta) = self.meta(key)? else { return Ok(Value::err(ERR_NO_SUCH_KEY)) };
        let limit = match count {
            0 => usize::MAX,
            n => usize::try_from(n).unwrap_or(usize::MAX),
        };
        let nodes = meta.length.div_ceil(NODE_ENTRIES);
        let entries = self.entries(key, StreamId::MIN, StreamId::MAX, limit, false)?;
        let mut groups = Vec::new();
        for (name, g) in self.groups(key)? {
            let pending = self.pending(key, &name, StreamId::MIN, StreamId::MAX, usize::MAX)?;
            let pel = pending
                .iter()
                .take(limit)
                .map(|(id, p)| {
                    Value::Array(vec![
                        id.bulk(),
                        Value::Bulk(p.consumer.clone()),
                        Value::count(p.delivery_ms),
                        Value::count(p.deliveries),
                    ])
                })
                .collect();
            let mut consumers = Vec::new();
            for (cname, c) in self.consumers(key, &name)? {
                let mine: Vec<_> = pending.iter().filter(|(_, p)| p.consumer == cname).collect();
                let own = mine
                    .iter()
                    .take(limit)
                    .map(|(id, p)| {
                        Value::Array(vec![id.bulk(), Value::count(p.delivery_ms), Value::count(p.deliveries)])
                    })
                    .collect();
                consumers.push(Value::Map(vec![
                    (Value::text("name"), Value::Bulk(cname.clone())),
                    (Value::text("seen-time"), Value::count(c.seen_ms)),
                    (Value::text("pel-count"), Value::count(mine.len() as u64)),
                    (Value::text("pending"), Value::Array(own)),
                ]));
            }
            groups.push(Value::Map(vec![
                (Value::text("name"), Value::Bulk(name.clone())),
                (Value::text("last-delivered-id"), g.last_delivered.bulk()),
                (Value::text("entries-read"), g.entries_read.map_or(Value::Nil, Value::count)),
                (Value::text("lag"), self.lag(&meta, &g)),
                (Value::text("pel-count"), Value::count(pending.len() as u64)),
                (Value::text("pending"), Value::Array(pel)),
                (Value::text("consumers"), Value::Array(consumers)),
            ]));
        }
        Ok(Value::Map(vec![
            (Value::text("length"), Value::count(meta.length)),
            (Value::text("radix-tree-keys"), Value::count(nodes)),
            (Value::text("radix-tree-nodes"), Value::count(nodes + 1)),
            (Value::text("last-generated-id"), meta.last_id.bulk()),
            (Value::text("max-deleted-entry-id"), meta.max_deleted_id.bulk()),
            (Value::text("entries-added"), Value::count(meta.entries_added)),
            (Value::text("recorded-first-entry-id"), meta.first_id.bulk()),
            (Value::text("entries"), Value::Array(entries.iter().map(|(id, f)| entry_value(*id, f)).collect())),
            (Value::text("groups"), Value::Array(groups)),
        ]))
    }

    /// XINFO GROUPS.
    pub fn info_groups(&self, key: &[u8]) -> R<Value> {
        let Some(meta) = self.meta(key)? else { return Ok(Value::err(ERR_NO_SUCH_KEY)) };
        let mut out = Vec::new();
        for (name, g) in self.groups(key)? {
            let consumers = self.consumers(key, &name)?.len() as u64;
            let pending = self.pending(key, &name, StreamId::MIN, StreamId::MAX, usize::MAX)?.len() as u64;
            out.push(Value::Map(vec![
                (Value::text("name"), Value::Bulk(name.clone())),
                (Value::text("consumers"), Value::count(consumers)),
                (Value::text("pending"), Value::count(pending)),
                (Value::text("last-delivered-id"), g.last_delivered.bulk()),
                (Value::text("entries-read"), g.entries_read.map_or(Value::Nil, Value::count)),
                (Value::text("lag"), self.lag(&meta, &g)),
            ]));
        }
        Ok(Value::Array(out))
    }

    /// XINFO CONSUMERS.
    pub fn info_consumers(&self, key: &[u8], group: &[u8], now_ms: u64) -> R<Value> {
        if self.meta(key)?.is_none() {
            return Ok(Value::err(ERR_NO_SUCH_KEY));
        }
        if self.group(key, group)?.is_none() {
            return Ok(nogroup(key, group));
        }
        let pending = self.pending(key, group, StreamId::MIN, StreamId::MAX, usize::MAX)?;
        let mut out = Vec::new();
        for (name, c) in self.consumers(key, group)? {
            let n = pending.iter().filter(|(_, p)| p.consumer == name).count() as u64;
            out.push(Value::Map(vec![
                (Value::text("name"), Value::Bulk(name)),
                (Value::text("pending"), Value::count(n)),
                (Value::text("idle"), Value::count(now_ms.saturating_sub(c.seen_ms))),
            ]));
        }
        Ok(Value::Array(out))
    }
}

/// Whether an entry at or after `from` was deleted (Redis's
/// `streamRangeHasTombstones` to the end of the stream).
fn has_tombstones(meta: &StreamMeta, from: StreamId) -> bool {
    meta.length > 0 && meta.max_deleted_id != StreamId::MIN && meta.max_deleted_id >= from
}

/// How many entries precede `id` and `id` itself since the stream began, when
/// that can be known (Redis's `streamEstimateDistanceFromFirstEverEntry`).
fn distance_from_first_ever(meta: &StreamMeta, id: StreamId) -> Option<u64> {
    if meta.entries_added == 0 {
        return Some(0);
    }
    if meta.length == 0 && id <= meta.last_id {
        return Some(meta.entries_added);
    }
    match id.cmp(&meta.last_id) {
        Ordering::Equal => return Some(meta.entries_added),
        Ordering::Greater => return None,
        Ordering::Less => {}
    }
    if meta.max_deleted_id == StreamId::MIN || meta.max_deleted_id < meta.first_id {
        match id.cmp(&meta.first_id) {
            Ordering::Less => return Some(meta.entries_added - meta.length),
            Ordering::Equal => return Some(meta.entries_added - meta.length + 1),
            Ordering::Greater => {}
        }
    }
    None
}

fn nogroup_xpending(key: &[u8], group: &[u8]) -> Value {
    Value::err(format!(
        "NOGROUP No such key '{}' or consumer group '{}'",
        String::from_utf8_lossy(key),
        String::from_utf8_lossy(group)
    ))
}

impl<T: Table + ?Sized> Streams<'_, T> {
    fn view(&self) -> View<'_, T> {
        View { table: self.table }
    }

    fn put_meta(&mut self, key: &[u8], meta: &StreamMeta) {
        self.table.put(&meta_key(key), &encode(meta));
    }

    fn put_group(&mut self, key: &[u8], group: &[u8], g: &GroupMeta) {
        self.table.put(&group_key(key, group), &encode(g));
    }

    /// Applies one write; its reply. `Err` only for corrupt state.
    pub fn apply(&mut self, cmd: StreamCommand) -> R<Value> {
        match cmd {
            StreamCommand::Add { key, id, fields, no_mkstream, trim, now_ms } => {
                self.add(&key, id, &fields, no_mkstream, trim, now_ms)
            }
            StreamCommand::Trim { key, trim } => {
                let Some(mut meta) = self.view().meta(&key)? else { return Ok(Value::Integer(0)) };
                let n = self.trim(&key, &mut meta, trim)?;
                self.put_meta(&key, &meta);
                Ok(Value::count(n))
            }
            StreamCommand::DelEntries { key, ids } => self.del_entries(&key, &ids),
            StreamCommand::DelKey { key } => {
                if self.view().meta(&key)?.is_none() {
                    return Ok(Value::Integer(0));
                }
                self.table.delete(&meta_key(&key));
                for kind in [b'E', b'G', b'C', b'P'] {
                    delete_prefixed(self.table, &prefix(kind, &key));
                }
                Ok(Value::Integer(1))
            }
            StreamCommand::GroupCreate { key, group, start, mkstream, entries_read } => {
                let meta = match self.view().meta(&key)? {
                    Some(m) => m,
                    None if mkstream => {
                        let m = StreamMeta::default();
                        self.put_meta(&key, &m);
                        m
                    }
                    None => return Ok(Value::err(ERR_GROUP_NEEDS_KEY)),
                };
                if self.view().group(&key, &group)?.is_some() {
                    return Ok(Value::err(ERR_BUSYGROUP));
                }
                let g = self.group_at(&meta, start, entries_read);
                self.put_group(&key, &group, &g);
                Ok(Value::Ok)
            }
            StreamCommand::GroupSetId { key, group, start, entries_read } => {
                let Some(meta) = self.view().meta(&key)? else { return Ok(Value::err(ERR_GROUP_NEEDS_KEY)) };
                if self.view().group(&key, &group)?.is_none() {
                    return Ok(nogroup(&key, &group));
                }
                let g = self.group_at(&meta, start, entries_read);
                self.put_group(&key, &group, &g);
                Ok(Value::Ok)
            }
            StreamCommand::GroupDestroy { key, group } => {
                if self.view().meta(&key)?.is_none() {
                    return Ok(Value::err(ERR_GROUP_NEEDS_KEY));
                }
                if self.view().group(&key, &group)?.is_none() {
                    return Ok(Value::Integer(0));
                }
                self.table.delete(&group_key(&key, &group));
                for p in [consumers_prefix(&key, &group), pel_prefix(&key, &group)] {
                    for (k, _) in self.table.range(&p, &prefix_end(&p), false, usize::MAX) {
                        self.table.delete(&k);
                    }
                }
                Ok(Value::Integer(1))
            }
            StreamCommand::CreateConsumer { key, group, consumer, now_ms } => {
                if let Some(missing) = self.missing_group(&key, &group)? {
                    return Ok(missing);
                }
                let ck = consumer_key(&key, &group, &consumer);
                if self.table.get(&ck).is_some() {
                    return Ok(Value::Integer(0));
                }
                self.table.put(&ck, &encode(&ConsumerMeta { seen_ms: now_ms }));
                Ok(Value::Integer(1))
            }
            StreamCommand::DelConsumer { key, group, consumer } => {
                if let Some(missing) = self.missing_group(&key, &group)? {
                    return Ok(missing);
                }
                let ck = consumer_key(&key, &group, &consumer);
                if self.table.get(&ck).is_none() {
                    return Ok(Value::Integer(0));
                }
                self.table.delete(&ck);
                let mut n = 0;
                for (id, p) in self.view().pending(&key, &group, StreamId::MIN, StreamId::MAX, usize::MAX)? {
                    if p.consumer == consumer {
                        self.table.delete(&pel_key(&key, &group, id));
                        n += 1;
                    }
                }
                Ok(Value::count(n))
            }
            StreamCommand::ReadGroup { key, group, consumer, from, count, no_ack, now_ms } => {
                self.read_group(&key, &group, &consumer, from, count, no_ack, now_ms)
            }
            StreamCommand::Ack { key, group, ids } => {
                if self.view().meta(&key)?.is_none() || self.view().group(&key, &group)?.is_none() {
                    return Ok(Value::Integer(0));
                }
                let mut n = 0;
                for id in ids {
                    let pk = pel_key(&key, &group, id);
                    if self.table.get(&pk).is_some() {
                        self.table.delete(&pk);
                        n += 1;
                    }
                }
                Ok(Value::count(n))
            }
            StreamCommand::Claim { key, group, consumer, min_idle_ms, ids, options, now_ms } => {
                self.claim(&key, &group, &consumer, min_idle_ms, &ids, &options, now_ms)
            }
            StreamCommand::AutoClaim { key, group, consumer, min_idle_ms, start, count, just_id, now_ms } => {
                self.auto_claim(&key, &group, &consumer, min_idle_ms, start, count, just_id, now_ms)
            }
            // The service runs these through the queue model.
            StreamCommand::Queue(_) => Ok(Value::err("ERR concord: a queue command has no Redis reply")),
            StreamCommand::Blob(_) => Ok(Value::err("ERR concord: a blob command has no Redis reply")),
        }
    }

    /// XGROUP's error when the stream or its group does not exist.
    fn missing_group(&self, key: &[u8], group: &[u8]) -> R<Option<Value>> {
        if self.view().meta(key)?.is_none() {
            return Ok(Some(Value::err(ERR_GROUP_NEEDS_KEY)));
        }
        if self.view().group(key, group)?.is_none() {
            return Ok(Some(nogroup(key, group)));
        }
        Ok(None)
    }

    fn group_at(&self, meta: &StreamMeta, start: GroupStart, entries_read: Option<u64>) -> GroupMeta {
        let last_delivered = match start {
            GroupStart::Last => meta.last_id,
            GroupStart::At(id) => id,
        };
        GroupMeta { last_delivered, entries_read }
    }

    fn add(
        &mut self,
        key: &[u8],
        id: IdSpec,
        fields: &Fields,
        no_mkstream: bool,
        trim: Option<Trim>,
        now_ms: u64,
    ) -> R<Value> {
        let mut meta = match self.view().meta(key)? {
            Some(m) => m,
            None if no_mkstream => return Ok(Value::Nil),
            None => StreamMeta::default(),
        };
        let last = meta.last_id;
        let new_id = match id {
            IdSpec::Explicit(id) if id == StreamId::MIN => return Ok(Value::err(ERR_ZERO_ID)),
            IdSpec::Explicit(id) if id <= last => return Ok(Value::err(ERR_SMALLER_ID)),
            IdSpec::Explicit(id) => id,
            IdSpec::AutoSeq(ms) => match ms.cmp(&last.ms) {
                Ordering::Less => return Ok(Value::err(ERR_SMALLER_ID)),
                Ordering::Equal => match last.seq.checked_add(1) {
                    Some(seq) => StreamId::new(ms, seq),
                    None => return Ok(Value::err(ERR_EXHAUSTED)),
                },
                Ordering::Greater => StreamId::new(ms, 0),
            },
            IdSpec::Auto => {
                if now_ms > last.ms {
                    StreamId::new(now_ms, 0)
                } else {
                    match last.next() {
                        Some(id) => id,
                        None => return Ok(Value::err(ERR_EXHAUSTED)),
                    }
                }
            }
        };
        self.table.put(&entry_key(key, new_id), &encode(fields));
        if meta.length == 0 {
            meta.first_id = new_id;
        }
        meta.length += 1;
        meta.last_id = new_id;
        meta.entries_added += 1;
        if let Some(trim) = trim {
            self.trim(key, &mut meta, trim)?;
        }
        self.put_meta(key, &meta);
        Ok(new_id.bulk())
    }

    /// Trims the stream's head; the number of entries removed. Reads only the
    /// entries it removes (and the one after, the new first entry).
    fn trim(&mut self, key: &[u8], meta: &mut StreamMeta, trim: Trim) -> R<u64> {
        let mut remove = match trim.strategy {
            TrimStrategy::MaxLen(max) => meta.length.saturating_sub(max),
            TrimStrategy::MinId(min) => match min.prev() {
                Some(last) => self.view().entries(key, StreamId::MIN, last, usize::MAX, false)?.len() as u64,
                None => 0,
            },
        };
        if trim.approx {
            // Whole nodes from the head: full ones of NODE_ENTRIES, the last one
            // partial; a node goes only if every entry in it may go.
            if remove < meta.length {
                remove -= remove % NODE_ENTRIES;
            }
            if let Some(limit) = trim.limit {
                if remove > limit {
                    remove = limit - limit % NODE_ENTRIES;
                }
            }
        }
        if remove == 0 {
            return Ok(0);
        }
        let take = usize::try_from(remove).unwrap_or(usize::MAX);
        let head = self.view().entries(key, StreamId::MIN, StreamId::MAX, take.saturating_add(1), false)?;
        for (id, _) in head.iter().take(take) {
            self.table.delete(&entry_key(key, *id));
        }
        meta.length -= remove;
        meta.first_id = head.get(take).map_or(StreamId::MIN, |(id, _)| *id);
        Ok(remove)
    }

    fn del_entries(&mut self, key: &[u8], ids: &[StreamId]) -> R<Value> {
        let Some(mut meta) = self.view().meta(key)? else { return Ok(Value::Integer(0)) };
        let mut n = 0;
        for id in ids {
            let ek = entry_key(key, *id);
            if self.table.get(&ek).is_some() {
                self.table.delete(&ek);
                n += 1;
                meta.length -= 1;
                meta.max_deleted_id = meta.max_deleted_id.max(*id);
            }
        }
        meta.first_id = self
            .view()
            .entries(key, StreamId::MIN, StreamId::MAX, 1, false)?
            .first()
            .map_or(StreamId::MIN, |(id, _)| *id);
        self.put_meta(key, &meta);
        Ok(Value::count(n))
    }

    /// Creates the consumer if needed and records it as seen now.
    fn touch_consumer(&mut self, key: &[u8], group: &[u8], consumer: &[u8], now_ms: u64) {
        self.table.put(&consumer_key(key, group, consumer), &encode(&ConsumerMeta { seen_ms: now_ms }));
    }

    #[allow(clippy::too_many_arguments)]
    fn read_group(
        &mut self,
        key: &[u8],
        group: &[u8],
        consumer: &[u8],
        from: GroupRead,
        count: Option<u64>,
        no_ack: bool,
        now_ms: u64,
    ) -> R<Value> {
        let meta = self.view().meta(key)?;
        let g = self.view().group(key, group)?;
        let (Some(meta), Some(mut g)) = (meta, g) else {
            return Ok(Value::err(format!(
                "NOGROUP No such key '{}' or consumer group '{}' in XREADGROUP with GROUP option",
                String::from_utf8_lossy(key),
                String::from_utf8_lossy(group)
            )));
        };
        let limit = count.filter(|c| *c > 0).map_or(usize::MAX, |c| usize::try_from(c).unwrap_or(usize::MAX));
        match from {
            GroupRead::New => {
                self.touch_consumer(key, group, consumer, now_ms);
                let Some(start) = g.last_delivered.next() else { return Ok(Value::NilArray) };
                let entries = self.view().entries(key, start, StreamId::MAX, limit, false)?;
                if entries.is_empty() {
                    return Ok(Value::NilArray);
                }
                for (id, _) in &entries {
                    g.entries_read = match g.entries_read {
                        Some(n) if !has_tombstones(&meta, *id) => Some(n + 1),
                        _ => distance_from_first_ever(&meta, *id),
                    };
                    g.last_delivered = *id;
                    if !no_ack {
                        let p = Pending { consumer: consumer.to_vec(), delivery_ms: now_ms, deliveries: 1 };
                        self.table.put(&pel_key(key, group, *id), &encode(&p));
                    }
                }
                self.put_group(key, group, &g);
                Ok(Value::Array(entries.iter().map(|(id, f)| entry_value(*id, f)).collect()))
            }
            GroupRead::History(after) => {
                self.touch_consumer(key, group, consumer, now_ms);
                let Some(start) = after.next() else { return Ok(Value::Array(Vec::new())) };
                let mut out = Vec::new();
                for (id, mut p) in self.view().pending(key, group, start, StreamId::MAX, usize::MAX)? {
                    if p.consumer != consumer {
                        continue;
                    }
                    match self.view().entry(key, id)? {
                        Some(f) => {
                            // A history read is a delivery again, as in Redis.
                            p.delivery_ms = now_ms;
                            p.deliveries += 1;
                            self.table.put(&pel_key(key, group, id), &encode(&p));
                            out.push(entry_value(id, &f));
                        }
                        None => out.push(Value::Array(vec![id.bulk(), Value::NilArray])),
                    }
                    if out.len() >= limit {
                        break;
                    }
                }
                Ok(Value::Array(out))
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn claim(
        &mut self,
        key: &[u8],
        group: &[u8],
        consumer: &[u8],
        min_idle_ms: u64,
        ids: &[StreamId],
        o: &ClaimOptions,
        now_ms: u64,
    ) -> R<Value> {
        let (Some(_), Some(mut g)) = (self.view().meta(key)?, self.view().group(key, group)?) else {
            return Ok(nogroup_xpending(key, group));
        };
        if let Some(last) = o.last_id {
            if last > g.last_delivered {
                g.last_delivered = last;
                self.put_group(key, group, &g);
            }
        }
        let mut out = Vec::new();
        for id in ids {
            let pk = pel_key(key, group, *id);
            let entry = self.view().entry(key, *id)?;
            let (mut p, forced): (Pending, bool) = match self.table.get(&pk) {
                Some(b) => (decode(&b)?, false),
                None if o.force && entry.is_some() => {
                    (Pending { consumer: consumer.to_vec(), delivery_ms: now_ms, deliveries: 1 }, true)
                }
                None => continue,
            };
            let Some(fields) = entry else {
                // The entry was deleted: it leaves the pending list.
                self.table.delete(&pk);
                continue;
            };
            // As in Redis, an entry FORCE just made pending has no idle time to check.
            if !forced && min_idle_ms > 0 && now_ms.saturating_sub(p.delivery_ms) < min_idle_ms {
                continue;
            }
            p.consumer = consumer.to_vec();
            p.delivery_ms = o.delivery_time_ms.unwrap_or(now_ms);
            if let Some(n) = o.retry_count {
                p.deliveries = n;
            } else if !o.just_id {
                p.deliveries += 1;
            }
            self.table.put(&pk, &encode(&p));
            out.push(match o.just_id {
                true => id.bulk(),
                false => entry_value(*id, &fields),
            });
        }
        // The claiming consumer exists from its first successful claim on.
        if !out.is_empty() {
            self.touch_consumer(key, group, consumer, now_ms);
        }
        Ok(Value::Array(out))
    }

    #[allow(clippy::too_many_arguments)]
    fn auto_claim(
        &mut self,
        key: &[u8],
        group: &[u8],
        consumer: &[u8],
        min_idle_ms: u64,
        start: StreamId,
        count: u64,
        just_id: bool,
        now_ms: u64,
    ) -> R<Value> {
        if self.view().meta(key)?.is_none() || self.view().group(key, group)?.is_none() {
            return Ok(nogroup_xpending(key, group));
        }
        self.touch_consumer(key, group, consumer, now_ms);
        // Redis scans at most count * 10 pending entries per call.
        let scan = usize::try_from(count.saturating_mul(10)).unwrap_or(usize::MAX);
        let candidates = self.view().pending(key, group, start, StreamId::MAX, scan.saturating_add(1))?;
        let mut claimed = Vec::new();
        let mut deleted = Vec::new();
        let mut next = StreamId::MIN;
        let mut claimed_n = 0u64;
        for (i, (id, mut p)) in candidates.into_iter().enumerate() {
            if i >= scan || claimed_n >= count {
                next = id;
                break;
            }
            let pk = pel_key(key, group, id);
            let Some(fields) = self.view().entry(key, id)? else {
                self.table.delete(&pk);
                deleted.push(id.bulk());
                continue;
            };
            if min_idle_ms > 0 && now_ms.saturating_sub(p.delivery_ms) < min_idle_ms {
                continue;
            }
            p.consumer = consumer.to_vec();
            p.delivery_ms = now_ms;
            if !just_id {
                p.deliveries += 1;
            }
            self.table.put(&pk, &encode(&p));
            claimed_n += 1;
            claimed.push(match just_id {
                true => id.bulk(),
                false => entry_value(id, &fields),
            });
        }
        Ok(Value::Array(vec![next.bulk(), Value::Array(claimed), Value::Array(deleted)]))
    }
}

#[cfg(test)]
mod tests;
