//! The `concord` binary's configuration surface, as an operator meets it: etcd's
//! flags, `ETCD_*` environment variables, `--config-file`, and clear failures.

use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use concord_testkit::free_port;

fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_concord"))
}

struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn etcdctl(port: u16, args: &[&str]) -> Output {
    Command::new("etcdctl")
        .args(["--endpoints", &format!("127.0.0.1:{port}"), "--dial-timeout", "1s", "--command-timeout", "3s"])
        .args(args)
        .env("ETCDCTL_API", "3")
        .output()
        .expect("etcdctl must be installed (apt-get install etcd-client)")
}

/// Waits until `etcdctl member list` succeeds and returns its output.
fn member_list(port: u16) -> String {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let o = etcdctl(port, &["member", "list"]);
        let out = String::from_utf8_lossy(&o.stdout).to_string();
        if o.status.success() && out.contains(", started, ") && !out.contains("started, ,") {
            return out;
        }
        assert!(Instant::now() < deadline, "member never became ready: {}", String::from_utf8_lossy(&o.stderr));
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn environment_variables_configure_a_member() {
    let dir = tempfile::tempdir().unwrap();
    let (c, p) = (free_port(), free_port());
    let child = Command::new(bin())
        .env("ETCD_NAME", "from-env")
        .env("ETCD_DATA_DIR", dir.path().join("d"))
        .env("ETCD_LISTEN_CLIENT_URLS", format!("http://127.0.0.1:{c}"))
        .env("ETCD_ADVERTISE_CLIENT_URLS", format!("http://127.0.0.1:{c}"))
        .env("ETCD_LISTEN_PEER_URLS", format!("http://127.0.0.1:{p}"))
        .env("ETCD_INITIAL_ADVERTISE_PEER_URLS", format!("http://127.0.0.1:{p}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let _running = Running(child);
    let list = member_list(c);
    assert!(
        list.contains(&format!(", started, from-env, http://127.0.0.1:{p}, http://127.0.0.1:{c}, false")),
        "{list}"
    );
    assert!(dir.path().join("d/member").is_dir(), "data dir from ETCD_DATA_DIR");
}

#[test]
fn config_file_configures_a_member_and_overrides_flags() {
    let dir = tempfile::tempdir().unwrap();
    let (c, p) = (free_port(), free_port());
    let file = dir.path().join("concord.yaml");
    std::fs::write(
        &file,
        format!(
            "name: from-file\ndata-dir: {}\nlisten-client-urls: http://127.0.0.1:{c}\nadvertise-client-urls: http://127.0.0.1:{c}\n\
             listen-peer-urls: http://127.0.0.1:{p}\ninitial-advertise-peer-urls: http://127.0.0.1:{p}\n\
             initial-cluster: from-file=http://127.0.0.1:{p}\nheartbeat-interval: 50\nelection-timeout: 500\n",
            dir.path().join("d").display()
        ),
    )
    .unwrap();
    // As with etcd, the file wins: the --name flag is ignored.
    let child = Command::new(bin())
        .args(["--config-file", file.to_str().unwrap(), "--name", "ignored"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let _running = Running(child);
    let list = member_list(c);
    assert!(list.contains(", started, from-file, "), "{list}");
}

#[test]
fn bad_configuration_fails_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let cases: [(&[&str], &str); 5] = [
        (&["--no-such-flag"], "unexpected argument '--no-such-flag'"),
        (&["--initial-cluster-state", "sideways"], "--initial-cluster-state"),
        (&["--heartbeat-interval", "500", "--election-timeout", "1000"], "at least as 5 times"),
        (&["--name", "a", "--initial-cluster", "b=http://127.0.0.1:1"], "couldn't find local name \"a\""),
        (&["--max-request-bytes", "lots"], "invalid value"),
    ];
    for (args, want) in cases {
        let o = Command::new(bin()).args(args).current_dir(dir.path()).output().unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success(), "{args:?} must fail");
        assert!(err.contains(want), "{args:?}: stderr {err:?} lacks {want:?}");
    }
    // Nothing was created by a refused start.
    assert!(std::fs::read_dir(dir.path()).unwrap().next().is_none());
}

#[test]
fn restart_ignores_initial_cluster_flags() {
    let dir = tempfile::tempdir().unwrap();
    let (c, p) = (free_port(), free_port());
    let base = |extra: &[&str]| {
        let mut cmd = Command::new(bin());
        cmd.args(["--name", "r", "--data-dir", dir.path().join("d").to_str().unwrap()])
            .args(["--listen-client-urls", &format!("http://127.0.0.1:{c}")])
            .args(["--advertise-client-urls", &format!("http://127.0.0.1:{c}")])
            .args(["--listen-peer-urls", &format!("http://127.0.0.1:{p}")])
            .args(["--initial-advertise-peer-urls", &format!("http://127.0.0.1:{p}")])
            .args(extra)
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        cmd
    };
    let first = Running(base(&[]).spawn().unwrap());
    member_list(c);
    assert!(etcdctl(c, &["put", "survives", "yes"]).status.success());
    drop(first);
    // A different bootstrap configuration on an existing data dir changes nothing.
    let _second = Running(
        base(&[
            "--initial-cluster",
            &format!("r=http://127.0.0.1:{p},other=http://127.0.0.1:1"),
            "--initial-cluster-token",
            "another",
        ])
        .spawn()
        .unwrap(),
    );
    let list = member_list(c);
    assert_eq!(list.lines().count(), 1, "{list}");
    let o = etcdctl(c, &["get", "survives", "--print-value-only"]);
    assert_eq!(String::from_utf8_lossy(&o.stdout).trim(), "yes");
}
