//! The fuzz targets' corpus (fuzz/corpus/TARGET/) through the same checks
//! the fuzzer runs (kmsfs::fuzzing), on stable Rust: every input that once
//! found a bug stays a regression test in `cargo test`. scripts/fuzz.sh
//! runs the fuzzer itself.

use std::collections::BTreeSet;
use std::fs;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::Once;

use kmsfs::fuzzing::{seeds, TARGETS};

/// Set to 1 to (re)write the generated seeds after changing `seeds()`.
const UPDATE_ENV: &str = "KMSFS_UPDATE_FUZZ_SEEDS";

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz")
}

fn corpus_dir(target: &str) -> PathBuf {
    fuzz_dir().join("corpus").join(target)
}

/// The names of the files in `dir`, sorted.
fn file_names(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    names
}

fn updating() -> bool {
    std::env::var(UPDATE_ENV).as_deref() == Ok("1")
}

/// With [`UPDATE_ENV`] set, writes the generated seeds (once, before any
/// test reads the corpus) and removes stale ones.
fn update_seeds() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let seeds = seeds();
        for (target, name, bytes) in &seeds {
            let path = corpus_dir(target).join(format!("seed-{name}"));
            fs::create_dir_all(path.parent().unwrap()).unwrap();
            fs::write(&path, bytes).unwrap();
        }
        for target in TARGETS {
            for name in file_names(&corpus_dir(target.name)) {
                if let Some(seed) = name.strip_prefix("seed-") {
                    if !seeds.iter().any(|(t, n, _)| *t == target.name && n == seed) {
                        fs::remove_file(corpus_dir(target.name).join(&name)).unwrap();
                    }
                }
            }
        }
    });
}

#[test]
fn every_corpus_input_passes_its_check() {
    if updating() {
        update_seeds();
    }
    let mut failures = Vec::new();
    for target in TARGETS {
        let dir = corpus_dir(target.name);
        let names = file_names(&dir);
        assert!(!names.is_empty(), "{} has no inputs", dir.display());
        for name in names {
            let path = dir.join(&name);
            let bytes = fs::read(&path).unwrap();
            if catch_unwind(AssertUnwindSafe(|| (target.check)(&bytes))).is_err() {
                failures.push(path.display().to_string());
            }
        }
    }
    assert!(
        failures.is_empty(),
        "these corpus inputs fail their fuzz target's check (the panics are above):\n{}",
        failures.join("\n")
    );
}

#[test]
fn every_target_has_a_corpus_and_a_fuzz_binary() {
    let targets: BTreeSet<&str> = TARGETS.iter().map(|t| t.name).collect();
    let dirs: BTreeSet<String> = file_names(&fuzz_dir().join("corpus")).into_iter().collect();
    let dirs: BTreeSet<&str> = dirs.iter().map(String::as_str).collect();
    assert_eq!(
        dirs, targets,
        "fuzz/corpus/ has one directory per target in kmsfs::fuzzing::TARGETS"
    );
    let manifest = fs::read_to_string(fuzz_dir().join("Cargo.toml")).unwrap();
    for name in &targets {
        let source = fuzz_dir().join("fuzz_targets").join(format!("{name}.rs"));
        let text =
            fs::read_to_string(&source).unwrap_or_else(|e| panic!("{}: {e}", source.display()));
        assert!(
            text.contains(&format!("kmsfs::fuzzing::{name}(")),
            "{} calls kmsfs::fuzzing::{name}",
            source.display()
        );
        assert!(
            manifest.contains(&format!("name = \"{name}\"")),
            "fuzz/Cargo.toml has a [[bin]] named {name}"
        );
    }
    let sources: BTreeSet<String> = file_names(&fuzz_dir().join("fuzz_targets"))
        .into_iter()
        .map(|f| f.trim_end_matches(".rs").to_owned())
        .collect();
    let sources: BTreeSet<&str> = sources.iter().map(String::as_str).collect();
    assert_eq!(
        sources, targets,
        "fuzz/fuzz_targets/ has one binary per target"
    );
}

/// The seeds kmsfs makes (real headers, a sealed configuration) are
/// committed as `seed-NAME`, and no stale ones are left.
#[test]
fn generated_seeds_are_committed() {
    if updating() {
        update_seeds();
    }
    let seeds = seeds();
    for (target, name, bytes) in &seeds {
        let path = corpus_dir(target).join(format!("seed-{name}"));
        assert!(
            fs::read(&path).ok().as_ref() == Some(bytes),
            "{} is missing or differs from what kmsfs::fuzzing::seeds() makes; \
             run `{UPDATE_ENV}=1 cargo test --test fuzz_corpus` and commit it",
            path.display()
        );
    }
    for target in TARGETS {
        for name in file_names(&corpus_dir(target.name)) {
            let Some(seed) = name.strip_prefix("seed-") else {
                continue;
            };
            assert!(
                seeds.iter().any(|(t, n, _)| *t == target.name && n == seed),
                "{} is not a seed kmsfs::fuzzing::seeds() makes; run `{UPDATE_ENV}=1 cargo test --test fuzz_corpus`",
                corpus_dir(target.name).join(&name).display()
            );
        }
    }
}
