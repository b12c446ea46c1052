//! How `concord queue` shows streams and consumers (text and JSON), and the
//! RFC 3339 timestamps it reads and prints (no date crate in the tree: Howard
//! Hinnant's civil-date algorithms, proleptic Gregorian, UTC).

use serde_json::json;

use crate::proto::queue::{ConsumerConfig, ConsumerInfo, DeliverPolicy, Discard, Retention, StreamInfo};
pub(super) use crate::server::cluster_view::human_size;

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's algorithm).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (m + if m > 2 { -3 } else { 9 }) + 2) / 5 + d - 1;
    era * 146_097 + yoe * 365 + yoe / 4 - yoe / 100 + doy - 719_468
}

/// `YYYY-MM-DDTHH:MM:SS[.frac](Z|±HH:MM)` as ms since the epoch.
pub(super) fn parse_rfc3339_ms(s: &str) -> Option<u64> {
    let b = s.as_bytes();
    let num = |r: std::ops::Range<usize>| s.get(r)?.parse::<i64>().ok();
    if b.len() < 20 || b[4] != b'-' || b[7] != b'-' || !matches!(b[10], b'T' | b't' | b' ') || b[13] != b':' {
        return None;
    }
    let (y, mo, d, h, mi, sec) = (num(0..4)?, num(5..7)?, num(8..10)?, num(11..13)?, num(14..16)?, num(17..19)?);
    if !(1..=12).contains(&mo) || !(1..=31).contains(&d) || h > 23 || mi > 59 || sec > 60 {
        return None;
    }
    let mut rest = s.get(19..)?;
    let mut frac_ms = 0i64;
    if let Some(f) = rest.strip_prefix('.') {
        let digits = f.find(|c: char| !c.is_ascii_digit()).unwrap_or(f.len());
        let ms: String = f[..digits].chars().chain("000".chars()).take(3).collect();
        frac_ms = ms.parse().ok()?;
        rest = &f[digits..];
    }
    let offset_s = match rest {
        "Z" | "z" => 0,
        _ if rest.len() == 6 && (rest.starts_with('+') || rest.starts_with('-')) && &rest[3..4] == ":" => {
            let sign = if rest.starts_with('-') { -1 } else { 1 };
            sign * (rest[1..3].parse::<i64>().ok()? * 3600 + rest[4..6].parse::<i64>().ok()? * 60)
        }
        _ => return None,
    };
    let secs = days_from_civil(y, mo, d) * 86_400 + h * 3600 + mi * 60 + sec - offset_s;
    u64::try_from(secs * 1000 + frac_ms).ok()
}

/// ms since the epoch as `YYYY-MM-DDTHH:MM:SS.mmmZ` ("-" for 0).
pub(super) fn fmt_time(ms: u64) -> String {
    if ms == 0 {
        return "-".into();
    }
    let secs = (ms / 1000) as i64;
    let (days, sod) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    let (y, m, d) = crate::cli::civil_from_days(days);
    format!("{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{:03}Z", sod / 3600, sod / 60 % 60, sod % 60, ms % 1000)
}

/// A duration in ms as `1h2m3s`, `500ms`, or `what0` for 0.
pub(super) fn fmt_ms(ms: u64, zero: &str) -> String {
    if ms == 0 {
        return zero.into();
    }
    if !ms.is_multiple_of(1000) {
        return format!("{ms}ms");
    }
    let s = ms / 1000;
    let mut out = String::new();
    for (unit, n) in [("h", s / 3600), ("m", s / 60 % 60), ("s", s % 60)] {
        if n > 0 {
            out += &format!("{n}{unit}");
        }
    }
    out
}

pub(super) fn retention_name(r: i32) -> &'static str {
    match Retention::try_from(r) {
        Ok(Retention::Limits) => "limits",
        Ok(Retention::WorkQueue) => "workqueue",
        Ok(Retention::Interest) => "interest",
        Err(_) => "unknown",
    }
}

pub(super) fn discard_name(d: i32) -> &'static str {
    match Discard::try_from(d) {
        Ok(Discard::Old) => "old",
        Ok(Discard::New) => "new",
        Err(_) => "unknown",
    }
}

pub(super) fn deliver_name(c: &ConsumerConfig) -> String {
    match DeliverPolicy::try_from(c.deliver_policy) {
        Ok(DeliverPolicy::All) => "all".into(),
        Ok(DeliverPolicy::New) => "new".into(),
        Ok(DeliverPolicy::ByStartSeq) => format!("seq:{}", c.opt_start_seq),
        Ok(DeliverPolicy::ByStartTime) => format!("time:{}", fmt_time(c.opt_start_time_ms)),
        Err(_) => "unknown".into(),
    }
}

fn or_unlimited(n: u64, show: impl Fn(u64) -> String) -> String {
    if n == 0 {
        "unlimited".into()
    } else {
        show(n)
    }
}

pub(super) fn stream_text(i: &StreamInfo) -> String {
    let (c, s) = (i.config.clone().unwrap_or_default(), i.state.unwrap_or_default());
    let replicas: Vec<String> = i.replicas.iter().map(|r| format!("{r:x}")).collect();
    let dlq = if c.dead_letter.is_empty() { format!("{}.dlq", c.name) } else { c.dead_letter.clone() };
    let max_msg = if c.max_msg_bytes == 0 { "server default".into() } else { human_size(c.max_msg_bytes as i64) };
    format!(
        "Stream {} (group {}, replicas {}), created {}\n\
         Config: retention {}, discard {}, duplicate window {}, dead letter {}\n\
         Limits: max msgs {}, max bytes {}, max age {}, max msg size {}\n\
         State:  {} messages, {}, first seq {} ({}), last seq {} ({}),\n        \
         {} consumers, {} dead-lettered, {} waiting for the dead-letter stream\n",
        c.name,
        i.group,
        if replicas.is_empty() { "-".into() } else { replicas.join(" ") },
        fmt_time(i.created_ms),
        retention_name(c.retention),
        discard_name(c.discard),
        fmt_ms(c.duplicate_window_ms, "2m (default)"),
        dlq,
        or_unlimited(c.max_msgs, |n| n.to_string()),
        or_unlimited(c.max_bytes, |n| human_size(n as i64)),
        fmt_ms(c.max_age_ms, "unlimited"),
        max_msg,
        s.messages,
        human_size(s.bytes as i64),
        s.first_seq,
        fmt_time(s.first_ts_ms),
        s.last_seq,
        fmt_time(s.last_ts_ms),
        s.consumers,
        s.dead_lettered,
        s.dead_waiting,
    )
}

pub(super) fn stream_json(i: &StreamInfo) -> serde_json::Value {
    let (c, s) = (i.config.clone().unwrap_or_default(), i.state.unwrap_or_default());
    json!({
        "config": {
            "name": c.name, "retention": retention_name(c.retention), "max_msgs": c.max_msgs,
            "max_bytes": c.max_bytes, "max_age_ms": c.max_age_ms, "max_msg_bytes": c.max_msg_bytes,
            "discard": discard_name(c.discard), "duplicate_window_ms": c.duplicate_window_ms,
            "dead_letter": c.dead_letter,
        },
        "state": {
            "messages": s.messages, "bytes": s.bytes, "first_seq": s.first_seq, "last_seq": s.last_seq,
            "first_ts_ms": s.first_ts_ms, "last_ts_ms": s.last_ts_ms, "consumers": s.consumers,
            "dead_lettered": s.dead_lettered, "dead_waiting": s.dead_waiting,
        },
        "created_ms": i.created_ms, "group": i.group, "replicas": i.replicas,
    })
}

pub(super) fn consumer_text(i: &ConsumerInfo) -> String {
    let c = i.config.clone().unwrap_or_default();
    format!(
        "Consumer {} on {}, created {}\n\
         Config: deliver {}, ack wait {}, max deliver {}, max ack pending {}\n\
         State:  next seq {}, {} pending, {} awaiting ack, {} delivered, {} redelivered,\n        \
         {} acked, {} terminated, {} dead-lettered\n",
        c.name,
        i.stream,
        fmt_time(i.created_ms),
        deliver_name(&c),
        fmt_ms(c.ack_wait_ms, "30s (default)"),
        if c.max_deliver == 0 { "5 (default)".into() } else { c.max_deliver.to_string() },
        if c.max_ack_pending == 0 { "1000 (default)".into() } else { c.max_ack_pending.to_string() },
        i.next_seq,
        i.num_pending,
        i.ack_pending,
        i.delivered,
        i.redelivered,
        i.acked,
        i.terminated,
        i.dead_lettered,
    )
}

pub(super) fn consumer_json(i: &ConsumerInfo) -> serde_json::Value {
    let c = i.config.clone().unwrap_or_default();
    json!({
        "stream": i.stream,
        "config": {
            "name": c.name, "deliver": deliver_name(&c), "ack_wait_ms": c.ack_wait_ms,
            "max_deliver": c.max_deliver, "max_ack_pending": c.max_ack_pending,
        },
        "created_ms": i.created_ms, "next_seq": i.next_seq, "ack_pending": i.ack_pending,
        "num_pending": i.num_pending, "delivered": i.delivered, "redelivered": i.redelivered,
        "acked": i.acked, "terminated": i.terminated, "dead_lettered": i.dead_lettered,
    })
}

/// A left-aligned table with a header row.
pub(super) fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in rows {
        for (w, c) in widths.iter_mut().zip(row) {
            *w = (*w).max(c.len());
        }
    }
    let line = |cells: Vec<&str>| -> String {
        let s: Vec<String> = cells.iter().zip(&widths).map(|(c, w)| format!("{c:<w$}")).collect();
        s.join("  ").trim_end().to_string() + "\n"
    };
    let mut out = line(header.to_vec());
    for row in rows {
        out += &line(row.iter().map(String::as_str).collect());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_round_trips() {
        assert_eq!(parse_rfc3339_ms("1970-01-01T00:00:00Z"), Some(0));
        assert_eq!(parse_rfc3339_ms("2026-12-07T15:02:11.714Z"), Some(1_796_655_731_714));
        assert_eq!(fmt_time(1_796_655_731_714), "2026-12-07T15:02:11.714Z");
        assert_eq!(parse_rfc3339_ms("2026-12-07T16:02:11.714+01:00"), Some(1_796_655_731_714));
        assert_eq!(parse_rfc3339_ms("2024-02-29T00:00:00Z").map(fmt_time).as_deref(), Some("2024-02-29T00:00:00.000Z"));
        assert_eq!(parse_rfc3339_ms("yesterday"), None);
        assert_eq!(parse_rfc3339_ms("2026-13-01T00:00:00Z"), None);
        assert_eq!(fmt_time(0), "-");
    }

    #[test]
    fn durations_and_tables() {
        assert_eq!(fmt_ms(90_000, "-"), "1m30s");
        assert_eq!(fmt_ms(1500, "-"), "1500ms");
        assert_eq!(fmt_ms(0, "unlimited"), "unlimited");
        assert_eq!(table(&["A", "BB"], &[vec!["xyz".into(), "1".into()]]), "A    BB\nxyz  1\n");
    }
}
