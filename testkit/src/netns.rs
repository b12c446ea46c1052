//! Hosts as Linux network namespaces, and the faults a network can have.
//!
//! A [`Network`] of `n` hosts is `n` namespaces `concord<slot>-h<i>`, each with one
//! interface `eth0` (address `10.123.<slot>.<10+i>/24`), plugged into a bridge in a
//! hub namespace `concord<slot>-hub`. The test process stays in the root namespace
//! and reaches every host through one more veth into the hub (`ccr<slot>`, address
//! `10.123.<slot>.1`): clients are never cut off by a partition, only members from
//! each other, as in Jepsen. The bridge lives in its own namespace rather than the
//! root one so that the root namespace's firewall (br_netfilter, a `FORWARD DROP`
//! policy from Docker) cannot interfere, and nothing in the root namespace but one
//! interface is touched.
//!
//! Faults are iptables rules in the *receiving* host's `INPUT` chain: a one-way
//! block drops what `from` sends to `to`; a partition blocks both ways between
//! every pair that straddles it; loss drops a random fraction of packets between
//! members. [`Network::heal`] flushes them all.
//!
//! Cleanup: [`Drop`] deletes every namespace (their interfaces go with them) and
//! the root-side interface. A test process killed before its drop runs leaves
//! them behind; the slot's reservation file names the owning pid, and every
//! [`Network::create`] removes the leftovers of slots whose owner is gone.
//!
//! Needs root, `ip` (iproute2) and `iptables`; [`unavailable`] says what is missing.

use std::io;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The second octet of every test network (`10.123.<slot>.0/24`); chosen to be
/// unlikely on real networks of a CI machine.
const NET_OCTET: u8 = 123;
/// Number of network slots: concurrent test processes each take one.
const SLOTS: u8 = 250;
/// Host `i` gets address `.<HOST_BASE + i>`; `.1` is the test process.
const HOST_BASE: u8 = 10;

/// Why network-namespace tests cannot run here, or `None` if they can.
pub fn unavailable() -> Option<String> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Some("network namespace tests need root".into());
    }
    for tool in ["ip", "iptables"] {
        if Command::new(tool).arg("-V").output().is_err() {
            return Some(format!("`{tool}` is not installed"));
        }
    }
    None
}

/// Runs a command, turning a non-zero exit into an error carrying its stderr.
fn run(program: &str, args: &[&str]) -> io::Result<()> {
    let out = Command::new(program).args(args).output()?;
    if out.status.success() {
        Ok(())
    } else {
        Err(io::Error::other(format!("{program} {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim())))
    }
}

/// A set of hosts on one bridge; see the module docs.
pub struct Network {
    slot: u8,
    hosts: usize,
    reservation: PathBuf,
}

impl Network {
    /// Creates `hosts` namespaces on a new bridge.
    pub fn create(hosts: usize) -> io::Result<Network> {
        assert!(hosts > 0 && hosts < 100, "hosts must be in 1..100");
        let dir = std::env::temp_dir().join("concord-test-nets");
        std::fs::create_dir_all(&dir)?;
        sweep(&dir);
        let first = (std::process::id() % u32::from(SLOTS)) as u8;
        for k in 0..SLOTS {
            let slot = ((u16::from(first) + u16::from(k)) % u16::from(SLOTS)) as u8;
            let reservation = dir.join(slot.to_string());
            if !claim(&reservation)? {
                continue;
            }
            remove_leftovers(slot);
            let net = Network { slot, hosts, reservation };
            net.build()?;
            return Ok(net);
        }
        Err(io::Error::other("every test network slot is in use"))
    }

    fn prefix(&self) -> String {
        format!("concord{}", self.slot)
    }

    fn hub(&self) -> String {
        format!("{}-hub", self.prefix())
    }

    /// Namespace of host `i`.
    pub fn namespace(&self, i: usize) -> String {
        format!("{}-h{i}", self.prefix())
    }

    /// Address of host `i`.
    pub fn ip(&self, i: usize) -> Ipv4Addr {
        Ipv4Addr::new(10, NET_OCTET, self.slot, HOST_BASE + i as u8)
    }

    /// Number of hosts.
    pub fn len(&self) -> usize {
        self.hosts
    }

    pub fn is_empty(&self) -> bool {
        self.hosts == 0
    }

    fn build(&self) -> io::Result<()> {
        let hub = self.hub();
        let subnet = |last: u8| format!("10.{NET_OCTET}.{}.{last}/24", self.slot);
        run("ip", &["netns", "add", &hub])?;
        run("ip", &["-n", &hub, "link", "set", "lo", "up"])?;
        run("ip", &["-n", &hub, "link", "add", "br0", "type", "bridge"])?;
        run("ip", &["-n", &hub, "link", "set", "br0", "up"])?;
        let root_link = format!("ccr{}", self.slot);
        run("ip", &["link", "add", &root_link, "type", "veth", "peer", "name", "up0", "netns", &hub])?;
        run("ip", &["-n", &hub, "link", "set", "up0", "master", "br0", "up"])?;
        run("ip", &["addr", "add", &subnet(1), "dev", &root_link])?;
        run("ip", &["link", "set", &root_link, "up"])?;
        for i in 0..self.hosts {
            let ns = self.namespace(i);
            let port = format!("h{i}");
            run("ip", &["netns", "add", &ns])?;
            run("ip", &["-n", &ns, "link", "set", "lo", "up"])?;
            run("ip", &["-n", &hub, "link", "add", &port, "type", "veth", "peer", "name", "eth0", "netns", &ns])?;
            run("ip", &["-n", &hub, "link", "set", &port, "master", "br0", "up"])?;
            run("ip", &["-n", &ns, "addr", "add", &subnet(HOST_BASE + i as u8), "dev", "eth0"])?;
            run("ip", &["-n", &ns, "link", "set", "eth0", "up"])?;
        }
        Ok(())
    }

    /// Runs iptables inside host `i`'s namespace.
    fn iptables(&self, i: usize, args: &[&str]) -> io::Result<()> {
        let ns = self.namespace(i);
        let mut full = vec!["netns", "exec", &ns, "iptables", "-w"];
        full.extend_from_slice(args);
        run("ip", &full)
    }

    /// Drops every packet host `from` sends to host `to` (one way).
    pub fn block(&self, from: usize, to: usize) -> io::Result<()> {
        self.iptables(to, &["-A", "INPUT", "-s", &self.ip(from).to_string(), "-j", "DROP"])
    }

    /// Cuts the hosts into the given groups: every pair of hosts in different
    /// groups is blocked both ways. Hosts in no group keep talking to everyone.
    pub fn partition(&self, groups: &[Vec<usize>]) -> io::Result<()> {
        for (g, a) in groups.iter().enumerate() {
            for b in groups.iter().skip(g + 1) {
                for &x in a {
                    for &y in b {
                        self.block(x, y)?;
                        self.block(y, x)?;
                    }
                }
            }
        }
        Ok(())
    }

    /// Drops each packet between two hosts with the given probability (0..1).
    pub fn lose(&self, probability: f64) -> io::Result<()> {
        assert!((0.0..=1.0).contains(&probability), "probability out of range: {probability}");
        let p = format!("{probability:.3}");
        for to in 0..self.hosts {
            for from in (0..self.hosts).filter(|&f| f != to) {
                let src = self.ip(from).to_string();
                let rule = ["-A", "INPUT", "-s", &src, "-m", "statistic", "--mode", "random", "--probability", &p];
                let mut args = rule.to_vec();
                args.extend_from_slice(&["-j", "DROP"]);
                self.iptables(to, &args)?;
            }
        }
        Ok(())
    }

    /// Removes every fault: all hosts talk to each other again.
    pub fn heal(&self) -> io::Result<()> {
        for i in 0..self.hosts {
            self.iptables(i, &["-F", "INPUT"])?;
        }
        Ok(())
    }
}

impl Drop for Network {
    fn drop(&mut self) {
        remove_leftovers(self.slot);
        let _ = std::fs::remove_file(&self.reservation);
    }
}

/// Whether the pid written in a reservation file is a live process.
fn owner_alive(path: &Path) -> bool {
    let owner = std::fs::read_to_string(path).unwrap_or_default();
    owner.trim().parse::<u32>().is_ok_and(|pid| Path::new(&format!("/proc/{pid}")).exists())
}

/// Removes the namespaces of every slot whose owning test process has died.
fn sweep(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    for entry in entries.flatten() {
        let Some(slot) = entry.file_name().to_str().and_then(|n| n.parse::<u8>().ok()) else { continue };
        // An empty file is a reservation being written right now.
        let written = entry.metadata().is_ok_and(|m| m.len() > 0);
        if written && !owner_alive(&entry.path()) {
            remove_leftovers(slot);
            let _ = std::fs::remove_file(entry.path());
        }
    }
}

/// Takes the reservation file of a slot if it is free or its owner is dead.
fn claim(path: &Path) -> io::Result<bool> {
    let create = || std::fs::OpenOptions::new().write(true).create_new(true).open(path);
    let mut file = match create() {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
            if owner_alive(path) || std::fs::remove_file(path).is_err() {
                return Ok(false);
            }
            match create() {
                Ok(f) => f,
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => return Ok(false),
                Err(e) => return Err(e),
            }
        }
        Err(e) => return Err(e),
    };
    use std::io::Write;
    write!(file, "{}", std::process::id())?;
    Ok(true)
}

/// Deletes a slot's namespaces and root-side interface, whoever made them.
fn remove_leftovers(slot: u8) {
    let prefix = format!("concord{slot}-");
    if let Ok(out) = Command::new("ip").args(["netns", "list"]).output() {
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            let name = line.split_whitespace().next().unwrap_or("");
            if name.starts_with(&prefix) {
                let _ = run("ip", &["netns", "del", name]);
            }
        }
    }
    let _ = Command::new("ip").args(["link", "del", &format!("ccr{slot}")]).output();
}
