//! The Azure Key Vault provider against the local HTTPS mock of the Key
//! Vault REST API in tests/common/kms/azure.rs, which records every request
//! so these tests can assert what the SDK sends: method, path, api-version,
//! alg, body and Authorization header.
#![cfg(feature = "azure")]

mod common;

use std::sync::Arc;

use azure_core::credentials::TokenCredential;
use base64::Engine;
use common::kms::azure::{
    FakeCredential, Mock, Mode, API_VERSION, B64URL, CREATED_BASE, CREATED_STEP, KEY, TOKEN, V1,
    V2, VERSIONS_PAGE,
};
use common::kms::http_mock::Req;
use common::kms::{
    assert_config_error, assert_denied, assert_handles_only, assert_unwraps, assert_wrap_times_out,
    check_refusals, check_rotation, unwrap_err,
};
use kmsfs::crypto::Dek;
use kmsfs::kms::azure::{AzureConfig, AzureKms};
use kmsfs::kms::config::KmsConfig;
use kmsfs::kms::instrumented::Instrumented;
use kmsfs::kms::{KeyProvider, KeyRef, KeyVersion, KeyVersions, KmsError, WrapContext};
use sha2::{Digest, Sha256};

fn binding(ctx: &WrapContext) -> Vec<u8> {
    let mut h = Sha256::new();
    h.update(b"kmsfs azure wrap v1\0");
    h.update(ctx.canonical_bytes());
    h.finalize().to_vec()
}

fn assert_no_secrets(err: &KmsError) {
    let s = err.to_string();
    assert!(!s.contains(TOKEN), "error leaks the token: {s}");
}

/// Asserts that `req` is a POST to `path` of the API version, with the token.
fn assert_authorized_post(req: &Req, path: &str) {
    assert_eq!(req.method, "POST");
    assert_eq!(req.path, path);
    assert_eq!(req.param("api-version"), Some(API_VERSION));
    assert_eq!(
        req.header("authorization"),
        Some(format!("Bearer {TOKEN}").as_str())
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn round_trip_and_requests_sent() {
    let mock = Mock::start().await;
    let (kms, cred) = mock.kms(None);
    assert_eq!(kms.kind(), "azure");
    let ctx = WrapContext::file_v1([7; 16]);
    let (dek, wrapped) = kms.generate_dek(&ctx).await.unwrap();
    let key_id = format!("{}/keys/{KEY}", mock.vault_url());
    assert_eq!(
        wrapped.key_ref,
        KeyRef {
            provider: "azure".into(),
            key_id: key_id.clone(),
            key_version: V1.into(),
        }
    );
    assert_eq!(kms.key_id(), key_id);
    assert_handles_only(
        &kms,
        &wrapped.key_ref,
        &format!("{}/keys/other", mock.vault_url()),
        "gcp",
    );
    let back = kms.unwrap(&wrapped, &ctx).await.unwrap();
    assert_eq!(back.as_bytes(), dek.as_bytes());

    let reqs = mock.requests();
    assert_eq!(reqs.len(), 3, "{reqs:#?}");
    // 1. The SDK's first request carries neither a token nor the DEK: it
    //    only provokes the authentication challenge.
    assert_eq!(reqs[0].method, "POST");
    assert_eq!(reqs[0].path, format!("/keys/{KEY}//wrapkey"));
    assert!(reqs[0].header("authorization").is_none());
    assert!(reqs[0].body.is_empty(), "DEK sent before authentication");
    // 2. wrapKey with the token, latest version (empty path segment).
    let w = &reqs[1];
    assert_authorized_post(w, &format!("/keys/{KEY}//wrapkey"));
    assert!(w.sends_json(), "{w:?}");
    let body = w.json();
    assert_eq!(body["alg"], "RSA-OAEP-256");
    assert_eq!(
        body.as_object().unwrap().len(),
        2,
        "unexpected fields: {body}"
    );
    let plain = B64URL.decode(body["value"].as_str().unwrap()).unwrap();
    assert_eq!(plain.len(), 64);
    assert_eq!(&plain[..32], dek.as_bytes());
    assert_eq!(&plain[32..], &binding(&ctx)[..], "context binding");
    // 3. unwrapKey names the version the wrap reported.
    let u = &reqs[2];
    assert_authorized_post(u, &format!("/keys/{KEY}/{V1}/unwrapkey"));
    let body = u.json();
    assert_eq!(body["alg"], "RSA-OAEP-256");
    assert_eq!(
        B64URL.decode(body["value"].as_str().unwrap()).unwrap(),
        wrapped.blob
    );
    // The token was asked for the scope from the vault's challenge.
    let scopes = cred.scopes.lock().unwrap().clone();
    assert!(!scopes.is_empty());
    assert!(
        scopes
            .iter()
            .all(|s| s == "https://vault.localhost/.default"),
        "{scopes:?}"
    );

    // check() is a round trip too.
    kms.check().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn pinned_version_and_rotation() {
    let mock = Mock::start().await;
    let (pinned, _) = mock.kms(Some(V1));
    let (latest, _) = mock.kms(None);
    check_rotation(&latest, &pinned, || mock.rotate(), [V1, V2]).await;
    // The authorized wraps name the version only when pinned (an empty
    // path segment is the latest).
    let wraps: Vec<String> = mock
        .requests()
        .iter()
        .filter(|r| r.header("authorization").is_some() && r.path.ends_with("/wrapkey"))
        .map(|r| r.path.clone())
        .collect();
    let latest_path = format!("/keys/{KEY}//wrapkey");
    assert_eq!(
        wraps,
        [
            latest_path.clone(),
            latest_path,
            format!("/keys/{KEY}/{V1}/wrapkey")
        ]
    );
    assert!(latest.describe().contains("latest"));
    assert!(pinned.describe().contains(V1));
}

/// Asserts that `req` is an authorized `method` to `path` of the API version.
fn assert_authorized(req: &Req, method: &str, path: &str) {
    assert_eq!(req.method, method, "{req:?}");
    assert_eq!(req.path, path);
    assert_eq!(req.param("api-version"), Some(API_VERSION), "{req:?}");
    assert_eq!(
        req.header("authorization"),
        Some(format!("Bearer {TOKEN}").as_str())
    );
}

/// The mock's `i`-th version (oldest first) as the provider reports it.
fn listed(version: &str, i: usize, can_unwrap: bool) -> KeyVersion {
    KeyVersion {
        version: version.into(),
        created: Some(CREATED_BASE + CREATED_STEP * i as i64),
        can_unwrap,
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn key_versions_and_rotation() {
    let mock = Mock::start().await;
    let (kms, _) = mock.kms(None);
    let ctx = WrapContext::file_v1([5; 16]);
    assert_eq!(
        kms.key_versions().await.unwrap(),
        KeyVersions {
            current: Some(V1.into()),
            current_created: Some(CREATED_BASE),
            versions: vec![listed(V1, 0, true)],
        }
    );
    let (dek, first) = kms.generate_dek(&ctx).await.unwrap();
    assert_eq!(first.key_ref.key_version, V1);

    // One version made elsewhere, two through the provider: four in all,
    // two pages of the listing.
    mock.rotate();
    mock.clear();
    let once = kms.rotate().await.unwrap();
    let all = mock.versions();
    assert_eq!(all.len(), 3);
    assert_eq!(once.current.as_deref(), Some(all[2].as_str()));
    let reqs: Vec<Req> = mock
        .requests()
        .into_iter()
        .filter(|r| r.header("authorization").is_some())
        .collect();
    assert_authorized(&reqs[0], "POST", &format!("/keys/{KEY}/rotate"));
    assert!(reqs[0].body.is_empty(), "{:?}", reqs[0]);
    assert_authorized(&reqs[1], "GET", &format!("/keys/{KEY}/"));
    assert_authorized(&reqs[2], "GET", &format!("/keys/{KEY}/versions"));
    assert_eq!(reqs[2].param("$skiptoken"), None);
    assert_authorized(&reqs[3], "GET", &format!("/keys/{KEY}/versions"));
    assert_eq!(reqs[3].param("$skiptoken"), Some("2"));
    assert_eq!(reqs.len(), 4, "{reqs:#?}");

    let twice = kms.rotate().await.unwrap();
    let all = mock.versions();
    assert_eq!(all.len(), 4);
    assert!(all.len() > VERSIONS_PAGE);
    assert_eq!(all[..2], [V1, V2]);
    // Oldest first, though the vault lists the newest first.
    assert_eq!(
        twice,
        KeyVersions {
            current: Some(all[3].clone()),
            current_created: Some(CREATED_BASE + 3 * CREATED_STEP),
            versions: all
                .iter()
                .enumerate()
                .map(|(i, v)| listed(v, i, true))
                .collect(),
        }
    );
    assert_eq!(kms.key_versions().await.unwrap(), twice);
    // New wraps use the current version; older ones still unwrap.
    let (_, w) = kms.generate_dek(&ctx).await.unwrap();
    assert_eq!(Some(w.key_ref.key_version), twice.current);
    assert_unwraps(&kms, &first, &ctx, &dek).await;

    // A disabled version cannot unwrap, and says so.
    mock.disable(V2);
    let kv = kms.key_versions().await.unwrap();
    assert_eq!(kv.versions[1], listed(V2, 1, false));
    assert!(kv
        .versions
        .iter()
        .filter(|v| v.version != V2)
        .all(|v| v.can_unwrap));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_pinned_version_is_current_and_does_not_rotate() {
    let mock = Mock::start().await;
    mock.rotate();
    // Pinned as typed (case aside); current as the vault spells it, which
    // is what wraps record.
    for pin in [V1.to_string(), V1.to_ascii_uppercase()] {
        let (pinned, _) = mock.kms(Some(&pin));
        let kv = pinned.key_versions().await.unwrap();
        assert_eq!(kv.current.as_deref(), Some(V1), "{kv:?}");
        assert_eq!(kv.current_created, Some(CREATED_BASE));
        assert_eq!(kv.versions, [listed(V1, 0, true), listed(V2, 1, true)]);
    }
    let (pinned, _) = mock.kms(Some(V1));
    let (_, w) = pinned
        .generate_dek(&WrapContext::file_v1([6; 16]))
        .await
        .unwrap();
    assert_eq!(w.key_ref.key_version, V1);
    // No GET of the latest version when pinned.
    assert!(!mock
        .requests()
        .iter()
        .any(|r| r.method == "GET" && r.path == format!("/keys/{KEY}/")));

    mock.clear();
    let err = pinned.rotate().await.unwrap_err();
    eprintln!("{err}");
    assert!(
        matches!(
            err,
            KmsError::Unsupported {
                operation: "rotate the key",
                ..
            }
        ),
        "{err}"
    );
    let msg = err.to_string();
    for says in [
        "pinned",
        V1,
        "az keyvault key rotate",
        "--key-version",
        "kmsfs policy set",
    ] {
        assert!(msg.contains(says), "{says}: {msg}");
    }
    assert!(mock.requests().is_empty(), "rotated anyway");
    assert_eq!(mock.versions(), [V1, V2]);
}

#[tokio::test(flavor = "multi_thread")]
async fn key_version_calls_are_classified() {
    let mock = Mock::start().await;
    let (kms, _) = mock.kms(None);
    let (pinned, _) = mock.kms(Some(V1));

    mock.set_mode(Mode::Deny403);
    let err = kms.key_versions().await.unwrap_err();
    eprintln!("{err}");
    assert_denied(&err, "getKey");
    assert!(err.to_string().contains("Key Vault Reader"), "{err}");
    let err = pinned.key_versions().await.unwrap_err();
    assert_denied(&err, "getKeyVersions");
    assert!(err.to_string().contains("keys/list"), "{err}");
    let err = kms.rotate().await.unwrap_err();
    eprintln!("{err}");
    assert_denied(&err, "rotateKey");
    let msg = err.to_string();
    assert!(msg.contains("Key Vault Crypto Officer"), "{msg}");
    assert!(msg.contains("keys/rotate"), "{msg}");
    assert_no_secrets(&err);

    mock.set_mode(Mode::Reject401);
    for err in [
        kms.key_versions().await.unwrap_err(),
        kms.rotate().await.unwrap_err(),
    ] {
        assert!(matches!(err, KmsError::AuthFailed { .. }), "{err}");
        assert_no_secrets(&err);
    }

    mock.set_mode(Mode::Disabled);
    let err = kms.rotate().await.unwrap_err();
    assert!(matches!(err, KmsError::KeyVersionUnusable { .. }), "{err}");
    assert!(err.to_string().contains("enable the key"), "{err}");
    mock.set_mode(Mode::Normal);
    assert_eq!(mock.versions(), [V1], "a refused rotation made a version");

    let mut cfg = mock.cfg(None, 10);
    cfg.key_name = "missing".into();
    let missing = mock.kms_with(&cfg, mock.addr(), Arc::new(FakeCredential::default()));
    for err in [
        missing.key_versions().await.unwrap_err(),
        missing.rotate().await.unwrap_err(),
    ] {
        match &err {
            KmsError::KeyNotFound { key, .. } => {
                assert_eq!(key, &format!("{}/keys/missing", mock.vault_url()))
            }
            other => panic!("expected KeyNotFound, got {other}"),
        }
    }
    kms.key_versions().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn context_mismatch_unknown_version_and_foreign_keys() {
    let mock = Mock::start().await;
    let (kms, _) = mock.kms(None);
    let ctx = WrapContext::file_v1([1; 16]);
    let dek = Dek::generate();
    let wrapped = kms.wrap(&dek, &ctx).await.unwrap();
    // The sidecar moved to another file: Key Vault unwraps, kmsfs refuses.
    let other = WrapContext::file_v1([2; 16]);
    let err = unwrap_err(kms.unwrap(&wrapped, &other).await);
    eprintln!("{err}");
    assert!(matches!(err, KmsError::UnwrapFailed { .. }), "{err}");
    assert!(err.to_string().contains("another file"), "{err}");
    assert!(!err.is_retryable());
    // A tampered blob: tests/kms_contract.rs.
    // A blob naming an unknown version: 404 -> KeyNotFound.
    let mut unknown = wrapped.clone();
    unknown.key_ref.key_version = "00000000000000000000000000000000".into();
    let err = unwrap_err(kms.unwrap(&unknown, &ctx).await);
    eprintln!("{err}");
    assert!(matches!(err, KmsError::KeyNotFound { .. }), "{err}");
    // A key reference from another vault is not ours.
    let mut foreign = wrapped.clone();
    foreign.key_ref.key_id = "https://other.vault.azure.net/keys/kek".into();
    let err = unwrap_err(kms.unwrap(&foreign, &ctx).await);
    assert!(matches!(err, KmsError::NoProvider { .. }), "{err}");
    // The right context still works.
    assert_unwraps(&kms, &wrapped, &ctx, &dek).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn service_errors_are_classified() {
    let mock = Mock::start().await;
    let (kms, _) = mock.kms(None);
    let refused = check_refusals(
        &kms,
        |m| mock.set_mode(m),
        ["wrapKey", "unwrapKey"],
        ("keys/wrapKey", "disabled"),
    )
    .await;
    refused.errors.iter().for_each(assert_no_secrets);
    let (ctx, dek, wrapped) = (refused.ctx, refused.dek, refused.wrapped);

    let mut cfg = mock.cfg(None, 10);
    cfg.key_name = "missing".into();
    let missing = mock.kms_with(&cfg, mock.addr(), Arc::new(FakeCredential::default()));
    let err = missing.wrap(&dek, &ctx).await.unwrap_err();
    match &err {
        KmsError::KeyNotFound { key, .. } => {
            assert_eq!(key, &format!("{}/keys/missing", mock.vault_url()))
        }
        other => panic!("expected KeyNotFound, got {other}"),
    }
    // And the provider still works once the vault is back to normal.
    assert_unwraps(&kms, &wrapped, &ctx, &dek).await;
}

/// `kms` behind the timeout layer, bounded by what `cfg` configures (what
/// `KmsConfig::build` does, here with the mock's HTTP client).
fn bounded(cfg: &AzureConfig, kms: AzureKms) -> Arc<dyn KeyProvider> {
    Instrumented::bounded(Arc::new(kms), KmsConfig::Azure(cfg.clone()).timeout())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_silent_vault_times_out_at_the_configured_timeout() {
    // An unreachable one: tests/kms_contract.rs.
    let mock = Mock::start().await;
    // A vault that accepts but never answers: the timeout layer gives up
    // after the configured timeout.
    mock.server.hang();
    let cfg = mock.cfg(None, 1);
    let kms = bounded(
        &cfg,
        mock.kms_with(&cfg, mock.addr(), Arc::new(FakeCredential::default())),
    );
    assert_wrap_times_out(&*kms, 1).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn config_is_validated() {
    let cred: Arc<dyn TokenCredential> = Arc::new(FakeCredential::default());
    let base = AzureConfig {
        vault_url: "https://myvault.vault.azure.net/".into(),
        key_name: "kek".into(),
        key_version: Some(String::new()),
        timeout_secs: 10,
    };
    // Trailing slash and empty version are normalised.
    let kms = AzureKms::with_credential(&base, cred.clone(), None).unwrap();
    assert_eq!(kms.key_id(), "https://myvault.vault.azure.net/keys/kek");
    assert!(kms.describe().contains("latest"));
    for bad in [
        AzureConfig {
            vault_url: "http://myvault.vault.azure.net".into(),
            ..base.clone()
        },
        AzureConfig {
            vault_url: "https://myvault.vault.azure.net/keys/kek".into(),
            ..base.clone()
        },
        AzureConfig {
            key_name: "a/b".into(),
            ..base.clone()
        },
        AzureConfig {
            key_version: Some("../x".into()),
            ..base.clone()
        },
    ] {
        assert_config_error(AzureKms::with_credential(&bad, cred.clone(), None), &bad);
    }
}
