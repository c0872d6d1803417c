//! `kmsfs kms test|status`: whether the KMSs of a backing directory work.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Subcommand;

use kmsfs::config::{Calls, KeySpec, VolumeConfig};
use kmsfs::kms::probe::{probe_all, KeyHealth, ProbeTarget};
use kmsfs::kms::KmsRuntime;
use kmsfs::policy::normalize_dir;

use super::{absolute, print_json, trust, RetryLater};

#[derive(Subcommand)]
pub enum KmsCmd {
    /// Wrap/unwrap round trip against the KMS of DIR's policy (default /).
    Test {
        backing: PathBuf,
        dir: Option<String>,
    },
    /// Every KMS key the backing directory names, all at once: reachable,
    /// authenticated, key present, latency, versions. Exits 0 when every
    /// key answers, 75 when only unreachable or slow KMSs failed (a retry
    /// may help), 1 when some failure needs fixing.
    Status {
        backing: PathBuf,
        /// One JSON row per key instead of one line.
        #[arg(long)]
        json: bool,
        /// Seconds each key's check (connecting included) may take.
        #[arg(long, value_name = "SECONDS", default_value_t = 10)]
        timeout: u64,
    },
}

pub fn kms_cmd(action: KmsCmd) -> Result<()> {
    match action {
        KmsCmd::Test { backing, dir } => test(backing, dir),
        KmsCmd::Status {
            backing,
            json,
            timeout,
        } => status(backing, json, timeout),
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

/// Checks every key the volume names at once, each through its trusted
/// provider (connecting, a real round trip, and its versions where the KMS
/// reports them), within `timeout` seconds each; prints a line per key, or
/// with `json` a JSON row per key. Fails if any failed, as a temporary
/// failure (exit 75) when a retry may fix every one of them. The volume's
/// MAC is not checked here (that needs the root key, which may be the one
/// down): the keys are only looked up in the trusted configuration.
fn status(backing: PathBuf, json: bool, timeout: u64) -> Result<()> {
    let config = VolumeConfig::load(&absolute(&backing)?)?;
    let trusted = trust::load()?;
    let rt = KmsRuntime::new()?;
    let mut keys: Vec<&KeySpec> = Vec::new();
    for k in config.policies.iter().flat_map(|p| p.keys()) {
        if !keys.contains(&k) {
            keys.push(k);
        }
    }
    let targets = keys
        .iter()
        .map(|&key| {
            let target = match trusted.resolve(key) {
                Ok(settings) => ProbeTarget::Settings(Box::new(settings)),
                Err(e) => ProbeTarget::Unresolved(e.to_string()),
            };
            (key.clone(), target)
        })
        .collect();
    let results = rt.block_on(probe_all(
        targets,
        Duration::from_secs(timeout.max(1)),
        true,
    ));
    let mut rows = Vec::new();
    for (key, health) in keys.iter().zip(&results) {
        let dirs: Vec<&str> = config
            .policies
            .iter()
            .filter(|p| p.keys().any(|k| k == *key))
            .map(|p| p.dir.as_str())
            .collect();
        if json {
            let mut row = serde_json::to_value(health)?;
            row["policies"] = serde_json::json!(dirs);
            if health.ok {
                for fact in ["reachable", "authenticated", "key_present"] {
                    row[fact] = true.into();
                }
            }
            rows.push(row);
        } else if health.ok {
            let current = health
                .versions
                .as_ref()
                .and_then(|v| v.current.as_deref())
                .map(|v| format!(", current version {v}"))
                .unwrap_or_default();
            println!(
                "ok    {key}: {} in {:.1} ms{current} (policies {})",
                health.kms.as_deref().unwrap_or("?"),
                health.latency_ms,
                dirs.join(", ")
            );
        } else {
            println!(
                "FAIL  {key}: {} (policies {})",
                health.error.as_deref().unwrap_or("failed"),
                dirs.join(", ")
            );
        }
    }
    if json {
        print_json(&rows)?;
    }
    let failed: Vec<&KeyHealth> = results.iter().filter(|h| !h.ok).collect();
    if failed.is_empty() {
        return Ok(());
    }
    let summary = format!("{} KMS key(s) failed their check", failed.len());
    if failed.iter().all(|h| h.retryable) {
        return Err(RetryLater(format!("{summary}; try again once the KMS answers")).into());
    }
    bail!("{summary}; fix what each one says")
}
