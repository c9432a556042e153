//! Asking ECR for an authorization token (GetAuthorizationToken) with the official AWS SDK for
//! Rust and its default credential chain: the environment, the shared config and credentials
//! files (with `credential_process`), web identity (IRSA), EKS Pod Identity and ECS container
//! credentials, and EC2 instance metadata. `AWS_ENDPOINT_URL_ECR` (or `AWS_ENDPOINT_URL`)
//! points it elsewhere, as the SDK documents. TLS is rustls with ring, like the rest of
//! depwatch.

use std::time::Duration;

use aws_config::timeout::TimeoutConfig;
use aws_config::BehaviorVersion;
use aws_smithy_http_client::tls::{rustls_provider::CryptoMode, Provider};

use super::{decode_token, Token};

/// The SDK client, built once.
pub struct TokenSource {
    client: aws_sdk_ecr::Client,
    /// What a client for another region is built from.
    config: aws_config::SdkConfig,
    /// The region, when the chain found one (a fetch without one fails saying so).
    region: Option<String>,
}

impl TokenSource {
    /// Resolve the region and credential chain (lazily: credentials are fetched at the first
    /// request). May take a moment outside AWS, where instance metadata does not answer.
    pub async fn load() -> TokenSource {
        let http = aws_smithy_http_client::Builder::new()
            .tls_provider(Provider::Rustls(CryptoMode::Ring))
            .build_https();
        let timeouts = TimeoutConfig::builder()
            .connect_timeout(Duration::from_secs(5))
            .operation_attempt_timeout(Duration::from_secs(10))
            .operation_timeout(Duration::from_secs(30))
            .build();
        let config = aws_config::defaults(BehaviorVersion::latest())
            .http_client(http)
            .timeout_config(timeouts)
            .load()
            .await;
        TokenSource {
            region: config.region().map(|r| r.to_string()),
            client: aws_sdk_ecr::Client::new(&config),
            config,
        }
    }

    /// The region tokens are asked in, for the log.
    pub fn region(&self) -> Option<&str> {
        self.region.as_deref()
    }

    /// One GetAuthorizationToken: the token of the caller's default registry in the region.
    pub async fn fetch(&self) -> Result<Token, String> {
        self.fetch_in(None).await
    }

    /// [`TokenSource::fetch`] in `region` (an ECR host's), or in the chain's own.
    pub async fn fetch_in(&self, region: Option<&str>) -> Result<Token, String> {
        let client = match region {
            Some(r) => {
                let conf = aws_sdk_ecr::config::Builder::from(&self.config)
                    .region(aws_sdk_ecr::config::Region::new(r.to_string()))
                    .build();
                aws_sdk_ecr::Client::from_conf(conf)
            }
            None if self.region.is_none() => {
                return Err(
                    "no AWS region: set AWS_REGION (or a region in the AWS config file)".into(),
                )
            }
            None => self.client.clone(),
        };
        let answer = client
            .get_authorization_token()
            .send()
            .await
            .map_err(|e| aws_sdk_ecr::error::DisplayErrorContext(e).to_string())?;
        let data = answer
            .authorization_data()
            .first()
            .ok_or("GetAuthorizationToken answered no authorizationData")?;
        let missing = |what: &str| format!("GetAuthorizationToken answered no {what}");
        let token = data
            .authorization_token()
            .ok_or_else(|| missing("authorizationToken"))?;
        let endpoint = data
            .proxy_endpoint()
            .ok_or_else(|| missing("proxyEndpoint"))?;
        let expires = data.expires_at().ok_or_else(|| missing("expiresAt"))?;
        let expires = jiff::Timestamp::from_second(expires.secs())
            .map_err(|e| format!("expiresAt out of range: {e}"))?;
        decode_token(token, endpoint, expires)
    }
}
