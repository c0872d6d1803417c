//! Crash points for tests. `KMSFS_FAILPOINT=NAME` (or `NAME@N`, the Nth
//! time it is reached) kills the process with SIGKILL when a multi-step
//! operation reaches step boundary NAME, as a `kill -9` there would. Unset,
//! a check is one load of a cached value. tests/crash.rs walks [`ALL`].
//!
//! `KMSFS_STOP_AFTER_SYNC=DIR` pauses the daemon right after each fsync it
//! makes in the backing directory, so that a test can copy the disk under
//! it there: the power-loss model of tests/crash.rs.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

/// The environment variable naming the failpoint to stop at.
pub const ENV: &str = "KMSFS_FAILPOINT";

/// Every failpoint, in the order of the steps of each operation.
pub const ALL: &[&str] = &[
    "create:after-sidecar",
    "create:after-data",
    "unlink:after-data",
    "link:after-sidecar",
    "link:after-data",
    "rename:after-successor",
    "rename:after-data",
    "rename:after-sidecar",
    "truncate:after-record",
    "truncate:after-block",
    "truncate:after-resize",
];

struct Armed {
    name: String,
    /// Which time the failpoint is reached that kills (1 = the first).
    nth: u64,
    seen: AtomicU64,
}

fn armed() -> Option<&'static Armed> {
    static ARMED: OnceLock<Option<Armed>> = OnceLock::new();
    ARMED
        .get_or_init(|| {
            let spec = std::env::var(ENV).ok()?;
            let (name, nth) = match spec.split_once('@') {
                Some((name, n)) => (name, n.parse().ok()?),
                None => (spec.as_str(), 1),
            };
            Some(Armed {
                name: name.to_owned(),
                nth,
                seen: AtomicU64::new(0),
            })
        })
        .as_ref()
}

/// Kills the process if `name` is the armed failpoint (and this is the
/// time it is armed for).
pub fn hit(name: &str) {
    debug_assert!(ALL.contains(&name), "unknown failpoint {name}");
    let Some(armed) = armed() else { return };
    if armed.name == name && armed.seen.fetch_add(1, Ordering::SeqCst) + 1 == armed.nth {
        // SIGKILL, not abort: no handler, no unwinding, no buffered write
        // flushed, as for a daemon killed by the OOM killer or an operator.
        unsafe {
            libc::kill(libc::getpid(), libc::SIGKILL);
        }
    }
}

/// The environment variable that makes [`synced`] pause: it names a
/// directory holding two FIFOs, [`SYNCED_FIFO`] and [`RESUME_FIFO`].
pub const STOP_AFTER_SYNC_ENV: &str = "KMSFS_STOP_AFTER_SYNC";
/// [`synced`] writes one byte here when it pauses.
pub const SYNCED_FIFO: &str = "synced";
/// [`synced`] waits for one byte from here before it returns.
pub const RESUME_FIFO: &str = "resume";

/// Marks the return of an fsync in the backing directory: a point where
/// the disk holds a state a power loss could leave. If
/// [`STOP_AFTER_SYNC_ENV`] is set, tells the test so and waits until it
/// has copied the disk. A handshake rather than SIGSTOP: a stopped daemon
/// is at the mercy of job control (an orphaned process group holding a
/// stopped process is sent SIGHUP), and the op that synced is what must
/// wait, which it does here.
pub fn synced() {
    static DIR: OnceLock<Option<std::path::PathBuf>> = OnceLock::new();
    let Some(dir) = DIR.get_or_init(|| std::env::var_os(STOP_AFTER_SYNC_ENV).map(Into::into))
    else {
        return;
    };
    // One pause at a time, so each byte answers one fsync.
    static ONE: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _one = ONE.lock().unwrap_or_else(|e| e.into_inner());
    let handshake = || -> std::io::Result<()> {
        use std::io::{Read, Write};
        std::fs::OpenOptions::new()
            .write(true)
            .open(dir.join(SYNCED_FIFO))?
            .write_all(b"s")?;
        // The test's writer of the last round may still be open and close
        // without writing: that end of file is not the answer, so wait for
        // the next writer.
        loop {
            if std::fs::File::open(dir.join(RESUME_FIFO))?.read(&mut [0])? == 1 {
                return Ok(());
            }
        }
    };
    if let Err(e) = handshake() {
        // Test-only; a broken handshake must not pass unnoticed.
        panic!("{STOP_AFTER_SYNC_ENV} handshake in {}: {e}", dir.display());
    }
}
