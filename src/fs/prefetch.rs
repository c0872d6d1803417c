//! Directory prefetch: before the first cold open in a directory, its other
//! files' keys are made ready, so readers working through the directory do
//! not wait for each sidecar's disk read, and with a remote KMS for each
//! unwrap.
//!
//! With a remote KMS the directory's DEKs (at most as many as the cache
//! holds) are unwrapped in batches, one KMS request per batch instead of one
//! per file; with the local keyring only its sidecars are read ahead (the
//! unwrap is cheap). Once per directory per cache lifetime. Listing a
//! directory does not start it: `ls -lR` or `find` must not unwrap every DEK
//! in the tree.

use std::collections::HashMap;
use std::ffi::{OsStr, OsString};
use std::os::unix::ffi::OsStrExt;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use fuser::FileType;

use super::inode::Inode;
use super::{sidecar, sys, Core};
use crate::format::names::is_reserved;

/// Directories whose keys were prefetched, and when.
#[derive(Default)]
pub struct PrefetchedDirs(Mutex<HashMap<u64, Instant>>);

impl PrefetchedDirs {
    /// True for the first prefetch of directory `ino` within `ttl`.
    fn claim(&self, ino: u64, ttl: std::time::Duration) -> bool {
        const PRUNE_AT: usize = 10_000;
        let mut seen = self.0.lock().unwrap();
        let now = Instant::now();
        if seen.get(&ino).is_some_and(|t| now.duration_since(*t) < ttl) {
            return false;
        }
        if seen.len() >= PRUNE_AT {
            seen.retain(|_, t| now.duration_since(*t) < ttl);
        }
        seen.insert(ino, now);
        true
    }

    /// Lets a later open of directory `ino` try again.
    fn release(&self, ino: u64) {
        self.0.lock().unwrap().remove(&ino);
    }
}

impl Core {
    /// Starts the prefetch of the directory of file `inode`, unless done
    /// (see the module documentation). Never waits for it.
    pub(super) fn prefetch_siblings(self: &Arc<Self>, inode: &Inode) {
        if inode.kind != FileType::RegularFile || inode.open_state().is_some() {
            return;
        }
        let remote = self.has_remote_kms();
        if remote {
            let Ok(header) = self.header_of(inode) else {
                return;
            };
            if self.keys.is_cached(&header.parsed.header) {
                return;
            }
        } else if inode.header.read().unwrap().is_some() {
            return;
        }
        let Some((parent, own_name)) = inode.location() else {
            return;
        };
        if !self.prefetched.claim(parent, self.keys.cache_ttl()) {
            return;
        }
        let Ok(dir) = self.inodes.dir(parent) else {
            return;
        };
        let cap = self.keys.cache_capacity();
        if remote {
            // Listed here rather than on the prefetch thread: the batch then
            // goes out sooner, before the other readers' opens unwrap one by
            // one (measured: half the KMS requests). One getdents pass.
            let names = sibling_names(&dir, &own_name, cap);
            if names.is_empty() {
                return;
            }
            let core = self.clone();
            spawn_background(move || {
                // An open racing a batch unwraps its own DEK rather than wait
                // for the batch: making opens wait for 240-DEK batches (tried)
                // cut KMS requests by half but slowed a cold Vault read to
                // 0.58x of the local keyring.
                let headers = names
                    .iter()
                    .filter_map(|n| sidecar::read_at(dir.raw_fd(), n).ok())
                    .map(|h| h.parsed.header);
                if let Ok(policy) = core.policy_in(&dir) {
                    core.keys.prefetch(&core.runtime, &policy, headers);
                }
            });
        } else {
            // Listed and read ahead on the readahead thread. Only a hint:
            // with its queue full this directory goes without, and a later
            // open may try again.
            let job = Box::new(move || {
                sidecar::read_ahead_at(dir.raw_fd(), &sibling_names(&dir, &own_name, cap))
            });
            if self.readahead.try_queue(job).is_err() {
                self.prefetched.release(parent);
            }
        }
    }

    fn has_remote_kms(&self) -> bool {
        self.policies()
            .iter()
            .any(|p| p.keys.iter().any(|k| k.kind() != "local"))
    }
}

/// Names of up to `cap` regular files in `dir` other than `own_name` (the
/// file being opened reads its own sidecar); empty if it cannot be listed.
fn sibling_names(dir: &Inode, own_name: &OsStr, cap: usize) -> Vec<OsString> {
    let path = sys::proc_path(&dir.raw_fd());
    let Ok(rd) = std::fs::read_dir(OsStr::from_bytes(path.as_bytes())) else {
        return Vec::new();
    };
    rd.flatten()
        .filter(|e| {
            e.file_type().is_ok_and(|t| t.is_file())
                && !is_reserved(e.file_name().as_bytes())
                && e.file_name() != own_name
        })
        .map(|e| e.file_name())
        .take(cap)
        .collect()
}

/// Runs DEK prefetch on its own short-lived thread, off the FUSE workers
/// and the KMS runtime (it reads sidecars and waits for the KMS); one
/// thread per directory, so that one directory's batches do not wait for
/// another's.
fn spawn_background(work: impl FnOnce() + Send + 'static) {
    if let Err(e) = std::thread::Builder::new()
        .name("kmsfs-prefetch".into())
        .spawn(work)
    {
        tracing::debug!("no prefetch thread: {e}");
    }
}
