//! The JSON gateway: etcd 3.4's grpc-gateway on the client port.
//!
//! `POST /v3/<service>/<method>` with a JSON request body runs the same service
//! code as the gRPC call and answers in grpc-gateway's encoding (proto field
//! names, int64 as strings, bytes as base64, enums by name, defaults omitted);
//! the serde impls are generated from the `.proto` files (`build.rs`). Streaming
//! methods (`/v3/watch`, `/v3/lease/keepalive`, `/v3/election/observe`,
//! `/v3/maintenance/snapshot`) answer with one `{"result": …}` JSON object per
//! line. Errors are `{"error", "message", "code"}` with the gRPC code and the
//! HTTP status grpc-gateway derives from it. The auth token travels in the
//! `Authorization` header. Bodies are bounded by `--max-request-bytes`.

use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use futures::StreamExt;
use serde::de::DeserializeOwned;
use serde::Serialize;
use tonic::Status;

use super::auth::{AuthService, Credentials};
use super::cluster::{ClusterService, MaintenanceService};
use super::kv::KvService;
use super::lease::LeaseService;
use super::recipes::{ElectionService, LockService};
use super::watch::WatchService;
use crate::proto::etcdserverpb::auth_server::Auth;
use crate::proto::etcdserverpb::cluster_server::Cluster;
use crate::proto::etcdserverpb::kv_server::Kv;
use crate::proto::etcdserverpb::lease_server::Lease;
use crate::proto::etcdserverpb::maintenance_server::Maintenance;
use crate::proto::etcdserverpb::{LeaseKeepAliveRequest, WatchRequest};
use crate::proto::v3electionpb::election_server::Election;
use crate::proto::v3lockpb::lock_server::Lock;

/// The services the gateway calls, shared with the gRPC side.
pub struct Gateway {
    pub kv: KvService,
    pub watch: WatchService,
    pub lease: LeaseService,
    pub cluster: ClusterService,
    pub maintenance: MaintenanceService,
    pub auth: AuthService,
    pub lock: LockService,
    pub election: ElectionService,
}

/// grpc-gateway's HTTP status for a gRPC code.
fn http_status(code: tonic::Code) -> StatusCode {
    use tonic::Code::*;
    match code {
        Ok => StatusCode::OK,
        Cancelled => StatusCode::REQUEST_TIMEOUT,
        InvalidArgument | OutOfRange => StatusCode::BAD_REQUEST,
        DeadlineExceeded => StatusCode::GATEWAY_TIMEOUT,
        NotFound => StatusCode::NOT_FOUND,
        AlreadyExists | Aborted => StatusCode::CONFLICT,
        PermissionDenied => StatusCode::FORBIDDEN,
        Unauthenticated => StatusCode::UNAUTHORIZED,
        ResourceExhausted => StatusCode::TOO_MANY_REQUESTS,
        FailedPrecondition => StatusCode::PRECONDITION_FAILED,
        Unimplemented => StatusCode::NOT_IMPLEMENTED,
        Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        Unknown | Internal | DataLoss => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

fn error_body(s: &Status) -> serde_json::Value {
    serde_json::json!({"error": s.message(), "message": s.message(), "code": s.code() as i32})
}

/// A JSON response body with `status`.
fn json<T: Serialize>(status: StatusCode, body: &T) -> Response {
    match serde_json::to_vec(body) {
        Ok(bytes) => (status, [("content-type", "application/json")], bytes).into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    }
}

fn error(s: Status) -> Response {
    json(http_status(s.code()), &error_body(&s))
}

/// Decodes a JSON request (an empty body is the empty message) carrying the
/// caller's token as gRPC metadata.
fn decode<T: DeserializeOwned + Default>(headers: &HeaderMap, body: &[u8]) -> Result<tonic::Request<T>, Status> {
    let msg = if body.iter().all(u8::is_ascii_whitespace) {
        T::default()
    } else {
        serde_json::from_slice(body).map_err(|e| Status::invalid_argument(e.to_string()))?
    };
    Ok(with_token(headers, msg))
}

/// `msg` as a gRPC request carrying the HTTP `Authorization` header as metadata,
/// where the services read the caller's token from.
fn with_token<T>(headers: &HeaderMap, msg: T) -> tonic::Request<T> {
    let mut req = tonic::Request::new(msg);
    if let Some(Ok(v)) = headers.get("authorization").map(|v| v.to_str()) {
        if let Ok(v) = v.parse() {
            req.metadata_mut().insert("authorization", v);
        }
    }
    req
}

fn respond<T: Serialize>(r: Result<tonic::Response<T>, Status>) -> Response {
    match r {
        Ok(resp) => json(StatusCode::OK, &resp.into_inner()),
        Err(s) => error(s),
    }
}

/// A stream of results as newline-delimited `{"result": …}` (or `{"error": …}`) objects.
fn ndjson<T, S>(stream: S) -> Response
where
    T: Serialize,
    S: futures::Stream<Item = Result<T, Status>> + Send + 'static,
{
    let lines = stream.map(|item| {
        let value = match item {
            Ok(v) => serde_json::json!({ "result": v }),
            Err(s) => serde_json::json!({ "error": error_body(&s) }),
        };
        let mut line = serde_json::to_vec(&value).unwrap_or_default();
        line.push(b'\n');
        Ok::<_, std::convert::Infallible>(Bytes::from(line))
    });
    Response::builder()
        .header("content-type", "application/json")
        .body(Body::from_stream(lines))
        .unwrap_or_else(|e| error(Status::internal(e.to_string())))
}

/// Every JSON object in `body`, in order (streaming calls may send several).
fn objects<T: DeserializeOwned>(body: &[u8]) -> Result<Vec<T>, Status> {
    serde_json::Deserializer::from_slice(body)
        .into_iter::<T>()
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| Status::invalid_argument(e.to_string()))
}

macro_rules! unary {
    ($router:expr, $($path:literal => $svc:ident . $method:ident),+ $(,)?) => {
        $router$(.route(
            $path,
            post(|State(g): State<Arc<Gateway>>, headers: HeaderMap, body: Bytes| async move {
                match decode(&headers, &body) {
                    Ok(req) => respond(g.$svc.$method(req).await),
                    Err(s) => error(s),
                }
            }),
        ))+
    };
}

/// The `/v3/*` routes and `GET /version`; `max_body_bytes` bounds a request.
pub fn routes(gateway: Arc<Gateway>, max_body_bytes: usize) -> Router {
    let router = Router::new();
    let router = unary!(router,
        "/v3/kv/range" => kv.range,
        "/v3/kv/put" => kv.put,
        "/v3/kv/deleterange" => kv.delete_range,
        "/v3/kv/txn" => kv.txn,
        "/v3/kv/compaction" => kv.compact,
        "/v3/lease/grant" => lease.lease_grant,
        "/v3/lease/revoke" => lease.lease_revoke,
        "/v3/kv/lease/revoke" => lease.lease_revoke,
        "/v3/lease/timetolive" => lease.lease_time_to_live,
        "/v3/kv/lease/timetolive" => lease.lease_time_to_live,
        "/v3/lease/leases" => lease.lease_leases,
        "/v3/kv/lease/leases" => lease.lease_leases,
        "/v3/cluster/member/add" => cluster.member_add,
        "/v3/cluster/member/remove" => cluster.member_remove,
        "/v3/cluster/member/update" => cluster.member_update,
        "/v3/cluster/member/list" => cluster.member_list,
        "/v3/cluster/member/promote" => cluster.member_promote,
        "/v3/maintenance/alarm" => maintenance.alarm,
        "/v3/maintenance/status" => maintenance.status,
        "/v3/maintenance/defragment" => maintenance.defragment,
        "/v3/maintenance/hash" => maintenance.hash,
        "/v3/maintenance/hashkv" => maintenance.hash_kv,
        "/v3/maintenance/transfer-leadership" => maintenance.move_leader,
        "/v3/auth/enable" => auth.auth_enable,
        "/v3/auth/disable" => auth.auth_disable,
        "/v3/auth/authenticate" => auth.authenticate,
        "/v3/auth/user/add" => auth.user_add,
        "/v3/auth/user/get" => auth.user_get,
        "/v3/auth/user/list" => auth.user_list,
        "/v3/auth/user/delete" => auth.user_delete,
        "/v3/auth/user/changepw" => auth.user_change_password,
        "/v3/auth/user/grant" => auth.user_grant_role,
        "/v3/auth/user/revoke" => auth.user_revoke_role,
        "/v3/auth/role/add" => auth.role_add,
        "/v3/auth/role/get" => auth.role_get,
        "/v3/auth/role/list" => auth.role_list,
        "/v3/auth/role/delete" => auth.role_delete,
        "/v3/auth/role/grant" => auth.role_grant_permission,
        "/v3/auth/role/revoke" => auth.role_revoke_permission,
        "/v3/lock/lock" => lock.lock,
        "/v3/lock/unlock" => lock.unlock,
        "/v3/election/campaign" => election.campaign,
        "/v3/election/proclaim" => election.proclaim,
        "/v3/election/leader" => election.leader,
        "/v3/election/resign" => election.resign,
    );
    router
        .route("/v3/watch", post(watch))
        .route("/v3/lease/keepalive", post(keepalive))
        .route("/v3/election/observe", post(observe))
        .route("/v3/maintenance/snapshot", post(snapshot))
        .route("/version", get(version))
        .layer(DefaultBodyLimit::max(max_body_bytes))
        .with_state(gateway)
}

async fn version() -> Response {
    json(StatusCode::OK, &serde_json::json!({"etcdserver": super::ETCD_COMPAT_VERSION, "etcdcluster": "3.4.0"}))
}

/// The requests in the body open the watches; the stream stays open (the
/// request side never ends) until the client goes away.
async fn watch(State(g): State<Arc<Gateway>>, headers: HeaderMap, body: Bytes) -> Response {
    let requests: Vec<WatchRequest> = match objects(&body) {
        Ok(r) => r,
        Err(s) => return error(s),
    };
    let inbound = futures::stream::iter(requests.into_iter().map(Ok)).chain(futures::stream::pending());
    ndjson(g.watch.open(Credentials::of(&with_token(&headers, ())), Box::pin(inbound)))
}

async fn keepalive(State(g): State<Arc<Gateway>>, body: Bytes) -> Response {
    let requests: Vec<LeaseKeepAliveRequest> = match objects(&body) {
        Ok(r) => r,
        Err(s) => return error(s),
    };
    let g2 = g.clone();
    let results = futures::stream::iter(requests).then(move |r| {
        let g = g2.clone();
        async move { super::lease::keep_alive(&g.lease.node, &g.lease.lessor, r.id).await }
    });
    ndjson(results)
}

async fn observe(State(g): State<Arc<Gateway>>, headers: HeaderMap, body: Bytes) -> Response {
    match decode(&headers, &body) {
        Ok(req) => match g.election.observe(req).await {
            Ok(stream) => ndjson(stream.into_inner()),
            Err(s) => error(s),
        },
        Err(s) => error(s),
    }
}

async fn snapshot(State(g): State<Arc<Gateway>>, headers: HeaderMap, body: Bytes) -> Response {
    match decode(&headers, &body) {
        Ok(req) => match g.maintenance.snapshot(req).await {
            Ok(stream) => ndjson(stream.into_inner()),
            Err(s) => error(s),
        },
        Err(s) => error(s),
    }
}
