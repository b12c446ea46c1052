//! The etcd `Auth` service, and who is calling: every other service asks
//! [`Node::caller`] for the caller's identity and checks its request with it.
//!
//! Identity (etcd 3.4's order): a `token` (or `authorization`) metadata value
//! from `Authenticate`; otherwise the Common Name of a verified client
//! certificate; otherwise nobody, which auth-enabled requests refuse with
//! "user name is empty". A token that is unknown or expired is refused with
//! "invalid auth token", which etcd clients answer by authenticating again.
//!
//! Checks run against the auth store as of the request; writes then carry that
//! store's revision ([`Caller::wrap`]) so apply refuses them if it changed.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tonic::{Request, Response, Status};

use super::{errors, Node};
use crate::etcd_store::auth::tokens::{JwtTokens, SimpleTokens};
use crate::etcd_store::auth::{Access, AuthError, AuthOp, AuthState};
use crate::etcd_store::Command;
use crate::proto::etcdserverpb::auth_server::Auth;
use crate::proto::etcdserverpb::*;

/// How many times a write is re-checked and re-proposed when the auth store
/// changed between its check and its apply.
const AUTH_RETRIES: usize = 3;

/// What a request presented to identify its caller.
#[derive(Debug, Clone, Default)]
pub struct Credentials {
    token: Option<String>,
    common_name: Option<String>,
}

impl Credentials {
    /// Reads the token metadata and the verified client certificate of `req`.
    pub fn of<T>(req: &Request<T>) -> Credentials {
        let md = req.metadata();
        let token = md
            .get("token")
            .or_else(|| md.get("authorization"))
            .and_then(|v| v.to_str().ok())
            .map(|t| t.trim_start_matches("Bearer ").to_string());
        let common_name =
            req.peer_certs().and_then(|certs| certs.first().and_then(|c| crate::server::tls::common_name(c)));
        Credentials { token, common_name }
    }
}

/// The auth side of a member: the token provider and a cache of the store.
pub struct AuthContext {
    jwt: Option<JwtTokens>,
    /// The store as last loaded, reused while its revision is unchanged. A std
    /// mutex: held only to clone or replace the `Arc`.
    cache: Mutex<Option<Arc<AuthState>>>,
    /// Makes simple tokens issued by this member unique.
    seq: AtomicU64,
}

impl AuthContext {
    pub fn new(jwt: Option<JwtTokens>) -> Self {
        AuthContext { jwt, cache: Mutex::default(), seq: AtomicU64::new(0) }
    }
}

/// A checked caller: the auth store it was checked against and its user
/// (`None` when auth is off or nobody was identified).
pub struct Caller {
    pub state: Arc<AuthState>,
    pub user: Option<String>,
}

impl Caller {
    pub fn check(&self, key: &[u8], range_end: &[u8], access: Access) -> Result<(), Status> {
        self.state.check_range(self.user.as_deref(), key, range_end, access).map_err(errors::from_auth)
    }

    pub fn check_admin(&self) -> Result<(), Status> {
        self.state.check_admin(self.user.as_deref()).map_err(errors::from_auth)
    }

    /// etcd's maintenance services report auth failures as `Unknown` with the
    /// raw auth error ("auth: permission denied"); clients print exactly that.
    pub fn check_admin_maintenance(&self) -> Result<(), Status> {
        self.state.check_admin(self.user.as_deref()).map_err(|e| {
            let msg = e.to_string();
            Status::unknown(format!("auth: {}", msg.trim_start_matches("etcdserver: ")))
        })
    }

    /// The command to propose: tagged with the auth revision it was checked at.
    /// Always tagged, also while auth looks disabled here: this member may not
    /// have applied an `AuthEnable` that already committed.
    pub fn wrap(&self, cmd: Command) -> Command {
        Command::Authed { auth_revision: self.state.revision, cmd: Box::new(cmd) }
    }
}

impl Node {
    /// Refuses `req` unless its caller may administer the cluster (root).
    pub fn require_admin<T>(&self, req: &Request<T>) -> Result<(), Status> {
        self.caller(&Credentials::of(req))?.check_admin()
    }

    /// As [`Node::require_admin`], with the maintenance services' error form.
    pub fn require_admin_maintenance<T>(&self, req: &Request<T>) -> Result<(), Status> {
        self.caller(&Credentials::of(req))?.check_admin_maintenance()
    }

    /// The auth store as of now (cached per auth revision; storage is read only
    /// when the applied auth revision differs from the cached one).
    pub fn auth_state(&self) -> Result<Arc<AuthState>, Status> {
        let published = self.group.auth_revision.load(std::sync::atomic::Ordering::Acquire);
        let mut cache = self.auth.cache.lock().expect("auth cache poisoned");
        if let Some(s) = cache.as_ref().filter(|s| s.revision == published) {
            return Ok(s.clone());
        }
        let txn = self.group.backend.begin_read().map_err(|e| Status::internal(e.to_string()))?;
        let meta = txn.open_table(crate::storage::META).map_err(|e| Status::internal(e.to_string()))?;
        let state = Arc::new(AuthState::load(&meta).map_err(|e| Status::internal(e.to_string()))?);
        *cache = Some(state.clone());
        Ok(state)
    }

    /// Identifies the caller presenting `creds`.
    pub fn caller(&self, creds: &Credentials) -> Result<Caller, Status> {
        let state = self.auth_state()?;
        if !state.enabled {
            return Ok(Caller { state, user: None });
        }
        let user = match &creds.token {
            Some(token) => {
                let user = match &self.auth.jwt {
                    Some(jwt) => jwt.verify(token),
                    None => self.group.tokens.check(token),
                };
                Some(user.ok_or_else(|| errors::from_auth(AuthError::InvalidAuthToken))?)
            }
            None => creds.common_name.clone(),
        };
        Ok(Caller { state, user })
    }

    /// Checks a write with `check` and proposes it as the caller; re-checks and
    /// re-proposes if the auth store changed in between (the write was refused
    /// at apply, so nothing happened), after catching up with the leader.
    pub async fn propose_as<Resp: prost::Message + Default>(
        &self,
        creds: &Credentials,
        check: impl Fn(&Caller) -> Result<(), Status>,
        cmd: Command,
    ) -> Result<Resp, Status> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            let caller = self.caller(creds)?;
            check(&caller)?;
            match self.propose(caller.wrap(cmd.clone())).await {
                Err(e) if attempt < AUTH_RETRIES && e.message() == AuthError::AuthOldRevision.to_string() => {
                    self.group.read_barrier(self.config.request_timeout()).await.map_err(errors::from_consensus)?;
                }
                other => return other,
            }
        }
    }
}

pub struct AuthService {
    pub node: Arc<Node>,
}

impl AuthService {
    /// An admin-only change of the auth store.
    async fn admin_change(&self, creds: &Credentials, op: AuthOp) -> Result<Option<ResponseHeader>, Status> {
        let _: AuthEnableResponse = self.node.propose_as(creds, Caller::check_admin, Command::Auth(op)).await?;
        let mut header = None;
        self.node.fill_header(&mut header);
        Ok(header)
    }

    /// A linearizable view of the auth store.
    async fn read(&self) -> Result<Arc<AuthState>, Status> {
        self.node.group.read_barrier(self.node.config.request_timeout()).await.map_err(errors::from_consensus)?;
        self.node.auth_state()
    }

    async fn hash(&self, password: String) -> Result<Vec<u8>, Status> {
        let cost = self.node.config.bcrypt_cost;
        tokio::task::spawn_blocking(move || crate::etcd_store::auth::hash_password(&password, cost))
            .await
            .map_err(|e| Status::internal(e.to_string()))?
            .map_err(|e| Status::internal(e.to_string()))
    }

    fn header(&self) -> Option<ResponseHeader> {
        let mut header = None;
        self.node.fill_header(&mut header);
        header
    }
}

#[tonic::async_trait]
impl Auth for AuthService {
    async fn auth_enable(&self, req: Request<AuthEnableRequest>) -> Result<Response<AuthEnableResponse>, Status> {
        let header = self.admin_change(&Credentials::of(&req), AuthOp::Enable).await?;
        Ok(Response::new(AuthEnableResponse { header }))
    }

    async fn auth_disable(&self, req: Request<AuthDisableRequest>) -> Result<Response<AuthDisableResponse>, Status> {
        let header = self.admin_change(&Credentials::of(&req), AuthOp::Disable).await?;
        Ok(Response::new(AuthDisableResponse { header }))
    }

    async fn authenticate(&self, req: Request<AuthenticateRequest>) -> Result<Response<AuthenticateResponse>, Status> {
        let req = req.into_inner();
        let state = self.read().await?;
        if !state.enabled {
            return Err(errors::from_auth(AuthError::AuthNotEnabled));
        }
        let user = state.users.get(&req.name).cloned().ok_or_else(|| errors::from_auth(AuthError::AuthFailed))?;
        if user.options.as_ref().is_some_and(|o| o.no_password) {
            // etcd reports this case with its raw auth error.
            return Err(Status::unknown("auth: authentication failed, password was given for no password user"));
        }
        let password = req.password;
        let ok = tokio::task::spawn_blocking(move || crate::etcd_store::auth::verify_password(&user, &password))
            .await
            .map_err(|e| Status::internal(e.to_string()))?;
        if !ok {
            return Err(errors::from_auth(AuthError::AuthFailed));
        }
        let token = match &self.node.auth.jwt {
            Some(jwt) => jwt.sign(&req.name, state.revision).map_err(Status::internal)?,
            None => {
                let token = SimpleTokens::generate(self.node.auth.seq.fetch_add(1, Ordering::Relaxed));
                let op = AuthOp::Authenticate { name: req.name.clone(), token: token.clone() };
                let _: AuthEnableResponse = self.node.propose(Command::Auth(op)).await?;
                // A follower's proposal returns once the leader applied it; the
                // client's next request comes here, so wait for the local apply.
                self.node
                    .group
                    .read_barrier(self.node.config.request_timeout())
                    .await
                    .map_err(errors::from_consensus)?;
                token
            }
        };
        Ok(Response::new(AuthenticateResponse { header: self.header(), token }))
    }

    async fn user_add(&self, req: Request<AuthUserAddRequest>) -> Result<Response<AuthUserAddResponse>, Status> {
        let creds = Credentials::of(&req);
        let req = req.into_inner();
        self.node.caller(&creds)?.check_admin()?;
        if req.name.is_empty() {
            return Err(errors::from_auth(AuthError::UserEmpty));
        }
        let no_password = req.options.is_some_and(|o| o.no_password);
        let password_hash = if no_password { Vec::new() } else { self.hash(req.password).await? };
        let header = self.admin_change(&creds, AuthOp::UserAdd { name: req.name, password_hash, no_password }).await?;
        Ok(Response::new(AuthUserAddResponse { header }))
    }

    async fn user_get(&self, req: Request<AuthUserGetRequest>) -> Result<Response<AuthUserGetResponse>, Status> {
        let creds = Credentials::of(&req);
        let name = req.into_inner().name;
        let state = self.read().await?;
        let caller = self.node.caller(&creds)?;
        if caller.user.as_deref() != Some(name.as_str()) {
            caller.check_admin()?;
        }
        let user = state.users.get(&name).ok_or_else(|| errors::from_auth(AuthError::UserNotFound))?;
        Ok(Response::new(AuthUserGetResponse { header: self.header(), roles: user.roles.clone() }))
    }

    async fn user_list(&self, req: Request<AuthUserListRequest>) -> Result<Response<AuthUserListResponse>, Status> {
        let creds = Credentials::of(&req);
        let state = self.read().await?;
        self.node.caller(&creds)?.check_admin()?;
        Ok(Response::new(AuthUserListResponse { header: self.header(), users: state.users.keys().cloned().collect() }))
    }

    async fn user_delete(
        &self,
        req: Request<AuthUserDeleteRequest>,
    ) -> Result<Response<AuthUserDeleteResponse>, Status> {
        let creds = Credentials::of(&req);
        let header = self.admin_change(&creds, AuthOp::UserDelete { name: req.into_inner().name }).await?;
        Ok(Response::new(AuthUserDeleteResponse { header }))
    }

    async fn user_change_password(
        &self,
        req: Request<AuthUserChangePasswordRequest>,
    ) -> Result<Response<AuthUserChangePasswordResponse>, Status> {
        let creds = Credentials::of(&req);
        let req = req.into_inner();
        self.node.caller(&creds)?.check_admin()?;
        let password_hash = self.hash(req.password).await?;
        let header = self.admin_change(&creds, AuthOp::UserChangePassword { name: req.name, password_hash }).await?;
        Ok(Response::new(AuthUserChangePasswordResponse { header }))
    }

    async fn user_grant_role(
        &self,
        req: Request<AuthUserGrantRoleRequest>,
    ) -> Result<Response<AuthUserGrantRoleResponse>, Status> {
        let creds = Credentials::of(&req);
        let r = req.into_inner();
        let header = self.admin_change(&creds, AuthOp::UserGrantRole { user: r.user, role: r.role }).await?;
        Ok(Response::new(AuthUserGrantRoleResponse { header }))
    }

    async fn user_revoke_role(
        &self,
        req: Request<AuthUserRevokeRoleRequest>,
    ) -> Result<Response<AuthUserRevokeRoleResponse>, Status> {
        let creds = Credentials::of(&req);
        let r = req.into_inner();
        let header = self.admin_change(&creds, AuthOp::UserRevokeRole { name: r.name, role: r.role }).await?;
        Ok(Response::new(AuthUserRevokeRoleResponse { header }))
    }

    async fn role_add(&self, req: Request<AuthRoleAddRequest>) -> Result<Response<AuthRoleAddResponse>, Status> {
        let creds = Credentials::of(&req);
        let header = self.admin_change(&creds, AuthOp::RoleAdd { name: req.into_inner().name }).await?;
        Ok(Response::new(AuthRoleAddResponse { header }))
    }

    async fn role_get(&self, req: Request<AuthRoleGetRequest>) -> Result<Response<AuthRoleGetResponse>, Status> {
        let creds = Credentials::of(&req);
        let role = req.into_inner().role;
        let state = self.read().await?;
        let caller = self.node.caller(&creds)?;
        let holds = caller.user.as_ref().and_then(|u| state.users.get(u)).is_some_and(|u| u.roles.contains(&role));
        if !holds {
            caller.check_admin()?;
        }
        let perm = state.role_perms(&role).map_err(errors::from_auth)?;
        Ok(Response::new(AuthRoleGetResponse { header: self.header(), perm }))
    }

    async fn role_list(&self, req: Request<AuthRoleListRequest>) -> Result<Response<AuthRoleListResponse>, Status> {
        let creds = Credentials::of(&req);
        let state = self.read().await?;
        self.node.caller(&creds)?.check_admin()?;
        Ok(Response::new(AuthRoleListResponse { header: self.header(), roles: state.roles.keys().cloned().collect() }))
    }

    async fn role_delete(
        &self,
        req: Request<AuthRoleDeleteRequest>,
    ) -> Result<Response<AuthRoleDeleteResponse>, Status> {
        let creds = Credentials::of(&req);
        let header = self.admin_change(&creds, AuthOp::RoleDelete { name: req.into_inner().role }).await?;
        Ok(Response::new(AuthRoleDeleteResponse { header }))
    }

    async fn role_grant_permission(
        &self,
        req: Request<AuthRoleGrantPermissionRequest>,
    ) -> Result<Response<AuthRoleGrantPermissionResponse>, Status> {
        let creds = Credentials::of(&req);
        let r = req.into_inner();
        let perm = r.perm.ok_or_else(|| Status::invalid_argument("etcdserver: permission is not given"))?;
        let op = AuthOp::RoleGrantPermission {
            name: r.name,
            perm_type: perm.perm_type,
            key: perm.key,
            range_end: perm.range_end,
        };
        let header = self.admin_change(&creds, op).await?;
        Ok(Response::new(AuthRoleGrantPermissionResponse { header }))
    }

    async fn role_revoke_permission(
        &self,
        req: Request<AuthRoleRevokePermissionRequest>,
    ) -> Result<Response<AuthRoleRevokePermissionResponse>, Status> {
        let creds = Credentials::of(&req);
        let r = req.into_inner();
        let op = AuthOp::RoleRevokePermission { name: r.role, key: r.key, range_end: r.range_end };
        let header = self.admin_change(&creds, op).await?;
        Ok(Response::new(AuthRoleRevokePermissionResponse { header }))
    }
}
