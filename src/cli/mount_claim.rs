//! Who may mount a backing directory beside whom. A mount caches sizes,
//! headers and pages that another mount's writes make stale, unless it is
//! mounted `-o shared` (close-to-open consistency, docs/MOUNTING.md). So:
//! - a read-write mount without `shared` is alone;
//! - read-write `-o shared` mounts share with one another and with
//!   read-only `-o ro,shared` mounts (the fleet mode: these keep caching
//!   file contents, for datasets whose files are not rewritten in place);
//! - read-only mounts without `shared` share with read-only mounts only.
//!
//! The claim is three flocks in the backing root: `.kmsfs-mount.lock`
//! (`names::MOUNT_LOCK_BASE`), exclusive for a lone read-write mount and
//! shared for every other; `.kmsfs-mount-writers.lock`, shared by `-o
//! shared` writers; `.kmsfs-mount-readers.lock`, shared by read-only
//! mounts without `shared`. A writer or a caching reader takes its own
//! kind's lock, then checks that the other kind's is free. They are released
//! when the daemon exits, however it exits. Backing filesystems that carry
//! flock between their clients (NFS v4, GlusterFS, CephFS) extend this to
//! mounts on other machines. It guards against mistakes, not attackers
//! (who can delete the files).

use std::fs::File;
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use kmsfs::config::{ConfigError, VolumeConfig};
use kmsfs::format::names::{MOUNT_LOCK_BASE, MOUNT_READERS_LOCK_BASE, MOUNT_WRITERS_LOCK_BASE};

use super::mountinfo;

/// How long a mount waits for a daemon on this machine whose mount is
/// already gone (unmounted, and exiting) to let go of the claim.
const EXITING_DAEMON_WAIT: Duration = Duration::from_secs(10);

/// The most of a holder's record that is read and shown: it comes from the
/// backing directory, so it is untrusted and only ever displayed.
const RECORD_MAX: u64 = 512;

/// The kind of mount, as the claim sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MountKind {
    /// Read-write, without `shared`: the only mount.
    Alone,
    /// Read-write `-o shared`.
    SharedWriter,
    /// `-o ro` without `shared`: caches contents, so no writer beside it.
    CachingReader,
    /// `-o ro,shared`: the fleet mode.
    FleetReader,
}

impl MountKind {
    pub fn of(read_only: bool, shared: bool) -> Self {
        match (read_only, shared) {
            (false, false) => MountKind::Alone,
            (false, true) => MountKind::SharedWriter,
            (true, false) => MountKind::CachingReader,
            (true, true) => MountKind::FleetReader,
        }
    }
}

/// Held for as long as the mount is up; empty where the backing directory
/// cannot hold the lock files (read-only), which no other mount can then
/// change either.
pub struct Claim {
    _locks: Vec<File>,
}

/// What kept a claim from being granted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Conflict {
    /// A read-write mount without `shared`.
    Alone,
    /// Other mounts, none of them alone: read-only or `-o shared` ones.
    Sharing,
    /// `-o shared` writers (seen by a caching reader).
    SharedWriters,
    /// Caching read-only mounts (seen by a `-o shared` writer).
    CachingReaders,
}

/// Claims `backing` for a mount of `kind` at `mountpoint`, or says which
/// mount holds it and what to do.
pub fn claim(backing: &Path, mountpoint: &Path, kind: MountKind) -> Result<Claim> {
    let started = Instant::now();
    loop {
        let conflict = match try_claim(backing, kind) {
            Ok(Ok(locks)) => {
                if kind == MountKind::Alone {
                    write_record(&locks[0], mountpoint);
                }
                if matches!(kind, MountKind::SharedWriter | MountKind::FleetReader) {
                    // On a descriptor of its own: where flock is a byte-range
                    // lock (NFS, GlusterFS), the probe's release on the
                    // claim's descriptor would cut a hole in the claim.
                    let probe = File::open(backing.join(format!("{MOUNT_LOCK_BASE}.lock")))
                        .and_then(|f| kmsfs::fs::check_byte_range_locks(&f));
                    if let Err(e) = probe {
                        bail!(
                            "{} cannot be mounted with -o shared: its filesystem does not grant \
                             byte-range locks ({e}), which shared mounts use to mark open files \
                             and keep each other's blocks whole; mount it without -o shared on \
                             one node only",
                            backing.display()
                        );
                    }
                }
                return Ok(Claim { _locks: locks });
            }
            Ok(Err(conflict)) => conflict,
            Err(ConfigError::Io { source, .. })
                if matches!(source.raw_os_error(), Some(libc::EROFS | libc::EACCES)) =>
            {
                return Ok(Claim { _locks: Vec::new() });
            }
            Err(e) => return Err(e.into()),
        };
        let holder = Holder::find(backing, conflict);
        if holder.exiting_here() && started.elapsed() < EXITING_DAEMON_WAIT {
            std::thread::sleep(Duration::from_millis(50));
            continue;
        }
        bail!(refusal(backing, &holder));
    }
}

/// The locks of a claim of `kind`, or what holds them.
fn try_claim(
    backing: &Path, kind: MountKind,
) -> Result<std::result::Result<Vec<File>, Conflict>, ConfigError> {
    let lock = |base, shared| VolumeConfig::try_lock_mounts(backing, base, shared);
    let Some(main) = lock(MOUNT_LOCK_BASE, kind != MountKind::Alone)? else {
        return Ok(Err(if kind == MountKind::Alone {
            Conflict::Sharing
        } else {
            Conflict::Alone
        }));
    };
    // A writer and a caching reader each join their own kind, then check
    // that the other kind is absent (its lock can be taken exclusively):
    // two of opposite kinds starting at once may both be refused, never
    // both let in.
    let (other, own, conflict) = match kind {
        MountKind::SharedWriter => (
            MOUNT_READERS_LOCK_BASE,
            MOUNT_WRITERS_LOCK_BASE,
            Conflict::CachingReaders,
        ),
        MountKind::CachingReader => (
            MOUNT_WRITERS_LOCK_BASE,
            MOUNT_READERS_LOCK_BASE,
            Conflict::SharedWriters,
        ),
        MountKind::Alone | MountKind::FleetReader => return Ok(Ok(vec![main])),
    };
    // Only another kind's exclusive probe holds it so, for an instant.
    let Some(own) = lock(own, true)? else {
        return Ok(Err(conflict));
    };
    if lock(other, false)?.is_none() {
        return Ok(Err(conflict));
    }
    Ok(Ok(vec![main, own]))
}

/// Who holds the claim, as far as this machine can tell.
struct Holder {
    conflict: Conflict,
    /// kmsfs mounts of the same backing directory on this machine.
    local: Vec<String>,
    /// What a read-write mount without `shared` wrote (sanitized).
    record: Option<String>,
}

impl Holder {
    fn find(backing: &Path, conflict: Conflict) -> Holder {
        let local = mountinfo::mounts()
            .iter()
            .filter(|m| m.kmsfs_backing() == Some(backing))
            .map(|m| m.mountpoint.display().to_string())
            .collect();
        // A refused lone mount learns whether the holder is alone too: a
        // shared lock is granted beside shared ones only.
        let conflict = match conflict {
            Conflict::Sharing
                if !matches!(
                    VolumeConfig::try_lock_mounts(backing, MOUNT_LOCK_BASE, true),
                    Ok(Some(_))
                ) =>
            {
                Conflict::Alone
            }
            c => c,
        };
        let record = (conflict == Conflict::Alone)
            .then(|| read_record(backing))
            .flatten();
        Holder {
            conflict,
            local,
            record,
        }
    }

    /// Whether the holder is a lone read-write daemon on this machine
    /// whose mount is already gone: it is exiting, and will let go.
    fn exiting_here(&self) -> bool {
        let Some(record) = &self.record else {
            return false;
        };
        let field = |name: &str| {
            record
                .split(' ')
                .find_map(|f| f.strip_prefix(name)?.strip_prefix('='))
        };
        let here = field("host") == Some(kmsfs::audit::hostname().as_str());
        let pid = field("pid").and_then(|p| p.parse::<u32>().ok());
        self.conflict == Conflict::Alone
            && self.local.is_empty()
            && here
            && pid.is_some_and(|p| {
                p != std::process::id() && Path::new(&format!("/proc/{p}")).exists()
            })
    }

    fn describe(&self) -> String {
        let mut parts = Vec::new();
        if !self.local.is_empty() {
            parts.push(format!("on this machine at {}", self.local.join(", ")));
        }
        if let Some(record) = &self.record {
            parts.push(format!("({record})"));
        }
        if parts.is_empty() {
            parts.push("by another machine".into());
        }
        parts.join(" ")
    }
}

fn refusal(backing: &Path, holder: &Holder) -> String {
    let b = backing.display();
    let held = holder.describe();
    let unmount = "unmount it first (kmsfs umount MOUNTPOINT)";
    match holder.conflict {
        Conflict::Alone => format!(
            "{b} is already mounted read-write without -o shared {held}; that mount assumes it \
             is the only one and caches what others would change: {unmount}, or mount every \
             mount of it with -o shared (read-only nodes: -o ro,shared)"
        ),
        Conflict::Sharing => format!(
            "{b} is already mounted {held}; a read-write mount without -o shared must be the \
             only one: mount this one with -o shared (or -o ro,shared), or {unmount}"
        ),
        Conflict::SharedWriters => format!(
            "{b} is mounted read-write with -o shared {held}; a read-only mount without \
             -o shared caches file contents that their writes would make stale: mount this one \
             with -o ro,shared (fleet mode, for files not rewritten in place) or -o shared"
        ),
        Conflict::CachingReaders => format!(
            "{b} is mounted read-only without -o shared {held}; it caches file contents that \
             writes here would make stale: remount it with -o ro,shared, or {unmount}"
        ),
    }
}

/// Writes who holds the claim into the lock file. Best effort: the record
/// only makes a refusal say more.
fn write_record(lock: &File, mountpoint: &Path) {
    let record = format!(
        "host={} pid={} mountpoint={}\n",
        kmsfs::audit::hostname(),
        std::process::id(),
        mountpoint.display()
    );
    let _ = lock
        .set_len(0)
        .and_then(|_| lock.write_all_at(record.as_bytes(), 0));
}

/// The read-write holder's record, cut to `RECORD_MAX` bytes and stripped
/// of control characters.
fn read_record(backing: &Path) -> Option<String> {
    let path = backing.join(format!("{}.lock", kmsfs::format::names::MOUNT_LOCK_BASE));
    let file = File::open(path).ok()?;
    let mut bytes = Vec::new();
    file.take(RECORD_MAX).read_to_end(&mut bytes).ok()?;
    let text: String = String::from_utf8_lossy(&bytes)
        .trim()
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    (!text.is_empty()).then_some(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_read_write_claim_is_refused_and_read_only_ones_share() {
        let dir = tempfile::tempdir().unwrap();
        let c = |mnt: &str, kind| claim(dir.path(), Path::new(mnt), kind);
        let first = c("/mnt/one", MountKind::Alone).unwrap();
        let msg = c("/mnt/two", MountKind::Alone)
            .err()
            .expect("a second read-write mount is refused")
            .to_string();
        assert!(msg.contains("mountpoint=/mnt/one"), "{msg}");
        assert!(msg.contains("without -o shared"), "{msg}");
        assert!(msg.contains("-o shared"), "{msg}");
        for kind in [
            MountKind::SharedWriter,
            MountKind::CachingReader,
            MountKind::FleetReader,
        ] {
            assert!(
                c("/mnt/two", kind).is_err(),
                "{kind:?} beside a lone writer"
            );
        }
        drop(first);
        let a = c("/mnt/a", MountKind::CachingReader).unwrap();
        let _b = c("/mnt/b", MountKind::CachingReader).unwrap();
        let _fleet = c("/mnt/f", MountKind::FleetReader).unwrap();
        let msg = c("/mnt/c", MountKind::Alone)
            .err()
            .expect("no lone read-write mount beside read-only ones")
            .to_string();
        assert!(msg.contains("-o shared"), "{msg}");
        let msg = c("/mnt/c", MountKind::SharedWriter)
            .err()
            .expect("no shared writer beside a caching reader")
            .to_string();
        assert!(msg.contains("-o ro,shared"), "{msg}");
        drop(a);
    }

    #[test]
    fn shared_writers_share_with_each_other_and_fleet_readers_only() {
        let dir = tempfile::tempdir().unwrap();
        let c = |mnt: &str, kind| claim(dir.path(), Path::new(mnt), kind);
        let _w1 = c("/mnt/w1", MountKind::SharedWriter).unwrap();
        let _w2 = c("/mnt/w2", MountKind::SharedWriter).unwrap();
        let _f = c("/mnt/f", MountKind::FleetReader).unwrap();
        let msg = c("/mnt/r", MountKind::CachingReader)
            .err()
            .expect("a caching reader beside shared writers is refused")
            .to_string();
        assert!(msg.contains("-o ro,shared"), "{msg}");
        assert!(c("/mnt/a", MountKind::Alone).is_err());
    }

    #[test]
    fn a_hostile_record_is_shown_cut_and_without_control_characters() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir
            .path()
            .join(format!("{}.lock", kmsfs::format::names::MOUNT_LOCK_BASE));
        let mut hostile = b"host=x\x1b[2J\nmountpoint=/evil".to_vec();
        hostile.extend(std::iter::repeat_n(b'A', 5000));
        std::fs::write(&path, &hostile).unwrap();
        let record = read_record(dir.path()).unwrap();
        assert!(!record.chars().any(char::is_control), "{record:?}");
        assert!(record.len() <= RECORD_MAX as usize);
    }
}
