//! Snapshot save (etcdctl, via Maintenance.Snapshot) → `concord snapshot status` →
//! `concord snapshot restore` into a new 3-member cluster with identical data.

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use concord_testkit::etcd_client::GetOptions;
use concord_testkit::{ClusterOptions, ProcessCluster};

fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_concord"))
}

/// (key, value, mod revision) of every `snap/` key.
async fn snap_keys(c: &mut concord_testkit::etcd_client::Client) -> Vec<(Vec<u8>, Vec<u8>, i64)> {
    let resp = c.get("snap/", Some(GetOptions::new().with_prefix())).await.unwrap();
    resp.kvs().iter().map(|kv| (kv.key().to_vec(), kv.value().to_vec(), kv.mod_revision())).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn save_status_restore_into_new_cluster() {
    let source = ProcessCluster::start(&bin(), 3, ClusterOptions::default());
    source.wait_leader(Duration::from_secs(30)).await;
    let mut c = source.client(1).await;
    for i in 0..100 {
        c.put(format!("snap/{i:03}"), format!("v{i}"), None).await.unwrap();
    }
    c.delete("snap/050", None).await.unwrap();
    let rev = c.get("snap/", None).await.unwrap().header().unwrap().revision();
    let want = snap_keys(&mut c).await;
    let want_hash = c.hash_kv(rev).await.unwrap().hash();

    let file = source.dir().join("backup.db");
    let out = Command::new("etcdctl")
        .args(["--endpoints", &source.members[1].endpoint(), "snapshot", "save"])
        .arg(&file)
        .env("ETCDCTL_API", "3")
        .output()
        .expect("etcdctl must be installed");
    assert!(out.status.success(), "snapshot save: {}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("Snapshot saved at"));

    // The file is in etcd's format: concord reads it as etcdctl does.
    let status = Command::new(bin()).args(["snapshot", "status"]).arg(&file).output().unwrap();
    let status = String::from_utf8_lossy(&status.stdout).to_string();
    let fields: Vec<&str> = status.trim().split(", ").collect();
    assert_eq!(fields.len(), 4, "{status}");
    assert_eq!(fields[1], rev.to_string(), "revision in status: {status}");
    let etcdctl_status =
        Command::new("etcdctl").args(["snapshot", "status"]).arg(&file).env("ETCDCTL_API", "3").output();
    assert_eq!(status, String::from_utf8_lossy(&etcdctl_status.unwrap().stdout), "etcdctl's status");

    // A corrupted copy is refused by both commands.
    let bad = source.dir().join("bad.db");
    let mut bytes = std::fs::read(&file).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x20;
    std::fs::write(&bad, &bytes).unwrap();
    let o = Command::new(bin()).args(["snapshot", "status"]).arg(&bad).output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("checksum"), "{err}");

    let mut target = ProcessCluster::prepare(&bin(), 3, ClusterOptions::default());
    let o = Command::new(bin()).args(["snapshot", "restore"]).arg(&bad).args(target.args(0)).output().unwrap();
    assert!(!o.status.success(), "corrupt snapshot must be refused");
    assert!(!target.members[0].data_dir.exists(), "a refused restore writes nothing");
    for i in 0..3 {
        let o = Command::new(bin()).args(["snapshot", "restore"]).arg(&file).args(target.args(i)).output().unwrap();
        assert!(o.status.success(), "restore {i}: {}", String::from_utf8_lossy(&o.stderr));
    }
    for i in 0..3 {
        target.restart(i);
    }
    target.wait_leader(Duration::from_secs(30)).await;
    for i in 0..3 {
        let mut c = target.client(i).await;
        let got = snap_keys(&mut c).await;
        assert_eq!(got, want, "member {i} of the restored cluster");
        assert_eq!(c.hash_kv(rev).await.unwrap().hash(), want_hash, "HashKV of member {i}");
    }
    // The restored cluster is a new cluster and keeps working from the restored revision.
    let mut c = target.client(0).await;
    let r = c.put("after-restore", "x", None).await.unwrap();
    assert_eq!(r.header().unwrap().revision(), rev + 1);
    let list = c.member_list().await.unwrap();
    assert_eq!(list.members().len(), 3);
}
