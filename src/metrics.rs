//! Prometheus text metrics: KMS requests by provider/operation/outcome with
//! latency, DEK cache counters, and bytes read/written through the mount.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Upper bounds (seconds) of the KMS latency histogram buckets.
const BUCKETS: [f64; 10] = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 5.0];

#[derive(Default, Clone)]
struct Series {
    count: u64,
    sum_seconds: f64,
    buckets: [u64; BUCKETS.len()],
}

/// DEK cache counters, kept by the cache and rendered here.
#[derive(Default)]
pub struct CacheStats {
    pub hits: AtomicU64,
    pub misses: AtomicU64,
    pub evictions: AtomicU64,
    /// Unwrap calls actually sent to a KMS.
    pub unwraps: AtomicU64,
}

#[derive(Default)]
pub struct Metrics {
    /// (provider, operation, outcome) -> latency series.
    kms: Mutex<BTreeMap<(String, &'static str, &'static str), Series>>,
    /// Plaintext served to READ requests.
    pub bytes_read: AtomicU64,
    /// Plaintext put into the kernel's page cache at open (no READ follows).
    pub bytes_filled: AtomicU64,
    pub bytes_written: AtomicU64,
}

impl Metrics {
    pub fn record_kms(
        &self, provider: &str, operation: &'static str, outcome: &'static str, took: Duration,
    ) {
        let secs = took.as_secs_f64();
        let mut kms = self.kms.lock().unwrap();
        let s = kms
            .entry((provider.to_owned(), operation, outcome))
            .or_default();
        s.count += 1;
        s.sum_seconds += secs;
        for (i, le) in BUCKETS.iter().enumerate() {
            if secs <= *le {
                s.buckets[i] += 1;
            }
        }
    }

    /// Total KMS requests recorded for `operation` (all providers/outcomes).
    pub fn kms_requests(&self, operation: &str) -> u64 {
        self.kms
            .lock()
            .unwrap()
            .iter()
            .filter(|((_, op, _), _)| *op == operation)
            .map(|(_, s)| s.count)
            .sum()
    }

    pub fn render(&self, cache: &CacheStats) -> String {
        let mut out = String::new();
        out.push_str(
            "# HELP kmsfs_kms_requests_total KMS requests by provider, operation and outcome.\n",
        );
        out.push_str("# TYPE kmsfs_kms_requests_total counter\n");
        let kms = self.kms.lock().unwrap().clone();
        for ((p, op, outcome), s) in &kms {
            let _ = writeln!(
                out,
                "kmsfs_kms_requests_total{{provider=\"{p}\",operation=\"{op}\",outcome=\"{outcome}\"}} {}",
                s.count
            );
        }
        out.push_str("# HELP kmsfs_kms_request_duration_seconds KMS request latency.\n");
        out.push_str("# TYPE kmsfs_kms_request_duration_seconds histogram\n");
        for ((p, op, outcome), s) in &kms {
            let labels = format!("provider=\"{p}\",operation=\"{op}\",outcome=\"{outcome}\"");
            for (i, le) in BUCKETS.iter().enumerate() {
                let _ = writeln!(
                    out,
                    "kmsfs_kms_request_duration_seconds_bucket{{{labels},le=\"{le}\"}} {}",
                    s.buckets[i]
                );
            }
            let _ = writeln!(
                out,
                "kmsfs_kms_request_duration_seconds_bucket{{{labels},le=\"+Inf\"}} {}",
                s.count
            );
            let _ = writeln!(
                out,
                "kmsfs_kms_request_duration_seconds_sum{{{labels}}} {}",
                s.sum_seconds
            );
            let _ = writeln!(
                out,
                "kmsfs_kms_request_duration_seconds_count{{{labels}}} {}",
                s.count
            );
        }
        for (name, help, v) in [
            ("kmsfs_dek_cache_hits_total", "DEK cache hits.", &cache.hits),
            (
                "kmsfs_dek_cache_misses_total",
                "DEK cache misses (each made one unwrap).",
                &cache.misses,
            ),
            (
                "kmsfs_dek_cache_evictions_total",
                "DEKs evicted (capacity or TTL) and zeroized.",
                &cache.evictions,
            ),
            (
                "kmsfs_read_bytes_total",
                "Plaintext bytes served to read requests.",
                &self.bytes_read,
            ),
            (
                "kmsfs_open_fill_bytes_total",
                "Plaintext bytes sent to the kernel's page cache when a file was first opened for reading (reads of them make no request).",
                &self.bytes_filled,
            ),
            (
                "kmsfs_written_bytes_total",
                "Plaintext bytes written through the mount.",
                &self.bytes_written,
            ),
        ] {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {}",
                v.load(Ordering::Relaxed)
            );
        }
        out
    }
}

/// Serves `/metrics` on `addr` from a background thread.
pub fn serve(
    addr: &str, render: Arc<dyn Fn() -> String + Send + Sync>,
) -> std::io::Result<std::net::SocketAddr> {
    let listener = TcpListener::bind(addr)?;
    let local = listener.local_addr()?;
    std::thread::Builder::new().name("kmsfs-metrics".into()).spawn(move || {
        for stream in listener.incoming().flatten() {
            let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
            let mut reader = BufReader::new(&stream);
            let mut request_line = String::new();
            if reader.read_line(&mut request_line).is_err() {
                continue;
            }
            // Drain headers.
            let mut line = String::new();
            while reader.read_line(&mut line).map(|n| n > 2).unwrap_or(false) {
                line.clear();
            }
            let (status, body) = if request_line.starts_with("GET /metrics") || request_line.starts_with("GET / ") {
                ("200 OK", render())
            } else {
                ("404 Not Found", "not found; try /metrics\n".to_owned())
            };
            let mut s = &stream;
            let _ = write!(
                s,
                "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
        }
    })?;
    Ok(local)
}
