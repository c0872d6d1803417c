//! Crash points for tests. `KMSFS_FAILPOINT=NAME` (or `NAME@N`, the Nth
//! time it is reached) kills the process with SIGKILL when a multi-step
//! operation reaches step boundary NAME, as a `kill -9` there would. Unset,
//! a check is one load of a cached value. tests/crash.rs walks [`ALL`].

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
