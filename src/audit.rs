//! The key-operation audit log: one JSON object per line, appended to a
//! file with one write(2) per line, so lines from concurrent writers (other
//! threads, other kmsfs processes) never interleave.
//!
//! A line names the operation, its outcome, the KMS key, the file and the
//! caller; never key bytes. DEKs served from the cache are not logged one
//! by one but counted per key and written as one `cached_unwrap` line per
//! key and interval.

use crate::format::header::FILE_ID_LEN;
use crate::format::KeyRef;
use crate::fs::error::OncePerSecond;
use crate::safe_open::NO_FOLLOW_FLAGS;
use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

/// How long cache hits are counted before their line is written.
pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(60);

/// Why the audit log could not be opened; each says what to do.
#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error("cannot open the audit log {}: {source}", path.display())]
    Open {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "the audit log {} is a symbolic link: name the log file itself",
        path.display()
    )]
    Symlink { path: PathBuf },
    #[error(
        "the audit log {} is {kind}, not a regular file: name a regular file (or remove what is there)",
        path.display()
    )]
    NotRegular { path: PathBuf, kind: &'static str },
    #[error(
        "the audit log {} is writable by group or others (mode {mode:04o}), so they could rewrite it: run `chmod go-w {}`",
        path.display(), path.display()
    )]
    Writable { path: PathBuf, mode: u32 },
    #[error(
        "the audit log {} belongs to uid {owner}, who could rewrite it: `chown` it to uid {us} (this process) or root",
        path.display()
    )]
    Owner { path: PathBuf, owner: u32, us: u32 },
}

/// A key operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AuditOp {
    /// A new DEK wrapped (a file created).
    Wrap,
    Unwrap,
    Rewrap,
    Rekey,
    Rotate,
    PolicySet,
    PolicyUnset,
    Destroy,
}

impl AuditOp {
    /// The name in the log (snake_case).
    pub fn as_str(self) -> &'static str {
        match self {
            AuditOp::Wrap => "wrap",
            AuditOp::Unwrap => "unwrap",
            AuditOp::Rewrap => "rewrap",
            AuditOp::Rekey => "rekey",
            AuditOp::Rotate => "rotate",
            AuditOp::PolicySet => "policy_set",
            AuditOp::PolicyUnset => "policy_unset",
            AuditOp::Destroy => "destroy",
        }
    }
}

impl std::fmt::Display for AuditOp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl serde::Serialize for AuditOp {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

/// How a key operation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuditOutcome<'a> {
    Ok,
    /// A policy refused the key; why.
    Refused(&'a str),
    /// The KMS (or something else) failed; the error text.
    Failed(&'a str),
}

impl AuditOutcome<'_> {
    fn parts(&self) -> (&'static str, Option<&str>) {
        match *self {
            AuditOutcome::Ok => ("ok", None),
            AuditOutcome::Refused(why) => ("refused", Some(why)),
            AuditOutcome::Failed(why) => ("failed", Some(why)),
        }
    }
}

/// One key operation to record. Build it with [`AuditEvent::new`] and the
/// builder methods, or set the fields.
#[derive(Debug, Clone, Copy)]
pub struct AuditEvent<'a> {
    pub op: AuditOp,
    pub outcome: AuditOutcome<'a>,
    pub key: Option<&'a KeyRef>,
    pub file_id: Option<[u8; FILE_ID_LEN]>,
    /// The mount-relative path where known, already escaped for display.
    pub path: Option<&'a str>,
    pub uid: Option<u32>,
    pub pid: Option<u32>,
    /// Free text, e.g. "from local/default@1 to vault/transit/k@2".
    pub detail: Option<&'a str>,
}

impl<'a> AuditEvent<'a> {
    pub fn new(op: AuditOp, outcome: AuditOutcome<'a>) -> Self {
        Self {
            op,
            outcome,
            key: None,
            file_id: None,
            path: None,
            uid: None,
            pid: None,
            detail: None,
        }
    }

    #[must_use]
    pub fn key(mut self, key: &'a KeyRef) -> Self {
        self.key = Some(key);
        self
    }

    #[must_use]
    pub fn file(mut self, file_id: [u8; FILE_ID_LEN]) -> Self {
        self.file_id = Some(file_id);
        self
    }

    #[must_use]
    pub fn path(mut self, path: &'a str) -> Self {
        self.path = Some(path);
        self
    }

    /// The process that asked (from the FUSE request).
    #[must_use]
    pub fn caller(mut self, uid: u32, pid: u32) -> Self {
        self.uid = Some(uid);
        self.pid = Some(pid);
        self
    }

    #[must_use]
    pub fn detail(mut self, detail: &'a str) -> Self {
        self.detail = Some(detail);
        self
    }
}

/// The audit log. Cheap to call from any thread; share it with an `Arc`.
/// Dropping it writes the cache-hit counts not yet written.
pub struct AuditLog {
    inner: Option<Inner>,
}

struct Inner {
    file: File,
    path: PathBuf,
    interval: Duration,
    host: String,
    process: u32,
    window: Mutex<Window>,
    /// Write failures: a warning a second at most.
    warnings: OncePerSecond,
}

/// Cache hits counted since `opened`.
#[derive(Default)]
struct Window {
    /// When the first hit of this window came, on both clocks.
    opened: Option<(Instant, SystemTime)>,
    counts: HashMap<KeyRef, u64>,
}

/// Counts taken out of a window to be written.
struct Counts {
    opened: SystemTime,
    counts: Vec<(KeyRef, u64)>,
}

impl Window {
    /// The counts, emptied, if the window has been open `interval` (or
    /// `force`) and has any.
    fn take(&mut self, now: Instant, interval: Duration, force: bool) -> Option<Counts> {
        let (started, opened) = self.opened?;
        if !force && now.saturating_duration_since(started) < interval {
            return None;
        }
        self.opened = None;
        let mut counts: Vec<_> = std::mem::take(&mut self.counts).into_iter().collect();
        counts.sort_unstable_by(|a, b| {
            (&a.0.provider, &a.0.key_id, &a.0.key_version).cmp(&(
                &b.0.provider,
                &b.0.key_id,
                &b.0.key_version,
            ))
        });
        (!counts.is_empty()).then_some(Counts { opened, counts })
    }
}

impl std::fmt::Debug for AuditLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.inner {
            Some(inner) => f
                .debug_struct("AuditLog")
                .field("path", &inner.path)
                .field("interval", &inner.interval)
                .finish_non_exhaustive(),
            None => f.write_str("AuditLog(disabled)"),
        }
    }
}

impl AuditLog {
    /// Opens `path` for appending, creating it with mode 0600, never
    /// through a symlink. Refuses anything but a regular file, and one that
    /// anyone but this process's user or root could write.
    pub fn open(path: &Path) -> Result<Self, AuditError> {
        let path_buf = || path.to_path_buf();
        let file = OpenOptions::new()
            .append(true)
            .create(true)
            .mode(0o600)
            .custom_flags(NO_FOLLOW_FLAGS)
            .open(path)
            .map_err(|source| match source.raw_os_error() {
                Some(libc::ELOOP) => AuditError::Symlink { path: path_buf() },
                Some(libc::EISDIR) => AuditError::NotRegular {
                    path: path_buf(),
                    kind: "a directory",
                },
                // A FIFO with no reader (opened non-blocking).
                Some(libc::ENXIO) => AuditError::NotRegular {
                    path: path_buf(),
                    kind: "a FIFO or socket",
                },
                _ => AuditError::Open {
                    path: path_buf(),
                    source,
                },
            })?;
        let meta = file.metadata().map_err(|source| AuditError::Open {
            path: path_buf(),
            source,
        })?;
        let kind = meta.file_type();
        if !kind.is_file() {
            use std::os::unix::fs::FileTypeExt;
            let kind = if kind.is_dir() {
                "a directory"
            } else if kind.is_fifo() {
                "a FIFO"
            } else if kind.is_char_device() || kind.is_block_device() {
                "a device"
            } else if kind.is_socket() {
                "a socket"
            } else {
                "something else"
            };
            return Err(AuditError::NotRegular {
                path: path_buf(),
                kind,
            });
        }
        if meta.mode() & 0o022 != 0 {
            return Err(AuditError::Writable {
                path: path_buf(),
                mode: meta.mode() & 0o7777,
            });
        }
        // SAFETY: geteuid cannot fail.
        let us = unsafe { libc::geteuid() };
        if meta.uid() != us && meta.uid() != 0 {
            return Err(AuditError::Owner {
                path: path_buf(),
                owner: meta.uid(),
                us,
            });
        }
        Ok(Self {
            inner: Some(Inner {
                file,
                path: path_buf(),
                interval: DEFAULT_INTERVAL,
                host: hostname(),
                process: std::process::id(),
                window: Mutex::new(Window::default()),
                warnings: OncePerSecond::new(),
            }),
        })
    }

    /// A log that records nothing (no path configured).
    pub fn disabled() -> Self {
        Self { inner: None }
    }

    /// How long cache hits are counted before their lines are written
    /// (default [`DEFAULT_INTERVAL`]).
    #[must_use]
    pub fn with_interval(mut self, interval: Duration) -> Self {
        if let Some(inner) = &mut self.inner {
            inner.interval = interval;
        }
        self
    }

    pub fn is_enabled(&self) -> bool {
        self.inner.is_some()
    }

    /// The file written, if enabled.
    pub fn path(&self) -> Option<&Path> {
        self.inner.as_ref().map(|i| i.path.as_path())
    }

    /// Writes one line for `event` (and first any cache-hit counts whose
    /// interval has passed). A write failure is logged (a warning a second
    /// at most), never returned: the key operation goes on.
    pub fn record(&self, event: &AuditEvent<'_>) {
        let Some(inner) = &self.inner else { return };
        let due = inner.lock().take(Instant::now(), inner.interval, false);
        if let Some(due) = due {
            inner.write_counts(due);
        }
        let (outcome, reason) = event.outcome.parts();
        inner.write(&Line {
            time: rfc3339(SystemTime::now()),
            op: event.op.as_str(),
            outcome,
            reason,
            key: event.key.map(KeyJson::from),
            file_id: event.file_id.map(hex::encode),
            path: event.path,
            uid: event.uid,
            pid: event.pid,
            detail: event.detail,
            count: None,
            interval_start: None,
            host: &inner.host,
            process: inner.process,
        });
    }

    /// Counts a DEK served from the cache under `key`. The counts go out as
    /// one `cached_unwrap` line per key once the interval since the first
    /// uncounted hit has passed (checked here and in [`Self::record`]), and
    /// on [`Self::flush`] or drop.
    pub fn cache_hit(&self, key: &KeyRef) {
        let Some(inner) = &self.inner else { return };
        let now = Instant::now();
        let due = {
            let mut window = inner.lock();
            let due = window.take(now, inner.interval, false);
            if window.opened.is_none() {
                window.opened = Some((now, SystemTime::now()));
            }
            match window.counts.get_mut(key) {
                Some(n) => *n += 1,
                None => {
                    window.counts.insert(key.clone(), 1);
                }
            }
            due
        };
        if let Some(due) = due {
            inner.write_counts(due);
        }
    }

    /// Writes the cache-hit counts not yet written, whatever the interval.
    pub fn flush(&self) {
        let Some(inner) = &self.inner else { return };
        let due = inner.lock().take(Instant::now(), inner.interval, true);
        if let Some(due) = due {
            inner.write_counts(due);
        }
    }
}

impl Drop for AuditLog {
    fn drop(&mut self) {
        self.flush();
    }
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, Window> {
        // Counts stay consistent even if a holder panicked.
        self.window.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn write_counts(&self, due: Counts) {
        let time = rfc3339(SystemTime::now());
        let interval_start = rfc3339(due.opened);
        for (key, count) in &due.counts {
            self.write(&Line {
                time: time.clone(),
                op: "cached_unwrap",
                outcome: "ok",
                reason: None,
                key: Some(KeyJson::from(key)),
                file_id: None,
                path: None,
                uid: None,
                pid: None,
                detail: None,
                count: Some(*count),
                interval_start: Some(interval_start.clone()),
                host: &self.host,
                process: self.process,
            });
        }
    }

    fn write(&self, line: &Line<'_>) {
        let result = serde_json::to_vec(line)
            .map_err(io::Error::other)
            .and_then(|mut bytes| {
                bytes.push(b'\n');
                append(&self.file, &bytes)
            });
        if let Err(e) = result {
            if let Some(more) = self.warnings.due_now() {
                let more = if more > 0 {
                    format!(" ({more} more records failed since the last such line)")
                } else {
                    String::new()
                };
                tracing::warn!(
                    "audit log {}: a {} record was not written ({e}); key operations go on \
                     unaudited until it can be: check the disk and the file{more}",
                    self.path.display(),
                    line.op,
                );
            }
        }
    }
}

/// Appends `bytes` with one write(2); a short write (a full disk, a signal)
/// has the rest written after it.
fn append(file: &File, bytes: &[u8]) -> io::Result<()> {
    let mut done = 0;
    while done < bytes.len() {
        match (&*file).write(&bytes[done..]) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// One line of the log; absent fields are left out.
#[derive(serde::Serialize)]
struct Line<'a> {
    time: String,
    op: &'static str,
    outcome: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    reason: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    key: Option<KeyJson<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    file_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    path: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    uid: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pid: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    detail: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    count: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    interval_start: Option<String>,
    host: &'a str,
    process: u32,
}

#[derive(serde::Serialize)]
struct KeyJson<'a> {
    provider: &'a str,
    key: &'a str,
    /// Left out when the provider keeps the version in the wrapped blob.
    #[serde(skip_serializing_if = "str::is_empty")]
    version: &'a str,
}

impl<'a> From<&'a KeyRef> for KeyJson<'a> {
    fn from(k: &'a KeyRef) -> Self {
        Self {
            provider: &k.provider,
            key: &k.key_id,
            version: &k.key_version,
        }
    }
}

/// This machine's name ("" if it has none that can be read).
pub fn hostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: the buffer is valid for its length; gethostname writes at
    // most that many bytes.
    if unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) } != 0 {
        return String::new();
    }
    let len = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    String::from_utf8_lossy(&buf[..len]).into_owned()
}

/// `t` as RFC 3339 in UTC with milliseconds: "2024-02-29T12:34:56.789Z".
fn rfc3339(t: SystemTime) -> String {
    let millis: i64 = match t.duration_since(SystemTime::UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_millis()).unwrap_or(i64::MAX),
        Err(e) => i64::try_from(e.duration().as_millis()).map_or(i64::MIN, |m| -m),
    };
    let days = millis.div_euclid(86_400_000);
    let ms = millis.rem_euclid(86_400_000);
    let (year, month, day) = civil_from_days(days);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        ms / 3_600_000,
        ms / 60_000 % 60,
        ms / 1000 % 60,
        ms % 1000
    )
}

/// The proleptic Gregorian (year, month, day) of `days` since 1970-01-01
/// (Howard Hinnant's `civil_from_days`).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097); // [0, 146096]
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365; // [0, 399]
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100); // [0, 365]
    let mp = (5 * doy + 2) / 153; // [0, 11], from March
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;
    use std::os::unix::fs::PermissionsExt;
    use std::sync::Arc;

    fn key(id: &str) -> KeyRef {
        KeyRef {
            provider: "local".into(),
            key_id: id.into(),
            key_version: "1".into(),
        }
    }

    fn lines(path: &Path) -> Vec<Value> {
        let text = std::fs::read_to_string(path).unwrap();
        assert!(text.is_empty() || text.ends_with('\n'));
        text.lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l:?}")))
            .collect()
    }

    #[test]
    fn lines_are_json_with_the_fields() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        let log = AuditLog::open(&path).unwrap();
        assert!(log.is_enabled());
        assert_eq!(log.path(), Some(path.as_path()));
        assert_eq!(
            std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        let k = key("default");
        let odd = "a \"quoted\"\nname\\\u{1}\u{7f}é";
        log.record(
            &AuditEvent::new(AuditOp::Rekey, AuditOutcome::Ok)
                .key(&k)
                .file([0xab; 16])
                .path(odd)
                .caller(1000, 4242)
                .detail("from local/default@1 to vault/transit/k@2"),
        );
        log.record(&AuditEvent::new(
            AuditOp::PolicySet,
            AuditOutcome::Refused("key not allowed"),
        ));
        let unversioned = KeyRef {
            key_version: String::new(),
            ..key("arn")
        };
        log.record(
            &AuditEvent::new(AuditOp::Unwrap, AuditOutcome::Failed("KMS timed out"))
                .key(&unversioned),
        );
        let got = lines(&path);
        assert_eq!(got.len(), 3);

        let l = &got[0];
        assert_eq!(l["op"], "rekey");
        assert_eq!(l["outcome"], "ok");
        assert!(l.get("reason").is_none());
        assert_eq!(
            l["key"],
            serde_json::json!({"provider": "local", "key": "default", "version": "1"})
        );
        assert_eq!(l["file_id"], "ab".repeat(16));
        assert_eq!(l["path"], odd);
        assert_eq!(l["uid"], 1000);
        assert_eq!(l["pid"], 4242);
        assert_eq!(l["detail"], "from local/default@1 to vault/transit/k@2");
        assert_eq!(l["host"], hostname());
        assert_eq!(l["process"], std::process::id());
        let time = l["time"].as_str().unwrap();
        assert_eq!(time.len(), "2024-02-29T12:34:56.789Z".len(), "{time}");
        assert!(time.ends_with('Z') && time.as_bytes()[10] == b'T', "{time}");
        assert!(time >= "2024-01-01", "{time}");

        let l = got[1].as_object().unwrap();
        assert_eq!(l["op"], "policy_set");
        assert_eq!(l["outcome"], "refused");
        assert_eq!(l["reason"], "key not allowed");
        let mut fields: Vec<_> = l.keys().map(String::as_str).collect();
        fields.sort_unstable();
        assert_eq!(
            fields,
            ["host", "op", "outcome", "process", "reason", "time"]
        );

        let l = &got[2];
        assert_eq!(l["outcome"], "failed");
        assert_eq!(l["reason"], "KMS timed out");
        assert_eq!(
            l["key"],
            serde_json::json!({"provider": "local", "key": "arn"})
        );
    }

    #[test]
    fn ops_serialize_snake_case() {
        for (op, name) in [
            (AuditOp::Wrap, "wrap"),
            (AuditOp::Unwrap, "unwrap"),
            (AuditOp::Rewrap, "rewrap"),
            (AuditOp::Rekey, "rekey"),
            (AuditOp::Rotate, "rotate"),
            (AuditOp::PolicySet, "policy_set"),
            (AuditOp::PolicyUnset, "policy_unset"),
            (AuditOp::Destroy, "destroy"),
        ] {
            assert_eq!(serde_json::to_value(op).unwrap(), name);
            assert_eq!(op.to_string(), name);
        }
    }

    #[test]
    fn concurrent_records_are_whole_lines() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        // Two opens of the file stand for two processes.
        let logs = [
            Arc::new(AuditLog::open(&path).unwrap()),
            Arc::new(AuditLog::open(&path).unwrap()),
        ];
        let long = "x".repeat(3000);
        const PER_THREAD: usize = 300;
        std::thread::scope(|s| {
            for t in 0..8u32 {
                let log = Arc::clone(&logs[t as usize % 2]);
                let long = &long;
                s.spawn(move || {
                    let k = key(&format!("k{t}"));
                    for _ in 0..PER_THREAD {
                        log.record(
                            &AuditEvent::new(AuditOp::Unwrap, AuditOutcome::Ok)
                                .key(&k)
                                .caller(t, t)
                                .detail(long),
                        );
                    }
                });
            }
        });
        let got = lines(&path);
        assert_eq!(got.len(), 8 * PER_THREAD);
        let mut per_thread = [0usize; 8];
        for l in &got {
            let t = l["uid"].as_u64().unwrap() as usize;
            assert_eq!(l["key"]["key"], format!("k{t}"));
            assert_eq!(l["detail"].as_str().unwrap().len(), 3000);
            per_thread[t] += 1;
        }
        assert_eq!(per_thread, [PER_THREAD; 8]);
    }

    #[test]
    fn cache_hits_are_counted_per_key_and_interval() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        let log = AuditLog::open(&path)
            .unwrap()
            .with_interval(Duration::from_millis(200));
        let (a, b) = (key("a"), key("b"));
        for _ in 0..3 {
            log.cache_hit(&a);
        }
        log.cache_hit(&b);
        log.cache_hit(&b);
        assert!(lines(&path).is_empty(), "written before the interval");
        std::thread::sleep(Duration::from_millis(250));
        // The interval has passed: its counts go out before this hit is
        // counted in a new one.
        log.cache_hit(&a);
        let got = lines(&path);
        assert_eq!(got.len(), 2);
        for (l, (id, n)) in got.iter().zip([("a", 3), ("b", 2)]) {
            assert_eq!(l["op"], "cached_unwrap");
            assert_eq!(l["outcome"], "ok");
            assert_eq!(l["key"]["key"], id);
            assert_eq!(l["count"], n);
            assert!(l["interval_start"].as_str().unwrap() <= l["time"].as_str().unwrap());
            assert!(l.get("path").is_none());
        }
        // A record also writes counts whose interval has passed.
        std::thread::sleep(Duration::from_millis(250));
        log.record(&AuditEvent::new(AuditOp::Rotate, AuditOutcome::Ok));
        let got = lines(&path);
        assert_eq!(got.len(), 4);
        assert_eq!(got[2]["op"], "cached_unwrap");
        assert_eq!(got[2]["count"], 1);
        assert_eq!(got[3]["op"], "rotate");

        // flush() writes whatever the interval; nothing when empty.
        log.cache_hit(&b);
        log.flush();
        log.flush();
        let got = lines(&path);
        assert_eq!(got.len(), 5);
        assert_eq!(
            (got[4]["key"]["key"].as_str(), got[4]["count"].as_u64()),
            (Some("b"), Some(1))
        );

        // So does dropping the log (the default interval is long).
        let log = AuditLog::open(&path).unwrap();
        log.cache_hit(&a);
        log.cache_hit(&a);
        assert_eq!(lines(&path).len(), 5);
        drop(log);
        let got = lines(&path);
        assert_eq!(got.len(), 6);
        assert_eq!(got[5]["count"], 2);
    }

    #[test]
    fn refuses_symlinks_and_others_writable_files() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("real.log");
        std::fs::write(&target, "").unwrap();
        std::fs::set_permissions(&target, std::fs::Permissions::from_mode(0o600)).unwrap();
        let link = dir.path().join("link.log");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        let err = AuditLog::open(&link).unwrap_err();
        assert!(matches!(err, AuditError::Symlink { .. }), "{err}");
        assert!(err.to_string().contains("symbolic link"), "{err}");
        // A dangling one creates nothing.
        let dangling = dir.path().join("dangling.log");
        std::os::unix::fs::symlink(dir.path().join("nowhere"), &dangling).unwrap();
        assert!(matches!(
            AuditLog::open(&dangling),
            Err(AuditError::Symlink { .. })
        ));
        assert!(!dir.path().join("nowhere").exists());

        for mode in [0o620, 0o602, 0o666] {
            std::fs::set_permissions(&target, std::fs::Permissions::from_mode(mode)).unwrap();
            let err = AuditLog::open(&target).unwrap_err();
            assert!(matches!(err, AuditError::Writable { .. }), "{err}");
            assert!(err.to_string().contains("chmod go-w"), "{err}");
        }
        // Readable by others is fine.
        std::fs::set_permissions(&target, std::fs::Permissions::from_mode(0o644)).unwrap();
        AuditLog::open(&target).unwrap();

        let err = AuditLog::open(dir.path()).unwrap_err();
        assert!(matches!(err, AuditError::NotRegular { .. }), "{err}");

        let fifo = dir.path().join("fifo");
        let c = std::ffi::CString::new(fifo.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let err = AuditLog::open(&fifo).unwrap_err();
        assert!(matches!(err, AuditError::NotRegular { .. }), "{err}");
        // With a reader the open succeeds, and the type check refuses it.
        let _reader = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(&fifo)
            .unwrap();
        let err = AuditLog::open(&fifo).unwrap_err();
        assert!(
            matches!(err, AuditError::NotRegular { kind: "a FIFO", .. }),
            "{err}"
        );

        let err = AuditLog::open(&dir.path().join("no/such/dir.log")).unwrap_err();
        assert!(matches!(err, AuditError::Open { .. }), "{err}");
    }

    #[test]
    fn disabled_writes_nothing() {
        let log = AuditLog::disabled();
        assert!(!log.is_enabled());
        assert_eq!(log.path(), None);
        let log = log.with_interval(Duration::ZERO);
        let k = key("a");
        log.record(&AuditEvent::new(AuditOp::Wrap, AuditOutcome::Ok).key(&k));
        log.cache_hit(&k);
        log.flush();
        assert_eq!(format!("{log:?}"), "AuditLog(disabled)");
    }

    #[test]
    fn a_failed_write_is_not_fatal() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        std::fs::write(&path, "").unwrap();
        // A descriptor that cannot write: every write fails (EBADF).
        let mut log = AuditLog::open(&path).unwrap();
        log.inner.as_mut().unwrap().file = File::open(&path).unwrap();
        for _ in 0..3 {
            log.record(&AuditEvent::new(AuditOp::Wrap, AuditOutcome::Ok));
            log.cache_hit(&key("a"));
        }
        drop(log);
        assert_eq!(std::fs::read(&path).unwrap(), b"");
    }

    #[test]
    fn rfc3339_utc_millis() {
        let at = |ms: i64| {
            let t = if ms >= 0 {
                SystemTime::UNIX_EPOCH + Duration::from_millis(ms as u64)
            } else {
                SystemTime::UNIX_EPOCH - Duration::from_millis(ms.unsigned_abs())
            };
            rfc3339(t)
        };
        assert_eq!(at(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(at(951_782_400_000), "2000-02-29T00:00:00.000Z");
        assert_eq!(at(1_709_210_096_789), "2024-02-29T12:34:56.789Z");
        assert_eq!(at(4_102_444_800_000), "2100-01-01T00:00:00.000Z");
        assert_eq!(at(253_402_300_799_999), "9999-12-31T23:59:59.999Z");
        assert_eq!(at(-86_400_000), "1969-12-31T00:00:00.000Z");
        assert_eq!(at(-1), "1969-12-31T23:59:59.999Z");
    }
}
