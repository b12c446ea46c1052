//! Authentication and RBAC through the `etcd-client` crate.
//!
//! - The RBAC matrix (users × roles × operations × key ranges) runs against a
//!   real etcd 3.4 and against a 3-member concord cluster; every outcome (allowed,
//!   or the exact gRPC code and message) must be the same. On concord, each user
//!   talks to a different member than the one that set up the roles, so simple
//!   tokens and the auth store are exercised across members.
//! - JWT tokens (`--auth-token jwt,...`) with a key pair generated in the test.

use std::path::Path;
use std::process::Child;
use std::time::{Duration, Instant};

use concord_testkit::{free_port, single_member_command, ClusterOptions, ProcessCluster};
use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, DeleteOptions, GetOptions, LockOptions, Permission, PutOptions, Txn,
    TxnOp, WatchOptions,
};

fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_concord"))
}

struct Etcd(Child);

impl Drop for Etcd {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start_etcd(dir: &Path) -> (Etcd, String) {
    let (client, peer) = (free_port(), free_port());
    let child = single_member_command(Path::new("etcd"), "m", dir, client, peer)
        .spawn()
        .expect("etcd 3.4 must be installed (apt-get install etcd-server)");
    (Etcd(child), format!("http://127.0.0.1:{client}"))
}

async fn connect(endpoint: &str, user: Option<(&str, &str)>) -> Result<Client, etcd_client::Error> {
    let mut opts =
        ConnectOptions::new().with_connect_timeout(Duration::from_secs(2)).with_timeout(Duration::from_secs(10));
    if let Some((u, p)) = user {
        opts = opts.with_user(u, p);
    }
    Client::connect([endpoint], Some(opts)).await
}

async fn wait_ready(endpoint: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(mut c) = connect(endpoint, None).await {
            if c.get("probe", None).await.is_ok() {
                return;
            }
        }
        assert!(Instant::now() < deadline, "{endpoint} did not become ready");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn outcome<T>(r: Result<T, etcd_client::Error>) -> String {
    match r {
        Ok(_) => "ok".into(),
        Err(etcd_client::Error::GRpcStatus(s)) => format!("{:?}: {}", s.code(), s.message()),
        Err(e) => format!("error: {e}"),
    }
}

/// Roles, users and a leased key, then auth on. Returns the lease id.
async fn setup(admin: &str) -> i64 {
    let mut c = connect(admin, None).await.expect("connect");
    let mut a = c.auth_client();
    for role in ["rk", "rr", "rw", "rf", "rl"] {
        a.role_add(role).await.unwrap();
    }
    a.role_grant_permission("rk", Permission::read_write("a")).await.unwrap();
    a.role_grant_permission("rr", Permission::read("p/").with_prefix()).await.unwrap();
    a.role_grant_permission("rw", Permission::write("k1").with_range_end("k5")).await.unwrap();
    a.role_grant_permission("rf", Permission::read("z").with_from_key()).await.unwrap();
    a.role_grant_permission("rl", Permission::read_write("lk/").with_prefix()).await.unwrap();
    let users: [(&str, &[&str]); 7] = [
        ("root", &["root"]),
        ("ukey", &["rk"]),
        ("uread", &["rr"]),
        ("uwrite", &["rw"]),
        ("ufrom", &["rf"]),
        ("umulti", &["rr", "rw", "rl"]),
        ("unone", &[]),
    ];
    for (u, roles) in users {
        a.user_add(u, format!("{u}-pw"), None).await.unwrap();
        for r in roles {
            a.user_grant_role(u, *r).await.unwrap();
        }
    }
    let lease = c.lease_grant(600, None).await.unwrap().id();
    c.put("k2", "leased", Some(PutOptions::new().with_lease(lease))).await.unwrap();
    c.put("a", "1", None).await.unwrap();
    c.auth_client().auth_enable().await.unwrap();
    lease
}

async fn matrix(admin: &str, users_endpoint: &str) -> Vec<String> {
    let lease = setup(admin).await;
    let mut out = Vec::new();
    let mut anon = connect(users_endpoint, None).await.unwrap();
    out.push(format!("anonymous get: {}", outcome(anon.get("a", None).await)));
    out.push(format!("anonymous put: {}", outcome(anon.put("a", "x", None).await)));
    out.push(format!("wrong password: {}", outcome(connect(users_endpoint, Some(("ukey", "bad"))).await)));
    out.push(format!("unknown user: {}", outcome(connect(users_endpoint, Some(("nobody", "x"))).await)));
    for user in ["root", "ukey", "uread", "uwrite", "ufrom", "umulti", "unone"] {
        let pw = format!("{user}-pw");
        let mut c = connect(users_endpoint, Some((user, &pw))).await.expect("authenticate");
        let mut row = |op: &str, r: String| out.push(format!("{user} {op}: {r}"));
        row("get a", outcome(c.get("a", None).await));
        row("put a", outcome(c.put("a", "2", None).await));
        row("put a prev_kv", outcome(c.put("a", "3", Some(PutOptions::new().with_prev_key())).await));
        row("get p/x", outcome(c.get("p/x", None).await));
        row("get prefix p/", outcome(c.get("p/", Some(GetOptions::new().with_prefix())).await));
        row("get prefix p", outcome(c.get("p", Some(GetOptions::new().with_prefix())).await));
        row("put p/x", outcome(c.put("p/x", "1", None).await));
        row("get k3", outcome(c.get("k3", None).await));
        row("put k3", outcome(c.put("k3", "1", None).await));
        row("del [k1,k5)", outcome(c.delete("k1", Some(DeleteOptions::new().with_range("k5"))).await));
        row("del [k1,k6)", outcome(c.delete("k1", Some(DeleteOptions::new().with_range("k6"))).await));
        row("get z from-key", outcome(c.get("z", Some(GetOptions::new().with_from_key())).await));
        row("get y from-key", outcome(c.get("y", Some(GetOptions::new().with_from_key())).await));
        row("get all", outcome(c.get("", Some(GetOptions::new().with_all_keys())).await));
        let txn = Txn::new()
            .when([Compare::value("k3", CompareOp::Equal, "1")])
            .and_then([TxnOp::put("k4", "t", None)])
            .or_else([TxnOp::get("p/x", None)]);
        row("txn cmp k3, put k4 | get p/x", outcome(c.txn(txn).await));
        let txn = Txn::new().and_then([TxnOp::put("k4", "t", None)]).or_else([TxnOp::put("a", "t", None)]);
        row("txn put k4 | put a", outcome(c.txn(txn).await));
        let txn = Txn::new().and_then([TxnOp::get("p/x", None), TxnOp::get("z1", None)]);
        row("txn read-only p/x z1", outcome(c.txn(txn).await));
        let watch = async {
            let (_w, mut s) = c.watch("p/", Some(WatchOptions::new().with_prefix())).await?;
            // An allowed watch stays open without events; a refused one is canceled.
            match tokio::time::timeout(Duration::from_secs(1), s.message()).await {
                Err(_) => Ok::<_, etcd_client::Error>("open".to_string()),
                Ok(m) => Ok(format!("{:?}", m?.map(|m| (m.created(), m.canceled(), m.cancel_reason().to_string())))),
            }
        };
        row("watch p/ prefix", watch.await.unwrap_or_else(|e| outcome::<()>(Err(e))));
        let lock = tokio::time::timeout(Duration::from_secs(5), c.lock("lk", Some(LockOptions::new()))).await;
        row("lock lk", lock.map(outcome).unwrap_or_else(|_| "timeout".into()));
        row("member list", outcome(c.member_list().await));
        row("user list", outcome(c.auth_client().user_list().await));
        row("user get self", outcome(c.auth_client().user_get(user).await));
        row("role get rr", outcome(c.auth_client().role_get("rr").await));
        row("defragment", outcome(c.maintenance_client().defragment().await));
        row("hash kv", outcome(c.maintenance_client().hash_kv(0).await));
    }
    // Revoking a lease deletes its keys: only a user who may write them may revoke.
    for user in ["uread", "uwrite"] {
        let pw = format!("{user}-pw");
        let mut c = connect(users_endpoint, Some((user, &pw))).await.unwrap();
        out.push(format!("{user} lease revoke (k2 attached): {}", outcome(c.lease_revoke(lease).await)));
    }
    // Changes take effect at once on every member: revoke a role, change a password.
    let root = connect(admin, Some(("root", "root-pw"))).await.unwrap();
    root.auth_client().user_revoke_role("ukey", "rk").await.unwrap();
    let mut c = connect(users_endpoint, Some(("ukey", "ukey-pw"))).await.unwrap();
    out.push(format!("ukey after revoke, get a: {}", outcome(c.get("a", None).await)));
    root.auth_client().user_change_password("uread", "new-pw").await.unwrap();
    out.push(format!("uread old password: {}", outcome(connect(users_endpoint, Some(("uread", "uread-pw"))).await)));
    out.push(format!("uread new password: {}", outcome(connect(users_endpoint, Some(("uread", "new-pw"))).await)));
    out
}

#[tokio::test(flavor = "multi_thread")]
async fn rbac_matrix_matches_etcd_3_4() {
    let dir = tempfile::tempdir().unwrap();
    let (etcd, endpoint) = start_etcd(dir.path());
    wait_ready(&endpoint).await;
    let want = matrix(&endpoint, &endpoint).await;
    drop(etcd);

    let cluster = ProcessCluster::start(bin(), 3, ClusterOptions::default());
    cluster.wait_leader(Duration::from_secs(20)).await;
    let eps = cluster.endpoints();
    wait_ready(&eps[1]).await;
    let got = matrix(&eps[0], &eps[1]).await;

    let mut report = String::new();
    for (w, g) in want.iter().zip(&got) {
        if w != g {
            report.push_str(&format!("  etcd:    {w}\n  concord: {g}\n"));
        }
    }
    assert_eq!(want.len(), got.len());
    if !report.is_empty() {
        cluster.dump_logs();
        panic!("RBAC outcomes differ from etcd 3.4:\n{report}");
    }
    let denied = got.iter().filter(|l| l.contains("PermissionDenied")).count();
    println!("RBAC matrix: {} outcomes identical to etcd 3.4 ({denied} denials)", got.len());
}

#[tokio::test(flavor = "multi_thread")]
async fn jwt_tokens_work_on_every_member() {
    let keys = tempfile::tempdir().unwrap();
    let pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let (private, public) = (keys.path().join("jwt.key"), keys.path().join("jwt.pub"));
    std::fs::write(&private, pair.serialize_pem()).unwrap();
    std::fs::write(&public, pair.public_key_pem()).unwrap();
    let token = format!("jwt,pub-key={},priv-key={},sign-method=ES256,ttl=1m", public.display(), private.display());
    let options = ClusterOptions { extra_args: vec!["--auth-token".into(), token], ..Default::default() };
    let cluster = ProcessCluster::start(bin(), 3, options);
    cluster.wait_leader(Duration::from_secs(20)).await;
    let eps = cluster.endpoints();
    wait_ready(&eps[0]).await;
    let c = connect(&eps[0], None).await.unwrap();
    c.auth_client().user_add("root", "pw", None).await.unwrap();
    c.auth_client().user_grant_role("root", "root").await.unwrap();
    c.auth_client().auth_enable().await.unwrap();
    let mut root = connect(&eps[0], Some(("root", "pw"))).await.unwrap();
    let token = root.auth_client().authenticate("root".into(), "pw".into()).await.unwrap().token().to_string();
    assert_eq!(token.split('.').count(), 3, "a JWT has three parts: {token}");
    root.put("j", "1", None).await.unwrap();
    // Another member verifies the signed token without any shared session state.
    for ep in &eps[1..] {
        let mut other = connect(ep, Some(("root", "pw"))).await.unwrap();
        assert_eq!(other.get("j", None).await.unwrap().kvs()[0].value(), b"1");
    }
    let mut anon = connect(&eps[2], None).await.unwrap();
    assert_eq!(outcome(anon.get("j", None).await), "InvalidArgument: etcdserver: user name is empty");
}
