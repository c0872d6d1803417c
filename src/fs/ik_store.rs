//! The intermediate keys' objects in the backing directory
//! (`.kmsfs-keys/ik-<hex>`, `format::ik`): the filesystem side of
//! `kms::intermediate`. The backing directory is untrusted, so an object is
//! read as a sidecar is (no symlink followed, a regular file only, size
//! capped); what it holds is authenticated by the KMS unwrap, not here.

use std::ffi::CString;
use std::fs::File;
use std::io::Write;
use std::path::Path;

use rand::RngCore;

use super::sidecar::{self, SidecarError};
use super::subdir::RootSubdir;
use super::sys;
use crate::format::ik::MAX_OBJECT_LEN;
use crate::format::names::{ik_object_name, IK_DIR};
use crate::kms::intermediate::{IkId, IntermediateKeyStore};

pub struct BackingKeyStore {
    dir: RootSubdir,
    /// The backing directory, for messages.
    backing: std::path::PathBuf,
}

impl BackingKeyStore {
    /// The store of backing directory `backing`.
    pub fn open(backing: &Path) -> std::io::Result<Self> {
        let c = sys::cstr(backing.as_os_str())?;
        let root = sys::openat(libc::AT_FDCWD, &c, libc::O_PATH | libc::O_DIRECTORY, 0)?;
        Ok(Self {
            dir: RootSubdir::new(root, IK_DIR)?,
            backing: backing.to_owned(),
        })
    }
}

fn invalid(what: &str) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, what.to_owned())
}

impl IntermediateKeyStore for BackingKeyStore {
    fn load(&self, id: &IkId) -> std::io::Result<Option<Vec<u8>>> {
        let Some(dir) = self.dir.current()? else {
            return Ok(None);
        };
        let name = CString::new(ik_object_name(id)).expect("hex has no NUL");
        match sidecar::read_bounded_at(dir, &name, MAX_OBJECT_LEN as u64) {
            Ok(bytes) => Ok(Some(bytes)),
            Err(SidecarError::Missing) => Ok(None),
            Err(SidecarError::NotRegular) => Err(invalid("not a regular file")),
            Err(SidecarError::TooLarge) => Err(invalid("larger than 4096 bytes")),
            Err(SidecarError::Io(e)) => Err(e),
            Err(SidecarError::Format(e)) => Err(invalid(&e.to_string())),
        }
    }

    /// A temporary file beside the object (created exclusively, never
    /// through a symlink), synced, renamed into place, and the directory
    /// synced: durable before the caller writes a header naming it.
    fn save(&self, id: &IkId, bytes: &[u8]) -> std::io::Result<()> {
        let dir = self.dir.made()?;
        let name = ik_object_name(id);
        let mut tag = [0u8; 8];
        rand::rngs::OsRng.fill_bytes(&mut tag);
        let tmp = CString::new(format!("{name}.tmp-{}", hex::encode(tag))).expect("no NUL");
        let fd = sys::openat(
            dir,
            &tmp,
            libc::O_CREAT | libc::O_EXCL | libc::O_WRONLY | libc::O_NOFOLLOW,
            0o600,
        )?;
        let mut f = File::from(fd);
        let name = CString::new(name).expect("no NUL");
        let written = f
            .write_all(bytes)
            .and_then(|_| f.sync_all())
            .and_then(|_| sys::renameat2(dir, &tmp, dir, &name, 0));
        if let Err(e) = written {
            let _ = sys::unlinkat(dir, &tmp, 0);
            return Err(e);
        }
        sys::sync_dir(dir)
    }

    fn location(&self, id: &IkId) -> String {
        self.backing
            .join(IK_DIR)
            .join(ik_object_name(id))
            .display()
            .to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn saves_loads_and_refuses_planted_names() {
        let tmp = tempfile::tempdir().unwrap();
        let store = BackingKeyStore::open(tmp.path()).unwrap();
        let id = [7u8; 16];
        assert!(store.load(&id).unwrap().is_none(), "no directory yet");
        store.save(&id, b"object").unwrap();
        assert_eq!(store.load(&id).unwrap().unwrap(), b"object");
        // A second handle sees what the first made.
        let other = BackingKeyStore::open(tmp.path()).unwrap();
        assert_eq!(other.load(&id).unwrap().unwrap(), b"object");
        let dir = tmp.path().join(IK_DIR);
        let leftovers: Vec<_> = std::fs::read_dir(&dir).unwrap().collect();
        assert_eq!(leftovers.len(), 1, "no temporary file left");
        // A symlink or an oversized file planted at an object's name.
        let planted = [8u8; 16];
        std::os::unix::fs::symlink(
            dir.join(ik_object_name(&id)),
            dir.join(ik_object_name(&planted)),
        )
        .unwrap();
        assert!(other.load(&planted).is_err());
        let big = [9u8; 16];
        std::fs::write(dir.join(ik_object_name(&big)), vec![0; MAX_OBJECT_LEN + 1]).unwrap();
        assert!(other.load(&big).is_err());
    }
}
