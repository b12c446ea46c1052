//! Test harness: concord members as real processes on loopback ports.
//!
//! Every process and directory a [`ProcessCluster`] creates is owned by it and torn
//! down on drop, including when a test panics. Ports come from [`free_port`], which
//! reserves them across test processes so parallel tests do not collide. Member logs go to `<dir>/<name>.log` and are
//! printed by [`ProcessCluster::dump_logs`] when a test wants to show them.
//! [`linearizability`] checks recorded client histories. With
//! [`ClusterOptions::netns`] every member runs in its own network namespace
//! ([`netns`]) so a test can cut, slow or lose the traffic between members.

pub mod faults;
pub mod linearizability;
pub mod nemesis;
pub mod netns;
pub mod workload;

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub use etcd_client;
use etcd_client::Client;

/// Lowest port [`free_port`] hands out. The range sits below Linux's ephemeral range
/// (32768–60999) so outgoing connections, which take ephemeral ports, never grab a port
/// a member is about to listen on. Binding port 0 was rejected for that reason, and
/// because two calls may return the same port once the first listener is dropped.
const TEST_PORT_MIN: u16 = 20_000;
/// One past the highest port [`free_port`] hands out.
const TEST_PORT_END: u16 = 32_000;
/// How long a port reservation file keeps other test processes off a port; older
/// files are left over from finished runs and are reused.
const PORT_RESERVATION_TTL: Duration = Duration::from_secs(600);

/// A free loopback TCP port that no other test in this or another process holds.
///
/// The port is reserved with an exclusively created file in
/// `$TMPDIR/concord-test-ports/`, so concurrent test processes (nextest runs each
/// test in its own process) never hand out the same port, and a port is only
/// returned if it can be bound right now.
pub fn free_port() -> u16 {
    static NEXT: std::sync::Mutex<Option<u16>> = std::sync::Mutex::new(None);
    let dir = std::env::temp_dir().join("concord-test-ports");
    std::fs::create_dir_all(&dir).expect("create the port reservation directory");
    let span = TEST_PORT_END - TEST_PORT_MIN;
    let mut next = NEXT.lock().expect("port allocator lock");
    let mut offset = next.unwrap_or_else(|| {
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.subsec_nanos());
        ((std::process::id().wrapping_mul(7919) ^ nanos) % u32::from(span)) as u16
    });
    for _ in 0..span {
        let port = TEST_PORT_MIN + offset;
        offset = (offset + 1) % span;
        if reserve_port(&dir.join(port.to_string())) && TcpListener::bind(("127.0.0.1", port)).is_ok() {
            *next = Some(offset);
            return port;
        }
    }
    panic!("no free test port in {TEST_PORT_MIN}..{TEST_PORT_END}");
}

/// Creates the reservation file for one port; a stale file is replaced.
fn reserve_port(path: &Path) -> bool {
    let create = || std::fs::OpenOptions::new().write(true).create_new(true).open(path).is_ok();
    if create() {
        return true;
    }
    let stale = std::fs::metadata(path)
        .and_then(|m| m.modified())
        .is_ok_and(|t| t.elapsed().is_ok_and(|age| age > PORT_RESERVATION_TTL));
    stale && std::fs::remove_file(path).is_ok() && create()
}

/// The command line of a one-member cluster named `name` on loopback ports, for
/// `bin` = `etcd` or concord (same flags), with its output discarded.
pub fn single_member_command(bin: &Path, name: &str, data_dir: &Path, client_port: u16, peer_port: u16) -> Command {
    let c = format!("http://127.0.0.1:{client_port}");
    let p = format!("http://127.0.0.1:{peer_port}");
    let mut cmd = Command::new(bin);
    cmd.args(["--name", name, "--data-dir"])
        .arg(data_dir)
        .args(["--listen-client-urls", &c, "--advertise-client-urls", &c])
        .args(["--listen-peer-urls", &p, "--initial-advertise-peer-urls", &p])
        .args(["--initial-cluster", &format!("{name}={p}")])
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    cmd
}

/// One member's fixed identity and its current process, if running.
pub struct Member {
    pub name: String,
    /// Address the member listens on: 127.0.0.1, or its namespace's address.
    pub host: String,
    /// The network namespace it runs in, with [`ClusterOptions::netns`].
    pub netns: Option<String>,
    pub client_port: u16,
    pub peer_port: u16,
    pub data_dir: PathBuf,
    pub log_path: PathBuf,
    /// Started with `--initial-cluster-state existing` (added with `MemberAdd`).
    pub joining: bool,
    /// Flags for this member only, after the cluster-wide ones.
    pub extra_args: Vec<String>,
    /// Environment variables for this member only (e.g. `LD_PRELOAD` of a fault shim).
    pub env: Vec<(String, String)>,
    /// "https" when the cluster serves clients over TLS.
    pub client_scheme: &'static str,
    child: Option<Child>,
}

impl Member {
    pub fn endpoint(&self) -> String {
        format!("{}://{}:{}", self.client_scheme, self.host, self.client_port)
    }

    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }
}

/// Timing and extra flags for a cluster under test.
#[derive(Clone, Debug)]
pub struct ClusterOptions {
    pub heartbeat_ms: u64,
    pub election_timeout_ms: u64,
    pub extra_args: Vec<String>,
    /// Serve clients over TLS (`https://` client URLs; certificates go in `extra_args`).
    pub client_tls: bool,
    /// Talk to peers over TLS (`https://` peer URLs).
    pub peer_tls: bool,
    /// Run each member in its own network namespace ([`netns::Network`]), so the
    /// test can partition them; needs root (see [`netns::unavailable`]).
    pub netns: bool,
}

impl Default for ClusterOptions {
    fn default() -> Self {
        ClusterOptions {
            heartbeat_ms: 50,
            election_timeout_ms: 500,
            extra_args: Vec::new(),
            client_tls: false,
            peer_tls: false,
            netns: false,
        }
    }
}

pub struct ProcessCluster {
    bin: PathBuf,
    dir: tempfile::TempDir,
    options: ClusterOptions,
    pub members: Vec<Member>,
    /// The members' network when they run in namespaces; dropped after them.
    pub network: Option<netns::Network>,
}

impl ProcessCluster {
    /// Starts `n` members of a new cluster from the `concord` binary at `bin`.
    pub fn start(bin: &Path, n: usize, options: ClusterOptions) -> ProcessCluster {
        let mut cluster = ProcessCluster::prepare(bin, n, options);
        for i in 0..n {
            cluster.spawn(i);
        }
        cluster
    }

    /// Allocates ports and directories for `n` members without starting them
    /// (to seed data dirs first, e.g. from a snapshot); start each with `restart`.
    pub fn prepare(bin: &Path, n: usize, options: ClusterOptions) -> ProcessCluster {
        let dir = tempfile::tempdir().expect("temp dir");
        let scheme = if options.client_tls { "https" } else { "http" };
        let network = options.netns.then(|| netns::Network::create(n).expect("create the test network"));
        let members: Vec<Member> = (0..n)
            .map(|i| {
                let name = format!("m{i}");
                Member {
                    host: network.as_ref().map_or_else(|| "127.0.0.1".to_string(), |net| net.ip(i).to_string()),
                    netns: network.as_ref().map(|net| net.namespace(i)),
                    data_dir: dir.path().join(format!("{name}.data")),
                    log_path: dir.path().join(format!("{name}.log")),
                    name,
                    client_port: free_port(),
                    peer_port: free_port(),
                    joining: false,
                    extra_args: Vec::new(),
                    env: Vec::new(),
                    client_scheme: scheme,
                    child: None,
                }
            })
            .collect();
        ProcessCluster { bin: bin.to_path_buf(), dir, options, members, network }
    }

    /// Allocates a new member that will join the running cluster (state
    /// `existing`) once the cluster has been told about it with `MemberAdd`; start
    /// it with `restart`. Returns its index.
    pub fn add_member(&mut self) -> usize {
        let i = self.members.len();
        assert!(self.network.is_none(), "a namespaced cluster has a fixed set of hosts");
        let name = format!("m{i}");
        let scheme = if self.options.client_tls { "https" } else { "http" };
        self.members.push(Member {
            host: "127.0.0.1".to_string(),
            netns: None,
            data_dir: self.dir.path().join(format!("{name}.data")),
            log_path: self.dir.path().join(format!("{name}.log")),
            name,
            client_port: free_port(),
            peer_port: free_port(),
            joining: true,
            extra_args: Vec::new(),
            env: Vec::new(),
            client_scheme: scheme,
            child: None,
        });
        i
    }

    /// Gives member `i` flags of its own (applied from its next start).
    pub fn set_extra_args(&mut self, i: usize, args: Vec<String>) {
        self.members[i].extra_args = args;
    }

    /// Sets an environment variable for member `i` (applied from its next start).
    pub fn set_env(&mut self, i: usize, key: &str, value: &str) {
        self.members[i].env.push((key.to_string(), value.to_string()));
    }

    /// Member `i`'s peer URL.
    fn peer_scheme(&self) -> &'static str {
        if self.options.peer_tls {
            "https"
        } else {
            "http"
        }
    }

    pub fn peer_url(&self, i: usize) -> String {
        format!("{}://{}:{}", self.peer_scheme(), self.members[i].host, self.members[i].peer_port)
    }

    /// Waits up to `timeout` for member `i`'s process to exit by itself; returns
    /// its exit status, or `None` if it is still running (or was not).
    pub fn wait_exit(&mut self, i: usize, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            let c = self.members[i].child.as_mut()?;
            if let Ok(Some(st)) = c.try_wait() {
                self.members[i].child = None;
                return Some(st);
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Members whose process has exited although no test stopped it (a crash, a
    /// fatal error), with their exit status.
    pub fn crashed(&mut self) -> Vec<(usize, std::process::ExitStatus)> {
        let mut out = Vec::new();
        for (i, m) in self.members.iter_mut().enumerate() {
            if let Some(Ok(Some(status))) = m.child.as_mut().map(Child::try_wait) {
                out.push((i, status));
            }
        }
        out
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    fn initial_cluster(&self) -> String {
        self.members
            .iter()
            .map(|m| format!("{}={}://{}:{}", m.name, self.peer_scheme(), m.host, m.peer_port))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// The command line of member `i`: etcd's flags, unchanged.
    pub fn args(&self, i: usize) -> Vec<String> {
        let m = &self.members[i];
        let mut args: Vec<String> = [
            "--name",
            &m.name,
            "--data-dir",
            &m.data_dir.display().to_string(),
            "--listen-client-urls",
            &m.endpoint(),
            "--advertise-client-urls",
            &m.endpoint(),
            "--listen-peer-urls",
            &self.peer_url(i),
            "--initial-advertise-peer-urls",
            &self.peer_url(i),
            "--initial-cluster",
            &self.initial_cluster(),
            "--initial-cluster-state",
            if m.joining { "existing" } else { "new" },
            "--heartbeat-interval",
            &self.options.heartbeat_ms.to_string(),
            "--election-timeout",
            &self.options.election_timeout_ms.to_string(),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        args.extend(self.options.extra_args.iter().cloned());
        args.extend(m.extra_args.iter().cloned());
        args
    }

    fn spawn(&mut self, i: usize) {
        assert!(self.members[i].child.is_none(), "member {i} already running");
        let args = self.args(i);
        let m = &mut self.members[i];
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&m.log_path).expect("member log file");
        let mut command = match &m.netns {
            Some(ns) => {
                // `ip netns exec` execs the binary: the child's pid is the member's.
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]).arg(&self.bin);
                c
            }
            None => Command::new(&self.bin),
        };
        let child = command
            .args(&args)
            .envs(m.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("dup log"))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {}: {e}", self.bin.display()));
        m.child = Some(child);
    }

    /// SIGKILL: the process gets no chance to flush anything.
    pub fn kill(&mut self, i: usize) {
        if let Some(mut c) = self.members[i].child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM and wait for a clean exit; returns the exit status.
    pub fn stop(&mut self, i: usize) -> Option<std::process::ExitStatus> {
        let mut c = self.members[i].child.take()?;
        // SAFETY: plain kill(2) on a child pid we own and have not reaped.
        unsafe {
            libc::kill(c.id() as i32, libc::SIGTERM);
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(Some(st)) = c.try_wait() {
                return Some(st);
            }
            if Instant::now() > deadline {
                let _ = c.kill();
                return c.wait().ok();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGSTOP: the process stays alive but does nothing (a long GC pause, a
    /// frozen VM); peers and clients see timeouts, not refused connections.
    pub fn pause(&mut self, i: usize) {
        self.signal(i, libc::SIGSTOP);
    }

    /// SIGCONT after [`ProcessCluster::pause`].
    pub fn resume(&mut self, i: usize) {
        self.signal(i, libc::SIGCONT);
    }

    fn signal(&self, i: usize, signal: i32) {
        if let Some(pid) = self.members[i].pid() {
            // SAFETY: plain kill(2) on a child pid we own and have not reaped.
            unsafe {
                libc::kill(pid as i32, signal);
            }
        }
    }

    /// Starts member `i` again on its existing data dir (same flags).
    pub fn restart(&mut self, i: usize) {
        self.spawn(i);
    }

    pub fn endpoints(&self) -> Vec<String> {
        self.members.iter().map(Member::endpoint).collect()
    }

    /// A client bound to member `i` only (no client-side failover).
    pub async fn client(&self, i: usize) -> Client {
        self.try_client(i).await.expect("connect client")
    }

    /// Like [`ProcessCluster::client`], for a member that may be down.
    pub async fn try_client(&self, i: usize) -> Result<Client, etcd_client::Error> {
        let opts = etcd_client::ConnectOptions::new()
            .with_connect_timeout(Duration::from_secs(2))
            .with_timeout(Duration::from_secs(10));
        Client::connect([self.members[i].endpoint()], Some(opts)).await
    }

    /// Status of member `i`: (leader id, raft term, applied index), if it answers.
    pub async fn status(&self, i: usize) -> Option<(u64, u64, u64)> {
        let mut c = tokio::time::timeout(Duration::from_secs(2), self.client(i)).await.ok()?;
        let s = tokio::time::timeout(Duration::from_secs(2), c.status()).await.ok()?.ok()?;
        Some((s.leader(), s.raft_term(), s.raft_applied_index()))
    }

    /// Waits until every running member reports the same leader; returns its index.
    pub async fn wait_leader(&self, timeout: Duration) -> usize {
        let deadline = Instant::now() + timeout;
        loop {
            let mut leaders = Vec::new();
            for (i, m) in self.members.iter().enumerate() {
                if m.is_running() {
                    leaders.push(self.status(i).await.map(|s| s.0).unwrap_or(0));
                }
            }
            if let Some(&l) = leaders.first() {
                if l != 0 && leaders.iter().all(|x| *x == l) {
                    if let Some(i) = self.member_index(l).await {
                        return i;
                    }
                }
            }
            if Instant::now() > deadline {
                self.dump_logs();
                panic!("no agreed leader within {timeout:?}: {leaders:?}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The member the running members agree is leader, if they do (one query
    /// round, no waiting).
    pub async fn leader_index(&self) -> Option<usize> {
        let mut leader = None;
        for (i, m) in self.members.iter().enumerate() {
            if m.is_running() {
                let l = self.status(i).await?.0;
                if l == 0 || leader.is_some_and(|x| x != l) {
                    return None;
                }
                leader = Some(l);
            }
        }
        self.member_index(leader?).await
    }

    /// Maps a member ID to its index via any running member's member list.
    pub async fn member_index(&self, id: u64) -> Option<usize> {
        for (i, m) in self.members.iter().enumerate() {
            if !m.is_running() {
                continue;
            }
            let Ok(mut c) = tokio::time::timeout(Duration::from_secs(2), self.client(i)).await else { continue };
            let Ok(Ok(list)) = tokio::time::timeout(Duration::from_secs(2), c.member_list()).await else { continue };
            let mm = list.members().iter().find(|mm| mm.id() == id)?;
            let url = mm.peer_urls().first()?;
            return (0..self.members.len()).position(|x| *url == self.peer_url(x));
        }
        None
    }

    /// Prints every member's log (for failing tests).
    pub fn dump_logs(&self) {
        for m in &self.members {
            let text = std::fs::read_to_string(&m.log_path).unwrap_or_default();
            let tail: Vec<&str> = text.lines().rev().take(60).collect();
            eprintln!("----- {} ({}) last lines -----", m.name, m.log_path.display());
            for l in tail.iter().rev() {
                eprintln!("{l}");
            }
        }
    }

    pub fn log_text(&self, i: usize) -> String {
        std::fs::read_to_string(&self.members[i].log_path).unwrap_or_default()
    }
}

impl Drop for ProcessCluster {
    fn drop(&mut self) {
        for i in 0..self.members.len() {
            self.kill(i);
        }
    }
}

/// A plain HTTP/1.1 GET on loopback: (status code, body).
pub fn http_get(port: u16, path: &str) -> std::io::Result<(u16, String)> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(s, "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")?;
    let mut raw = String::new();
    s.read_to_string(&mut raw)?;
    let code = raw.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    let body = raw.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
    Ok((code, body))
}

/// Retries `f` until it returns `Some` or `timeout` passes.
pub async fn eventually<T, F, Fut>(timeout: Duration, mut f: F) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f().await {
            return Some(v);
        }
        if Instant::now() > deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
