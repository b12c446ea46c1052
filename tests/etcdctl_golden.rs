//! The etcdctl golden test: the same etcdctl 3.4 session (`tests/golden/kv.sh`)
//! runs against a real etcd 3.4 and against concord, started with the same flags on
//! the same ports one after the other, and the outputs must be identical after
//! normalising only raft terms, log timestamps and client connection ids. Member
//! and cluster IDs are not normalised: concord derives them as etcd does.
//!
//! Needs `etcd` and `etcdctl` 3.4 on PATH (`apt-get install etcd-server etcd-client`);
//! a missing binary fails the test rather than skipping it.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use concord_testkit::{free_port, single_member_command};

struct Server {
    child: Child,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start(bin: &Path, dir: &Path, client: u16, peer: u16) -> Server {
    let child = single_member_command(bin, "golden", dir, client, peer)
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {}: {e} (apt-get install etcd-server etcd-client)", bin.display()));
    let server = Server { child };
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let ok = Command::new("etcdctl")
            .args(["--endpoints", &format!("127.0.0.1:{client}"), "put", "golden-probe", "x"])
            .env("ETCDCTL_API", "3")
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false);
        if ok {
            // Remove the probe so both servers start the session from the same state.
            let out = Command::new("etcdctl")
                .args(["--endpoints", &format!("127.0.0.1:{client}"), "del", "golden-probe"])
                .env("ETCDCTL_API", "3")
                .output()
                .expect("etcdctl del");
            assert!(out.status.success());
            return server;
        }
        assert!(Instant::now() < deadline, "{} did not become ready", bin.display());
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn run_session(script: &str, client: u16) -> String {
    let script =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden").join(script)).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let mut out = String::new();
    for line in script.lines().filter(|l| !l.trim().is_empty() && !l.starts_with('#')) {
        let o = Command::new("sh")
            .arg("-c")
            .arg(format!("{line} 2>&1"))
            .env("ETCDCTL_API", "3")
            .env("ETCDCTL_ENDPOINTS", format!("127.0.0.1:{client}"))
            .env("GOLDEN_TMP", tmp.path())
            .stdin(Stdio::null())
            .output()
            .expect("run sh");
        out.push_str(&format!(
            "$ {line}\n{}[exit {}]\n",
            String::from_utf8_lossy(&o.stdout),
            o.status.code().unwrap_or(-1)
        ));
    }
    out
}

/// Replaces the value following `marker` (up to a delimiter) with `<X>`.
fn mask_after(s: &str, marker: &str, is_value: impl Fn(char) -> bool) -> String {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(pos) = rest.find(marker) {
        out.push_str(&rest[..pos + marker.len()]);
        rest = &rest[pos + marker.len()..];
        let end = rest.find(|c: char| !is_value(c)).unwrap_or(rest.len());
        out.push_str("<X>");
        rest = &rest[end..];
    }
    out.push_str(rest);
    out
}

/// Replaces every run of 12 to 16 lowercase hex digits that stands alone (lease
/// ids as etcdctl prints them, alone or in lock/election keys) with `<ID>`.
fn mask_hex_ids(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = String::with_capacity(s.len());
    let mut i = 0;
    while i < b.len() {
        let is_hex = |c: u8| c.is_ascii_digit() || (b'a'..=b'f').contains(&c);
        if is_hex(b[i]) && (i == 0 || !b[i - 1].is_ascii_alphanumeric()) {
            let mut j = i;
            while j < b.len() && is_hex(b[j]) {
                j += 1;
            }
            let alone = j == b.len() || !b[j].is_ascii_alphanumeric();
            let has_letter = b[i..j].iter().any(|c| c.is_ascii_alphabetic());
            if alone && (12..=16).contains(&(j - i)) && has_letter {
                out.push_str("<ID>");
                i = j;
                continue;
            }
            out.push_str(&s[i..j]);
            i = j;
            continue;
        }
        out.push(b[i] as char);
        i += 1;
    }
    out
}

/// etcd lists a lease's keys from a Go map, in random order: sort them.
fn sort_attached_keys(s: &str) -> String {
    s.lines()
        .map(|line| match line.split_once("attached keys([") {
            Some((head, rest)) => match rest.split_once("])") {
                Some((keys, tail)) => {
                    let mut keys: Vec<&str> = keys.split(' ').collect();
                    keys.sort_unstable();
                    format!("{head}attached keys([{}]){tail}", keys.join(" "))
                }
                None => line.to_string(),
            },
            None => line.to_string(),
        })
        .collect::<Vec<_>>()
        .join("\n")
}

fn normalise(s: &str) -> String {
    let digits = |c: char| c.is_ascii_digit();
    let s = sort_attached_keys(s);
    let s = mask_after(&s, "\"raft_term\":", digits);
    let s = mask_after(&s, "\"RaftTerm\" : ", digits);
    let s = mask_after(&s, "\"ts\":\"", |c| c != '"');
    let s = mask_after(&s, "endpoint://client-", |c| c.is_ascii_hexdigit() || c == '-');
    // A countdown read a few milliseconds apart can differ by a second on etcd itself.
    let s = mask_after(&s, "remaining(", digits);
    // Lease ids are chosen from clocks on both servers; decimal ones appear in JSON.
    let s = mask_after(&s, "\"lease\":", digits);
    // etcdctl prints member IDs with `%16x`: an ID below 2^60 gets a leading space.
    let mut s = mask_hex_ids(&s);
    while s.contains("Member  <ID>") {
        s = s.replace("Member  <ID>", "Member <ID>");
    }
    s
}

fn compare_session(script: &str) {
    let version = Command::new("etcd")
        .arg("--version")
        .output()
        .expect("etcd 3.4 must be installed (apt-get install etcd-server)");
    let version = String::from_utf8_lossy(&version.stdout).to_string();
    assert!(version.contains("etcd Version: 3.4."), "need etcd 3.4, found: {version}");
    let dir = tempfile::tempdir().unwrap();
    let (client, peer) = (free_port(), free_port());

    let etcd = start(Path::new("etcd"), &dir.path().join("etcd"), client, peer);
    let want = normalise(&run_session(script, client));
    drop(etcd);

    let concord = start(&PathBuf::from(env!("CARGO_BIN_EXE_concord")), &dir.path().join("concord"), client, peer);
    let got = normalise(&run_session(script, client));
    drop(concord);

    if let Ok(dir) = std::env::var("CONCORD_GOLDEN_DUMP") {
        std::fs::write(Path::new(&dir).join(format!("{script}.etcd")), &want).unwrap();
        std::fs::write(Path::new(&dir).join(format!("{script}.concord")), &got).unwrap();
    }
    if want != got {
        let w: Vec<&str> = want.lines().collect();
        let g: Vec<&str> = got.lines().collect();
        let mut report = String::new();
        for i in 0..w.len().max(g.len()) {
            if w.get(i) != g.get(i) {
                report.push_str(&format!("line {}:\n  etcd:    {:?}\n  concord: {:?}\n", i + 1, w.get(i), g.get(i)));
            }
        }
        panic!("etcdctl output differs from etcd 3.4:\n{report}");
    }
    println!("etcdctl golden {script}: {} lines identical to etcd 3.4", want.lines().count());
}

#[test]
fn kv_session_matches_etcd_3_4() {
    compare_session("kv.sh");
}

#[test]
fn watch_lease_lock_election_session_matches_etcd_3_4() {
    compare_session("coord.sh");
}

#[test]
fn cluster_operations_session_matches_etcd_3_4() {
    compare_session("ops.sh");
}

#[test]
fn auth_session_matches_etcd_3_4() {
    compare_session("auth.sh");
}
