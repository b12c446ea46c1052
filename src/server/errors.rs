//! etcd's client-visible errors: gRPC code plus the exact message string
//! (clients match on these strings, so they must be byte-identical to etcd 3.4's
//! `etcdserver/api/v3rpc/rpctypes`).

use tonic::Status;

use crate::consensus::ConsensusError;
use crate::etcd_store::ApplyError;

pub fn empty_key() -> Status {
    Status::invalid_argument("etcdserver: key is not provided")
}
pub fn key_not_found() -> Status {
    Status::invalid_argument("etcdserver: key not found")
}
pub fn value_provided() -> Status {
    Status::invalid_argument("etcdserver: value is provided")
}
pub fn lease_provided() -> Status {
    Status::invalid_argument("etcdserver: lease is provided")
}
pub fn too_many_ops() -> Status {
    Status::invalid_argument("etcdserver: too many operations in txn request")
}
pub fn duplicate_key() -> Status {
    Status::invalid_argument("etcdserver: duplicate key given in txn request")
}
pub fn request_too_large() -> Status {
    Status::invalid_argument("etcdserver: request is too large")
}
pub fn compacted() -> Status {
    Status::out_of_range("etcdserver: mvcc: required revision has been compacted")
}
pub fn future_rev() -> Status {
    Status::out_of_range("etcdserver: mvcc: required revision is a future revision")
}
pub fn lease_not_found() -> Status {
    Status::not_found("etcdserver: requested lease not found")
}

pub fn no_space() -> Status {
    Status::resource_exhausted("etcdserver: mvcc: database space exceeded")
}
pub fn lease_exists() -> Status {
    Status::failed_precondition("etcdserver: lease already exists")
}
pub fn lease_ttl_too_large() -> Status {
    Status::out_of_range("etcdserver: too large lease TTL")
}

pub fn corrupt() -> Status {
    Status::data_loss("etcdserver: corrupt cluster")
}
pub fn member_exists() -> Status {
    Status::failed_precondition("etcdserver: member ID already exist")
}
pub fn peer_url_exists() -> Status {
    Status::failed_precondition("etcdserver: Peer URLs already exists")
}
pub fn member_not_found() -> Status {
    Status::not_found("etcdserver: member not found")
}
pub fn member_bad_urls() -> Status {
    Status::invalid_argument("etcdserver: given member URLs are invalid")
}
pub fn member_not_learner() -> Status {
    Status::failed_precondition("etcdserver: can only promote a learner member")
}
pub fn learner_not_ready() -> Status {
    Status::failed_precondition("etcdserver: can only promote a learner member which is in sync with leader")
}
pub fn not_leader() -> Status {
    Status::failed_precondition("etcdserver: not leader")
}
pub fn bad_leader_transferee() -> Status {
    Status::failed_precondition("etcdserver: bad leader transferee")
}
pub fn leader_transfer_timeout() -> Status {
    Status::unavailable("etcdserver: request timed out, leader transfer took too long")
}

pub fn from_apply(e: ApplyError) -> Status {
    match e {
        ApplyError::Compacted => compacted(),
        ApplyError::FutureRev => future_rev(),
        ApplyError::KeyNotFound => key_not_found(),
        ApplyError::LeaseNotFound => lease_not_found(),
        ApplyError::LeaseExists => lease_exists(),
        ApplyError::NoSpace => no_space(),
        ApplyError::MemberExists => member_exists(),
        ApplyError::PeerUrlExists => peer_url_exists(),
        ApplyError::MemberNotFound => member_not_found(),
        ApplyError::MemberNotLearner => member_not_learner(),
        ApplyError::Auth(e) => from_auth(e),
        ApplyError::Malformed(m) => Status::internal(format!("etcdserver: malformed command in log: {m}")),
        ApplyError::GroupExists => Status::already_exists("concord: raft group already exists"),
        ApplyError::GroupNotFound => Status::not_found("concord: raft group not found"),
        ApplyError::TooManyGroups => Status::resource_exhausted("concord: too many raft groups"),
        ApplyError::BadReplicas => {
            Status::invalid_argument("concord: replicas must be distinct registered members, at least one")
        }
    }
}

/// etcd's gRPC codes for auth errors (`rpctypes`).
pub fn from_auth(e: crate::etcd_store::auth::AuthError) -> Status {
    use crate::etcd_store::auth::AuthError as E;
    let code = match e {
        E::UserEmpty | E::RoleEmpty | E::AuthFailed | E::InvalidAuthMgmt | E::AuthOldRevision => {
            tonic::Code::InvalidArgument
        }
        E::PermissionDenied => tonic::Code::PermissionDenied,
        E::InvalidAuthToken => tonic::Code::Unauthenticated,
        E::RootUserNotExist
        | E::RootRoleNotExist
        | E::UserAlreadyExist
        | E::UserNotFound
        | E::RoleAlreadyExist
        | E::RoleNotFound
        | E::RoleNotGranted
        | E::PermissionNotGranted
        | E::AuthNotEnabled => tonic::Code::FailedPrecondition,
    };
    Status::new(code, e.to_string())
}

pub fn from_consensus(e: ConsensusError) -> Status {
    match e {
        ConsensusError::NoLeader => Status::unavailable("etcdserver: no leader"),
        ConsensusError::Timeout => Status::unavailable("etcdserver: request timed out"),
        ConsensusError::NotLeader => Status::unavailable("etcdserver: not leader"),
        ConsensusError::LeaderLost => {
            Status::unavailable("etcdserver: request timed out, possibly due to previous leader failure")
        }
        ConsensusError::Fatal(m) => Status::unavailable(format!("etcdserver: raft group stopped: {m}")),
    }
}

pub fn from_mvcc(e: crate::etcd_store::mvcc::MvccError) -> Status {
    use crate::etcd_store::mvcc::MvccError as E;
    match e {
        E::Compacted => compacted(),
        E::FutureRev => future_rev(),
        E::KeyNotFound => key_not_found(),
        E::LeaseNotFound => lease_not_found(),
        E::LeaseExists => lease_exists(),
        E::Retry => Status::unavailable(e.to_string()),
        E::Storage(s) => Status::internal(format!("etcdserver: storage: {s}")),
        E::Corrupt(s) => Status::data_loss(format!("etcdserver: corrupt state: {s}")),
    }
}
