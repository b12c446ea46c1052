//! TLS for clients and peers, with certificates generated in the test.
//!
//! - A 3-member cluster serving `https://` client and peer URLs with
//!   `--client-cert-auth` and `--peer-client-cert-auth`, used through etcdctl: with
//!   a certificate from the trusted CA it works; without one, or with one from a
//!   foreign CA, the connection is refused.
//! - A member whose peer certificate comes from a foreign CA cannot join.
//! - With auth on, a client certificate's Common Name is the user (no password).
//! - Certificate files replaced on disk are served without a restart.
//! - `--auto-tls` / `--peer-auto-tls`: self-signed, encrypted, and etcdctl works
//!   with `--insecure-skip-tls-verify`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use concord_testkit::{ClusterOptions, ProcessCluster};
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};

fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_concord"))
}

struct Ca {
    issuer: Issuer<'static, KeyPair>,
    cert_pem: String,
}

fn new_ca(name: &str) -> Ca {
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, name);
    let key = KeyPair::generate().unwrap();
    let cert = params.self_signed(&key).unwrap();
    Ca { cert_pem: cert.pem(), issuer: Issuer::new(params, key) }
}

/// Writes `<name>.pem` / `<name>.key` signed by `ca`, for `cn` and 127.0.0.1.
fn issue(ca: &Ca, dir: &Path, name: &str, cn: &str) -> (PathBuf, PathBuf) {
    let mut params = CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()]).unwrap();
    params.distinguished_name.push(DnType::CommonName, cn);
    let key = KeyPair::generate().unwrap();
    let cert = params.signed_by(&key, &ca.issuer).unwrap();
    let (c, k) = (dir.join(format!("{name}.pem")), dir.join(format!("{name}.key")));
    std::fs::write(&c, cert.pem()).unwrap();
    std::fs::write(&k, key.serialize_pem()).unwrap();
    (c, k)
}

fn etcdctl(endpoint: &str, tls: &[String], args: &[&str]) -> (bool, String) {
    let out = Command::new("etcdctl")
        .env("ETCDCTL_API", "3")
        .args(["--endpoints", endpoint, "--dial-timeout", "2s", "--command-timeout", "5s"])
        .args(tls)
        .args(args)
        .output()
        .expect("etcdctl must be installed (apt-get install etcd-client)");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.success(), text)
}

fn eventually_ok(endpoint: &str, tls: &[String], args: &[&str]) -> String {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (ok, text) = etcdctl(endpoint, tls, args);
        if ok {
            return text;
        }
        assert!(Instant::now() < deadline, "etcdctl {args:?} never succeeded: {text}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn flags(ca: &Path, cert: &Path, key: &Path) -> Vec<String> {
    ["--cacert", &ca.display().to_string(), "--cert", &cert.display().to_string(), "--key", &key.display().to_string()]
        .map(String::from)
        .to_vec()
}

#[test]
fn client_and_peer_tls_with_certificate_auth() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let ca = new_ca("concord test CA");
    let foreign = new_ca("intruder CA");
    let ca_file = d.join("ca.pem");
    std::fs::write(&ca_file, &ca.cert_pem).unwrap();
    let (server_cert, server_key) = issue(&ca, d, "server", "server");
    let (peer_cert, peer_key) = issue(&ca, d, "peer", "peer");
    let (client_cert, client_key) = issue(&ca, d, "client", "root");
    let (other_cert, other_key) = issue(&ca, d, "other", "someone");
    let (bad_cert, bad_key) = issue(&foreign, d, "intruder", "root");
    let p = |x: &PathBuf| x.display().to_string();
    let common: Vec<String> = [
        "--cert-file",
        &p(&server_cert),
        "--key-file",
        &p(&server_key),
        "--trusted-ca-file",
        &p(&ca_file),
        "--client-cert-auth",
        "--peer-trusted-ca-file",
        &p(&ca_file),
        "--peer-client-cert-auth",
    ]
    .map(String::from)
    .to_vec();
    let peer_args = |cert: &PathBuf, key: &PathBuf| -> Vec<String> {
        vec!["--peer-cert-file".into(), p(cert), "--peer-key-file".into(), p(key)]
    };
    let options = ClusterOptions { extra_args: common, client_tls: true, peer_tls: true, ..Default::default() };
    let mut cluster = ProcessCluster::prepare(bin(), 3, options);
    for i in 0..3 {
        cluster.set_extra_args(i, peer_args(&peer_cert, &peer_key));
        cluster.restart(i);
    }
    let eps = cluster.endpoints();
    assert!(eps[0].starts_with("https://"));
    let good = flags(&ca_file, &client_cert, &client_key);
    eventually_ok(&eps[0], &good, &["put", "k", "over-tls"]);
    // Replicated over TLS peer connections: every member serves it.
    for ep in &eps {
        assert!(eventually_ok(ep, &good, &["get", "k", "--consistency=l"]).contains("over-tls"));
    }
    let (ok, text) = etcdctl(&eps[1], &["--cacert".into(), p(&ca_file)], &["get", "k"]);
    assert!(!ok, "a client without a certificate must be refused: {text}");
    let (ok, text) = etcdctl(&eps[1], &flags(&ca_file, &bad_cert, &bad_key), &["get", "k"]);
    assert!(!ok, "a certificate from another CA must be refused: {text}");
    let (ok, text) = etcdctl(&eps[1].replace("https://", "http://"), &[], &["get", "k"]);
    assert!(!ok, "plain http to a TLS port must fail: {text}");

    // A new member with a peer certificate from a foreign CA cannot join.
    let i = cluster.add_member();
    let peer_url = cluster.peer_url(i);
    eventually_ok(&eps[0], &good, &["member", "add", "m3", &format!("--peer-urls={peer_url}")]);
    cluster.set_extra_args(i, peer_args(&bad_cert, &bad_key));
    cluster.restart(i);
    let status = cluster.wait_exit(i, Duration::from_secs(30)).expect("the intruder must give up");
    assert!(!status.success());
    let log = cluster.log_text(i);
    assert!(log.contains("could not retrieve cluster information"), "{log}");
    let (_, list) = etcdctl(&eps[0], &good, &["member", "list"]);
    assert!(list.contains("unstarted"), "the intruder never started: {list}");

    // With auth on, the certificate's Common Name is the user.
    eventually_ok(&eps[0], &good, &["user", "add", "root:pw"]);
    eventually_ok(&eps[0], &good, &["user", "grant-role", "root", "root"]);
    eventually_ok(&eps[0], &good, &["auth", "enable"]);
    eventually_ok(&eps[2], &good, &["put", "cn", "root-by-certificate"]);
    let (ok, text) = etcdctl(&eps[2], &flags(&ca_file, &other_cert, &other_key), &["get", "cn"]);
    assert!(!ok && text.contains("permission denied"), "CN someone has no role: {text}");

    // A renewed certificate is picked up without a restart: member 0's files are
    // replaced by a certificate from a new CA, which clients then verify against.
    let renewed = new_ca("renewed CA");
    let renewed_ca = d.join("renewed-ca.pem");
    std::fs::write(&renewed_ca, &renewed.cert_pem).unwrap();
    let (new_cert, new_key) = issue(&renewed, d, "renewed", "server");
    std::fs::copy(&new_key, &server_key).unwrap();
    std::fs::copy(&new_cert, &server_cert).unwrap();
    let with_new_ca = flags(&renewed_ca, &client_cert, &client_key);
    assert!(eventually_ok(&eps[0], &with_new_ca, &["get", "cn"]).contains("root-by-certificate"));
}

#[test]
fn auto_tls_encrypts_without_configured_certificates() {
    let options = ClusterOptions {
        extra_args: vec!["--auto-tls".into(), "--peer-auto-tls".into()],
        client_tls: true,
        peer_tls: true,
        ..Default::default()
    };
    let cluster = ProcessCluster::start(bin(), 3, options);
    let eps = cluster.endpoints();
    let insecure = vec!["--insecure-transport=false".to_string(), "--insecure-skip-tls-verify".to_string()];
    eventually_ok(&eps[0], &insecure, &["put", "a", "auto"]);
    assert!(eventually_ok(&eps[2], &insecure, &["get", "a"]).contains("auto"));
    let fixtures = cluster.members[0].data_dir.join("fixtures");
    assert!(fixtures.join("client/cert.pem").exists() && fixtures.join("peer/cert.pem").exists());
    let (ok, _) = etcdctl(&eps[0], &[], &["get", "a"]);
    assert!(!ok, "an unencrypted client cannot talk to the TLS port");
}
