//! The data path: plaintext reads, writes and truncates on one backing
//! ciphertext file. Independent of FUSE, so it is tested directly.

use std::cell::RefCell;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Mutex, RwLock};

use rayon::prelude::*;
use sha2::{Digest, Sha256};

use super::error::{FsError, FsResult};
use super::shared::{AppLocks, RemoteGuard};
use crate::crypto::{BlockCipher, CryptoError};
use crate::failpoint;
use crate::format::intent::TruncateRecord;
use crate::format::BlockGeometry;

/// Below this many blocks a request is sealed/opened on the calling thread:
/// handing off to the pool costs more than it saves.
const PARALLEL_MIN_BLOCKS: usize = 16;

/// Blocks per task when a request's blocks are sealed in parallel.
const SEAL_TASK_BLOCKS: usize = PARALLEL_MIN_BLOCKS / 2;

/// Requests sealing or opening blocks right now, across all files.
static CRYPTO_IN_FLIGHT: AtomicUsize = AtomicUsize::new(0);

/// Counts one request in `CRYPTO_IN_FLIGHT` while alive.
struct InFlight(usize);

impl InFlight {
    fn enter() -> Self {
        Self(CRYPTO_IN_FLIGHT.fetch_add(1, Ordering::Relaxed) + 1)
    }

    /// Whether `blocks` blocks are worth spreading over the pool: enough of
    /// them, and cores to spare. When other requests are already busy (many
    /// readers, the kernel's concurrent writeback), each one on its own
    /// thread keeps the cores just as busy without the hand-offs.
    fn parallel(&self, blocks: usize) -> bool {
        blocks >= PARALLEL_MIN_BLOCKS && self.0 < rayon::current_num_threads()
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        CRYPTO_IN_FLIGHT.fetch_sub(1, Ordering::Relaxed);
    }
}

/// An appending writer has the backing written out behind it in steps of
/// this many bytes (see `CryptFile::written_behind`).
const WRITE_BEHIND_STEP: u64 = 32 << 20;
const PAGE: u64 = 4096;

thread_local! {
    /// Per-thread scratch for sealed bytes, reused across requests so the hot
    /// path does not allocate per request or per block.
    static SEALED: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// A created file's sidecar and directory, fsynced on the file's first fsync
/// so a synced file is findable after a crash.
pub(crate) struct PendingDurability {
    pub sidecar: File,
    /// The directory holding both names (reopened for fsync only then).
    pub parent_dir: std::sync::Arc<super::inode::Inode>,
}

/// One open backing file shared by every handle on the same inode.
pub struct CryptFile {
    /// Backing ciphertext; opened read-write unless the mount is read-only.
    file: File,
    /// None for a plaintext file let through by a non-mandatory policy.
    cipher: Option<BlockCipher>,
    /// Block size and layout: the cipher's (so from the file's header) for
    /// an encrypted file; unused for a plaintext one.
    geometry: BlockGeometry,
    /// Readers share it; writers and truncates hold it exclusively, because
    /// they read-modify-write the blocks at the edges of their range.
    lock: RwLock<()>,
    /// Length of the backing ciphertext (encrypted files). Every change to
    /// the backing file goes through this struct (one per inode) under
    /// `lock` held exclusively, so it is read from the file once and then
    /// kept here, sparing an fstat per request; re-read after a failed
    /// write, whose effect on the length is unknown.
    ct_len: AtomicU64,
    /// Ciphertext offset below which disk writeback of an appending writer's
    /// bytes has been started. Every byte goes through two page caches
    /// (ours and the backing's); starting the backing's writeback behind the
    /// writer keeps the disk busy during the write instead of at fsync, and
    /// the second copy clean and reclaimable. Moved only under `lock` held
    /// exclusively.
    written_behind: AtomicU64,
    /// Backing-relative path, for log lines only.
    label: Mutex<String>,
    /// Set for files created by this mount until their first fsync.
    pending: Mutex<Option<PendingDurability>>,
    /// Where truncates that rewrite a boundary block record their redo
    /// record, and the backing inode number it is filed under. Unset (tools
    /// making new files), such a truncate is not crash-safe.
    journal: std::sync::OnceLock<(std::sync::Arc<super::intents::IntentDir>, u64)>,
    /// Other mounts may change the backing file (`-o shared`): its length
    /// is read from it each time, and changes take byte-range locks on it
    /// (`super::shared`).
    shared: AtomicBool,
    /// Serializes reads done again under locks (`read`): they share this
    /// open file's locks, which one reader's release would drop for all.
    reread: Mutex<()>,
    /// Applications' locks on this file, forwarded (`-o shared`).
    pub app_locks: AppLocks,
}

/// What [`CryptFile::settle_truncate`] found.
#[derive(Debug, PartialEq, Eq)]
pub enum Settled {
    /// The truncate had finished; only its record was left.
    AlreadyDone,
    /// The truncate was interrupted, and has now been finished.
    Finished,
    /// The record is not this file's, or the file changed after the
    /// truncate finished: the record was ignored.
    Stale,
}

/// Copies `data`, written at plaintext `offset`, into the plaintext parts of
/// the sealed-block slots in `sealed` (slot 0 is block `first`).
fn lay_into_slots(g: BlockGeometry, sealed: &mut [u8], first: u64, offset: u64, data: &[u8]) {
    let bs = g.block_size();
    let sbs = g.sealed_block_size();
    let mut src = data;
    let mut pos = offset;
    while !src.is_empty() {
        let index = g.block_of(pos);
        let in_block = (pos - g.block_start(index)) as usize;
        let n = src.len().min(bs - in_block);
        let at = (index - first) as usize * sbs + g.plaintext_offset() + in_block;
        sealed[at..at + n].copy_from_slice(&src[..n]);
        src = &src[n..];
        pos += n as u64;
    }
}

/// Makes `buf` at least `len` long, zero-filling only new bytes.
fn grow(buf: &mut Vec<u8>, len: usize) {
    if buf.len() < len {
        buf.resize(len, 0);
    }
}

fn torn(label: &str, block: u64) -> FsError {
    FsError::Block {
        file: label.to_owned(),
        block,
        reason: "ciphertext is truncated inside this block".into(),
    }
}

/// What a failed read of the backing file around `block` gives: a short
/// file is a torn block; EIO from the disk under the backing directory is
/// a block error, so the log names the file; anything else passes as is.
fn backing_read_error(label: &str, block: u64, e: std::io::Error) -> FsError {
    match (e.kind(), e.raw_os_error()) {
        // Shorter than this handle knows: cut behind our back.
        (std::io::ErrorKind::UnexpectedEof, _) => torn(label, block),
        (_, Some(libc::EIO)) => FsError::Block {
            file: label.to_owned(),
            block,
            reason: "the backing filesystem cannot read it (EIO): check the disk under the \
                     backing directory (dmesg) and restore this file from a backup"
                .into(),
        },
        _ => FsError::Io(e),
    }
}

/// The ciphertext length for `pt_size` plaintext bytes, or EFBIG when no
/// backing file can be that long (past `off_t`), as a local filesystem
/// answers a size beyond its limit.
fn ciphertext_len(g: BlockGeometry, pt_size: u64) -> FsResult<u64> {
    let len = g.ciphertext_size(pt_size);
    if len > i64::MAX as u64 {
        return Err(FsError::errno(libc::EFBIG));
    }
    Ok(len)
}

impl CryptFile {
    /// An encrypted file, laid out as `cipher`'s geometry says.
    pub(crate) fn new(
        file: File, cipher: BlockCipher, label: String, pending: Option<PendingDurability>,
    ) -> std::io::Result<Self> {
        let len = file.metadata()?.len();
        Ok(Self {
            file,
            geometry: cipher.geometry(),
            cipher: Some(cipher),
            lock: RwLock::new(()),
            ct_len: AtomicU64::new(len),
            // Bytes already there were not written by this appender.
            written_behind: AtomicU64::new(len),
            label: Mutex::new(label),
            pending: Mutex::new(pending),
            journal: std::sync::OnceLock::new(),
            shared: AtomicBool::new(false),
            reread: Mutex::new(()),
            app_locks: AppLocks::default(),
        })
    }

    /// A plaintext file (no sidecar) in a subtree whose policy is not
    /// mandatory: bytes pass through unchanged.
    pub fn plaintext(file: File, geometry: BlockGeometry, label: String) -> Self {
        Self {
            file,
            cipher: None,
            geometry,
            lock: RwLock::new(()),
            ct_len: AtomicU64::new(0),
            written_behind: AtomicU64::new(0),
            label: Mutex::new(label),
            pending: Mutex::new(None),
            journal: std::sync::OnceLock::new(),
            shared: AtomicBool::new(false),
            reread: Mutex::new(()),
            app_locks: AppLocks::default(),
        }
    }

    fn cipher(&self) -> &BlockCipher {
        self.cipher
            .as_ref()
            .expect("only called for encrypted files")
    }

    pub fn file(&self) -> &File {
        &self.file
    }

    /// Has truncates of this file write their redo record to `dir`, under
    /// backing inode number `ino`.
    pub(crate) fn set_journal(&self, dir: std::sync::Arc<super::intents::IntentDir>, ino: u64) {
        let _ = self.journal.set((dir, ino));
    }

    /// Has this open file expect changes by other mounts (`-o shared`).
    pub(crate) fn set_shared(&self) {
        self.shared.store(true, Ordering::Relaxed);
    }

    fn is_shared(&self) -> bool {
        self.shared.load(Ordering::Relaxed)
    }

    /// For a change of blocks `first..=last` ending at plaintext `end`:
    /// none unless shared; else the locks that keep other mounts' writers
    /// out (see `super::shared`).
    fn remote_write_guard(&self, first: u64, last: u64, end: u64) -> FsResult<Option<RemoteGuard>> {
        if !self.is_shared() {
            return Ok(None);
        }
        let fd = self.file.as_raw_fd();
        let guard = RemoteGuard::in_place(fd, first, last)?;
        if end <= self.geometry.plaintext_size(self.ct_size()?) {
            return Ok(Some(guard));
        }
        drop(guard);
        Ok(Some(RemoteGuard::resizing(fd)?))
    }

    /// For a change of the length: none unless shared (see `super::shared`).
    pub(crate) fn remote_resize_guard(&self) -> FsResult<Option<RemoteGuard>> {
        if !self.is_shared() {
            return Ok(None);
        }
        Ok(Some(RemoteGuard::resizing(self.file.as_raw_fd())?))
    }

    pub fn set_label(&self, label: String) {
        *self.label.lock().unwrap() = label;
    }

    fn label(&self) -> String {
        self.label.lock().unwrap().clone()
    }

    fn ct_size(&self) -> FsResult<u64> {
        match self.cipher {
            // Another mount may have changed it.
            Some(_) if !self.is_shared() => Ok(self.ct_len.load(Ordering::Relaxed)),
            _ => Ok(self.file.metadata()?.len()),
        }
    }

    /// Allocates backing space for growing the ciphertext from `old` to `new`
    /// bytes before anything is written, so a full disk fails the request
    /// with ENOSPC and leaves the file as it was, instead of a half-written
    /// tail block that would read as damage. The size stays as it is.
    fn reserve(&self, old: u64, new: u64) -> FsResult<()> {
        if new > old {
            // Backing filesystems without fallocate keep the old behaviour.
            super::sys::allocate_keep_size(self.file.as_raw_fd(), old, new - old)?;
        }
        Ok(())
    }

    /// Runs a change to the backing file (caller holds `lock` exclusively)
    /// and records the length it leaves, re-reading it if the change failed.
    fn changing_length(&self, change: impl FnOnce() -> FsResult<u64>) -> FsResult<()> {
        match change() {
            Ok(len) => {
                self.ct_len.store(len, Ordering::Relaxed);
                Ok(())
            }
            Err(e) => {
                if let Ok(m) = self.file.metadata() {
                    self.ct_len.store(m.len(), Ordering::Relaxed);
                }
                Err(e)
            }
        }
    }

    /// Plaintext size, from the ciphertext size alone.
    pub fn size(&self) -> FsResult<u64> {
        let len = self.ct_size()?;
        Ok(match self.cipher {
            Some(_) => self.geometry.plaintext_size(len),
            None => len,
        })
    }

    /// Opens sealed blocks `first..` from `sealed` into `out` (which holds
    /// exactly their plaintext), in parallel for large requests.
    fn open_blocks(&self, first: u64, sealed: &[u8], out: &mut [u8]) -> FsResult<()> {
        let bs = self.geometry.block_size();
        let sbs = self.geometry.sealed_block_size();
        let open_one = |(i, (s, o)): (usize, (&[u8], &mut [u8]))| {
            let index = first + i as u64;
            self.cipher().open(index, s, o).map_err(|e| (index, e))
        };
        let busy = InFlight::enter();
        let result: Result<(), (u64, CryptoError)> = if busy.parallel(out.len() / bs) {
            sealed
                .par_chunks(sbs)
                .zip(out.par_chunks_mut(bs))
                .enumerate()
                .try_for_each(open_one)
        } else {
            sealed
                .chunks(sbs)
                .zip(out.chunks_mut(bs))
                .enumerate()
                .try_for_each(open_one)
        };
        result.map_err(|(index, e)| FsError::block(&self.label(), index, e))
    }

    fn seal_blocks(&self, first: u64, sealed: &mut [u8]) {
        let sbs = self.geometry.sealed_block_size();
        let busy = InFlight::enter();
        if busy.parallel(sealed.len() / sbs) {
            // Runs of blocks rather than single blocks per task: the cipher
            // then counts V2 seals per run, not per block.
            sealed
                .par_chunks_mut(sbs * SEAL_TASK_BLOCKS)
                .enumerate()
                .for_each(|(t, run)| {
                    let first = first + (t * SEAL_TASK_BLOCKS) as u64;
                    self.cipher().seal_blocks(first, run)
                });
        } else {
            self.cipher().seal_blocks(first, sealed);
        }
    }

    /// Reads up to `size` plaintext bytes at `offset` into `out` (cleared
    /// first). Short only at end of file.
    pub fn read(&self, offset: u64, size: usize, out: &mut Vec<u8>) -> FsResult<()> {
        if self.cipher.is_none() {
            grow(out, size);
            let mut done = 0;
            while done < size {
                match self
                    .file
                    .read_at(&mut out[done..size], offset + done as u64)?
                {
                    0 => break,
                    n => done += n,
                }
            }
            out.truncate(done);
            return Ok(());
        }
        let _local = self.lock.read().unwrap();
        match self.read_sealed(offset, size, out) {
            Err(FsError::Block { .. }) if self.is_shared() => {
                // Perhaps a block another mount was rewriting at that
                // instant: read once more with its writers held off.
                let _one = self.reread.lock().unwrap();
                let g = self.geometry;
                let end = offset + size.max(1) as u64;
                let (first, last) = (g.block_of(offset), g.block_of(end - 1));
                let _remote = RemoteGuard::reading(self.file.as_raw_fd(), first, last)?;
                self.read_sealed(offset, size, out)
            }
            r => r,
        }
    }

    /// `read` of an encrypted file, under `lock` held shared.
    fn read_sealed(&self, offset: u64, size: usize, out: &mut Vec<u8>) -> FsResult<()> {
        let ct_size = self.ct_size()?;
        let g = self.geometry;
        let pt_size = g.plaintext_size(ct_size);
        if size == 0 || offset >= pt_size {
            out.clear();
            return Ok(());
        }
        let end = (offset + size as u64).min(pt_size);
        let first = g.block_of(offset);
        let last = g.block_of(end - 1);
        if g.has_torn_tail(ct_size) && last >= ct_size / g.sealed_block_size() as u64 {
            // The fragment is too short to be a sealed block.
            return Err(torn(&self.label(), last));
        }
        let ct_start = g.sealed_block_start(first);
        let ct_end = g.sealed_block_start(last + 1).min(ct_size);
        let pt_start = g.block_start(first);
        let pt_end = g.block_start(last + 1).min(pt_size);
        let ct_len = (ct_end - ct_start) as usize;
        let pt_len = (pt_end - pt_start) as usize;
        SEALED.with(|buf| -> FsResult<()> {
            let mut sealed = buf.borrow_mut();
            grow(&mut sealed, ct_len);
            self.file
                .read_exact_at(&mut sealed[..ct_len], ct_start)
                .map_err(|e| backing_read_error(&self.label(), last, e))?;
            grow(out, pt_len);
            self.open_blocks(first, &sealed[..ct_len], &mut out[..pt_len])
        })?;
        // Keep only the requested range (no copy for block-aligned reads).
        let skip = (offset - pt_start) as usize;
        let keep = (end - offset) as usize;
        if skip > 0 {
            out.copy_within(skip..skip + keep, 0);
        }
        out.truncate(keep);
        Ok(())
    }

    /// Decrypts block `index` (of a file with `pt_size` plaintext bytes) into
    /// `dst`, which must be at least the block's length.
    fn read_block_into(&self, index: u64, pt_size: u64, dst: &mut [u8]) -> FsResult<usize> {
        let g = self.geometry;
        let len = g.block_len(index, pt_size);
        if len == 0 {
            return Ok(0);
        }
        let mut sealed = vec![0u8; len + g.overhead()];
        self.file
            .read_exact_at(&mut sealed, g.sealed_block_start(index))
            .map_err(|e| backing_read_error(&self.label(), index, e))?;
        self.cipher()
            .open(index, &sealed, &mut dst[..len])
            .map_err(|e| FsError::block(&self.label(), index, e))?;
        Ok(len)
    }

    /// Clears set-ID bits and file capabilities before a write or truncate
    /// by a caller without CAP_FSETID.
    pub fn kill_privileges(&self) -> FsResult<()> {
        Ok(super::sys::kill_privileges(self.file.as_raw_fd())?)
    }

    /// Writes `data` at plaintext `offset`, extending the file as needed.
    pub fn write(&self, offset: u64, data: &[u8]) -> FsResult<()> {
        if data.is_empty() {
            return Ok(());
        }
        if self.cipher.is_none() {
            return Ok(self.file.write_all_at(data, offset)?);
        }
        let g = self.geometry;
        let end = offset + data.len() as u64;
        ciphertext_len(g, end)?;
        let first = g.block_of(offset);
        let last = g.block_of(end - 1);
        let sbs = g.sealed_block_size();
        // Blocks the write covers whole are full-length whatever the file's
        // size, so they are filled and sealed before taking the lock: only
        // the edge blocks and the backing write serialise writers.
        let whole = g.blocks_within(offset, end);
        let behind = SEALED.with(|buf| -> FsResult<Option<(u64, u64)>> {
            let mut sealed = buf.borrow_mut();
            // Every byte that is written out below is set first (new data,
            // old edge bytes, epochs, nonces, tags), so the scratch needs no
            // zeroing.
            grow(&mut sealed, (last - first + 1) as usize * sbs);
            lay_into_slots(g, &mut sealed, first, offset, data);
            if !whole.is_empty() {
                let slots =
                    (whole.start - first) as usize * sbs..(whole.end - first) as usize * sbs;
                self.seal_blocks(whole.start, &mut sealed[slots]);
            }
            let _excl = self.lock.write().unwrap();
            let _remote = self.remote_write_guard(first, last, end)?;
            let mut pt_size = g.plaintext_size(self.ct_size()?);
            if offset > pt_size {
                self.resize_locked(pt_size, offset)?;
                pt_size = offset;
            }
            let new_size = pt_size.max(end);
            let total = (last - first) as usize * sbs + g.block_len(last, new_size) + g.overhead();
            let sealed = &mut sealed[..total];
            let edges: &[u64] = if first == last {
                &[first]
            } else {
                &[first, last]
            };
            for &index in edges.iter().filter(|i| !whole.contains(i)) {
                let at = (index - first) as usize * sbs;
                let slot = &mut sealed[at..(at + sbs).min(total)];
                self.complete_edge(index, offset, data, pt_size, new_size, slot)?;
            }
            let at = g.sealed_block_start(first);
            let old_ct = self.ct_size()?; // after the resize above
            let new_ct = old_ct.max(at + total as u64);
            self.reserve(old_ct, new_ct)?;
            self.changing_length(|| {
                self.file.write_all_at(sealed, at)?;
                Ok(new_ct)
            })?;
            Ok(if new_ct > old_ct {
                self.claim_write_behind(old_ct, at)
            } else {
                None
            })
        })?;
        if let Some((from, len)) = behind {
            // Outside the lock: starting writeback can wait for the disk queue.
            super::sys::start_writeback(self.file.as_raw_fd(), from, len);
        }
        Ok(())
    }

    /// For a write at ciphertext offset `at` that grew the file from
    /// `old_ct`: the range whose writeback to start, once a step's worth
    /// lies behind the writer. Caller holds `lock` exclusively.
    fn claim_write_behind(&self, old_ct: u64, at: u64) -> Option<(u64, u64)> {
        // Behind a truncate, start again from the new end.
        let from = self.written_behind.load(Ordering::Relaxed).min(old_ct);
        // Stop at a page boundary: the page holding `at` is still being
        // written (a tail block is resealed by the next append).
        let to = at - at % PAGE;
        if to < from + WRITE_BEHIND_STEP {
            self.written_behind.store(from, Ordering::Relaxed);
            return None;
        }
        self.written_behind.store(to, Ordering::Relaxed);
        Some((from, to - from))
    }

    /// Seals edge block `index` of a write of `data` at `offset` (laid into
    /// `slot` already), keeping the old bytes the write does not cover. The
    /// file holds `pt_size` bytes now and `new_size` after the write.
    fn complete_edge(
        &self, index: u64, offset: u64, data: &[u8], pt_size: u64, new_size: u64, slot: &mut [u8],
    ) -> FsResult<()> {
        let g = self.geometry;
        let start = g.block_start(index);
        let len = g.block_len(index, new_size);
        let block_end = start + len as u64;
        let end = offset + data.len() as u64;
        if offset > start || end < block_end {
            // The bytes the write leaves alone lie before the old end (a
            // write past the end was preceded by a resize to its offset):
            // decrypt the old block into the slot, then lay the new bytes
            // over it again.
            let at = g.plaintext_offset();
            self.read_block_into(index, pt_size, &mut slot[at..at + len])?;
            let (from, to) = (offset.max(start), end.min(block_end));
            let part = &data[(from - offset) as usize..(to - offset) as usize];
            lay_into_slots(g, slot, index, from, part);
        }
        self.cipher()
            .seal_in_place(index, &mut slot[..len + g.overhead()]);
        Ok(())
    }

    /// Sets the plaintext size (truncate up or down).
    pub fn truncate(&self, new_size: u64) -> FsResult<()> {
        if self.cipher.is_none() {
            return Ok(self.file.set_len(new_size)?);
        }
        let _excl = self.lock.write().unwrap();
        let _remote = self.remote_resize_guard()?;
        let old = self.geometry.plaintext_size(self.ct_size()?);
        self.resize_locked(old, new_size)
    }

    /// fallocate (mode 0) of plaintext `offset..end`: reserves the backing
    /// space of that range's blocks, so later writes into it do not fail
    /// for lack of space, and grows the file to `end` if it is shorter.
    /// On a full disk it fails with ENOSPC and changes nothing.
    pub fn allocate(&self, offset: u64, end: u64) -> FsResult<()> {
        if self.cipher.is_none() {
            super::sys::allocate_keep_size(self.file.as_raw_fd(), offset, end - offset)?;
            return Ok(self.file.set_len(self.file.metadata()?.len().max(end))?);
        }
        let g = self.geometry;
        let ct_end = ciphertext_len(g, end)?;
        let _excl = self.lock.write().unwrap();
        let _remote = self.remote_resize_guard()?;
        self.reserve(g.sealed_block_start(g.block_of(offset)), ct_end)?;
        let old = g.plaintext_size(self.ct_size()?);
        if end > old {
            self.resize_locked(old, end)?;
        }
        Ok(())
    }

    /// Resizes from `old` to `new` plaintext bytes. The block holding the
    /// boundary is re-sealed at its new length (zero-padded when growing);
    /// whole blocks beyond the old end become holes, whose backing space is
    /// reserved. Rewriting that block and setting the size are two steps: a
    /// redo record, synced first, lets the next open finish them after a
    /// crash in between (`settle_truncate`).
    fn resize_locked(&self, old: u64, new: u64) -> FsResult<()> {
        let g = self.geometry;
        if old == new {
            return Ok(());
        }
        let len = ciphertext_len(g, new)?;
        let bs = g.block_size();
        // The one block whose length changes: the old tail when growing, the
        // new tail when shrinking; none when that boundary is block-aligned.
        let boundary = if new > old { old } else { new };
        // (where it goes, its sealed bytes at the new length)
        let mut edge = None;
        if boundary % bs as u64 != 0 {
            let index = g.block_of(boundary);
            let new_len = g.block_len(index, new);
            let at = g.plaintext_offset();
            let mut sealed = vec![0u8; bs + g.overhead()];
            self.read_block_into(index, old, &mut sealed[at..at + bs])?;
            sealed.truncate(new_len + g.overhead());
            sealed[at + new_len..].fill(0);
            self.cipher().seal_in_place(index, &mut sealed);
            edge = Some((index, sealed));
        }
        let ct_old = self.ct_size()?;
        let ct_new = len;
        if new > old {
            // The holes too: a later write into one (the kernel's writeback
            // sends writes out of order) must not fail halfway through.
            self.reserve(ct_old, ct_new)?;
        }
        let journal = match (&edge, self.journal.get()) {
            (Some((index, sealed)), Some((dir, ino))) => {
                let at = g.sealed_block_start(*index);
                let mut old_block = vec![0u8; self.sealed_len_at(at, ct_old)];
                self.file.read_exact_at(&mut old_block, at)?;
                let record = TruncateRecord {
                    file_id: *self.cipher().file_id(),
                    ciphertext_size: ct_new,
                    block_index: *index,
                    old_block_digest: Sha256::digest(&old_block).into(),
                    sealed_block: sealed.clone(),
                };
                dir.write_truncate(*ino, &record)?;
                failpoint::hit("truncate:after-record");
                Some((dir, *ino))
            }
            _ => None,
        };
        self.changing_length(|| {
            if let Some((index, sealed)) = &edge {
                self.file
                    .write_all_at(sealed, g.sealed_block_start(*index))?;
                failpoint::hit("truncate:after-block");
            }
            self.file.set_len(ct_new)?;
            failpoint::hit("truncate:after-resize");
            Ok(ct_new)
        })?;
        if let Some((dir, ino)) = journal {
            dir.remove_truncate(ino)?;
        }
        Ok(())
    }

    /// Sealed bytes of the block starting at ciphertext offset `at` in a
    /// file of `ct_size` bytes.
    fn sealed_len_at(&self, at: u64, ct_size: u64) -> usize {
        ct_size
            .saturating_sub(at)
            .min(self.geometry.sealed_block_size() as u64) as usize
    }

    /// Finishes the truncate `record` describes if it was interrupted (see
    /// `resize_locked`). The record is used only if its block authenticates
    /// as this file's block at its position; it is applied if the file is
    /// as it was before the rewrite, part-way through it, or as it left the
    /// block but not the size; a file changed since is left alone.
    pub fn settle_truncate(&self, record: &TruncateRecord) -> FsResult<Settled> {
        let g = self.geometry;
        let _excl = self.lock.write().unwrap();
        let sealed = &record.sealed_block;
        let index = record.block_index;
        let at = g.sealed_block_start(index);
        // The block ends the file, or is whole (a grow's old tail block).
        let end = at.checked_add(sealed.len() as u64);
        let fits = record.file_id == *self.cipher().file_id()
            && sealed.len() > g.overhead()
            && sealed.len() <= g.sealed_block_size()
            && (end == Some(record.ciphertext_size)
                || (sealed.len() == g.sealed_block_size()
                    && end.is_some_and(|e| e < record.ciphertext_size)));
        if !fits
            || self
                .cipher()
                .open(index, sealed, &mut vec![0u8; sealed.len() - g.overhead()])
                .is_err()
        {
            return Ok(Settled::Stale);
        }
        let ct = self.ct_size()?;
        let mut current = vec![0u8; self.sealed_len_at(at, ct)];
        self.file.read_exact_at(&mut current, at)?;
        if ct == record.ciphertext_size && current == *sealed {
            return Ok(Settled::AlreadyDone);
        }
        let untouched = <[u8; 32]>::from(Sha256::digest(&current)) == record.old_block_digest;
        let rewritten = current.starts_with(sealed);
        let damaged = || {
            let mut out = vec![0u8; g.block_size()];
            self.read_block_into(index, g.plaintext_size(ct), &mut out)
                .is_err()
        };
        if !(untouched || rewritten || damaged()) {
            return Ok(Settled::Stale);
        }
        self.changing_length(|| {
            self.file.write_all_at(sealed, at)?;
            self.file.set_len(record.ciphertext_size)?;
            self.file.sync_all()?;
            failpoint::synced();
            Ok(record.ciphertext_size)
        })?;
        Ok(Settled::Finished)
    }

    /// fsync/fdatasync; the first one after creation also makes the sidecar
    /// and the directory entries durable.
    pub fn sync(&self, datasync: bool) -> FsResult<()> {
        // A new file's header first: were its data durable and its header
        // not, a power loss would leave ciphertext no key can read.
        let mut pending = self.pending.lock().unwrap();
        if let Some(p) = pending.as_ref() {
            p.sidecar.sync_all()?;
            failpoint::synced();
        }
        if datasync {
            self.file.sync_data()?;
        } else {
            self.file.sync_all()?;
        }
        failpoint::synced();
        if let Some(p) = pending.as_ref() {
            super::sys::sync_dir(p.parent_dir.raw_fd())?;
            *pending = None;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::Dek;
    use crate::format::{BlockLayout, CipherSuite, Header, KeyRef, WrappedDek};
    use proptest::prelude::*;

    const LAYOUTS: [BlockLayout; 2] = [BlockLayout::V1, BlockLayout::V2];

    /// Seals per V2 epoch in these tests: small, so that writes cross many
    /// epochs and reads meet blocks of epochs other than the current one.
    const TEST_EPOCH_SEALS: u64 = 16;

    /// A CryptFile on `path` (created empty when `create`) under a fixed
    /// test DEK, so the same file can be opened again (with a new cipher,
    /// so a V2 file starts from a new epoch and no remembered ones).
    fn crypt_file_at(path: &std::path::Path, layout: BlockLayout, create: bool) -> CryptFile {
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(create)
            .truncate(create)
            .open(path)
            .unwrap();
        let wrapped = WrappedDek {
            key_ref: KeyRef {
                provider: "t".into(),
                key_id: "t".into(),
                key_version: "1".into(),
            },
            blob: vec![],
        };
        let geometry = BlockGeometry::new(12, layout).unwrap();
        let header = Header::new(CipherSuite::Aes256Gcm, geometry, [3; 16], vec![wrapped]).unwrap();
        let dek = Dek::from_slice(&[7; 32]).unwrap();
        let cipher = BlockCipher::with_epoch_seals(&dek, &header, TEST_EPOCH_SEALS);
        CryptFile::new(f, cipher, "f".into(), None).unwrap()
    }

    /// Two "mounts" of one backing file, as `-o shared` opens them.
    fn shared_pair(dir: &tempfile::TempDir) -> (CryptFile, CryptFile) {
        let path = dir.path().join("f");
        let a = crypt_file_at(&path, BlockLayout::V2, true);
        let b = crypt_file_at(&path, BlockLayout::V2, false);
        a.set_shared();
        b.set_shared();
        (a, b)
    }

    #[test]
    fn shared_files_see_each_others_lengths_and_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = shared_pair(&dir);
        a.write(0, &[1; 5000]).unwrap();
        assert_eq!(
            b.size().unwrap(),
            5000,
            "no stale length on the other mount"
        );
        b.write(5000, &[2; 3000]).unwrap();
        let mut want = vec![1u8; 5000];
        want.extend([2u8; 3000]);
        assert_eq!(read_all(&a), want, "an append elsewhere is seen");
        a.write(100, &[3; 10]).unwrap();
        want[100..110].fill(3);
        assert_eq!(read_all(&b), want, "an overwrite elsewhere is seen");
        b.truncate(4000).unwrap();
        assert_eq!(read_all(&a), want[..4000]);
    }

    #[test]
    fn shared_writers_of_one_block_keep_each_others_bytes() {
        // Each write rewrites a whole sealed block around its bytes: two
        // mounts writing other bytes of one block would lose one another's
        // without the block locks.
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = shared_pair(&dir);
        let bs = 4096u64;
        let blocks = 16u64;
        a.write(0, &vec![0u8; (bs * blocks) as usize]).unwrap();
        let rounds = 30u64;
        std::thread::scope(|s| {
            for (cf, at) in [(&a, 0u64), (&b, 2048u64)] {
                s.spawn(move || {
                    for round in 0..rounds {
                        for i in 0..blocks {
                            let byte = (i + round + 1) as u8;
                            cf.write(i * bs + at, &[byte; 100]).unwrap();
                        }
                    }
                });
            }
        });
        let data = read_all(&a);
        for i in 0..blocks {
            let want = (i + rounds) as u8;
            for at in [0usize, 2048] {
                let from = (i * bs) as usize + at;
                assert!(
                    data[from..from + 100].iter().all(|&x| x == want),
                    "block {i} at {at}: a write was lost"
                );
            }
        }
    }

    fn open_file(dir: &tempfile::TempDir, layout: BlockLayout) -> (CryptFile, std::path::PathBuf) {
        let path = dir.path().join("f");
        (crypt_file_at(&path, layout, true), path)
    }

    /// Runs `test` on a new file `f` in a fresh directory, once per layout.
    fn in_each_layout(test: impl Fn(BlockLayout, CryptFile, &std::path::Path)) {
        for layout in LAYOUTS {
            let dir = tempfile::tempdir().unwrap();
            let (cf, path) = open_file(&dir, layout);
            test(layout, cf, &path);
        }
    }

    fn read_all(cf: &CryptFile) -> Vec<u8> {
        let mut out = Vec::new();
        cf.read(0, cf.size().unwrap() as usize + 10, &mut out)
            .unwrap();
        out
    }

    #[derive(Debug, Clone)]
    enum Op {
        Write(u64, Vec<u8>),
        Truncate(u64),
        Read(u64, usize),
        /// Open the file again with a new cipher.
        Reopen,
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            3 => (
                0u64..40_000,
                proptest::collection::vec(any::<u8>(), 1..9000)
            )
                .prop_map(|(o, d)| Op::Write(o, d)),
            3 => (0u64..50_000).prop_map(Op::Truncate),
            3 => (0u64..50_000, 0usize..20_000).prop_map(|(o, n)| Op::Read(o, n)),
            1 => Just(Op::Reopen),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]
        #[test]
        fn matches_a_plain_model(
            v2 in any::<bool>(),
            ops in proptest::collection::vec(op(), 1..40),
        ) {
            let layout = if v2 { BlockLayout::V2 } else { BlockLayout::V1 };
            let dir = tempfile::tempdir().unwrap();
            let (mut cf, path) = open_file(&dir, layout);
            let mut model: Vec<u8> = Vec::new();
            for op in ops {
                match op {
                    Op::Write(o, d) => {
                        cf.write(o, &d).unwrap();
                        let end = o as usize + d.len();
                        if model.len() < end { model.resize(end, 0); }
                        model[o as usize..end].copy_from_slice(&d);
                    }
                    Op::Truncate(n) => {
                        cf.truncate(n).unwrap();
                        model.resize(n as usize, 0);
                    }
                    Op::Read(o, n) => {
                        let mut out = Vec::new();
                        cf.read(o, n, &mut out).unwrap();
                        let s = (o as usize).min(model.len());
                        let e = (o as usize + n).min(model.len());
                        prop_assert_eq!(&out[..], &model[s..e]);
                    }
                    Op::Reopen => cf = crypt_file_at(&path, layout, false),
                }
                prop_assert_eq!(cf.size().unwrap(), model.len() as u64);
            }
            prop_assert_eq!(read_all(&cf), model);
        }
    }

    #[test]
    fn large_parallel_round_trip_and_tamper() {
        in_each_layout(|layout, cf, path| {
            let sbs = cf.geometry.sealed_block_size() as u64;
            let data: Vec<u8> = (0..(1 << 20) + 123).map(|i| (i * 7 % 251) as u8).collect();
            cf.write(0, &data).unwrap();
            assert_eq!(read_all(&cf), data);
            // Flip one byte in block 5: that block fails, the others still read.
            let f = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(path)
                .unwrap();
            let at = 5 * sbs + 100;
            let mut b = [0u8];
            f.read_exact_at(&mut b, at).unwrap();
            f.write_all_at(&[b[0] ^ 1], at).unwrap();
            let mut out = Vec::new();
            let err = cf.read(0, 1 << 20, &mut out).unwrap_err();
            assert!(err.to_string().contains("block 5"), "{err}");
            cf.read(0, 5 * 4096, &mut out).unwrap();
            assert_eq!(out, data[..5 * 4096]);
            // Block 6 swapped with block 7: both fail (their AAD names the index).
            let mut six = vec![0u8; sbs as usize];
            let mut seven = vec![0u8; sbs as usize];
            f.read_exact_at(&mut six, 6 * sbs).unwrap();
            f.read_exact_at(&mut seven, 7 * sbs).unwrap();
            f.write_all_at(&seven, 6 * sbs).unwrap();
            f.write_all_at(&six, 7 * sbs).unwrap();
            for block in [6, 7] {
                let err = cf.read(block * 4096, 10, &mut out).unwrap_err();
                assert!(err.to_string().contains(&format!("block {block}")), "{err}");
            }
            // Torn tail: cut the file 3 bytes into a sealed block.
            let ct = f.metadata().unwrap().len();
            f.set_len(ct - (ct % sbs) + 3).unwrap();
            let last = (ct / sbs) as usize;
            // A file cut behind an open handle's back reads as damage too.
            let err = cf.read(0, data.len(), &mut out).unwrap_err();
            assert!(err.to_string().contains("truncated"), "{err}");
            // Opened afresh, the size shows the damage.
            let cf = crypt_file_at(path, layout, false);
            assert_eq!(
                cf.size().unwrap(),
                last as u64 * 4096 + 1,
                "damage stays visible in the size"
            );
            cf.read(8 * 4096, (last - 8) * 4096, &mut out).unwrap();
            assert_eq!(out, data[8 * 4096..last * 4096]);
            let err = cf.read(0, data.len(), &mut out).unwrap_err();
            assert!(err.to_string().contains(&format!("block {last}")), "{err}");
            // A fragment as long as the layout's whole overhead is torn too.
            f.set_len(ct - (ct % sbs) + cf.geometry.overhead() as u64)
                .unwrap();
            let cf = crypt_file_at(path, layout, false);
            assert_eq!(cf.size().unwrap(), last as u64 * 4096 + 1);
            let err = cf.read(last as u64 * 4096, 1, &mut out).unwrap_err();
            assert!(err.to_string().contains("truncated"), "{err}");
        });
    }

    #[test]
    fn concurrent_writers_sharing_edge_blocks_keep_each_others_bytes() {
        in_each_layout(|_, cf, _| {
            // Neighbouring ranges meet inside blocks, so every edge block is
            // written by two threads; each round reverses the start order.
            const PART: usize = 70_001;
            let expected: Vec<u8> = (0..8 * PART).map(|i| (i / PART) as u8 + 1).collect();
            for round in 0..4 {
                std::thread::scope(|s| {
                    for i in 0..8 {
                        let k = if round % 2 == 0 { i } else { 7 - i };
                        let (cf, data) = (&cf, &expected[k * PART..(k + 1) * PART]);
                        s.spawn(move || cf.write((k * PART) as u64, data).unwrap());
                    }
                });
                assert_eq!(read_all(&cf), expected, "round {round}");
                cf.truncate(0).unwrap();
            }
        });
    }

    #[test]
    fn write_behind_follows_an_appending_writer_only() {
        let dir = tempfile::tempdir().unwrap();
        let (cf, path) = open_file(&dir, BlockLayout::V1);
        let behind = || cf.written_behind.load(Ordering::Relaxed);
        let chunk = vec![7u8; 1 << 20];
        let sealed_chunk = cf.geometry.ciphertext_size(1 << 20);
        // Appends of 1 MiB: the one at `steps` MiB is the first to start
        // past one step of ciphertext (sealed chunks are a little larger).
        let steps = WRITE_BEHIND_STEP >> 20;
        for i in 0..steps {
            cf.write(i << 20, &chunk).unwrap();
            assert_eq!(behind(), 0, "append {i}");
        }
        cf.write(steps << 20, &chunk).unwrap();
        // That append made [0, its start) due (to the page holding the start).
        let page_floor = |x: u64| x - x % PAGE;
        assert_eq!(behind(), page_floor(steps * sealed_chunk));
        // Rewrites inside the file move nothing.
        for _ in 0..20 {
            cf.write(0, &chunk).unwrap();
        }
        assert_eq!(behind(), page_floor(steps * sealed_chunk));
        // A growing write that starts before the mark starts nothing.
        let end = cf.size().unwrap();
        cf.write(end - 10_000, &chunk).unwrap();
        assert_eq!(behind(), page_floor(steps * sealed_chunk));
        // After a truncate the mark follows the new end down.
        cf.truncate(1 << 20).unwrap();
        cf.write(1 << 20, &chunk).unwrap();
        assert_eq!(behind(), sealed_chunk);
        assert_eq!(read_all(&cf).len(), 2 << 20);
        // A file opened again counts from its length then.
        let reopened = crypt_file_at(&path, BlockLayout::V1, false);
        assert_eq!(
            reopened.written_behind.load(Ordering::Relaxed),
            cf.geometry.ciphertext_size(2 << 20)
        );
    }

    #[test]
    fn holes_read_as_zeros() {
        in_each_layout(|_, cf, path| {
            cf.write(100_000, b"tail").unwrap();
            assert_eq!(
                std::fs::metadata(path).unwrap().len(),
                cf.geometry.ciphertext_size(100_004)
            );
            let all = read_all(&cf);
            assert_eq!(all.len(), 100_004);
            assert!(all[..100_000].iter().all(|&b| b == 0));
            assert_eq!(&all[100_000..], b"tail");
        });
    }
}
