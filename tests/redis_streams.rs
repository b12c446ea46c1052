//! The Redis Streams gateway against the real thing and under faults.
//!
//! - The redis-py session in `tests/redis/streams_session.py` runs against
//!   redis-server 7 and against a 3-member concord (through a follower): every
//!   reply must be the same, except the section on other Redis data types
//!   (concord's Redis keyspace holds only streams, so `SET` is an unknown
//!   command there and the WRONGTYPE replies cannot arise).
//! - Writes with explicit ids across SIGKILLs of every member in turn: every
//!   acknowledged entry is there afterwards, exactly once, in order.
//!
//! Needs redis-server and Debian's python3-redis (`scripts/test` installs both).

use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use concord_testkit::{free_port, ClusterOptions, ProcessCluster};

const BIN: &str = env!("CARGO_BIN_EXE_concord");
/// Debian's python, which has python3-redis (a pyenv python first on PATH may not).
const PYTHON: &str = "/usr/bin/python3";

/// A redis-server on a free port, stopped on drop.
struct RedisServer {
    child: std::process::Child,
    port: u16,
}

impl RedisServer {
    fn start() -> RedisServer {
        let port = free_port();
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--save", "", "--appendonly", "no", "--bind", "127.0.0.1"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server is needed (apt-get install redis-server; scripts/test installs it)");
        wait_ping(port);
        RedisServer { child, port }
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One RESP reply, as far as these tests need: a status, an error, an
/// integer, a bulk string, or an array (kept as its element count).
#[derive(Debug, PartialEq)]
enum Resp {
    Status(String),
    Error(String),
    Int(i64),
    Bulk(Option<Vec<u8>>),
    Array(Vec<Resp>),
    Nil,
}

fn read_reply(r: &mut impl BufRead) -> std::io::Result<Resp> {
    let mut line = String::new();
    if r.read_line(&mut line)? == 0 {
        return Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "closed"));
    }
    let line = line.trim_end();
    let (kind, rest) = line.split_at(1);
    let bad = || std::io::Error::new(std::io::ErrorKind::InvalidData, line.to_string());
    Ok(match kind {
        "+" => Resp::Status(rest.into()),
        "-" => Resp::Error(rest.into()),
        ":" => Resp::Int(rest.parse().map_err(|_| bad())?),
        "$" => match rest.parse::<i64>().map_err(|_| bad())? {
            -1 => Resp::Bulk(None),
            n => {
                let mut b = vec![0; n as usize + 2];
                r.read_exact(&mut b)?;
                b.truncate(n as usize);
                Resp::Bulk(Some(b))
            }
        },
        "*" => match rest.parse::<i64>().map_err(|_| bad())? {
            -1 => Resp::Nil,
            n => (0..n).map(|_| read_reply(r)).collect::<Result<Vec<_>, _>>().map(Resp::Array)?,
        },
        "_" => Resp::Nil,
        _ => return Err(bad()),
    })
}

fn command(args: &[&[u8]]) -> Vec<u8> {
    let mut out = format!("*{}\r\n", args.len()).into_bytes();
    for a in args {
        out.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
        out.extend_from_slice(a);
        out.extend_from_slice(b"\r\n");
    }
    out
}

/// A connection with a per-call time limit.
struct Conn {
    reader: BufReader<TcpStream>,
    writer: TcpStream,
}

impl Conn {
    fn open(port: u16) -> std::io::Result<Conn> {
        let s = TcpStream::connect_timeout(&([127, 0, 0, 1], port).into(), Duration::from_secs(2))?;
        s.set_read_timeout(Some(Duration::from_secs(15)))?;
        s.set_write_timeout(Some(Duration::from_secs(15)))?;
        Ok(Conn { reader: BufReader::new(s.try_clone()?), writer: s })
    }

    fn call(&mut self, args: &[&[u8]]) -> std::io::Result<Resp> {
        self.writer.write_all(&command(args))?;
        read_reply(&mut self.reader)
    }
}

fn wait_ping(port: u16) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(Resp::Status(s)) = Conn::open(port).and_then(|mut c| c.call(&[b"PING"])) {
            if s == "PONG" {
                return;
            }
        }
        assert!(Instant::now() < deadline, "nothing answers PING on port {port}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A 3-member cluster whose members serve Redis on the returned ports.
fn cluster() -> (ProcessCluster, Vec<u16>) {
    cluster_of(3)
}

fn cluster_of(n: usize) -> (ProcessCluster, Vec<u16>) {
    let mut c = ProcessCluster::prepare(Path::new(BIN), n, ClusterOptions::default());
    let ports: Vec<u16> = (0..n).map(|_| free_port()).collect();
    for (i, port) in ports.iter().enumerate() {
        c.set_extra_args(i, vec!["--listen-redis-urls".into(), format!("redis://127.0.0.1:{port}")]);
        c.restart(i);
    }
    for port in &ports {
        wait_ping(*port);
    }
    (c, ports)
}

/// The session's output, by section (`# title` lines start one).
fn sections(output: &str) -> Vec<(String, Vec<String>)> {
    let mut out: Vec<(String, Vec<String>)> = vec![(String::new(), Vec::new())];
    for line in output.lines() {
        match line.strip_prefix("# ") {
            Some(title) => out.push((title.to_string(), Vec::new())),
            None => out.last_mut().expect("a section").1.push(line.to_string()),
        }
    }
    out
}

fn session(port: u16) -> String {
    let out = Command::new(PYTHON)
        .args([concat!(env!("CARGO_MANIFEST_DIR"), "/tests/redis/streams_session.py"), &format!("127.0.0.1:{port}")])
        .output()
        .expect("python3 with python3-redis is needed (scripts/test installs it)");
    assert!(out.status.success(), "session failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).expect("utf-8 output")
}

#[tokio::test(flavor = "multi_thread")]
async fn redis_py_session_matches_redis_7() {
    let redis = RedisServer::start();
    let (cluster, ports) = cluster();
    cluster.wait_leader(Duration::from_secs(20)).await;
    let expected = sections(&session(redis.port));
    // Through a member that need not lead the etcd store's group.
    let got = sections(&session(ports[1]));
    assert_eq!(expected.len(), got.len(), "the sessions have different sections");
    let mut compared = 0;
    for ((title, want), (_, have)) in expected.iter().zip(&got) {
        if title == "WRONGTYPE" {
            continue;
        }
        for (i, (w, h)) in want.iter().zip(have).enumerate() {
            if w != h {
                cluster.dump_logs();
            }
            assert_eq!(w, h, "section {title:?}, line {i}");
        }
        assert_eq!(want.len(), have.len(), "section {title:?} has a different number of replies");
        compared += want.len();
    }
    assert!(compared > 300, "only {compared} replies compared");
}

/// XADD with explicit ids 1..=N through any member, retrying a failed or
/// unanswered one (an "equal or smaller" error on a retry means the earlier
/// attempt was applied), while every member is SIGKILLed and restarted in turn.
#[tokio::test(flavor = "multi_thread")]
async fn acknowledged_entries_survive_kills_of_every_member() {
    const N: u64 = 1500;
    let (mut cluster, ports) = cluster();
    cluster.wait_leader(Duration::from_secs(20)).await;
    let (tx, rx) = std::sync::mpsc::channel::<u64>();
    let writer_ports = ports.clone();
    let writer = std::thread::spawn(move || {
        let mut acked = Vec::new();
        let mut conn: Option<Conn> = None;
        let mut which = 0;
        let deadline = Instant::now() + Duration::from_secs(150);
        for i in 1..=N {
            let id = format!("{i}-0");
            loop {
                assert!(Instant::now() < deadline, "writes stalled at {id}");
                let c = match conn.as_mut() {
                    Some(c) => c,
                    None => match Conn::open(writer_ports[which % 3]) {
                        Ok(c) => conn.insert(c),
                        Err(_) => {
                            which += 1;
                            std::thread::sleep(Duration::from_millis(50));
                            continue;
                        }
                    },
                };
                match c.call(&[b"XADD", b"orders", id.as_bytes(), b"n", i.to_string().as_bytes()]) {
                    Ok(Resp::Bulk(Some(b))) if b == id.as_bytes() => break,
                    Ok(Resp::Error(e)) if e.contains("equal or smaller") => break,
                    Ok(Resp::Error(_)) => std::thread::sleep(Duration::from_millis(50)),
                    Ok(other) => panic!("XADD {id}: {other:?}"),
                    Err(_) => {
                        conn = None;
                        which += 1;
                    }
                }
            }
            acked.push(i);
            let _ = tx.send(i);
        }
        acked
    });
    for (victim, port) in ports.iter().enumerate() {
        // Each kill lands while writes are going on.
        let target = (victim as u64 + 1) * N / 4;
        while rx.recv_timeout(Duration::from_secs(60)).expect("writer progress") < target {}
        cluster.kill(victim);
        tokio::time::sleep(Duration::from_millis(500)).await;
        cluster.restart(victim);
        wait_ping(*port);
    }
    let acked = tokio::task::spawn_blocking(move || writer.join().expect("writer")).await.expect("join");
    assert_eq!(acked.len() as u64, N);
    for port in &ports {
        let mut c = Conn::open(*port).expect("connect");
        assert_eq!(c.call(&[b"XLEN", b"orders"]).expect("xlen"), Resp::Int(N as i64), "member on {port}");
        let Resp::Array(entries) = c.call(&[b"XRANGE", b"orders", b"-", b"+"]).expect("xrange") else {
            panic!("XRANGE is no array");
        };
        let ids: Vec<Vec<u8>> = entries
            .into_iter()
            .map(|e| match e {
                Resp::Array(mut pair) => match pair.remove(0) {
                    Resp::Bulk(Some(id)) => id,
                    other => panic!("id {other:?}"),
                },
                other => panic!("entry {other:?}"),
            })
            .collect();
        let want: Vec<Vec<u8>> = (1..=N).map(|i| format!("{i}-0").into_bytes()).collect();
        assert_eq!(ids, want, "entries on the member serving {port}");
    }
    // Each member's /metrics shows the stream as its replica holds it.
    for m in &cluster.members {
        let (status, body) = concord_testkit::http_get(m.client_port, "/metrics").expect("metrics");
        assert_eq!(status, 200);
        assert!(body.contains("concord_streams 1\n"), "{body}");
        assert!(body.contains(&format!("concord_stream_entries{{stream=\"orders\"}} {N}\n")), "{body}");
        assert!(body.contains("concord_stream_pending_entries{stream=\"orders\"} 0\n"), "{body}");
    }
}

/// XREAD BLOCK wakes on an XADD from another connection (on another member),
/// and a consumer group hands each entry to one consumer.
#[tokio::test(flavor = "multi_thread")]
async fn blocked_reads_wake_and_groups_share_work() {
    let (cluster, ports) = cluster();
    cluster.wait_leader(Duration::from_secs(20)).await;
    let mut c0 = Conn::open(ports[0]).expect("connect");
    assert_eq!(c0.call(&[b"XADD", b"jobs", b"1-0", b"k", b"v"]).expect("xadd"), Resp::Bulk(Some(b"1-0".to_vec())));
    let port = ports[2];
    let blocked = std::thread::spawn(move || {
        let mut c = Conn::open(port).expect("connect");
        c.call(&[b"XREAD", b"BLOCK", b"20000", b"STREAMS", b"jobs", b"$"]).expect("xread")
    });
    std::thread::sleep(Duration::from_millis(500));
    c0.call(&[b"XADD", b"jobs", b"2-0", b"k", b"w"]).expect("xadd");
    let woke = blocked.join().expect("reader");
    let Resp::Array(streams) = woke else { panic!("XREAD BLOCK gave {woke:?}") };
    assert_eq!(streams.len(), 1);
    // Two consumers, one group: every entry delivered once.
    assert_eq!(c0.call(&[b"XGROUP", b"CREATE", b"jobs", b"workers", b"0"]).expect("create"), Resp::Status("OK".into()));
    let mut c1 = Conn::open(ports[1]).expect("connect");
    for i in 3..=10 {
        c0.call(&[b"XADD", b"jobs", format!("{i}-0").as_bytes(), b"k", b"v"]).expect("xadd");
    }
    let mut seen = Vec::new();
    for (c, name) in [(&mut c0, b"a".as_slice()), (&mut c1, b"b".as_slice())] {
        for _ in 0..5 {
            let r = c
                .call(&[b"XREADGROUP", b"GROUP", b"workers", name, b"COUNT", b"1", b"STREAMS", b"jobs", b">"])
                .expect("xreadgroup");
            if let Resp::Array(streams) = r {
                seen.push(format!("{streams:?}"));
            }
        }
    }
    assert_eq!(seen.len(), 10, "ten entries, ten deliveries");
    seen.sort();
    seen.dedup();
    assert_eq!(seen.len(), 10, "an entry was delivered twice");
    let pending = c1.call(&[b"XPENDING", b"jobs", b"workers"]).expect("xpending");
    let Resp::Array(summary) = pending else { panic!("{pending:?}") };
    assert_eq!(summary[0], Resp::Int(10));
}

/// With more members than a stream has replicas, a member that holds no replica
/// of a stream forwards its commands to one that does: the client sees the
/// same stream from every member.
#[tokio::test(flavor = "multi_thread")]
async fn members_without_a_replica_forward_to_one_with_it() {
    const STREAMS: usize = 40;
    let (cluster, ports) = cluster_of(4);
    cluster.wait_leader(Duration::from_secs(20)).await;
    let mut c0 = Conn::open(ports[0]).expect("connect");
    for s in 0..STREAMS {
        let key = format!("s{s}");
        assert_eq!(
            c0.call(&[b"XADD", key.as_bytes(), b"1-0", b"f", b"v"]).expect("xadd"),
            Resp::Bulk(Some(b"1-0".to_vec()))
        );
    }
    // Which streams member 3 holds no replica of (the catalog says).
    let mut client = cluster.client(0).await;
    let members = client.member_list().await.expect("member list");
    let m3 = members.members().iter().find(|m| m.name() == "m3").expect("m3").id();
    let out = Command::new(BIN)
        .args(["group", "ls", "--endpoints", &cluster.endpoints()[0]])
        .output()
        .expect("concord group ls");
    let listing = String::from_utf8_lossy(&out.stdout).to_string();
    let remote = listing
        .lines()
        .filter(|l| {
            l.contains(", stream, ") && !l.split(", ").nth(2).unwrap_or("").split(' ').any(|r| r == format!("{m3:x}"))
        })
        .count();
    assert!(remote > 0, "every stream has a replica on m3:\n{listing}");
    let mut c3 = Conn::open(ports[3]).expect("connect");
    for s in 0..STREAMS {
        let key = format!("s{s}");
        let k = key.as_bytes();
        // A field named like an option travels unchanged.
        assert_eq!(
            c3.call(&[b"XADD", k, b"2-0", b"BLOCK", b"0"]).expect("xadd"),
            Resp::Bulk(Some(b"2-0".to_vec())),
            "{key}"
        );
        assert_eq!(
            c3.call(&[b"XRANGE", k, b"2-0", b"2-0"]).expect("xrange"),
            Resp::Array(vec![Resp::Array(vec![
                Resp::Bulk(Some(b"2-0".to_vec())),
                Resp::Array(vec![Resp::Bulk(Some(b"BLOCK".to_vec())), Resp::Bulk(Some(b"0".to_vec()))]),
            ])]),
            "{key}"
        );
        assert_eq!(c3.call(&[b"XLEN", k]).expect("xlen"), Resp::Int(2), "{key}");
        assert_eq!(c3.call(&[b"XGROUP", b"CREATE", k, b"g", b"0"]).expect("group"), Resp::Status("OK".into()));
        let read = c3.call(&[b"XREADGROUP", b"GROUP", b"g", b"c", b"STREAMS", k, b">"]).expect("xreadgroup");
        let Resp::Array(streams) = read else { panic!("{key}: {read:?}") };
        assert_eq!(streams.len(), 1, "{key}");
        assert_eq!(c3.call(&[b"XACK", k, b"g", b"1-0", b"2-0"]).expect("xack"), Resp::Int(2), "{key}");
    }
    // A blocked read through m3 wakes on a write through m0.
    let port3 = ports[3];
    let blocked = std::thread::spawn(move || {
        let mut c = Conn::open(port3).expect("connect");
        (0..STREAMS)
            .map(|s| {
                let key = format!("s{s}");
                c.call(&[b"XREAD", b"BLOCK", b"0", b"STREAMS", key.as_bytes(), b"2-0"]).expect("xread")
            })
            .take(1)
            .collect::<Vec<_>>()
    });
    std::thread::sleep(Duration::from_millis(500));
    c0.call(&[b"XADD", b"s0", b"3-0", b"h", b"x"]).expect("xadd");
    let woke = blocked.join().expect("reader");
    assert!(matches!(&woke[0], Resp::Array(a) if a.len() == 1), "{woke:?}");
    // DEL and EXISTS over streams on different members, counted once each.
    let keys: Vec<Vec<u8>> = (0..STREAMS).map(|s| format!("s{s}").into_bytes()).collect();
    let mut exists: Vec<&[u8]> = vec![b"EXISTS"];
    exists.extend(keys.iter().map(Vec::as_slice));
    assert_eq!(c3.call(&exists).expect("exists"), Resp::Int(STREAMS as i64));
    let mut del: Vec<&[u8]> = vec![b"DEL"];
    del.extend(keys.iter().map(Vec::as_slice));
    assert_eq!(c3.call(&del).expect("del"), Resp::Int(STREAMS as i64));
    assert_eq!(c0.call(&exists).expect("exists"), Resp::Int(0));
}
