//! Snapshots in etcd 3.4's own format, both ways:
//! - concord → `etcdctl snapshot save` → `etcdctl snapshot status` (same answer as
//!   `concord snapshot status`) → `etcdctl snapshot restore` → a real etcd 3.4
//!   serves the same keys, revisions, history hash and lease;
//! - a real etcd 3.4 → `etcdctl snapshot save` → `concord snapshot restore` →
//!   concord serves the same keys, revisions, history hash, lease, users and roles;
//! - corrupt or truncated snapshot files are refused and nothing is written.
//!
//! Needs `etcd` and `etcdctl` 3.4; without `etcd` the tests say so and pass.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output};
use std::time::{Duration, Instant};

use concord_testkit::etcd_client::{Client, GetOptions, LeaseTimeToLiveOptions, PutOptions};
use concord_testkit::{free_port, single_member_command, ClusterOptions, ProcessCluster};

fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_concord"))
}

/// etcd 3.4 and etcdctl must be installed (`scripts/test` installs them): these
/// tests compare with the real thing, so a missing binary fails rather than skips.
fn require_etcd() {
    let ok = Command::new("etcd").arg("--version").output().is_ok_and(|o| o.status.success())
        && Command::new("etcdctl").arg("version").env("ETCDCTL_API", "3").output().is_ok_and(|o| o.status.success());
    assert!(ok, "etcd/etcdctl 3.4 must be installed (apt-get install etcd-server etcd-client)");
}

fn etcdctl(endpoint: &str, args: &[&str]) -> Output {
    Command::new("etcdctl")
        .args(["--endpoints", endpoint, "--command-timeout", "10s"])
        .args(args)
        .env("ETCDCTL_API", "3")
        .output()
        .expect("run etcdctl")
}

fn ok(out: Output, what: &str) -> String {
    assert!(out.status.success(), "{what}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A real etcd 3.4 member, killed when dropped.
struct Etcd {
    child: Child,
    endpoint: String,
}

impl Drop for Etcd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_etcd(name: &str, data_dir: &Path, client: u16, peer: u16) -> Etcd {
    let child = single_member_command(Path::new("etcd"), name, data_dir, client, peer).spawn().expect("start etcd");
    let etcd = Etcd { child, endpoint: format!("http://127.0.0.1:{client}") };
    let deadline = Instant::now() + Duration::from_secs(30);
    while !etcdctl(&etcd.endpoint, &["endpoint", "health"]).status.success() {
        assert!(Instant::now() < deadline, "etcd did not become healthy");
        std::thread::sleep(Duration::from_millis(100));
    }
    etcd
}

/// (key, value, create, mod, version, lease) of every key.
type Row = (Vec<u8>, Vec<u8>, i64, i64, i64, i64);

async fn all_keys(c: &mut Client) -> (i64, Vec<Row>) {
    let r = c.get(vec![0u8], Some(GetOptions::new().with_from_key())).await.unwrap();
    let rows = r
        .kvs()
        .iter()
        .map(|kv| {
            let (k, v) = (kv.key().to_vec(), kv.value().to_vec());
            (k, v, kv.create_revision(), kv.mod_revision(), kv.version(), kv.lease())
        })
        .collect();
    (r.header().unwrap().revision(), rows)
}

/// Writes the same data on either server: overwrites, a deletion, a large value,
/// a lease with a key, a user and a role with a permission, a compaction.
/// Returns the lease id.
async fn write_data(c: &mut Client, endpoint: &str) -> i64 {
    c.put("foo", "bar", None).await.unwrap();
    c.put("foo", "bar2", None).await.unwrap();
    c.put("gone", "1", None).await.unwrap();
    c.delete("gone", None).await.unwrap();
    c.put("big", vec![b'x'; 9000], None).await.unwrap();
    for i in 0..50 {
        c.put(format!("many/{i:03}"), format!("v{i}"), None).await.unwrap();
    }
    let lease = c.lease_grant(600, None).await.unwrap().id();
    c.put("leased", "v", Some(PutOptions::new().with_lease(lease))).await.unwrap();
    let rev = c.put("c", "3", None).await.unwrap().header().unwrap().revision();
    c.compact(rev - 2, None).await.unwrap();
    c.put("foo", "bar3", None).await.unwrap();
    for args in [
        &["role", "add", "r1"][..],
        &["role", "grant-permission", "r1", "readwrite", "foo"],
        &["role", "grant-permission", "r1", "read", "many/", "--prefix"],
        &["user", "add", "u1:pw"],
        &["user", "grant-role", "u1", "r1"],
    ] {
        ok(etcdctl(endpoint, args), &args.join(" "));
    }
    lease
}

async fn lease_keys(c: &mut Client, lease: i64) -> (i64, Vec<Vec<u8>>) {
    let r = c.lease_time_to_live(lease, Some(LeaseTimeToLiveOptions::new().with_keys())).await.unwrap();
    (r.granted_ttl(), r.keys().to_vec())
}

/// `etcdctl user get` / `role get` / lists, for comparing auth stores.
fn auth_listing(endpoint: &str) -> String {
    let mut out = String::new();
    for args in [&["user", "list"][..], &["role", "list"], &["user", "get", "u1"], &["role", "get", "r1"]] {
        out += &ok(etcdctl(endpoint, args), &args.join(" "));
    }
    out
}

fn save(endpoint: &str, file: &Path) {
    ok(etcdctl(endpoint, &["snapshot", "save", file.to_str().unwrap()]), "snapshot save");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concord_snapshot_restores_into_etcd() {
    require_etcd();
    let source = ProcessCluster::start(&bin(), 1, ClusterOptions::default());
    source.wait_leader(Duration::from_secs(30)).await;
    let endpoint = source.members[0].endpoint();
    let mut c = source.client(0).await;
    let lease = write_data(&mut c, &endpoint).await;
    let (rev, want) = all_keys(&mut c).await;
    let want_hash = c.hash_kv(rev).await.unwrap().hash();
    let want_auth = auth_listing(&endpoint);

    let file = source.dir().join("concord.snapshot");
    save(&endpoint, &file);
    let etcd_status = ok(etcdctl(&endpoint, &["snapshot", "status", file.to_str().unwrap(), "-w", "json"]), "status");
    let ours =
        ok(Command::new(bin()).args(["snapshot", "status"]).arg(&file).args(["-w", "json"]).output().unwrap(), "s");
    assert_eq!(ours.trim(), etcd_status.trim(), "concord and etcdctl agree on the status");
    assert!(etcd_status.contains(&format!("\"revision\":{rev},")), "{etcd_status}");

    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("etcd.data");
    let (client, peer) = (free_port(), free_port());
    let peer_url = format!("http://127.0.0.1:{peer}");
    let out = Command::new("etcdctl")
        .args(["snapshot", "restore", file.to_str().unwrap(), "--name", "e1", "--data-dir"])
        .arg(&data_dir)
        .args(["--initial-cluster", &format!("e1={peer_url}"), "--initial-advertise-peer-urls", &peer_url])
        .env("ETCDCTL_API", "3")
        .output()
        .unwrap();
    ok(out, "etcdctl snapshot restore");
    let etcd = start_etcd("e1", &data_dir, client, peer);
    let mut e = Client::connect([etcd.endpoint.as_str()], None).await.unwrap();
    let (got_rev, got) = all_keys(&mut e).await;
    assert_eq!(got_rev, rev, "etcd's revision after restore");
    assert_eq!(got, want, "keys, values, revisions, versions, leases");
    assert_eq!(e.hash_kv(rev).await.unwrap().hash(), want_hash, "HashKV");
    let (ttl, keys) = lease_keys(&mut e, lease).await;
    assert_eq!((ttl, keys), (600, vec![b"leased".to_vec()]));
    assert_eq!(auth_listing(&etcd.endpoint), want_auth);
    // Compacted history stays compacted; later history is readable.
    assert!(e.get("foo", Some(GetOptions::new().with_revision(2))).await.is_err());
    let old = e.get("foo", Some(GetOptions::new().with_revision(rev - 1))).await.unwrap();
    assert_eq!(old.kvs()[0].value(), b"bar2");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_snapshot_restores_into_concord() {
    require_etcd();
    let dir = tempfile::tempdir().unwrap();
    let etcd = start_etcd("src", &dir.path().join("etcd.data"), free_port(), free_port());
    let mut e = Client::connect([etcd.endpoint.as_str()], None).await.unwrap();
    let lease = write_data(&mut e, &etcd.endpoint).await;
    let (rev, want) = all_keys(&mut e).await;
    let want_hash = e.hash_kv(rev).await.unwrap().hash();
    let want_auth = auth_listing(&etcd.endpoint);
    let file = dir.path().join("etcd.snapshot");
    save(&etcd.endpoint, &file);
    let etcd_status = ok(etcdctl(&etcd.endpoint, &["snapshot", "status", file.to_str().unwrap()]), "status");
    drop(etcd);

    let ours = ok(Command::new(bin()).args(["snapshot", "status"]).arg(&file).output().unwrap(), "status");
    assert_eq!(ours, etcd_status, "concord reads etcd's snapshot as etcdctl does");

    let mut target = ProcessCluster::prepare(&bin(), 1, ClusterOptions::default());
    let out = Command::new(bin()).args(["snapshot", "restore"]).arg(&file).args(target.args(0)).output().unwrap();
    ok(out, "concord snapshot restore");
    target.restart(0);
    target.wait_leader(Duration::from_secs(30)).await;
    let mut c = target.client(0).await;
    let (got_rev, got) = all_keys(&mut c).await;
    assert_eq!(got_rev, rev, "concord's revision after restore");
    assert_eq!(got, want, "keys, values, revisions, versions, leases");
    assert_eq!(c.hash_kv(rev).await.unwrap().hash(), want_hash, "HashKV equals etcd's");
    assert_eq!(lease_keys(&mut c, lease).await, (600, vec![b"leased".to_vec()]));
    assert_eq!(auth_listing(&target.members[0].endpoint()), want_auth);
    assert!(c.get("foo", Some(GetOptions::new().with_revision(2))).await.is_err(), "compacted");
    // The restored store keeps going from etcd's revision.
    let r = c.put("after", "x", None).await.unwrap();
    assert_eq!(r.header().unwrap().revision(), rev + 1);
    // Revoking the imported lease deletes its key.
    c.lease_revoke(lease).await.unwrap();
    assert!(c.get("leased", None).await.unwrap().kvs().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn damaged_snapshots_of_either_format_are_refused() {
    let source = ProcessCluster::start(&bin(), 1, ClusterOptions::default());
    source.wait_leader(Duration::from_secs(30)).await;
    let mut c = source.client(0).await;
    for i in 0..20 {
        c.put(format!("k{i}"), vec![b'v'; 500], None).await.unwrap();
    }
    let file = source.dir().join("good.snapshot");
    // Through the client library, so that this test needs no etcdctl.
    let mut stream = c.snapshot().await.unwrap();
    let mut bytes = Vec::new();
    while let Some(msg) = stream.message().await.unwrap() {
        bytes.extend_from_slice(msg.blob());
    }
    std::fs::write(&file, bytes).unwrap();
    let good = std::fs::read(&file).unwrap();
    let fixture =
        std::fs::read(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/etcd-3.4.23.snapshot")).unwrap();
    let mut cases: Vec<(&str, Vec<u8>)> = Vec::new();
    for (what, data) in [("concord's", &good), ("etcd's", &fixture)] {
        let mut flipped = data.clone();
        flipped[data.len() / 2] ^= 0x20;
        cases.push((what, flipped));
        cases.push((what, data[..data.len() - 1].to_vec()));
        cases.push((what, data[..data.len() - 32].to_vec()));
        cases.push((what, data[..data.len() / 2].to_vec()));
    }
    let target = ProcessCluster::prepare(&bin(), 1, ClusterOptions::default());
    for (i, (what, data)) in cases.iter().enumerate() {
        let bad = source.dir().join(format!("bad{i}"));
        std::fs::write(&bad, data).unwrap();
        let o = Command::new(bin()).args(["snapshot", "restore"]).arg(&bad).args(target.args(0)).output().unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success(), "{what} case {i} restored");
        assert!(err.contains("refusing"), "{what} case {i}: {err}");
        assert!(!target.members[0].data_dir.exists(), "a refused restore writes nothing");
    }
    // The undamaged files restore.
    for data in [&good, &fixture] {
        let ok_file = source.dir().join("ok.snapshot");
        std::fs::write(&ok_file, data).unwrap();
        let o = Command::new(bin()).args(["snapshot", "restore"]).arg(&ok_file).args(target.args(0)).output().unwrap();
        ok(o, "restore of an undamaged file");
        std::fs::remove_dir_all(&target.members[0].data_dir).unwrap();
    }
}

/// bbolt itself (inside `etcdctl snapshot status`, which runs bbolt's consistency
/// check) reads what concord's writer makes of a large database: trees two branch
/// levels deep, overflow pages, inline and empty buckets; and computes the same
/// status as concord.
#[test]
fn etcdctl_reads_large_written_databases() {
    require_etcd();
    use concord::etcd_store::etcd_format::bbolt::{write, Bucket};
    let key_rows = (0..20_000u32)
        .map(|i| {
            let value = match i % 1000 {
                7 => vec![b'o'; 20_000],
                n => vec![b'v'; (n % 200) as usize],
            };
            (concord::etcd_store::etcd_format::rev_bytes(i64::from(i) + 2, 0, i % 3 == 0), value)
        })
        .collect();
    let db = write(&[
        Bucket { name: b"key".to_vec(), rows: key_rows },
        Bucket { name: b"meta".to_vec(), rows: vec![(b"consistent_index".to_vec(), 5u64.to_be_bytes().to_vec())] },
        Bucket { name: b"alarm".to_vec(), rows: vec![] },
        Bucket { name: b"big".to_vec(), rows: vec![(b"x".to_vec(), vec![1; 100_000])] },
    ]);
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("written.snapshot");
    std::fs::write(&file, concord::etcd_store::etcd_format::with_trailer(&db)).unwrap();
    let got = ok(
        Command::new("etcdctl")
            .args(["snapshot", "status", file.to_str().unwrap(), "-w", "json"])
            .env("ETCDCTL_API", "3")
            .output()
            .unwrap(),
        "etcdctl snapshot status",
    );
    let s = concord::etcd_store::etcd_format::status(&db).unwrap();
    let want = format!(
        "{{\"hash\":{},\"revision\":{},\"totalKey\":{},\"totalSize\":{}}}",
        s.hash, s.revision, s.total_keys, s.total_size
    );
    assert_eq!(got.trim(), want);
    assert_eq!((s.revision, s.total_keys), (20_001, 20_002));
}
