//! kmsfs as mount(8)'s helper. `mount -t fuse.kmsfs BACKING MNT -o OPTS`
//! (and an fstab line of type `fuse.kmsfs`) runs
//! `/sbin/mount.fuse.kmsfs BACKING MNT [-sfnv] -o OPTS`; that name is a link
//! to this binary (`kmsfs install-helper`), which then reads its arguments
//! as `kmsfs mount BACKING MNT -o OPTS`: one option parser for both forms.

use std::ffi::{OsStr, OsString};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use anyhow::{bail, Context, Result};
use clap::Args;

use super::mount_options::{self, OptionError};

/// The helper's name: mount(8) runs `/sbin/mount.<type>` for `-t <type>`.
pub const HELPER_NAME: &str = "mount.fuse.kmsfs";
/// The file system types that name kmsfs.
const TYPES: [&str; 2] = ["fuse.kmsfs", "kmsfs"];
/// Where mount(8) looks for helpers first.
const DEFAULT_DIR: &str = "/sbin";
/// Exit code of a usage error, as clap's.
const EXIT_USAGE: i32 = 2;

/// Whether mount(8) ran this process as its helper.
pub fn invoked_as_helper() -> bool {
    std::env::args_os()
        .next()
        .is_some_and(|a| Path::new(&a).file_name() == Some(OsStr::new(HELPER_NAME)))
}

/// This process's command line as `kmsfs ...` arguments: the real one, or
/// the helper form's translation. Exits 2 on a helper form it cannot read.
pub fn command_line() -> &'static [OsString] {
    static LINE: OnceLock<Vec<OsString>> = OnceLock::new();
    LINE.get_or_init(|| {
        let args: Vec<OsString> = std::env::args_os().collect();
        if !invoked_as_helper() {
            return args;
        }
        match translate(&args[1..], &mut |w| {
            eprintln!("{HELPER_NAME}: warning: {w}")
        }) {
            Ok(Some(line)) => line,
            Ok(None) => std::process::exit(0),
            Err(e) => {
                eprintln!(
                    "{HELPER_NAME}: error: {e}\n\
                     usage: {HELPER_NAME} BACKING MOUNTPOINT [-sfnv] [-o OPTIONS] \
                     (as mount -t fuse.kmsfs runs it)"
                );
                std::process::exit(EXIT_USAGE)
            }
        }
    })
}

/// mount(8)'s helper arguments (`BACKING MNT [-s] [-f] [-n] [-v] [-o OPTS]
/// [-t TYPE]`) as `kmsfs mount` arguments; None for `-f` (a fake mount:
/// nothing to do). `-s` (sloppy) drops unknown options, with a warning.
fn translate(args: &[OsString], warn: &mut dyn FnMut(String)) -> Result<Option<Vec<OsString>>> {
    let mut positional = Vec::new();
    let mut options: Vec<String> = Vec::new();
    let (mut sloppy, mut fake) = (false, false);
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        if arg == "-h" || arg == "--help" {
            // The options are those of kmsfs mount.
            return Ok(Some(vec!["kmsfs".into(), "mount".into(), "--help".into()]));
        }
        let bytes = arg.as_bytes();
        if bytes.len() < 2 || bytes[0] != b'-' {
            positional.push(arg.clone());
            continue;
        }
        let mut flags = bytes[1..].iter();
        while let Some(&flag) = flags.next() {
            match flag {
                b's' => sloppy = true,
                b'f' => fake = true,
                // No mtab to write; verbose has nothing more to say.
                b'n' | b'v' => {}
                b'o' | b't' => {
                    let rest: Vec<u8> = flags.by_ref().copied().collect();
                    let value = if rest.is_empty() {
                        it.next()
                            .with_context(|| format!("-{} needs a value", flag as char))?
                            .to_str()
                            .context("options must be UTF-8")?
                            .to_owned()
                    } else {
                        String::from_utf8(rest).context("options must be UTF-8")?
                    };
                    if flag == b'o' {
                        options.extend(value.split(',').map(str::to_owned));
                    } else if !TYPES.contains(&value.as_str()) {
                        bail!("file system type {value:?} is not kmsfs (fuse.kmsfs)");
                    }
                }
                b'N' => bail!("-N (another mount namespace) is not supported"),
                other => bail!("unknown flag -{}", other as char),
            }
        }
    }
    let [backing, mountpoint] = <[OsString; 2]>::try_from(positional)
        .map_err(|_| anyhow::anyhow!("give exactly BACKING and MOUNTPOINT"))?;
    if fake {
        return Ok(None);
    }
    if sloppy {
        options.retain(|o| match mount_options::parse_option(o) {
            Err(OptionError::Unknown(_)) => {
                warn(format!("ignoring unknown mount option {o:?} (-s)"));
                false
            }
            _ => true,
        });
    }
    options.retain(|o| !o.is_empty());
    let mut line: Vec<OsString> = vec!["kmsfs".into(), "mount".into(), backing, mountpoint];
    if !options.is_empty() {
        line.push("-o".into());
        line.push(options.join(",").into());
    }
    Ok(Some(line))
}

#[derive(Args)]
pub struct InstallArgs {
    /// Directory for the helper; mount(8) looks in /sbin.
    #[arg(long, default_value = DEFAULT_DIR)]
    dir: PathBuf,
    /// Copy this binary instead of linking to it (when this binary's place
    /// will not last, e.g. a build directory that is cleaned).
    #[arg(long)]
    copy: bool,
}

/// `kmsfs install-helper`: makes DIR/mount.fuse.kmsfs this binary, by
/// default a symbolic link to it, so that an upgraded kmsfs is also the
/// helper and there is one program to keep up to date. Replaces whatever
/// had the helper's name, atomically.
pub fn install(a: InstallArgs) -> Result<()> {
    let exe = std::env::current_exe()
        .and_then(std::fs::canonicalize)
        .context("cannot find this kmsfs binary")?;
    let dir = super::absolute(&a.dir)?;
    let target = dir.join(HELPER_NAME);
    let staged = dir.join(format!(".{HELPER_NAME}.{}", std::process::id()));
    let _ = std::fs::remove_file(&staged);
    let made = if a.copy {
        std::fs::copy(&exe, &staged).map(drop)
    } else {
        std::os::unix::fs::symlink(&exe, &staged)
    };
    let done = made.and_then(|()| std::fs::rename(&staged, &target));
    if let Err(e) = done {
        let _ = std::fs::remove_file(&staged);
        return Err(e).with_context(|| {
            format!(
                "cannot install {} (run as root, or choose another --dir)",
                target.display()
            )
        });
    }
    let how = if a.copy { "a copy of" } else { "a link to" };
    eprintln!(
        "kmsfs: installed {} ({how} {}); mount -t fuse.kmsfs BACKING MOUNTPOINT -o OPTIONS now works",
        target.display(),
        exe.display()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(s: &str) -> Vec<OsString> {
        s.split(' ').map(OsString::from).collect()
    }

    fn line(s: &str) -> Option<Vec<OsString>> {
        translate(&args(s), &mut |_| {}).unwrap()
    }

    #[test]
    fn helper_arguments_become_a_kmsfs_mount() {
        assert_eq!(
            line("/b /m -o rw,noatime,_netdev -n -v"),
            Some(args("kmsfs mount /b /m -o rw,noatime,_netdev"))
        );
        assert_eq!(line("/b /m"), Some(args("kmsfs mount /b /m")));
        assert_eq!(
            line("/b /m -oro -t fuse.kmsfs"),
            Some(args("kmsfs mount /b /m -o ro"))
        );
        assert_eq!(line("/b /m -f -o rw"), None, "a fake mount does nothing");
        assert_eq!(line("-h"), Some(args("kmsfs mount --help")));
        let mut warned = Vec::new();
        let sloppy = translate(&args("/b /m -sv -o rw,weird"), &mut |w| warned.push(w)).unwrap();
        assert_eq!(sloppy, Some(args("kmsfs mount /b /m -o rw")));
        assert!(warned[0].contains("weird"), "{warned:?}");
        for bad in ["/b", "/b /m /x", "/b /m -t ext4", "/b /m -o", "/b /m -q"] {
            assert!(translate(&args(bad), &mut |_| {}).is_err(), "{bad}");
        }
    }
}
