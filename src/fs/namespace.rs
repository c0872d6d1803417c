//! Namespace operations: lookup, create, mkdir, mknod, symlink, unlink,
//! rmdir, rename and link. A regular file is two backing objects (data and
//! sidecar), so several of these are two steps; docs/ARCHITECTURE.md lists
//! the crash windows between them.

use std::ffi::{CStr, CString, OsStr, OsString};
use std::fs::File;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::Arc;

use fuser::{FileAttr, FileType};

use super::crypt_file::{CryptFile, PendingDurability};
use super::error::{FsError, FsResult};
use super::handles::OpenFile;
use super::inode::{kind_of, Inode, Reach};
use super::{sidecar, sidecar_exists, sys, Caller, Core};
use crate::failpoint;
use crate::format::names::{is_reserved, NAME_MAX};
use crate::policy::is_within;

fn errno(e: i32) -> FsError {
    FsError::errno(e)
}

fn reject_reserved(name: &OsStr) -> FsResult<()> {
    if is_reserved(name.as_bytes()) {
        return Err(errno(libc::EPERM));
    }
    Ok(())
}

impl Core {
    pub fn lookup(&self, parent: u64, name: &OsStr) -> FsResult<FileAttr> {
        if is_reserved(name.as_bytes()) {
            return Err(errno(libc::ENOENT));
        }
        let dir = self.inodes.dir(parent)?;
        self.lookup_in(parent, &dir, name).map(|(_, a)| a)
    }

    /// Opens `name` in `parent` as an inode the kernel now knows.
    pub(super) fn lookup_in(
        &self, parent: u64, dir: &Inode, name: &OsStr,
    ) -> FsResult<(Arc<Inode>, FileAttr)> {
        let c = sys::cstr(name)?;
        let (fd, st) = stat_new(dir, &c)?;
        if kind_of(st.st_mode) == FileType::RegularFile
            && st.st_nlink > 1
            && !sidecar_exists(dir, name)?
        {
            // Every name the mount links has its own sidecar. A name without
            // one is a link made in the backing directory, and its inode is
            // the one the kernel may know by an encrypted file's name: once
            // known by this name, the file would be read and written through
            // it as well.
            return Err(FsError::backing(
                &self.inodes.label_at(dir, name),
                "has more than one link but no sidecar of its own (a hard link made outside \
                 the mount); refused",
            ));
        }
        let plain = self.plain_at(dir, name, &st)?;
        let inode = self.inodes.remember(parent, name, fd, &st);
        let attr = self.attr(&st, &inode, plain);
        Ok((inode, attr))
    }

    /// Owner of a new object, given by a handle on it (never by name: the
    /// name may have been swapped meanwhile): the caller, with the group
    /// inherited from a set-group-ID parent directory.
    fn chown_new(&self, parent: &Inode, new: RawFd, caller: Caller) -> FsResult<()> {
        if !self.is_root_user {
            return Ok(());
        }
        let pst = sys::fstat(parent.raw_fd())?;
        let setgid = pst.st_mode & libc::S_ISGID != 0;
        let gid = if setgid { pst.st_gid } else { caller.gid };
        // The daemon (root) created it as root, with the parent's group where
        // set-group-ID applies; chown only when that is not the answer.
        let created_gid = if setgid { pst.st_gid } else { 0 };
        if caller.uid != 0 || gid != created_gid {
            sys::fchownat(new, caller.uid, gid)?;
        }
        Ok(())
    }

    /// Creates a regular file with a fresh DEK; returns its open state.
    pub async fn create(
        &self, parent: u64, name: &OsStr, mode: u32, caller: Caller,
    ) -> FsResult<(FileAttr, OpenFile)> {
        reject_reserved(name)?;
        if self.read_only {
            return Err(errno(libc::EROFS));
        }
        let dir = self.inodes.dir(parent)?;
        let dfd = dir.raw_fd();
        let c = sys::cstr(name)?;
        if name.len() > NAME_MAX {
            return Err(errno(libc::ENAMETOOLONG));
        }
        if sys::fstatat(dfd, &c).is_ok() {
            // Checked before asking the KMS for a key that would go unused.
            return Err(errno(libc::EEXIST));
        }
        // A policy changed while mounted applies to this file already.
        self.refresh_policies();
        let policy = self.policy_in(&dir)?;
        let label = self.inodes.label_at(&dir, name);
        let new = self
            .keys
            .create(
                &policy,
                self.block_shift,
                &label,
                Some((caller.uid, caller.pid)),
            )
            .await?;
        let sidecar = sidecar::create_at(dfd, name, &new.header.raw, self.shared)?;
        failpoint::hit("create:after-sidecar");
        // O_EXCL: a new regular file or nothing, whatever was planted under
        // the name meanwhile (a symlink there fails with EEXIST).
        let data = match sys::openat(
            dfd,
            &c,
            libc::O_CREAT | libc::O_EXCL | libc::O_RDWR | libc::O_NOFOLLOW,
            mode & 0o7777,
        ) {
            Ok(fd) => fd,
            Err(e) => {
                // Only our own: another mount may have renamed its file
                // over the name meanwhile.
                let _ = sidecar::remove_own(dfd, name, &sidecar);
                return Err(e.into());
            }
        };
        // The pair exists: no other create may take the sidecar for a
        // leftover any more.
        sidecar::release_claim(&sidecar);
        failpoint::hit("create:after-data");
        self.chown_new(&dir, data.as_raw_fd(), caller)?;
        if mode & 0o7000 != 0 {
            // chown clears set-ID bits; put back what the caller asked for.
            sys::fchmod(data.as_raw_fd(), mode & 0o7777)?;
        }
        // Held while the file is open, as for every open file (see
        // `Core::crypt_file`): a rekey leaves it alone.
        self.mark_open(data.as_raw_fd())?;
        let st = sys::fstat(data.as_raw_fd())?;
        let inode = self.inodes.remember(parent, name, None, &st);
        *inode.header.write().unwrap() = Some(Arc::new(new.header));
        let cf = Arc::new(CryptFile::new(
            File::from(data),
            new.cipher,
            self.inodes.label(&inode),
            Some(PendingDurability {
                sidecar,
                parent_dir: dir.clone(),
            }),
        )?);
        self.adopt(&cf, inode.backing_ino);
        let open = OpenFile { cf, plain: false };
        inode.open_file.lock().unwrap().set(&open);
        Ok((self.attr(&st, &inode, false), open))
    }

    pub async fn create_open(
        &self, parent: u64, name: &OsStr, mode: u32, caller: Caller,
    ) -> FsResult<(FileAttr, u64)> {
        let (attr, open) = self.create(parent, name, mode, caller).await?;
        Ok((attr, self.handles.add_file(open, attr.ino.0)))
    }

    /// Removes the sidecar of `name` if there is one. Its space is freed on
    /// the reaper thread (see `background`), not while the caller waits.
    fn remove_sidecar(&self, dfd: i32, name: &OsStr) -> FsResult<()> {
        if let Some(held) = sidecar::remove_at(dfd, name)? {
            self.reaper.close_later(held);
        }
        Ok(())
    }

    pub fn mkdir(
        &self, parent: u64, name: &OsStr, mode: u32, caller: Caller,
    ) -> FsResult<FileAttr> {
        reject_reserved(name)?;
        let dir = self.inodes.dir(parent)?;
        let c = sys::cstr(name)?;
        sys::mkdirat(dir.raw_fd(), &c, mode & 0o7777)?;
        self.finish_new(parent, &dir, name, caller, FileType::Directory, Some(mode))
    }

    /// Common tail of mkdir/mknod/symlink: chown, then look up.
    fn finish_new(
        &self, parent: u64, dir: &Inode, name: &OsStr, caller: Caller, expected: FileType,
        mode: Option<u32>,
    ) -> FsResult<FileAttr> {
        let c = sys::cstr(name)?;
        // A handle on what was just created, checked to be that: a name
        // swapped for a hard link to another file (nlink > 1), for an object
        // of another type, or for one the daemon did not create (another
        // owner) is not chowned or chmodded.
        let handle = sys::open_path(dir.raw_fd(), &c)?;
        let st = sys::fstat(handle.as_raw_fd())?;
        let kind = kind_of(st.st_mode);
        let created_by_us = st.st_uid == unsafe { libc::geteuid() };
        if kind != expected || !created_by_us || (kind != FileType::Directory && st.st_nlink != 1) {
            return Err(FsError::backing(
                &self.inodes.label_at(dir, name),
                "was replaced in the backing directory while it was being created",
            ));
        }
        self.chown_new(dir, handle.as_raw_fd(), caller)?;
        if let Some(mode) = mode.filter(|m| m & 0o7000 != 0) {
            // chown clears set-ID bits; put back what the caller asked for.
            sys::chmod_path(&sys::proc_path(&handle), mode & 0o7777)?;
        }
        let st = sys::fstat(handle.as_raw_fd())?;
        let fd = (kind == FileType::Directory).then_some(handle);
        let inode = self.inodes.remember(parent, name, fd, &st);
        Ok(self.attr(&st, &inode, false))
    }

    pub async fn mknod(
        &self, parent: u64, name: &OsStr, mode: u32, rdev: u32, caller: Caller,
    ) -> FsResult<FileAttr> {
        reject_reserved(name)?;
        if mode & libc::S_IFMT == libc::S_IFREG || mode & libc::S_IFMT == 0 {
            return self
                .create(parent, name, mode & 0o7777, caller)
                .await
                .map(|(a, _)| a);
        }
        let dir = self.inodes.dir(parent)?;
        let c = sys::cstr(name)?;
        sys::mknodat(dir.raw_fd(), &c, mode, rdev as u64)?;
        self.finish_new(parent, &dir, name, caller, kind_of(mode), Some(mode))
    }

    pub fn symlink(
        &self, parent: u64, name: &OsStr, target: &Path, caller: Caller,
    ) -> FsResult<FileAttr> {
        reject_reserved(name)?;
        let dir = self.inodes.dir(parent)?;
        let c = sys::cstr(name)?;
        let t = sys::cstr(target.as_os_str())?;
        sys::symlinkat(&t, dir.raw_fd(), &c)?;
        self.finish_new(parent, &dir, name, caller, FileType::Symlink, None)
    }

    pub fn readlink(&self, ino: u64) -> FsResult<Vec<u8>> {
        let inode = self.inodes.get(ino)?;
        match self.inodes.reach(&inode)? {
            Reach::At(dir, name) => Ok(sys::readlinkat(dir.raw_fd(), &name)?),
            // An O_PATH handle on a symlink reads it with an empty name.
            Reach::Unlinked(fd) => Ok(sys::readlinkat(fd.as_raw_fd(), c"")?),
            Reach::Open(_) | Reach::Dir(_) => Err(errno(libc::EINVAL)),
        }
    }

    /// The entry `name` in directory `parent` that an unlink or rmdir is
    /// about to remove: the directory, the name, and the entry's stat.
    /// Reserved names do not exist as far as the mount is concerned.
    fn entry_to_remove(
        &self, parent: u64, name: &OsStr,
    ) -> FsResult<(Arc<Inode>, CString, libc::stat)> {
        if is_reserved(name.as_bytes()) {
            return Err(errno(libc::ENOENT));
        }
        let dir = self.inodes.dir(parent)?;
        let c = sys::cstr(name)?;
        let st = sys::fstatat(dir.raw_fd(), &c)?;
        Ok((dir, c, st))
    }

    pub fn unlink(&self, parent: u64, name: &OsStr) -> FsResult<()> {
        let (dir, c, st) = self.entry_to_remove(parent, name)?;
        let dfd = dir.raw_fd();
        self.inodes.pin_if_last_name(&dir, &c, &st);
        // Shared: between the two removals the sidecar looks left over;
        // held, no create on another mount takes it for one and makes a
        // new file whose sidecar this unlink would then remove.
        let _held = match kind_of(st.st_mode) {
            FileType::RegularFile if self.shared => sidecar::hold_for_removal(dfd, name)?,
            _ => None,
        };
        sys::unlinkat(dfd, &c, 0)?;
        if kind_of(st.st_mode) == FileType::RegularFile {
            failpoint::hit("unlink:after-data");
            self.remove_sidecar(dfd, name)?;
        }
        self.inodes.forget_name(parent, name, &st);
        Ok(())
    }

    pub fn rmdir(&self, parent: u64, name: &OsStr) -> FsResult<()> {
        let (dir, c, st) = self.entry_to_remove(parent, name)?;
        let dfd = dir.raw_fd();
        match sys::unlinkat(dfd, &c, libc::AT_REMOVEDIR) {
            Err(e) if e.raw_os_error() == Some(libc::ENOTEMPTY) => {
                // Empty to the user but holding leftover sidecars: remove them.
                let sub = sys::openat(
                    dfd,
                    &c,
                    libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW,
                    0,
                )?;
                let entries: Vec<OsString> =
                    std::fs::read_dir(OsStr::from_bytes(sys::proc_path(&sub).as_bytes()))?
                        .filter_map(|e| e.ok().map(|e| e.file_name()))
                        .collect();
                if entries.iter().any(|n| !is_reserved(n.as_bytes())) {
                    return Err(e.into());
                }
                for n in entries {
                    sys::unlinkat(sub.as_raw_fd(), &sys::cstr(&n)?, 0)?;
                }
                sys::unlinkat(dfd, &c, libc::AT_REMOVEDIR)?;
            }
            r => r?,
        }
        self.inodes.forget_name(parent, name, &st);
        Ok(())
    }

    pub fn rename(
        &self, parent: u64, name: &OsStr, newparent: u64, newname: &OsStr, flags: u32,
    ) -> FsResult<()> {
        if is_reserved(name.as_bytes()) {
            return Err(errno(libc::ENOENT));
        }
        reject_reserved(newname)?;
        let (od, nd) = (self.inodes.dir(parent)?, self.inodes.dir(newparent)?);
        let (ofd, nfd) = (od.raw_fd(), nd.raw_fd());
        let (oc, nc) = (sys::cstr(name)?, sys::cstr(newname)?);
        let src = sys::fstatat(ofd, &oc)?;
        let dst = sys::fstatat(nfd, &nc).ok();
        let exchange = flags & libc::RENAME_EXCHANGE != 0;
        self.check_same_policy(&od, name, kind_of(src.st_mode), &nd, newname)?;
        if let Some(d) = dst.filter(|_| exchange) {
            self.check_same_policy(&nd, newname, kind_of(d.st_mode), &od, name)?;
        }
        if let Some(d) = dst.filter(|_| !exchange) {
            self.inodes.pin_if_last_name(&nd, &nc, &d);
        }
        if (src.st_dev, src.st_ino) == dst.map_or((0, 0), |d| (d.st_dev, d.st_ino)) {
            // Two links to one file: rename(2) leaves both in place.
            return Ok(());
        }
        // Which of the two have a sidecar: not directories and the like, and
        // not plaintext pass-through files either.
        let has_sidecar = |dir: &Inode, name: &OsStr, st: &libc::stat| -> FsResult<bool> {
            Ok(kind_of(st.st_mode) == FileType::RegularFile && sidecar_exists(dir, name)?)
        };
        let src_sc = has_sidecar(&od, name, &src)?;
        let dst_sc = match &dst {
            Some(d) => has_sidecar(&nd, newname, d)?,
            None => false,
        };
        // What each name's sidecar becomes once the data has moved. Each is
        // staged as that name's successor sidecar first, so that after a
        // crash at any step the header a name's data needs is its sidecar
        // or its successor (docs/ARCHITECTURE.md, "Crash safety").
        use sidecar::Next;
        let mut moves: Vec<(RawFd, &OsStr, Next<'_>)> = Vec::with_capacity(2);
        if src_sc {
            moves.push((nfd, newname, Next::SidecarOf(ofd, name)));
        } else if dst_sc || (dst.is_some() && !exchange && sidecar_exists(&nd, newname)?) {
            // Whatever header the new name had (the replaced file's, or a
            // stray one) must not become this entry's.
            moves.push((nfd, newname, Next::Nothing));
        }
        if exchange {
            if dst_sc {
                moves.push((ofd, name, Next::SidecarOf(nfd, newname)));
            } else if src_sc {
                moves.push((ofd, name, Next::Nothing));
            }
        }
        let _moving = self.sidecar_moves.lock().unwrap();
        for (dir, n, next) in &moves {
            sidecar::stage_successor(*dir, n, next)?;
        }
        failpoint::hit("rename:after-successor");
        if let Err(e) = sys::renameat2(ofd, &oc, nfd, &nc, flags) {
            for (dir, n, _) in &moves {
                let _ = sidecar::remove_successor(*dir, n);
            }
            return Err(e.into());
        }
        failpoint::hit("rename:after-data");
        for (dir, n, next) in &moves {
            sidecar::promote_successor(*dir, n, next)?;
        }
        failpoint::hit("rename:after-sidecar");
        if src_sc && !exchange {
            // The source's name is gone; its sidecar is an orphan now.
            self.remove_sidecar(ofd, name)?;
        }
        drop(_moving);
        // Update where the kernel's inodes now live.
        let src_inode = self.inodes.known(&src);
        let dst_inode = dst.and_then(|d| self.inodes.known(&d));
        if let Some(d) = &dst_inode {
            d.drop_name(newparent, newname);
            if exchange {
                d.note_name(parent, name);
            }
        }
        if let Some(s) = src_inode {
            s.drop_name(parent, name);
            s.note_name(newparent, newname);
            if let Some(cf) = s.open_state() {
                cf.set_label(self.inodes.label(&s));
            }
        }
        Ok(())
    }

    /// Moving or linking an entry between subtrees protected by different
    /// keys fails with EXDEV (as fscrypt does), so tools fall back to a copy
    /// that is encrypted under the destination's key.
    fn check_same_policy(
        &self, od: &Inode, name: &OsStr, kind: FileType, nd: &Inode, newname: &OsStr,
    ) -> FsResult<()> {
        let policies = self.policies();
        if policies.len() == 1 {
            return Ok(());
        }
        let (Some(op), Some(np)) = (self.inodes.rel_path(od), self.inodes.rel_path(nd)) else {
            return Err(errno(libc::ENOENT));
        };
        let join =
            |dir: &str, n: &OsStr| format!("{}/{}", dir.trim_end_matches('/'), n.to_string_lossy());
        let (src, dst) = if kind == FileType::Directory {
            let src = join(&op, name);
            // A policy rooted inside the moved tree would no longer match.
            if policies
                .iter()
                .any(|p| p.policy.dir != src && is_within(&p.policy.dir, &src))
            {
                return Err(errno(libc::EXDEV));
            }
            (self.policy_at(&src), self.policy_at(&join(&np, newname)))
        } else {
            (self.policy_at(&op), self.policy_at(&np))
        };
        if src.policy.same_protection(&dst.policy) {
            Ok(())
        } else {
            Err(errno(libc::EXDEV))
        }
    }

    pub fn link(&self, ino: u64, newparent: u64, newname: &OsStr) -> FsResult<FileAttr> {
        reject_reserved(newname)?;
        let inode = self.inodes.get(ino)?;
        if inode.kind == FileType::Directory {
            return Err(errno(libc::EPERM));
        }
        let nd = self.inodes.dir(newparent)?;
        let nfd = nd.raw_fd();
        let nc = sys::cstr(newname)?;
        if let Some((parent, name)) = inode.location() {
            let od = self.inodes.dir(parent)?;
            self.check_same_policy(&od, &name, inode.kind, &nd, newname)?;
        }
        if sys::fstatat(nfd, &nc).is_ok() {
            return Err(errno(libc::EEXIST));
        }
        let reach = self.inodes.reach(&inode)?;
        let sidecar = if inode.kind == FileType::RegularFile {
            if self.is_plain(&inode, &reach.stat()?)? {
                // A file with two links is never passed through as plaintext,
                // so it would become unreadable under both names.
                return Err(FsError::refused(
                    &self.inodes.label(&inode),
                    "is a plaintext file: a second link would make it unreadable; copy it to a \
                     new name to encrypt it",
                ));
            }
            // Shared: as another mount last left it (a rekey there).
            let header = match self.shared {
                true => self.read_header(&inode)?,
                false => self.header_of(&inode)?,
            };
            let sidecar = sidecar::create_at(nfd, newname, &header.raw, self.shared)?;
            // Durable before the link can be: the new name leads to data
            // already written, which a power loss must not leave without
            // its header (a new file's header waits for its first fsync,
            // as its data does).
            if let Err(e) = sidecar.sync_data() {
                let _ = sidecar::remove_own(nfd, newname, &sidecar);
                return Err(e.into());
            }
            failpoint::synced();
            Some(sidecar)
        } else {
            None
        };
        failpoint::hit("link:after-sidecar");
        let linked = match reach {
            Reach::At(dir, name) => sys::linkat(dir.raw_fd(), &name, nfd, &nc, 0),
            // Open but unlinked: linkat of a file with no names fails anyway.
            Reach::Open(cf) => {
                sys::linkat(cf.file().as_raw_fd(), c"", nfd, &nc, libc::AT_EMPTY_PATH)
            }
            Reach::Dir(_) => return Err(errno(libc::EPERM)),
            // What linkat answers for a file with no names left.
            Reach::Unlinked(_) => return Err(errno(libc::ENOENT)),
        };
        if let Err(e) = linked {
            if let Some(sidecar) = &sidecar {
                let _ = sidecar::remove_own(nfd, newname, sidecar);
            }
            return Err(e.into());
        }
        failpoint::hit("link:after-data");
        let st = sys::fstatat(nfd, &nc)?;
        let linked = self.inodes.remember(newparent, newname, None, &st);
        // Two links now: not plaintext.
        Ok(self.attr(&st, &linked, false))
    }
}

/// Stats `name` in `dir`; for a directory also opens the O_PATH handle its
/// inode keeps. If the name was swapped for something else between the two
/// calls, what the handle found is described instead, and the handle is not
/// kept: only a directory is reached through its own handle.
pub(super) fn stat_new(dir: &Inode, c: &CStr) -> FsResult<(Option<OwnedFd>, libc::stat)> {
    let st = sys::fstatat(dir.raw_fd(), c)?;
    if kind_of(st.st_mode) != FileType::Directory {
        return Ok((None, st));
    }
    let fd = sys::open_path(dir.raw_fd(), c)?;
    let st = sys::fstat(fd.as_raw_fd())?;
    if kind_of(st.st_mode) != FileType::Directory {
        return Ok((None, st));
    }
    Ok((Some(fd), st))
}
