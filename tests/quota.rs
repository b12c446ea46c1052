//! Quota: fill past a small `--quota-backend-bytes` → NOSPACE alarm (writes refused
//! with etcd's error, reads and deletes allowed, /health unhealthy) → recover by
//! delete + compact + disarm. No defragment is needed: the quota counts the bytes
//! the store holds in live pages, which compaction frees.

use std::path::PathBuf;
use std::time::Duration;

use concord_testkit::etcd_client::{AlarmAction, AlarmOptions, AlarmType, GetOptions};
use concord_testkit::{eventually, http_get, ClusterOptions, ProcessCluster};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nospace_alarm_refuses_writes_until_compact_and_disarm() {
    let options =
        ClusterOptions { extra_args: vec!["--quota-backend-bytes".into(), "2000000".into()], ..Default::default() };
    let cluster = ProcessCluster::start(&PathBuf::from(env!("CARGO_BIN_EXE_concord")), 3, options);
    cluster.wait_leader(Duration::from_secs(30)).await;
    let mut c = cluster.client(0).await;
    let value = "a".repeat(8000);
    let mut written = 0;
    let err = loop {
        assert!(written < 2000, "quota never enforced");
        match c.put(format!("fill/{written:05}"), value.as_str(), None).await {
            Ok(_) => written += 1,
            Err(e) => break e.to_string(),
        }
    };
    assert!(err.contains("etcdserver: mvcc: database space exceeded"), "{err}");
    println!("quota: {written} puts of 8 kB before NOSPACE at a 2 MB quota");

    // The alarm is replicated: every member refuses growth and reports it.
    for i in 0..3 {
        let mut m = cluster.client(i).await;
        let alarms = m.alarm(AlarmAction::Get, AlarmType::None, None).await.unwrap();
        assert!(!alarms.alarms().is_empty(), "member {i} sees the alarm");
        assert!(alarms.alarms().iter().all(|a| a.alarm() == AlarmType::Nospace));
        // (Like etcd, a member that refuses a write raises NOSPACE under its own id.)
        let put = m.put("more", "x", None).await.unwrap_err().to_string();
        assert!(put.contains("database space exceeded"), "member {i}: {put}");
        let errors = m.status().await.unwrap().errors().to_vec();
        assert!(
            !errors.is_empty() && errors.iter().all(|e| e.starts_with("memberID:") && e.ends_with(" alarm:NOSPACE ")),
            "{errors:?}"
        );
        assert_eq!(http_get(cluster.members[i].client_port, "/health").unwrap().0, 503);
    }
    // Reads and deletes still work; a failed write changed nothing.
    assert_eq!(c.get("fill/", Some(GetOptions::new().with_prefix().with_count_only())).await.unwrap().count(), written);
    assert!(c.get("more", None).await.unwrap().kvs().is_empty());
    let rev = c.delete("fill/", Some(concord_testkit::etcd_client::DeleteOptions::new().with_prefix())).await.unwrap();
    let rev = rev.header().unwrap().revision();
    c.compact(rev, None).await.unwrap();
    // Disarm every raised alarm, as `etcdctl alarm disarm` does.
    let raised = c.alarm(AlarmAction::Get, AlarmType::None, None).await.unwrap().alarms().to_vec();
    for alarm in raised {
        let mut opts = AlarmOptions::new();
        opts.with_member(alarm.member_id());
        c.alarm(AlarmAction::Deactivate, AlarmType::Nospace, Some(opts)).await.unwrap();
    }
    assert!(c.alarm(AlarmAction::Get, AlarmType::None, None).await.unwrap().alarms().is_empty());
    // Once the size sample sees the freed pages, writes are accepted again.
    let ok = eventually(Duration::from_secs(10), || {
        let mut c = c.clone();
        async move { c.put("more", "x", None).await.ok() }
    })
    .await;
    assert!(ok.is_some(), "writes must resume after compact and disarm");
    assert_eq!(http_get(cluster.members[0].client_port, "/health").unwrap().0, 200);
}
