//! What is mounted where, from the kernel's /proc/self/mountinfo.

use std::path::{Path, PathBuf};

/// One line of mountinfo.
pub struct Mount {
    /// The filesystem's source; a kmsfs mount's is `kmsfs:BACKING`.
    source: String,
    pub mountpoint: PathBuf,
    fs_type: String,
}

impl Mount {
    pub fn is_fuse(&self) -> bool {
        self.fs_type.starts_with("fuse")
    }

    /// The backing directory, when this is a kmsfs mount.
    pub fn kmsfs_backing(&self) -> Option<&Path> {
        let backing = self.source.strip_prefix("kmsfs:")?;
        self.is_fuse().then_some(Path::new(backing))
    }
}

/// The mounts the kernel lists now (none if mountinfo is unreadable).
pub fn mounts() -> Vec<Mount> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    text.lines().filter_map(parse_line).collect()
}

/// `ID PARENT MAJ:MIN ROOT MOUNTPOINT OPTIONS [TAGS...] - TYPE SOURCE SUPER`
fn parse_line(line: &str) -> Option<Mount> {
    let (left, right) = line.split_once(" - ")?;
    let mountpoint = left.split(' ').nth(4)?;
    let mut right = right.split(' ');
    let fs_type = right.next()?.to_owned();
    let source = unescape(right.next()?);
    Some(Mount {
        source,
        mountpoint: PathBuf::from(unescape(mountpoint)),
        fs_type,
    })
}

/// Undoes mountinfo's octal escapes (\040 for space, ...).
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            out.push((b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0'));
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Where backing directory `backing` is mounted by kmsfs on this machine,
/// if it is. By identity, not spelling: a symlinked path to the backing
/// directory is the same directory.
pub fn mountpoint_of(backing: &Path) -> Option<PathBuf> {
    use std::os::unix::fs::MetadataExt;
    let id = |p: &Path| std::fs::metadata(p).ok().map(|m| (m.dev(), m.ino()));
    let ours = id(backing)?;
    mounts()
        .into_iter()
        .find(|m| m.kmsfs_backing().is_some_and(|b| id(b) == Some(ours)))
        .map(|m| m.mountpoint)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_kmsfs_line_with_escaped_spaces() {
        let m = parse_line(
            "61 25 0:52 / /mnt/my\\040files rw,nosuid shared:33 - fuse kmsfs:/srv/back\\040ing rw,user_id=0",
        )
        .unwrap();
        assert_eq!(m.mountpoint, Path::new("/mnt/my files"));
        assert_eq!(m.kmsfs_backing(), Some(Path::new("/srv/back ing")));
        let other = parse_line("22 1 8:1 / / rw - ext4 /dev/sda1 rw").unwrap();
        assert!(!other.is_fuse());
        assert_eq!(other.kmsfs_backing(), None);
    }
}
