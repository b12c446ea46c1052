//! The S3 API (`--listen-s3-urls`) against real S3 clients, each run as a
//! subprocess against a 3-member cluster of real processes, every member serving
//! S3 on a port of its own, the client talking to a member that is not the leader:
//! - boto3 (tests/s3/boto3_client.py), twice: with botocore's default
//!   `request_checksum_calculation` ("when_supported": a CRC32 with every upload)
//!   and with "when_required". Buckets, objects of 0 B to 100 MiB bit-exact,
//!   ranges, listing (v1 and v2, delimiter, pagination), copy, deletes, multipart
//!   (upload_fileobj and by hand: list_parts, abort, the completion errors),
//!   checksums (right ones accepted, wrong ones refused with nothing stored, also
//!   in an aws-chunked trailer) and signatures.
//! - s3cmd (Debian's `s3cmd`): mb, put, get, ls, a 100 MiB multipart put, cp,
//!   del, rb, files compared with `cmp`.
//! - rclone (Debian's `rclone`): mkdir, copyto (small and 100 MiB multipart),
//!   cat, copyto back, lsf, check, server-side copy, deletefile, rmdir.
//!
//! Needs s3cmd, rclone and python3 with venv (`scripts/test` installs them, and
//! creates the boto3 venv at ~/.cache/concord-s3-test/venv; a test creates it
//! when it is missing). A missing tool fails the test, naming what to install.

use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use concord_testkit::workload::SeededRng;
use concord_testkit::{free_port, ClusterOptions, ProcessCluster};

const BIN: &str = env!("CARGO_BIN_EXE_concord");
const MIB: usize = 1 << 20;

/// A 3-member cluster serving S3 on every member, and an access key.
struct S3Cluster {
    cluster: ProcessCluster,
    s3_ports: Vec<u16>,
    /// A member that is not the leader: the clients talk to it.
    via: usize,
    /// The third member (neither leader nor `via`).
    other: usize,
    key_id: String,
    secret: String,
}

impl S3Cluster {
    async fn start() -> S3Cluster {
        let mut cluster = ProcessCluster::prepare(Path::new(BIN), 3, ClusterOptions::default());
        let s3_ports: Vec<u16> = (0..3).map(|_| free_port()).collect();
        for (i, port) in s3_ports.iter().enumerate() {
            cluster.set_extra_args(i, vec!["--listen-s3-urls".into(), format!("http://127.0.0.1:{port}")]);
            cluster.restart(i);
        }
        let leader = cluster.wait_leader(Duration::from_secs(30)).await;
        let (via, other) = ((leader + 1) % 3, (leader + 2) % 3);
        let (key_id, secret) = create_key(&cluster, via);
        for &port in &s3_ports {
            wait_port(&cluster, port);
        }
        S3Cluster { cluster, s3_ports, via, other, key_id, secret }
    }

    fn endpoint(&self, i: usize) -> String {
        format!("http://127.0.0.1:{}", self.s3_ports[i])
    }

    /// Fails the test if a member exited by itself.
    fn assert_alive(&mut self) {
        let crashed = self.cluster.crashed();
        if !crashed.is_empty() {
            self.cluster.dump_logs();
            panic!("members exited during the test: {crashed:?}");
        }
    }
}

/// `concord blob keys create -w json` through member `i`, retried while the
/// cluster settles: (access key id, secret access key).
fn create_key(cluster: &ProcessCluster, i: usize) -> (String, String) {
    let endpoint = format!("127.0.0.1:{}", cluster.members[i].client_port);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let out = Command::new(BIN)
            .args(["blob", "keys", "create", "--endpoints", &endpoint, "-w", "json"])
            .output()
            .expect("run concord blob keys create");
        let stdout = String::from_utf8_lossy(&out.stdout);
        if out.status.success() {
            let v: serde_json::Value = serde_json::from_str(stdout.trim())
                .unwrap_or_else(|e| panic!("`blob keys create -w json` printed no JSON ({e}): {stdout}"));
            let field = |name: &str| {
                v[name].as_str().unwrap_or_else(|| panic!("`blob keys create -w json`: no {name} in {v}")).to_string()
            };
            return (field("access_key_id"), field("secret_access_key"));
        }
        if Instant::now() > deadline {
            cluster.dump_logs();
            panic!(
                "concord blob keys create failed: {}\nstdout: {stdout}\nstderr: {}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn wait_port(cluster: &ProcessCluster, port: u16) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        if Instant::now() > deadline {
            cluster.dump_logs();
            panic!("nothing listens on the S3 port {port}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// What a finished client run printed.
struct Run {
    status: ExitStatus,
    stdout: PathBuf,
    stderr: String,
}

impl Run {
    fn stdout_text(&self) -> String {
        String::from_utf8_lossy(&std::fs::read(&self.stdout).unwrap_or_default()).into_owned()
    }

    fn describe(&self) -> String {
        let out = self.stdout_text();
        let out: String = if out.len() > 20_000 { format!("...{}", &out[out.len() - 20_000..]) } else { out };
        format!("exit status {}\n--- stdout ---\n{out}\n--- stderr ---\n{}", self.status, self.stderr)
    }
}

/// Runs `cmd` with its output in files under `dir` (named after `what`), killing
/// it after `timeout`. A program that is not installed fails the test with
/// `install` as the advice.
fn run(dir: &Path, what: &str, cmd: &mut Command, timeout: Duration, install: &str) -> Run {
    static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let stdout = dir.join(format!("run-{n}.out"));
    let stderr = dir.join(format!("run-{n}.err"));
    let mut child = match cmd
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&stdout).expect("stdout file"))
        .stderr(std::fs::File::create(&stderr).expect("stderr file"))
        .spawn()
    {
        Ok(c) => c,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            panic!("{what}: {:?} is not installed: {install}", cmd.get_program())
        }
        Err(e) => panic!("{what}: cannot run {:?}: {e}", cmd.get_program()),
    };
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(st) = child.try_wait().expect("wait for the client") {
            break st;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            let r = Run {
                status: ExitStatus::default(),
                stdout,
                stderr: std::fs::read_to_string(&stderr).unwrap_or_default(),
            };
            panic!("{what}: still running after {timeout:?}, killed\n{}", r.describe());
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    Run { status, stdout, stderr: std::fs::read_to_string(&stderr).unwrap_or_default() }
}

/// Like [`run`], and fails the test (with the members' logs) unless the command
/// exits 0.
fn run_ok(s3: &S3Cluster, dir: &Path, what: &str, cmd: &mut Command, timeout: Duration, install: &str) -> Run {
    let r = run(dir, what, cmd, timeout, install);
    if !r.status.success() {
        s3.cluster.dump_logs();
        panic!("{what} failed: {}", r.describe());
    }
    r
}

/// Asserts two files are identical with `cmp`.
fn assert_same_file(a: &Path, b: &Path, what: &str) {
    let out = Command::new("cmp").arg(a).arg(b).output().expect("run cmp (diffutils)");
    assert!(
        out.status.success(),
        "{what}: {} and {} differ: {}{}",
        a.display(),
        b.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A command for a client program, with no AWS or rclone settings from the
/// environment (a CA bundle, a profile, an endpoint, checksum settings).
fn client_command(program: impl AsRef<std::ffi::OsStr>) -> Command {
    let mut c = Command::new(program);
    for (k, _) in std::env::vars_os() {
        let k = k.to_string_lossy();
        if k.starts_with("AWS_") || k.starts_with("RCLONE_") {
            c.env_remove(&*k);
        }
    }
    c
}

fn random_file(path: &Path, seed: u64, len: usize) {
    let mut rng = SeededRng::new(seed);
    let mut data = Vec::with_capacity(len + 8);
    while data.len() < len {
        data.extend_from_slice(&rng.next_u64().to_le_bytes());
    }
    data.truncate(len);
    std::fs::write(path, data).expect("write a test file");
}

// ----- boto3 -----

/// The python of the boto3 venv at ~/.cache/concord-s3-test/venv, created (with
/// `python3 -m venv` and `pip install boto3`) when it is missing or broken.
fn boto3_python() -> PathBuf {
    let home = std::env::var_os("HOME").expect("HOME is set");
    let dir = Path::new(&home).join(".cache").join("concord-s3-test");
    let python = dir.join("venv").join("bin").join("python");
    let has_boto3 = |py: &Path| {
        Command::new(py)
            .args(["-c", "import boto3"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    if has_boto3(&python) {
        return python;
    }
    std::fs::create_dir_all(&dir).expect("create ~/.cache/concord-s3-test");
    // One creator at a time (other tests, other test processes).
    let lock = std::fs::File::create(dir.join("lock")).expect("venv lock file");
    lock.lock().expect("lock the venv lock file");
    if has_boto3(&python) {
        return python;
    }
    eprintln!("creating the boto3 venv in {}", dir.join("venv").display());
    let venv =
        Command::new("python3").args(["-m", "venv", "--clear"]).arg(dir.join("venv")).output().unwrap_or_else(|e| {
            panic!("python3 is needed for the boto3 test ({e}): apt-get install python3 python3-venv")
        });
    assert!(
        venv.status.success(),
        "python3 -m venv failed (apt-get install python3-venv; scripts/test sets the venv up): {}",
        String::from_utf8_lossy(&venv.stderr)
    );
    let pip = Command::new(dir.join("venv").join("bin").join("pip"))
        .args(["install", "-q", "boto3"])
        .output()
        .expect("run the venv's pip");
    assert!(
        pip.status.success(),
        "pip install boto3 into {} failed: {}",
        dir.join("venv").display(),
        String::from_utf8_lossy(&pip.stderr)
    );
    assert!(has_boto3(&python), "boto3 still not importable from {}", python.display());
    python
}

async fn boto3(mode: &str) {
    let python = boto3_python();
    let mut s3 = S3Cluster::start().await;
    let dir = tempfile::tempdir().expect("temp dir");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests").join("s3").join("boto3_client.py");
    let mut cmd = client_command(&python);
    cmd.arg(&script)
        .args([&s3.endpoint(s3.via), &s3.key_id, &s3.secret, mode, &s3.endpoint(s3.other)])
        .env("PYTHONUNBUFFERED", "1")
        // Nothing from the user's AWS configuration files.
        .env("AWS_CONFIG_FILE", "/dev/null")
        .env("AWS_SHARED_CREDENTIALS_FILE", "/dev/null");
    let r = run(dir.path(), &format!("boto3 ({mode})"), &mut cmd, Duration::from_secs(150), "");
    eprintln!("{}", r.stdout_text());
    if !r.status.success() {
        s3.cluster.dump_logs();
        panic!("boto3 client ({mode}) failed: {}", r.describe());
    }
    s3.assert_alive();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn boto3_with_default_checksums() {
    boto3("when_supported").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn boto3_with_checksums_when_required() {
    boto3("when_required").await;
}

// ----- s3cmd -----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3cmd_round_trip() {
    const INSTALL: &str = "apt-get install s3cmd (scripts/test installs it)";
    let dir = tempfile::tempdir().expect("temp dir");
    let d = dir.path();
    // Before the cluster: a missing s3cmd fails at once.
    run(d, "s3cmd --version", Command::new("s3cmd").arg("--version"), Duration::from_secs(30), INSTALL);
    let mut s3 = S3Cluster::start().await;
    let config = include_str!("s3/s3cmd.cfg.in")
        .replace("@ACCESS_KEY@", &s3.key_id)
        .replace("@SECRET_KEY@", &s3.secret)
        .replace("@HOST@", &format!("127.0.0.1:{}", s3.s3_ports[s3.via]));
    let cfg = d.join("s3cmd.cfg");
    std::fs::write(&cfg, config).expect("write the s3cmd config");
    let (small, big) = (d.join("small.bin"), d.join("big.bin"));
    random_file(&small, 1, 300_001);
    random_file(&big, 2, 100 * MIB);
    let t = Duration::from_secs(60);
    let s3cmd = |args: &[&str]| {
        let mut c = client_command("s3cmd");
        c.arg("-c").arg(&cfg).arg("--no-progress").args(args).env("HOME", d);
        c
    };
    let p = |p: &Path| p.display().to_string();

    run_ok(&s3, d, "s3cmd mb", &mut s3cmd(&["mb", "s3://s3cmd-test"]), t, INSTALL);
    let ls = run_ok(&s3, d, "s3cmd ls", &mut s3cmd(&["ls"]), t, INSTALL).stdout_text();
    assert!(ls.contains("s3://s3cmd-test"), "s3cmd ls does not list the new bucket:\n{ls}");

    run_ok(&s3, d, "s3cmd put small", &mut s3cmd(&["put", &p(&small), "s3://s3cmd-test/small.bin"]), t, INSTALL);
    let back = d.join("small.back");
    run_ok(
        &s3,
        d,
        "s3cmd get small",
        &mut s3cmd(&["get", "--force", "s3://s3cmd-test/small.bin", &p(&back)]),
        t,
        INSTALL,
    );
    assert_same_file(&small, &back, "s3cmd get of the small object");

    let mut put_big =
        s3cmd(&["put", "--progress", "--multipart-chunk-size-mb=15", &p(&big), "s3://s3cmd-test/dir/big.bin"]);
    let r = run_ok(&s3, d, "s3cmd put 100 MiB", &mut put_big, Duration::from_secs(120), INSTALL);
    let said = r.stdout_text();
    assert!(said.contains("[part 7 of 7, 10MB]"), "s3cmd did not put the 100 MiB file in 7 parts:\n{said}");
    // Listed at once, with its size.
    let ls = run_ok(&s3, d, "s3cmd ls big", &mut s3cmd(&["ls", "s3://s3cmd-test/dir/big.bin"]), t, INSTALL);
    let ls = ls.stdout_text();
    assert!(
        ls.contains(&format!(" {}  s3://s3cmd-test/dir/big.bin", 100 * MIB)),
        "s3cmd ls s3://s3cmd-test/dir/big.bin right after the put: no object of {} bytes:\n{ls}",
        100 * MIB
    );
    // For a multipart object s3cmd shows the MD5 it stored in its metadata (a HEAD).
    let md5: String = {
        use md5::{Digest, Md5};
        Md5::digest(std::fs::read(&big).expect("read big.bin")).iter().map(|b| format!("{b:02x}")).collect()
    };
    let mut ls_md5 = s3cmd(&["ls", "--list-md5", "s3://s3cmd-test/dir/big.bin"]);
    let ls = run_ok(&s3, d, "s3cmd ls --list-md5", &mut ls_md5, t, INSTALL).stdout_text();
    assert!(ls.contains(&md5), "s3cmd ls --list-md5: not the MD5 {md5} of the 100 MiB file:\n{ls}");
    let back_big = d.join("big.back");
    let mut get_big = s3cmd(&["get", "--force", "s3://s3cmd-test/dir/big.bin", &p(&back_big)]);
    run_ok(&s3, d, "s3cmd get 100 MiB", &mut get_big, Duration::from_secs(120), INSTALL);
    assert_same_file(&big, &back_big, "s3cmd get of the 100 MiB multipart object");

    let ls = run_ok(&s3, d, "s3cmd ls bucket", &mut s3cmd(&["ls", "s3://s3cmd-test"]), t, INSTALL).stdout_text();
    assert!(
        ls.contains("s3://s3cmd-test/small.bin") && ls.contains("s3://s3cmd-test/dir/"),
        "s3cmd ls s3://s3cmd-test:\n{ls}"
    );
    assert!(!ls.contains("big.bin"), "s3cmd ls s3://s3cmd-test (delimiter /) shows a key under dir/:\n{ls}");
    let ls = run_ok(&s3, d, "s3cmd ls -r", &mut s3cmd(&["ls", "-r", "s3://s3cmd-test"]), t, INSTALL).stdout_text();
    let big_line = ls.lines().find(|l| l.ends_with("s3://s3cmd-test/dir/big.bin"));
    assert!(
        big_line.is_some_and(|l| l.split_whitespace().nth(2) == Some(&(100 * MIB).to_string())),
        "s3cmd ls -r: no dir/big.bin of {} bytes:\n{ls}",
        100 * MIB
    );

    let mut cp = s3cmd(&["cp", "s3://s3cmd-test/small.bin", "s3://s3cmd-test/copy.bin"]);
    run_ok(&s3, d, "s3cmd cp", &mut cp, t, INSTALL);
    let back_copy = d.join("copy.back");
    run_ok(
        &s3,
        d,
        "s3cmd get copy",
        &mut s3cmd(&["get", "--force", "s3://s3cmd-test/copy.bin", &p(&back_copy)]),
        t,
        INSTALL,
    );
    assert_same_file(&small, &back_copy, "s3cmd get of the copy");

    let rb = run(d, "s3cmd rb (not empty)", &mut s3cmd(&["rb", "s3://s3cmd-test"]), t, INSTALL);
    assert!(!rb.status.success(), "s3cmd rb of a non-empty bucket succeeded");
    assert!(rb.stderr.contains("BucketNotEmpty"), "s3cmd rb of a non-empty bucket: {}", rb.describe());

    run_ok(&s3, d, "s3cmd del", &mut s3cmd(&["del", "s3://s3cmd-test/small.bin"]), t, INSTALL);
    let ls = run_ok(&s3, d, "s3cmd ls -r", &mut s3cmd(&["ls", "-r", "s3://s3cmd-test"]), t, INSTALL).stdout_text();
    assert!(!ls.contains("small.bin") && ls.contains("copy.bin"), "s3cmd ls -r after del small.bin:\n{ls}");
    let mut del = s3cmd(&["del", "s3://s3cmd-test/copy.bin", "s3://s3cmd-test/dir/big.bin"]);
    run_ok(&s3, d, "s3cmd del two", &mut del, t, INSTALL);
    let gone = run(
        d,
        "s3cmd get deleted",
        &mut s3cmd(&["get", "--force", "s3://s3cmd-test/copy.bin", &p(&back_copy)]),
        t,
        INSTALL,
    );
    assert!(!gone.status.success(), "s3cmd get of a deleted object succeeded");
    run_ok(&s3, d, "s3cmd rb", &mut s3cmd(&["rb", "s3://s3cmd-test"]), t, INSTALL);
    let ls = run_ok(&s3, d, "s3cmd ls", &mut s3cmd(&["ls"]), t, INSTALL).stdout_text();
    assert!(!ls.contains("s3://s3cmd-test"), "s3cmd ls still lists the removed bucket:\n{ls}");
    s3.assert_alive();
}

// ----- rclone -----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rclone_round_trip() {
    const INSTALL: &str = "apt-get install rclone (scripts/test installs it)";
    let dir = tempfile::tempdir().expect("temp dir");
    let d = dir.path();
    run(d, "rclone version", Command::new("rclone").arg("version"), Duration::from_secs(30), INSTALL);
    let mut s3 = S3Cluster::start().await;
    let src = d.join("src");
    std::fs::create_dir(&src).expect("mkdir src");
    let (small, big) = (src.join("small.bin"), src.join("big.bin"));
    random_file(&small, 3, 123_457);
    random_file(&big, 4, 100 * MIB);
    let endpoint = s3.endpoint(s3.via);
    let config = d.join("rclone.conf");
    let rclone = |args: &[&str]| {
        let mut c = client_command("rclone");
        c.arg("--config")
            .arg(&config)
            .args(["--retries", "1", "--low-level-retries", "1", "--contimeout", "10s", "--timeout", "60s"])
            .args(args)
            .env("RCLONE_CONFIG_C_TYPE", "s3")
            .env("RCLONE_CONFIG_C_PROVIDER", "Other")
            .env("RCLONE_CONFIG_C_ENDPOINT", &endpoint)
            .env("RCLONE_CONFIG_C_ACCESS_KEY_ID", &s3.key_id)
            .env("RCLONE_CONFIG_C_SECRET_ACCESS_KEY", &s3.secret)
            .env("RCLONE_CONFIG_C_REGION", "us-east-1")
            .env("RCLONE_CONFIG_C_FORCE_PATH_STYLE", "true")
            // 100 MiB goes up in 7 parts of 16 MiB.
            .env("RCLONE_CONFIG_C_UPLOAD_CUTOFF", "16M")
            .env("RCLONE_CONFIG_C_CHUNK_SIZE", "16M")
            .env("HOME", d);
        c
    };
    let t = Duration::from_secs(60);
    let p = |p: &Path| p.display().to_string();

    run_ok(&s3, d, "rclone mkdir", &mut rclone(&["mkdir", "c:rclone-test"]), t, INSTALL);
    let buckets = run_ok(&s3, d, "rclone lsf c:", &mut rclone(&["lsf", "c:"]), t, INSTALL).stdout_text();
    assert!(buckets.lines().any(|l| l == "rclone-test/"), "rclone lsf c: does not list the bucket:\n{buckets}");
    run_ok(&s3, d, "rclone copyto small", &mut rclone(&["copyto", &p(&small), "c:rclone-test/small.bin"]), t, INSTALL);
    let r = run_ok(
        &s3,
        d,
        "rclone copyto 100 MiB",
        &mut rclone(&["copyto", "-v", &p(&big), "c:rclone-test/big.bin"]),
        Duration::from_secs(120),
        INSTALL,
    );
    eprintln!("rclone copyto 100 MiB: {}", r.stderr);

    let cat = run_ok(&s3, d, "rclone cat", &mut rclone(&["cat", "c:rclone-test/small.bin"]), t, INSTALL);
    assert_same_file(&small, &cat.stdout, "rclone cat of the small object");
    let back = d.join("big.back");
    let mut get_big = rclone(&["copyto", "c:rclone-test/big.bin", &p(&back)]);
    run_ok(&s3, d, "rclone copyto back 100 MiB", &mut get_big, Duration::from_secs(120), INSTALL);
    assert_same_file(&big, &back, "rclone copyto back of the 100 MiB multipart object");

    let lsf = run_ok(&s3, d, "rclone lsf", &mut rclone(&["lsf", "c:rclone-test"]), t, INSTALL).stdout_text();
    assert_eq!(lsf, "big.bin\nsmall.bin\n", "rclone lsf c:rclone-test");
    let lsl = run_ok(&s3, d, "rclone lsf sizes", &mut rclone(&["lsf", "--format", "ps", "c:rclone-test"]), t, INSTALL);
    assert_eq!(lsl.stdout_text(), format!("big.bin;{}\nsmall.bin;123457\n", 100 * MIB), "rclone lsf --format ps");
    let mut check = rclone(&["check", &p(&src), "c:rclone-test"]);
    let r = run_ok(&s3, d, "rclone check", &mut check, Duration::from_secs(120), INSTALL);
    eprintln!("rclone check: {}", r.stderr);

    let mut copy = rclone(&["copyto", "c:rclone-test/small.bin", "c:rclone-test/copy.bin"]);
    run_ok(&s3, d, "rclone server-side copyto", &mut copy, t, INSTALL);
    let cat = run_ok(&s3, d, "rclone cat copy", &mut rclone(&["cat", "c:rclone-test/copy.bin"]), t, INSTALL);
    assert_same_file(&small, &cat.stdout, "rclone cat of the server-side copy");

    run_ok(&s3, d, "rclone deletefile", &mut rclone(&["deletefile", "c:rclone-test/small.bin"]), t, INSTALL);
    let lsf = run_ok(&s3, d, "rclone lsf", &mut rclone(&["lsf", "c:rclone-test"]), t, INSTALL).stdout_text();
    assert_eq!(lsf, "big.bin\ncopy.bin\n", "rclone lsf after deletefile small.bin");
    let rmdir = run(d, "rclone rmdir (not empty)", &mut rclone(&["rmdir", "c:rclone-test"]), t, INSTALL);
    assert!(!rmdir.status.success(), "rclone rmdir of a non-empty bucket succeeded: {}", rmdir.describe());
    run_ok(&s3, d, "rclone deletefile", &mut rclone(&["deletefile", "c:rclone-test/copy.bin"]), t, INSTALL);
    run_ok(&s3, d, "rclone deletefile", &mut rclone(&["deletefile", "c:rclone-test/big.bin"]), t, INSTALL);
    run_ok(&s3, d, "rclone rmdir", &mut rclone(&["rmdir", "c:rclone-test"]), t, INSTALL);
    let buckets = run_ok(&s3, d, "rclone lsf c:", &mut rclone(&["lsf", "c:"]), t, INSTALL).stdout_text();
    assert!(!buckets.contains("rclone-test"), "rclone lsf c: still lists the removed bucket:\n{buckets}");
    s3.assert_alive();
}
