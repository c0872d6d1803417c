//! The filesystem: [`Core`], the backing-directory logic behind every
//! request, and `adapter`, the thin fuser layer over it.
//!
//! `Core` coordinates small modules, each owning one concern:
//! - `inode`: the inode table and how each backing object is reached;
//! - `handles`: open file and directory handles;
//! - `namespace`: lookup, create, unlink, rename, link and friends;
//! - `attr`, `dir`, `xattr`: getattr/setattr, listings, extended attributes;
//! - `sidecar`: reading and writing header files (also used by the CLI);
//! - `file_keys`: the only place DEKs are handled (header -> cipher);
//! - `prefetch`: readying a directory's keys before its files are opened;
//! - `crypt_file`: the data path of one file (read, write, truncate);
//! - `sys`, `error`, `background`: syscalls, errors, helper threads.
//!
//! `Core` knows nothing of fuser's reply types, so it is driven directly in
//! tests (tests/core.rs) without a kernel.

mod adapter;
mod attr;
mod background;
pub mod crypt_file;
mod dir;
pub mod error;
pub mod file_keys;
mod handles;
pub mod ik_store;
mod inode;
pub(crate) mod intents;
mod namespace;
mod prefetch;
mod recovery;
pub(crate) mod shared;
pub mod sidecar;
mod subdir;
pub(crate) mod sys;
pub mod walk;
mod xattr;

pub use adapter::{mount, MountOptions};
pub use attr::SetAttr;
pub use inode::escape_name;
pub use shared::check_byte_range_locks;

use std::ffi::OsStr;
use std::fs::File;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::{Arc, OnceLock, RwLock};

use fuser::FileType;

use crate::cache::DekCache;
use crate::config::{ActivePolicy, KeySpec, VolumeConfig};
use crate::crypto::BlockCipher;
use crate::format::block::BlockLayout;
use crate::format::names::sidecar_name;
use crate::format::BlockGeometry;
use crate::kms::{KeyProvider, KmsRuntime};
use crate::metrics::Metrics;
use crate::policy::governing_by;
use background::Worker;
use crypt_file::CryptFile;
use error::{FsError, FsResult};
use file_keys::FileKeys;
use handles::{HandleTable, OpenFile};
use inode::{kind_of, Inode, InodeTable};
use prefetch::PrefetchedDirs;
use sidecar::FileHeader;

/// Plaintext put into the kernel's page cache when a file is first opened
/// for reading (a whole small file; see `Core::fill_page_cache`). Its
/// ciphertext is read ahead at every first open.
const OPEN_FILL: u64 = 128 * 1024;

/// Why a plaintext pass-through file gets no writes, and what to do instead.
const PLAINTEXT_READ_ONLY: &str = "is a plaintext file (no sidecar, under a policy that is not \
     mandatory): writing to it is refused so that no new data is stored unencrypted; copy it to \
     a new name to encrypt it";

/// See `Core::set_page_filler`: (FUSE inode, bytes for offset 0).
pub type PageFiller = Box<dyn Fn(u64, &[u8]) -> std::io::Result<()> + Send + Sync>;

thread_local! {
    /// Per-thread plaintext scratch, reused so that READ replies and
    /// page-cache fills do not allocate per request. Neither use runs inside
    /// the other, so it is never borrowed twice.
    static PLAINTEXT: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Runs `f` with this thread's plaintext scratch (see `PLAINTEXT`).
pub(crate) fn with_plaintext_scratch<R>(f: impl FnOnce(&mut Vec<u8>) -> R) -> R {
    PLAINTEXT.with(|buf| f(&mut buf.borrow_mut()))
}

/// Where a mount learns that the volume's configuration changed (`kmsfs
/// policy set/unset` while mounted), and gets its policies again.
pub trait PolicySource: Send + Sync {
    /// Whether the configuration changed since it was last taken up (one
    /// `stat`; no KMS call).
    fn stale(&self) -> bool;
    /// The policies of the configuration as it is now, connected and
    /// checked (see `config::Volume::reload`), if they changed; `None`
    /// also when the change cannot be used (logged) or another thread is
    /// taking it up. Called on a thread of its own (it may block on the
    /// KMS runtime).
    fn reload(&self, rt: &KmsRuntime) -> Option<Vec<ActivePolicy>>;
}

/// See [`PolicySource`].
pub type Reloader = Box<dyn PolicySource>;

/// The volume's policies as one snapshot, replaced whole (never edited)
/// when the configuration changes, with what follows from them.
pub(crate) struct Policies {
    list: Vec<ActivePolicy>,
    /// Some policy lets sidecar-less (plaintext) files through.
    any_optional: bool,
}

impl Policies {
    fn new(list: Vec<ActivePolicy>) -> Self {
        let any_optional = list.iter().any(|p| !p.policy.mandatory);
        Policies { list, any_optional }
    }
}

impl std::ops::Deref for Policies {
    type Target = [ActivePolicy];
    fn deref(&self) -> &[ActivePolicy] {
        &self.list
    }
}

/// One policy of a snapshot of the policies: stays valid while the
/// policies are replaced.
pub(crate) struct PolicyRef {
    snapshot: Arc<Policies>,
    index: usize,
}

impl std::ops::Deref for PolicyRef {
    type Target = ActivePolicy;
    fn deref(&self) -> &ActivePolicy {
        &self.snapshot[self.index]
    }
}

/// Who asked: new objects are owned by them.
#[derive(Clone, Copy)]
pub struct Caller {
    pub uid: u32,
    pub gid: u32,
    /// For the audit log.
    pub pid: u32,
}

/// Backing-directory state shared by all FUSE threads.
pub struct Core {
    inodes: InodeTable,
    handles: HandleTable,
    /// The volume's block size (log2), which every file's header repeats.
    block_shift: u8,
    /// Files of format 1 may be present (an upgraded volume): their block
    /// layout, and so their size, is read from their header; otherwise
    /// every encrypted file has layout V2 and its size follows from its
    /// ciphertext size alone.
    legacy_v1_files: bool,
    /// Key policies with their KMS connected; one has dir "/". Replaced
    /// whole when the volume's configuration changes (`reloader`).
    policies: RwLock<Arc<Policies>>,
    /// Reads the volume's policies again if its configuration changed; set
    /// by the mount (see `set_reloader`).
    reloader: OnceLock<Reloader>,
    keys: FileKeys,
    runtime: KmsRuntime,
    metrics: Arc<Metrics>,
    read_only: bool,
    /// `-o shared`: other mounts may change the backing directory at any
    /// time (see `shared`): headers are read again at every open, open
    /// files read their length from the backing file and lock it around
    /// changes.
    shared: bool,
    prefetched: PrefetchedDirs,
    /// Closes descriptors of unlinked backing files off the request path.
    reaper: Worker,
    /// Reads sidecars ahead for the local keyring (`prefetch_siblings`).
    readahead: Worker,
    /// Puts plaintext at offset 0 of a FUSE inode into the kernel's page
    /// cache (FUSE_NOTIFY_STORE). Set by the FUSE adapter once mounted;
    /// unset where `Core` is driven without a kernel (then nothing is filled).
    page_filler: OnceLock<PageFiller>,
    is_root_user: bool,
    /// Held while a rename moves sidecars, and while an open settles a
    /// successor sidecar left by an interrupted one (`recovery`): the two
    /// must not interleave on one name.
    sidecar_moves: std::sync::Mutex<()>,
    /// Redo records of truncates in flight (`format::intent`).
    intents: Arc<intents::IntentDir>,
}

impl Core {
    pub fn new(
        backing: &Path, volume: &VolumeConfig, policies: Vec<ActivePolicy>, cache: DekCache,
        runtime: KmsRuntime, metrics: Arc<Metrics>, read_only: bool,
    ) -> std::io::Result<Self> {
        let c = sys::cstr(backing.as_os_str())?;
        let fd = sys::openat(libc::AT_FDCWD, &c, libc::O_PATH | libc::O_DIRECTORY, 0)?;
        let fd_for_intents = fd.try_clone()?;
        Ok(Core {
            inodes: InodeTable::new(fd)?,
            handles: HandleTable::default(),
            block_shift: volume.geometry_shift(),
            legacy_v1_files: volume.legacy_v1_files,
            policies: RwLock::new(Arc::new(Policies::new(policies))),
            reloader: OnceLock::new(),
            keys: FileKeys::new(cache, volume.id(), volume.legacy_v1_files),
            runtime,
            metrics,
            read_only,
            shared: false,
            prefetched: PrefetchedDirs::default(),
            reaper: Worker::start("kmsfs-reaper", 1024),
            readahead: Worker::start("kmsfs-readahead", 64),
            page_filler: OnceLock::new(),
            is_root_user: unsafe { libc::geteuid() } == 0,
            sidecar_moves: std::sync::Mutex::new(()),
            intents: Arc::new(intents::IntentDir::new(fd_for_intents)?),
        })
    }

    /// Serves the backing directory beside other mounts of it (`-o
    /// shared`, see the field).
    pub fn with_shared(mut self, shared: bool) -> Self {
        self.shared = shared;
        self
    }

    /// Whether this is a `-o shared` mount.
    pub fn is_shared(&self) -> bool {
        self.shared
    }

    /// Installs how file heads reach the kernel's page cache (see
    /// `fill_page_cache`); the first one installed stays.
    pub fn set_page_filler(&self, filler: PageFiller) {
        let _ = self.page_filler.set(filler);
    }

    /// Logs key operations to `audit` from now on.
    pub fn set_audit_log(&self, audit: Arc<crate::audit::AuditLog>) {
        self.keys.set_audit_log(audit);
    }

    /// Installs how the policies are read again after a change to the
    /// volume's configuration; the first one installed stays.
    pub fn set_reloader(&self, reloader: Reloader) {
        let _ = self.reloader.set(reloader);
    }

    /// Takes up the volume's policies as they are now, if they changed.
    /// Called where a stale policy would do harm: before a new file's key
    /// is chosen, and when a file's key is refused.
    fn refresh_policies(&self) -> bool {
        let Some(source) = self.reloader.get() else {
            return false;
        };
        if !source.stale() {
            return false;
        }
        // On a thread of its own: this one may be in the KMS runtime's
        // context (a FUSE worker polling a request, or a runtime worker),
        // where connecting a new key (which blocks on the runtime) panics.
        let runtime = &self.runtime;
        let reloaded = std::thread::scope(|s| s.spawn(|| source.reload(runtime)).join());
        let Ok(Some(new)) = reloaded else {
            return false;
        };
        *self.policies.write().unwrap() = Arc::new(Policies::new(new));
        true
    }

    /// The policies as they are now.
    fn policies(&self) -> Arc<Policies> {
        self.policies.read().unwrap().clone()
    }

    /// Every key the policies name now, once each, with its connected
    /// provider: what a readiness probe asks.
    pub fn policy_keys(&self) -> Vec<(KeySpec, Arc<dyn KeyProvider>)> {
        let mut keys: Vec<(KeySpec, Arc<dyn KeyProvider>)> = Vec::new();
        for p in self.policies().iter() {
            for (spec, provider) in p.policy.keys().zip(&p.keys) {
                if !keys.iter().any(|(k, _)| k == spec) {
                    keys.push((spec.clone(), provider.clone()));
                }
            }
        }
        keys
    }

    pub fn runtime(&self) -> &KmsRuntime {
        &self.runtime
    }

    pub fn render_metrics(&self) -> String {
        self.metrics
            .render(self.keys.cache_stats(), self.keys.pool_stats())
    }

    /// Keeps up to `entries` pre-wrapped DEKs per remote key, so that
    /// creates make no KMS call (`dek_pool`; 0, the default, turns it off).
    pub fn set_dek_pool(&self, entries: usize) {
        self.keys.set_dek_pool(entries);
    }

    /// The policy governing mount-relative `path`.
    fn policy_at(&self, path: &str) -> PolicyRef {
        let snapshot = self.policies();
        let index = governing_by(snapshot.iter().map(|p| p.policy.dir.as_str()), path);
        PolicyRef { snapshot, index }
    }

    /// The policy for new files in directory `dir`.
    fn policy_in(&self, dir: &Inode) -> FsResult<PolicyRef> {
        let path = self
            .inodes
            .rel_path(dir)
            .ok_or_else(|| FsError::errno(libc::ENOENT))?;
        Ok(self.policy_at(&path))
    }

    /// The geometry of files this mount creates (format 2).
    fn new_file_geometry(&self) -> BlockGeometry {
        BlockGeometry::new(self.block_shift, BlockLayout::V2).expect("validated with the volume")
    }

    /// The geometry a regular file's size is computed with: format 2's,
    /// unless the volume may hold format 1 files, whose header says.
    fn size_geometry(&self, inode: &Inode) -> BlockGeometry {
        if self.legacy_v1_files {
            if let Ok(h) = self.header_of(inode) {
                return h.parsed.header.geometry;
            }
        }
        self.new_file_geometry()
    }

    pub fn forget(&self, ino: u64, n: u64) {
        // The pinned handle is closed off the request path: closing the last
        // handle on an unlinked file frees its blocks (rm -rf spent most of
        // its time waiting for the table while that happened).
        if let Some(inode) = self.inodes.forget(ino, n) {
            if let Some(fd) = inode.pinned.lock().unwrap().take() {
                self.reaper.close_later(fd);
            }
        }
    }

    pub fn release(&self, fh: u64) {
        self.handles.release(fh);
    }

    /// Marks data file `fd` open on this mount, for `kmsfs rekey` (which
    /// skips files in use): a shared flock, or on a shared mount an OFD lock
    /// (`shared::mark_open` says why).
    fn mark_open(&self, fd: RawFd) -> FsResult<()> {
        match self.shared {
            true => shared::mark_open(fd)?,
            false => sys::share_lock(fd)?,
        }
        Ok(())
    }

    /// Sets up a new open state of backing inode `ino`: its truncates'
    /// redo records, and on a shared mount its cross-mount locking.
    fn adopt(&self, cf: &CryptFile, ino: u64) {
        if self.shared {
            cf.set_shared();
        }
        cf.set_journal(self.intents.clone(), ino);
    }

    /// The sidecar header of a regular file, read once per inode.
    fn header_of(&self, inode: &Inode) -> FsResult<Arc<FileHeader>> {
        if let Some(h) = inode.header.read().unwrap().as_ref() {
            return Ok(h.clone());
        }
        self.read_header(inode)
    }

    /// Reads the sidecar header of a regular file and keeps it as the
    /// inode's.
    fn read_header(&self, inode: &Inode) -> FsResult<Arc<FileHeader>> {
        let label = self.inodes.label(inode);
        let Some((parent, name)) = inode.location() else {
            return Err(FsError::header(
                &label,
                "the file has no name left to find its sidecar by",
            ));
        };
        let dir = self.inodes.dir(parent)?;
        let header = sidecar::read_at(dir.raw_fd(), &name).map_err(|e| e.for_file(&label))?;
        if header.parsed.header.geometry.shift() != self.block_shift {
            return Err(FsError::header(
                &label,
                "its block size differs from this backing directory's configuration",
            ));
        }
        let header = Arc::new(header);
        *inode.header.write().unwrap() = Some(header.clone());
        Ok(header)
    }

    /// Whether the header of `inode` was never written: its sidecar is
    /// empty and so is its data (`data_fd`). A power loss leaves this when a
    /// new file's names were made durable (by any later journal commit of
    /// the backing filesystem) before the sidecar's bytes were: the file
    /// had been created and not yet synced. With no ciphertext there is
    /// nothing to protect, so it is an empty file to be given a header;
    /// any other unreadable header stays an error.
    fn header_never_written(&self, inode: &Inode, data_fd: RawFd) -> FsResult<bool> {
        let Some((parent, name)) = inode.location() else {
            return Ok(false);
        };
        let dir = self.inodes.dir(parent)?;
        let sidecar_empty =
            matches!(sidecar::read_raw_at(dir.raw_fd(), &name), Ok(raw) if raw.is_empty());
        // Shared: an empty sidecar may be another mount's create in flight,
        // whose header is about to be there.
        if sidecar_empty && self.shared && sidecar::create_in_flight(dir.raw_fd(), &name)? {
            return Ok(false);
        }
        Ok(sidecar_empty && sys::fstat(data_fd)?.st_size == 0)
    }

    /// Gives empty file `inode` (see `header_never_written`), reached by
    /// `path`, a fresh header under its directory's policy, as `create`
    /// would have; returns its cipher.
    async fn give_header(
        &self, inode: &Inode, path: &str, label: &str, who: file_keys::Requester,
    ) -> FsResult<BlockCipher> {
        if self.read_only {
            return Err(FsError::header(
                label,
                "its header was never written (created just before a crash, never synced) \
                 and the file is empty: mount read-write to give it one, or remove it",
            ));
        }
        let Some((parent, name)) = inode.location() else {
            return Err(FsError::errno(libc::ESTALE));
        };
        let dir = self.inodes.dir(parent)?;
        let new = self
            .keys
            .create(&self.policy_at(path), self.block_shift, label, who)
            .await?;
        match sidecar::replace_at(dir.raw_fd(), &name, b"", &new.header.raw)? {
            sidecar::Replaced::Done => {}
            // Renamed, removed or given a header meanwhile: the kernel
            // looks the name up again.
            _ => return Err(FsError::errno(libc::ESTALE)),
        }
        sys::sync_dir(dir.raw_fd())?;
        tracing::warn!(
            "{label}: its header was never written (the file was created just before a crash \
             and never synced); it is empty, so it was given a new one"
        );
        *inode.header.write().unwrap() = Some(Arc::new(new.header));
        Ok(new.cipher)
    }

    /// Whether regular file `name` in `dir`, with stat `st`, is a plaintext
    /// pass-through file: one link only, under a policy that is not
    /// mandatory, and no sidecar (ENOENT; any other failure to look for the
    /// sidecar is an error, never "plaintext"). Decided afresh each time from
    /// the name as it is now, never cached: a hard link or a rename in the
    /// backing directory must not make an encrypted file pass as plaintext.
    fn plain_at(&self, dir: &Inode, name: &OsStr, st: &libc::stat) -> FsResult<bool> {
        if !self.policies().any_optional
            || kind_of(st.st_mode) != FileType::RegularFile
            || st.st_nlink != 1
            || self.policy_in(dir)?.policy.mandatory
        {
            return Ok(false);
        }
        // A successor sidecar says an interrupted rename is to give the
        // name a header: not plaintext until that is settled.
        Ok(!sidecar_exists(dir, name)? && !sidecar::successor_exists(dir.raw_fd(), name)?)
    }

    /// Whether regular file `inode` (with stat `st`) is plaintext: as its
    /// open state was made, else by its current name (`plain_at`).
    fn is_plain(&self, inode: &Inode, st: &libc::stat) -> FsResult<bool> {
        if let Some(open) = inode.open_file() {
            return Ok(open.plain);
        }
        match inode.location() {
            Some((parent, name)) => self.plain_at(&*self.inodes.dir(parent)?, &name, st),
            None => Ok(false),
        }
    }

    /// The refusal of a change to the contents of plaintext file `label`.
    fn plaintext_refused(label: &str) -> FsError {
        FsError::refused(label, PLAINTEXT_READ_ONLY)
    }

    /// An O_PATH handle on the backing data of regular file `inode`, by its
    /// current name and not following a symlink, checked to be a regular
    /// file and the very object the inode table knows, so that a device,
    /// FIFO, symlink or other file put in its place in the backing directory
    /// is never opened for I/O (the caller reopens this handle). Also says
    /// whether the file is plaintext (`plain_at`).
    fn data_handle(&self, inode: &Inode) -> FsResult<(OwnedFd, bool)> {
        let Some((parent, name)) = inode.location() else {
            // Its name went (unlinked, or renamed over) after the kernel
            // resolved the path: ESTALE has the kernel resolve it again,
            // as a local filesystem would have opened what the name holds.
            return Err(FsError::errno(libc::ESTALE));
        };
        let dir = self.inodes.dir(parent)?;
        let handle = sys::open_path(dir.raw_fd(), &sys::cstr(&name)?)?;
        let st = sys::fstat(handle.as_raw_fd())?;
        if st.st_mode & libc::S_IFMT != libc::S_IFREG {
            return Err(FsError::backing(
                &self.inodes.label(inode),
                "backing data is not a regular file (something else was put in its place); \
                 not opened",
            ));
        }
        if (st.st_dev, st.st_ino) != (inode.dev, inode.backing_ino) {
            // Another regular file under the name (a `kmsfs rekey` swapped
            // in a new copy, say): ESTALE makes the kernel look the name
            // up again, which reaches the new file through its own inode
            // and checks.
            if st.st_dev == inode.dev {
                return Err(FsError::errno(libc::ESTALE));
            }
            return Err(FsError::backing(
                &self.inodes.label(inode),
                "backing data is not the file the mount knows (another file was put in its \
                 place); not opened",
            ));
        }
        let plain = self.plain_at(&dir, &name, &st)?;
        Ok((handle, plain))
    }

    /// ESTALE unless the inode's name still leads to its backing object.
    fn still_named(&self, inode: &Inode) -> FsResult<()> {
        let Some((parent, name)) = inode.location() else {
            // Its name went (unlinked, or renamed over) after the kernel
            // resolved the path: ESTALE has the kernel resolve it again,
            // as a local filesystem would have opened what the name holds.
            return Err(FsError::errno(libc::ESTALE));
        };
        let dir = self.inodes.dir(parent)?;
        let st = sys::fstatat(dir.raw_fd(), &sys::cstr(&name)?)?;
        if (st.st_dev, st.st_ino) != (inode.dev, inode.backing_ino) {
            return Err(FsError::errno(libc::ESTALE));
        }
        Ok(())
    }

    /// The shared open state of a regular file: its header and block cipher
    /// from `file_keys`, or none for a plaintext file. With `fill` (the
    /// inode's FUSE number, for an open for reading), an open state made
    /// here also has the file's head put into the kernel's page cache.
    async fn crypt_file(
        &self, inode: &Arc<Inode>, fill: Option<u64>, who: file_keys::Requester,
    ) -> FsResult<OpenFile> {
        if let Some(open) = inode.open_file() {
            return Ok(open);
        }
        if inode.kind != FileType::RegularFile {
            return Err(FsError::errno(libc::EINVAL));
        }
        self.settle_successor(inode, who).await?;
        let (handle, plain) = self.data_handle(inode)?;
        // A plaintext file gets no writes, so its descriptor is not writable
        // either.
        let flags = if self.read_only || plain {
            libc::O_RDONLY
        } else {
            libc::O_RDWR
        };
        let fd = sys::reopen(handle.as_raw_fd(), flags)?;
        let label = self.inodes.label(inode);
        let cipher = if plain {
            None
        } else {
            // `kmsfs rekey` swaps a file's data and header under an
            // exclusive lock on its data file: the header is read under a
            // shared one, held while the file is open (so a rekey skips a
            // file in use), and the name must still lead to this data.
            self.mark_open(fd.as_raw_fd())?;
            self.still_named(inode)?;
            // Start reading the data's head from disk, so that read overlaps
            // the sidecar read and the unwrap.
            let head = self.new_file_geometry().ciphertext_size(OPEN_FILL);
            sys::readahead(fd.as_raw_fd(), head as usize);
            // The policy of the name the file is reached by now decides
            // which keys it may be under.
            let path = self
                .inodes
                .rel_path(inode)
                .ok_or_else(|| FsError::errno(libc::ENOENT))?;
            // Shared: read afresh, as another mount may have replaced the
            // file under a reused inode number, or its header.
            let header = match match self.shared {
                true => self.read_header(inode),
                false => self.header_of(inode),
            } {
                Ok(header) => header,
                Err(e) => {
                    if !self.header_never_written(inode, fd.as_raw_fd())? {
                        return Err(e);
                    }
                    let cipher = self.give_header(inode, &path, &label, who).await?;
                    return self.finish_open(inode, fd, Some(cipher), plain, label, fill);
                }
            };
            match self
                .keys
                .cipher_for(&header, &self.policy_at(&path), &label, who)
                .await
            {
                Ok(cipher) => Some(cipher),
                Err(first) => {
                    // A rewrap may have replaced the header, or a policy
                    // change allowed its new key, since either was read:
                    // both are taken up again, once.
                    let fresh = self.read_header(inode)?;
                    let reloaded = self.refresh_policies();
                    if !reloaded && fresh.raw == header.raw {
                        return Err(first);
                    }
                    Some(
                        self.keys
                            .cipher_for(&fresh, &self.policy_at(&path), &label, who)
                            .await?,
                    )
                }
            }
        };
        self.finish_open(inode, fd, cipher, plain, label, fill)
    }

    /// Makes the open state of `inode` from its data `fd` and `cipher` (none
    /// for a plaintext file), unless another open made one meanwhile.
    fn finish_open(
        &self, inode: &Arc<Inode>, fd: OwnedFd, cipher: Option<BlockCipher>, plain: bool,
        label: String, fill: Option<u64>,
    ) -> FsResult<OpenFile> {
        let mut slot = inode.open_file.lock().unwrap();
        if let Some(open) = slot.get() {
            return Ok(open);
        }
        let cf = Arc::new(match cipher {
            Some(cipher) => {
                let cf = CryptFile::new(File::from(fd), cipher, label.clone(), None)?;
                self.adopt(&cf, inode.backing_ino);
                self.settle_truncate(&cf, inode.backing_ino, &label)?;
                cf
            }
            None => CryptFile::plaintext(File::from(fd), self.new_file_geometry(), label),
        });
        let open = OpenFile { cf, plain };
        slot.set(&open);
        if let Some(ino) = fill.filter(|_| !plain) {
            // Still under `slot`: see `fill_page_cache`.
            self.fill_page_cache(ino, inode, &open.cf);
        }
        Ok(open)
    }

    /// Puts the first `OPEN_FILL` bytes of a file just opened for reading
    /// into the kernel's page cache, so that reading them makes no READ
    /// request: for a small file the READ's round trip costs more than its
    /// decryption. Once per inode while the kernel knows it.
    ///
    /// Called with the inode's `open_file` slot held, right after its open
    /// state was made: a store overwrites the kernel's pages, so none of them
    /// may be dirty. With no open state there is no open handle, and the
    /// kernel writes dirty pages back before a handle's release; while the
    /// slot is held no other open can hand out a handle to write through.
    ///
    /// Best effort: nothing is stored if a block fails authentication (the
    /// READ that follows reports it) or the kernel refuses. (After a failed
    /// writeback the kernel may still cache bytes that never reached the
    /// backing file; a store then replaces only the first `OPEN_FILL` of
    /// them. The failed write was reported with EIO.)
    fn fill_page_cache(&self, ino: u64, inode: &Inode, cf: &CryptFile) {
        let Some(store) = self.page_filler.get() else {
            return;
        };
        if inode.filled.load(Ordering::Relaxed) {
            return;
        }
        let len = match cf.size() {
            Ok(size) => size.min(OPEN_FILL) as usize,
            Err(_) => return,
        };
        if len == 0 {
            return;
        }
        with_plaintext_scratch(|buf| {
            if cf.read(0, len, buf).is_err() {
                return;
            }
            match store(ino, buf) {
                Ok(()) => {
                    inode.filled.store(true, Ordering::Relaxed);
                    self.metrics
                        .bytes_filled
                        .fetch_add(buf.len() as u64, Ordering::Relaxed);
                }
                Err(e) => tracing::debug!("page cache fill of inode {ino} refused: {e}"),
            }
        });
    }

    /// Opens a regular file. `reading_only`: opened O_RDONLY without O_TRUNC
    /// (only such opens fill the page cache, and only such opens are allowed
    /// on a plaintext file). The first cold open in a directory also starts
    /// readying its other files' keys (`prefetch`).
    pub async fn open(
        self: &Arc<Self>, ino: u64, reading_only: bool, caller: Caller,
    ) -> FsResult<u64> {
        let inode = self.inodes.get(ino)?;
        self.prefetch_siblings(&inode);
        let who = Some((caller.uid, caller.pid));
        let open = self
            .crypt_file(&inode, reading_only.then_some(ino), who)
            .await?;
        if open.plain && !reading_only {
            return Err(Self::plaintext_refused(&self.inodes.label(&inode)));
        }
        Ok(self.handles.add_file(open, ino))
    }

    /// The open state behind handle `fh`, for a change to the file's
    /// contents: refused for a plaintext file.
    fn file_to_change(&self, fh: u64) -> FsResult<Arc<CryptFile>> {
        let (open, ino) = self.handles.open_file(fh)?;
        if open.plain {
            let label = match self.inodes.get(ino) {
                Ok(inode) => self.inodes.label(&inode),
                Err(_) => format!("inode {ino}"),
            };
            return Err(Self::plaintext_refused(&label));
        }
        Ok(open.cf)
    }

    pub fn read(&self, fh: u64, offset: u64, size: usize, out: &mut Vec<u8>) -> FsResult<()> {
        self.handles.file(fh)?.read(offset, size, out)?;
        self.metrics
            .bytes_read
            .fetch_add(out.len() as u64, Ordering::Relaxed);
        Ok(())
    }

    /// `kill_privileges`: the kernel flagged a writer without CAP_FSETID.
    pub fn write(&self, fh: u64, offset: u64, data: &[u8], kill_privileges: bool) -> FsResult<()> {
        if self.read_only {
            return Err(FsError::errno(libc::EROFS));
        }
        let cf = self.file_to_change(fh)?;
        if kill_privileges {
            cf.kill_privileges()?;
        }
        cf.write(offset, data)?;
        self.metrics
            .bytes_written
            .fetch_add(data.len() as u64, Ordering::Relaxed);
        Ok(())
    }

    pub fn fsync(&self, fh: u64, datasync: bool) -> FsResult<()> {
        self.handles.file(fh)?.sync(datasync)
    }

    pub fn fallocate(&self, fh: u64, offset: u64, length: u64, mode: i32) -> FsResult<()> {
        if mode != 0 {
            return Err(FsError::errno(libc::EOPNOTSUPP));
        }
        let cf = self.file_to_change(fh)?;
        // The kernel checked that `offset + length` fits in an off_t.
        cf.allocate(offset, offset + length)
    }

    pub fn fsyncdir(&self, ino: u64) -> FsResult<()> {
        Ok(sys::sync_dir(self.inodes.dir(ino)?.raw_fd())?)
    }

    pub fn statfs(&self) -> FsResult<libc::statvfs> {
        Ok(sys::fstatvfs(
            sys::reopen(
                self.inodes.root.raw_fd(),
                libc::O_RDONLY | libc::O_DIRECTORY,
            )?
            .as_raw_fd(),
        )?)
    }
}

/// Whether `name` in `dir` has a sidecar (of any type: a sidecar that is not
/// a regular file is refused where it is read). Only ENOENT means none.
fn sidecar_exists(dir: &Inode, name: &OsStr) -> FsResult<bool> {
    let sc = sys::cstr(OsStr::from_bytes(&sidecar_name(name.as_bytes())))?;
    match sys::fstatat(dir.raw_fd(), &sc) {
        Ok(_) => Ok(true),
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(false),
        Err(e) => Err(e.into()),
    }
}
