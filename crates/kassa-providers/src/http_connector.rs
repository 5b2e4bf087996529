//! A connector that speaks the provider HTTP protocol ([`crate::protocol`]).
//!
//! How failures are read is what keeps a timeout from becoming a double
//! charge: only a refused connection or a `503` before acting is
//! [`ProviderError::Unavailable`] (another provider may be tried). A call that
//! may have reached the provider and got no readable answer — a timeout, a
//! connection dropped mid-call, a garbled body — is [`ProviderError::Timeout`]:
//! its outcome is unknown, and the caller inquires before anything else.

use crate::protocol::{
    AmountBody, AttemptBody, AuthorizeBody, CardBody, ErrorBody, ReportBody, ReportRequestBody, hex_id, parse_hex_id,
};
use crate::{AttemptStatus, AuthorizeOutcome, AuthorizeRequest, Connector, ProviderError, ReportLine};
use async_trait::async_trait;
use kassa_domain::settlement::EntryKind;
use kassa_domain::{AttemptId, CaptureId, Currency, DeclineCategory, Money, RefundId};
use serde::de::DeserializeOwned;
use std::time::Duration;

/// One provider reached over HTTP at `base_url` (e.g. `http://127.0.0.1:7101`).
#[derive(Debug, Clone)]
pub struct HttpConnector {
    name: String,
    base_url: String,
    client: reqwest::Client,
}

impl HttpConnector {
    pub fn new(name: impl Into<String>, base_url: impl Into<String>) -> Result<Self, String> {
        let base_url = base_url.into().trim_end_matches('/').to_owned();
        if !base_url.starts_with("http://") && !base_url.starts_with("https://") {
            return Err(format!("provider url {base_url:?} must start with http:// or https://"));
        }
        let client = reqwest::Client::builder()
            .connect_timeout(Duration::from_millis(500))
            .pool_idle_timeout(Duration::from_secs(30))
            .pool_max_idle_per_host(256)
            .tcp_nodelay(true)
            .build()
            .map_err(|e| format!("building the HTTP client: {e}"))?;
        Ok(HttpConnector { name: name.into(), base_url, client })
    }

    pub fn base_url(&self) -> &str {
        &self.base_url
    }

    fn unknown(&self, deadline: Duration) -> ProviderError {
        ProviderError::Timeout { deadline_ms: deadline.as_millis() as u64 }
    }

    /// Send and read the answer, classifying every way it can fail.
    async fn call<T: DeserializeOwned>(
        &self,
        request: reqwest::RequestBuilder,
        deadline: Duration,
    ) -> Result<T, ProviderError> {
        let request = request.timeout(deadline).header("x-kassa-deadline-ms", deadline.as_millis().to_string());
        let response = match request.send().await {
            Ok(response) => response,
            Err(e) if e.is_connect() => {
                return Err(ProviderError::Unavailable {
                    reason: format!("{}: connection refused or failed", self.name),
                });
            }
            Err(e) => {
                tracing::debug!(provider = %self.name, error = %e, "provider call got no answer");
                return Err(self.unknown(deadline));
            }
        };
        let status = response.status();
        let bytes = match response.bytes().await {
            Ok(bytes) => bytes,
            Err(_) => return Err(self.unknown(deadline)),
        };
        if status.is_success() {
            return serde_json::from_slice(&bytes).map_err(|e| {
                tracing::warn!(provider = %self.name, error = %e, "unreadable answer; outcome unknown");
                self.unknown(deadline)
            });
        }
        let message = serde_json::from_slice::<ErrorBody>(&bytes)
            .map(|b| format!("{}: {}", b.error.code, b.error.message))
            .unwrap_or_else(|_| format!("HTTP {status}"));
        Err(match status.as_u16() {
            503 => ProviderError::Unavailable { reason: format!("{}: {message}", self.name) },
            // A gateway timeout or any other 5xx: it may have acted.
            500..=599 => self.unknown(deadline),
            _ => ProviderError::Refused { reason: format!("{}: {message}", self.name) },
        })
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base_url)
    }
}

fn category(text: &str) -> DeclineCategory {
    if text == "hard" { DeclineCategory::Hard } else { DeclineCategory::Soft }
}

#[async_trait]
impl Connector for HttpConnector {
    fn name(&self) -> &str {
        &self.name
    }

    async fn authorize(
        &self,
        request: AuthorizeRequest,
        deadline: Duration,
    ) -> Result<AuthorizeOutcome, ProviderError> {
        let body = AuthorizeBody {
            attempt_id: request.attempt_id.to_string(),
            payment_id: request.payment_id.to_string(),
            merchant_id: request.merchant_id.to_string(),
            amount_minor: request.amount.minor,
            currency: request.amount.currency.code().into(),
            card: CardBody {
                number: request.card.pan.expose_digits(),
                exp_month: request.card.expiry.month,
                exp_year: request.card.expiry.year,
                cvc: request.card.expose_cvc().to_owned(),
            },
        };
        // Only a refused connection or a 503 proves the provider did not act. Any
        // other refusal of an authorization (408, 429, a proxy's 4xx…) is ambiguous:
        // unknown, so it is inquired before anyone else is tried.
        let answer: AttemptBody = self
            .call(self.client.post(self.url("/v1/authorizations")).json(&body), deadline)
            .await
            .map_err(|e| match e {
                ProviderError::Refused { reason } => {
                    tracing::warn!(provider = %self.name, %reason, "authorization refused; outcome treated as unknown");
                    self.unknown(deadline)
                }
                other => other,
            })?;
        match answer {
            AttemptBody::Approved { authorization_code } => Ok(AuthorizeOutcome::Approved { authorization_code }),
            AttemptBody::Declined { code, category: c, merchant_advice_code } => {
                Ok(AuthorizeOutcome::Declined { code, category: category(&c), merchant_advice_code })
            }
            // Not an answer to an authorization: read it as unknown and inquire.
            AttemptBody::Reversed | AttemptBody::NotFound => Err(self.unknown(deadline)),
        }
    }

    async fn capture(
        &self,
        attempt_id: AttemptId,
        capture_id: CaptureId,
        amount: Money,
        deadline: Duration,
    ) -> Result<(), ProviderError> {
        let body = AmountBody {
            id: hex_id(capture_id.as_u128()),
            amount_minor: amount.minor,
            currency: amount.currency.code().into(),
        };
        let path = format!("/v1/authorizations/{attempt_id}/captures");
        self.call::<serde_json::Value>(self.client.post(self.url(&path)).json(&body), deadline).await.map(drop)
    }

    async fn reverse(&self, attempt_id: AttemptId, deadline: Duration) -> Result<(), ProviderError> {
        let path = format!("/v1/authorizations/{attempt_id}/reversal");
        self.call::<serde_json::Value>(self.client.post(self.url(&path)), deadline).await.map(drop)
    }

    async fn refund(
        &self,
        attempt_id: AttemptId,
        refund_id: RefundId,
        amount: Money,
        deadline: Duration,
    ) -> Result<(), ProviderError> {
        let body = AmountBody {
            id: hex_id(refund_id.as_u128()),
            amount_minor: amount.minor,
            currency: amount.currency.code().into(),
        };
        let path = format!("/v1/authorizations/{attempt_id}/refunds");
        self.call::<serde_json::Value>(self.client.post(self.url(&path)).json(&body), deadline).await.map(drop)
    }

    async fn inquire(&self, attempt_id: AttemptId, deadline: Duration) -> Result<AttemptStatus, ProviderError> {
        let path = format!("/v1/authorizations/{attempt_id}");
        let answer: AttemptBody = self.call(self.client.get(self.url(&path)), deadline).await?;
        Ok(match answer {
            AttemptBody::Approved { authorization_code } => AttemptStatus::Authorized { authorization_code },
            AttemptBody::Declined { code, category: c, .. } => AttemptStatus::Declined { code, category: category(&c) },
            AttemptBody::Reversed => AttemptStatus::Reversed,
            AttemptBody::NotFound => AttemptStatus::NotFound,
        })
    }

    async fn settlement_report(
        &self,
        entry_ids: &[u128],
        deadline: Duration,
    ) -> Result<Vec<ReportLine>, ProviderError> {
        let body = ReportRequestBody { entry_ids: entry_ids.iter().map(|&id| hex_id(id)).collect() };
        let answer: ReportBody =
            self.call(self.client.post(self.url("/v1/settlement-reports")).json(&body), deadline).await?;
        let bad = |what: String| ProviderError::Refused { reason: format!("{}: settlement report: {what}", self.name) };
        answer
            .lines
            .into_iter()
            .map(|line| {
                let currency =
                    Currency::from_code(&line.currency).map_err(|_| bad(format!("currency {:?}", line.currency)))?;
                Ok(ReportLine {
                    entry_id: parse_hex_id(&line.entry_id)
                        .ok_or_else(|| bad(format!("entry id {:?}", line.entry_id)))?,
                    kind: match line.kind.as_str() {
                        "capture" => EntryKind::Capture,
                        "refund" => EntryKind::Refund,
                        other => return Err(bad(format!("kind {other:?}"))),
                    },
                    amount: Money::new(line.amount_minor, currency),
                })
            })
            .collect()
    }
}
