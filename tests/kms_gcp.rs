//! The GCP Cloud KMS provider against the local HTTP mock of the Cloud KMS
//! REST API in tests/common/kms/gcp.rs. The provider is built exactly as in
//! production, through `GcpKms::connect` with a service-account key file and
//! the `endpoint` override.
#![cfg(feature = "gcp")]

mod common;

use std::sync::Arc;

use common::kms::gcp::{b64_decode, Mock, KEY_ID};
use common::kms::{
    assert_config_error, assert_handles_only, assert_unwraps, assert_wrap_times_out,
    check_refusals, check_rotation, unwrap_err,
};
use kmsfs::crypto::Dek;
use kmsfs::kms::config::KmsConfig;
use kmsfs::kms::gcp::{GcpConfig, GcpKms};
use kmsfs::kms::{KeyProvider, KeyRef, KmsError, WrapContext};

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
