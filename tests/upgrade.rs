//! Data directories written by earlier releases open in this one.
//!
//! `fixtures/datadir-pre-substrate.tar.gz` is a one-member data dir (member `fx`)
//! written by the release before the Raft runtime carried service-neutral log
//! entries, stopped with kill -9 right after these writes, so that its state file
//! holds none of them and every one is replayed from its log:
//! put /app/a one, put /app/b two, put /app/a three, del /app/b,
//! lease grant 600 + put --lease /held x, txn (value(/app/a) = three) put /app/c four.

use std::path::PathBuf;
use std::process::{Child, Command};
use std::time::Duration;

use concord_testkit::etcd_client::{Client, GetOptions};
use concord_testkit::{eventually, free_port, single_member_command};

fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_concord"))
}

struct Node(Child);

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

async fn connect(port: u16) -> Client {
    let endpoint = format!("http://127.0.0.1:{port}");
    eventually(Duration::from_secs(30), || {
        let endpoint = endpoint.clone();
        async move {
            let mut c = Client::connect([endpoint], None).await.ok()?;
            c.get("/", None).await.ok()?;
            Some(c)
        }
    })
    .await
    .expect("the upgraded member serves")
}

/// (key, value, create, mod revision, lease) under `/`, and the header revision.
async fn contents(c: &mut Client) -> (Vec<(String, String, i64, i64, bool)>, i64) {
    let resp = c.get("/", Some(GetOptions::new().with_prefix())).await.expect("get");
    let kvs = resp
        .kvs()
        .iter()
        .map(|kv| {
            let text = |b: &[u8]| String::from_utf8_lossy(b).to_string();
            (text(kv.key()), text(kv.value()), kv.create_revision(), kv.mod_revision(), kv.lease() != 0)
        })
        .collect();
    (kvs, resp.header().expect("header").revision())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_data_dir_from_the_previous_release_opens_with_its_data() {
    let dir = tempfile::tempdir().expect("tempdir");
    let fixture = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/datadir-pre-substrate.tar.gz");
    let status = Command::new("tar").arg("xzf").arg(&fixture).arg("-C").arg(dir.path()).status().expect("tar");
    assert!(status.success());
    let data = dir.path().join("data");
    let start = || {
        let port = free_port();
        let node = single_member_command(&bin(), "fx", &data, port, free_port()).spawn().expect("spawn");
        (Node(node), port)
    };

    let want = vec![
        ("/app/a".to_string(), "three".to_string(), 2, 4, false),
        ("/app/c".to_string(), "four".to_string(), 7, 7, false),
        ("/held".to_string(), "x".to_string(), 6, 6, true),
    ];
    let (node, port) = start();
    let mut c = connect(port).await;
    assert_eq!(contents(&mut c).await, (want.clone(), 7));
    let leases = c.leases().await.expect("leases");
    assert_eq!(leases.leases().len(), 1, "the lease survives");

    // Written by this release on top, then read back after a restart.
    c.put("/app/d", "five", None).await.expect("put");
    drop(c);
    drop(node);
    let (_node, port) = start();
    let mut c = connect(port).await;
    let mut want = want;
    want.insert(2, ("/app/d".to_string(), "five".to_string(), 8, 8, false));
    assert_eq!(contents(&mut c).await, (want, 8));
}
