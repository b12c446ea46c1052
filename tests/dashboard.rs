//! Monitoring end to end with real processes: /livez, /readyz, /metrics with
//! etcd's names, `concord status`, and the dashboard rendered by headless Chromium
//! (a screenshot is written to the test's temp dir and its path printed).

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use concord_testkit::etcd_client::{AlarmAction, AlarmType, PutOptions, WatchOptions};
use concord_testkit::{eventually, http_get, ClusterOptions, ProcessCluster};

fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_concord"))
}

const WAIT: Duration = Duration::from_secs(30);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probes_metrics_status_cli_and_dashboard() {
    let metrics_port = concord_testkit::free_port();
    let options = ClusterOptions {
        extra_args: vec!["--listen-metrics-urls".into(), format!("http://127.0.0.1:{metrics_port}")],
        ..Default::default()
    };
    // Only member 0 gets the extra metrics listener (one port per member).
    let mut cluster = ProcessCluster::prepare(&bin(), 3, ClusterOptions::default());
    cluster.set_extra_args(0, options.extra_args.clone());
    for i in 0..3 {
        cluster.restart(i);
    }
    let leader = cluster.wait_leader(WAIT).await;
    let mut c = cluster.client(leader).await;
    let lease = c.lease_grant(60, None).await.unwrap();
    for i in 0..20 {
        c.put(format!("k{i}"), "v", Some(PutOptions::new().with_lease(lease.id()))).await.unwrap();
    }
    let _ = c.get("missing", None).await.unwrap();
    // A durable queue, for the dashboard's queue table.
    let mut q = concord::proto::queue::queue_client::QueueClient::connect(cluster.endpoints()[0].clone())
        .await
        .expect("queue client");
    let config = concord::proto::queue::StreamConfig { name: "orders".into(), ..Default::default() };
    q.create_stream(concord::proto::queue::CreateStreamRequest { config: Some(config) }).await.expect("create stream");
    let publish =
        concord::proto::queue::PublishRequest { stream: "orders".into(), payload: b"o".to_vec(), ..Default::default() };
    q.publish(publish).await.expect("publish");
    let (_watcher, _stream) =
        cluster.client(0).await.watch("k", Some(WatchOptions::new().with_prefix())).await.unwrap();

    let port = cluster.members[0].client_port;
    let (code, body) = http_get(port, "/livez").unwrap();
    assert_eq!((code, body.as_str()), (200, "ok"));
    let (code, body) = http_get(port, "/readyz?verbose").unwrap();
    assert_eq!(code, 200, "{body}");
    assert!(body.contains("[+]linearizable_read ok") && body.ends_with("ok"), "{body}");

    // /metrics on the client port and on --listen-metrics-urls.
    for p in [port, metrics_port] {
        let (code, m) = http_get(p, "/metrics").unwrap();
        assert_eq!(code, 200);
        for name in [
            "etcd_server_has_leader 1",
            "etcd_server_leader_changes_seen_total",
            "etcd_server_proposals_committed_total",
            "etcd_server_proposals_pending",
            "etcd_server_proposals_failed_total",
            "etcd_disk_wal_fsync_duration_seconds_bucket{le=\"0.001\"}",
            "etcd_disk_backend_commit_duration_seconds_count",
            "etcd_mvcc_db_total_size_in_use_in_bytes",
            "etcd_debugging_mvcc_keys_total 20",
            "etcd_debugging_mvcc_watcher_total 1",
            "process_resident_memory_bytes",
            "concord_leases_total 1",
            "concord_apply_lag_entries",
            "concord_watch_backlog_responses",
            "grpc_server_handling_seconds_bucket{grpc_method=\"Watch\"",
        ] {
            assert!(m.contains(name), "metric {name} missing from port {p}:\n{m}");
        }
    }
    // Every RPC is counted with its gRPC code.
    let (_, m) = http_get(cluster.members[leader].client_port, "/metrics").unwrap();
    // As in etcd, every member times its round trip to each of its two peers.
    for member in &cluster.members {
        let deadline = std::time::Instant::now() + WAIT;
        loop {
            let (_, m) = http_get(member.client_port, "/metrics").unwrap();
            let peers =
                m.lines().filter(|l| l.starts_with("etcd_network_peer_round_trip_time_seconds_count{To=")).count();
            if peers == 2 {
                break;
            }
            assert!(std::time::Instant::now() < deadline, "member on {} times {peers} peers:\n{m}", member.client_port);
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        }
    }
    assert!(m.contains("grpc_server_handled_total{grpc_code=\"OK\",grpc_method=\"Put\",grpc_service=\"etcdserverpb.KV\",grpc_type=\"unary\"} 20"), "{m}");

    // The Grafana dashboard in the repo only queries metrics concord exports.
    let grafana = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/grafana/concord.json")).unwrap();
    // Metric names are the identifiers directly followed by a `{` selector.
    let names: std::collections::BTreeSet<&str> = grafana
        .split('{')
        .filter_map(|chunk| chunk.rsplit(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).next())
        .filter(|w| ["etcd_", "concord_", "grpc_", "process_"].iter().any(|p| w.starts_with(p)))
        .collect();
    assert!(names.len() > 10, "{names:?}");
    for name in names {
        assert!(m.contains(&format!("\n{name}")), "docs/grafana/concord.json uses {name}, which /metrics lacks");
    }

    // The status CLI lists all three members, one leader, no lag once caught up.
    let out = eventually(WAIT, || async {
        let o = Command::new(bin()).args(["status", "--endpoints", &cluster.endpoints().join(",")]).output().ok()?;
        let text = String::from_utf8_lossy(&o.stdout).to_string();
        (o.status.success() && text.matches("healthy").count() == 3).then_some(text)
    })
    .await
    .expect("concord status reports three healthy members");
    assert_eq!(out.matches("| leader ").count(), 1, "{out}");
    assert_eq!(out.matches("| follower ").count(), 2, "{out}");
    println!("{out}");
    let json =
        Command::new(bin()).args(["status", "--endpoints", &cluster.endpoints()[1], "-w", "json"]).output().unwrap();
    assert!(String::from_utf8_lossy(&json.stdout).contains("\"role\":\"leader\""));

    // The dashboard, rendered by a real browser: the script ran and filled in all
    // members. Chromium is required (scripts/test installs it).
    let url = format!("http://127.0.0.1:{port}/dashboard");
    let dom = Command::new("chromium")
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--virtual-time-budget=5000",
            "--dump-dom",
            &url,
        ])
        .output()
        .expect("chromium must be installed (apt-get install chromium)");
    let dom = String::from_utf8_lossy(&dom.stdout);
    assert!(dom.contains("data-ready=\"1\"") && dom.contains("data-members=\"3\""), "dashboard did not render:\n{dom}");
    for i in 0..3 {
        assert!(dom.contains(&format!("data-member=\"m{i}\"")), "member m{i} missing from the dashboard");
    }
    assert!(dom.contains("class=\"pill leader\""), "the leader is marked");
    assert!(dom.contains("data-queue=\"orders\""), "the queue is missing from the dashboard");
    assert!(dom.contains("data-blob=\"counters\""), "the blob store's counters are missing from the dashboard");
    let shot = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("dashboard.png");
    let _ = std::fs::remove_file(&shot);
    let status = Command::new("chromium")
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--hide-scrollbars",
            "--window-size=1400,900",
            "--virtual-time-budget=5000",
        ])
        .arg(format!("--screenshot={}", shot.display()))
        .arg(&url)
        .output()
        .unwrap();
    let png = std::fs::read(&shot)
        .unwrap_or_else(|e| panic!("no screenshot ({e}): {}", String::from_utf8_lossy(&status.stderr)));
    assert!(png.starts_with(b"\x89PNG") && png.len() > 10_000, "a real screenshot");
    println!("dashboard screenshot: {}", shot.display());

    // An alarm makes /readyz and /health fail and shows on the timeline.
    let member = c.status().await.unwrap().header().unwrap().member_id();
    let mut opts = concord_testkit::etcd_client::AlarmOptions::new();
    opts.with_member(member);
    c.alarm(AlarmAction::Activate, AlarmType::Nospace, Some(opts)).await.unwrap();
    let (code, body) = http_get(port, "/readyz").unwrap();
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("[-]alarm failed"), "{body}");
    assert_eq!(http_get(port, "/health").unwrap().0, 503);
    let timeline = eventually(WAIT, || async {
        let (_, s) = http_get(port, "/dashboard/api/state").ok()?;
        s.contains("alarm NOSPACE raised").then_some(s)
    })
    .await;
    assert!(timeline.is_some(), "the alarm appears in the dashboard's events");
}
