//! One read-write mount per backing directory. Two mounts of one backing
//! directory each cache sizes, headers and pages that the other's writes
//! make stale, so a second mount is refused unless both are read-only.
//! The claim is an flock on `.kmsfs-mount.lock` in the backing root
//! (`names::MOUNT_LOCK_BASE`): exclusive for a read-write mount, shared for
//! a read-only one. It is released when the daemon exits, however it
//! exits. Backing filesystems that carry flock between their clients (NFS
//! v4, GlusterFS, CephFS) extend the refusal to mounts on other machines.

use std::fs::File;
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use kmsfs::config::{ConfigError, VolumeConfig};

use super::mountinfo;

/// How long a mount waits for a daemon on this machine whose mount is
/// already gone (unmounted, and exiting) to let go of the claim.
const EXITING_DAEMON_WAIT: Duration = Duration::from_secs(10);

/// The most of a holder's record that is read and shown: it comes from the
/// backing directory, so it is untrusted and only ever displayed.
const RECORD_MAX: u64 = 512;

/// Held for as long as the mount is up; `None` where the backing directory
/// cannot hold the lock file (read-only), which no other mount can then
/// change either.
pub struct Claim {
    _lock: Option<File>,
}

/// Claims `backing` for a mount at `mountpoint`, or says which mount holds
/// it and what to do.
pub fn claim(backing: &Path, mountpoint: &Path, read_only: bool) -> Result<Claim> {
    let started = Instant::now();
    loop {
        match VolumeConfig::try_lock_mounts(backing, read_only) {
            Ok(Some(lock)) => {
                if !read_only {
                    write_record(&lock, mountpoint);
                }
                return Ok(Claim { _lock: Some(lock) });
            }
            Ok(None) => {}
            Err(ConfigError::Io { source, .. })
                if matches!(source.raw_os_error(), Some(libc::EROFS | libc::EACCES)) =>
            {
                return Ok(Claim { _lock: None });
            }
            Err(e) => return Err(e.into()),
        }
        let holder = Holder::find(backing);
        if holder.exiting_here() && started.elapsed() < EXITING_DAEMON_WAIT {
            std::thread::sleep(Duration::from_millis(50));
            continue;
        }
        bail!(refusal(backing, read_only, &holder));
    }
}

/// Who holds the claim, as far as this machine can tell.
struct Holder {
    /// Whether the holders are read-only mounts (the lock is held shared).
    read_only: bool,
    /// kmsfs mounts of the same backing directory on this machine.
    local: Vec<String>,
    /// What the read-write holder wrote (sanitized), if anything.
    record: Option<String>,
}

impl Holder {
    fn find(backing: &Path) -> Holder {
        // A shared lock is granted only beside other shared ones.
        let read_only = matches!(VolumeConfig::try_lock_mounts(backing, true), Ok(Some(_)));
        let local = mountinfo::mounts()
            .iter()
            .filter(|m| m.kmsfs_backing() == Some(backing))
            .map(|m| m.mountpoint.display().to_string())
            .collect();
        let record = if read_only {
            None
        } else {
            read_record(backing)
        };
        Holder {
            read_only,
            local,
            record,
        }
    }

    /// Whether the read-write holder is a daemon on this machine whose
    /// mount is already gone: it is exiting, and will let go.
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
        !self.read_only
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

fn refusal(backing: &Path, read_only: bool, holder: &Holder) -> String {
    let b = backing.display();
    let held = holder.describe();
    match (read_only, holder.read_only) {
        (false, true) => format!(
            "{b} is mounted read-only {held}; a read-write mount beside it would leave it \
             serving stale data: unmount it first (kmsfs umount MOUNTPOINT), or mount this one \
             read-only too (-o ro)"
        ),
        _ => format!(
            "{b} is already mounted read-write {held}; kmsfs serves a backing directory through \
             one read-write mount at a time (read-only mounts may share one): unmount it first \
             (kmsfs umount MOUNTPOINT)"
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
        let first = claim(dir.path(), Path::new("/mnt/one"), false).unwrap();
        let e = claim(dir.path(), Path::new("/mnt/two"), false)
            .err()
            .expect("a second read-write mount is refused");
        let msg = e.to_string();
        assert!(msg.contains("mountpoint=/mnt/one"), "{msg}");
        assert!(msg.contains("already mounted read-write"), "{msg}");
        assert!(
            claim(dir.path(), Path::new("/mnt/two"), true).is_err(),
            "no read-only mount beside a read-write one"
        );
        drop(first);
        let a = claim(dir.path(), Path::new("/mnt/a"), true).unwrap();
        let _b = claim(dir.path(), Path::new("/mnt/b"), true).unwrap();
        let msg = claim(dir.path(), Path::new("/mnt/c"), false)
            .err()
            .expect("no read-write mount beside read-only ones")
            .to_string();
        assert!(msg.contains("mounted read-only"), "{msg}");
        drop(a);
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
