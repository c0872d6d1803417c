//! A file's keys: the only part of the filesystem that handles DEKs.
//!
//! Opening an existing file is one sequence, `FileKeys::cipher_for`: the
//! DEK comes from the cache or from one KMS unwrap shared by concurrent
//! callers, the header MAC is checked with it, and only then is the block
//! cipher built (`crypto::open_header` does the last two steps and is the
//! only way to a cipher). A new file is the reverse, `FileKeys::create`: a
//! fresh file ID and DEK from the policy's KMS, the header sealed. Callers
//! get a `BlockCipher` and header bytes, never a `Dek`.

use std::sync::Arc;

use super::error::{FsError, FsResult};
use super::sidecar::FileHeader;
use crate::cache::DekCache;
use crate::crypto::{self, BlockCipher, Dek};
use crate::format::header::{self as hdr, Header};
use crate::format::{BlockGeometry, CipherSuite};
use crate::kms::{KeyProvider, KmsError, KmsRuntime, ProviderSet, WrapContext, WrappedDek};
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

/// DEK cache plus every provider that may unwrap a file's DEK.
pub struct FileKeys {
    cache: DekCache,
    providers: ProviderSet,
}

/// The wrap context of a header: what its wrapped DEK is bound to.
fn context(h: &Header) -> WrapContext {
    WrapContext { file_id: h.file_id }
}

impl FileKeys {
    pub fn new(cache: DekCache, providers: ProviderSet) -> Self {
        Self { cache, providers }
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

    /// The block cipher of an existing file (see the module documentation).
    /// `label` names the file in errors.
    pub async fn cipher_for(&self, header: &FileHeader, label: &str) -> FsResult<BlockCipher> {
        let h = &header.parsed.header;
        let dek = self.dek_for(h).await.map_err(|source| FsError::Kms {
            file: label.to_owned(),
            action: "the DEK could not be unwrapped",
            source: Box::new(source),
        })?;
        crypto::open_header(&header.parsed, &dek).map_err(|e| FsError::header(label, e))
    }

    /// The DEK of header `h`: cached, or one unwrap shared by all callers.
    async fn dek_for(&self, h: &Header) -> Result<Arc<Dek>, KmsError> {
        let ctx = context(h);
        if let Some(d) = self.cache.get(h.primary(), &ctx) {
            return Ok(d);
        }
        let provider = self.providers.for_key(&h.primary().key_ref)?;
        self.cache
            .get_or_unwrap(h.primary(), &ctx, provider.as_ref())
            .await
    }

    /// Keys for a new file: a random file ID, a DEK generated (and wrapped)
    /// by `provider`, and the header sealed under it. The DEK goes into the
    /// cache, so the file's next open makes no KMS call.
    pub async fn create(
        &self,
        provider: &dyn KeyProvider,
        cipher: CipherSuite,
        geometry: BlockGeometry,
        label: &str,
    ) -> FsResult<NewFile> {
        let file_id = crypto::random_file_id();
        let ctx = WrapContext { file_id };
        let (dek, wrapped) = provider
            .generate_dek(&ctx)
            .await
            .map_err(|source| FsError::Kms {
                file: label.to_owned(),
                action: "no DEK could be generated for the new file",
                source: Box::new(source),
            })?;
        // The header's version follows the geometry's layout.
        let header = Header::new(cipher, geometry, file_id, vec![wrapped])
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
        self.cache.contains(h.primary(), &context(h))
    }

    /// Unwraps the DEKs of `headers` into the cache ahead of their opens, in
    /// batches per remote provider, each sent as soon as it is full. Blocks
    /// on the KMS: call from a prefetch thread only. Headers whose DEK is
    /// cached, or that a local keyring serves (cheap to unwrap at open),
    /// are skipped; failures are left to the open, which reports them.
    pub fn prefetch(&self, runtime: &KmsRuntime, headers: impl Iterator<Item = Header>) {
        let mut groups: Vec<(Arc<dyn KeyProvider>, Vec<UnwrapItem>)> = Vec::new();
        let send = |provider: &Arc<dyn KeyProvider>, items: Vec<UnwrapItem>| {
            let deks = runtime.block_on(provider.unwrap_many(&items));
            for ((wrapped, ctx), dek) in items.iter().zip(deks) {
                if let Ok(dek) = dek {
                    self.cache.insert(wrapped, ctx, Arc::new(dek));
                }
            }
        };
        for h in headers {
            let Ok(provider) = self.providers.for_key(&h.primary().key_ref) else {
                continue;
            };
            if provider.kind() == "local" || self.is_cached(&h) {
                continue;
            }
            let i = match groups.iter().position(|(p, _)| Arc::ptr_eq(p, &provider)) {
                Some(i) => i,
                None => {
                    groups.push((provider, Vec::new()));
                    groups.len() - 1
                }
            };
            let (p, items) = &mut groups[i];
            items.push((h.primary().clone(), context(&h)));
            if items.len() == PREFETCH_BATCH {
                send(p, std::mem::take(items));
            }
        }
        for (provider, items) in groups {
            if !items.is_empty() {
                send(&provider, items);
            }
        }
    }
}
