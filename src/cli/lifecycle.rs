//! `kmsfs rewrap`, `kmsfs rekey`, `kmsfs rotate` and `kmsfs keys status`:
//! the key lifecycle over a backing directory (see `kmsfs::lifecycle`),
//! with a progress bar on a terminal and plain lines otherwise.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};

use kmsfs::audit::{AuditEvent, AuditLog, AuditOp, AuditOutcome};
use kmsfs::config::{Calls, Volume};
use kmsfs::kms::{KeyRef, KmsRuntime};
use kmsfs::lifecycle::rekey::{rekey, RekeyOptions};
use kmsfs::lifecycle::rewrap::{rewrap, RewrapOptions};
use kmsfs::lifecycle::status::{status, PolicyKeyStatus};
use kmsfs::lifecycle::{Progress, Scope, Summary};
use kmsfs::policy::normalize_dir;

use super::{print_json, trust, RetryLater};

/// What every lifecycle command takes.
#[derive(Args)]
pub struct PassArgs {
    backing: PathBuf,
    /// Only files below this directory (a path inside the volume, like
    /// /pii); default: all.
    #[arg(default_value = "/")]
    dir: String,
    /// Count what would change; change nothing.
    #[arg(long)]
    dry_run: bool,
    /// Batches (rewrap) or files (rekey) worked on at once.
    #[arg(long, default_value_t = 2)]
    concurrency: usize,
    /// Print the summary as JSON on stdout.
    #[arg(long)]
    json: bool,
    /// Log each key operation as a JSON line to FILE (default: the trusted
    /// configuration's `audit_log`).
    #[arg(long, value_name = "FILE")]
    audit_log: Option<PathBuf>,
}

#[derive(Args)]
pub struct RewrapArgs {
    #[command(flatten)]
    pass: PassArgs,
    /// Rewrap every file, also those already under the current key version
    /// (for a KMS that does not name versions, as AWS KMS after a rotation).
    #[arg(long)]
    all: bool,
}

#[derive(Args)]
pub struct RotateArgs {
    /// Rotate each policy's key whose current version is older than its
    /// `rotate_after`, then rewrap the files under it.
    #[arg(long)]
    due: bool,
    backing: PathBuf,
    /// Without --due: rotate the key of the policy governing DIR now.
    dir: Option<String>,
    /// Rotate, but do not rewrap.
    #[arg(long)]
    no_rewrap: bool,
    #[arg(long)]
    dry_run: bool,
    #[arg(long)]
    json: bool,
    #[arg(long, value_name = "FILE")]
    audit_log: Option<PathBuf>,
}

impl RotateArgs {
    /// `kmsfs keys rotate BACKING DIR`: rotate DIR's policy key now, then
    /// rewrap (unless `rewrap` is false).
    pub fn now(backing: PathBuf, dir: String, audit_log: Option<PathBuf>, rewrap: bool) -> Self {
        RotateArgs {
            due: false,
            backing,
            dir: Some(dir),
            no_rewrap: !rewrap,
            dry_run: false,
            json: false,
            audit_log,
        }
    }
}

/// Progress on a terminal: a bar with files, rate and ETA.
struct Bar(ProgressBar);

/// Progress elsewhere (logs, CI): a plain line every few seconds.
struct Lines {
    op: &'static str,
    total: Mutex<(u64, u64, Instant)>,
    started: Instant,
}

impl Progress for Bar {
    fn start(&self, total: u64) {
        self.0.set_length(total);
        // Drawn from here on: before, the total is still being counted.
        self.0
            .set_draw_target(indicatif::ProgressDrawTarget::stderr());
        self.0.enable_steady_tick(Duration::from_millis(200));
    }
    fn advance(&self, n: u64) {
        self.0.inc(n);
    }
    fn note(&self, line: &str) {
        self.0.suspend(|| eprintln!("{line}"));
    }
    fn finish(&self) {
        self.0.finish_and_clear();
    }
}

impl Progress for Lines {
    fn start(&self, total: u64) {
        self.total.lock().unwrap().0 = total;
        eprintln!("kmsfs {}: {total} files to look at", self.op);
    }
    fn advance(&self, n: u64) {
        let mut t = self.total.lock().unwrap();
        t.1 += n;
        if t.2.elapsed() >= Duration::from_secs(5) {
            t.2 = Instant::now();
            let rate = t.1 as f64 / self.started.elapsed().as_secs_f64().max(0.001);
            eprintln!("kmsfs {}: {}/{} files ({rate:.0}/s)", self.op, t.1, t.0);
        }
    }
    fn note(&self, line: &str) {
        eprintln!("{line}");
    }
    fn finish(&self) {}
}

pub(super) fn progress(op: &'static str) -> Box<dyn Progress> {
    if std::io::stderr().is_terminal() {
        let bar = ProgressBar::hidden();
        bar.set_style(
            ProgressStyle::with_template(
                "{prefix} [{bar:30}] {pos}/{len} files  {rate}  ETA {eta}",
            )
            .expect("a valid template")
            .with_key(
                "rate",
                |state: &indicatif::ProgressState, w: &mut dyn std::fmt::Write| {
                    let _ = write!(w, "{:.0} files/s", state.per_sec());
                },
            )
            .progress_chars("=> "),
        );
        bar.set_prefix(format!("kmsfs {op}"));
        Box::new(Bar(bar))
    } else {
        Box::new(Lines {
            op,
            total: Mutex::new((0, 0, Instant::now())),
            started: Instant::now(),
        })
    }
}

/// Prints `summary` (JSON on stdout, or lines on stderr) and fails when
/// files were left: failures (exit 1), or busy / changed files a rerun
/// takes (exit 75).
fn report(summary: &Summary, json: bool) -> Result<()> {
    if json {
        print_json(summary)?;
    } else {
        let verb = if summary.dry_run {
            "would change"
        } else {
            "changed"
        };
        eprintln!(
            "kmsfs {}: {} files in {}: {verb} {}, already current {}, plaintext {}, busy {}, changed meanwhile {}, failed {}; {} KMS batches, {:.1} s{}",
            summary.operation,
            summary.files,
            summary.dir,
            summary.changed,
            summary.up_to_date,
            summary.plaintext,
            summary.busy,
            summary.changed_meanwhile,
            summary.failed,
            summary.kms_batches,
            summary.seconds,
            if summary.temps_removed > 0 {
                format!("; {} leftovers of an interrupted run cleaned up", summary.temps_removed)
            } else {
                String::new()
            }
        );
    }
    if summary.failed > 0 && summary.failed == summary.retryable {
        return Err(RetryLater(format!(
            "{} files could not be {}ed because a KMS was unreachable or slow (listed above); run it again",
            summary.failed, summary.operation
        ))
        .into());
    }
    if summary.failed > 0 {
        bail!(
            "{} files could not be {}ed (listed above); fix what each says and run it again",
            summary.failed,
            summary.operation
        );
    }
    if summary.busy + summary.changed_meanwhile > 0 {
        return Err(RetryLater(format!(
            "{} files were open in a mount or changed meanwhile and were left as they are; run it again",
            summary.busy + summary.changed_meanwhile
        ))
        .into());
    }
    Ok(())
}

/// A pass over `dir` of `volume`, through its mount if it is mounted here.
fn make_scope<'a>(
    volume: &'a Volume, rt: &'a KmsRuntime, dir: String, audit: &'a AuditLog,
) -> Scope<'a> {
    let mountpoint = super::mountinfo::mountpoint_of(&volume.backing);
    Scope {
        volume,
        rt,
        dir,
        audit,
        mountpoint,
    }
}

/// Opens the volume and the audit log for a pass over `dir`.
fn open(
    backing: &Path, audit_log: Option<&Path>,
) -> Result<(Volume, KmsRuntime, std::sync::Arc<AuditLog>)> {
    let (volume, rt) = trust::open_volume(backing, &Calls::Once)?;
    let audit = std::sync::Arc::new(trust::audit_log(audit_log)?);
    volume.set_audit_log(audit.clone());
    Ok((volume, rt, audit))
}

pub fn rewrap_cmd(a: RewrapArgs) -> Result<()> {
    let p = &a.pass;
    let (mut volume, rt, audit) = open(&p.backing, p.audit_log.as_deref())?;
    if !p.dry_run {
        rewrap_volume_key(&mut volume, &rt, &audit, a.all)?;
    }
    let scope = make_scope(&volume, &rt, normalize_dir(&p.dir)?, &audit);
    let opts = RewrapOptions {
        dry_run: p.dry_run,
        concurrency: p.concurrency,
        all: a.all,
    };
    let summary = rewrap(&scope, &opts, progress("rewrap").as_ref())?;
    report(&summary, p.json)
}

/// The volume key is wrapped by the root policy's key, and needs a rewrap
/// as much as any file (else retiring an old root key version would close
/// the volume).
fn rewrap_volume_key(
    volume: &mut Volume, rt: &KmsRuntime, audit: &AuditLog, force: bool,
) -> Result<()> {
    let _lock = kmsfs::config::VolumeConfig::lock(&volume.backing)?;
    // What the lock protects is the configuration as it is now.
    *volume = trust::open_volume(&volume.backing, &Calls::Once)?.0;
    let root = volume.policy_for("/");
    let current = match rt.block_on(root.current.key_versions()) {
        Ok(v) => v.current,
        Err(kmsfs::kms::KmsError::Unsupported { .. }) => None,
        Err(e) => return Err(e.into()),
    };
    let before = volume.config.wrapped_volume_key()?.key_ref;
    if volume.rewrap_volume_key(rt, current.as_deref(), force)? {
        let after = volume.config.wrapped_volume_key()?.key_ref;
        let detail = format!(
            "volume key from {}/{}@{} to {}/{}@{}",
            before.provider,
            before.key_id,
            before.key_version,
            after.provider,
            after.key_id,
            after.key_version
        );
        audit.record(
            &AuditEvent::new(AuditOp::Rewrap, AuditOutcome::Ok)
                .key(&after)
                .detail(&detail),
        );
        eprintln!("kmsfs rewrap: {detail}");
    }
    Ok(())
}

pub fn rekey_cmd(p: PassArgs) -> Result<()> {
    let (volume, rt, audit) = open(&p.backing, p.audit_log.as_deref())?;
    let scope = make_scope(&volume, &rt, normalize_dir(&p.dir)?, &audit);
    let opts = RekeyOptions {
        dry_run: p.dry_run,
        concurrency: p.concurrency,
    };
    let summary = rekey(&scope, &opts, progress("rekey").as_ref())?;
    report(&summary, p.json)
}

/// `kmsfs keys status BACKING [DIR]`.
pub fn status_cmd(backing: &Path, dir: &str, json: bool) -> Result<()> {
    let (volume, rt) = trust::open_volume(backing, &Calls::Once)?;
    let audit = AuditLog::disabled();
    let scope = make_scope(&volume, &rt, normalize_dir(dir)?, &audit);
    let rows = status(&scope)?;
    if json {
        return print_json(&rows);
    }
    for r in &rows {
        print_status(r);
    }
    Ok(())
}

fn age(secs: u64) -> String {
    kmsfs::duration::format(Duration::from_secs(secs))
}

fn print_status(r: &PolicyKeyStatus) {
    let version = r
        .current_version
        .as_deref()
        .unwrap_or("(not named by this KMS)");
    let age = r
        .current_age_secs
        .map(age)
        .unwrap_or_else(|| "unknown".into());
    println!(
        "{}: key {} version {version}, {age} old, {} key mode",
        r.dir,
        r.key,
        r.key_mode.name()
    );
    if !r.recipients.is_empty() {
        println!("  recipients: {}", r.recipients.join(", "));
    }
    if let Some(after) = &r.rotate_after {
        let due = if r.rotation_due { " (due now)" } else { "" };
        println!("  rotate after {after}{due}");
    }
    if let Some(max) = &r.max_key_age {
        let past = if r.past_max_age { " (PAST IT)" } else { "" };
        println!("  max key age {max}{past}");
    }
    println!(
        "  files: {} current, {} stale, {} unreadable, {} plaintext, {} bad headers",
        r.files_current, r.files_stale, r.files_unreadable, r.files_plaintext, r.files_bad_header
    );
    for (k, n) in &r.by_version {
        println!("    {k}: {n}");
    }
}

/// One rotation's line of `kmsfs rotate`.
#[derive(serde::Serialize)]
struct Rotated {
    dir: String,
    key: String,
    from_version: Option<String>,
    to_version: Option<String>,
}

/// `kmsfs rotate [--due] BACKING [DIR]`: rotates keys where they live, then
/// rewraps the files under them.
pub fn rotate_cmd(a: RotateArgs) -> Result<()> {
    let (mut volume, rt, audit) = open(&a.backing, a.audit_log.as_deref())?;
    let scope_dir = match (&a.dir, a.due) {
        (Some(d), false) => normalize_dir(d)?,
        (None, true) => "/".into(),
        (Some(_), true) => {
            bail!("give either --due or a DIR whose policy's key to rotate, not both")
        }
        (None, false) => {
            bail!("give --due (rotate what is due) or a DIR (rotate its policy's key now)")
        }
    };
    let scope = make_scope(&volume, &rt, scope_dir.clone(), &audit);
    let rows = status(&scope)?;
    let chosen: Vec<&PolicyKeyStatus> = if a.due {
        rows.iter().filter(|r| r.rotation_due).collect()
    } else {
        let i = kmsfs::policy::governing(&volume.config.policies, &scope_dir);
        rows.iter()
            .filter(|r| r.dir == volume.config.policies[i].dir)
            .collect()
    };
    let mut rotated = Vec::new();
    let mut rotate_error = None;
    // A key shared by several policies is rotated once.
    let mut done_keys: Vec<String> = Vec::new();
    for r in &chosen {
        if done_keys.contains(&r.key) {
            continue;
        }
        done_keys.push(r.key.clone());
        let active = volume.policy_for(&r.dir);
        if a.dry_run {
            eprintln!("kmsfs: would rotate {} (policy {})", r.key, r.dir);
            continue;
        }
        let result = rt.block_on(active.current.rotate());
        let key_ref = KeyRef {
            provider: active.policy.key.provider.clone(),
            key_id: active.policy.key.id.clone(),
            key_version: String::new(),
        };
        match result {
            Ok(after) => {
                let detail = format!(
                    "policy {}: version {} -> {}",
                    r.dir,
                    r.current_version.as_deref().unwrap_or("?"),
                    after.current.as_deref().unwrap_or("?")
                );
                audit.record(
                    &AuditEvent::new(AuditOp::Rotate, AuditOutcome::Ok)
                        .key(&key_ref)
                        .detail(&detail),
                );
                eprintln!("kmsfs: rotated {} ({detail})", r.key);
                rotated.push(Rotated {
                    dir: r.dir.clone(),
                    key: r.key.clone(),
                    from_version: r.current_version.clone(),
                    to_version: after.current,
                });
            }
            Err(e) => {
                let why = e.to_string();
                audit.record(
                    &AuditEvent::new(AuditOp::Rotate, AuditOutcome::Failed(&why)).key(&key_ref),
                );
                // The keys rotated so far are still rewrapped below.
                rotate_error =
                    Some(anyhow::Error::new(e).context(format!("cannot rotate {}", r.key)));
                break;
            }
        }
    }
    // Rewrap after a rotation, and whenever files are stale (a run that
    // rotated but was stopped before its rewrap finished).
    let stale = rows.iter().any(|r| r.files_stale > 0);
    let mut summary = None;
    if (!rotated.is_empty() || stale) && !a.no_rewrap && !a.dry_run {
        rewrap_volume_key(&mut volume, &rt, &audit, false)?;
        // The whole volume: a key may serve several policies; files
        // already current are skipped.
        let scope = make_scope(&volume, &rt, "/".into(), &audit);
        let s = rewrap(
            &scope,
            &RewrapOptions::default(),
            progress("rewrap").as_ref(),
        )?;
        summary = Some(s);
    }
    // Past max age even after rotating (a KMS that cannot rotate, or a
    // failed one) is the operator's to fix.
    let after = status(&make_scope(&volume, &rt, "/".into(), &audit))?;
    let overdue: Vec<String> = after
        .iter()
        .filter(|r| r.past_max_age)
        .map(|r| {
            format!(
                "{} (policy {}, version {} is {} old, max {})",
                r.key,
                r.dir,
                r.current_version.as_deref().unwrap_or("?"),
                r.current_age_secs.map(age).unwrap_or_default(),
                r.max_key_age.as_deref().unwrap_or("")
            )
        })
        .collect();
    if a.json {
        print_json(&serde_json::json!({
            "rotated": rotated,
            "rewrap": summary,
            "past_max_age": overdue,
        }))?;
    } else if rotated.is_empty() && !a.dry_run {
        eprintln!("kmsfs: no key was due for rotation");
    }
    if let Some(e) = rotate_error {
        return Err(e);
    }
    if let Some(s) = &summary {
        report(s, false)?;
    }
    if !overdue.is_empty() {
        bail!(
            "keys past their max_key_age: {}; rotate them (`kmsfs rotate BACKING DIR`, or with the KMS's own tools) and rewrap",
            overdue.join("; ")
        );
    }
    Ok(())
}
