//! Maintenance with real processes: auto-compaction, Hash equality, corruption
//! detection. Each test owns its processes and directories.

use std::path::PathBuf;
use std::time::Duration;

use concord_testkit::etcd_client::GetOptions;
use concord_testkit::{eventually, ClusterOptions, ProcessCluster};

fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_concord"))
}

const WAIT: Duration = Duration::from_secs(30);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn periodic_auto_compaction_keeps_only_the_retention_window() {
    let options = ClusterOptions {
        extra_args: ["--auto-compaction-mode", "periodic", "--auto-compaction-retention", "1s"]
            .map(String::from)
            .to_vec(),
        ..Default::default()
    };
    let cluster = ProcessCluster::start(&bin(), 3, options);
    let leader = cluster.wait_leader(WAIT).await;
    let mut c = cluster.client(leader).await;
    for i in 0..5 {
        c.put("k", format!("v{i}"), None).await.expect("put");
    }
    // Within a few retention periods the old revisions are compacted away on
    // every member (the leader proposes the compaction through Raft).
    for i in 0..3 {
        let compacted = eventually(WAIT, || {
            let cluster = &cluster;
            async move {
                let mut c = cluster.client(i).await;
                let opts = GetOptions::new().with_revision(2).with_serializable();
                match c.get("k", Some(opts)).await {
                    Err(e) if e.to_string().contains("required revision has been compacted") => Some(()),
                    _ => None,
                }
            }
        })
        .await;
        assert!(compacted.is_some(), "member {i} compacted revision 2");
    }
    let latest = c.get("k", None).await.expect("get latest");
    assert_eq!(latest.kvs()[0].value(), b"v4", "compaction keeps the latest version");
    assert!(cluster.log_text(leader).contains("auto-compaction"), "the leader logs its compactions");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hash_is_equal_across_members_at_the_same_revision() {
    let cluster = ProcessCluster::start(&bin(), 3, ClusterOptions::default());
    let leader = cluster.wait_leader(WAIT).await;
    let mut c = cluster.client(leader).await;
    for i in 0..50 {
        c.put(format!("k{i}"), "v", None).await.expect("put");
    }
    let lease = c.lease_grant(60, None).await.expect("lease");
    c.put("leased", "v", Some(concord_testkit::etcd_client::PutOptions::new().with_lease(lease.id())))
        .await
        .expect("put with lease");
    c.delete("k1", None).await.expect("delete");
    let rev = c.get("k0", None).await.unwrap().header().unwrap().revision();
    let mut hashes = Vec::new();
    for i in 0..3 {
        let mut m = cluster.client(i).await;
        // Linearizable read first: the member has applied everything up to `rev`.
        m.get("k0", None).await.expect("barrier read");
        let h = m.hash().await.expect("hash");
        assert_eq!(h.header().unwrap().revision(), rev);
        hashes.push(h.hash());
    }
    assert!(hashes.windows(2).all(|w| w[0] == w[1]), "Hash differs across members: {hashes:?}");
}
