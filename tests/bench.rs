//! `concord bench` against a real member: every workload runs to completion
//! without errors and reports a parseable JSON line. (Numbers are reported by
//! `scripts/bench-vs-etcd`, never asserted.)

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use concord_testkit::{ClusterOptions, ProcessCluster};

fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_concord"))
}

fn field(json: &str, name: &str) -> f64 {
    let at = json.find(&format!("\"{name}\":")).unwrap_or_else(|| panic!("{name} missing in {json}"));
    let rest = &json[at + name.len() + 3..];
    rest[..rest.find([',', '}']).unwrap()].parse().unwrap_or_else(|_| panic!("{name} is not a number in {json}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_workload_completes_without_errors() {
    let cluster = ProcessCluster::start(&bin(), 1, ClusterOptions::default());
    cluster.wait_leader(Duration::from_secs(30)).await;
    let ep = cluster.endpoints()[0].clone();
    for (workload, extra) in [
        ("put", vec![]),
        ("range", vec!["--consistency", "l"]),
        ("range", vec!["--consistency", "s"]),
        ("txn-put", vec![]),
        ("lease-keepalive", vec![]),
        ("watch", vec!["--watchers", "20"]),
    ] {
        let out = Command::new(bin())
            .args(["bench", workload, "--endpoints", &ep, "--conns", "2", "--clients", "8", "--total", "400"])
            .args(["--key-space-size", "100", "--json"])
            .args(extra)
            .output()
            .unwrap();
        let line = String::from_utf8_lossy(&out.stdout).to_string();
        assert!(out.status.success(), "{workload}: {line} {}", String::from_utf8_lossy(&out.stderr));
        assert_eq!(field(&line, "requests"), 400.0, "{workload}: {line}");
        assert_eq!(field(&line, "errors"), 0.0, "{workload}: {line}");
        assert!(field(&line, "p99_ms") >= field(&line, "p50_ms"), "{workload}: {line}");
        if workload == "watch" {
            assert_eq!(field(&line, "events"), 400.0 * 20.0, "every watcher sees every put: {line}");
        }
    }
    let bad = Command::new(bin()).args(["bench", "nonsense", "--endpoints", &ep]).output().unwrap();
    assert_eq!(bad.status.code(), Some(2));
}
