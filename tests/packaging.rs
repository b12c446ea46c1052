//! The systemd unit and its environment file (packaging/), and `concord health`,
//! the probe the container image's health check runs.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use concord_testkit::{eventually, free_port, single_member_command};

const BIN: &str = env!("CARGO_BIN_EXE_concord");

fn packaging(file: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("packaging").join(file);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// systemd accepts the unit as written (no unknown keys, no misplaced settings),
/// with `ExecStart` pointed at the binary under test.
#[test]
fn systemd_accepts_the_unit() {
    if Command::new("systemd-analyze").arg("--version").stdout(Stdio::null()).status().is_err() {
        println!("skipped: systemd-analyze is not installed");
        return;
    }
    let unit = packaging("concord.service");
    assert!(unit.contains("ExecStart=/usr/local/bin/concord\n"), "the unit starts /usr/local/bin/concord");
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("concord.service");
    std::fs::write(&path, unit.replace("ExecStart=/usr/local/bin/concord", &format!("ExecStart={BIN}")))
        .expect("write unit");
    let out = Command::new("systemd-analyze").arg("verify").arg(&path).output().expect("systemd-analyze");
    let complaints = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && complaints.trim().is_empty(), "systemd-analyze verify: {complaints}");
}

/// Every variable the environment file sets is one concord reads, so a typo
/// cannot silently leave a setting at its default.
#[test]
fn every_setting_in_the_environment_file_is_read_by_concord() {
    let help = Command::new(BIN).arg("--help").output().expect("concord --help");
    let help = String::from_utf8_lossy(&help.stdout);
    let mut seen = 0;
    for line in packaging("concord.env").lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (key, value) = line.split_once('=').unwrap_or_else(|| panic!("not KEY=VALUE: {line}"));
        assert!(!value.is_empty(), "{key} has no value");
        assert!(help.contains(&format!("[env: {key}=")), "concord does not read {key}");
        seen += 1;
    }
    assert!(seen >= 5, "the environment file sets {seen} variables");
}

/// `concord health` exits 0 against a healthy member, 1 where nothing answers
/// and 2 for a URL it cannot probe.
#[test]
fn the_health_probe_reports_a_members_health() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (client, peer) = (free_port(), free_port());
    let mut member = single_member_command(Path::new(BIN), "probe", &dir.path().join("data"), client, peer)
        .spawn()
        .expect("start concord");
    let probe = |url: String| {
        Command::new(BIN).args(["health", "--endpoint", &url, "--timeout-ms", "3000"]).output().expect("concord health")
    };
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    let healthy = runtime.block_on(eventually(Duration::from_secs(30), || {
        let out = probe(format!("http://127.0.0.1:{client}"));
        async move { out.status.success().then_some(String::from_utf8_lossy(&out.stdout).into_owned()) }
    }));
    let _ = member.kill();
    let _ = member.wait();
    let healthy = healthy.expect("the member never reported healthy");
    assert!(healthy.contains(r#"{"health":"true"}"#), "{healthy}");
    let down = probe(format!("http://127.0.0.1:{client}"));
    assert_eq!(down.status.code(), Some(1), "a stopped member: {down:?}");
    assert!(String::from_utf8_lossy(&down.stderr).contains("unhealthy"));
    let tls = probe("https://127.0.0.1:1".to_string());
    assert_eq!(tls.status.code(), Some(2), "an https URL: {tls:?}");
}
