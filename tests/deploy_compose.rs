//! The container image and the compose file as an operator uses them:
//! scripts/docker-image builds the image (from the test's concord binary), the
//! repo's packaging/compose.yaml starts three members on a user network, and the
//! host reaches them on published ports. Keys written through every member read
//! back through every member; the dashboard answers; the image's health check
//! turns healthy; killing the leader's container leaves a new leader serving
//! writes; the killed container, started again, still has its data. Everything
//! (containers, network, volumes, image) is removed at the end, also on failure.
//!
//! Needs a Docker engine and compose (scripts/test installs Debian's docker.io
//! and docker-compose and starts dockerd as root). Where no engine can start,
//! the test says so and passes without running.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use concord_testkit::{eventually, free_port, http_get};
use etcd_client::{Client, ConnectOptions};

/// The longest any one docker command may run (an image build, `up`, `down`).
const COMMAND_TIMEOUT_S: u32 = 120;

/// Runs `program args` under coreutils `timeout`; its output.
fn run(program: &str, args: &[&str], env: &[(String, String)]) -> Output {
    let mut cmd = Command::new("timeout");
    cmd.arg(COMMAND_TIMEOUT_S.to_string()).arg(program).args(args);
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().unwrap_or_else(|e| panic!("cannot run {program}: {e}"))
}

fn ok(out: &Output, what: &str) {
    assert!(
        out.status.success(),
        "{what} failed ({}):\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The compose command available: the docker plugin, else Debian's docker-compose.
fn compose_command() -> Option<Vec<&'static str>> {
    if run("docker", &["compose", "version"], &[]).status.success() {
        return Some(vec!["docker", "compose"]);
    }
    if run("docker-compose", &["version"], &[]).status.success() {
        return Some(vec!["docker-compose"]);
    }
    None
}

/// The compose project under test; dropping it removes everything it made.
struct Project {
    compose: Vec<&'static str>,
    file: PathBuf,
    name: String,
    image: String,
    env: Vec<(String, String)>,
}

impl Project {
    fn compose(&self, args: &[&str]) -> Output {
        let file = self.file.to_string_lossy().into_owned();
        let mut full = self.compose[1..].to_vec();
        full.extend(["-p", &self.name, "-f", &file]);
        full.extend(args);
        run(self.compose[0], &full, &self.env)
    }
}

impl Drop for Project {
    fn drop(&mut self) {
        let down = self.compose(&["down", "-v", "--timeout", "5"]);
        if !down.status.success() {
            eprintln!("compose down: {}", String::from_utf8_lossy(&down.stderr));
        }
        run("docker", &["rmi", "-f", &self.image], &[]);
    }
}

async fn connect(port: u16) -> Option<Client> {
    let opts = ConnectOptions::new().with_connect_timeout(Duration::from_secs(2)).with_timeout(Duration::from_secs(5));
    Client::connect([format!("127.0.0.1:{port}")], Some(opts)).await.ok()
}

/// (this member's id, the leader's id) as member `port` reports them.
async fn ids(port: u16) -> Option<(u64, u64)> {
    let mut c = connect(port).await?;
    let s = c.status().await.ok()?;
    Some((s.header()?.member_id(), s.leader()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn image_and_compose_cluster_serve_fail_over_and_keep_data() {
    if !run("docker", &["info"], &[]).status.success() {
        println!("skipped: no Docker engine is running here (scripts/test starts dockerd where it can)");
        return;
    }
    let compose =
        compose_command().expect("a Docker engine runs but neither `docker compose` nor docker-compose is installed");
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    let image = format!("concord-test-{}", std::process::id());
    let ports: Vec<u16> = (0..3).map(|_| free_port()).collect();
    let mut env = vec![("CONCORD_IMAGE".to_string(), image.clone())];
    for (i, port) in ports.iter().enumerate() {
        env.push((format!("CONCORD{}_CLIENT_PORT", i + 1), port.to_string()));
    }
    let project = Project {
        compose,
        file: repo.join("packaging/compose.yaml"),
        name: format!("concordtest{}", std::process::id()),
        image: image.clone(),
        env,
    };
    let script = repo.join("scripts/docker-image").to_string_lossy().into_owned();
    ok(&run(&script, &["--tag", &image, "--binary", env!("CARGO_BIN_EXE_concord")], &[]), "scripts/docker-image");
    ok(&project.compose(&["up", "-d"]), "compose up");

    // Every member serves and agrees on a leader.
    let mut members = Vec::new();
    for &port in &ports {
        let found =
            eventually(Duration::from_secs(30), || async move { ids(port).await.filter(|(_, l)| *l != 0) }).await;
        members.push(found.unwrap_or_else(|| panic!("the member on port {port} did not come up with a leader")).0);
    }
    // Keys written through each member read back through each member.
    for (i, &port) in ports.iter().enumerate() {
        let mut c = connect(port).await.expect("connect");
        c.put(format!("k{i}"), format!("v{i}"), None).await.expect("put");
    }
    for &port in &ports {
        let mut c = connect(port).await.expect("connect");
        let got = c.get("k", Some(etcd_client::GetOptions::new().with_prefix())).await.expect("get");
        let kvs: Vec<(String, String)> = got
            .kvs()
            .iter()
            .map(|kv| (kv.key_str().unwrap_or_default().to_string(), kv.value_str().unwrap_or_default().to_string()))
            .collect();
        let want: Vec<(String, String)> = (0..3).map(|i| (format!("k{i}"), format!("v{i}"))).collect();
        assert_eq!(kvs, want, "member on port {port}");
        let (code, body) = http_get(port, "/dashboard").expect("dashboard");
        assert_eq!(code, 200, "dashboard on port {port}: {body}");
    }
    // The image's health check runs `concord health` inside each container.
    for service in ["concord1", "concord2", "concord3"] {
        let container = String::from_utf8_lossy(&project.compose(&["ps", "-q", service]).stdout).trim().to_string();
        let healthy = eventually(Duration::from_secs(60), || {
            let container = container.clone();
            async move {
                let out = run("docker", &["inspect", "--format", "{{.State.Health.Status}}", &container], &[]);
                (String::from_utf8_lossy(&out.stdout).trim() == "healthy").then_some(())
            }
        })
        .await;
        assert!(healthy.is_some(), "{service}'s health check did not turn healthy");
    }

    // Kill the leader's container: the others elect a leader that takes writes.
    let (_, leader) = ids(ports[0]).await.expect("status");
    let victim = members.iter().position(|m| *m == leader).expect("the leader is one of the three");
    let service = format!("concord{}", victim + 1);
    ok(&project.compose(&["kill", &service]), "compose kill");
    let others: Vec<u16> = (0..3).filter(|i| *i != victim).map(|i| ports[i]).collect();
    let new_leader = eventually(Duration::from_secs(30), || {
        let others = others.clone();
        async move {
            let (_, l) = ids(others[0]).await?;
            if l == 0 || l == leader {
                return None;
            }
            let mut c = connect(others[1]).await?;
            c.put("after-failover", "yes", None).await.ok()?;
            Some(l)
        }
    })
    .await;
    assert!(new_leader.is_some(), "no new leader took a write after the leader's container was killed");

    // The killed member's data is on its volume (read from the stopped container),
    // and started again it still has it and catches up.
    let container = String::from_utf8_lossy(&project.compose(&["ps", "-q", &service]).stdout).trim().to_string();
    let data = run("docker", &["cp", &format!("{container}:/data/"), "-"], &[]);
    ok(&data, "docker cp of the stopped member's /data");
    assert!(
        String::from_utf8_lossy(&data.stdout).contains("member/"),
        "the stopped member's /data holds no member directory"
    );
    ok(&project.compose(&["start", &service]), "compose start");
    let caught_up = eventually(Duration::from_secs(30), || async {
        let mut c = connect(ports[victim]).await?;
        let opts = etcd_client::GetOptions::new().with_serializable();
        let before = c.get("k0", Some(opts.clone())).await.ok()?;
        let after = c.get("after-failover", Some(opts)).await.ok()?;
        (before.kvs().len() == 1 && after.kvs().len() == 1).then_some(())
    })
    .await;
    assert!(caught_up.is_some(), "{service} lost its data or did not catch up after a restart");
    drop(project);
}
