//! Lock-free counters and histograms for `/metrics`, usable from every layer.
//!
//! Values are recorded where the work happens (the log syncer records fsync time,
//! the state machine its commit time, the peer client round trips) and rendered in
//! the Prometheus text format by `server::http`. Recording is a few relaxed atomic
//! adds; nothing allocates on the hot path except the first observation for a new
//! peer.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

/// etcd's bucket bounds for disk durations (`ExponentialBuckets(0.001, 2, 14)`).
pub const DISK_BUCKETS_S: [f64; 14] =
    [0.001, 0.002, 0.004, 0.008, 0.016, 0.032, 0.064, 0.128, 0.256, 0.512, 1.024, 2.048, 4.096, 8.192];
/// etcd's bucket bounds for peer round trips (`ExponentialBuckets(0.0001, 2, 16)`).
pub const RTT_BUCKETS_S: [f64; 16] = [
    0.0001, 0.0002, 0.0004, 0.0008, 0.0016, 0.0032, 0.0064, 0.0128, 0.0256, 0.0512, 0.1024, 0.2048, 0.4096, 0.8192,
    1.6384, 3.2768,
];
/// Bucket bounds for client request handling (grpc-prometheus defaults).
pub const REQUEST_BUCKETS_S: [f64; 10] = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0];

/// The upper bound (seconds) of the bucket holding quantile `q` (0..=1) of
/// per-bucket `counts` (the overflow bucket last, bounded by infinity); `None`
/// when nothing was counted.
pub fn quantile_bound_s(bounds_s: &[f64], counts: &[u64], q: f64) -> Option<f64> {
    let total: u64 = counts.iter().sum();
    if total == 0 {
        return None;
    }
    let target = ((total as f64) * q).ceil().max(1.0) as u64;
    let mut seen = 0;
    for (i, n) in counts.iter().enumerate() {
        seen += n;
        if seen >= target {
            return Some(bounds_s.get(i).copied().unwrap_or(f64::INFINITY));
        }
    }
    Some(f64::INFINITY)
}

/// A cumulative histogram with fixed bucket bounds, in seconds.
pub struct Histogram {
    bounds_s: &'static [f64],
    /// Per bucket (not cumulative); the last slot counts observations above every bound.
    buckets: Vec<AtomicU64>,
    sum_ns: AtomicU64,
    count: AtomicU64,
}

impl Histogram {
    pub fn new(bounds_s: &'static [f64]) -> Self {
        Histogram {
            bounds_s,
            buckets: (0..=bounds_s.len()).map(|_| AtomicU64::new(0)).collect(),
            sum_ns: AtomicU64::new(0),
            count: AtomicU64::new(0),
        }
    }

    pub fn observe(&self, d: Duration) {
        let s = d.as_secs_f64();
        let i = self.bounds_s.iter().position(|b| s <= *b).unwrap_or(self.bounds_s.len());
        self.buckets[i].fetch_add(1, Ordering::Relaxed);
        self.sum_ns.fetch_add(d.as_nanos().min(u128::from(u64::MAX)) as u64, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
    }

    /// Per-bucket (not cumulative) counts, the overflow bucket last.
    pub fn bucket_counts(&self) -> Vec<u64> {
        self.buckets.iter().map(|b| b.load(Ordering::Relaxed)).collect()
    }

    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }

    pub fn sum(&self) -> Duration {
        Duration::from_nanos(self.sum_ns.load(Ordering::Relaxed))
    }

    /// Appends the `_bucket`, `_sum` and `_count` series; `labels` is either empty
    /// or `key="value",...` without braces.
    pub fn render(&self, name: &str, labels: &str, out: &mut String) {
        let sep = if labels.is_empty() { "" } else { "," };
        let mut cumulative = 0;
        for (i, b) in self.buckets.iter().enumerate() {
            cumulative += b.load(Ordering::Relaxed);
            let le = self.bounds_s.get(i).map_or("+Inf".to_string(), |b| b.to_string());
            let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"{le}\"}} {cumulative}");
        }
        let braces = if labels.is_empty() { String::new() } else { format!("{{{labels}}}") };
        let _ = writeln!(out, "{name}_sum{braces} {}", self.sum().as_secs_f64());
        let _ = writeln!(out, "{name}_count{braces} {}", self.count());
    }
}

/// One Raft group's disk and network timings.
pub struct GroupStats {
    /// Time of each log fsync (etcd: `etcd_disk_wal_fsync_duration_seconds`).
    pub wal_fsync: Histogram,
    /// Time of each state-machine commit (`etcd_disk_backend_commit_duration_seconds`).
    pub backend_commit: Histogram,
    /// AppendEntries round trips per peer (`etcd_network_peer_round_trip_time_seconds`).
    /// A std mutex: held only to find or insert a peer's histogram.
    pub peer_rtt: Mutex<BTreeMap<u64, std::sync::Arc<Histogram>>>,
}

impl Default for GroupStats {
    fn default() -> Self {
        GroupStats {
            wal_fsync: Histogram::new(&DISK_BUCKETS_S),
            backend_commit: Histogram::new(&DISK_BUCKETS_S),
            peer_rtt: Mutex::new(BTreeMap::new()),
        }
    }
}

impl GroupStats {
    pub fn observe_peer_rtt(&self, peer: u64, d: Duration) {
        let h = {
            let mut map = self.peer_rtt.lock().expect("stats lock poisoned");
            map.entry(peer).or_insert_with(|| std::sync::Arc::new(Histogram::new(&RTT_BUCKETS_S))).clone()
        };
        h.observe(d);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_renders_cumulative_buckets_and_quantiles() {
        let h = Histogram::new(&DISK_BUCKETS_S);
        h.observe(Duration::from_micros(500));
        h.observe(Duration::from_millis(3));
        h.observe(Duration::from_secs(20));
        let mut out = String::new();
        h.render("x", "", &mut out);
        assert!(out.contains("x_bucket{le=\"0.001\"} 1\n"));
        assert!(out.contains("x_bucket{le=\"0.004\"} 2\n"));
        assert!(out.contains("x_bucket{le=\"+Inf\"} 3\n"));
        assert!(out.contains("x_count 3\n"));
        assert_eq!(quantile_bound_s(&DISK_BUCKETS_S, &h.bucket_counts(), 0.5), Some(0.004));
        assert_eq!(quantile_bound_s(&DISK_BUCKETS_S, &h.bucket_counts(), 1.0), Some(f64::INFINITY));
    }
}
