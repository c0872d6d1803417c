//! The block keys of a layout V2 file: one AEAD key per epoch.
//!
//! Why epochs: with random 96-bit nonces under one key, the chance that two
//! of `n` seals share a nonce is about `n^2 / 2^97`, which caps a V1 file at
//! about 2^32 block seals. Here an open file seals under a current epoch,
//! a fresh random u64, and draws a new one after [`SEALS_PER_EPOCH`] seals,
//! so no epoch key sees more than 2^16 seals (random nonces within it). The
//! collision bound summed over all keys is then about `N * 2^16 / 2^97` for
//! `N` seals: 2^-33 at N = 2^48. Two of `m` epochs are equal with
//! probability about `m^2 / 2^65` (1/2 for the 2^32 epochs of 2^48 seals),
//! but a repeat merely doubles one key's count, which leaves the bound as
//! it is. docs/FORMAT.md section 4.2 has the argument.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};

use aws_lc_rs::aead::{Algorithm, LessSafeKey, UnboundKey};
use hmac::digest::generic_array::GenericArray;
use hmac::digest::FixedOutput;
use hmac::{Hmac, Mac};
use rand::RngCore;
use sha2::Sha256;
use zeroize::Zeroizing;

/// Seals under one epoch before the next is drawn.
pub const SEALS_PER_EPOCH: u64 = 1 << 16;

/// Keys of earlier epochs kept for opening, beyond the current one. A file
/// written over many sessions has many epochs; a read mostly meets a few.
/// Bounded, so blocks naming ever new epochs cannot grow memory.
pub const RECENT_EPOCHS: usize = 64;

const EPOCH_KEY_LABEL: &[u8] = b"kmsfs v2 epoch key";

struct Current {
    epoch: u64,
    key: LessSafeKey,
    /// Seals claimed under this epoch (may run past the limit while
    /// threads wait for the rotation; only claims below it seal).
    seals: AtomicU64,
}

struct Recent {
    epoch: u64,
    key: LessSafeKey,
    /// Used since the clock hand last passed (second-chance eviction: a hit
    /// under the shared lock only sets a flag, no list to reorder).
    used: AtomicBool,
}

/// The AEAD key of `epoch`: `HMAC-SHA256(root, label || epoch as u64 BE)`.
fn epoch_key(alg: &'static Algorithm, root: &[u8; 32], epoch: u64) -> LessSafeKey {
    let mut mac =
        <Hmac<Sha256> as Mac>::new_from_slice(&root[..]).expect("HMAC takes any key length");
    mac.update(EPOCH_KEY_LABEL);
    mac.update(&epoch.to_be_bytes());
    let mut key = Zeroizing::new([0u8; 32]);
    mac.finalize_into(GenericArray::from_mut_slice(&mut key[..]));
    LessSafeKey::new(UnboundKey::new(alg, &key[..]).expect("32-byte key fits both suites"))
}

/// A new current epoch, drawn from the OS CSPRNG.
fn fresh_epoch(alg: &'static Algorithm, root: &[u8; 32]) -> Current {
    let epoch = rand::rngs::OsRng.next_u64();
    Current {
        epoch,
        key: epoch_key(alg, root, epoch),
        seals: AtomicU64::new(0),
    }
}

struct State {
    current: Current,
    /// At most `RECENT_EPOCHS`; only epochs that were sealed by this cipher
    /// or opened a block that authenticated.
    recent: Vec<Recent>,
    hand: usize,
}

impl State {
    fn remember(&mut self, epoch: u64, key: LessSafeKey) {
        if self.current.epoch == epoch || self.recent.iter().any(|r| r.epoch == epoch) {
            return;
        }
        let entry = Recent {
            epoch,
            key,
            used: AtomicBool::new(false),
        };
        if self.recent.len() < RECENT_EPOCHS {
            self.recent.push(entry);
            return;
        }
        loop {
            let slot = &mut self.recent[self.hand];
            self.hand = (self.hand + 1) % RECENT_EPOCHS;
            if !std::mem::take(slot.used.get_mut()) {
                // The evicted key's context is cleansed by aws-lc on drop.
                *slot = entry;
                return;
            }
        }
    }
}

/// The epoch keys of one file: the root key they derive from, the current
/// epoch with its seal count, and a bounded set of recent epochs.
pub(super) struct EpochKeys {
    alg: &'static Algorithm,
    root: Zeroizing<[u8; 32]>,
    seals_per_epoch: u64,
    state: RwLock<State>,
}

impl EpochKeys {
    /// Keys under `root` for `alg`, with a fresh current epoch, rotated after
    /// `seals_per_epoch` seals ([`SEALS_PER_EPOCH`] except in tests).
    pub(super) fn new(
        alg: &'static Algorithm, root: Zeroizing<[u8; 32]>, seals_per_epoch: u64,
    ) -> Self {
        let current = fresh_epoch(alg, &root);
        Self {
            alg,
            root,
            seals_per_epoch,
            state: RwLock::new(State {
                current,
                recent: Vec::new(),
                hand: 0,
            }),
        }
    }

    /// The AEAD key of `epoch`.
    pub(super) fn key_of(&self, epoch: u64) -> LessSafeKey {
        epoch_key(self.alg, &self.root, epoch)
    }

    fn read(&self) -> RwLockReadGuard<'_, State> {
        // Writers leave the state consistent at every step, so a panic
        // elsewhere while holding the lock leaves nothing half-done.
        self.state.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn write(&self) -> RwLockWriteGuard<'_, State> {
        self.state.write().unwrap_or_else(PoisonError::into_inner)
    }

    /// Most seals one call of [`Self::seal`] may claim.
    pub(super) fn max_claim(&self) -> u64 {
        self.seals_per_epoch
    }

    /// Runs `seal` with the current epoch and its key, which it may use for
    /// `count` seals (1 to [`Self::max_claim`]); draws a new epoch when the
    /// current one has fewer than `count` left. Safe from any number of
    /// threads: no key ever seals more than `seals_per_epoch` times.
    /// Claiming a run of seals at once touches the shared count and lock
    /// once per run rather than per block.
    pub(super) fn seal<R>(&self, count: u64, seal: impl FnOnce(u64, &LessSafeKey) -> R) -> R {
        assert!((1..=self.seals_per_epoch).contains(&count));
        loop {
            {
                let state = self.read();
                let current = &state.current;
                let before = current.seals.fetch_add(count, Ordering::Relaxed);
                if before + count <= self.seals_per_epoch {
                    return seal(current.epoch, &current.key);
                }
                // The rest of this epoch's budget stays unused.
            }
            self.rotate();
        }
    }

    fn rotate(&self) {
        // Derived outside the lock; wasted if another thread rotates first.
        let fresh = fresh_epoch(self.alg, &self.root);
        let mut state = self.write();
        if state.current.seals.load(Ordering::Relaxed) < self.seals_per_epoch {
            return;
        }
        let old = std::mem::replace(&mut state.current, fresh);
        // Blocks just sealed under it are likely read back soon.
        state.remember(old.epoch, old.key);
    }

    /// Runs `open` with the key of `epoch` (true when the block
    /// authenticated). A key derived here is remembered only if its block
    /// authenticated, so forged epochs cannot push real ones out.
    pub(super) fn open(&self, epoch: u64, open: impl FnOnce(&LessSafeKey) -> bool) -> bool {
        {
            let state = self.read();
            if state.current.epoch == epoch {
                return open(&state.current.key);
            }
            if let Some(r) = state.recent.iter().find(|r| r.epoch == epoch) {
                if !r.used.load(Ordering::Relaxed) {
                    r.used.store(true, Ordering::Relaxed);
                }
                return open(&r.key);
            }
        }
        let key = self.key_of(epoch);
        if !open(&key) {
            return false;
        }
        self.write().remember(epoch, key);
        true
    }

    #[cfg(test)]
    pub(super) fn current_epoch(&self) -> u64 {
        self.read().current.epoch
    }

    #[cfg(test)]
    pub(super) fn recent_epochs(&self) -> Vec<u64> {
        self.read().recent.iter().map(|r| r.epoch).collect()
    }
}
