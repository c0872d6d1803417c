//! Settling what an interrupted multi-step operation left
//! (docs/ARCHITECTURE.md, "Crash safety"): a successor sidecar staged by a
//! rename, at the first open of its name (one lookup when there is none),
//! and a truncate redo record, before the mount serves (a file's size must
//! be right before the kernel first asks for it) and again at first open.

use std::collections::BTreeSet;
use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::Arc;

use super::crypt_file::{CryptFile, Settled};
use super::error::FsResult;
use super::inode::Inode;
use super::inode::ROOT_INO;
use super::sidecar::{self, FileHeader, Next, SidecarError, Successor};
use super::{file_keys, sys, walk, Core};
use crate::format::block::is_hole;
use crate::format::header;

fn successor_raw(s: &Successor) -> &[u8] {
    match s {
        Successor::Header(raw) => raw,
        Successor::NoHeader => &[],
    }
}

/// Which header a name keeps after an interrupted rename.
enum Verdict {
    /// Its sidecar is right: the successor goes.
    Sidecar,
    /// The successor is: it becomes the sidecar.
    Successor(FileHeader),
    /// Neither: the data is a plaintext file's (a "no header" successor).
    NoHeader,
}

/// The first sealed block of `file` that is not a hole, under geometry
/// `g`: (index, sealed bytes); None if every block is a hole.
fn first_data_block(
    file: &File, g: crate::format::BlockGeometry,
) -> std::io::Result<Option<(u64, Vec<u8>)>> {
    let ct = file.metadata()?.len();
    let sbs = g.sealed_block_size() as u64;
    let mut index = 0u64;
    loop {
        let start = g.sealed_block_start(index);
        if start >= ct {
            return Ok(None);
        }
        // Skip holes the backing filesystem knows of without reading them.
        let data = unsafe { libc::lseek(file.as_raw_fd(), start as i64, libc::SEEK_DATA) };
        if data < 0 {
            return Ok(None);
        }
        index = data as u64 / sbs;
        let start = g.sealed_block_start(index);
        let mut sealed = vec![0u8; (ct - start).min(sbs) as usize];
        file.read_exact_at(&mut sealed, start)?;
        if !is_hole(&sealed) {
            return Ok(Some((index, sealed)));
        }
        index += 1;
    }
}

/// Where, below the backing root `root`, the regular files with inode
/// numbers in `wanted` are: their name components from the root. Walks the
/// whole tree with `walk::walk` (only done after a crash left records); a
/// file's components come from its directory handle's path, so names that
/// are not UTF-8 are kept exactly.
fn find_backing_files(
    root: RawFd, wanted: &BTreeSet<u64>,
) -> std::io::Result<Vec<(u64, Vec<OsString>)>> {
    let root_path = std::fs::read_link(sys::fd_path(root))?;
    let mut found = Vec::new();
    walk::walk(&sys::fd_path(root), |dir, _, files| {
        for name in files {
            let Ok(st) = sys::cstr(name).and_then(|c| sys::fstatat(dir.as_raw_fd(), &c)) else {
                continue;
            };
            if !wanted.contains(&st.st_ino) {
                continue;
            }
            // Where the directory is now; one moved meanwhile is left to
            // its files' first open.
            let Ok(dir_path) = std::fs::read_link(sys::fd_path(dir.as_raw_fd())) else {
                continue;
            };
            let Ok(below) = dir_path.strip_prefix(&root_path) else {
                continue;
            };
            let mut components: Vec<OsString> = below.iter().map(|c| c.to_owned()).collect();
            components.push(name.clone());
            found.push((st.st_ino, components));
        }
    })
    .map_err(|e| e.source)?;
    Ok(found)
}

impl Core {
    /// Finishes every truncate a crash interrupted, before the mount
    /// serves: a file's size follows from its ciphertext size, and the
    /// kernel keeps the first size it is told. A record whose file is gone
    /// is removed; one that cannot be settled now (the KMS is down) stays,
    /// and the file's first open settles it. Returns how many it settled.
    pub async fn settle_interrupted_truncates(&self) -> FsResult<usize> {
        let pending: BTreeSet<u64> = self.intents.truncate_records()?.into_iter().collect();
        if pending.is_empty() {
            return Ok(0);
        }
        if self.read_only {
            tracing::warn!(
                "{} truncate(s) interrupted by a crash are not finished on a read-only mount: \
                 those files may read as EIO until the volume is mounted read-write once",
                pending.len()
            );
            return Ok(0);
        }
        let found = find_backing_files(self.intents.root(), &pending)?;
        let mut settled = 0;
        for (_, components) in &found {
            let mut looked_up = Vec::new();
            let outcome = async {
                let mut at = ROOT_INO;
                for name in components {
                    at = self.lookup(at, name)?.ino.0;
                    looked_up.push(at);
                }
                let inode = self.inodes.get(at)?;
                self.crypt_file(&inode, None, None).await.map(drop)
            }
            .await;
            for at in looked_up {
                self.forget(at, 1);
            }
            let path: PathBuf = components.iter().collect();
            match outcome {
                Ok(()) => settled += 1,
                Err(e) => tracing::warn!(
                    "{}: a truncate interrupted by a crash is not finished yet ({e}); its first \
                     open will try again",
                    path.display()
                ),
            }
        }
        let located: BTreeSet<u64> = found.iter().map(|(ino, _)| *ino).collect();
        for gone in pending.difference(&located) {
            self.intents.remove_truncate(*gone)?;
        }
        Ok(settled)
    }

    /// Whether header `raw` is the one the data in `file` was written
    /// under: its first non-hole block authenticates with it. A KMS that
    /// cannot be reached is an error (nothing is decided without it).
    async fn authenticates(
        &self, raw: &[u8], file: &File, path: &str, label: &str, who: file_keys::Requester,
    ) -> FsResult<Option<FileHeader>> {
        let Ok(parsed) = header::parse(raw) else {
            return Ok(None);
        };
        let g = parsed.header.geometry;
        let candidate = FileHeader {
            parsed,
            raw: raw.to_vec(),
        };
        let Some((index, sealed)) = first_data_block(file, g)? else {
            return Ok(None);
        };
        let cipher = match self
            .keys
            .cipher_for(&candidate, &self.policy_at(path), label, who)
            .await
        {
            Ok(c) => c,
            Err(e) if e.is_retryable() => return Err(e),
            Err(_) => return Ok(None),
        };
        let mut out = vec![0u8; sealed.len().saturating_sub(g.overhead())];
        Ok(cipher
            .open(index, &sealed, &mut out)
            .is_ok()
            .then_some(candidate))
    }

    /// Settles a successor sidecar of `inode`'s name, if there is one: the
    /// header its data authenticates under is kept as its sidecar.
    pub(super) async fn settle_successor(
        &self, inode: &Arc<Inode>, who: file_keys::Requester,
    ) -> FsResult<()> {
        let Some((parent, name)) = inode.location() else {
            return Ok(());
        };
        let dir = self.inodes.dir(parent)?;
        let dfd = dir.raw_fd();
        if !sidecar::successor_exists(dfd, &name)? {
            return Ok(());
        }
        let label = self.inodes.label(inode);
        let read = |name: &OsStr| -> FsResult<(Option<Successor>, Option<Vec<u8>>)> {
            let successor = sidecar::read_successor(dfd, name).map_err(|e| e.for_file(&label))?;
            let current = match sidecar::read_raw_at(dfd, name) {
                Ok(raw) => Some(raw),
                Err(SidecarError::Missing) => None,
                Err(e) => return Err(e.for_file(&label)),
            };
            Ok((successor, current))
        };
        let (Some(successor), current) = read(&name)? else {
            return Ok(());
        };
        let handle = sys::open_path(dfd, &sys::cstr(&name)?)?;
        let st = sys::fstat(handle.as_raw_fd())?;
        if st.st_mode & libc::S_IFMT != libc::S_IFREG
            || (st.st_dev, st.st_ino) != (inode.dev, inode.backing_ino)
        {
            return Ok(());
        }
        let file = File::from(sys::reopen(handle.as_raw_fd(), libc::O_RDONLY)?);
        let path = self
            .inodes
            .rel_path(inode)
            .ok_or_else(|| super::FsError::errno(libc::ENOENT))?;
        let staged = match &successor {
            Successor::Header(raw) => self.authenticates(raw, &file, &path, &label, who).await?,
            Successor::NoHeader => None,
        };
        let verdict = if let Some(h) = staged {
            Verdict::Successor(h)
        } else if let Some(raw) = &current {
            if self
                .authenticates(raw, &file, &path, &label, who)
                .await?
                .is_some()
                || first_data_block(&file, self.new_file_geometry())?.is_none()
            {
                // Right, or nothing written to tell: the sidecar stays.
                Verdict::Sidecar
            } else if matches!(successor, Successor::NoHeader) {
                Verdict::NoHeader
            } else {
                tracing::warn!(
                    "{label}: neither its sidecar nor the header staged by an interrupted rename \
                     fits its data; both left for `kmsfs fsck --verify`"
                );
                return Ok(());
            }
        } else {
            match &successor {
                // No sidecar and no data a header fits: an empty file, or
                // one that never had a header.
                Successor::Header(raw) => match header::parse(raw) {
                    Ok(parsed) if first_data_block(&file, parsed.header.geometry)?.is_none() => {
                        Verdict::Successor(FileHeader {
                            parsed,
                            raw: raw.clone(),
                        })
                    }
                    _ => return Ok(()),
                },
                Successor::NoHeader => Verdict::NoHeader,
            }
        };
        if self.read_only {
            // Nothing may change on disk: the right header is used as is.
            if let Verdict::Successor(h) = verdict {
                *inode.header.write().unwrap() = Some(Arc::new(h));
            }
            return Ok(());
        }
        let _moving = self.sidecar_moves.lock().unwrap();
        // A rename may have run meanwhile: then this is not stale.
        let (again, now) = read(&name)?;
        if now != current || again.as_ref().map(successor_raw) != Some(successor_raw(&successor)) {
            return Ok(());
        }
        match verdict {
            Verdict::Sidecar => sidecar::remove_successor(dfd, &name)?,
            Verdict::Successor(_) => {
                sidecar::promote_successor(dfd, &name, &Next::SidecarOf(dfd, &name))?
            }
            Verdict::NoHeader => sidecar::promote_successor(dfd, &name, &Next::Nothing)?,
        }
        *inode.header.write().unwrap() = None;
        tracing::info!("{label}: finished a rename interrupted by a crash");
        Ok(())
    }

    /// Finishes a truncate of `cf` (backing inode `ino`) interrupted by a
    /// crash, from its redo record, and removes the record.
    pub(super) fn settle_truncate(&self, cf: &CryptFile, ino: u64, label: &str) -> FsResult<()> {
        if self.read_only || !self.intents.has_truncate(ino) {
            return Ok(());
        }
        // Another mount's truncate in flight holds the size lock from
        // before its record is written until after it is removed: wait
        // for it, so its record is read whole and only once it is done.
        let _remote = cf.remote_resize_guard()?;
        match self.intents.read_truncate(ino) {
            Ok(Some(record)) => match cf.settle_truncate(&record)? {
                Settled::Finished => {
                    tracing::info!("{label}: finished a truncate interrupted by a crash")
                }
                Settled::AlreadyDone | Settled::Stale => {}
            },
            Ok(None) => return Ok(()),
            // Written only part-way: the truncate had not started.
            Err(e) => tracing::debug!("{label}: unreadable truncate record removed: {e}"),
        }
        self.intents.remove_truncate(ino)
    }
}
