//! Names in the backing directory: where a file's sidecar lives, and which
//! names are reserved (hidden from the mount and refused on creation).

use sha2::{Digest, Sha256};

/// Every name kmsfs itself puts in the backing directory starts with this.
pub const RESERVED_PREFIX: &[u8] = b".kmsfs";
/// Sidecar of `NAME` is `.kmsfs.NAME` when that fits in NAME_MAX.
pub const SIDECAR_PREFIX: &[u8] = b".kmsfs.";
/// Otherwise `.kmsfs#` + hex(SHA-256(NAME)).
pub const LONG_SIDECAR_PREFIX: &[u8] = b".kmsfs#";
/// The per-backing configuration file (no secrets).
pub const CONFIG_FILE: &str = ".kmsfs-config.toml";
/// Temporary files of `kmsfs rewrap` and `rekey` (a new header or new data
/// before it replaces the old one): left behind only by a killed run, and
/// removed by the next.
pub const LIFECYCLE_TEMP_PREFIX: &[u8] = b".kmsfs-lifecycle-tmp.";
/// One `rewrap` or `rekey` at a time (in the backing root).
pub const LIFECYCLE_LOCK: &str = ".kmsfs-lifecycle.lock";
/// This name with `.lock` appended, in the backing root, is held shared by
/// every mount and exclusively by `kmsfs fsck --repair`, so that a repair
/// never runs under a mount.
pub const VOLUME_LOCK_BASE: &str = ".kmsfs-volume";
/// This name with `.lock` appended, in the backing root, is held
/// exclusively by a read-write mount and shared by read-only ones, so that
/// a backing directory has at most one read-write mount. The read-write
/// holder writes who it is into it (host, pid, mount point), for the
/// message that refuses a second mount.
pub const MOUNT_LOCK_BASE: &str = ".kmsfs-mount";
/// With `.lock` appended, in the backing root: held shared by every
/// read-write `-o shared` mount, so that a read-only mount that caches
/// file contents (`-o ro` without `shared`) can see it is not alone.
pub const MOUNT_WRITERS_LOCK_BASE: &str = ".kmsfs-mount-writers";
/// With `.lock` appended, in the backing root: held shared by every
/// read-only mount without `shared`, so that a `-o shared` writer can see
/// one.
pub const MOUNT_READERS_LOCK_BASE: &str = ".kmsfs-mount-readers";
/// `kmsfs migrate`'s intent record (in the backing root).
pub const MIGRATE_JOURNAL: &str = ".kmsfs-migrate-journal";
/// `kmsfs migrate`'s lock is this name with `.lock` appended (in the
/// backing root).
pub const MIGRATE_LOCK_BASE: &str = ".kmsfs-migrate";
/// `kmsfs migrate`'s temporary files, beside the file they replace. Made
/// through the volume, so not reserved.
pub const MIGRATE_TEMP_PREFIX: &str = ".~kmsfs-migrate.";
/// Longest name component the backing filesystem accepts.
pub const NAME_MAX: usize = 255;
/// While a rename moves a header to `NAME`, the header that is to become
/// NAME's waits here first: `.kmsfs+NAME` when that fits in NAME_MAX.
/// An empty file here says NAME is to have no sidecar (a plaintext file
/// renamed over an encrypted one). docs/ARCHITECTURE.md, "Crash safety".
pub const SUCCESSOR_PREFIX: &[u8] = b".kmsfs+";
/// Otherwise `.kmsfs%` + hex(SHA-256(NAME)).
pub const LONG_SUCCESSOR_PREFIX: &[u8] = b".kmsfs%";
/// Directory at the backing root holding redo records of operations in
/// flight (`format::intent`), each named by the backing inode it changes.
pub const INTENT_DIR: &str = ".kmsfs-intents";

/// Directory at the backing root holding the wrapped intermediate keys of
/// policies in directory key mode (`format::ik`), one object each.
pub const IK_DIR: &str = ".kmsfs-keys";
/// Name, inside [`IK_DIR`], of an intermediate key's object: this prefix
/// and the key's ID as 32 lowercase hex digits.
pub const IK_OBJECT_PREFIX: &str = "ik-";

/// Name, inside [`IK_DIR`], of the object of intermediate key `ik_id`.
pub fn ik_object_name(ik_id: &[u8; 16]) -> String {
    format!("{IK_OBJECT_PREFIX}{}", hex::encode(ik_id))
}

/// The intermediate key ID a name in [`IK_DIR`] is the object of; None for
/// any other name (only the canonical, lowercase spelling).
pub fn ik_object_id(name: &[u8]) -> Option<[u8; 16]> {
    let digits = name.strip_prefix(IK_OBJECT_PREFIX.as_bytes())?;
    crate::format::ik::parse_id(std::str::from_utf8(digits).ok()?)
}

/// True for names the mount hides and refuses to create.
pub fn is_reserved(name: &[u8]) -> bool {
    name.starts_with(RESERVED_PREFIX)
}

/// Backing name of the sidecar holding the header of file `name`.
pub fn sidecar_name(name: &[u8]) -> Vec<u8> {
    prefixed(SIDECAR_PREFIX, LONG_SIDECAR_PREFIX, name)
}

/// Backing name of the successor sidecar of file `name` (see
/// [`SUCCESSOR_PREFIX`]).
pub fn successor_name(name: &[u8]) -> Vec<u8> {
    prefixed(SUCCESSOR_PREFIX, LONG_SUCCESSOR_PREFIX, name)
}

/// `prefix` + `name` when that fits in NAME_MAX, else `long_prefix` +
/// hex(SHA-256(name)).
fn prefixed(prefix: &[u8], long_prefix: &[u8], name: &[u8]) -> Vec<u8> {
    if prefix.len() + name.len() <= NAME_MAX {
        let mut out = Vec::with_capacity(prefix.len() + name.len());
        out.extend_from_slice(prefix);
        out.extend_from_slice(name);
        out
    } else {
        let digest = Sha256::digest(name);
        let mut out = long_prefix.to_vec();
        out.extend_from_slice(hex::encode(digest).as_bytes());
        out
    }
}

/// Name, inside [`INTENT_DIR`], of the truncate redo record of the backing
/// file with inode number `ino`.
pub fn truncate_record_name(ino: u64) -> String {
    format!("{TRUNCATE_RECORD_PREFIX}{ino}")
}

/// The backing inode a name in [`INTENT_DIR`] is the truncate record of;
/// None for any other name.
pub fn truncate_record_ino(name: &[u8]) -> Option<u64> {
    let digits = name.strip_prefix(TRUNCATE_RECORD_PREFIX.as_bytes())?;
    // Only the canonical spelling, so one inode has one record name.
    if digits.is_empty()
        || !digits.iter().all(u8::is_ascii_digit)
        || (digits[0] == b'0' && digits.len() > 1)
    {
        return None;
    }
    std::str::from_utf8(digits).ok()?.parse().ok()
}

const TRUNCATE_RECORD_PREFIX: &str = "truncate-";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn truncate_record_names_round_trip() {
        for ino in [0, 1, 42, u64::MAX] {
            let name = truncate_record_name(ino);
            assert_eq!(truncate_record_ino(name.as_bytes()), Some(ino));
        }
        for bad in [
            "truncate-",
            "truncate-01",
            "truncate-+1",
            "truncate-x",
            "trunc-1",
            "truncate-18446744073709551616",
        ] {
            assert_eq!(truncate_record_ino(bad.as_bytes()), None, "{bad}");
        }
    }

    #[test]
    fn short_and_long_names() {
        assert_eq!(sidecar_name(b"a.txt"), b".kmsfs.a.txt");
        let long = vec![b'x'; 255];
        let s = sidecar_name(&long);
        assert!(s.len() <= NAME_MAX);
        assert!(s.starts_with(LONG_SIDECAR_PREFIX));
        assert!(is_reserved(&s));
        let edge = vec![b'y'; NAME_MAX - SIDECAR_PREFIX.len()];
        assert_eq!(sidecar_name(&edge).len(), NAME_MAX);
    }

    #[test]
    fn successor_names_differ_from_sidecar_names() {
        assert_eq!(successor_name(b"a.txt"), b".kmsfs+a.txt");
        let long = vec![b'x'; 255];
        let s = successor_name(&long);
        assert!(s.len() <= NAME_MAX && is_reserved(&s));
        assert_ne!(s, sidecar_name(&long));
        assert!(is_reserved(INTENT_DIR.as_bytes()));
    }

    #[test]
    fn reserved_names() {
        assert!(is_reserved(CONFIG_FILE.as_bytes()));
        assert!(is_reserved(IK_DIR.as_bytes()));
        assert!(is_reserved(b".kmsfs.x"));
        assert!(!is_reserved(b".kmsf"));
        assert!(!is_reserved(b"kmsfs"));
    }

    #[test]
    fn ik_object_names() {
        let id = [0xab; 16];
        let name = ik_object_name(&id);
        assert_eq!(name, format!("ik-{}", "ab".repeat(16)));
        assert_eq!(ik_object_id(name.as_bytes()), Some(id));
        assert_eq!(ik_object_id(name.to_uppercase().as_bytes()), None);
        assert_eq!(ik_object_id(b"ik-ab"), None);
        assert_eq!(ik_object_id(format!("{name}.tmp-1").as_bytes()), None);
    }
}
