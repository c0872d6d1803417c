//! `kmsfs kms test|status`: whether the KMSs of a backing directory work.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::Subcommand;

use kmsfs::config::{Calls, VolumeConfig};
use kmsfs::kms::KmsRuntime;
use kmsfs::policy::normalize_dir;

use super::{absolute, is_retryable, print_json, trust, RetryLater};

#[derive(Subcommand)]
pub enum KmsCmd {
    /// Wrap/unwrap round trip against the KMS of DIR's policy (default /).
    Test {
        backing: PathBuf,
        dir: Option<String>,
    },
    /// Every KMS key the backing directory names: reachable, authenticated,
    /// key present.
    Status { backing: PathBuf },
}

pub fn kms_cmd(action: KmsCmd) -> Result<()> {
    match action {
        KmsCmd::Test { backing, dir } => test(backing, dir),
        KmsCmd::Status { backing } => status(backing),
    }
}

fn test(backing: PathBuf, dir: Option<String>) -> Result<()> {
    let dir = normalize_dir(dir.as_deref().unwrap_or("/"))?;
    let (volume, rt) = trust::open_volume(&backing, &Calls::Once)?;
    let policy = volume.policy_for(&dir);
    let provider = &policy.current;
    let start = Instant::now();
    rt.block_on(provider.check()).with_context(|| {
        format!(
            "KMS test for {dir} (policy of {}) failed",
            policy.policy.dir
        )
    })?;
    println!(
        "ok: {} (policy of {}): wrap/unwrap round trip in {:.1} ms",
        provider.describe(),
        policy.policy.dir,
        start.elapsed().as_secs_f64() * 1000.0
    );
    Ok(())
}

/// Checks every key the volume names, each through its trusted provider,
/// and prints one JSON row each; fails if any failed, as a temporary
/// failure when a retry may fix every one of them. The volume's MAC is not
/// checked here (that needs the root key, which may be the one down): the
/// keys are only looked up in the trusted configuration.
fn status(backing: PathBuf) -> Result<()> {
    let config = VolumeConfig::load(&absolute(&backing)?)?;
    let trusted = trust::load()?;
    let rt = KmsRuntime::new()?;
    let mut keys: Vec<&kmsfs::config::KeySpec> = Vec::new();
    for k in config.policies.iter().flat_map(|p| p.keys()) {
        if !keys.contains(&k) {
            keys.push(k);
        }
    }
    let mut rows = Vec::new();
    let mut failures = Vec::new();
    for key in keys {
        let dirs: Vec<&str> = config
            .policies
            .iter()
            .filter(|p| p.keys().any(|k| k == key))
            .map(|p| p.dir.as_str())
            .collect();
        let result = trusted
            .resolve(key)
            .map_err(anyhow::Error::from)
            .and_then(|cfg| Ok(cfg.build(&rt)?))
            .and_then(|p| {
                let start = Instant::now();
                rt.block_on(p.check())?;
                Ok((p.describe(), start.elapsed()))
            });
        rows.push(match result {
            Ok((name, took)) => serde_json::json!({
                "key": key.to_string(), "kms": name, "policies": dirs, "ok": true,
                "reachable": true, "authenticated": true, "key_present": true,
                "latency_ms": took.as_secs_f64() * 1000.0,
            }),
            Err(e) => {
                let row = serde_json::json!({ "key": key.to_string(), "policies": dirs, "ok": false, "error": format!("{e:#}") });
                failures.push(e);
                row
            }
        });
    }
    print_json(&rows)?;
    if failures.is_empty() {
        return Ok(());
    }
    let summary = format!("{} KMS key(s) failed their check", failures.len());
    if failures.iter().all(is_retryable) {
        return Err(RetryLater(summary).into());
    }
    bail!(summary)
}
