//! The JSON gateway with raw HTTP/1.1 requests (what curl sends), and hostile
//! input on the client port: garbage bytes, silent connections, oversized bodies.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::time::{Duration, Instant};

use concord_testkit::{ClusterOptions, ProcessCluster};

fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_concord"))
}

fn request(port: u16, path: &str, body: &str, token: Option<&str>) -> TcpStream {
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let auth = token.map(|t| format!("Authorization: {t}\r\n")).unwrap_or_default();
    write!(
        s,
        "POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n{auth}Content-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    s
}

/// POSTs `body` and returns (HTTP status, parsed JSON body).
fn post(port: u16, path: &str, body: &str, token: Option<&str>) -> (u16, serde_json::Value) {
    let mut s = request(port, path, body, token);
    write!(s, "").unwrap();
    let mut reader = BufReader::new(s);
    let mut status_line = String::new();
    reader.read_line(&mut status_line).unwrap();
    let status: u16 = status_line.split(' ').nth(1).and_then(|c| c.parse().ok()).expect("status");
    let mut length = 0usize;
    loop {
        let mut line = String::new();
        reader.read_line(&mut line).unwrap();
        if line == "\r\n" {
            break;
        }
        if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
            length = v.trim().parse().unwrap();
        }
    }
    let mut buf = vec![0; length];
    reader.read_exact(&mut buf).unwrap();
    (status, serde_json::from_slice(&buf).unwrap_or(serde_json::Value::Null))
}

fn b64(s: &str) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(s)
}

#[tokio::test(flavor = "multi_thread")]
async fn json_gateway_serves_kv_watch_lease_and_auth() {
    let cluster = ProcessCluster::start(bin(), 1, ClusterOptions::default());
    cluster.wait_leader(Duration::from_secs(20)).await;
    let port = cluster.members[0].client_port;

    let (status, r) =
        post(port, "/v3/kv/put", &format!(r#"{{"key":"{}","value":"{}"}}"#, b64("foo"), b64("bar")), None);
    assert_eq!(status, 200, "{r}");
    assert_eq!(r["header"]["revision"], "2", "int64 fields are strings: {r}");
    let (_, r) = post(port, "/v3/kv/range", &format!(r#"{{"key":"{}"}}"#, b64("foo")), None);
    assert_eq!(r["kvs"][0]["value"], b64("bar"));
    assert_eq!(r["count"], "1");
    let txn = format!(
        r#"{{"compare":[{{"key":"{k}","target":"VALUE","result":"EQUAL","value":"{v}"}}],"success":[{{"request_put":{{"key":"{k}","value":"{n}"}}}}]}}"#,
        k = b64("foo"),
        v = b64("bar"),
        n = b64("baz")
    );
    let (status, r) = post(port, "/v3/kv/txn", &txn, None);
    assert_eq!((status, &r["succeeded"]), (200, &serde_json::json!(true)), "{r}");

    // Errors: etcd's message and gRPC code, grpc-gateway's HTTP status.
    let (status, r) = post(port, "/v3/kv/range", r#"{"key":""}"#, None);
    assert_eq!(
        (status, r["code"].as_i64(), r["error"].as_str()),
        (400, Some(3), Some("etcdserver: key is not provided"))
    );
    let (status, r) = post(port, "/v3/kv/range", "garbage", None);
    assert_eq!((status, r["code"].as_i64()), (400, Some(3)), "{r}");
    let (status, r) = post(port, "/v3/kv/range", &format!(r#"{{"key":"{}","revision":"99"}}"#, b64("foo")), None);
    assert_eq!((status, r["code"].as_i64()), (400, Some(11)), "{r}");

    // A watch streams one {"result": ...} line per response.
    let watch = request(port, "/v3/watch", &format!(r#"{{"create_request":{{"key":"{}"}}}}"#, b64("w")), None);
    let mut lines = BufReader::new(watch);
    let mut created = String::new();
    while !created.contains("\"created\":true") {
        created.clear();
        lines.read_line(&mut created).unwrap();
    }
    post(port, "/v3/kv/put", &format!(r#"{{"key":"{}","value":"{}"}}"#, b64("w"), b64("1")), None);
    let mut event = String::new();
    while !event.contains("\"events\"") {
        event.clear();
        lines.read_line(&mut event).unwrap();
    }
    assert!(event.contains(&b64("1")), "{event}");

    let (_, r) = post(port, "/v3/lease/grant", r#"{"TTL":"30"}"#, None);
    let id = r["ID"].as_str().expect("lease id").to_string();
    let (_, r) = post(port, "/v3/lease/timetolive", &format!(r#"{{"ID":"{id}"}}"#), None);
    assert_eq!(r["grantedTTL"], "30", "{r}");

    // Auth through JSON only: the token goes in the Authorization header.
    post(port, "/v3/auth/user/add", r#"{"name":"root","password":"pw"}"#, None);
    post(port, "/v3/auth/user/grant", r#"{"user":"root","role":"root"}"#, None);
    let (status, r) = post(port, "/v3/auth/enable", "{}", None);
    assert_eq!(status, 200, "{r}");
    let (status, r) = post(port, "/v3/kv/range", &format!(r#"{{"key":"{}"}}"#, b64("foo")), None);
    assert_eq!((status, r["error"].as_str()), (400, Some("etcdserver: user name is empty")));
    let (_, r) = post(port, "/v3/auth/authenticate", r#"{"name":"root","password":"pw"}"#, None);
    let token = r["token"].as_str().expect("token").to_string();
    let (status, r) = post(port, "/v3/kv/range", &format!(r#"{{"key":"{}"}}"#, b64("foo")), Some(&token));
    assert_eq!((status, &r["kvs"][0]["value"]), (200, &serde_json::json!(b64("baz"))), "{r}");
    let (status, _) = post(port, "/v3/kv/range", r#"{"key":"eA=="}"#, Some("bogus.1"));
    assert_eq!(status, 401, "an unknown token is Unauthenticated");

    let (status, r) = concord_testkit::http_get(port, "/version").unwrap();
    assert_eq!(status, 200);
    assert!(r.contains("\"etcdserver\":\"3.4.23\""), "{r}");
}

#[tokio::test(flavor = "multi_thread")]
async fn hostile_input_is_refused_without_harm() {
    let cluster = ProcessCluster::start(bin(), 1, ClusterOptions::default());
    cluster.wait_leader(Duration::from_secs(20)).await;
    let port = cluster.members[0].client_port;

    // Garbage bytes: the connection is closed, nothing else notices.
    let mut garbage = TcpStream::connect(("127.0.0.1", port)).unwrap();
    garbage.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    garbage.write_all(&[0xde, 0xad, 0xbe, 0xef, 0, 1, 2, 3, 255, 254, b'\r', b'\n', b'\r', b'\n']).unwrap();
    let mut sink = Vec::new();
    let _ = garbage.read_to_end(&mut sink);

    // An oversized JSON body is refused before it is read whole.
    let huge = format!(r#"{{"key":"{}","value":"{}"}}"#, b64("k"), "A".repeat(3 * 1024 * 1024));
    let (status, _) = post(port, "/v3/kv/put", &huge, None);
    assert_eq!(status, 413);

    // A connection that never speaks is dropped after the first-bytes timeout.
    let mut silent = TcpStream::connect(("127.0.0.1", port)).unwrap();
    silent.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let started = Instant::now();
    let n = silent.read(&mut [0u8; 16]).unwrap_or(0);
    assert_eq!(n, 0, "the server closes a silent connection");
    assert!(started.elapsed() < Duration::from_secs(25));

    // The member still serves, and nothing was written by the hostile requests.
    let mut c = cluster.client(0).await;
    assert_eq!(c.status().await.unwrap().header().unwrap().revision(), 1);
}
