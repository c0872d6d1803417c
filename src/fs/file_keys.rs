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
//! and the volume, the header sealed. Callers get a `BlockCipher` and
//! header bytes, never a `Dek`.

use std::sync::Arc;

use super::error::{FsError, FsResult};
use super::sidecar::FileHeader;
use crate::cache::DekCache;
use crate::config::volume::VolumeId;
use crate::config::ActivePolicy;
use crate::crypto::{self, BlockCipher};
use crate::format::header::{self as hdr, Header, VERSION_1};
use crate::kms::{KeyProvider, KmsRuntime, WrapContext, WrappedDek};
use crate::metrics::CacheStats;

/// Most DEKs per batch unwrap request of a prefetch.
const PREFETCH_BATCH: usize = 240;

/// A wrapped DEK with the context it was wrapped under.
type UnwrapItem = (WrappedDek, WrapContext);

/// A new file's sealed header and block cipher.
pub struct NewFile {
    pub header: FileHeader,
    pub cipher: BlockCipher,
}

/// The DEK cache, and what every wrap of this volume is bound to.
pub struct FileKeys {
    cache: DekCache,
    volume_id: VolumeId,
    /// Format 1 headers may be present (an upgraded volume).
    legacy_v1_files: bool,
}

impl FileKeys {
    pub fn new(cache: DekCache, volume_id: VolumeId, legacy_v1_files: bool) -> Self {
        Self {
            cache,
            volume_id,
            legacy_v1_files,
        }
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
        let format_1 = h.version() == VERSION_1;
        if format_1 && !self.legacy_v1_files {
            return None;
        }
        h.wraps()
            .iter()
            .find_map(|w| policy.key_for(&w.key_ref, format_1).map(|k| (w, k)))
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
        &self, header: &FileHeader, policy: &ActivePolicy, label: &str,
    ) -> FsResult<BlockCipher> {
        let h = &header.parsed.header;
        let Some((wrapped, key)) = self.allowed_wrap(h, policy) else {
            return Err(FsError::header(
                label,
                refusal(h, policy, self.legacy_v1_files),
            ));
        };
        let ctx = self.context(h);
        let dek = self
            .cache
            .get_or_unwrap(wrapped, &ctx, key.as_ref())
            .await
            .map_err(|e| FsError::kms(label, "the DEK could not be unwrapped", e))?;
        crypto::open_header(&header.parsed, &dek).map_err(|e| FsError::header(label, e))
    }

    /// Keys for a new file under `policy`: a random file ID, a DEK generated
    /// (and wrapped) by the policy's current key, bound to the file and the
    /// volume, and a format 2 header sealed under it with `block_shift`. The
    /// DEK goes into the cache, so the file's next open makes no KMS call.
    pub async fn create(
        &self, policy: &ActivePolicy, block_shift: u8, label: &str,
    ) -> FsResult<NewFile> {
        let file_id = crypto::random_file_id();
        let ctx = WrapContext::file(file_id, self.volume_id);
        let (dek, wrapped) =
            policy.current.generate_dek(&ctx).await.map_err(|e| {
                FsError::kms(label, "no DEK could be generated for the new file", e)
            })?;
        let header = Header::v2(policy.policy.cipher, block_shift, file_id, vec![wrapped])
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
