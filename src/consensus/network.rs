//! The peer network: openraft RPCs, write forwarding and ReadIndex over gRPC.
//!
//! Every payload is `bincode` of an openraft (or concord) type inside the opaque
//! `Payload` message of `proto/concord/peer.proto`. Decoding a payload from a peer
//! never panics: a malformed payload is an `InvalidArgument` status.
//! Message size is bounded in both directions by `max_peer_message_bytes`.
//!
//! Forwarded proposals are batched: a follower queues the writes its clients send
//! and one `Propose` RPC carries every write queued while earlier RPCs to the
//! leader were in flight (see [`Forwarder`]). Each write in a batch is still its
//! own log entry with its own result, so batching changes only the framing. The
//! forwarding member answers each write from its own apply of the entry when that
//! comes before the leader's answer (see [`LocalAnswers`]).
//! Linearizable reads on a follower share ReadIndex requests the same way (see
//! [`ReadIndexer`]).
//!
//! Replicated entries travel on `AppendStream` calls, one per openraft
//! replication session, not one call per AppendEntries (see
//! [`MAX_APPENDS_IN_FLIGHT`]); heartbeats are single `Append` calls.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use tokio::sync::{mpsc, oneshot, Semaphore};

use openraft::base::{BoxFuture, BoxStream};
use openraft::errors::{NetworkError, RPCError, RaftError, ReplicationClosed, StreamingError, Unreachable};
use openraft::network::{RPCOption, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, SnapshotResponse, StreamAppendResult, TransferLeaderRequest,
    TransferLeaderResponse, VoteRequest, VoteResponse,
};
use openraft::type_config::alias::{SnapshotOf, VoteOf};
use openraft::{OptionalSend, RaftNetworkV2, Snapshot};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tonic::transport::{Channel, Endpoint};
use tonic::{Request, Response, Status, Streaming};

use super::log_store::LogProgress;
use super::service::{Answer, LocalAnswers, Proposal};
use super::snapshot::{IncomingSnapshot, SnapshotFrame};
use super::{ConsensusError, Group, GroupId, GroupRegistry, MemberId, PeerInfo, SnapshotData, TypeConfig, FIRST_GROUP};
use crate::proto::peer::peer_client::PeerClient;
use crate::proto::peer::peer_server::{Peer, PeerServer};
use crate::proto::peer::Payload;

type C = TypeConfig;

/// The request header that names the Raft group a peer request is for: every
/// group of a node shares the node's peer connections, each request (each stream,
/// for the streaming calls) tagged with its group. Requests without it are for
/// [`FIRST_GROUP`] (members from before groups were numbered send none).
pub const GROUP_HEADER: &str = "concord-group";

fn encode<T: Serialize>(v: &T) -> Result<Vec<u8>, String> {
    bincode::serde::encode_to_vec(v, bincode::config::standard()).map_err(|e| e.to_string())
}

fn decode<T: DeserializeOwned>(b: &[u8]) -> Result<T, String> {
    crate::consensus::decode_bounded(b).map(|(v, _)| v).map_err(|e| e.to_string())
}

/// Decodes `data` as the peer payload `kind` selects (every message a member
/// decodes from a peer, requests and answers), returning the proposals' bodies
/// an AppendEntries or a forwarded batch carries: for `crate::fuzzing`, which
/// feeds them on to the service's decoder. Never panics.
pub fn decode_peer_payload(kind: u8, data: &[u8]) -> Vec<Vec<u8>> {
    let bodies = |entries: &[openraft::type_config::alias::EntryOf<C>]| {
        entries
            .iter()
            .filter_map(|e| match &e.payload {
                openraft::EntryPayload::Normal(p) => Some(p.body.clone()),
                _ => None,
            })
            .collect()
    };
    match kind % 12 {
        0 => decode::<AppendEntriesRequest<C>>(data).map(|r| bodies(&r.entries)).unwrap_or_default(),
        1 => decode::<VoteRequest<C>>(data).map(|_| Vec::new()).unwrap_or_default(),
        2 => decode::<SnapshotFrame>(data).map(|_| Vec::new()).unwrap_or_default(),
        3 => match decode::<MuxFrame<MuxRequest>>(data) {
            Ok(MuxFrame { body: MuxRequest::Propose(cmds), .. }) => cmds.into_iter().map(|p| p.body).collect(),
            _ => Vec::new(),
        },
        4 => decode::<AdminRequest>(data).map(|_| Vec::new()).unwrap_or_default(),
        5 => decode::<super::quiesce::LivenessPing>(data).map(|_| Vec::new()).unwrap_or_default(),
        6 => decode::<TransferLeaderRequest<C>>(data).map(|_| Vec::new()).unwrap_or_default(),
        7 => decode::<StreamAppendResult<C>>(data).map(|_| Vec::new()).unwrap_or_default(),
        8 => decode::<Result<VoteResponse<C>, RaftError<C>>>(data).map(|_| Vec::new()).unwrap_or_default(),
        9 => decode::<MuxFrame<MuxReply>>(data).map(|_| Vec::new()).unwrap_or_default(),
        10 => decode::<Result<SnapshotResponse<C>, RaftError<C>>>(data).map(|_| Vec::new()).unwrap_or_default(),
        _ => decode::<super::service::SnapshotMeta>(data).map(|_| Vec::new()).unwrap_or_default(),
    }
}

/// The leader's answer to a forwarded proposal or read-index request.
#[derive(Debug, Serialize, Deserialize)]
enum ForwardReply<T> {
    Ok(T),
    /// The receiver is not the leader; nothing was appended: retry elsewhere.
    NotLeader,
    /// Appended, then leadership was lost: outcome unknown, must not be retried.
    Discarded,
    Failed(String),
}

/// A request on a follower's `Mux` call to the leader (see [`MuxLane`]).
#[derive(Debug, Serialize, Deserialize)]
enum MuxRequest {
    /// A batch of forwarded client writes (at most [`MAX_FORWARD_BATCH`]).
    Propose(Vec<Proposal>),
    ReadIndex,
    /// A service's request for the leader (see [`super::LeaderCalls`]).
    Call(Vec<u8>),
}

/// The leader's answer to a [`MuxRequest`] of the same variant.
#[derive(Debug, Serialize, Deserialize)]
enum MuxReply {
    Propose(Vec<ForwardReply<Vec<u8>>>),
    ReadIndex(ForwardReply<u64>),
    Call(ForwardReply<Vec<u8>>),
    /// The request broke a limit; nothing of it was appended.
    Refused(String),
}

/// A `Mux` message: the sequence number pairs an answer with its request.
#[derive(Debug, Serialize, Deserialize)]
struct MuxFrame<T> {
    seq: u64,
    body: T,
}

/// Member-to-member administration (the `Admin` peer RPC).
#[derive(Debug, Serialize, Deserialize)]
enum AdminRequest {
    /// Whether the given learner has caught up with the leader (asked of the leader).
    LearnerCaughtUp(MemberId),
    /// Answered at once: every member times these to each peer (see `Group::run_prober`).
    Probe,
    /// A service's request for this member (see [`super::MemberCalls`]); a
    /// byte string (the `Vec<u8>` encoding, decoded in one copy: a blob chunk
    /// is megabytes).
    Service(#[serde(with = "super::raw_bytes")] Vec<u8>),
}

/// Most writes one forwarding RPC carries (the leader refuses larger batches).
pub const MAX_FORWARD_BATCH: usize = 512;

/// Forwarding RPCs in flight from this member to one leader. While they are in
/// flight, new writes queue up and leave together in the next RPC: the fewer
/// slots, the larger the batches. Rejected: one RPC per write (each costs an
/// HTTP/2 stream, headers and two task wake-ups on both sides; under 1000
/// clients that was a sixth of a follower's CPU).
const MAX_FORWARD_INFLIGHT: usize = 4;

/// Writes waiting for a forwarding slot, per leader; a full queue makes callers
/// wait (within their own deadline) instead of growing memory.
const MAX_FORWARD_QUEUE: usize = 8192;

/// Bookkeeping bytes counted per forwarded write besides its request bytes.
const FORWARD_OVERHEAD_BYTES: usize = 64;

/// Reads waiting for the next ReadIndex request to one leader; a full queue
/// makes callers wait (within their own deadline).
const MAX_READ_INDEX_QUEUE: usize = 8192;

/// Requests a leader works on at once for one follower's `Mux` call; more wait
/// in the call's flow control. A follower has at most [`MAX_FORWARD_INFLIGHT`]
/// write batches and one read-index request out.
const MAX_MUX_IN_FLIGHT: usize = 16;

/// Requests waiting for a follower's [`MuxLane`] to one leader.
const MAX_MUX_QUEUE: usize = 16;

/// Single AppendEntries (heartbeats) waiting for a peer's lane (see [`Lane`]); a
/// full queue makes openraft's caller wait, as a slow call would.
const MAX_LANE_QUEUE: usize = 64;

/// The TLS client configuration peers are dialled with (`https://` peer URLs).
pub type PeerTls = Arc<rustls::ClientConfig>;

/// One HTTP/2 connection per peer URL, shared by every group of the node: each
/// group's requests (and streams) are multiplexed on it, tagged with the group
/// (see [`GROUP_HEADER`]). Cheap to clone.
#[derive(Clone, Default)]
pub struct PeerChannels {
    channels: Arc<Mutex<BTreeMap<String, Channel>>>,
    /// Opens connections instead of TCP (the simulation's network); `None` in a
    /// member.
    dialer: Option<Arc<dyn Dialer>>,
}

impl PeerChannels {
    /// Connections opened by `dialer` rather than over TCP.
    pub fn with_dialer(dialer: Arc<dyn Dialer>) -> PeerChannels {
        PeerChannels { channels: Arc::default(), dialer: Some(dialer) }
    }
}

impl std::fmt::Debug for PeerChannels {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let peers = self.channels.lock().map(|m| m.len()).unwrap_or(0);
        write!(f, "PeerChannels({peers} peers)")
    }
}

/// Opens a byte stream to the peer at a URL: how the deterministic simulation
/// carries the real peer protocol over its simulated network.
pub trait Dialer: Send + Sync + 'static {
    fn dial(&self, url: &str) -> BoxFuture<'static, std::io::Result<tokio::io::DuplexStream>>;
}

/// Connections to peers, shared by every Raft client and forwarding call.
#[derive(Clone)]
pub struct PeerPool {
    channels: PeerChannels,
    /// Used for `https://` peers; an `https://` peer without it is unreachable.
    tls: Option<PeerTls>,
    max_message_bytes: usize,
    /// Where AppendEntries round trips are recorded (absent for one-off pools).
    stats: Option<Arc<crate::stats::GroupStats>>,
    /// One batching queue per leader peer URL, created on first use.
    forwarders: Arc<Mutex<BTreeMap<String, mpsc::Sender<Forwarded>>>>,
    /// One ReadIndex queue per leader peer URL, created on first use.
    read_indexers: Arc<Mutex<BTreeMap<String, mpsc::Sender<ReadWaiter>>>>,
    /// One heartbeat lane per follower peer URL, created on first use.
    lanes: Arc<Mutex<BTreeMap<String, mpsc::Sender<LaneRequest>>>>,
    /// One `Mux` lane per leader peer URL, created on first use.
    mux_lanes: Arc<Mutex<BTreeMap<String, mpsc::Sender<MuxCall>>>>,
    /// Shortest time a Raft RPC may take before it counts as failed. openraft asks
    /// for one heartbeat interval on appends; a follower whose fsync takes longer
    /// (a loaded or slow disk) would then never acknowledge, and its replication
    /// would retry the same batch forever. Rejected: openraft's value unchanged.
    min_rpc_timeout: Duration,
    /// Where forwarded writes wait to be answered from this member's apply (see
    /// [`LocalAnswers`]); without it only the leader's answer counts.
    local_answers: Option<Arc<LocalAnswers>>,
    /// How far this member's log is appended and committed (see
    /// [`Window::acquire`]); without it every request waits as if it carried
    /// entries.
    log_progress: Option<LogProgress>,
    /// The Raft group whose requests this pool carries (see [`GROUP_HEADER`]).
    group: GroupId,
}

/// Dials a peer and runs the TLS handshake, verifying it with `tls`.
fn tls_connector(
    tls: PeerTls,
) -> impl tower::Service<
    http::Uri,
    Response = hyper_util::rt::TokioIo<tokio_rustls::client::TlsStream<tokio::net::TcpStream>>,
    Error = std::io::Error,
    Future = impl Send,
> + Clone
       + Send {
    tower::service_fn(move |uri: http::Uri| {
        let connector = tokio_rustls::TlsConnector::from(tls.clone());
        async move {
            let host = uri.host().ok_or_else(|| std::io::Error::other("peer URL has no host"))?.to_string();
            let port = uri.port_u16().ok_or_else(|| std::io::Error::other("peer URL has no port"))?;
            let tcp =
                tokio::time::timeout(Duration::from_secs(1), tokio::net::TcpStream::connect((host.as_str(), port)))
                    .await
                    .map_err(|_| std::io::Error::other("connect timed out"))??;
            tcp.set_nodelay(true)?;
            let name = rustls::pki_types::ServerName::try_from(host.trim_matches(['[', ']']).to_string())
                .map_err(std::io::Error::other)?;
            Ok(hyper_util::rt::TokioIo::new(connector.connect(name, tcp).await?))
        }
    })
}

impl PeerPool {
    pub fn new(
        max_message_bytes: usize,
        stats: Option<Arc<crate::stats::GroupStats>>,
        min_rpc_timeout: Duration,
        tls: Option<PeerTls>,
    ) -> Self {
        PeerPool {
            channels: PeerChannels::default(),
            forwarders: Arc::default(),
            read_indexers: Arc::default(),
            lanes: Arc::default(),
            mux_lanes: Arc::default(),
            tls,
            max_message_bytes,
            stats,
            min_rpc_timeout,
            local_answers: None,
            log_progress: None,
            group: FIRST_GROUP,
        }
    }

    /// Lets replication streams send a new commit index while entries are in
    /// flight, by comparing what they sent with `log` (see [`Window::acquire`]).
    pub fn with_log_progress(mut self, log: LogProgress) -> Self {
        self.log_progress = Some(log);
        self
    }

    /// Forwards proposals with an [`super::service::Origin`], answered from `answers` when
    /// this member applies them before the leader's answer arrives.
    pub fn with_local_answers(mut self, answers: Arc<LocalAnswers>) -> Self {
        self.local_answers = Some(answers);
        self
    }

    /// Dials peers on `channels` (the node's, shared with its other groups).
    pub fn with_channels(mut self, channels: PeerChannels) -> Self {
        self.channels = channels;
        self
    }

    /// Requests from this pool belong to its group.
    pub fn with_group(mut self, group: GroupId) -> Self {
        self.group = group;
        self
    }

    /// A request tagged with this pool's group (see [`GROUP_HEADER`]).
    fn request<T>(&self, message: T) -> Request<T> {
        let mut request = Request::new(message);
        request.metadata_mut().insert(GROUP_HEADER, self.group.into());
        request
    }

    fn client(&self, node: &PeerInfo) -> Result<PeerClient<Channel>, String> {
        let url = node.peer_urls.first().ok_or_else(|| "member has no peer URL".to_string())?;
        let mut map = self.channels.channels.lock().expect("peer channel map poisoned");
        let channel = match map.get(url) {
            Some(c) => c.clone(),
            None => {
                let c = match (url.strip_prefix("https://"), &self.channels.dialer) {
                    (_, Some(dialer)) => {
                        let dialer = dialer.clone();
                        let connect = tower::service_fn(move |uri: http::Uri| {
                            let dial = dialer.dial(&uri.to_string());
                            async move { dial.await.map(hyper_util::rt::TokioIo::new) }
                        });
                        Endpoint::from_shared(url.clone())
                            .map_err(|e| format!("bad peer URL {url}: {e}"))?
                            .connect_with_connector_lazy(connect)
                    }
                    (None, None) => Endpoint::from_shared(url.clone())
                        .map_err(|e| format!("bad peer URL {url}: {e}"))?
                        .connect_timeout(Duration::from_secs(1))
                        .tcp_nodelay(true)
                        .connect_lazy(),
                    (Some(hostport), None) => {
                        let tls = self.tls.clone().ok_or_else(|| format!("{url}: peer TLS is not configured"))?;
                        // TLS is done by the connector, so tonic sees plain http/2.
                        Endpoint::from_shared(format!("http://{hostport}"))
                            .map_err(|e| format!("bad peer URL {url}: {e}"))?
                            .connect_with_connector_lazy(tls_connector(tls))
                    }
                };
                map.insert(url.clone(), c.clone());
                c
            }
        };
        Ok(PeerClient::new(channel)
            .max_decoding_message_size(self.max_message_bytes)
            .max_encoding_message_size(self.max_message_bytes))
    }

    async fn call<Req: Serialize, Resp: DeserializeOwned, F, Fut>(
        &self,
        node: &PeerInfo,
        req: &Req,
        timeout: Duration,
        f: F,
    ) -> Result<Resp, CallError>
    where
        F: FnOnce(PeerClient<Channel>, Request<Payload>) -> Fut,
        Fut: Future<Output = Result<Response<Payload>, Status>>,
    {
        let client = self.client(node).map_err(CallError::Unreachable)?;
        let data = encode(req).map_err(CallError::Network)?;
        let mut request = self.request(Payload { data });
        request.set_timeout(timeout);
        match tokio::time::timeout(timeout, f(client, request)).await {
            Err(_) => Err(CallError::Network(format!("peer call timed out after {timeout:?}"))),
            Ok(Err(s)) => Err(status_error(s)),
            Ok(Ok(resp)) => decode(&resp.into_inner().data).map_err(CallError::Network),
        }
    }

    /// Forwards a proposal to the leader `node` (batched with other writes to it,
    /// see [`Forwarder`]) and waits at most `timeout` for its applied result.
    /// `alone`: its reply may be large, so it travels in an RPC of its own.
    pub async fn propose(
        &self,
        node: &PeerInfo,
        body: &[u8],
        alone: bool,
        timeout: Duration,
    ) -> Result<Vec<u8>, ConsensusError> {
        let deadline = tokio::time::Instant::now() + timeout;
        let queue = queue_for(&self.forwarders, node, MAX_FORWARD_QUEUE, |queue| {
            Forwarder { pool: self.clone(), node: node.clone(), queue }.run()
        })?;
        let item = |reply| Forwarded { body: body.to_vec(), alone, deadline, reply };
        // Not queued in time: never sent, so nothing can have been appended.
        enqueue_and_wait(queue, deadline, item, ConsensusError::NoLeader).await
    }

    /// Sends `snapshot` to `node` in chunks (see [`super::snapshot`]) and waits at
    /// most `timeout` for it to be installed there. The file is read on a blocking
    /// thread, a chunk at a time, as the call takes them.
    async fn send_snapshot(
        &self,
        node: &PeerInfo,
        vote: VoteOf<C>,
        snapshot: SnapshotOf<C, SnapshotData>,
        timeout: Duration,
    ) -> Result<SnapshotResponse<C>, RPCError<C>> {
        let network = |e: String| RPCError::Network(NetworkError::from_string(e));
        let mut client = self.client(node).map_err(|e| CallError::Unreachable(e).into_rpc())?;
        let len = snapshot.snapshot.len();
        let head = encode(&SnapshotFrame::Head { vote, meta: snapshot.meta, len }).map_err(network)?;
        let data = snapshot.snapshot;
        let (tx, rx) = mpsc::channel::<Payload>(2);
        let frames = move |send: &mut dyn FnMut(Vec<u8>) -> Result<(), String>| -> Result<(), String> {
            send(head)?;
            let mut crc = crc32fast::Hasher::new();
            for chunk in data.chunks() {
                let chunk = chunk.map_err(|e| format!("reading the snapshot: {e}"))?;
                crc.update(&chunk);
                send(encode(&SnapshotFrame::Chunk(chunk))?)?;
            }
            send(encode(&SnapshotFrame::End { crc32: crc.finalize() })?)
        };
        let producer = if tokio::runtime::Handle::current().runtime_flavor()
            == tokio::runtime::RuntimeFlavor::CurrentThread
        {
            // The deterministic simulation runs on one thread, where no blocking
            // thread may take part (its clock would move while one works): the
            // frames are read at once and queued (its snapshots are small).
            let mut queued = Vec::new();
            let read = frames(&mut |data| {
                queued.push(Payload { data });
                Ok(())
            });
            tokio::spawn(async move {
                for p in queued {
                    if tx.send(p).await.is_err() {
                        return Err("the receiver went away".to_string());
                    }
                }
                read
            })
        } else {
            tokio::task::spawn_blocking(move || {
                frames(&mut |data| tx.blocking_send(Payload { data }).map_err(|_| "the receiver went away".to_string()))
            })
        };
        let mut request = self.request(tokio_stream::wrappers::ReceiverStream::new(rx));
        request.set_timeout(timeout);
        let answer = match tokio::time::timeout(timeout, client.snapshot_stream(request)).await {
            Err(_) => return Err(network(format!("snapshot transfer timed out after {timeout:?}"))),
            Ok(Err(s)) => return Err(status_error(s).into_rpc()),
            Ok(Ok(resp)) => resp.into_inner(),
        };
        if let Ok(Err(e)) = producer.await {
            tracing::warn!("snapshot transfer: {e}");
        }
        match decode::<Result<SnapshotResponse<C>, RaftError<C>>>(&answer.data).map_err(network)? {
            Ok(r) => Ok(r),
            Err(e) => Err(network(format!("remote raft error: {e}"))),
        }
    }

    /// Has member `node` answer a service's request (see [`super::MemberCalls`]).
    pub async fn member_call(&self, node: &PeerInfo, req: Vec<u8>, timeout: Duration) -> Result<Vec<u8>, String> {
        let req = AdminRequest::Service(req);
        let r: Result<Result<super::raw_bytes::ByteString, String>, _> =
            self.call(node, &req, timeout, |mut c, r| async move { c.admin(r).await }).await;
        r.map_err(|e| format!("{e:?}"))?.map(|b| b.0)
    }

    /// Asks the leader `node` whether learner `id` has caught up.
    pub async fn learner_caught_up(
        &self,
        node: &PeerInfo,
        id: MemberId,
        timeout: Duration,
    ) -> Result<bool, ConsensusError> {
        let req = AdminRequest::LearnerCaughtUp(id);
        let r: Result<ForwardReply<bool>, _> =
            self.call(node, &req, timeout, |mut c, r| async move { c.admin(r).await }).await;
        forward_result(r)
    }

    /// Sends this node's liveness ping to `node` (see [`super::quiesce`]).
    pub async fn liveness(
        &self,
        node: &PeerInfo,
        ping: &super::quiesce::LivenessPing,
        timeout: Duration,
    ) -> Result<(), String> {
        let r: Result<(), _> = self.call(node, ping, timeout, |mut c, r| async move { c.liveness(r).await }).await;
        r.map_err(|e| format!("{e:?}"))
    }

    /// Times one round trip to `node` (an `Admin` probe on the shared peer
    /// connection) and records it as the round trip to member `id`.
    pub async fn probe(&self, id: MemberId, node: &PeerInfo, timeout: Duration) -> Result<Duration, String> {
        let started = std::time::Instant::now();
        let r: Result<(), _> =
            self.call(node, &AdminRequest::Probe, timeout, |mut c, r| async move { c.admin(r).await }).await;
        r.map_err(|e| format!("{e:?}"))?;
        let rtt = started.elapsed();
        if let Some(stats) = &self.stats {
            stats.observe_peer_rtt(id, rtt);
        }
        Ok(rtt)
    }

    /// Has the leader `node` answer a service's request (see [`super::LeaderCalls`]).
    pub async fn call_leader(
        &self,
        node: &PeerInfo,
        req: Vec<u8>,
        timeout: Duration,
    ) -> Result<Vec<u8>, ConsensusError> {
        let r = match self.mux_call(node, MuxRequest::Call(req), timeout).await {
            Ok(MuxReply::Call(answer)) => Ok(answer),
            Ok(MuxReply::Refused(why)) => Ok(ForwardReply::Failed(why)),
            Ok(other) => Err(CallError::Network(format!("leader call answered with {other:?}"))),
            Err(e) => Err(e),
        };
        forward_result(r)
    }

    /// Asks the leader `node` for a read index, sharing the request with the
    /// other reads waiting for one (see [`ReadIndexer`]).
    pub async fn read_index(&self, node: &PeerInfo, timeout: Duration) -> Result<u64, ConsensusError> {
        let deadline = tokio::time::Instant::now() + timeout;
        let queue = queue_for(&self.read_indexers, node, MAX_READ_INDEX_QUEUE, |queue| {
            ReadIndexer { pool: self.clone(), node: node.clone(), queue }.run()
        })?;
        enqueue_and_wait(queue, deadline, |reply| ReadWaiter { deadline, reply }, ConsensusError::Timeout).await
    }
}

impl PeerPool {
    /// Sends one AppendEntries on `node`'s heartbeat lane and waits for its result.
    async fn lane_append(
        &self,
        node: &PeerInfo,
        req: AppendEntriesRequest<C>,
        timeout: Duration,
    ) -> Result<StreamAppendResult<C>, CallError> {
        let lane = queue_for(&self.lanes, node, MAX_LANE_QUEUE, |queue| {
            Lane { pool: self.clone(), node: node.clone(), queue }.run()
        })
        .map_err(|e| CallError::Unreachable(e.to_string()))?;
        let data = encode(&req).map_err(CallError::Network)?;
        let (reply, answer) = oneshot::channel();
        let deadline = tokio::time::Instant::now() + timeout;
        let sent = tokio::time::timeout_at(deadline, lane.send(LaneRequest { data, deadline, reply }));
        match sent.await {
            Ok(Ok(())) => {}
            Ok(Err(_)) => return Err(CallError::Unreachable("heartbeat lane stopped".into())),
            Err(_) => return Err(CallError::Network(format!("heartbeat lane busy for {timeout:?}"))),
        }
        match tokio::time::timeout_at(deadline, answer).await {
            Ok(Ok(r)) => r,
            Ok(Err(_)) => Err(CallError::Network("heartbeat lane dropped the request".into())),
            Err(_) => Err(CallError::Network(format!("no AppendEntries result in {timeout:?}"))),
        }
    }
}

impl PeerPool {
    /// Sends `req` on the leader `node`'s [`MuxLane`] and waits for the answer.
    async fn mux_call(&self, node: &PeerInfo, req: MuxRequest, timeout: Duration) -> Result<MuxReply, CallError> {
        let lane = queue_for(&self.mux_lanes, node, MAX_MUX_QUEUE, |queue| {
            MuxLane { pool: self.clone(), node: node.clone(), queue }.run()
        })
        .map_err(|e| CallError::Unreachable(e.to_string()))?;
        let (reply, answer) = oneshot::channel();
        let deadline = tokio::time::Instant::now() + timeout;
        match tokio::time::timeout_at(deadline, lane.send(MuxCall { req, deadline, reply })).await {
            Ok(Ok(())) => {}
            // Not handed to the lane: never sent.
            Ok(Err(_)) => return Err(CallError::Unreachable("cannot connect: mux lane stopped".into())),
            Err(_) => return Err(CallError::Unreachable(format!("cannot connect: mux lane busy for {timeout:?}"))),
        }
        match tokio::time::timeout_at(deadline, answer).await {
            Ok(Ok(r)) => r,
            Ok(Err(_)) => Err(CallError::Network("mux lane dropped the request".into())),
            Err(_) => Err(CallError::Network(format!("peer call timed out after {timeout:?}"))),
        }
    }
}

/// One request for a [`MuxLane`] with its caller's reply channel.
struct MuxCall {
    req: MuxRequest,
    deadline: tokio::time::Instant,
    reply: oneshot::Sender<Result<MuxReply, CallError>>,
}

/// A follower's long-lived `Mux` call to one leader, carrying forwarded write
/// batches and read-index requests. Each used to be its own unary call (a new
/// HTTP/2 stream and handler task each way, ~0.2 ms more per hop on loopback).
/// Answers come in any order, matched by sequence number. When the stream fails
/// or an answer is late, every request still on it fails as "sent, outcome
/// unknown" (a write on it may have been appended) and the next request opens a
/// new stream; a stream that cannot be opened fails its first request as never
/// sent.
struct MuxLane {
    pool: PeerPool,
    node: PeerInfo,
    queue: mpsc::Receiver<MuxCall>,
}

type MuxPending = BTreeMap<u64, MuxCall>;

impl MuxLane {
    async fn run(mut self) {
        let mut pending = MuxPending::new();
        let mut seq = 0u64;
        while let Some(first) = self.queue.recv().await {
            let mut client = match self.pool.client(&self.node) {
                Ok(c) => c,
                Err(e) => {
                    let _ = first.reply.send(Err(CallError::Unreachable(e)));
                    continue;
                }
            };
            let (out, requests) = mpsc::channel::<Payload>(MAX_MUX_QUEUE);
            let deadline = first.deadline;
            if !send_mux(&out, &mut seq, first, &mut pending) {
                continue;
            }
            let requests = futures::stream::unfold(requests, |mut rx| async move { rx.recv().await.map(|p| (p, rx)) });
            let mut results = match tokio::time::timeout_at(deadline, client.mux(self.pool.request(requests))).await {
                Ok(Ok(r)) => r.into_inner(),
                Ok(Err(s)) => {
                    let e = status_error(s);
                    for (_, c) in std::mem::take(&mut pending) {
                        let _ = c.reply.send(Err(e.clone()));
                    }
                    continue;
                }
                Err(_) => {
                    fail_mux(&mut pending, "mux call not answered in time");
                    continue;
                }
            };
            self.serve(&out, &mut seq, &mut results, &mut pending).await;
        }
        fail_mux(&mut pending, "mux lane closed");
    }

    /// Sends queued requests and hands out answers until the stream fails, an
    /// answer is late, or the queue closes; then fails whatever is unanswered.
    async fn serve(
        &mut self,
        out: &mpsc::Sender<Payload>,
        seq: &mut u64,
        results: &mut Streaming<Payload>,
        pending: &mut MuxPending,
    ) {
        loop {
            let late = sleep_until(pending.values().map(|c| c.deadline).min());
            tokio::select! {
                // Only with room on the stream: a send that waited would stop this
                // loop reading answers, and the leader, its answers not read, would
                // stop reading requests.
                next = self.queue.recv(), if out.capacity() > 0 => {
                    let Some(call) = next else { break };
                    if !send_mux(out, seq, call, pending) {
                        break;
                    }
                }
                msg = results.message() => {
                    let Ok(Some(p)) = msg else { break };
                    let Ok(frame) = decode::<MuxFrame<MuxReply>>(&p.data) else { break };
                    if let Some(call) = pending.remove(&frame.seq) {
                        let _ = call.reply.send(Ok(frame.body));
                    }
                }
                () = late => break,
            }
        }
        fail_mux(pending, "mux stream ended");
    }
}

/// Puts `call` on the stream `out` under the next sequence number; false (and
/// `call` answered) when the stream is gone.
/// Never waits: the lane only calls it when `out` has room, so that it keeps
/// reading answers (and the leader keeps reading requests) however many are out.
fn send_mux(out: &mpsc::Sender<Payload>, seq: &mut u64, call: MuxCall, pending: &mut MuxPending) -> bool {
    *seq += 1;
    let data = match encode(&MuxFrame { seq: *seq, body: &call.req }) {
        Ok(d) => d,
        Err(e) => {
            let _ = call.reply.send(Err(CallError::Network(e)));
            return true;
        }
    };
    if out.try_send(Payload { data }).is_err() {
        let _ = call.reply.send(Err(CallError::Network("mux stream closed or full".into())));
        return false;
    }
    pending.insert(*seq, call);
    true
}

/// Sleeps until `deadline`; forever without one.
async fn sleep_until(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

/// Answers every request in `pending` with "sent, outcome unknown".
fn fail_mux(pending: &mut MuxPending, why: &str) {
    for (_, c) in std::mem::take(pending) {
        let _ = c.reply.send(Err(CallError::Network(why.to_string())));
    }
}

/// One AppendEntries for a [`Lane`], encoded, with its caller's reply channel.
struct LaneRequest {
    data: Vec<u8>,
    deadline: tokio::time::Instant,
    reply: oneshot::Sender<Result<StreamAppendResult<C>, CallError>>,
}

/// One long-lived `AppendStream` call to a follower for openraft's single
/// AppendEntries (the heartbeats that confirm leadership for every linearizable
/// read). Each used to be its own `Append` call: a new HTTP/2 stream, headers and
/// handler task each way, ~0.4 ms of a read's latency on loopback against ~0.2 ms
/// for a message on an open stream. Rejected: a new stream per heartbeat (what a
/// replication session does), measured slower than the unary call.
///
/// Results come back in request order. When the stream fails or a result is
/// late, every request on it fails (openraft retries) and the next request opens
/// a new stream.
struct Lane {
    pool: PeerPool,
    node: PeerInfo,
    queue: mpsc::Receiver<LaneRequest>,
}

/// Answers every request in `pending` with a failure.
fn fail_all(pending: &mut std::collections::VecDeque<LaneRequest>, why: &str) {
    for r in pending.drain(..) {
        let _ = r.reply.send(Err(CallError::Network(why.to_string())));
    }
}

impl Lane {
    async fn run(mut self) {
        let mut pending = std::collections::VecDeque::new();
        while let Some(first) = self.queue.recv().await {
            let mut client = match self.pool.client(&self.node) {
                Ok(c) => c,
                Err(e) => {
                    let _ = first.reply.send(Err(CallError::Unreachable(e)));
                    continue;
                }
            };
            let (out, requests) = mpsc::channel::<Payload>(MAX_LANE_QUEUE);
            let deadline = first.deadline;
            if out.send(Payload { data: first.data.clone() }).await.is_err() {
                continue;
            }
            pending.push_back(first);
            let requests = futures::stream::unfold(requests, |mut rx| async move { rx.recv().await.map(|p| (p, rx)) });
            let append = client.append_stream(self.pool.request(requests));
            let mut results = match tokio::time::timeout_at(deadline, append).await {
                Ok(Ok(r)) => r.into_inner(),
                Ok(Err(s)) => {
                    let e = status_error(s);
                    for r in pending.drain(..) {
                        let _ = r.reply.send(Err(e.clone()));
                    }
                    continue;
                }
                Err(_) => {
                    fail_all(&mut pending, "heartbeat lane not answered in time");
                    continue;
                }
            };
            self.serve(&out, &mut results, &mut pending).await;
        }
        fail_all(&mut pending, "heartbeat lane closed");
    }

    /// Sends queued requests and hands out results until the stream fails, a
    /// result is late, or the queue closes; then fails whatever is unanswered.
    async fn serve(
        &mut self,
        out: &mpsc::Sender<Payload>,
        results: &mut Streaming<Payload>,
        pending: &mut std::collections::VecDeque<LaneRequest>,
    ) {
        loop {
            let late = sleep_until(pending.front().map(|r| r.deadline));
            tokio::select! {
                // Only with room on the stream, so that answers keep being read
                // (see `MuxLane::serve`).
                next = self.queue.recv(), if out.capacity() > 0 => {
                    let Some(req) = next else { break };
                    if out.try_send(Payload { data: req.data.clone() }).is_err() {
                        let _ = req.reply.send(Err(CallError::Network("heartbeat lane stream closed".into())));
                        break;
                    }
                    pending.push_back(req);
                }
                msg = results.message() => {
                    let Ok(Some(p)) = msg else { break };
                    let Some(req) = pending.pop_front() else { break };
                    let _ = req.reply.send(decode::<StreamAppendResult<C>>(&p.data).map_err(CallError::Network));
                }
                () = late => break,
            }
        }
        fail_all(pending, "heartbeat lane stream ended");
    }
}

/// The queue to `node`'s task in `map`, starting the task (`start` with the
/// receiving end) on first use or after it ended.
fn queue_for<T, F>(
    map: &Mutex<BTreeMap<String, mpsc::Sender<T>>>,
    node: &PeerInfo,
    capacity: usize,
    start: impl FnOnce(mpsc::Receiver<T>) -> F,
) -> Result<mpsc::Sender<T>, ConsensusError>
where
    F: Future<Output = ()> + Send + 'static,
{
    let url = node.peer_urls.first().ok_or(ConsensusError::NoLeader)?;
    let mut map = map.lock().expect("peer queue map poisoned");
    if let Some(tx) = map.get(url).filter(|tx| !tx.is_closed()) {
        return Ok(tx.clone());
    }
    let (tx, rx) = mpsc::channel(capacity);
    tokio::spawn(start(rx));
    map.insert(url.clone(), tx.clone());
    Ok(tx)
}

/// Queues the item `make` builds around a reply channel and waits for the answer,
/// all before `deadline`. `not_queued` is the error when the queue stayed full
/// until then; once queued, running out of time is `Timeout` (the item may still
/// be acted on).
async fn enqueue_and_wait<T, R>(
    queue: mpsc::Sender<T>,
    deadline: tokio::time::Instant,
    make: impl FnOnce(oneshot::Sender<Result<R, ConsensusError>>) -> T,
    not_queued: ConsensusError,
) -> Result<R, ConsensusError> {
    let (reply, answer) = oneshot::channel();
    match tokio::time::timeout_at(deadline, queue.send(make(reply))).await {
        Err(_) => return Err(not_queued),
        Ok(Err(_)) => return Err(ConsensusError::Fatal("peer queue closed".into())),
        Ok(Ok(())) => {}
    }
    match tokio::time::timeout_at(deadline, answer).await {
        Ok(Ok(r)) => r,
        Ok(Err(_)) | Err(_) => Err(ConsensusError::Timeout),
    }
}

/// A write waiting to be forwarded, with where its result goes.
struct Forwarded {
    body: Vec<u8>,
    /// Travels in an RPC of its own (see [`Forwarder`]).
    alone: bool,
    /// The caller stops waiting then; a write not sent by then is dropped.
    deadline: tokio::time::Instant,
    reply: Answer,
}

/// Sends the writes queued for one leader in batches: it takes the first queued
/// write, waits for one of [`MAX_FORWARD_INFLIGHT`] slots, then takes everything
/// else already queued (up to [`MAX_FORWARD_BATCH`] writes and half the peer
/// message limit in bytes) into the same RPC.
///
/// Txn and DeleteRange travel alone, at once and outside the slots (as every
/// write did before batching): their answers can be as large as a range (a
/// txn's reads, a delete's `prev_kv`), and a batch's answers share one reply
/// bounded by the peer message limit. A put's answer is bounded by the request
/// size limit. (Holding them to the slots made them queue: txn-put p99 went
/// from ~0.4 s to 2.8 s under 1000 clients.)
struct Forwarder {
    pool: PeerPool,
    node: PeerInfo,
    queue: mpsc::Receiver<Forwarded>,
}

impl Forwarder {
    async fn run(mut self) {
        let slots = Arc::new(Semaphore::new(MAX_FORWARD_INFLIGHT));
        let max_bytes = self.pool.max_message_bytes / 2;
        let mut carried: Option<Forwarded> = None;
        loop {
            let first = match carried.take() {
                Some(f) => f,
                None => match self.queue.recv().await {
                    Some(f) => f,
                    None => return,
                },
            };
            if first.alone {
                let (pool, node) = (self.pool.clone(), self.node.clone());
                tokio::spawn(async move { send_batch(&pool, &node, vec![first]).await });
                continue;
            }
            let Ok(slot) = slots.clone().acquire_owned().await else { return };
            let mut bytes = first.body.len() + FORWARD_OVERHEAD_BYTES;
            let mut batch = vec![first];
            while batch.len() < MAX_FORWARD_BATCH {
                let Ok(next) = self.queue.try_recv() else { break };
                let size = next.body.len() + FORWARD_OVERHEAD_BYTES;
                if next.alone || bytes + size > max_bytes {
                    carried = Some(next);
                    break;
                }
                bytes += size;
                batch.push(next);
            }
            // A caller that gave up (deadline passed, or its client went away) has
            // been told the outcome is unknown; not sending its write is one of
            // the outcomes that allows.
            let now = tokio::time::Instant::now();
            batch.retain(|f| f.deadline > now && !f.reply.is_closed());
            if batch.is_empty() {
                continue;
            }
            let (pool, node) = (self.pool.clone(), self.node.clone());
            tokio::spawn(async move {
                send_batch(&pool, &node, batch).await;
                drop(slot);
            });
        }
    }
}

/// A linearizable read waiting for a read index.
struct ReadWaiter {
    deadline: tokio::time::Instant,
    reply: oneshot::Sender<Result<u64, ConsensusError>>,
}

/// Asks one leader for read indexes on behalf of every waiting read: one request
/// at a time, each answering all the reads queued before it was sent. That is
/// what makes sharing safe: the leader confirms its leadership after the request
/// arrives, so the index covers every write committed before any of those reads
/// began (the ReadIndex rule, per read).
struct ReadIndexer {
    pool: PeerPool,
    node: PeerInfo,
    queue: mpsc::Receiver<ReadWaiter>,
}

impl ReadIndexer {
    async fn run(mut self) {
        loop {
            let Some(first) = self.queue.recv().await else { return };
            let mut waiters = vec![first];
            while let Ok(w) = self.queue.try_recv() {
                waiters.push(w);
            }
            let now = tokio::time::Instant::now();
            waiters.retain(|w| w.deadline > now && !w.reply.is_closed());
            let Some(timeout) = waiters.iter().map(|w| w.deadline.saturating_duration_since(now)).max() else {
                continue;
            };
            let r = match self.pool.mux_call(&self.node, MuxRequest::ReadIndex, timeout).await {
                Ok(MuxReply::ReadIndex(answer)) => Ok(answer),
                Ok(other) => Err(CallError::Network(format!("read index answered with {other:?}"))),
                Err(e) => Err(e),
            };
            let r = forward_result(r);
            for w in waiters {
                let _ = w.reply.send(r.clone());
            }
        }
    }
}

/// One forwarding RPC: every write in `batch` gets its own result, from this
/// member's apply when that comes first (see [`LocalAnswers`]), else the leader's.
async fn send_batch(pool: &PeerPool, node: &PeerInfo, batch: Vec<Forwarded>) {
    let now = tokio::time::Instant::now();
    let timeout = batch.iter().map(|f| f.deadline.saturating_duration_since(now)).max().unwrap_or_default();
    // Parked before sending: this member can apply an entry only after that.
    let (cmds, replies): (Vec<Proposal>, Vec<Parked>) = batch
        .into_iter()
        .map(|f| match &pool.local_answers {
            Some(answers) => {
                let (proposal, id) = answers.park(f.body, f.reply);
                (proposal, Parked::Local(id))
            }
            None => (Proposal { origin: None, body: f.body }, Parked::Here(f.reply)),
        })
        .unzip();
    let r = match pool.mux_call(node, MuxRequest::Propose(cmds), timeout).await {
        Ok(MuxReply::Propose(answers)) => Ok(answers),
        Ok(MuxReply::Refused(e)) => Err(CallError::Network(e)),
        Ok(other) => Err(CallError::Network(format!("forwarded writes answered with {other:?}"))),
        Err(e) => Err(e),
    };
    match r {
        Ok(answers) if answers.len() == replies.len() => {
            for (reply, answer) in replies.into_iter().zip(answers) {
                reply.answer(pool, forward_result(Ok(answer)));
            }
        }
        Ok(answers) => {
            let e = format!("leader answered {} of {} forwarded writes", answers.len(), replies.len());
            for reply in replies {
                reply.answer(pool, forward_result::<Vec<u8>>(Err(CallError::Network(e.clone()))));
            }
        }
        Err(e) => {
            for reply in replies {
                reply.answer(pool, forward_result::<Vec<u8>>(Err(e.clone())));
            }
        }
    }
}

/// Where a forwarded write's answer waits while its RPC is out.
enum Parked {
    /// In the pool's [`LocalAnswers`], under this id.
    Local(u64),
    Here(Answer),
}

impl Parked {
    /// Sends the leader's result, unless this member's apply has answered.
    fn answer(self, pool: &PeerPool, result: Result<Vec<u8>, ConsensusError>) {
        let answer = match self {
            Parked::Local(id) => pool.local_answers.as_ref().and_then(|a| a.unpark(id)),
            Parked::Here(answer) => Some(answer),
        };
        if let Some(answer) = answer {
            let _ = answer.send(result);
        }
    }
}

fn forward_result<T>(r: Result<ForwardReply<T>, CallError>) -> Result<T, ConsensusError> {
    match r {
        Ok(ForwardReply::Ok(v)) => Ok(v),
        Ok(ForwardReply::NotLeader) => Err(ConsensusError::NotLeader),
        Ok(ForwardReply::Discarded) => Err(ConsensusError::LeaderLost),
        Ok(ForwardReply::Failed(e)) => Err(ConsensusError::Fatal(e)),
        // Never connected: the request cannot have reached the leader.
        Err(CallError::Unreachable(e)) if e.contains("connect") => {
            tracing::debug!("leader unreachable: {e}");
            Err(ConsensusError::NoLeader)
        }
        // Sent, then lost or timed out: the leader may have appended it.
        Err(e) => {
            tracing::debug!("forwarding to leader failed after sending: {e:?}");
            Err(ConsensusError::Timeout)
        }
    }
}

#[derive(Debug, Clone)]
enum CallError {
    Unreachable(String),
    Network(String),
}

impl CallError {
    fn into_rpc(self) -> RPCError<C> {
        match self {
            CallError::Unreachable(s) => RPCError::Unreachable(Unreachable::from_string(s)),
            CallError::Network(s) => RPCError::Network(NetworkError::from_string(s)),
        }
    }
}

/// AppendEntries requests carrying entries that a leader has in flight on one
/// replication stream. With one, the next such request is built only after the
/// previous result, so it carries every entry appended meanwhile (up to
/// `max_payload_entries`). Measured with 2: the same entries went out as more,
/// smaller messages (a third more follower fsyncs, ~10% more member CPU, fewer
/// puts/s) and single-client latency did not improve. The stream itself is what
/// saves latency: no per-request HTTP/2 stream, headers and handler task (~0.1–0.3
/// ms off a single client's put).
///
/// A request without entries (openraft sends one after each commit to tell the
/// follower the new commit index) does not hold this slot: with it, a single
/// client's next put waited for that request's round trip before its own entry
/// could go out (traced: 80–190 µs of a 0.9 ms put, in about half the puts).
pub const MAX_APPENDS_IN_FLIGHT: usize = 1;

/// All AppendEntries requests in flight on one replication stream, with or
/// without entries: bounds what an unanswered stream holds.
pub const MAX_REQUESTS_IN_FLIGHT: usize = 8;

/// The result side of one `AppendStream` call.
struct AppendResults {
    resp: Streaming<Payload>,
    /// The replication stream's bounds on requests in flight.
    window: Arc<Window>,
    /// Each unanswered request, oldest first (results come in order): when it was
    /// sent and whether it holds a slot of [`Window::with_entries`].
    sent: Arc<Mutex<std::collections::VecDeque<(std::time::Instant, bool)>>>,
    /// How long the oldest unanswered request may wait for its result.
    timeout: Duration,
    /// Stops the task that builds the requests (and holds openraft's input)
    /// when the results are dropped.
    _stop: AbortOnDrop,
}

impl AppendResults {
    /// The next result; `None` when the follower ended the stream.
    async fn next(&mut self) -> Option<Result<StreamAppendResult<C>, CallError>> {
        loop {
            let oldest = self.sent.lock().expect("append stream lock poisoned").front().map(|(t, _)| *t);
            let wait = oldest.map(|t| (t + self.timeout).saturating_duration_since(std::time::Instant::now()));
            let msg = match wait {
                // Nothing in flight: a follower answers only what was sent.
                None => match tokio::time::timeout(self.timeout, self.resp.message()).await {
                    Err(_) => continue,
                    Ok(m) => m,
                },
                Some(left) => match tokio::time::timeout(left, self.resp.message()).await {
                    Err(_) => {
                        return Some(Err(CallError::Network(format!("no AppendEntries result in {:?}", self.timeout))))
                    }
                    Ok(m) => m,
                },
            };
            return match msg {
                Ok(None) => None,
                Err(s) => Some(Err(status_error(s))),
                Ok(Some(p)) => {
                    let Some((_, with_entries)) = self.sent.lock().expect("append stream lock poisoned").pop_front()
                    else {
                        return Some(Err(CallError::Network("AppendEntries result for no request".into())));
                    };
                    self.window.release(with_entries);
                    Some(decode::<StreamAppendResult<C>>(&p.data).map_err(CallError::Network))
                }
            };
        }
    }
}

/// Aborts the task building a replication session's requests when dropped.
struct AbortOnDrop(tokio::task::AbortHandle);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// The bounds on one replication stream's requests in flight.
struct Window {
    /// [`MAX_APPENDS_IN_FLIGHT`] slots for requests that carry entries.
    with_entries: Semaphore,
    /// [`MAX_REQUESTS_IN_FLIGHT`] slots for all requests.
    all: Semaphore,
}

impl Window {
    fn new() -> Window {
        Window { with_entries: Semaphore::new(MAX_APPENDS_IN_FLIGHT), all: Semaphore::new(MAX_REQUESTS_IN_FLIGHT) }
    }

    /// Takes the slots for the next request before it is built; returns whether
    /// it took the entries slot (`None` once closed). Whether the request will
    /// carry entries is known only once it is built, and one that does must be
    /// built after the entries slot is free, to take in every entry appended
    /// meanwhile (built early, it would leave half-empty: measured with two in
    /// flight, a third more follower fsyncs). So it waits for that slot, unless
    /// `log` shows that the request can only carry a new commit index: nothing
    /// appended past `sent_through` and a commit past `commit_sent`. Then the
    /// request goes out at once. After each commit, openraft tells every
    /// follower the new index; one whose own acknowledgement was still on its
    /// way used to get it only after that arrived, usually after the leader's
    /// apply (traced: in ~70% of single-client puts sent to a follower, ~0.13 ms
    /// after the leader's commit).
    async fn acquire(&self, mut log: Option<&mut LogProgress>, sent_through: u64, commit_sent: u64) -> Option<bool> {
        self.all.acquire().await.ok()?.forget();
        loop {
            if let Ok(p) = self.with_entries.try_acquire() {
                p.forget();
                return Some(true);
            }
            let Some(log) = log.as_mut() else { break };
            if log.tail() > sent_through {
                break;
            }
            if log.committed() > commit_sent {
                return Some(false);
            }
            tokio::select! {
                p = self.with_entries.acquire() => {
                    p.ok()?.forget();
                    return Some(true);
                }
                alive = log.committed_changed() => {
                    if !alive {
                        break;
                    }
                }
            }
        }
        self.acquire_entries_slot().await?;
        Some(true)
    }

    /// Waits for the entries slot alone.
    async fn acquire_entries_slot(&self) -> Option<()> {
        self.with_entries.acquire().await.ok()?.forget();
        Some(())
    }

    /// Gives back the entries slot of a request built without entries, at once.
    fn sent_without_entries(&self) {
        self.with_entries.add_permits(1);
    }

    /// Gives back the slots of a request whose result arrived.
    fn release(&self, with_entries: bool) {
        if with_entries {
            self.with_entries.add_permits(1);
        }
        self.all.add_permits(1);
    }
}

fn status_error(s: Status) -> CallError {
    if s.code() == tonic::Code::Unavailable {
        CallError::Unreachable(s.to_string())
    } else {
        CallError::Network(s.to_string())
    }
}

impl RaftNetworkFactory<C> for PeerPool {
    type Network = PeerConn;

    async fn new_client(&mut self, _target: MemberId, node: &PeerInfo) -> Self::Network {
        PeerConn { pool: self.clone(), node: node.clone() }
    }
}

/// openraft's connection to one peer.
pub struct PeerConn {
    pool: PeerPool,
    node: PeerInfo,
}

impl PeerConn {
    async fn raft_call<Req: Serialize, Resp: DeserializeOwned, E, F, Fut>(
        &self,
        req: &Req,
        option: &RPCOption,
        f: F,
    ) -> Result<Resp, RPCError<C>>
    where
        F: FnOnce(PeerClient<Channel>, Request<Payload>) -> Fut,
        Fut: Future<Output = Result<Response<Payload>, Status>>,
        E: DeserializeOwned + std::error::Error,
    {
        let timeout = option.hard_ttl().max(self.pool.min_rpc_timeout);
        let r: Result<Result<Resp, E>, CallError> = self.pool.call(&self.node, req, timeout, f).await;
        match r {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(RPCError::Network(NetworkError::from_string(format!("remote raft error: {e}")))),
            Err(e) => Err(e.into_rpc()),
        }
    }
}

impl RaftNetworkV2<C> for PeerConn {
    type SnapshotData = SnapshotData;

    /// One AppendEntries as one `Append` call. openraft's trait requires it; at the
    /// pinned version openraft sends every AppendEntries through
    /// [`Self::stream_append`] instead, which puts single ones on a [`Lane`].
    async fn append_entries(
        &mut self,
        req: AppendEntriesRequest<C>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<C>, RPCError<C>> {
        self.raft_call::<_, _, RaftError<C>, _, _>(&req, &option, |mut c, r| async move { c.append(r).await }).await
    }

    /// Replication over one `AppendStream` call per openraft stream session: up
    /// to [`MAX_APPENDS_IN_FLIGHT`] requests with entries (and
    /// [`MAX_REQUESTS_IN_FLIGHT`] in all) are sent before their results arrive. A
    /// result that does not come within the RPC timeout ends the session with an
    /// error (openraft backs off and opens a new one). An input
    /// of exactly one request (openraft's heartbeats, which confirm leadership
    /// for every linearizable read) goes on the peer's long-lived [`Lane`]
    /// instead: opening a stream per heartbeat costs a follower two more tasks.
    fn stream_append<'s, S>(
        &'s mut self,
        input: S,
        option: RPCOption,
    ) -> BoxFuture<'s, Result<BoxStream<'s, Result<StreamAppendResult<C>, RPCError<C>>>, RPCError<C>>>
    where
        S: futures::Stream<Item = AppendEntriesRequest<C>> + OptionalSend + Unpin + 'static,
    {
        Box::pin(async move {
            let mut input = input;
            let Some(first) = input.next().await else {
                return Ok(Box::pin(futures::stream::empty()) as BoxStream<'s, _>);
            };
            // Whether more requests follow is known only if the input answers at
            // once: a replication session's input waits for new entries.
            let head = match futures::FutureExt::now_or_never(input.next()) {
                Some(None) => {
                    let timeout = option.hard_ttl().max(self.pool.min_rpc_timeout);
                    let r = self.pool.lane_append(&self.node, first, timeout).await;
                    return Ok(Box::pin(futures::stream::once(async move { r.map_err(CallError::into_rpc) }))
                        as BoxStream<'s, _>);
                }
                Some(Some(second)) => vec![first, second],
                None => vec![first],
            };
            let timeout = option.hard_ttl().max(self.pool.min_rpc_timeout);
            let mut client = self.pool.client(&self.node).map_err(|e| CallError::Unreachable(e).into_rpc())?;
            let input = futures::stream::iter(head).chain(input);
            let window = Arc::new(Window::new());
            let sent = Arc::new(Mutex::new(std::collections::VecDeque::new()));
            // Per stream: its view of the log, the last entry and commit index it sent.
            let state = (input, window.clone(), sent.clone(), self.pool.log_progress.clone(), 0u64, 0u64);
            let requests =
                futures::stream::unfold(state, |(mut input, window, sent, mut log, sent_through, commit_sent)| {
                    async move {
                        // The slots are given back when this request's result
                        // arrives, except that one without entries gives its
                        // entries slot back at once.
                        let holds_entries_slot = window.acquire(log.as_mut(), sent_through, commit_sent).await?;
                        let req = input.next().await?;
                        let with_entries = !req.entries.is_empty();
                        if with_entries && !holds_entries_slot {
                            // Appended after the check above: waits like any other.
                            window.acquire_entries_slot().await?;
                        }
                        if !with_entries && holds_entries_slot {
                            window.sent_without_entries();
                        }
                        let sent_through = req.entries.last().map_or(sent_through, |e| e.log_id.index());
                        let commit_sent = req.leader_commit.as_ref().map_or(commit_sent, |c| c.index());
                        let data = match encode(&req) {
                            Ok(d) => d,
                            Err(e) => {
                                tracing::error!("cannot encode AppendEntries: {e}");
                                return None;
                            }
                        };
                        sent.lock()
                            .expect("append stream lock poisoned")
                            .push_back((std::time::Instant::now(), with_entries));
                        Some((Payload { data }, (input, window, sent, log, sent_through, commit_sent)))
                    }
                });
            // openraft's input keeps its replication state locked while it waits
            // for entries, and its next session waits for that lock: the input
            // must go as soon as this session ends. A request body cannot
            // promise that (the HTTP/2 connection keeps it until the stream is
            // reset, and a body waiting for send capacity on a cut connection is
            // never polled again), so a task builds the requests and hands each
            // to the body, and it is aborted, dropping the input, when the
            // session's results are dropped.
            let (to_body, body) = mpsc::channel(1);
            let builder = tokio::spawn(async move {
                let mut requests = std::pin::pin!(requests);
                while let Some(payload) = requests.next().await {
                    if to_body.send(payload).await.is_err() {
                        return;
                    }
                }
            });
            let stop = AbortOnDrop(builder.abort_handle());
            let body = tokio_stream::wrappers::ReceiverStream::new(body);
            let resp = match tokio::time::timeout(timeout, client.append_stream(self.pool.request(body))).await {
                Err(_) => {
                    return Err(CallError::Network(format!("append stream not answered in {timeout:?}")).into_rpc())
                }
                Ok(Err(s)) => return Err(status_error(s).into_rpc()),
                Ok(Ok(r)) => r.into_inner(),
            };
            let results = AppendResults { resp, window, sent, timeout, _stop: stop };
            let out: BoxStream<'s, _> = Box::pin(futures::stream::unfold(Some(results), |r| async move {
                let mut r = r?;
                match r.next().await {
                    None => None,
                    Some(Ok(v)) => Some((Ok(v), Some(r))),
                    Some(Err(e)) => Some((Err(e.into_rpc()), None)),
                }
            }));
            Ok(out)
        })
    }

    async fn vote(&mut self, req: VoteRequest<C>, option: RPCOption) -> Result<VoteResponse<C>, RPCError<C>> {
        self.raft_call::<_, _, RaftError<C>, _, _>(&req, &option, |mut c, r| async move { c.vote(r).await }).await
    }

    async fn pre_vote(&mut self, req: VoteRequest<C>, option: RPCOption) -> Result<VoteResponse<C>, RPCError<C>> {
        self.raft_call::<_, _, RaftError<C>, _, _>(&req, &option, |mut c, r| async move { c.pre_vote(r).await }).await
    }

    async fn full_snapshot(
        &mut self,
        vote: VoteOf<C>,
        snapshot: SnapshotOf<C, SnapshotData>,
        cancel: impl Future<Output = ReplicationClosed> + OptionalSend + 'static,
        option: RPCOption,
    ) -> Result<SnapshotResponse<C>, StreamingError<C>> {
        let timeout = option.hard_ttl().max(self.pool.min_rpc_timeout);
        let send = self.pool.send_snapshot(&self.node, vote, snapshot, timeout);
        tokio::select! {
            closed = cancel => Err(StreamingError::Closed(closed)),
            res = send => Ok(res?),
        }
    }

    async fn transfer_leader(
        &mut self,
        req: TransferLeaderRequest<C>,
        option: RPCOption,
    ) -> Result<TransferLeaderResponse<C>, RPCError<C>> {
        self.raft_call::<_, _, RaftError<C>, _, _>(&req, &option, |mut c, r| async move { c.transfer_leader(r).await })
            .await
    }
}

/// The server side of the peer service.
pub struct PeerService {
    groups: GroupRegistry,
    /// Largest snapshot a peer may announce (the peer message limit, which the
    /// quota bounds): a larger one is refused before anything is written.
    max_snapshot_bytes: u64,
}

impl PeerService {
    /// Serves the peer requests of every group in `groups`.
    pub fn server(groups: GroupRegistry, max_message_bytes: usize) -> PeerServer<PeerService> {
        PeerServer::new(PeerService { groups, max_snapshot_bytes: max_message_bytes as u64 })
            .max_decoding_message_size(max_message_bytes)
            .max_encoding_message_size(max_message_bytes)
    }
}

impl PeerService {
    /// The group `req` is for (see [`GROUP_HEADER`]); an unknown or malformed
    /// group is refused before anything of the request is looked at.
    fn group_of<T>(&self, req: &Request<T>) -> Result<Group, Status> {
        let id = match req.metadata().get(GROUP_HEADER) {
            None => FIRST_GROUP,
            Some(v) => v
                .to_str()
                .ok()
                .and_then(|s| s.parse::<GroupId>().ok())
                .ok_or_else(|| Status::invalid_argument(format!("malformed {GROUP_HEADER} header")))?,
        };
        self.groups.get(id).ok_or_else(|| Status::not_found(format!("raft group {id} is not on this member")))
    }
}

/// The next frame of a snapshot stream; `None` when the stream ended.
async fn next_frame(frames: &mut Streaming<Payload>) -> Result<Option<SnapshotFrame>, Status> {
    match frames.message().await? {
        Some(p) => {
            decode(&p.data).map(Some).map_err(|e| Status::invalid_argument(format!("malformed snapshot stream: {e}")))
        }
        None => Ok(None),
    }
}

fn arg<T: DeserializeOwned>(req: Request<Payload>) -> Result<T, Status> {
    decode(&req.into_inner().data).map_err(|e| Status::invalid_argument(format!("malformed peer payload: {e}")))
}

fn reply<T: Serialize>(v: &T) -> Result<Response<Payload>, Status> {
    encode(v).map(|data| Response::new(Payload { data })).map_err(Status::internal)
}

#[tonic::async_trait]
impl Peer for PeerService {
    type AppendStreamStream = std::pin::Pin<Box<dyn futures::Stream<Item = Result<Payload, Status>> + Send + 'static>>;
    type MuxStream = std::pin::Pin<Box<dyn futures::Stream<Item = Result<Payload, Status>> + Send + 'static>>;

    async fn append(&self, req: Request<Payload>) -> Result<Response<Payload>, Status> {
        let group = self.group_of(&req)?;
        reply(&group.raft.append_entries(arg(req)?).await)
    }

    /// Feeds the leader's requests to openraft's streaming append and answers each
    /// in order. A request that does not decode ends the stream (after the results
    /// of the ones before it); the leader then opens a new one.
    async fn append_stream(
        &self,
        req: Request<Streaming<Payload>>,
    ) -> Result<Response<Self::AppendStreamStream>, Status> {
        let group = self.group_of(&req)?;
        let requests = futures::stream::unfold(req.into_inner(), |mut incoming| async move {
            match incoming.message().await {
                Ok(Some(p)) => match decode::<AppendEntriesRequest<C>>(&p.data) {
                    Ok(r) => Some((r, incoming)),
                    Err(e) => {
                        tracing::warn!("malformed AppendEntries in a stream from the leader: {e}");
                        None
                    }
                },
                Ok(None) => None,
                Err(s) => {
                    tracing::debug!("append stream from the leader ended: {s}");
                    None
                }
            }
        });
        // openraft spawns the pipeline's task when the stream is made, and the
        // spawn needs the runtime's seeded scope; the results stream itself is
        // the response body (no relay task: one hand-off fewer per append).
        let raft = group.raft.clone();
        let results = super::Runtime::scope(super::fresh_seed(), async move {
            let results: std::pin::Pin<Box<dyn futures::Stream<Item = _> + Send + 'static>> =
                Box::pin(raft.stream_append(requests));
            results
        })
        .await;
        let results = results.map(|r| match r {
            Ok(result) => encode(&result).map(|data| Payload { data }).map_err(Status::internal),
            Err(fatal) => Err(Status::unavailable(format!("raft stopped: {fatal}"))),
        });
        Ok(Response::new(Box::pin(results)))
    }

    async fn vote(&self, req: Request<Payload>) -> Result<Response<Payload>, Status> {
        let group = self.group_of(&req)?;
        reply(&group.raft.vote(arg(req)?).await)
    }

    async fn pre_vote(&self, req: Request<Payload>) -> Result<Response<Payload>, Status> {
        let group = self.group_of(&req)?;
        reply(&group.raft.pre_vote(arg(req)?).await)
    }

    /// Receives a snapshot in chunks (see [`super::snapshot`]) into a scratch file,
    /// and installs it once it is complete and its checksum matches.
    async fn snapshot_stream(&self, req: Request<Streaming<Payload>>) -> Result<Response<Payload>, Status> {
        let group = self.group_of(&req)?;
        let mut frames = req.into_inner();
        let bad = |e: String| Status::invalid_argument(format!("malformed snapshot stream: {e}"));
        let Some(SnapshotFrame::Head { vote, meta, len }) = next_frame(&mut frames).await? else {
            return Err(bad("it does not start with a head".into()));
        };
        if len > self.max_snapshot_bytes {
            return Err(bad(format!("a snapshot of {len} bytes (at most {})", self.max_snapshot_bytes)));
        }
        let dir = group.snapshot_dir();
        let mut incoming = IncomingSnapshot::new(dir, len).map_err(|e| Status::internal(e.to_string()))?;
        let data = loop {
            match next_frame(&mut frames).await? {
                Some(SnapshotFrame::Chunk(chunk)) => incoming.push(&chunk).map_err(|e| bad(e.to_string()))?,
                Some(SnapshotFrame::End { crc32 }) => break incoming.finish(crc32).map_err(|e| bad(e.to_string()))?,
                Some(SnapshotFrame::Head { .. }) => return Err(bad("a second head".into())),
                None => return Err(bad("it ended before the snapshot did".into())),
            }
        };
        let snapshot = Snapshot { meta, snapshot: data };
        let res: Result<SnapshotResponse<C>, RaftError<C>> =
            group.raft.install_full_snapshot(vote, snapshot).await.map_err(RaftError::Fatal);
        reply(&res)
    }

    async fn transfer_leader(&self, req: Request<Payload>) -> Result<Response<Payload>, Status> {
        let group = self.group_of(&req)?;
        let res: Result<TransferLeaderResponse<C>, RaftError<C>> =
            group.raft.handle_transfer_leader(arg(req)?).await.map_err(RaftError::Fatal);
        reply(&res)
    }

    /// A follower's requests to this leader (see [`MuxLane`]): each is worked on
    /// in its own task (up to [`MAX_MUX_IN_FLIGHT`] at once) and answered when it
    /// finishes. A message that does not decode ends the call.
    async fn mux(&self, req: Request<Streaming<Payload>>) -> Result<Response<Self::MuxStream>, Status> {
        let group = self.group_of(&req)?;
        let mut incoming = req.into_inner();
        let (tx, rx) = mpsc::channel(MAX_MUX_IN_FLIGHT);
        tokio::spawn(async move {
            let slots = Arc::new(Semaphore::new(MAX_MUX_IN_FLIGHT));
            loop {
                let frame = match incoming.message().await {
                    Ok(Some(p)) => match decode::<MuxFrame<MuxRequest>>(&p.data) {
                        Ok(f) => f,
                        Err(e) => {
                            tracing::warn!("malformed request on a follower's mux call: {e}");
                            break;
                        }
                    },
                    Ok(None) => break,
                    Err(s) => {
                        tracing::debug!("mux call from a follower ended: {s}");
                        break;
                    }
                };
                let Ok(slot) = slots.clone().acquire_owned().await else { break };
                let (group, tx) = (group.clone(), tx.clone());
                tokio::spawn(async move {
                    let body = match frame.body {
                        MuxRequest::Propose(cmds) if cmds.len() > MAX_FORWARD_BATCH => MuxReply::Refused(format!(
                            "{} forwarded writes in one batch (at most {MAX_FORWARD_BATCH})",
                            cmds.len()
                        )),
                        MuxRequest::Propose(cmds) => MuxReply::Propose(propose_forwarded(&group, cmds).await),
                        // A replica whose Raft core is gone (stopped or failed) is
                        // no leader either: the reader asks the next one.
                        MuxRequest::ReadIndex => MuxReply::ReadIndex(match group.local_read_index().await {
                            Ok(i) => ForwardReply::Ok(i),
                            Err(_) => ForwardReply::NotLeader,
                        }),
                        MuxRequest::Call(req) => MuxReply::Call(match group.local_leader_call(req).await {
                            Ok(answer) => ForwardReply::Ok(answer),
                            Err(ConsensusError::NotLeader | ConsensusError::NoLeader) => ForwardReply::NotLeader,
                            Err(e) => ForwardReply::Failed(e.to_string()),
                        }),
                    };
                    let out = encode(&MuxFrame { seq: frame.seq, body }).map(|data| Payload { data });
                    let _ = tx.send(out.map_err(Status::internal)).await;
                    drop(slot);
                });
            }
        });
        let answers = futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|r| (r, rx)) });
        Ok(Response::new(Box::pin(answers)))
    }

    async fn admin(&self, req: Request<Payload>) -> Result<Response<Payload>, Status> {
        let group = self.group_of(&req)?;
        match arg(req)? {
            AdminRequest::LearnerCaughtUp(id) => {
                let out = match group.local_learner_caught_up(id) {
                    Ok(ready) => ForwardReply::Ok(ready),
                    Err(ConsensusError::NotLeader) => ForwardReply::NotLeader,
                    Err(e) => ForwardReply::Failed(e.to_string()),
                };
                reply(&out)
            }
            AdminRequest::Probe => reply(&()),
            AdminRequest::Service(req) => {
                let answer = group.local_member_call(req).await.map(super::raw_bytes::ByteString);
                reply(&answer.map_err(|e| e.to_string()))
            }
        }
    }

    /// A peer node's liveness ping (node-level: no group header).
    async fn liveness(&self, req: Request<Payload>) -> Result<Response<Payload>, Status> {
        self.groups.liveness().heard(arg(req)?);
        reply(&())
    }
}

/// Submits a batch of forwarded writes together; one answer per write, in order.
async fn propose_forwarded(group: &Group, cmds: Vec<Proposal>) -> Vec<ForwardReply<Vec<u8>>> {
    let count = cmds.len();
    let mut out = Vec::with_capacity(count);
    group.wake().await;
    match group.raft.client_write_many(cmds).await {
        // The Raft core is gone (this replica was stopped, or failed): nothing was
        // appended, and a leader elected among the others can take the writes.
        Err(fatal) => {
            tracing::debug!("forwarded writes refused: {fatal}");
            out.resize_with(count, || ForwardReply::NotLeader)
        }
        Ok(mut results) => {
            while let Some(r) = results.next().await {
                out.push(match r {
                    Ok(Ok(written)) => ForwardReply::Ok(written.response),
                    Ok(Err(e)) => match super::client_write_error(openraft::errors::RaftError::APIError(e)) {
                        ConsensusError::NotLeader => ForwardReply::NotLeader,
                        ConsensusError::LeaderLost => ForwardReply::Discarded,
                        other => ForwardReply::Failed(other.to_string()),
                    },
                    // Stopped after it took the writes: they may have been appended.
                    Err(_) => ForwardReply::Discarded,
                });
            }
            // Results that never came: appended or not, nobody can say.
            out.resize_with(count, || ForwardReply::Discarded);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use openraft::entry::RaftEntry;
    use openraft::storage::{IOFlushed, RaftLogStorage};
    use openraft::testing::common::log_id;
    use openraft::type_config::alias::EntryOf;
    use openraft::type_config::TypeConfigExt;

    use super::*;
    use crate::consensus::log_store::LogStore;

    /// A leader's log (member 1) with entries 1..=`last` appended and flushed.
    async fn leader_log(dir: &std::path::Path, last: u64) -> LogStore {
        let mut log = LogStore::open(dir, 1, 1, Arc::default()).expect("open log");
        let entries: Vec<_> = (1..=last).map(|i| EntryOf::<C>::new_blank(log_id::<C>(1, 1, i))).collect();
        let (tx, rx) = C::oneshot();
        log.append(entries, IOFlushed::signal(tx)).await.expect("append");
        rx.await.expect("flushed").expect("fsync");
        log
    }

    async fn commit(log: &mut LogStore, index: u64) {
        log.save_committed(Some(log_id::<C>(1, 1, index))).await.expect("save committed");
    }

    /// openraft's input to a replication session, waiting for entries (it holds
    /// its replication state locked meanwhile), is dropped as soon as the
    /// session's results are, even if the request body is never polled again.
    #[tokio::test]
    async fn a_sessions_input_is_dropped_with_its_results() {
        struct DropFlag(Arc<std::sync::atomic::AtomicBool>);
        impl Drop for DropFlag {
            fn drop(&mut self) {
                self.0.store(true, std::sync::atomic::Ordering::SeqCst);
            }
        }
        let dropped = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = DropFlag(dropped.clone());
        let mut input = futures::stream::pending::<AppendEntriesRequest<C>>();
        let builder = tokio::spawn(async move {
            let _flag = flag;
            input.next().await
        });
        let stop = AbortOnDrop(builder.abort_handle());
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!dropped.load(std::sync::atomic::Ordering::SeqCst), "the input lives while the session does");
        drop(stop);
        let _ = tokio::time::timeout(Duration::from_secs(5), builder).await.expect("aborted at once");
        assert!(dropped.load(std::sync::atomic::Ordering::SeqCst), "the input was dropped");
    }

    /// With entries in flight, the next request waits for their result when it
    /// may carry entries (some are unsent, or no new commit index to send), and
    /// goes at once when it can only carry a new commit index.
    #[tokio::test]
    async fn only_a_commit_index_passes_entries_in_flight() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut log = leader_log(dir.path(), 5).await;
        let mut progress = log.progress();
        let window = Window::new();
        let soon = Duration::from_millis(50);

        // Entries 1..=5 go out (commit 0 with them) and stay unanswered.
        assert_eq!(window.acquire(Some(&mut progress), 0, 0).await, Some(true));

        // Nothing new to send: waits, until the commit index moves.
        {
            let wait = window.acquire(Some(&mut progress), 5, 0);
            tokio::pin!(wait);
            assert!(tokio::time::timeout(soon, &mut wait).await.is_err(), "nothing to send yet");
            commit(&mut log, 5).await;
            assert_eq!(tokio::time::timeout(soon, wait).await.expect("a commit to send"), Some(false));
        }

        // A commit index already sent is no reason to go again.
        let wait = window.acquire(Some(&mut progress), 5, 5);
        assert!(tokio::time::timeout(soon, wait).await.is_err(), "that commit was sent");

        // Unsent entries wait for the slot, even with a new commit to send.
        let log6 = leader_log(dir.path().join("x").as_path(), 6).await;
        let mut progress6 = log6.progress();
        let wait = window.acquire(Some(&mut progress6), 5, 0);
        tokio::pin!(wait);
        assert!(tokio::time::timeout(soon, &mut wait).await.is_err(), "entry 6 waits for the slot");
        window.release(true);
        assert_eq!(tokio::time::timeout(soon, wait).await.expect("slot given back"), Some(true));
    }
}
