//! The peer network: openraft RPCs, write forwarding and ReadIndex over gRPC.
//!
//! Every payload is `bincode` of an openraft (or concord) type inside the opaque
//! `Payload` message of `proto/concord/peer.proto`. Decoding a payload from a peer
//! never panics: a malformed payload is an `InvalidArgument` status.
//! Message size is bounded in both directions by `max_peer_message_bytes`.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use openraft::errors::{NetworkError, RPCError, RaftError, ReplicationClosed, StreamingError, Unreachable};
use openraft::network::{RPCOption, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, SnapshotResponse, TransferLeaderRequest, TransferLeaderResponse,
    VoteRequest, VoteResponse,
};
use openraft::type_config::alias::{SnapshotOf, VoteOf};
use openraft::{OptionalSend, RaftNetworkV2, Snapshot};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tonic::transport::{Channel, Endpoint};
use tonic::{Request, Response, Status};

use super::{Command, CommandResult, ConsensusError, Group, MemberId, PeerInfo, SnapshotData, TypeConfig};
use crate::proto::peer::peer_client::PeerClient;
use crate::proto::peer::peer_server::{Peer, PeerServer};
use crate::proto::peer::Payload;

type C = TypeConfig;

fn encode<T: Serialize>(v: &T) -> Result<Vec<u8>, String> {
    bincode::serde::encode_to_vec(v, bincode::config::standard()).map_err(|e| e.to_string())
}

fn decode<T: DeserializeOwned>(b: &[u8]) -> Result<T, String> {
    bincode::serde::decode_from_slice(b, bincode::config::standard()).map(|(v, _)| v).map_err(|e| e.to_string())
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

/// Member-to-member administration (the `Admin` peer RPC).
#[derive(Debug, Serialize, Deserialize)]
enum AdminRequest {
    /// A joining member asks for the cluster ID and the member registry.
    ClusterInfo,
    /// Whether the given learner has caught up with the leader (asked of the leader).
    LearnerCaughtUp(MemberId),
    /// The receiver's HashKV at a revision, once it has applied that revision (the
    /// leader's cross-member corruption check).
    HashKvAt(i64),
}

/// What a member tells a joining member about its cluster.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ClusterInfo {
    pub cluster_id: u64,
    pub members: Vec<(MemberId, super::members::MemberRecord)>,
    /// The answering member's applied log index (read before the registry, so the
    /// registry is at least this fresh).
    pub applied_index: u64,
}

/// How long a member waits to apply the revision a HashKV check asks about.
const HASH_KV_WAIT: Duration = Duration::from_secs(5);

/// The TLS client configuration peers are dialled with (`https://` peer URLs).
pub type PeerTls = Arc<rustls::ClientConfig>;

/// Connections to peers, shared by every Raft client and forwarding call.
#[derive(Clone)]
pub struct PeerPool {
    channels: Arc<Mutex<HashMap<String, Channel>>>,
    /// Used for `https://` peers; an `https://` peer without it is unreachable.
    tls: Option<PeerTls>,
    max_message_bytes: usize,
    /// Where AppendEntries round trips are recorded (absent for one-off pools).
    stats: Option<Arc<crate::stats::GroupStats>>,
    /// Shortest time a Raft RPC may take before it counts as failed. openraft asks
    /// for one heartbeat interval on appends; a follower whose fsync takes longer
    /// (a loaded or slow disk) would then never acknowledge, and its replication
    /// would retry the same batch forever. Rejected: openraft's value unchanged.
    min_rpc_timeout: Duration,
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
        PeerPool { channels: Arc::default(), tls, max_message_bytes, stats, min_rpc_timeout }
    }

    fn client(&self, node: &PeerInfo) -> Result<PeerClient<Channel>, String> {
        let url = node.peer_urls.first().ok_or_else(|| "member has no peer URL".to_string())?;
        let mut map = self.channels.lock().expect("peer channel map poisoned");
        let channel = match map.get(url) {
            Some(c) => c.clone(),
            None => {
                let c = match url.strip_prefix("https://") {
                    None => Endpoint::from_shared(url.clone())
                        .map_err(|e| format!("bad peer URL {url}: {e}"))?
                        .connect_timeout(Duration::from_secs(1))
                        .tcp_nodelay(true)
                        .connect_lazy(),
                    Some(hostport) => {
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
        let mut request = Request::new(Payload { data });
        request.set_timeout(timeout);
        match tokio::time::timeout(timeout, f(client, request)).await {
            Err(_) => Err(CallError::Network(format!("peer call timed out after {timeout:?}"))),
            Ok(Err(s)) if s.code() == tonic::Code::Unavailable => Err(CallError::Unreachable(s.to_string())),
            Ok(Err(s)) => Err(CallError::Network(s.to_string())),
            Ok(Ok(resp)) => decode(&resp.into_inner().data).map_err(CallError::Network),
        }
    }

    /// Forwards a proposal to the leader `node`.
    pub async fn propose(
        &self,
        node: &PeerInfo,
        cmd: &Command,
        timeout: Duration,
    ) -> Result<CommandResult, ConsensusError> {
        let r: Result<ForwardReply<CommandResult>, _> =
            self.call(node, cmd, timeout, |mut c, r| async move { c.propose(r).await }).await;
        forward_result(r)
    }

    /// Asks the member at `peer_url` for its cluster ID and member registry.
    pub async fn cluster_info(&self, peer_url: &str, timeout: Duration) -> Result<ClusterInfo, String> {
        let node = PeerInfo { peer_urls: vec![peer_url.to_string()] };
        let r: Result<Result<ClusterInfo, String>, _> =
            self.call(&node, &AdminRequest::ClusterInfo, timeout, |mut c, r| async move { c.admin(r).await }).await;
        r.map_err(|e| format!("{e:?}"))?
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

    /// Asks `node` for its (HashKV, compact revision) at `rev`.
    pub async fn hash_kv_at(&self, node: &PeerInfo, rev: i64, timeout: Duration) -> Result<(u32, i64), String> {
        let r: Result<Result<(u32, i64), String>, _> =
            self.call(node, &AdminRequest::HashKvAt(rev), timeout, |mut c, r| async move { c.admin(r).await }).await;
        r.map_err(|e| format!("{e:?}"))?
    }

    /// Asks the leader `node` for a read index.
    pub async fn read_index(&self, node: &PeerInfo, timeout: Duration) -> Result<u64, ConsensusError> {
        let r: Result<ForwardReply<u64>, _> =
            self.call(node, &(), timeout, |mut c, r| async move { c.read_index(r).await }).await;
        forward_result(r)
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

#[derive(Debug)]
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

impl RaftNetworkFactory<C> for PeerPool {
    type Network = PeerConn;

    async fn new_client(&mut self, target: MemberId, node: &PeerInfo) -> Self::Network {
        PeerConn { pool: self.clone(), node: node.clone(), target }
    }
}

/// openraft's connection to one peer.
pub struct PeerConn {
    pool: PeerPool,
    node: PeerInfo,
    target: MemberId,
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

    async fn append_entries(
        &mut self,
        req: AppendEntriesRequest<C>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<C>, RPCError<C>> {
        let started = std::time::Instant::now();
        let r = self
            .raft_call::<_, _, RaftError<C>, _, _>(&req, &option, |mut c, r| async move { c.append(r).await })
            .await;
        if let (Ok(_), Some(stats)) = (&r, &self.pool.stats) {
            stats.observe_peer_rtt(self.target, started.elapsed());
        }
        r
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
        let req = (vote, snapshot.meta, snapshot.snapshot.into_inner());
        let call =
            self.raft_call::<_, _, RaftError<C>, _, _>(&req, &option, |mut c, r| async move { c.snapshot(r).await });
        tokio::select! {
            closed = cancel => Err(StreamingError::Closed(closed)),
            res = call => Ok(res?),
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
    group: Group,
}

impl PeerService {
    pub fn server(group: Group, max_message_bytes: usize) -> PeerServer<PeerService> {
        PeerServer::new(PeerService { group })
            .max_decoding_message_size(max_message_bytes)
            .max_encoding_message_size(max_message_bytes)
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
    async fn append(&self, req: Request<Payload>) -> Result<Response<Payload>, Status> {
        reply(&self.group.raft.append_entries(arg(req)?).await)
    }

    async fn vote(&self, req: Request<Payload>) -> Result<Response<Payload>, Status> {
        reply(&self.group.raft.vote(arg(req)?).await)
    }

    async fn pre_vote(&self, req: Request<Payload>) -> Result<Response<Payload>, Status> {
        reply(&self.group.raft.pre_vote(arg(req)?).await)
    }

    async fn snapshot(&self, req: Request<Payload>) -> Result<Response<Payload>, Status> {
        let (vote, meta, data): (VoteOf<C>, _, Vec<u8>) = arg(req)?;
        let snapshot = Snapshot { meta, snapshot: std::io::Cursor::new(data) };
        let res: Result<SnapshotResponse<C>, RaftError<C>> =
            self.group.raft.install_full_snapshot(vote, snapshot).await.map_err(RaftError::Fatal);
        reply(&res)
    }

    async fn transfer_leader(&self, req: Request<Payload>) -> Result<Response<Payload>, Status> {
        let res: Result<TransferLeaderResponse<C>, RaftError<C>> =
            self.group.raft.handle_transfer_leader(arg(req)?).await.map_err(RaftError::Fatal);
        reply(&res)
    }

    async fn propose(&self, req: Request<Payload>) -> Result<Response<Payload>, Status> {
        let cmd: Command = arg(req)?;
        let out = match self.group.raft.client_write(cmd).await {
            Ok(resp) => ForwardReply::Ok(resp.data),
            Err(e) => match super::client_write_error(e) {
                ConsensusError::NotLeader => ForwardReply::NotLeader,
                ConsensusError::LeaderLost => ForwardReply::Discarded,
                other => ForwardReply::Failed(other.to_string()),
            },
        };
        reply(&out)
    }

    async fn admin(&self, req: Request<Payload>) -> Result<Response<Payload>, Status> {
        match arg(req)? {
            AdminRequest::ClusterInfo => {
                let info = self.group.cluster_info().map_err(|e| e.to_string());
                reply(&info)
            }
            AdminRequest::LearnerCaughtUp(id) => {
                let out = match self.group.local_learner_caught_up(id) {
                    Ok(ready) => ForwardReply::Ok(ready),
                    Err(ConsensusError::NotLeader) => ForwardReply::NotLeader,
                    Err(e) => ForwardReply::Failed(e.to_string()),
                };
                reply(&out)
            }
            AdminRequest::HashKvAt(rev) => reply(&self.group.local_hash_kv_at(rev, HASH_KV_WAIT).await),
        }
    }

    async fn read_index(&self, _req: Request<Payload>) -> Result<Response<Payload>, Status> {
        let out = match self.group.local_read_index().await {
            Ok(i) => ForwardReply::Ok(i),
            Err(ConsensusError::Fatal(e)) => ForwardReply::Failed(e),
            Err(_) => ForwardReply::NotLeader,
        };
        reply(&out)
    }
}
