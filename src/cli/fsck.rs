//! `kmsfs fsck BACKING [DIR] [--repair] [--verify] [--json]`: checks a
//! backing directory over `kmsfs::lifecycle::fsck`, one line per problem
//! and a summary, with the progress display of the lifecycle commands.
//! Exit status: 0 clean, 1 problems found (not repaired), 4 problems left
//! after `--repair`, 75 a KMS unreachable during `--verify`.

use std::path::PathBuf;

use anyhow::{bail, Result};
use clap::Args;

use kmsfs::audit::AuditLog;
use kmsfs::config::Calls;
use kmsfs::lifecycle::fsck::{fsck, FsckOptions, FsckReport, ProblemKind};
use kmsfs::lifecycle::Scope;
use kmsfs::policy::normalize_dir;

use super::lifecycle::progress;
use super::{absolute, mountinfo, print_json, trust, ExitWith, RetryLater};

/// Exit status when problems are left after `--repair`.
const EXIT_LEFT_AFTER_REPAIR: i32 = 4;

#[derive(Args)]
pub struct FsckArgs {
    backing: PathBuf,
    /// Only below this directory (a path inside the volume, like /pii);
    /// default: all.
    #[arg(default_value = "/")]
    dir: String,
    /// Fix what is safe: remove orphan sidecars and leftover temporary
    /// files, cut torn tails, and (with --verify) move a file's right
    /// header over its wrong one. Needs the volume unmounted.
    #[arg(long)]
    repair: bool,
    /// Also unwrap every header's DEK through the KMS (in batches), check
    /// its MAC and key, and check each file's first block against it.
    #[arg(long)]
    verify: bool,
    /// Print the report as JSON on stdout.
    #[arg(long)]
    json: bool,
    /// Directories (and KMS batches) worked on at once.
    #[arg(long, default_value_t = 4)]
    concurrency: usize,
}

pub fn fsck_cmd(a: FsckArgs) -> Result<()> {
    let backing = absolute(&a.backing)?;
    if a.repair {
        if let Some(mnt) = mountinfo::mountpoint_of(&backing) {
            bail!(
                "{} is mounted at {}: a repair needs it unmounted (unmount it first: kmsfs umount {}); without --repair, fsck checks it read-only while it is mounted",
                backing.display(),
                mnt.display(),
                mnt.display()
            );
        }
    }
    let dir = normalize_dir(&a.dir)?;
    let (volume, rt) = trust::open_volume(&backing, &Calls::Once)?;
    let audit = AuditLog::disabled();
    let scope = Scope {
        volume: &volume,
        rt: &rt,
        dir,
        audit: &audit,
        mountpoint: None,
    };
    let opts = FsckOptions {
        repair: a.repair,
        verify: a.verify,
        concurrency: a.concurrency,
    };
    let report = fsck(&scope, &opts, progress("fsck").as_ref())?;
    if a.json {
        print_json(&report)?;
    } else {
        print_lines(&backing, &report);
    }
    outcome(&report)
}

fn print_lines(backing: &std::path::Path, r: &FsckReport) {
    for p in &r.problems {
        let label = if p.kind == ProblemKind::PendingRecovery {
            "note"
        } else {
            p.kind.label()
        };
        let mut line = format!("{}: {label}: {}", p.path, p.detail);
        if let Some(done) = &p.repaired {
            line.push_str(&format!(" [repaired: {done}]"));
        } else if let Some(why) = &p.left_because {
            line.push_str(&format!(" [left: {why}]"));
        }
        println!("{line}");
    }
    let verified = if r.verify {
        format!(", {} verified in {} KMS batches", r.verified, r.kms_batches)
    } else {
        String::new()
    };
    let repaired = if r.repair {
        format!(", {} repaired, {} left", r.repaired, r.left)
    } else {
        String::new()
    };
    println!(
        "kmsfs fsck: {} {}: {} directories, {} files ({} plaintext{verified}): {} problems found{repaired}; {:.1} s ({:.0} files/s)",
        backing.display(),
        r.dir,
        r.directories,
        r.files,
        r.plaintext,
        r.found,
        r.seconds,
        r.files as f64 / r.seconds.max(0.001)
    );
}

/// The exit status the report calls for (see the module documentation).
fn outcome(r: &FsckReport) -> Result<()> {
    if r.kms_unreachable > 0 {
        return Err(RetryLater(format!(
            "{} files could not be verified because a KMS was unreachable or slow; run it again",
            r.kms_unreachable
        ))
        .into());
    }
    if r.left == 0 {
        return Ok(());
    }
    if r.repair {
        return Err(ExitWith {
            code: EXIT_LEFT_AFTER_REPAIR,
            message: format!(
                "{} problems are left after the repair (listed above, each with why)",
                r.left
            ),
        }
        .into());
    }
    let pairs = if r.verify {
        ""
    } else {
        "; --verify also checks headers and data against each other"
    };
    bail!(
        "{} problems found (listed above); `kmsfs fsck --repair` fixes what is safe{pairs}",
        r.found
    )
}
