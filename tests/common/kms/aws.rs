//! A real AWS KMS stand-in: a moto server with one key and alias, started
//! by scripts/dev-moto.sh (PyPI moto[server]).

use std::sync::Once;

use kmsfs::kms::aws::AwsConfig;

use super::dev_server::DevServer;

pub const REGION: &str = "us-east-1";
/// The account moto (and the stub) put every key in: their ARNs name it,
/// so the provider's trusted definition names it too.
pub const MOTO_ACCOUNT: &str = "123456789012";

/// Process-wide AWS environment: moto's dummy credentials, and nothing that
/// could send a request anywhere but loopback (no EC2 metadata, no shared
/// config files, STS pinned to a closed local port unless a test overrides
/// it for a child process). Set once, before any test touches the SDK.
pub fn setup_env() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        for (k, v) in [
            ("AWS_ACCESS_KEY_ID", "testing"),
            ("AWS_SECRET_ACCESS_KEY", "testing"),
            ("AWS_EC2_METADATA_DISABLED", "true"),
            ("AWS_CONFIG_FILE", "/nonexistent/kmsfs-test/aws-config"),
            (
                "AWS_SHARED_CREDENTIALS_FILE",
                "/nonexistent/kmsfs-test/aws-credentials",
            ),
            ("AWS_ENDPOINT_URL_STS", "http://127.0.0.1:1"),
        ] {
            std::env::set_var(k, v);
        }
        for k in [
            "AWS_SESSION_TOKEN",
            "AWS_PROFILE",
            "AWS_DEFAULT_PROFILE",
            "AWS_ENDPOINT_URL",
            "AWS_ENDPOINT_URL_KMS",
            "AWS_ROLE_ARN",
            "AWS_WEB_IDENTITY_TOKEN_FILE",
            "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
            "AWS_CONTAINER_CREDENTIALS_FULL_URI",
            "AWS_REGION",
            "AWS_DEFAULT_REGION",
        ] {
            std::env::remove_var(k);
        }
    });
}

/// Key `key` of the KMS at `endpoint` (plain HTTP allowed) in [`REGION`],
/// with the environment's credentials and a 5 s timeout.
pub fn config_at(endpoint: &str, key: &str) -> AwsConfig {
    AwsConfig {
        key_id: key.to_owned(),
        region: Some(REGION.into()),
        endpoint: Some(endpoint.to_owned()),
        allow_http: true,
        profile: None,
        assume_role_arn: None,
        external_id: None,
        account: Some(MOTO_ACCOUNT.into()),
        timeout_secs: 5,
    }
}

pub struct Moto {
    server: DevServer,
}

impl Moto {
    pub fn start() -> Self {
        setup_env();
        let server = DevServer::start(
            "dev-moto.sh",
            "moto (PyPI moto[server])",
            &[
                "KMSFS_AWS_ENDPOINT",
                "KMSFS_AWS_KEY_ID",
                "KMSFS_AWS_KEY_ARN",
                "KMSFS_MOTO_PID",
            ],
            |_| {},
        );
        Moto { server }
    }

    server_vars! {
        url => "KMSFS_AWS_ENDPOINT",
        key_id => "KMSFS_AWS_KEY_ID",
        key_arn => "KMSFS_AWS_KEY_ARN",
    }

    pub fn alias(&self) -> &str {
        self.server
            .env
            .get("KMSFS_AWS_KEY_ALIAS")
            .map(String::as_str)
            .unwrap_or("alias/kmsfs-dev")
    }

    pub fn config(&self, key: &str) -> AwsConfig {
        config_at(self.url(), key)
    }

    /// A raw SDK client on moto, to set up keys the provider then meets.
    pub async fn admin(&self) -> aws_sdk_kms::Client {
        let sdk = aws_config::defaults(aws_config::BehaviorVersion::latest())
            .region(aws_config::Region::new(REGION))
            .endpoint_url(self.url())
            .load()
            .await;
        aws_sdk_kms::Client::new(&sdk)
    }
}
