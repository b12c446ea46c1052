//! This member's replicas of the catalog's groups (see
//! [`crate::etcd_store::catalog`]), and the client services over them.
//!
//! [`GroupHost::run`] keeps the hosted replicas equal to what the applied
//! catalog gives this member: it starts a replica of every group that lists it
//! (data in `member/groups/<id>`, log in the node's shared journal) and stops
//! and deletes one whose group left the catalog. The first replica listed
//! initialises the group's Raft with every replica as a voter (a no-op once
//! done, so a crash mid-way is repaired on the next pass). A member that
//! restarts hosts its groups again from the catalog, which the etcd store's
//! group keeps durable.
//!
//! Ordering rule: a group's data directory and log are deleted only after its
//! Raft core has stopped and it no longer receives peer requests.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tonic::{Request, Response, Status};

use super::Node;
use crate::consensus::log_store::NodeLog;
use crate::consensus::{GroupConfig, GroupId, GroupRegistry, MemberId, PeerInfo};
use crate::etcd_store::catalog::{self, CatalogChange, GroupSpec, ServiceKind};
use crate::etcd_store::{members, Command};
use crate::proto::groups::groups_server::Groups;
use crate::proto::groups::registers_server::Registers as RegistersApi;
use crate::proto::groups::{
    CasRequest, CasResponse, CreateRequest, CreateResponse, GroupLeader, ListRequest, ListResponse, NodeInfo,
    NodesRequest, NodesResponse, ReadRequest, ReadResponse, RemoveRequest, RemoveResponse, WriteRequest, WriteResponse,
};
use crate::register::{RegisterError, Registers};
use crate::streams::StreamGroup;

/// Least time between a hosted replica's failure and its restart.
const RESTART_BACKOFF: Duration = Duration::from_secs(1);

/// Pause between passes that match the hosted replicas to the catalog.
const HOST_INTERVAL: Duration = Duration::from_millis(200);

/// A hosted replica, by its service.
#[derive(Clone)]
pub enum Hosted {
    Register(Registers),
    Stream(StreamGroup),
}

impl Hosted {
    pub fn group(&self) -> &crate::consensus::Group {
        match self {
            Hosted::Register(r) => &r.group,
            Hosted::Stream(s) => &s.group,
        }
    }
}

/// The catalog groups this member hosts.
pub struct GroupHost {
    member: MemberId,
    /// `member/groups`: one directory per hosted group.
    dir: PathBuf,
    log: NodeLog,
    /// Where the peer service finds each group.
    registry: GroupRegistry,
    config: GroupConfig,
    hosted: Mutex<BTreeMap<GroupId, Hosted>>,
    /// Hosted groups known to be initialised: not asked again every pass (each
    /// question wakes the group's Raft core).
    initialized: Mutex<BTreeSet<GroupId>>,
    /// Replicas closed after their Raft core stopped, and when: started again only
    /// [`RESTART_BACKOFF`] later, so one that keeps failing does not spin.
    failed: Mutex<BTreeMap<GroupId, std::time::Instant>>,
    /// Wakes [`GroupHost::run`] for a pass now (after a catalog change here).
    kick: tokio::sync::Notify,
}

impl GroupHost {
    pub fn new(member: MemberId, dir: PathBuf, log: NodeLog, registry: GroupRegistry, config: GroupConfig) -> Self {
        GroupHost {
            member,
            dir,
            log,
            registry,
            config,
            hosted: Mutex::default(),
            initialized: Mutex::default(),
            failed: Mutex::default(),
            kick: tokio::sync::Notify::new(),
        }
    }

    /// The replica of group `id`, if this member hosts it.
    pub fn hosted(&self, id: GroupId) -> Option<Hosted> {
        self.hosted.lock().expect("hosted groups poisoned").get(&id).cloned()
    }

    /// The register group `id`, if this member hosts it.
    pub fn registers(&self, id: GroupId) -> Option<Registers> {
        match self.hosted(id)? {
            Hosted::Register(r) => Some(r),
            Hosted::Stream(_) => None,
        }
    }

    /// Every stream group this member hosts.
    pub fn streams(&self) -> Vec<StreamGroup> {
        let hosted = self.hosted.lock().expect("hosted groups poisoned");
        hosted
            .values()
            .filter_map(|h| match h {
                Hosted::Stream(s) => Some(s.clone()),
                Hosted::Register(_) => None,
            })
            .collect()
    }

    /// The stream group `id`, if this member hosts it.
    pub fn stream(&self, id: GroupId) -> Option<StreamGroup> {
        match self.hosted(id)? {
            Hosted::Stream(s) => Some(s),
            Hosted::Register(_) => None,
        }
    }

    /// Matches the hosted replicas to the catalog, every [`HOST_INTERVAL`], for
    /// the member's lifetime.
    pub async fn run(self: Arc<Self>, node: Arc<Node>) {
        let mut tick = tokio::time::interval(HOST_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = self.kick.notified() => {}
            }
            if let Err(e) = self.pass(&node).await {
                tracing::warn!("hosting catalog groups: {e}");
            }
        }
    }

    /// Waits until this member hosts group `id` (and its Raft knows a leader),
    /// or no longer hosts it (`hosted` false), for at most `timeout`: a client
    /// that changed the catalog here can use the change at once.
    pub async fn settle(&self, id: GroupId, hosted: bool, timeout: Duration) {
        self.kick.notify_one();
        let deadline = tokio::time::Instant::now() + timeout;
        while tokio::time::Instant::now() < deadline {
            let done = match self.hosted(id) {
                Some(r) => hosted && r.group().metrics().current_leader.is_some(),
                None => !hosted,
            };
            if done {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn pass(&self, node: &Node) -> Result<(), String> {
        let (catalog, registry) = {
            let txn = node.group.backend.begin_read().map_err(|e| e.to_string())?;
            let catalog = catalog::groups(&txn).map_err(|e| e.to_string())?;
            (catalog, members::records(&txn).map_err(|e| e.to_string())?)
        };
        let peers: BTreeMap<MemberId, PeerInfo> =
            registry.into_iter().map(|(id, r)| (id, PeerInfo { peer_urls: r.peer_urls })).collect();
        let mine: BTreeMap<GroupId, GroupSpec> =
            catalog.into_iter().filter(|(_, spec)| spec.replicas.contains(&self.member)).collect();
        self.restart_failed().await?;
        // One group's trouble does not hold up the others: errors are collected.
        let mut errors = Vec::new();
        let hosted: BTreeSet<GroupId> = self.hosted.lock().expect("hosted groups poisoned").keys().copied().collect();
        for id in hosted.iter().filter(|id| !mine.contains_key(id)) {
            errors.extend(self.stop(*id).await.err());
        }
        let backing_off: BTreeSet<GroupId> = {
            let mut failed = self.failed.lock().expect("failed groups poisoned");
            failed.retain(|_, at| at.elapsed() < RESTART_BACKOFF);
            failed.keys().copied().collect()
        };
        for (id, spec) in &mine {
            if !hosted.contains(id) && !backing_off.contains(id) {
                if let Err(e) = self.start(*id, spec).await {
                    errors.push(e);
                    continue;
                }
            }
            if spec.replicas.first() == Some(&self.member) {
                errors.extend(self.initialize(*id, spec, &peers).await.err());
            }
        }
        match errors.is_empty() {
            true => Ok(()),
            false => Err(errors.join("; ")),
        }
    }

    /// Closes every hosted replica whose Raft core has stopped (a storage failure,
    /// a panic in it), keeping its data: the rest of this pass starts it again
    /// from its log and state. Supervision by design for catalog groups: one
    /// failed group does not stop the member or its other groups, and is not left
    /// silently dead either.
    async fn restart_failed(&self) -> Result<(), String> {
        let failed: Vec<(GroupId, String)> = self
            .hosted
            .lock()
            .expect("hosted groups poisoned")
            .iter()
            .filter_map(|(id, r)| {
                let metrics = r.group().raft.metrics();
                let state = openraft::async_runtime::WatchReceiver::borrow_watched(&metrics);
                state.running_state.as_ref().err().map(|e| (*id, e.to_string()))
            })
            .collect();
        for (id, why) in failed {
            tracing::error!(group = id, "the Raft core of a hosted group stopped ({why}); restarting its replica");
            self.close(id).await?;
            self.failed.lock().expect("failed groups poisoned").insert(id, std::time::Instant::now());
        }
        Ok(())
    }

    /// Stops routing to replica `id`, stops its Raft core and waits until its log
    /// store is closed; its data stays.
    async fn close(&self, id: GroupId) -> Result<(), String> {
        self.registry.remove(id);
        self.initialized.lock().expect("initialized groups poisoned").remove(&id);
        let Some(group) = self.hosted.lock().expect("hosted groups poisoned").remove(&id) else { return Ok(()) };
        // A core that failed has stopped already; shutting it down again is harmless.
        if let Err(e) = group.group().raft.shutdown().await {
            tracing::debug!(group = id, "shutdown: {e}");
        }
        drop(group);
        Ok(())
    }

    async fn start(&self, id: GroupId, spec: &GroupSpec) -> Result<(), String> {
        let log = self.log.group(id, self.member).map_err(|e| format!("group {id}: {e}"))?;
        let dir = self.dir.join(id.to_string());
        let failed = |e| format!("group {id}: {e}");
        let group = match spec.service {
            ServiceKind::Register => {
                Hosted::Register(Registers::start(self.member, id, &dir, log, &self.config).await.map_err(failed)?)
            }
            ServiceKind::Stream | ServiceKind::Blob => {
                Hosted::Stream(StreamGroup::start(self.member, id, &dir, log, &self.config).await.map_err(failed)?)
            }
        };
        self.registry.insert(group.group().clone());
        self.hosted.lock().expect("hosted groups poisoned").insert(id, group);
        tracing::info!(group = id, service = spec.service.name(), "hosting a replica");
        Ok(())
    }

    async fn initialize(
        &self,
        id: GroupId,
        spec: &GroupSpec,
        peers: &BTreeMap<MemberId, PeerInfo>,
    ) -> Result<(), String> {
        let Some(group) = self.hosted(id) else { return Ok(()) };
        let group = group.group();
        if self.initialized.lock().expect("initialized groups poisoned").contains(&id) {
            return Ok(());
        }
        if group.raft.is_initialized().await.map_err(|e| e.to_string())? {
            self.initialized.lock().expect("initialized groups poisoned").insert(id);
            return Ok(());
        }
        let voters: BTreeMap<MemberId, PeerInfo> =
            spec.replicas.iter().filter_map(|r| Some((*r, peers.get(r)?.clone()))).collect();
        if voters.len() != spec.replicas.len() {
            return Err(format!("group {id}: a replica is not a registered member"));
        }
        match group.raft.initialize(voters).await {
            Ok(()) => tracing::info!(group = id, "initialised a catalog group"),
            Err(e) => tracing::debug!(group = id, "group already initialised: {e}"),
        }
        Ok(())
    }

    async fn stop(&self, id: GroupId) -> Result<(), String> {
        self.close(id).await?;
        let dir = self.dir.join(id.to_string());
        match std::fs::remove_dir_all(&dir) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(format!("{}: {e}", dir.display())),
            _ => {}
        }
        // The log store is closed once the Raft core and every handle are gone;
        // until then removing it is refused and retried on the next pass.
        for _ in 0..50 {
            match self.log.remove_group(id) {
                Ok(()) => {
                    tracing::info!(group = id, "stopped and deleted a replica");
                    return Ok(());
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Err(e) => return Err(format!("group {id}: {e}")),
            }
        }
        Err(format!("group {id}: its log is still open"))
    }
}

fn spec_message(id: GroupId, spec: &GroupSpec) -> crate::proto::groups::GroupSpec {
    crate::proto::groups::GroupSpec { id, service: spec.service.name().to_string(), replicas: spec.replicas.clone() }
}

/// Replicas of a group created without a replica list or count.
pub const DEFAULT_GROUP_REPLICAS: usize = 3;

/// The replicas placement gives a new group `id`: the hash ring over the voting
/// members with their announced labels, the catalog's groups where they are
/// (they do not move here). The first replica initialises the group and so
/// usually leads it; it is the first on the group's walk, so leaders spread.
pub(crate) fn place_new_group(
    txn: &redb::ReadTransaction,
    id: GroupId,
    count: usize,
) -> std::io::Result<Vec<MemberId>> {
    let labels = members::labels(txn)?;
    let nodes = members::records(txn)?.into_iter().filter(|(_, r)| !r.learner).map(|(m, _)| {
        let l = labels.get(&m).cloned().unwrap_or_default();
        crate::placement::Node { id: m, zone: l.zone, weight: l.weight }
    });
    let ring = crate::placement::Ring::new(nodes);
    let mut current: crate::placement::Placement =
        catalog::groups(txn)?.into_iter().map(|(g, spec)| (g, spec.replicas)).collect();
    current.insert(id, Vec::new());
    let mut placed = crate::placement::rebalance(&ring, &current, count);
    Ok(placed.remove(&id).unwrap_or_default())
}

/// `concord.groups.v1.Groups`: the catalog, for administrators.
pub struct GroupsService {
    pub node: Arc<Node>,
    pub host: Arc<GroupHost>,
}

#[tonic::async_trait]
impl Groups for GroupsService {
    async fn create(&self, req: Request<CreateRequest>) -> Result<Response<CreateResponse>, Status> {
        self.node.require_admin(&req)?;
        let req = req.into_inner();
        let want = req.group.ok_or_else(|| Status::invalid_argument("concord: no group given"))?;
        let service = ServiceKind::parse(&want.service)
            .ok_or_else(|| Status::invalid_argument(format!("concord: unknown service {:?}", want.service)))?;
        let replicas = if want.replicas.is_empty() {
            let count = match req.replica_count {
                0 => DEFAULT_GROUP_REPLICAS,
                n => n as usize,
            };
            // The registry and catalog as of now, not as this member last applied them.
            let txn = self.node.linearizable_txn().await?;
            place_new_group(&txn, want.id, count).map_err(|e| Status::internal(e.to_string()))?
        } else {
            want.replicas
        };
        let spec = GroupSpec { service, replicas };
        let change = CatalogChange::Create { id: want.id, spec: spec.clone() };
        self.node.propose::<RemoveResponse>(Command::Catalog(change)).await?;
        if spec.replicas.contains(&self.node.member_id) {
            self.host.settle(want.id, true, self.node.config.request_timeout()).await;
        }
        Ok(Response::new(CreateResponse { group: Some(spec_message(want.id, &spec)) }))
    }

    async fn remove(&self, req: Request<RemoveRequest>) -> Result<Response<RemoveResponse>, Status> {
        self.node.require_admin(&req)?;
        let id = req.into_inner().id;
        self.node.propose::<RemoveResponse>(Command::Catalog(CatalogChange::Remove { id })).await?;
        self.host.settle(id, false, self.node.config.request_timeout()).await;
        Ok(Response::new(RemoveResponse {}))
    }

    async fn nodes(&self, req: Request<NodesRequest>) -> Result<Response<NodesResponse>, Status> {
        self.node.require_admin(&req)?;
        let txn = self.node.linearizable_txn().await?;
        let internal = |e: std::io::Error| Status::internal(e.to_string());
        let labels = members::labels(&txn).map_err(internal)?;
        let groups = catalog::groups(&txn).map_err(internal)?;
        let nodes = members::records(&txn)
            .map_err(internal)?
            .into_iter()
            .map(|(id, r)| {
                let l = labels.get(&id).cloned().unwrap_or_default();
                let hosted = groups.iter().filter(|(_, spec)| spec.replicas.contains(&id)).count();
                NodeInfo {
                    id,
                    name: r.name,
                    zone: l.zone,
                    weight: l.weight,
                    learner: r.learner,
                    client_urls: r.client_urls,
                    replicas: u32::try_from(hosted + 1).unwrap_or(u32::MAX),
                }
            })
            .collect();
        let leaders = self
            .node
            .registry
            .all()
            .iter()
            .map(|g| GroupLeader { group: g.group_id, leader: g.metrics().current_leader.unwrap_or(0) })
            .collect();
        Ok(Response::new(NodesResponse { nodes, leaders }))
    }

    async fn list(&self, req: Request<ListRequest>) -> Result<Response<ListResponse>, Status> {
        self.node.require_admin(&req)?;
        let txn = self.node.linearizable_txn().await?;
        let groups = catalog::groups(&txn).map_err(|e| Status::internal(e.to_string()))?;
        Ok(Response::new(ListResponse { groups: groups.iter().map(|(id, s)| spec_message(*id, s)).collect() }))
    }
}

/// `concord.groups.v1.Registers`: the register service of the catalog's
/// register groups, on any member hosting a replica.
pub struct RegistersService {
    pub node: Arc<Node>,
    pub host: Arc<GroupHost>,
}

impl RegistersService {
    fn group<T>(&self, req: &Request<T>, id: GroupId) -> Result<Registers, Status> {
        self.node.require_admin(req)?;
        self.host.registers(id).ok_or_else(|| Status::not_found(format!("concord: raft group {id} is not hosted here")))
    }
}

fn register_status(e: RegisterError) -> Status {
    match e {
        RegisterError::Consensus(e) => super::errors::from_consensus(e),
        other => Status::internal(other.to_string()),
    }
}

#[tonic::async_trait]
impl RegistersApi for RegistersService {
    async fn write(&self, req: Request<WriteRequest>) -> Result<Response<WriteResponse>, Status> {
        let group = self.group(&req, req.get_ref().group)?;
        let req = req.into_inner();
        group.write(&req.key, req.value, self.node.config.request_timeout()).await.map_err(register_status)?;
        Ok(Response::new(WriteResponse {}))
    }

    async fn cas(&self, req: Request<CasRequest>) -> Result<Response<CasResponse>, Status> {
        let group = self.group(&req, req.get_ref().group)?;
        let req = req.into_inner();
        let swapped = group
            .cas(&req.key, req.expect, req.value, self.node.config.request_timeout())
            .await
            .map_err(register_status)?;
        Ok(Response::new(CasResponse { swapped }))
    }

    async fn read(&self, req: Request<ReadRequest>) -> Result<Response<ReadResponse>, Status> {
        let group = self.group(&req, req.get_ref().group)?;
        let value =
            group.read(&req.get_ref().key, self.node.config.request_timeout()).await.map_err(register_status)?;
        Ok(Response::new(ReadResponse { value }))
    }
}
