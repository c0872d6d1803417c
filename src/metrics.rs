//! A mount's HTTP endpoint: Prometheus text metrics on `/metrics` (KMS
//! requests by provider/operation/outcome with latency, DEK cache and DEK
//! pool counters, bytes read/written through the mount), liveness on `/health`, and
//! readiness on `/ready` (the FUSE session is up and every KMS key answers;
//! see [`Readiness`]).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::fs::Core;
use crate::kms::pool::PoolStats;
use crate::kms::probe::{probe_all, KeyHealth, ProbeTarget};

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

    pub fn render(&self, cache: &CacheStats, pool: &PoolStats) -> String {
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
                "kmsfs_dek_pool_hits_total",
                "Files created with a pre-wrapped DEK from a DEK pool (no KMS call).",
                &pool.hits,
            ),
            (
                "kmsfs_dek_pool_misses_total",
                "Files created under a pooled key whose pool was empty (one KMS call each).",
                &pool.misses,
            ),
            (
                "kmsfs_dek_pool_refills_total",
                "DEK pool refills run (their requests are counted as wrap_batch).",
                &pool.refills,
            ),
            (
                "kmsfs_dek_pool_refill_errors_total",
                "DEK pool refill batches that failed.",
                &pool.refill_errors,
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
        let _ = writeln!(
            out,
            "# HELP kmsfs_dek_pool_available Pre-wrapped DEKs held in memory by the DEK pools.\n\
             # TYPE kmsfs_dek_pool_available gauge\nkmsfs_dek_pool_available {}",
            pool.available.load(Ordering::Relaxed)
        );
        out
    }
}

/// How long a `/ready` answer is reused: however many probes come, each
/// KMS key sees one check per this long.
pub const READY_CACHE: Duration = Duration::from_secs(1);
/// How long each key's check may take before `/ready` counts its KMS as
/// unreachable.
pub const READY_DEADLINE: Duration = Duration::from_secs(2);

/// A mount's readiness: the FUSE session is up and every key its policies
/// name answers a real round trip within [`READY_DEADLINE`] (all keys at
/// once, through the mount's own providers, so the checks are counted in
/// `kmsfs_kms_requests_total{operation="check"}`).
pub struct Readiness {
    core: Arc<Core>,
    mounted: Arc<AtomicBool>,
    /// The last probe's answers and when they came.
    last: Mutex<Option<(Instant, Vec<KeyHealth>)>>,
}

impl Readiness {
    /// `mounted` says whether the FUSE session is up; the mount sets it.
    pub fn new(core: Arc<Core>, mounted: Arc<AtomicBool>) -> Self {
        Readiness {
            core,
            mounted,
            last: Mutex::new(None),
        }
    }

    /// Whether the mount is ready, and the JSON body saying why:
    /// `{"ready", "mounted", "keys": [{"key", "kms", "ok", "latency_ms",
    /// "error", ...}]}`.
    pub fn answer(&self) -> (bool, String) {
        let keys = self.keys();
        let mounted = self.mounted.load(Ordering::Acquire);
        let ready = mounted && keys.iter().all(|k| k.ok);
        let body = serde_json::json!({ "ready": ready, "mounted": mounted, "keys": keys });
        (ready, format!("{body:#}\n"))
    }

    /// The keys' answers, probed again if the last ones are older than
    /// [`READY_CACHE`]. Probes wait for one another (the lock), so a storm
    /// makes one probe, not many.
    fn keys(&self) -> Vec<KeyHealth> {
        let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((at, keys)) = &*last {
            if at.elapsed() < READY_CACHE {
                return keys.clone();
            }
        }
        let targets = self
            .core
            .policy_keys()
            .into_iter()
            .map(|(key, provider)| (key, ProbeTarget::Connected(provider)))
            .collect();
        let keys = self
            .core
            .runtime()
            .block_on(probe_all(targets, READY_DEADLINE, false));
        *last = Some((Instant::now(), keys.clone()));
        keys
    }
}

/// What the HTTP endpoint answers: `/metrics` from `metrics`, `/ready`
/// from `ready`, and `/health` (the process serves) by itself.
pub struct Endpoints {
    pub metrics: Box<dyn Fn() -> String + Send>,
    pub ready: Box<dyn Fn() -> (bool, String) + Send>,
}

impl Endpoints {
    /// A mount's endpoints.
    pub fn for_mount(core: Arc<Core>, mounted: Arc<AtomicBool>) -> Self {
        let readiness = Readiness::new(core.clone(), mounted);
        Endpoints {
            metrics: Box::new(move || core.render_metrics()),
            ready: Box::new(move || readiness.answer()),
        }
    }

    /// Status line, content type and body for `method` `path`.
    fn answer(&self, path: &str) -> (&'static str, &'static str, String) {
        const TEXT: &str = "text/plain; charset=utf-8";
        match path {
            "/metrics" | "/" => ("200 OK", "text/plain; version=0.0.4", (self.metrics)()),
            "/health" => ("200 OK", TEXT, "ok\n".to_owned()),
            "/ready" => match (self.ready)() {
                (true, body) => ("200 OK", "application/json", body),
                (false, body) => ("503 Service Unavailable", "application/json", body),
            },
            _ => (
                "404 Not Found",
                TEXT,
                "not found; try /metrics, /health or /ready\n".to_owned(),
            ),
        }
    }
}

/// Serves `endpoints` on `addr` (HOST:PORT) from a background thread, one
/// request at a time.
pub fn serve(addr: &str, endpoints: Endpoints) -> std::io::Result<std::net::SocketAddr> {
    let listener = TcpListener::bind(addr)?;
    let local = listener.local_addr()?;
    std::thread::Builder::new()
        .name("kmsfs-metrics".into())
        .spawn(move || {
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
                let mut parts = request_line.split_whitespace();
                let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
                let path = target.split('?').next().unwrap_or("");
                let (status, content_type, body) = match method {
                    "GET" | "HEAD" => endpoints.answer(path),
                    _ => (
                        "405 Method Not Allowed",
                        "text/plain; charset=utf-8",
                        "use GET\n".to_owned(),
                    ),
                };
                let mut s = &stream;
                let _ = write!(
                    s,
                    "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{}",
                    body.len(),
                    if method == "HEAD" { "" } else { &body }
                );
            }
        })?;
    Ok(local)
}
