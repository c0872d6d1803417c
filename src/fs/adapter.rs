//! The fuser adapter: unpacks requests, calls [`Core`] once per request, and
//! turns results into replies. Errors become errno here, and are logged here
//! (once, with the request's name) when an operator should hear of them.

use std::ffi::OsStr;
use std::future::Future;
use std::path::Path;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime};

use fuser::{
    AccessFlags, BsdFileFlags, Errno, FileHandle, Filesystem, FopenFlags, Generation, INodeNo,
    InitFlags, KernelConfig, LockOwner, MountOption, OpenAccMode, OpenFlags, RenameFlags,
    ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory, ReplyDirectoryPlus, ReplyEmpty, ReplyEntry,
    ReplyOpen, ReplyStatfs, ReplyWrite, ReplyXattr, Request, Session, SessionACL, TimeOrNow,
    WriteFlags,
};

use super::error::FsResult;
use super::shared::AppLock;
use super::{Caller, Core, SetAttr};

/// Largest read/write request we ask the kernel for (it allows 256 pages).
const MAX_REQUEST: u32 = 1 << 20;

#[derive(Clone, Debug)]
pub struct MountOptions {
    pub read_only: bool,
    /// `-o shared`: other mounts may change the backing directory
    /// (docs/MOUNTING.md, "Shared mounts").
    pub shared: bool,
    pub allow_other: bool,
    /// FUSE worker threads.
    pub threads: usize,
    /// How long the kernel may cache attributes and names.
    pub attr_ttl: Duration,
    /// Extra options for the kernel: mount flags by name (noexec, sync,
    /// dirsync), anything else as-is in the FUSE option string.
    pub extra: Vec<String>,
    pub fs_name: String,
}

pub struct KmsFs {
    core: Arc<Core>,
    ttl: Duration,
    /// Ask for the kernel's writeback cache (never on read-only mounts).
    writeback_cache: bool,
    /// Answer FLUSH with ENOSYS (see `flush`).
    refuse_flush: bool,
    /// Let the kernel keep a file's cached pages across opens. Off for a
    /// read-write shared mount: an open must see what others wrote
    /// (close-to-open consistency, as NFS).
    keep_cache: bool,
    /// Forward applications' locks to the backing files (shared mounts).
    forward_locks: bool,
    /// Set once mounted, for a read-write shared mount: drops the kernel's
    /// cached attributes of a file at its open (see `open`).
    attr_invalidator: Arc<OnceLock<fuser::Notifier>>,
}

fn caller(req: &Request) -> Caller {
    Caller {
        uid: req.uid(),
        gid: req.gid(),
        pid: req.pid(),
    }
}

/// A fuser reply that can carry an error.
trait ErrorReply {
    fn error(self, e: Errno);
}

macro_rules! error_reply {
    ($($t:ty),*) => {$(
        impl ErrorReply for $t {
            fn error(self, e: Errno) {
                <$t>::error(self, e)
            }
        }
    )*};
}
error_reply!(
    ReplyAttr,
    ReplyCreate,
    ReplyData,
    ReplyDirectory,
    ReplyDirectoryPlus,
    ReplyEmpty,
    ReplyEntry,
    ReplyOpen,
    ReplyStatfs,
    ReplyWrite,
    ReplyXattr
);

/// Replies to request `op` with `ok(reply, value)`, or with the error's
/// errno after logging it (`FsError::log`).
fn answer<R: ErrorReply, T>(op: &'static str, reply: R, r: FsResult<T>, ok: impl FnOnce(R, T)) {
    match r {
        Ok(v) => ok(reply, v),
        Err(e) => {
            e.log(op);
            reply.error(Errno::from_i32(e.to_errno()));
        }
    }
}

fn answer_empty(op: &'static str, reply: ReplyEmpty, r: FsResult<()>) {
    answer(op, reply, r, |reply, ()| reply.ok());
}

impl KmsFs {
    /// How opened files may use the kernel's page cache.
    fn open_flags(&self) -> FopenFlags {
        if self.keep_cache {
            FopenFlags::FOPEN_KEEP_CACHE
        } else {
            FopenFlags::empty()
        }
    }

    fn entry(&self, op: &'static str, reply: ReplyEntry, r: FsResult<fuser::FileAttr>) {
        let ttl = self.ttl;
        answer(op, reply, r, |reply, attr| {
            reply.entry(&ttl, &attr, Generation(0))
        });
    }

    /// Runs `work`, which may wait for the KMS, without holding this FUSE
    /// thread when it has to wait (`KmsRuntime::run_or_spawn`), then replies.
    fn answer_later<R, T, F, K>(&self, op: &'static str, reply: R, work: F, ok: K)
    where
        R: ErrorReply + Send + 'static,
        T: Send + 'static,
        F: Future<Output = FsResult<T>> + Send + 'static,
        K: FnOnce(R, T, Duration) + Send + 'static,
    {
        let ttl = self.ttl;
        self.core.runtime().run_or_spawn(async move {
            answer(op, reply, work.await, |reply, v| ok(reply, v, ttl));
        });
    }

    fn xattr_reply(op: &'static str, reply: ReplyXattr, size: u32, r: FsResult<Vec<u8>>) {
        answer(op, reply, r, |reply, v| {
            if size == 0 {
                reply.size(v.len() as u32)
            } else if v.len() > size as usize {
                reply.error(Errno::from_i32(libc::ERANGE))
            } else {
                reply.data(&v)
            }
        });
    }
}

impl Filesystem for KmsFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        let _ = config.set_max_write(MAX_REQUEST);
        let _ = config.set_max_readahead(MAX_REQUEST);
        let _ = config.add_capabilities(InitFlags::FUSE_PARALLEL_DIROPS);
        let _ = config
            .add_capabilities(InitFlags::FUSE_DO_READDIRPLUS | InitFlags::FUSE_READDIRPLUS_AUTO);
        if self.writeback_cache {
            let _ = config.add_capabilities(InitFlags::FUSE_WRITEBACK_CACHE);
        }
        if self.forward_locks {
            let _ =
                config.add_capabilities(InitFlags::FUSE_POSIX_LOCKS | InitFlags::FUSE_FLOCK_LOCKS);
        }
        if !self.keep_cache {
            // Cached pages also go when a getattr shows another size or
            // mtime, not only at the next open.
            let _ = config.add_capabilities(InitFlags::FUSE_AUTO_INVAL_DATA);
        }
        // We clear set-ID bits and capabilities on write, truncate and chown
        // (the backing chown does it), so the kernel need not ask for
        // security.capability before every write.
        let _ = config.add_capabilities(InitFlags::FUSE_HANDLE_KILLPRIV_V2);
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        self.entry("lookup", reply, self.core.lookup(parent.0, name));
    }

    fn forget(&self, _req: &Request, ino: INodeNo, nlookup: u64) {
        self.core.forget(ino.0, nlookup);
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        let ttl = self.ttl;
        answer("getattr", reply, self.core.getattr(ino.0), |reply, a| {
            reply.attr(&ttl, &a)
        });
    }

    fn setattr(
        &self, req: &Request, ino: INodeNo, mode: Option<u32>, uid: Option<u32>, gid: Option<u32>,
        size: Option<u64>, atime: Option<TimeOrNow>, mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>, fh: Option<FileHandle>, _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>, _bkuptime: Option<SystemTime>, _flags: Option<BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let set = SetAttr {
            mode,
            uid,
            gid,
            size,
            atime,
            mtime,
            fh: fh.map(|f| f.0),
        };
        let (core, who) = (self.core.clone(), caller(req));
        let work = async move { core.setattr(ino.0, set, who).await };
        self.answer_later("setattr", reply, work, |reply, a, ttl| reply.attr(&ttl, &a));
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        answer("readlink", reply, self.core.readlink(ino.0), |reply, t| {
            reply.data(&t)
        });
    }

    fn mknod(
        &self, req: &Request, parent: INodeNo, name: &OsStr, mode: u32, umask: u32, rdev: u32,
        reply: ReplyEntry,
    ) {
        let (core, who, name) = (self.core.clone(), caller(req), name.to_owned());
        let work = async move { core.mknod(parent.0, &name, mode & !umask, rdev, who).await };
        self.answer_later("mknod", reply, work, |reply, a, ttl| {
            reply.entry(&ttl, &a, Generation(0))
        });
    }

    fn mkdir(
        &self, req: &Request, parent: INodeNo, name: &OsStr, mode: u32, umask: u32,
        reply: ReplyEntry,
    ) {
        let r = self.core.mkdir(parent.0, name, mode & !umask, caller(req));
        self.entry("mkdir", reply, r);
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        answer_empty("unlink", reply, self.core.unlink(parent.0, name));
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        answer_empty("rmdir", reply, self.core.rmdir(parent.0, name));
    }

    fn symlink(
        &self, req: &Request, parent: INodeNo, link_name: &OsStr, target: &Path, reply: ReplyEntry,
    ) {
        let r = self.core.symlink(parent.0, link_name, target, caller(req));
        self.entry("symlink", reply, r);
    }

    fn rename(
        &self, _req: &Request, parent: INodeNo, name: &OsStr, newparent: INodeNo, newname: &OsStr,
        flags: RenameFlags, reply: ReplyEmpty,
    ) {
        let r = self
            .core
            .rename(parent.0, name, newparent.0, newname, flags.bits());
        answer_empty("rename", reply, r);
    }

    fn link(
        &self, _req: &Request, ino: INodeNo, newparent: INodeNo, newname: &OsStr, reply: ReplyEntry,
    ) {
        self.entry("link", reply, self.core.link(ino.0, newparent.0, newname));
    }

    fn open(&self, req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        // O_TRUNC comes as a SETATTR after the open: nothing to fill.
        let reading_only =
            flags.acc_mode() == OpenAccMode::O_RDONLY && flags.0 & libc::O_TRUNC == 0;
        let core = self.core.clone();
        let who = caller(req);
        let work = async move { core.open(ino.0, reading_only, who).await };
        if let Some(notifier) = self.attr_invalidator.get() {
            // Close-to-open: the size another mount left at its close must
            // be what this open reads up to, not the kernel's cached one
            // (up to attr_timeout old). A negative offset drops only the
            // attributes (pages go anyway: no FOPEN_KEEP_CACHE).
            if let Err(e) = notifier.inval_inode(ino, -1, 0) {
                tracing::debug!("cannot drop cached attributes of inode {}: {e}", ino.0);
            }
        }
        let flags = self.open_flags();
        self.answer_later("open", reply, work, move |reply, fh, _| {
            reply.opened(FileHandle(fh), flags)
        });
    }

    fn read(
        &self, _req: &Request, _ino: INodeNo, fh: FileHandle, offset: u64, size: u32,
        _flags: OpenFlags, _lock_owner: Option<LockOwner>, reply: ReplyData,
    ) {
        super::with_plaintext_scratch(|buf| {
            let r = self.core.read(fh.0, offset, size as usize, buf);
            answer("read", reply, r, |reply, ()| reply.data(buf));
        });
    }

    fn write(
        &self, _req: &Request, _ino: INodeNo, fh: FileHandle, offset: u64, data: &[u8],
        write_flags: WriteFlags, _flags: OpenFlags, _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        let kill = write_flags.contains(WriteFlags::FUSE_WRITE_KILL_SUIDGID);
        let r = self.core.write(fh.0, offset, data, kill);
        answer("write", reply, r, |reply, ()| {
            reply.written(data.len() as u32)
        });
    }

    fn flush(
        &self, _req: &Request, _ino: INodeNo, fh: FileHandle, lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        if self.forward_locks {
            // A close drops the closer's POSIX locks; the kernel leaves
            // that to FLUSH when the filesystem holds the locks.
            self.core.release_locks(fh.0, lock_owner.0);
            reply.ok();
            return;
        }
        // Writes go straight to the backing file; nothing is buffered here.
        // ENOSYS tells the kernel so once: it stops sending FLUSH on every
        // close (one round trip per file saved). Linux 6.1 and later (read
        // in its fuse_flush) still write back dirty pages and report their
        // errors at close then; older kernels skip that, so they keep
        // getting an answer.
        if self.refuse_flush {
            reply.error(Errno::from_i32(libc::ENOSYS));
        } else {
            reply.ok();
        }
    }

    fn release(
        &self, _req: &Request, _ino: INodeNo, fh: FileHandle, _flags: OpenFlags,
        lock_owner: Option<LockOwner>, _flush: bool, reply: ReplyEmpty,
    ) {
        if let Some(owner) = lock_owner.filter(|_| self.forward_locks) {
            // flock locks go with the open file that took them.
            self.core.release_locks(fh.0, owner.0);
        }
        self.core.release(fh.0);
        reply.ok();
    }

    fn fsync(
        &self, _req: &Request, _ino: INodeNo, fh: FileHandle, datasync: bool, reply: ReplyEmpty,
    ) {
        answer_empty("fsync", reply, self.core.fsync(fh.0, datasync));
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        answer("opendir", reply, self.core.opendir(ino.0), |reply, fh| {
            reply.opened(FileHandle(fh), FopenFlags::empty())
        });
    }

    fn readdir(
        &self, _req: &Request, _ino: INodeNo, fh: FileHandle, offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let r = self.core.readdir(fh.0, offset, |ino, off, kind, name| {
            reply.add(INodeNo(ino), off, kind, name)
        });
        answer("readdir", reply, r, |reply, ()| reply.ok());
    }

    fn readdirplus(
        &self, _req: &Request, ino: INodeNo, fh: FileHandle, offset: u64,
        mut reply: ReplyDirectoryPlus,
    ) {
        let ttl = self.ttl;
        let r = self
            .core
            .readdirplus(ino.0, fh.0, offset, |ino, off, name, attr| {
                reply.add(INodeNo(ino), off, name, &ttl, attr, Generation(0))
            });
        answer("readdirplus", reply, r, |reply, ()| reply.ok());
    }

    fn releasedir(
        &self, _req: &Request, _ino: INodeNo, fh: FileHandle, _flags: OpenFlags, reply: ReplyEmpty,
    ) {
        self.core.releasedir(fh.0);
        reply.ok();
    }

    fn fsyncdir(
        &self, _req: &Request, ino: INodeNo, _fh: FileHandle, _datasync: bool, reply: ReplyEmpty,
    ) {
        answer_empty("fsyncdir", reply, self.core.fsyncdir(ino.0));
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        answer("statfs", reply, self.core.statfs(), |reply, s| {
            reply.statfs(
                s.f_blocks,
                s.f_bfree,
                s.f_bavail,
                s.f_files,
                s.f_ffree,
                s.f_bsize as u32,
                255,
                s.f_frsize as u32,
            )
        });
    }

    fn setxattr(
        &self, _req: &Request, ino: INodeNo, name: &OsStr, value: &[u8], flags: i32,
        _position: u32, reply: ReplyEmpty,
    ) {
        let r = self.core.setxattr(ino.0, name, value, flags);
        answer_empty("setxattr", reply, r);
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        Self::xattr_reply("getxattr", reply, size, self.core.getxattr(ino.0, name));
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        Self::xattr_reply("listxattr", reply, size, self.core.listxattr(ino.0));
    }

    fn removexattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        answer_empty("removexattr", reply, self.core.removexattr(ino.0, name));
    }

    fn access(&self, _req: &Request, _ino: INodeNo, _mask: AccessFlags, reply: ReplyEmpty) {
        // default_permissions: the kernel has already checked.
        reply.ok();
    }

    fn create(
        &self, req: &Request, parent: INodeNo, name: &OsStr, mode: u32, umask: u32, _flags: i32,
        reply: ReplyCreate,
    ) {
        let (core, who, name) = (self.core.clone(), caller(req), name.to_owned());
        let work = async move { core.create_open(parent.0, &name, mode & !umask, who).await };
        let flags = self.open_flags();
        self.answer_later("create", reply, work, move |reply, (attr, fh), ttl| {
            reply.created(&ttl, &attr, Generation(0), FileHandle(fh), flags)
        });
    }

    fn getlk(
        &self, _req: &Request, _ino: INodeNo, fh: FileHandle, lock_owner: LockOwner, start: u64,
        end: u64, typ: i32, pid: u32, reply: fuser::ReplyLock,
    ) {
        let lock = AppLock {
            owner: lock_owner.0,
            start,
            end,
            typ,
        };
        match self.core.getlk(fh.0, &lock) {
            Ok(None) => reply.locked(start, end, libc::F_UNLCK, pid),
            // The holder may be on another machine: no pid to give.
            Ok(Some((typ, start, end))) => reply.locked(start, end, typ, 0),
            Err(e) => {
                e.log("getlk");
                reply.error(Errno::from_i32(e.to_errno()));
            }
        }
    }

    fn setlk(
        &self, _req: &Request, _ino: INodeNo, fh: FileHandle, lock_owner: LockOwner, start: u64,
        end: u64, typ: i32, _pid: u32, sleep: bool, reply: ReplyEmpty,
    ) {
        let lock = AppLock {
            owner: lock_owner.0,
            start,
            end,
            typ,
        };
        if !sleep || typ == libc::F_UNLCK {
            answer_empty("setlk", reply, self.core.setlk(fh.0, &lock, false));
            return;
        }
        // F_SETLKW waits for as long as another holder keeps its lock: on
        // its own thread, never a FUSE worker's.
        let core = self.core.clone();
        let spawned = std::thread::Builder::new()
            .name("kmsfs-lockwait".into())
            .spawn(move || answer_empty("setlk", reply, core.setlk(fh.0, &lock, true)));
        if let Err(e) = spawned {
            tracing::warn!("cannot start a thread to wait for a lock: {e}");
        }
    }

    fn ioctl(
        &self, _req: &Request, _ino: INodeNo, _fh: FileHandle, _flags: fuser::IoctlFlags,
        _cmd: u32, _in_data: &[u8], _out_size: u32, reply: fuser::ReplyIoctl,
    ) {
        // No ioctls (programs probe e.g. TCGETS on every open): answer
        // quietly, as a regular file on a local disk does.
        reply.error(Errno::from_i32(libc::ENOTTY));
    }

    fn fallocate(
        &self, _req: &Request, _ino: INodeNo, fh: FileHandle, offset: u64, length: u64, mode: i32,
        reply: ReplyEmpty,
    ) {
        let r = self.core.fallocate(fh.0, offset, length, mode);
        answer_empty("fallocate", reply, r);
    }
}

/// Mounts `core` at `mountpoint`. Returns once the kernel has completed the
/// FUSE handshake, i.e. the mount is ready; the caller then runs the session.
pub fn mount(
    core: Arc<Core>, mountpoint: &Path, opts: &MountOptions,
) -> std::io::Result<Session<KmsFs>> {
    let mut options = vec![
        MountOption::FSName(opts.fs_name.clone()),
        MountOption::Subtype("kmsfs".into()),
        MountOption::DefaultPermissions,
        MountOption::NoAtime,
        // Whoever can write the backing directory must not gain set-ID
        // binaries or device nodes through the mount.
        MountOption::NoSuid,
        MountOption::NoDev,
    ];
    if opts.read_only {
        options.push(MountOption::RO);
    }
    options.extend(opts.extra.iter().map(|o| kernel_option(o)));
    let mut config = fuser::Config::default();
    config.mount_options = options;
    config.acl = if opts.allow_other {
        SessionACL::All
    } else {
        SessionACL::Owner
    };
    config.n_threads = Some(opts.threads.max(1));
    config.clone_fd = true;
    let filler_core = core.clone();
    // A read-only shared mount is the fleet mode: files there are not
    // rewritten in place, so it caches as a lone mount does.
    let changing_elsewhere = opts.shared && !opts.read_only;
    let attr_invalidator = Arc::new(OnceLock::new());
    let fs = KmsFs {
        core,
        ttl: opts.attr_ttl,
        writeback_cache: !opts.read_only && !opts.shared,
        refuse_flush: !opts.shared && super::sys::kernel_version().is_some_and(|v| v >= (6, 1)),
        keep_cache: !changing_elsewhere,
        forward_locks: opts.shared,
        attr_invalidator: attr_invalidator.clone(),
    };
    let session = Session::new(fs, mountpoint, &config)?;
    let notifier = session.notifier();
    if changing_elsewhere {
        let _ = attr_invalidator.set(session.notifier());
    }
    if !changing_elsewhere {
        // Pages stored at an open would be dropped by that very open.
        filler_core.set_page_filler(Box::new(move |ino, data| {
            notifier.store(INodeNo(ino), 0, data)
        }));
    }
    raise_readahead(mountpoint);
    Ok(session)
}

/// A mount flag by name is a flag of mount(2), not part of the FUSE
/// option string (where the kernel would refuse it with EINVAL).
fn kernel_option(name: &str) -> MountOption {
    match name {
        "noexec" => MountOption::NoExec,
        "sync" => MountOption::Sync,
        "dirsync" => MountOption::DirSync,
        other => MountOption::CUSTOM(other.to_owned()),
    }
}

/// The kernel caps a FUSE mount's readahead at its default (128 KiB) even
/// when max_readahead is larger; raising the mount's bdi setting lets
/// sequential reads arrive as 1 MiB requests. Best effort (needs root).
fn raise_readahead(mountpoint: &Path) {
    // Read the device from mountinfo: a stat() of the mountpoint would be a
    // FUSE request that nobody serves yet.
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return;
    };
    let dev = info.lines().rev().find_map(|l| {
        let f: Vec<&str> = l.split(' ').collect();
        (f.get(4).map(Path::new) == Some(mountpoint)).then(|| f[2].to_owned())
    });
    if let Some(dev) = dev {
        let path = format!("/sys/class/bdi/{dev}/read_ahead_kb");
        if let Err(e) = std::fs::write(&path, (MAX_REQUEST / 1024).to_string()) {
            tracing::debug!("cannot raise readahead via {path}: {e}");
        }
    }
}
