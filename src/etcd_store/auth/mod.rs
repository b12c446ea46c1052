//! Authentication and role-based access control: etcd 3.4's auth store.
//!
//! Contract:
//! - Users, roles and the enabled flag are replicated state: they change only by
//!   applying an [`AuthOp`] from the Raft log, in the same storage transaction as
//!   everything else that entry does, so every member agrees on them at every index.
//!   They live in META rows `auth/…`, so snapshots, `Hash` and defragmentation
//!   carry them without special cases.
//! - Every change bumps the auth revision. A write checked against revision `r`
//!   travels as [`crate::consensus::Command::Authed`] and is refused at apply if the
//!   auth revision moved on meanwhile (etcd's `ErrAuthOldRevision`): a permission
//!   revoked between check and apply can never be used.
//! - Passwords are stored only as bcrypt hashes (cost [`BCRYPT_COST`], etcd's
//!   choice), computed by the member that received the request before proposing:
//!   neither the log nor the state file ever holds a plaintext password.
//! - The user `root` with the role `root` may do everything; enabling auth requires
//!   it, and it cannot be deleted or lose that role while auth is on.
//! - Permissions follow etcd: READ / WRITE / READWRITE on a key, a range
//!   `[key, range_end)`, or everything from `key` (`range_end` = `"\0"`). A request
//!   range is allowed when the union of the user's granted intervals covers it.

pub mod perms;
pub mod tokens;

use std::collections::BTreeMap;
use std::io;

use prost::Message;
use redb::{ReadableTable, Table};
use serde::{Deserialize, Serialize};

use crate::proto::authpb::{permission, Permission, Role, User, UserAddOptions};
pub use perms::Access;
pub use tokens::SimpleTokens;

/// The user and role that may do everything.
pub const ROOT: &str = "root";

/// bcrypt work factor: etcd's (Go's `bcrypt.DefaultCost`), about 50 ms per hash.
pub const BCRYPT_COST: u32 = 10;

/// META row present (value `[1]`) while auth is enabled.
pub const META_ENABLED: &str = "auth/enabled";
/// META row: the auth revision (big-endian u64).
pub const META_REVISION: &str = "auth/revision";
/// META rows: `auth/user/NAME` -> `authpb.User`.
pub const USER_PREFIX: &str = "auth/user/";
/// META rows: `auth/role/NAME` -> `authpb.Role`.
pub const ROLE_PREFIX: &str = "auth/role/";

/// A replicated change to the auth store. Passwords arrive already hashed.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum AuthOp {
    Enable,
    Disable,
    UserAdd {
        name: String,
        password_hash: Vec<u8>,
        no_password: bool,
    },
    UserDelete {
        name: String,
    },
    UserChangePassword {
        name: String,
        password_hash: Vec<u8>,
    },
    UserGrantRole {
        user: String,
        role: String,
    },
    UserRevokeRole {
        name: String,
        role: String,
    },
    RoleAdd {
        name: String,
    },
    RoleDelete {
        name: String,
    },
    RoleGrantPermission {
        name: String,
        perm_type: i32,
        key: Vec<u8>,
        range_end: Vec<u8>,
    },
    RoleRevokePermission {
        name: String,
        key: Vec<u8>,
        range_end: Vec<u8>,
    },
    /// Registers a simple token for a user whose password the proposer verified.
    Authenticate {
        name: String,
        token: String,
    },
}

impl AuthOp {
    /// The operation's name, for logs (never its secrets).
    pub fn name(&self) -> &'static str {
        match self {
            AuthOp::Enable => "enable",
            AuthOp::Disable => "disable",
            AuthOp::UserAdd { .. } => "user_add",
            AuthOp::UserDelete { .. } => "user_delete",
            AuthOp::UserChangePassword { .. } => "user_change_password",
            AuthOp::UserGrantRole { .. } => "user_grant_role",
            AuthOp::UserRevokeRole { .. } => "user_revoke_role",
            AuthOp::RoleAdd { .. } => "role_add",
            AuthOp::RoleDelete { .. } => "role_delete",
            AuthOp::RoleGrantPermission { .. } => "role_grant_permission",
            AuthOp::RoleRevokePermission { .. } => "role_revoke_permission",
            AuthOp::Authenticate { .. } => "authenticate",
        }
    }
}

/// etcd's auth errors; the messages are the strings etcd clients match on.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("etcdserver: root user does not exist")]
    RootUserNotExist,
    #[error("etcdserver: root user does not have root role")]
    RootRoleNotExist,
    #[error("etcdserver: user name already exists")]
    UserAlreadyExist,
    #[error("etcdserver: user name is empty")]
    UserEmpty,
    #[error("etcdserver: user name not found")]
    UserNotFound,
    #[error("etcdserver: role name already exists")]
    RoleAlreadyExist,
    #[error("etcdserver: role name not found")]
    RoleNotFound,
    #[error("etcdserver: role name is empty")]
    RoleEmpty,
    #[error("etcdserver: authentication failed, invalid user ID or password")]
    AuthFailed,
    #[error("etcdserver: permission denied")]
    PermissionDenied,
    #[error("etcdserver: role is not granted to the user")]
    RoleNotGranted,
    #[error("etcdserver: permission is not granted to the role")]
    PermissionNotGranted,
    #[error("etcdserver: authentication is not enabled")]
    AuthNotEnabled,
    #[error("etcdserver: invalid auth token")]
    InvalidAuthToken,
    #[error("etcdserver: invalid auth management")]
    InvalidAuthMgmt,
    #[error("etcdserver: revision of auth store is old")]
    AuthOldRevision,
}

fn io_err(e: impl std::fmt::Display) -> io::Error {
    io::Error::other(e.to_string())
}

fn corrupt(what: &str, e: impl std::fmt::Display) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, format!("auth record {what} is corrupt: {e}"))
}

/// The whole auth store as of one transaction. Small (users and roles are
/// administered by hand), so it is loaded whole and cached per revision.
#[derive(Debug, Clone, Default)]
pub struct AuthState {
    pub enabled: bool,
    pub revision: u64,
    pub users: BTreeMap<String, User>,
    pub roles: BTreeMap<String, Role>,
}

/// The auth revision recorded in `meta` (0 for a store never changed).
pub fn revision_in<T: ReadableTable<&'static str, &'static [u8]>>(meta: &T) -> io::Result<u64> {
    match meta.get(META_REVISION).map_err(io_err)? {
        None => Ok(0),
        Some(v) => {
            let b: [u8; 8] = v.value().try_into().map_err(|e| corrupt(META_REVISION, e))?;
            Ok(u64::from_be_bytes(b))
        }
    }
}

impl AuthState {
    /// Reads the auth store from any view of META.
    pub fn load<T: ReadableTable<&'static str, &'static [u8]>>(meta: &T) -> io::Result<Self> {
        let mut state = AuthState {
            enabled: meta.get(META_ENABLED).map_err(io_err)?.is_some_and(|v| v.value() == [1]),
            revision: revision_in(meta)?,
            ..Default::default()
        };
        for row in meta.range(USER_PREFIX..).map_err(io_err)? {
            let (k, v) = row.map_err(io_err)?;
            let Some(name) = k.value().strip_prefix(USER_PREFIX) else { break };
            let user = User::decode(v.value()).map_err(|e| corrupt(k.value(), e))?;
            state.users.insert(name.to_string(), user);
        }
        for row in meta.range(ROLE_PREFIX..).map_err(io_err)? {
            let (k, v) = row.map_err(io_err)?;
            let Some(name) = k.value().strip_prefix(ROLE_PREFIX) else { break };
            let role = Role::decode(v.value()).map_err(|e| corrupt(k.value(), e))?;
            state.roles.insert(name.to_string(), role);
        }
        Ok(state)
    }

    /// Whether `user` exists and holds the root role.
    pub fn is_root(&self, user: &str) -> bool {
        self.users.get(user).is_some_and(|u| u.roles.iter().any(|r| r == ROOT))
    }

    /// etcd's `IsAdminPermitted`: nothing is checked while auth is off.
    pub fn check_admin(&self, user: Option<&str>) -> Result<(), AuthError> {
        if !self.enabled {
            return Ok(());
        }
        let user = user.ok_or(AuthError::UserEmpty)?;
        if self.is_root(user) {
            Ok(())
        } else {
            Err(AuthError::PermissionDenied)
        }
    }

    /// etcd's `isOpPermitted` for `[key, range_end)` (see [`perms`] for the forms).
    pub fn check_range(
        &self,
        user: Option<&str>,
        key: &[u8],
        range_end: &[u8],
        access: Access,
    ) -> Result<(), AuthError> {
        if !self.enabled {
            return Ok(());
        }
        let user = user.ok_or(AuthError::UserEmpty)?;
        let Some(u) = self.users.get(user) else { return Err(AuthError::PermissionDenied) };
        if u.roles.iter().any(|r| r == ROOT) {
            return Ok(());
        }
        let granted = u.roles.iter().filter_map(|r| self.roles.get(r)).flat_map(|r| &r.key_permission);
        if perms::covers(granted, key, range_end, access) {
            Ok(())
        } else {
            Err(AuthError::PermissionDenied)
        }
    }

    /// The permissions of `role`, as `RoleGet` reports them.
    pub fn role_perms(&self, role: &str) -> Result<Vec<Permission>, AuthError> {
        self.roles.get(role).map(|r| r.key_permission.clone()).ok_or(AuthError::RoleNotFound)
    }
}

fn put_row<M: Message>(meta: &mut Table<&'static str, &'static [u8]>, key: &str, value: &M) -> io::Result<()> {
    meta.insert(key, value.encode_to_vec().as_slice()).map_err(io_err)?;
    Ok(())
}

/// Applies one auth change inside the apply transaction. `tokens` is `None` when
/// entries are only replayed into a copy of the state (defragmentation).
/// Request-level failures are `Ok(Err(..))`; storage failures are `Err`.
pub fn apply(
    meta: &mut Table<&'static str, &'static [u8]>,
    op: &AuthOp,
    tokens: Option<&SimpleTokens>,
) -> io::Result<Result<(), AuthError>> {
    let state = AuthState::load(meta)?;
    let outcome = change(meta, &state, op, tokens)?;
    let changes_store = !matches!(op, AuthOp::Authenticate { .. });
    if outcome.is_ok() && changes_store {
        meta.insert(META_REVISION, (state.revision + 1).to_be_bytes().as_slice()).map_err(io_err)?;
    }
    Ok(outcome)
}

fn change(
    meta: &mut Table<&'static str, &'static [u8]>,
    state: &AuthState,
    op: &AuthOp,
    tokens: Option<&SimpleTokens>,
) -> io::Result<Result<(), AuthError>> {
    let user_key = |name: &str| format!("{USER_PREFIX}{name}");
    let role_key = |name: &str| format!("{ROLE_PREFIX}{name}");
    let user = |name: &str| state.users.get(name).cloned().ok_or(AuthError::UserNotFound);
    let role = |name: &str| state.roles.get(name).cloned().ok_or(AuthError::RoleNotFound);
    macro_rules! attempt {
        ($e:expr) => {
            match $e {
                Ok(v) => v,
                Err(e) => return Ok(Err(e)),
            }
        };
    }
    match op {
        AuthOp::Enable => {
            if !state.enabled {
                attempt!(state.users.get(ROOT).ok_or(AuthError::RootUserNotExist));
                if !state.is_root(ROOT) {
                    return Ok(Err(AuthError::RootRoleNotExist));
                }
                meta.insert(META_ENABLED, [1u8].as_slice()).map_err(io_err)?;
            }
        }
        AuthOp::Disable => {
            if state.enabled {
                meta.remove(META_ENABLED).map_err(io_err)?;
                if let Some(t) = tokens {
                    t.clear();
                }
            }
        }
        AuthOp::UserAdd { name, password_hash, no_password } => {
            if name.is_empty() {
                return Ok(Err(AuthError::UserEmpty));
            }
            if state.users.contains_key(name) {
                return Ok(Err(AuthError::UserAlreadyExist));
            }
            let u = User {
                name: name.clone().into_bytes(),
                password: password_hash.clone(),
                roles: Vec::new(),
                options: Some(UserAddOptions { no_password: *no_password }),
            };
            put_row(meta, &user_key(name), &u)?;
        }
        AuthOp::UserDelete { name } => {
            if state.enabled && name == ROOT {
                return Ok(Err(AuthError::InvalidAuthMgmt));
            }
            attempt!(user(name));
            meta.remove(user_key(name).as_str()).map_err(io_err)?;
            if let Some(t) = tokens {
                t.invalidate_user(name);
            }
        }
        AuthOp::UserChangePassword { name, password_hash } => {
            let mut u = attempt!(user(name));
            u.password = password_hash.clone();
            put_row(meta, &user_key(name), &u)?;
            if let Some(t) = tokens {
                t.invalidate_user(name);
            }
        }
        AuthOp::UserGrantRole { user: name, role: r } => {
            let mut u = attempt!(user(name));
            if r != ROOT {
                attempt!(role(r));
            }
            if let Err(at) = u.roles.binary_search(r) {
                u.roles.insert(at, r.clone());
                put_row(meta, &user_key(name), &u)?;
            }
        }
        AuthOp::UserRevokeRole { name, role: r } => {
            if state.enabled && name == ROOT && r == ROOT {
                return Ok(Err(AuthError::InvalidAuthMgmt));
            }
            let mut u = attempt!(user(name));
            let Some(at) = u.roles.iter().position(|x| x == r) else { return Ok(Err(AuthError::RoleNotGranted)) };
            u.roles.remove(at);
            put_row(meta, &user_key(name), &u)?;
        }
        AuthOp::RoleAdd { name } => {
            if name.is_empty() {
                return Ok(Err(AuthError::RoleEmpty));
            }
            if state.roles.contains_key(name) {
                return Ok(Err(AuthError::RoleAlreadyExist));
            }
            put_row(meta, &role_key(name), &Role { name: name.clone().into_bytes(), key_permission: Vec::new() })?;
        }
        AuthOp::RoleDelete { name } => {
            if state.enabled && name == ROOT {
                return Ok(Err(AuthError::InvalidAuthMgmt));
            }
            attempt!(role(name));
            meta.remove(role_key(name).as_str()).map_err(io_err)?;
            for (uname, u) in &state.users {
                if u.roles.iter().any(|x| x == name) {
                    let mut u = u.clone();
                    u.roles.retain(|x| x != name);
                    put_row(meta, &user_key(uname), &u)?;
                }
            }
        }
        AuthOp::RoleGrantPermission { name, perm_type, key, range_end } => {
            let mut r = attempt!(role(name));
            let perm_type = permission::Type::try_from(*perm_type).unwrap_or(permission::Type::Read) as i32;
            match r.key_permission.iter_mut().find(|p| &p.key == key && &p.range_end == range_end) {
                Some(p) => p.perm_type = perm_type,
                None => {
                    r.key_permission.push(Permission { perm_type, key: key.clone(), range_end: range_end.clone() });
                    r.key_permission.sort_by(|a, b| a.key.cmp(&b.key));
                }
            }
            put_row(meta, &role_key(name), &r)?;
        }
        AuthOp::RoleRevokePermission { name, key, range_end } => {
            let mut r = attempt!(role(name));
            let before = r.key_permission.len();
            r.key_permission.retain(|p| !(&p.key == key && &p.range_end == range_end));
            if r.key_permission.len() == before {
                return Ok(Err(AuthError::PermissionNotGranted));
            }
            put_row(meta, &role_key(name), &r)?;
        }
        AuthOp::Authenticate { name, token } => {
            attempt!(state.users.get(name).ok_or(AuthError::AuthFailed));
            if let Some(t) = tokens {
                t.assign(token, name);
            }
        }
    }
    Ok(Ok(()))
}

/// Hashes a password for storage (bcrypt with work factor `cost`). CPU-heavy:
/// call it from a blocking thread.
pub fn hash_password(password: &str, cost: u32) -> io::Result<Vec<u8>> {
    bcrypt::hash(password, cost).map(String::into_bytes).map_err(io_err)
}

/// Whether `password` matches the user's stored hash; a user added with
/// `--no-password` never authenticates by password. CPU-heavy, like hashing.
pub fn verify_password(user: &User, password: &str) -> bool {
    if user.options.as_ref().is_some_and(|o| o.no_password) || user.password.is_empty() {
        return false;
    }
    std::str::from_utf8(&user.password).ok().is_some_and(|h| bcrypt::verify(password, h).unwrap_or(false))
}
