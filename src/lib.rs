//! kmsfs: a FUSE filesystem that encrypts every file with its own data key
//! (DEK), wraps that DEK with a key held in a KMS, and keeps the wrapped DEK
//! in a sidecar header beside the ciphertext.
//!
//! Layers, bottom up: [`format`] (bytes, no I/O), [`crypto`], [`kms`] (one
//! trait, one module per provider), [`cache`], [`config`], [`fs`] (backing
//! logic plus a thin fuser adapter), and the `kmsfs` binary's CLI.

pub mod audit;
pub mod cache;
pub mod config;
pub mod crypto;
pub mod duration;
pub mod failpoint;
pub mod format;
pub mod fs;
#[cfg(feature = "fuzzing")]
#[doc(hidden)]
pub mod fuzzing;
pub mod kms;
pub mod lifecycle;
pub mod metrics;
pub mod policy;
pub mod safe_open;
pub mod volume;

pub use volume::Volume;
