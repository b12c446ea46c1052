//! The Redis Streams gateway on `--listen-redis-urls`: Redis 7's stream
//! commands over RESP, answered by the stream groups of the catalog (see
//! [`crate::streams`]).
//!
//! Each stream is a Raft group of its own, found and created through
//! [`super::stream_place`]; the first write that makes a stream exist (XADD,
//! XGROUP CREATE MKSTREAM) creates it. A command on a stream that does not
//! exist is answered by the same model over an empty table, so it gets exactly
//! the reply Redis gives for a missing key. Guarantees are the stream
//! service's: writes answered after a quorum fsynced them, reads linearizable.
//!
//! Limits (named settings): connections (`--redis-max-clients`), request size
//! (`--max-request-bytes` bounds a bulk string and a whole command), and keys
//! ([`crate::etcd_store::catalog::MAX_NAME_BYTES`]). A member answers the
//! streams whose group it hosts and forwards commands on the others to a member
//! that does.

pub mod parse;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;

use super::groups::GroupHost;
use super::stream_place::{Place, PlaceError, StreamPlacement};
use super::Node;
use crate::consensus::MemberId;
use crate::etcd_store::catalog::ServiceKind;
use crate::resp::{Protocol, Reply, Session};
use crate::streams::model::{Corrupt, GroupRead, StreamCommand, Streams, Table, Value, View};
use crate::streams::{StreamError, StreamGroup};
use parse::{ReadFrom, Request};

/// Longest a blocked read sleeps before looking again for streams created
/// meanwhile (a stream created elsewhere has no group here to wake it).
const BLOCK_POLL: Duration = Duration::from_millis(50);

/// A command another member forwards here, for a stream this member holds.
#[derive(serde::Serialize, serde::Deserialize)]
struct Forwarded {
    resp3: bool,
    args: Vec<Vec<u8>>,
}

/// How long one forwarded round of a `BLOCK 0` read waits before it is asked again.
const FORWARDED_BLOCK: Duration = Duration::from_secs(10);

/// Answers commands forwarded by other members' gateways (a node call, see
/// `EtcdStore::serve_node_calls`).
pub struct ForwardedCalls(pub std::sync::Weak<RedisGateway>);

impl crate::consensus::MemberCalls for ForwardedCalls {
    fn call(&self, req: Vec<u8>) -> openraft::base::BoxFuture<'static, Result<Vec<u8>, String>> {
        let gateway = self.0.upgrade();
        Box::pin(async move {
            let gateway = gateway.ok_or("the Redis gateway has stopped")?;
            let (f, _) = crate::consensus::decode_bounded::<Forwarded>(&req).map_err(|e| e.to_string())?;
            if f.args.is_empty() {
                return Err("a forwarded command without a name".into());
            }
            let protocol = if f.resp3 { Protocol::Resp3 } else { Protocol::Resp2 };
            let reply = gateway.run(f.args, protocol, true).await;
            bincode::serde::encode_to_vec(&reply, bincode::config::standard()).map_err(|e| e.to_string())
        })
    }
}

/// The gateway: [`crate::resp::Handler`] for the Redis listener.
pub struct RedisGateway {
    pub node: Arc<Node>,
    pub host: Arc<GroupHost>,
}

fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

fn reply(v: Value, protocol: Protocol) -> Reply {
    match v {
        Value::Ok => Reply::Simple("OK".into()),
        Value::Error(e) => Reply::Error(e),
        Value::Integer(n) => Reply::Integer(n),
        Value::Bulk(b) => Reply::Bulk(b),
        Value::Nil => Reply::Nil,
        Value::NilArray => Reply::NilArray,
        Value::Array(items) => Reply::Array(items.into_iter().map(|v| reply(v, protocol)).collect()),
        Value::Map(pairs) => {
            Reply::Map(pairs.into_iter().map(|(k, v)| (reply(k, protocol), reply(v, protocol))).collect())
        }
        Value::StreamMap(pairs) => match protocol {
            Protocol::Resp3 => {
                Reply::Map(pairs.into_iter().map(|(k, v)| (reply(k, protocol), reply(v, protocol))).collect())
            }
            Protocol::Resp2 => Reply::Array(
                pairs.into_iter().map(|(k, v)| Reply::Array(vec![reply(k, protocol), reply(v, protocol)])).collect(),
            ),
        },
    }
}

fn failure(e: StreamError) -> Reply {
    match e {
        StreamError::Consensus(e) => Reply::Error(format!("TRYAGAIN {e}")),
        StreamError::Storage(e) => Reply::Error(format!("ERR {e}")),
    }
}

/// The model's answer for a stream that does not exist.
fn on_missing(cmd: StreamCommand) -> Value {
    let mut empty = BTreeMap::new();
    Streams { table: &mut empty }.apply(cmd).unwrap_or_else(|e| Value::err(format!("ERR {e}")))
}

impl RedisGateway {
    fn timeout(&self) -> Duration {
        self.node.config.request_timeout()
    }

    fn placement(&self) -> StreamPlacement<'_> {
        StreamPlacement { node: &self.node, host: &self.host, service: ServiceKind::Stream }
    }

    /// Where stream `key` is (see [`StreamPlacement::place`]), created when `create`.
    async fn place(&self, key: &[u8], create: bool) -> Result<Place, Reply> {
        self.place_as_of(key, create, true).await
    }

    /// [`RedisGateway::place`]; `fresh` false looks only at the catalog as this
    /// member has applied it.
    async fn place_as_of(&self, key: &[u8], create: bool, fresh: bool) -> Result<Place, Reply> {
        self.placement().place(key, create, fresh).await.map_err(|e| match e {
            PlaceError::Failed(e) => Reply::Error(format!("ERR {e}")),
            PlaceError::Unavailable(e) => Reply::Error(format!("TRYAGAIN {e}")),
        })
    }

    /// The group of stream `key` when this member holds it (`None`: no such stream).
    async fn resolve(&self, key: &[u8], create: bool) -> Result<Option<StreamGroup>, Reply> {
        match self.place(key, create).await? {
            Place::Here(g) => Ok(Some(*g)),
            Place::Missing => Ok(None),
            Place::Elsewhere(_) => Err(Reply::Error(format!(
                "ERR concord: stream '{}' is held by other members; this command cannot be forwarded",
                String::from_utf8_lossy(key)
            ))),
        }
    }

    /// Has a member holding the stream run `args` (the whole command), trying its
    /// replicas in turn. A blocking read waits there; `BLOCK 0` (forever) is asked
    /// again in rounds of [`FORWARDED_BLOCK`].
    async fn forward(&self, replicas: &[MemberId], protocol: Protocol, mut args: Vec<Vec<u8>>) -> Reply {
        // BLOCK is an option of XREAD and XREADGROUP, before their STREAMS.
        let reads = args[0].eq_ignore_ascii_case(b"XREAD") || args[0].eq_ignore_ascii_case(b"XREADGROUP");
        let streams_at = args.iter().position(|a| a.eq_ignore_ascii_case(b"STREAMS")).unwrap_or(args.len());
        let block_at = args[..streams_at]
            .iter()
            .position(|a| a.eq_ignore_ascii_case(b"BLOCK"))
            .filter(|i| reads && *i + 1 < streams_at);
        let block_ms = block_at.and_then(|i| parse::parse_i64(&args[i + 1])).unwrap_or(0).max(0) as u64;
        let forever = block_at.is_some() && block_ms == 0;
        if forever {
            if let Some(i) = block_at {
                args[i + 1] = FORWARDED_BLOCK.as_millis().to_string().into_bytes();
            }
            // Each round would take `$` anew and miss what was added between
            // rounds: an XREAD's `$` becomes the stream's last id once, first.
            let xread = args[0].eq_ignore_ascii_case(b"XREAD");
            if let (true, [_, key, id]) = (xread, &args[streams_at..]) {
                if id.as_slice() == b"$" {
                    let info = vec![b"XINFO".to_vec(), b"STREAM".to_vec(), key.clone()];
                    let last = match Box::pin(self.forward(replicas, protocol, info)).await {
                        Reply::Map(fields) => fields.into_iter().find_map(|(k, v)| match (k, v) {
                            (Reply::Bulk(k), Reply::Bulk(v)) if k == b"last-generated-id" => Some(v),
                            _ => None,
                        }),
                        _ => None,
                    };
                    if let Some(last) = last {
                        let at = args.len() - 1;
                        args[at] = last;
                    }
                }
            }
        }
        // The member asked may first wait for its replica to start, then for the
        // commit: twice the request timeout, plus the read's own wait.
        let timeout = self.timeout() * 2
            + Duration::from_millis(if forever { FORWARDED_BLOCK.as_millis() as u64 } else { block_ms });
        // A read may be asked again elsewhere; a write (XREADGROUP's delivery too)
        // goes to one member only: after a failed attempt it may have been applied
        // there, and asking another would apply it twice. Members heard from
        // lately are asked first.
        let idempotent = is_read(&args[0]);
        let order = self.placement().call_order(replicas, idempotent);
        let forwarded = Forwarded { resp3: protocol == Protocol::Resp3, args };
        let body = match super::stream_place::node_call(super::stream_place::NodeCall::Redis, &forwarded) {
            Ok(b) => b,
            Err(e) => return Reply::Error(format!("ERR {e}")),
        };
        loop {
            let mut last = String::from("no replica");
            let mut answer = None;
            for member in &order {
                match self.node.group.call_node(*member, body.clone(), timeout).await {
                    Ok(bytes) => match crate::consensus::decode_bounded::<Reply>(&bytes) {
                        Ok((r, _)) => {
                            answer = Some(r);
                            break;
                        }
                        Err(e) => last = e.to_string(),
                    },
                    Err(e) => last = e,
                }
            }
            match answer {
                Some(Reply::NilArray) if forever => continue,
                Some(r) => return r,
                None if idempotent => {
                    return Reply::Error(format!("TRYAGAIN concord: no member holding the stream answered: {last}"))
                }
                None => {
                    return Reply::Error(format!(
                        "TRYAGAIN concord: the member holding the stream did not answer; the command may or may not have been applied: {last}"
                    ))
                }
            }
        }
    }

    /// Forwards a command on streams this member does not hold (see
    /// [`RedisGateway::forward`]); `None`: run it here.
    async fn route(&self, request: &Request, args: &[Vec<u8>], protocol: Protocol) -> Option<Reply> {
        let keys = request.keys();
        let mut elsewhere = Vec::new();
        for key in &keys {
            match self.place(key, false).await {
                Ok(Place::Elsewhere(replicas)) => elsewhere.push((key.to_vec(), replicas)),
                Ok(_) => {}
                Err(r) => return Some(r),
            }
        }
        if elsewhere.is_empty() {
            return None;
        }
        if keys.len() == 1 {
            let (_, replicas) = &elsewhere[0];
            return Some(self.forward(replicas, protocol, args.to_vec()).await);
        }
        match request {
            // Counted a key at a time, here or where the key is held.
            Request::Del(_) | Request::Exists(_) => {
                let mut n = 0;
                for key in keys {
                    let one = vec![args[0].clone(), key.to_vec()];
                    let r = match elsewhere.iter().find(|(k, _)| k == key) {
                        Some((_, replicas)) => self.forward(replicas, protocol, one).await,
                        None => Box::pin(self.run(one, protocol, true)).await,
                    };
                    match r {
                        Reply::Integer(k) => n += k,
                        other => return Some(other),
                    }
                }
                Some(Reply::Integer(n))
            }
            _ => Some(Reply::Error(
                "ERR concord: this command names streams held by different members; name one stream per command".into(),
            )),
        }
    }

    async fn write(&self, cmd: StreamCommand, protocol: Protocol, args: &[Vec<u8>], forwarded: bool) -> Reply {
        let create = matches!(
            cmd,
            StreamCommand::Add { no_mkstream: false, .. } | StreamCommand::GroupCreate { mkstream: true, .. }
        );
        match self.place(cmd.key(), create).await {
            Ok(Place::Here(g)) => match g.write(&cmd, self.timeout()).await {
                Ok(v) => reply(v, protocol),
                Err(e) => failure(e),
            },
            Ok(Place::Missing) => reply(on_missing(cmd), protocol),
            // A stream just created, on other members.
            Ok(Place::Elsewhere(replicas)) if !forwarded => self.forward(&replicas, protocol, args.to_vec()).await,
            Ok(Place::Elsewhere(_)) => {
                Reply::Error("ERR concord: a forwarded command reached a member without the stream".into())
            }
            Err(r) => r,
        }
    }

    /// `f` over stream `key`'s state, linearizable (over an empty table when
    /// the stream does not exist).
    async fn read<T>(&self, key: &[u8], f: impl Fn(&View<'_, dyn Table>) -> Result<T, Corrupt>) -> Result<T, Reply> {
        match self.resolve(key, false).await? {
            Some(g) => g.read(self.timeout(), f).await.map_err(failure),
            None => {
                let empty: &dyn Table = &BTreeMap::new();
                f(&View { table: empty }).map_err(|e| Reply::Error(format!("ERR {e}")))
            }
        }
    }

    /// Runs one command; `forwarded`: another member sent it here, so it runs here.
    async fn run(&self, args: Vec<Vec<u8>>, protocol: Protocol, forwarded: bool) -> Reply {
        let now = now_ms();
        let request = match parse::parse(&args, now) {
            Ok(r) => r,
            Err(e) => return Reply::Error(e),
        };
        if !forwarded {
            if let Some(r) = self.route(&request, &args, protocol).await {
                return r;
            }
        }
        let done = |r: Result<Value, Reply>| match r {
            Ok(v) => reply(v, protocol),
            Err(r) => r,
        };
        match request {
            Request::Write(mut cmd) => {
                stamp(&mut cmd, now);
                self.write(cmd, protocol, &args, forwarded).await
            }
            Request::Del(keys) => {
                let mut deleted = 0;
                for key in keys {
                    match self.resolve(&key, false).await {
                        Ok(Some(g)) => match g.write(&StreamCommand::DelKey { key }, self.timeout()).await {
                            Ok(Value::Integer(n)) => deleted += n,
                            Ok(other) => return reply(other, protocol),
                            Err(e) => return failure(e),
                        },
                        Ok(None) => {}
                        Err(r) => return r,
                    }
                }
                Reply::Integer(deleted)
            }
            Request::Len(key) => done(self.read(&key, |v| v.len(&key)).await),
            Request::Range { key, from, to, count, reverse } => {
                done(self.read(&key, |v| v.range(&key, from, to, count, reverse)).await)
            }
            Request::PendingSummary { key, group } => done(self.read(&key, |v| v.pending_summary(&key, &group)).await),
            Request::PendingRange { key, group, min_idle_ms, from, to, count, consumer } => done(
                self.read(&key, |v| {
                    v.pending_range(&key, &group, min_idle_ms, from, to, count, consumer.as_deref(), now)
                })
                .await,
            ),
            Request::InfoStream(key) => done(self.read(&key, |v| v.info_stream(&key)).await),
            Request::InfoStreamFull { key, count } => done(self.read(&key, |v| v.info_stream_full(&key, count)).await),
            Request::Exists(keys) => {
                let mut n = 0;
                for key in keys {
                    match self.read(&key, |v| v.meta(&key).map(|m| m.is_some())).await {
                        Ok(true) => n += 1,
                        Ok(false) => {}
                        Err(r) => return r,
                    }
                }
                Reply::Integer(n)
            }
            Request::Type(key) => match self.read(&key, |v| v.meta(&key).map(|m| m.is_some())).await {
                Ok(true) => Reply::Simple("stream".into()),
                Ok(false) => Reply::Simple("none".into()),
                Err(r) => r,
            },
            Request::Help(lines) => Reply::Array(lines.iter().map(|l| Reply::Simple((*l).to_string())).collect()),
            Request::InfoGroups(key) => done(self.read(&key, |v| v.info_groups(&key)).await),
            Request::InfoConsumers { key, group } => {
                done(self.read(&key, |v| v.info_consumers(&key, &group, now)).await)
            }
            Request::Read { count, block_ms, streams } => self.xread(count, block_ms, streams, protocol).await,
            Request::ReadGroup { group, consumer, count, block_ms, no_ack, streams } => {
                self.xreadgroup(&group, &consumer, count, block_ms, no_ack, streams, protocol).await
            }
        }
    }

    async fn xread(
        &self,
        count: Option<u64>,
        block_ms: Option<u64>,
        streams: Vec<(Vec<u8>, ReadFrom)>,
        protocol: Protocol,
    ) -> Reply {
        // `$` is the last id when the read starts.
        let mut after = Vec::with_capacity(streams.len());
        for (key, from) in &streams {
            let id = match from {
                ReadFrom::After(id) => *id,
                ReadFrom::Last => match self.read(key, |v| v.last_id(key)).await {
                    Ok(id) => id,
                    Err(r) => return r,
                },
            };
            after.push((key.clone(), id));
        }
        let deadline = block_deadline(block_ms);
        let mut first = true;
        loop {
            let mut found = Vec::new();
            let mut wakers = Vec::new();
            for (key, id) in &after {
                let g = match self.place_as_of(key, false, first).await {
                    Ok(Place::Here(g)) => g,
                    Ok(Place::Missing) => continue,
                    Ok(Place::Elsewhere(_)) => {
                        return Reply::Error(format!(
                        "ERR concord: stream '{}' was created on other members while this read waited; read it again",
                        String::from_utf8_lossy(key)
                    ))
                    }
                    Err(r) => return r,
                };
                wakers.push(g.applied());
                let part = if first {
                    g.read(self.timeout(), |v| v.read_after(key, *id, count)).await
                } else {
                    g.read_local(|v| v.read_after(key, *id, count))
                };
                match part {
                    Ok(Some(entries)) => found.push((Value::Bulk(key.clone()), entries)),
                    Ok(None) => {}
                    Err(e) => return failure(e),
                }
            }
            first = false;
            if !found.is_empty() {
                return reply(Value::StreamMap(found), protocol);
            }
            let Some(deadline) = deadline else { return Reply::NilArray };
            if !wait_applied(wakers, deadline).await {
                return Reply::NilArray;
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    async fn xreadgroup(
        &self,
        group: &[u8],
        consumer: &[u8],
        count: Option<u64>,
        block_ms: Option<u64>,
        no_ack: bool,
        streams: Vec<(Vec<u8>, GroupRead)>,
        protocol: Protocol,
    ) -> Reply {
        // Every stream and group must exist before anything is delivered.
        let mut groups = Vec::with_capacity(streams.len());
        for (key, _) in &streams {
            let exists = match self.resolve(key, false).await {
                Ok(Some(g)) => match g.read(self.timeout(), |v| v.has_group(key, group)).await {
                    Ok(true) => Some(g),
                    Ok(false) => None,
                    Err(e) => return failure(e),
                },
                Ok(None) => None,
                Err(r) => return r,
            };
            let Some(g) = exists else {
                return Reply::Error(format!(
                    "NOGROUP No such key '{}' or consumer group '{}' in XREADGROUP with GROUP option",
                    String::from_utf8_lossy(key),
                    String::from_utf8_lossy(group)
                ));
            };
            groups.push(g);
        }
        let deadline = block_deadline(block_ms);
        let mut first = true;
        loop {
            let mut found = Vec::new();
            let mut wakers = Vec::new();
            let mut any_history = false;
            for ((key, from), g) in streams.iter().zip(&groups) {
                wakers.push(g.applied());
                any_history |= matches!(from, GroupRead::History(_));
                // A blocked read proposes again only when this member has applied
                // something the group has not delivered (a delivery is a write).
                if !first {
                    match g.read_local(|v| v.group_has_new(key, group)) {
                        Ok(false) => continue,
                        Ok(true) => {}
                        Err(e) => return failure(e),
                    }
                }
                let cmd = StreamCommand::ReadGroup {
                    key: key.clone(),
                    group: group.to_vec(),
                    consumer: consumer.to_vec(),
                    from: *from,
                    count,
                    no_ack,
                    now_ms: now_ms(),
                };
                match g.write(&cmd, self.timeout()).await {
                    Ok(Value::NilArray) => {}
                    Ok(Value::Error(e)) => return Reply::Error(e),
                    Ok(entries) => found.push((Value::Bulk(key.clone()), entries)),
                    Err(e) => return failure(e),
                }
            }
            first = false;
            if !found.is_empty() {
                return reply(Value::StreamMap(found), protocol);
            }
            let Some(deadline) = deadline.filter(|_| !any_history) else { return Reply::NilArray };
            if !wait_applied(wakers, deadline).await {
                return Reply::NilArray;
            }
        }
    }
}

/// When a blocking read gives up: `None` when it does not block, `Some(None)`
/// for `BLOCK 0` (never).
fn block_deadline(block_ms: Option<u64>) -> Option<Option<tokio::time::Instant>> {
    block_ms.map(|ms| match ms {
        0 => None,
        ms => Some(tokio::time::Instant::now() + Duration::from_millis(ms)),
    })
}

/// Whether command `name` only reads (so it may be asked of several members).
fn is_read(name: &[u8]) -> bool {
    const READS: [&[u8]; 9] =
        [b"XLEN", b"XRANGE", b"XREVRANGE", b"XREAD", b"XPENDING", b"XINFO", b"EXISTS", b"TYPE", b"PING"];
    READS.iter().any(|r| name.eq_ignore_ascii_case(r))
}

/// Sets the proposer's clock in a write.
fn stamp(cmd: &mut StreamCommand, now: u64) {
    match cmd {
        StreamCommand::Add { now_ms, .. }
        | StreamCommand::CreateConsumer { now_ms, .. }
        | StreamCommand::ReadGroup { now_ms, .. }
        | StreamCommand::Claim { now_ms, .. }
        | StreamCommand::AutoClaim { now_ms, .. } => *now_ms = now,
        _ => {}
    }
}

/// Waits until one of the groups applies something after its receiver was
/// taken, [`BLOCK_POLL`] passes (a stream created meanwhile has no receiver
/// here), or the deadline (`None`: none) passes; false once the deadline has
/// passed.
async fn wait_applied(
    mut wakers: Vec<tokio::sync::watch::Receiver<u64>>,
    deadline: Option<tokio::time::Instant>,
) -> bool {
    let any = async {
        match wakers.is_empty() {
            true => futures::future::pending::<()>().await,
            false => drop(futures::future::select_all(wakers.iter_mut().map(|w| Box::pin(w.changed()))).await),
        }
    };
    let poll = tokio::time::Instant::now() + BLOCK_POLL;
    let until = deadline.map_or(poll, |d| d.min(poll));
    tokio::select! {
        _ = any => {}
        _ = tokio::time::sleep_until(until) => {}
    }
    deadline.is_none_or(|d| tokio::time::Instant::now() < d)
}

impl crate::resp::Handler for RedisGateway {
    fn call<'a>(&'a self, session: &'a mut Session, args: Vec<Vec<u8>>) -> BoxFuture<'a, Reply> {
        Box::pin(self.run(args, session.protocol, false))
    }

    /// Redis clients authenticate when etcd's auth is enabled.
    fn auth_required(&self) -> bool {
        self.node.auth_state().map_or(true, |s| s.enabled)
    }

    /// An etcd user's name and password (AUTH user pass, HELLO .. AUTH); any
    /// authenticated user may use every stream.
    fn authenticate<'a>(&'a self, user: &'a str, password: &'a [u8]) -> BoxFuture<'a, Result<(), Reply>> {
        Box::pin(async move {
            let state = self.node.auth_state().map_err(|s| Reply::Error(format!("ERR {}", s.message())))?;
            let Some(record) = state.users.get(user).cloned() else { return Err(Reply::wrong_pass()) };
            let password = String::from_utf8_lossy(password).into_owned();
            let ok = tokio::task::spawn_blocking(move || crate::etcd_store::auth::verify_password(&record, &password))
                .await
                .unwrap_or(false);
            if ok {
                Ok(())
            } else {
                Err(Reply::wrong_pass())
            }
        })
    }
}
