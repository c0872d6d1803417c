//! The GCP Cloud KMS provider against the local HTTP mock of the Cloud KMS
//! REST API in tests/common/kms/gcp.rs. The provider is built exactly as in
//! production, through `GcpKms::connect` with a service-account key file and
//! the `endpoint` override.
#![cfg(feature = "gcp")]

mod common;

use std::sync::Arc;

use common::kms::gcp::{b64_decode, Mock, Mode, CREATED_BASE, CREATED_STEP, KEY_ID, VERSIONS_PAGE};
use common::kms::http_mock::Req;
use common::kms::{
    assert_config_error, assert_denied, assert_handles_only, assert_unwraps, assert_wrap_times_out,
    check_refusals, check_rotation, unwrap_err,
};
use kmsfs::crypto::Dek;
use kmsfs::kms::config::KmsConfig;
use kmsfs::kms::gcp::{GcpConfig, GcpKms};
use kmsfs::kms::{KeyProvider, KeyRef, KeyVersion, KeyVersions, KmsError, WrapContext};

fn assert_no_secrets(err: &KmsError) {
    let s = err.to_string();
    assert!(
        !s.contains("PRIVATE KEY") && !s.contains("eyJ"),
        "error leaks credentials: {s}"
    );
}

/// The additional authenticated data a request sent.
fn sent_aad(body: &serde_json::Value) -> Vec<u8> {
    b64_decode(
        body["additionalAuthenticatedData"]
            .as_str()
            .expect("AAD sent"),
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn round_trip_and_requests_sent() {
    let mock = Mock::start().await;
    let kms = mock.kms(None).await;
    assert_eq!(kms.kind(), "gcp");
    let ctx = WrapContext::file_v1([9; 16]);
    let (dek, wrapped) = kms.generate_dek(&ctx).await.unwrap();
    assert_eq!(
        wrapped.key_ref,
        KeyRef {
            provider: "gcp".into(),
            key_id: KEY_ID.into(),
            key_version: "1".into(),
        }
    );
    assert_handles_only(
        &*kms,
        &wrapped.key_ref,
        "projects/test-proj/locations/europe-west1/keyRings/ring/cryptoKeys/other",
        "aws",
    );
    let back = kms.unwrap(&wrapped, &ctx).await.unwrap();
    assert_eq!(back.as_bytes(), dek.as_bytes());

    let reqs = mock.requests();
    assert_eq!(reqs.len(), 2, "{reqs:#?}");
    let e = &reqs[0];
    assert_eq!(e.method, "POST");
    assert_eq!(e.path, format!("/v1/{KEY_ID}:encrypt"));
    assert_eq!(e.param("$alt"), Some("json;enum-encoding=int"));
    assert!(e.sends_json(), "{e:?}");
    assert!(e.headers.contains_key("x-goog-api-client"));
    assert!(
        mock.token_ok(e),
        "bearer token is not a JWT signed by the key file"
    );
    let body = e.json();
    assert_eq!(
        b64_decode(body["plaintext"].as_str().unwrap()),
        dek.as_bytes()
    );
    assert_eq!(sent_aad(&body), ctx.canonical_bytes());
    assert!(
        body.get("name").is_none(),
        "name belongs in the path: {body}"
    );
    let d = &reqs[1];
    assert_eq!(d.method, "POST");
    assert_eq!(d.path, format!("/v1/{KEY_ID}:decrypt"));
    assert!(mock.token_ok(d));
    let body = d.json();
    assert_eq!(
        b64_decode(body["ciphertext"].as_str().unwrap()),
        wrapped.blob
    );
    assert_eq!(sent_aad(&body), ctx.canonical_bytes());

    kms.check().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn pinned_version_and_rotation() {
    let mock = Mock::start().await;
    let primary = mock.kms(None).await;
    let pinned = mock.kms(Some("1")).await;
    check_rotation(&*primary, &*pinned, || mock.rotate(), ["1", "2"]).await;
    // Encrypt names the version only when pinned.
    let encrypts: Vec<String> = mock
        .requests()
        .iter()
        .map(|r| r.path.clone())
        .filter(|p| p.ends_with(":encrypt"))
        .collect();
    let latest = format!("/v1/{KEY_ID}:encrypt");
    assert_eq!(
        encrypts,
        [
            latest.clone(),
            latest,
            format!("/v1/{KEY_ID}/cryptoKeyVersions/1:encrypt")
        ]
    );
    // Decrypt always names the CryptoKey: Cloud KMS finds the version.
    assert!(mock
        .requests()
        .iter()
        .filter(|r| r.path.ends_with(":decrypt"))
        .all(|r| r.path == format!("/v1/{KEY_ID}:decrypt")));
}

/// Version `n` of the mock's key as the provider reports it.
fn listed(n: u8, can_unwrap: bool) -> KeyVersion {
    KeyVersion {
        version: n.to_string(),
        created: Some(CREATED_BASE + CREATED_STEP * (i64::from(n) - 1)),
        can_unwrap,
    }
}

/// The requests other than encrypt/decrypt, as "METHOD PATH".
fn metadata_calls(mock: &Mock) -> Vec<(String, Req)> {
    mock.requests()
        .into_iter()
        .filter(|r| !r.path.ends_with(":encrypt") && !r.path.ends_with(":decrypt"))
        .map(|r| (format!("{} {}", r.method, r.path), r))
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn key_versions_and_rotation() {
    let mock = Mock::start().await;
    let kms = mock.kms(None).await;
    let ctx = WrapContext::file_v1([5; 16]);
    assert_eq!(
        kms.key_versions().await.unwrap(),
        KeyVersions {
            current: Some("1".into()),
            current_created: Some(CREATED_BASE),
            versions: vec![listed(1, true)],
        }
    );
    let (dek, first) = kms.generate_dek(&ctx).await.unwrap();
    assert_eq!(first.key_ref.key_version, "1");

    // One version made elsewhere, one through the provider: the listing
    // takes two pages.
    mock.rotate();
    mock.clear();
    let kv = kms.rotate().await.unwrap();
    assert_eq!(mock.versions(), (vec![1, 2, 3], 3));
    assert!(kv.versions.len() > VERSIONS_PAGE);
    assert_eq!(
        kv,
        KeyVersions {
            current: Some("3".into()),
            current_created: Some(CREATED_BASE + 2 * CREATED_STEP),
            versions: vec![listed(1, true), listed(2, true), listed(3, true)],
        }
    );
    let calls = metadata_calls(&mock);
    let names: Vec<&str> = calls.iter().map(|(n, _)| n.as_str()).collect();
    let list = format!("GET /v1/{KEY_ID}/cryptoKeyVersions");
    assert_eq!(
        names,
        [
            format!("POST /v1/{KEY_ID}/cryptoKeyVersions"),
            format!("POST /v1/{KEY_ID}:updatePrimaryVersion"),
            format!("GET /v1/{KEY_ID}"),
            list.clone(),
            list,
        ]
    );
    for (_, r) in &calls {
        assert!(mock.token_ok(r), "{r:?}");
    }
    assert_eq!(calls[0].1.json(), serde_json::json!({}));
    assert_eq!(
        calls[1].1.json(),
        serde_json::json!({"cryptoKeyVersionId": "3"})
    );
    assert_eq!(calls[3].1.param("pageToken").unwrap_or(""), "");
    assert_eq!(calls[4].1.param("pageToken"), Some("after-2"));

    // New wraps use the new primary; older ones still unwrap.
    let (_, w) = kms.generate_dek(&ctx).await.unwrap();
    assert_eq!(w.key_ref.key_version, "3");
    assert_unwraps(&*kms, &first, &ctx, &dek).await;
    // A disabled version cannot unwrap, and says so.
    mock.disable(2);
    assert_eq!(
        kms.key_versions().await.unwrap().versions,
        [listed(1, true), listed(2, false), listed(3, true)]
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_new_version_is_made_primary_once_generated() {
    let mock = Mock::start().await;
    let kms = mock.kms(None).await;
    mock.set_generation_polls(2);
    let kv = kms.rotate().await.unwrap();
    assert_eq!(kv.current.as_deref(), Some("2"));
    let polls = metadata_calls(&mock)
        .iter()
        .filter(|(n, _)| *n == format!("GET /v1/{KEY_ID}/cryptoKeyVersions/2"))
        .count();
    assert_eq!(polls, 3, "two GETs see it pending, the third enabled");

    // Never generated (in time): not made primary, and the error says
    // how to finish the rotation.
    mock.set_generation_polls(1000);
    let err = kms.rotate().await.unwrap_err();
    eprintln!("{err}");
    assert!(matches!(err, KmsError::KeyVersionUnusable { .. }), "{err}");
    let msg = err.to_string();
    for says in [
        "PENDING_GENERATION",
        "version 3 was created but is not the primary",
        "gcloud kms keys update kek --keyring ring --location europe-west1 --project test-proj --primary-version 3",
    ] {
        assert!(msg.contains(says), "{says}: {msg}");
    }
    assert_eq!(mock.versions(), (vec![1, 2, 3], 2));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_pinned_version_is_current_and_does_not_rotate() {
    let mock = Mock::start().await;
    mock.rotate();
    let pinned = mock.kms(Some("1")).await;
    mock.clear();
    assert_eq!(
        pinned.key_versions().await.unwrap(),
        KeyVersions {
            current: Some("1".into()),
            current_created: Some(CREATED_BASE),
            versions: vec![listed(1, true), listed(2, true)],
        }
    );
    // The key itself (its primary) is not read.
    assert!(metadata_calls(&mock)
        .iter()
        .all(|(n, _)| *n == format!("GET /v1/{KEY_ID}/cryptoKeyVersions")));

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
        "pinned to version 1",
        "gcloud kms keys versions create --key kek --keyring ring",
        "--key kek --key-version",
        "kmsfs policy set",
    ] {
        assert!(msg.contains(says), "{says}: {msg}");
    }
    assert!(mock.requests().is_empty(), "rotated anyway");
    assert_eq!(mock.versions(), (vec![1, 2], 2));
}

#[tokio::test(flavor = "multi_thread")]
async fn key_version_calls_are_classified() {
    let mock = Mock::start().await;
    let kms = mock.kms(None).await;
    let pinned = mock.kms(Some("1")).await;

    mock.set_mode(Mode::Deny403);
    let err = kms.key_versions().await.unwrap_err();
    eprintln!("{err}");
    assert_denied(&err, "cloudkms.cryptoKeys.get");
    assert!(err.to_string().contains("roles/cloudkms.viewer"), "{err}");
    let err = pinned.key_versions().await.unwrap_err();
    assert_denied(&err, "cloudkms.cryptoKeyVersions.list");
    let err = kms.rotate().await.unwrap_err();
    eprintln!("{err}");
    assert_denied(&err, "cloudkms.cryptoKeyVersions.create");
    assert!(err.to_string().contains("roles/cloudkms.admin"), "{err}");
    assert_no_secrets(&err);
    mock.set_mode(Mode::Reject401);
    for err in [
        kms.key_versions().await.unwrap_err(),
        kms.rotate().await.unwrap_err(),
    ] {
        assert!(matches!(err, KmsError::AuthFailed { .. }), "{err}");
        assert_no_secrets(&err);
    }
    mock.set_mode(Mode::Normal);
    assert_eq!(
        mock.versions(),
        (vec![1], 1),
        "a refused rotation made a version"
    );

    // Allowed to create a version but not to make it primary: the error
    // says so, and that a version was made.
    mock.deny("cloudkms.cryptoKeys.update");
    let err = kms.rotate().await.unwrap_err();
    eprintln!("{err}");
    assert_denied(&err, "cloudkms.cryptoKeys.update");
    assert!(
        err.to_string()
            .contains("version 2 was created but is not the primary"),
        "{err}"
    );
    assert_eq!(mock.versions(), (vec![1, 2], 1));

    let mut cfg = mock.cfg(None);
    cfg.key = "missing".into();
    let missing = GcpKms::connect(&cfg).await.unwrap();
    for err in [
        missing.key_versions().await.unwrap_err(),
        missing.rotate().await.unwrap_err(),
    ] {
        assert!(matches!(err, KmsError::KeyNotFound { .. }), "{err}");
        assert!(err.to_string().contains("cryptoKeys/missing"), "{err}");
    }
}

// Another file's context and tampered blobs: tests/kms_contract.rs.
#[tokio::test(flavor = "multi_thread")]
async fn another_keys_blob_is_not_sent() {
    let mock = Mock::start().await;
    let kms = mock.kms(None).await;
    let ctx = WrapContext::file_v1([1; 16]);
    let mut foreign = kms.wrap(&Dek::generate(), &ctx).await.unwrap();
    foreign.key_ref.key_id = "projects/x/locations/global/keyRings/r/cryptoKeys/k".into();
    mock.clear();
    let err = unwrap_err(kms.unwrap(&foreign, &ctx).await);
    assert!(matches!(err, KmsError::NoProvider { .. }), "{err}");
    assert!(mock.requests().is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn service_errors_are_classified() {
    let mock = Mock::start().await;
    let kms = mock.kms(None).await;
    let refused = check_refusals(
        &*kms,
        |m| mock.set_mode(m),
        [
            "cloudkms.cryptoKeyVersions.useToEncrypt",
            "cloudkms.cryptoKeyVersions.useToDecrypt",
        ],
        ("cryptoKeyEncrypterDecrypter", "DISABLED"),
    )
    .await;
    refused.errors.iter().for_each(assert_no_secrets);
    let (ctx, dek, wrapped) = (refused.ctx, refused.dek, refused.wrapped);

    let mut cfg = mock.cfg(None);
    cfg.key = "missing".into();
    let missing = GcpKms::connect(&cfg).await.unwrap();
    let err = missing.wrap(&dek, &ctx).await.unwrap_err();
    eprintln!("{err}");
    assert!(matches!(err, KmsError::KeyNotFound { .. }), "{err}");
    assert!(err.to_string().contains("cryptoKeys/missing"), "{err}");
    let mut cfg = mock.cfg(Some("7"));
    cfg.key = "kek".into();
    let err = GcpKms::connect(&cfg)
        .await
        .unwrap()
        .wrap(&dek, &ctx)
        .await
        .unwrap_err();
    eprintln!("{err}");
    assert!(matches!(err, KmsError::KeyNotFound { .. }), "{err}");

    assert_unwraps(&*kms, &wrapped, &ctx, &dek).await;
}

/// The provider as `KmsConfig` connects it: calls bounded by the configured
/// timeout.
async fn bounded(cfg: &GcpConfig) -> Arc<dyn KeyProvider> {
    KmsConfig::Gcp(cfg.clone()).connect().await.unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_silent_server_times_out_at_the_configured_timeout() {
    // An unreachable one: tests/kms_contract.rs.
    let mock = Mock::start().await;
    // A server that accepts but never answers: the timeout layer gives up
    // after the configured timeout.
    mock.server.hang();
    let mut cfg = mock.cfg(None);
    cfg.timeout_secs = 1;
    assert_wrap_times_out(&*bounded(&cfg).await, 1).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn config_and_credentials_are_validated() {
    let mock = Mock::start().await;
    let base = mock.cfg(None);
    for bad in [
        GcpConfig {
            project: "a/b".into(),
            ..base.clone()
        },
        GcpConfig {
            key: String::new(),
            ..base.clone()
        },
        GcpConfig {
            endpoint: Some("cloudkms.googleapis.com".into()),
            ..base.clone()
        },
        GcpConfig {
            credentials_file: Some(mock.dir.path().join("missing.json")),
            ..base.clone()
        },
    ] {
        assert_config_error(GcpKms::connect(&bad).await, &bad);
    }
    // A key file of an unknown type, and one that is not JSON.
    let odd = mock.dir.path().join("odd.json");
    std::fs::write(&odd, r#"{"type":"something_else"}"#).unwrap();
    let Err(err) = GcpKms::connect(&GcpConfig {
        credentials_file: Some(odd.clone()),
        ..base.clone()
    })
    .await
    else {
        panic!("accepted an unknown credentials type")
    };
    assert!(err.to_string().contains("service_account"), "{err}");
    std::fs::write(&odd, "private_key = not json").unwrap();
    let Err(err) = GcpKms::connect(&GcpConfig {
        credentials_file: Some(odd),
        ..base.clone()
    })
    .await
    else {
        panic!("accepted a non-JSON key file")
    };
    assert!(
        !err.to_string().contains("not json"),
        "echoes the file: {err}"
    );
}
