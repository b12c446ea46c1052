//! `concord health`: asks one member's `GET /health` (etcd's health endpoint) and
//! exits 0 only if it answers 200 with `{"health":"true"}`. It is the container
//! image's health check, which has no curl: a plain HTTP/1.1 request over one TCP
//! connection, bounded in time and in the bytes it reads. It speaks plain `http`
//! only; a member whose client port requires TLS is probed on its
//! `--listen-metrics-urls` (plain HTTP, as etcd recommends for health checks).

use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

use clap::Parser;

/// Most bytes of an answer read: `/health` answers in well under 1 KiB.
pub const MAX_HEALTH_RESPONSE_BYTES: u64 = 64 * 1024;

#[derive(Parser, Debug)]
#[command(name = "concord health", about = "Check one member's GET /health; exit 0 when healthy")]
pub struct HealthArgs {
    /// The member's client or metrics URL (plain http).
    #[arg(long, default_value = "http://127.0.0.1:2379")]
    pub endpoint: String,
    /// Time allowed for the whole check, in milliseconds (the member itself gives
    /// its quorum read 2 s).
    #[arg(long, default_value_t = 5000)]
    pub timeout_ms: u64,
}

/// Runs `concord health ...`; returns the process exit code (0 healthy, 1 not,
/// 2 bad arguments).
pub fn main(args: &[String]) -> i32 {
    let args =
        match HealthArgs::try_parse_from(std::iter::once("concord health".to_string()).chain(args.iter().cloned())) {
            Ok(a) => a,
            Err(e) => e.exit(),
        };
    let Some(host_port) = args.endpoint.strip_prefix("http://").map(|r| r.trim_end_matches('/')) else {
        eprintln!("Error: --endpoint must be an http:// URL (probe a TLS member on its --listen-metrics-urls)");
        return 2;
    };
    match check(host_port, Duration::from_millis(args.timeout_ms)) {
        Ok(body) => {
            println!("{} is healthy: {body}", args.endpoint);
            0
        }
        Err(e) => {
            eprintln!("{} is unhealthy: {e}", args.endpoint);
            1
        }
    }
}

/// One `GET /health` to `host_port`; the body when the member is healthy.
fn check(host_port: &str, timeout: Duration) -> Result<String, String> {
    let deadline = Instant::now() + timeout;
    let addr = host_port
        .to_socket_addrs()
        .map_err(|e| format!("cannot resolve {host_port}: {e}"))?
        .next()
        .ok_or_else(|| format!("{host_port} resolves to no address"))?;
    let mut conn = TcpStream::connect_timeout(&addr, timeout).map_err(|e| format!("cannot connect: {e}"))?;
    let left = || deadline.saturating_duration_since(Instant::now()).max(Duration::from_millis(1));
    conn.set_write_timeout(Some(left())).map_err(|e| e.to_string())?;
    let request = format!("GET /health HTTP/1.1\r\nHost: {host_port}\r\nConnection: close\r\n\r\n");
    conn.write_all(request.as_bytes()).map_err(|e| format!("cannot send: {e}"))?;
    let mut answer = Vec::new();
    let mut limited = (&mut conn).take(MAX_HEALTH_RESPONSE_BYTES);
    let mut buf = [0u8; 4096];
    loop {
        limited.get_ref().set_read_timeout(Some(left())).map_err(|e| e.to_string())?;
        match limited.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => answer.extend_from_slice(&buf[..n]),
            Err(e) => return Err(format!("no answer in time: {e}")),
        }
    }
    parse_health(&answer)
}

/// The body of a healthy answer; otherwise what was wrong with it.
fn parse_health(answer: &[u8]) -> Result<String, String> {
    let text = String::from_utf8_lossy(answer);
    let (head, body) = text.split_once("\r\n\r\n").ok_or("the answer has no HTTP header")?;
    let status = head.lines().next().unwrap_or_default();
    let code = status.split_whitespace().nth(1).unwrap_or_default();
    let body = body.trim().to_string();
    if code != "200" {
        return Err(format!("HTTP {code}: {body}"));
    }
    let healthy = serde_json::from_str::<serde_json::Value>(&body)
        .ok()
        .is_some_and(|v| v.get("health").and_then(|h| h.as_str()) == Some("true"));
    if healthy {
        Ok(body)
    } else {
        Err(format!("unexpected answer: {body}"))
    }
}

#[cfg(test)]
mod tests {
    use super::parse_health;

    #[test]
    fn only_a_200_with_health_true_is_healthy() {
        let ok = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n\r\n{\"health\":\"true\"}";
        assert_eq!(parse_health(ok).as_deref(), Ok("{\"health\":\"true\"}"));
        let down = b"HTTP/1.1 503 Service Unavailable\r\n\r\n{\"health\":\"false\"}";
        assert!(parse_health(down).unwrap_err().contains("503"));
        let odd = b"HTTP/1.1 200 OK\r\n\r\n{\"health\":\"false\"}";
        assert!(parse_health(odd).is_err());
        assert!(parse_health(b"garbage").is_err());
        assert!(parse_health(b"").is_err());
    }
}
