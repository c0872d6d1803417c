//! A file's keys: the only part of the filesystem that handles DEKs.
//!
//! Opening an existing file is one sequence, `FileKeys::cipher_for`: the
//! header must be wrapped under a key its directory's policy allows (its
//! current key or one retired for it; any other configured key is refused,
//! so wrap access to a weak key cannot forge files under a strong one);
//! the DEK comes from the cache or from one KMS unwrap shared by concurrent
//! callers; the header MAC is checked with it, and only then is the block
//! cipher built (`crypto::open_header` does the last two steps and is the
//! only way to a cipher). A new file is the reverse, `FileKeys::create`: a
//! fresh file ID and DEK from the policy's current key, bound to the file
//! and the volume (pre-wrapped by a `kms::pool::DekPool` when the mount
//! keeps one), the header sealed. Callers get a `BlockCipher` and
//! header bytes, never a `Dek`.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use super::error::{FsError, FsResult};
use super::sidecar::FileHeader;
use crate::audit::{AuditEvent, AuditLog, AuditOp, AuditOutcome};
use crate::cache::DekCache;
use crate::config::volume::VolumeId;
use crate::config::ActivePolicy;
use crate::crypto::{self, BlockCipher, Dek};
use crate::format::block::{BlockGeometry, BlockLayout};
use crate::format::header::{self as hdr, Header, VERSION_1};
use crate::format::ik;
use crate::kms::pool::{DekPool, PoolSettings, PoolStats, PooledDek};
use crate::kms::{KeyProvider, KmsRuntime, WrapContext, WrappedDek};
use crate::metrics::CacheStats;
use crate::policy::KeyMode;

/// Most DEKs per batch unwrap request of a prefetch.
const PREFETCH_BATCH: usize = 240;

/// A wrapped DEK with the context it was wrapped under.
type UnwrapItem = (WrappedDek, WrapContext);

/// A file of a lifecycle pass: its header, the policy governing it, and
/// its label for errors.
pub type LifecycleFile<'a> = (&'a FileHeader, &'a ActivePolicy, &'a str);

/// The DEKs of a batch, and the errors of the files that have none.
fn split(results: Vec<FsResult<Dek>>) -> (Vec<Option<Dek>>, Vec<Option<FsError>>) {
    results
        .into_iter()
        .map(|r| match r {
            Ok(dek) => (Some(dek), None),
            Err(e) => (None, Some(e)),
        })
        .unzip()
}

/// Adds file `i` to the group of `key` in `groups`.
fn group(
    groups: &mut Vec<(Arc<dyn KeyProvider>, Vec<usize>)>, key: &Arc<dyn KeyProvider>, i: usize,
) {
    match groups.iter_mut().find(|(k, _)| Arc::ptr_eq(k, key)) {
        Some((_, v)) => v.push(i),
        None => groups.push((key.clone(), vec![i])),
    }
}

/// A new file's sealed header and block cipher.
pub struct NewFile {
    pub header: FileHeader,
    pub cipher: BlockCipher,
}

/// Who asked for a key operation, for the audit log: uid and pid.
pub type Requester = Option<(u32, u32)>;

/// The DEK cache, and what every wrap of this volume is bound to.
pub struct FileKeys {
    cache: DekCache,
    /// Where key operations are logged; none until set.
    audit: OnceLock<Arc<AuditLog>>,
    volume_id: VolumeId,
    /// Format 1 headers may be present (an upgraded volume).
    legacy_v1_files: bool,
    /// Pre-wrapped DEKs per pool of a remote key (`dek_pool`); 0: none.
    pool_capacity: AtomicUsize,
    /// One pool per current key that created a file, by provider object;
    /// a pool whose key a policy reload dropped is pruned.
    pools: Mutex<Vec<Arc<DekPool>>>,
    pool_stats: Arc<PoolStats>,
}

impl FileKeys {
    pub fn new(cache: DekCache, volume_id: VolumeId, legacy_v1_files: bool) -> Self {
        Self {
            cache,
            audit: OnceLock::new(),
            volume_id,
            legacy_v1_files,
            pool_capacity: AtomicUsize::new(0),
            pools: Mutex::new(Vec::new()),
            pool_stats: Arc::new(PoolStats::default()),
        }
    }

    /// Keeps up to `entries` pre-wrapped DEKs per remote key from now on,
    /// so that creates need no KMS call (0: none, the default).
    pub fn set_dek_pool(&self, entries: usize) {
        self.pool_capacity.store(entries, Ordering::Relaxed);
        if entries == 0 {
            self.pools.lock().unwrap().clear();
        }
    }

    pub fn pool_stats(&self) -> &PoolStats {
        &self.pool_stats
    }

    /// The DEK pool of `key`, made (and its first fill started) at its
    /// first create; none when pooling is off or `key` wraps without a KMS
    /// round trip (a local keyring, directory mode).
    fn pool_for(&self, key: &Arc<dyn KeyProvider>) -> Option<Arc<DekPool>> {
        let capacity = self.pool_capacity.load(Ordering::Relaxed);
        if capacity == 0 || key.wraps_locally() {
            return None;
        }
        let mut pools = self.pools.lock().unwrap();
        // Dropping a pool zeroizes its entries.
        pools.retain(|p| !p.is_orphaned());
        if let Some(p) = pools.iter().find(|p| p.is_for(key)) {
            return Some(p.clone());
        }
        let pool = Arc::new(DekPool::new(
            key,
            self.volume_id,
            PoolSettings::new(capacity),
            self.pool_stats.clone(),
            self.audit.get().cloned(),
        ));
        pools.push(pool.clone());
        Some(pool)
    }

    /// Logs key operations to `audit` from now on (the first one set stays).
    pub fn set_audit_log(&self, audit: Arc<AuditLog>) {
        let _ = self.audit.set(audit);
    }

    /// Logs `event`, whose path is a label (`a/b`, relative to the mount),
    /// with the path written as everywhere in the audit log (`/a/b`).
    fn audit(&self, event: AuditEvent<'_>, who: Requester) {
        let Some(log) = self.audit.get() else {
            return;
        };
        let event = match who {
            Some((uid, pid)) => event.caller(uid, pid),
            None => event,
        };
        let rooted = event
            .path
            .filter(|p| !p.starts_with('/') && !p.starts_with('('))
            .map(|p| format!("/{p}"));
        log.record(&AuditEvent {
            path: rooted.as_deref().or(event.path),
            ..event
        });
    }

    /// The wrap context of a header: what its wrapped DEKs are bound to.
    fn context(&self, h: &Header) -> WrapContext {
        if h.version() == VERSION_1 {
            WrapContext::file_v1(h.file_id)
        } else {
            WrapContext::file(h.file_id, self.volume_id)
        }
    }

    /// The first of `h`'s wrapped DEKs that `policy` allows, with its key.
    fn allowed_wrap<'a>(
        &self, h: &'a Header, policy: &'a ActivePolicy,
    ) -> Option<(&'a WrappedDek, &'a Arc<dyn KeyProvider>)> {
        self.allowed_wraps(h, policy).next()
    }

    /// Every one of `h`'s wrapped DEKs that `policy` allows, with its key,
    /// in header order (the policy's key first, then recipients).
    fn allowed_wraps<'a>(
        &self, h: &'a Header, policy: &'a ActivePolicy,
    ) -> impl Iterator<Item = (&'a WrappedDek, &'a Arc<dyn KeyProvider>)> {
        let format_1 = h.version() == VERSION_1;
        let allowed = !format_1 || self.legacy_v1_files;
        h.wraps()
            .iter()
            .filter(move |_| allowed)
            .filter_map(move |w| policy.key_for(&w.key_ref, format_1).map(|k| (w, k)))
    }

    pub fn cache_stats(&self) -> &CacheStats {
        &self.cache.stats
    }

    /// How many DEKs the cache holds at most.
    pub fn cache_capacity(&self) -> usize {
        self.cache.capacity()
    }

    /// How long a cached DEK is used.
    pub fn cache_ttl(&self) -> std::time::Duration {
        self.cache.ttl()
    }

    /// The block cipher of an existing file governed by `policy` (see the
    /// module documentation). `label` names the file in errors.
    pub async fn cipher_for(
        &self, header: &FileHeader, policy: &ActivePolicy, label: &str, who: Requester,
    ) -> FsResult<BlockCipher> {
        let h = &header.parsed.header;
        let ctx = self.context(h);
        fn event<'a>(outcome: AuditOutcome<'a>, h: &Header, label: &'a str) -> AuditEvent<'a> {
            AuditEvent::new(AuditOp::Unwrap, outcome)
                .file(h.file_id)
                .path(label)
        }
        // The policy's key first; a recipient (break-glass) only when that
        // fails, and then said in the log.
        let mut first_error = None;
        for (wrapped, key) in self.allowed_wraps(h, policy) {
            let dek = match self.cache.get(wrapped, &ctx) {
                Some(dek) => {
                    // Served from the cache: counted, not logged one by one.
                    if let Some(log) = self.audit.get() {
                        log.cache_hit(&wrapped.key_ref);
                    }
                    Ok(dek)
                }
                None => {
                    let dek = self.cache.get_or_unwrap(wrapped, &ctx, key.as_ref()).await;
                    let failed = dek.as_ref().err().map(|e| e.to_string());
                    let outcome = match &failed {
                        Some(e) => AuditOutcome::Failed(e),
                        None => AuditOutcome::Ok,
                    };
                    self.audit(event(outcome, h, label).key(&wrapped.key_ref), who);
                    dek
                }
            };
            match dek {
                Ok(dek) => {
                    if let Some(e) = &first_error {
                        tracing::warn!(
                            "{label}: unwrapped with recipient {} because the first key failed: {e}",
                            key.describe()
                        );
                    }
                    return crypto::open_header(&header.parsed, &dek)
                        .map_err(|e| FsError::header(label, e));
                }
                Err(e) => {
                    first_error.get_or_insert(e);
                }
            }
        }
        Err(match first_error {
            Some(e) => FsError::kms(label, "the DEK could not be unwrapped", e),
            None => {
                let why = refusal(h, policy, self.legacy_v1_files);
                self.audit(
                    event(AuditOutcome::Refused(&why), h, label).key(&h.primary().key_ref),
                    who,
                );
                FsError::header(label, why)
            }
        })
    }

    /// Keys for a new file under `policy`: a random file ID, a DEK generated
    /// (and wrapped) by the policy's current key, bound to the file and the
    /// volume (taken ready-made from that key's DEK pool when it has one),
    /// and a format 2 header sealed under it with `block_shift`. The
    /// DEK goes into the cache, so the file's next open makes no KMS call.
    pub async fn create(
        &self, policy: &ActivePolicy, block_shift: u8, label: &str, who: Requester,
    ) -> FsResult<NewFile> {
        let pooled = self.take_pooled(&policy.current);
        let from_pool = pooled.is_some();
        let PooledDek {
            file_id,
            dek,
            wrapped,
        } = match pooled {
            Some(p) => p,
            None => self.generate(policy, label, who).await?,
        };
        let ctx = WrapContext::file(file_id, self.volume_id);
        // A pooled DEK's KMS wrap was logged when the pool was filled; this
        // line says which file it went to.
        let event = AuditEvent::new(AuditOp::Wrap, AuditOutcome::Ok)
            .key(&wrapped.key_ref)
            .file(file_id)
            .path(label);
        self.audit(
            if from_pool {
                event.detail("pre-wrapped DEK from the DEK pool")
            } else {
                event
            },
            who,
        );
        let mut wraps = vec![wrapped];
        for recipient in &policy.wrapping()[1..] {
            wraps.push(recipient.wrap(&dek, &ctx).await.map_err(|e| {
                FsError::kms(
                    label,
                    "the new file's DEK could not be wrapped for a recipient",
                    e,
                )
            })?);
        }
        let header = Header::v2(policy.policy.cipher, block_shift, file_id, wraps)
            .map_err(|e| FsError::header(label, e))?;
        let (raw, cipher) =
            crypto::seal_header(&header, &dek).map_err(|e| FsError::header(label, e))?;
        let parsed = hdr::parse(&raw).map_err(|e| FsError::header(label, e))?;
        self.cache.insert(header.primary(), &ctx, Arc::new(dek));
        Ok(NewFile {
            header: FileHeader { parsed, raw },
            cipher,
        })
    }

    /// A pre-wrapped DEK from the pool of `key`, if it has one ready
    /// (counted as a pool hit or miss).
    fn take_pooled(&self, key: &Arc<dyn KeyProvider>) -> Option<PooledDek> {
        let pooled = self.pool_for(key)?.take();
        let counter = match pooled {
            Some(_) => &self.pool_stats.hits,
            None => &self.pool_stats.misses,
        };
        counter.fetch_add(1, Ordering::Relaxed);
        pooled
    }

    /// A fresh file ID and a DEK generated for it by the policy's current
    /// key (one KMS call); a failure is audited.
    async fn generate(
        &self, policy: &ActivePolicy, label: &str, who: Requester,
    ) -> FsResult<PooledDek> {
        let file_id = crypto::random_file_id();
        let ctx = WrapContext::file(file_id, self.volume_id);
        match policy.current.generate_dek(&ctx).await {
            Ok((dek, wrapped)) => Ok(PooledDek {
                file_id,
                dek,
                wrapped,
            }),
            Err(e) => {
                let why = e.to_string();
                self.audit(
                    AuditEvent::new(AuditOp::Wrap, AuditOutcome::Failed(&why))
                        .file(file_id)
                        .path(label),
                    who,
                );
                Err(FsError::kms(
                    label,
                    "no DEK could be generated for the new file",
                    e,
                ))
            }
        }
    }

    /// Whether `h` is wrapped exactly as a new header under `policy` would
    /// be: under each of its wrapping keys (current, then recipients) in
    /// order, each at the KMS key version `current_version` names for that
    /// key (index into `policy.wrapping()`; `None`: any version, as when
    /// the KMS never names versions), and under an intermediate key exactly
    /// where the policy's key mode puts one (its current key of a format 2
    /// header in directory mode). Reads no key.
    pub fn is_wrapped_as(
        &self, h: &Header, policy: &ActivePolicy, current_version: &dyn Fn(usize) -> Option<String>,
    ) -> bool {
        let specs: Vec<_> = policy.policy.wrapping_keys().collect();
        let directory = policy.policy.key_mode == KeyMode::Directory && h.version() != VERSION_1;
        h.wraps().len() == specs.len()
            && h.wraps()
                .iter()
                .zip(specs)
                .enumerate()
                .all(|(i, (w, spec))| {
                    let key = &policy.wrapping()[i];
                    let by_name = h.version() == VERSION_1 || w.key_ref.provider == spec.provider;
                    let Ok((base, ik)) = ik::split_version(&w.key_ref.key_version) else {
                        return false;
                    };
                    by_name
                        && key.handles(&w.key_ref)
                        && ik.is_some() == (directory && i == 0)
                        && current_version(i).is_none_or(|v| v == base)
                })
    }

    /// The DEKs of `files` (headers with their policy and label), each
    /// unwrapped under a key its policy allows and its header's MAC checked
    /// with it, as at open: one `unwrap_many` per key the files are under,
    /// then, for a file whose first allowed wrap failed, its other allowed
    /// wraps (recipients) one by one. One answer per file, in order.
    async fn unwrap_checked(&self, files: &[LifecycleFile<'_>]) -> Vec<FsResult<Dek>> {
        let mut out: Vec<Option<FsResult<Dek>>> = files.iter().map(|_| None).collect();
        let mut by_key: Vec<(Arc<dyn KeyProvider>, Vec<usize>)> = Vec::new();
        for (i, (header, policy, label)) in files.iter().enumerate() {
            let h = &header.parsed.header;
            match self.allowed_wrap(h, policy) {
                None => {
                    out[i] = Some(Err(FsError::header(
                        label,
                        refusal(h, policy, self.legacy_v1_files),
                    )))
                }
                Some((_, key)) => group(&mut by_key, key, i),
            }
        }
        let check = |i: usize, dek: Dek| -> FsResult<Dek> {
            let (header, _, label) = files[i];
            crypto::open_header(&header.parsed, &dek)
                .map(|_| dek)
                .map_err(|e| FsError::header(label, e))
        };
        for (key, idx) in &by_key {
            let items: Vec<UnwrapItem> = idx
                .iter()
                .map(|&i| {
                    let h = &files[i].0.parsed.header;
                    let (w, _) = self.allowed_wrap(h, files[i].1).expect("grouped above");
                    (w.clone(), self.context(h))
                })
                .collect();
            for (&i, dek) in idx.iter().zip(key.unwrap_many(&items).await) {
                out[i] = Some(match dek {
                    Ok(dek) => check(i, dek),
                    Err(first) => {
                        let (header, policy, label) = files[i];
                        let h = &header.parsed.header;
                        let ctx = self.context(h);
                        let mut answer =
                            Err(FsError::kms(label, "the DEK could not be unwrapped", first));
                        for (w, other) in self.allowed_wraps(h, policy).skip(1) {
                            if let Ok(dek) = other.unwrap(w, &ctx).await {
                                tracing::warn!(
                                    "{label}: unwrapped with recipient {} because the first key failed",
                                    other.describe()
                                );
                                answer = check(i, dek);
                                break;
                            }
                        }
                        answer
                    }
                });
            }
        }
        out.into_iter()
            .map(|r| r.expect("every file answered"))
            .collect()
    }

    /// Sealed headers for `files`: file `i`, unless `deks[i]` is `None`
    /// (its answer is then an error the caller replaces with its own), gets
    /// `deks[i]` wrapped under its policy's wrapping keys (current key, then
    /// recipients) bound to file ID `ids[i]`, in a header of format 1 if
    /// `format_1[i]` (else 2) with its old cipher and block size. One
    /// `wrap_many` per wrapping key.
    async fn seal_for(
        &self, files: &[LifecycleFile<'_>], deks: &[Option<Dek>], ids: &[[u8; 16]],
        format_1: &[bool],
    ) -> Vec<FsResult<NewFile>> {
        let mut errors: Vec<Option<FsError>> = files.iter().map(|_| None).collect();
        let mut wraps: Vec<Vec<WrappedDek>> = files.iter().map(|_| Vec::new()).collect();
        let ctx = |i: usize| {
            if format_1[i] {
                WrapContext::file_v1(ids[i])
            } else {
                WrapContext::file(ids[i], self.volume_id)
            }
        };
        let slots = files
            .iter()
            .map(|f| f.1.wrapping().len())
            .max()
            .unwrap_or(0);
        for slot in 0..slots {
            let mut by_key: Vec<(Arc<dyn KeyProvider>, Vec<usize>)> = Vec::new();
            for (i, (_, policy, label)) in files.iter().enumerate() {
                if deks[i].is_none() || errors[i].is_some() || slot >= policy.wrapping().len() {
                    continue;
                }
                if slot > 0 && format_1[i] {
                    errors[i] = Some(FsError::header(
                        label,
                        "is a format 1 file, which holds one wrapped DEK only: its policy's \
                         recipients cannot be added (`kmsfs rekey` makes it format 2)",
                    ));
                    continue;
                }
                group(&mut by_key, &policy.wrapping()[slot], i);
            }
            for (key, idx) in by_key {
                let items: Vec<(&Dek, WrapContext)> = idx
                    .iter()
                    .map(|&i| (deks[i].as_ref().expect("checked above"), ctx(i)))
                    .collect();
                for (&i, w) in idx.iter().zip(key.wrap_many(&items).await) {
                    match w {
                        Ok(w) => wraps[i].push(w),
                        Err(e) => {
                            errors[i] = Some(FsError::kms(
                                files[i].2,
                                "the DEK could not be wrapped under the policy's key",
                                e,
                            ))
                        }
                    }
                }
            }
        }
        files
            .iter()
            .enumerate()
            .map(|(i, (header, _, label))| {
                let Some(dek) = &deks[i] else {
                    return Err(FsError::errno(libc::EIO));
                };
                if let Some(e) = errors[i].take() {
                    return Err(e);
                }
                let old = &header.parsed.header;
                let layout = if format_1[i] {
                    BlockLayout::V1
                } else {
                    BlockLayout::V2
                };
                let geometry = BlockGeometry::new(old.geometry.shift(), layout)
                    .map_err(|e| FsError::header(label, e))?;
                let h = Header::new(old.cipher, geometry, ids[i], std::mem::take(&mut wraps[i]))
                    .map_err(|e| FsError::header(label, e))?;
                let (raw, cipher) =
                    crypto::seal_header(&h, dek).map_err(|e| FsError::header(label, e))?;
                let parsed = hdr::parse(&raw).map_err(|e| FsError::header(label, e))?;
                Ok(NewFile {
                    header: FileHeader { parsed, raw },
                    cipher,
                })
            })
            .collect()
    }

    /// New headers for `files`, each governed by its policy: the same file
    /// ID, cipher, block size and DEK, wrapped again under the policy's
    /// wrapping keys and sealed again (`kmsfs rewrap`). Each DEK is
    /// unwrapped and its old header's MAC checked first, as at open. A KMS
    /// with a batch API gets one request per key per batch. One answer per
    /// file, in order. A format 1 header stays format 1 (no recipients).
    pub async fn rewrap(&self, files: &[LifecycleFile<'_>]) -> Vec<FsResult<FileHeader>> {
        let (deks, mut errors) = split(self.unwrap_checked(files).await);
        let ids: Vec<[u8; 16]> = files.iter().map(|f| f.0.parsed.header.file_id).collect();
        let v1: Vec<bool> = files
            .iter()
            .map(|f| f.0.parsed.header.version() == VERSION_1)
            .collect();
        let sealed = self.seal_for(files, &deks, &ids, &v1).await;
        sealed
            .into_iter()
            .zip(errors.iter_mut())
            .map(|(r, e)| match e.take() {
                Some(e) => Err(e),
                None => r.map(|n| n.header),
            })
            .collect()
    }

    /// For each of `files` (`kmsfs rekey`): the block cipher of its data as
    /// it is (DEK unwrapped and header MAC checked, as at open), and a new
    /// format 2 header with a fresh DEK and file ID under the policy's
    /// wrapping keys, with its block cipher. Fresh DEKs are made here and
    /// wrapped in batches.
    pub async fn rekey(
        &self, files: &[LifecycleFile<'_>],
    ) -> Vec<FsResult<(BlockCipher, NewFile)>> {
        let (old, mut errors) = split(self.unwrap_checked(files).await);
        let old_ciphers: Vec<Option<BlockCipher>> = files
            .iter()
            .zip(&old)
            .map(|((header, _, _), dek)| {
                // The MAC was checked with this DEK already.
                dek.as_ref()
                    .and_then(|dek| crypto::open_header(&header.parsed, dek).ok())
            })
            .collect();
        drop(old);
        let deks: Vec<Option<Dek>> = old_ciphers
            .iter()
            .map(|c| c.as_ref().map(|_| Dek::generate()))
            .collect();
        let ids: Vec<[u8; 16]> = files.iter().map(|_| crypto::random_file_id()).collect();
        let v1 = vec![false; files.len()];
        let sealed = self.seal_for(files, &deks, &ids, &v1).await;
        old_ciphers
            .into_iter()
            .zip(sealed)
            .zip(errors.iter_mut())
            .map(|((old, new), e)| match (e.take(), old) {
                (Some(e), _) => Err(e),
                (None, Some(old)) => Ok((old, new?)),
                (None, None) => Err(FsError::errno(libc::EIO)),
            })
            .collect()
    }

    /// Whether `policy` allows any of `h`'s wraps (reads no key): a header
    /// it does not is refused at open whatever its DEK.
    pub fn allows(&self, h: &Header, policy: &ActivePolicy) -> bool {
        self.allowed_wrap(h, policy).is_some()
    }

    /// The block ciphers of `files` as an open would build them (DEK
    /// unwrapped under a key the policy allows, header MAC checked), in KMS
    /// batches as for `rewrap` (`kmsfs fsck --verify`). One answer per
    /// file, in order.
    pub async fn verify(&self, files: &[LifecycleFile<'_>]) -> Vec<FsResult<BlockCipher>> {
        self.unwrap_checked(files)
            .await
            .into_iter()
            .zip(files)
            .map(|(dek, (header, _, label))| {
                crypto::open_header(&header.parsed, &dek?).map_err(|e| FsError::header(label, e))
            })
            .collect()
    }

    /// Whether the DEK of `h` is cached (without touching the LRU order).
    pub fn is_cached(&self, h: &Header) -> bool {
        let ctx = self.context(h);
        h.wraps().iter().any(|w| self.cache.contains(w, &ctx))
    }

    /// Unwraps the DEKs of `headers` (files governed by `policy`) into the
    /// cache ahead of their opens, in batches per remote key, each sent as
    /// soon as it is full. Blocks on the KMS: call from a prefetch thread
    /// only. Headers the policy does not allow, whose DEK is cached, or that
    /// a local keyring serves (cheap to unwrap at open) are skipped;
    /// failures are left to the open, which reports them.
    pub fn prefetch(
        &self, runtime: &KmsRuntime, policy: &ActivePolicy, headers: impl Iterator<Item = Header>,
    ) {
        let mut groups: Vec<(Arc<dyn KeyProvider>, Vec<UnwrapItem>)> = Vec::new();
        let send = |key: &Arc<dyn KeyProvider>, items: Vec<UnwrapItem>| {
            let deks = runtime.block_on(key.unwrap_many(&items));
            for ((wrapped, ctx), dek) in items.iter().zip(deks) {
                if let Ok(dek) = dek {
                    self.cache.insert(wrapped, ctx, Arc::new(dek));
                }
            }
        };
        for h in headers {
            let Some((wrapped, key)) = self.allowed_wrap(&h, policy) else {
                continue;
            };
            if key.kind() == "local" || self.is_cached(&h) {
                continue;
            }
            let item = (wrapped.clone(), self.context(&h));
            let i = match groups.iter().position(|(k, _)| Arc::ptr_eq(k, key)) {
                Some(i) => i,
                None => {
                    groups.push((key.clone(), Vec::new()));
                    groups.len() - 1
                }
            };
            let (k, items) = &mut groups[i];
            items.push(item);
            if items.len() == PREFETCH_BATCH {
                send(k, std::mem::take(items));
            }
        }
        for (key, items) in groups {
            if !items.is_empty() {
                send(&key, items);
            }
        }
    }
}

/// Why `policy` does not open a file with header `h`, for the log line.
fn refusal(h: &Header, policy: &ActivePolicy, legacy_v1_files: bool) -> String {
    if h.version() == VERSION_1 && !legacy_v1_files {
        return "is a format 1 file, but this volume was created with format 2 and never had \
                one: it was copied or planted into the backing directory"
            .into();
    }
    let wraps: Vec<String> = h
        .wraps()
        .iter()
        .map(|w| format!("{:?}/{:?}", w.key_ref.provider, w.key_ref.key_id))
        .collect();
    let allowed: Vec<String> = policy.policy.keys().map(|k| k.to_string()).collect();
    format!(
        "is wrapped under {}, which the policy of {} does not allow (it allows {}): a file \
         moved or planted from elsewhere, or a key no longer recorded for this directory",
        wraps.join(", "),
        policy.policy.dir,
        allowed.join(", ")
    )
}
