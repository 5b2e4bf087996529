//! A simulated acquirer served over HTTP (the protocol in [`crate::protocol`]),
//! and its control API for fault injection and the ledger.
//!
//! `down` is real: while it lasts the port is closed, so clients get a
//! refused connection, exactly what they get from a provider that is gone.

use crate::protocol::{
    AmountBody, AttemptBody, AuthorizeBody, ErrorBody, ErrorDetail, FaultBody, LedgerBody, LedgerRow, ReportBody,
    ReportLineBody, ReportRequestBody, hex_id, parse_hex_id,
};
use crate::simulator::{Fault, FaultMode, LedgerState, SimulatedAcquirer};
use crate::{AttemptStatus, AuthorizeOutcome, AuthorizeRequest, Connector, ProviderError};
use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use kassa_domain::settlement::EntryKind;
use kassa_domain::{
    AttemptId, CaptureId, CardDetails, Currency, DeclineCategory, MerchantId, Money, PaymentId, RefundId, Timestamp,
};
use sha2::{Digest, Sha256};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::watch;

/// Deadline a call gets when it names none, and the most it may name.
const DEADLINE_DEFAULT_MS: u64 = 1500;
const DEADLINE_MAX_MS: u64 = 60_000;

/// A refusal, answered as `{"error": {"code", "message"}}`.
#[derive(Debug)]
pub struct Fail {
    status: StatusCode,
    code: &'static str,
    message: String,
}

impl IntoResponse for Fail {
    fn into_response(self) -> Response {
        let body = ErrorBody { error: ErrorDetail { code: self.code.into(), message: self.message } };
        (self.status, Json(body)).into_response()
    }
}

fn error(status: StatusCode, code: &'static str, message: impl Into<String>) -> Fail {
    Fail { status, code, message: message.into() }
}

fn provider_error(e: ProviderError) -> Fail {
    match e {
        ProviderError::Unavailable { reason } => error(StatusCode::SERVICE_UNAVAILABLE, "unavailable", reason),
        ProviderError::Timeout { deadline_ms } => {
            error(StatusCode::GATEWAY_TIMEOUT, "timeout", format!("no answer within {deadline_ms} ms"))
        }
        ProviderError::Refused { reason } => error(StatusCode::UNPROCESSABLE_ENTITY, "refused", reason),
    }
}

fn bad_request(message: impl Into<String>) -> Fail {
    error(StatusCode::BAD_REQUEST, "invalid_request", message)
}

fn deadline(headers: &HeaderMap) -> Result<Duration, Fail> {
    match headers.get("x-kassa-deadline-ms") {
        None => Ok(Duration::from_millis(DEADLINE_DEFAULT_MS)),
        Some(value) => value
            .to_str()
            .ok()
            .and_then(|v| v.parse::<u64>().ok())
            .filter(|ms| (1..=DEADLINE_MAX_MS).contains(ms))
            .map(Duration::from_millis)
            .ok_or_else(|| bad_request(format!("x-kassa-deadline-ms must be 1 to {DEADLINE_MAX_MS} milliseconds"))),
    }
}

fn money(minor: i64, currency: &str) -> Result<Money, Fail> {
    let currency = Currency::from_code(currency)
        .map_err(|_| bad_request(format!("currency {currency:?} is not an ISO 4217 code")))?;
    if minor <= 0 {
        return Err(bad_request(format!("amount_minor must be positive, got {minor}")));
    }
    Ok(Money::new(minor, currency))
}

fn attempt_id(text: &str) -> Result<AttemptId, Fail> {
    text.parse().map_err(|_| bad_request(format!("{text:?} is not an attempt id (att_…)")))
}

fn body<T>(body: Result<Json<T>, JsonRejection>) -> Result<T, Fail> {
    body.map(|Json(b)| b).map_err(|e| bad_request(e.body_text()))
}

fn category(category: DeclineCategory) -> &'static str {
    match category {
        DeclineCategory::Hard => "hard",
        DeclineCategory::Soft => "soft",
    }
}

async fn authorize(
    State(sim): State<Arc<SimulatedAcquirer>>,
    headers: HeaderMap,
    request: Result<Json<AuthorizeBody>, JsonRejection>,
) -> Result<Response, Fail> {
    let deadline = deadline(&headers)?;
    let b = body(request)?;
    let now = Timestamp::from_unix_ms(
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64),
    );
    let card = CardDetails::parse(&b.card.number, b.card.exp_month, b.card.exp_year, &b.card.cvc, now)
        .map_err(|e| bad_request(format!("card: {e}")))?;
    let request = AuthorizeRequest {
        attempt_id: attempt_id(&b.attempt_id)?,
        payment_id: b.payment_id.parse::<PaymentId>().map_err(|_| bad_request("payment_id is not pay_…"))?,
        merchant_id: b.merchant_id.parse::<MerchantId>().map_err(|_| bad_request("merchant_id is not mer_…"))?,
        amount: money(b.amount_minor, &b.currency)?,
        card,
    };
    Ok(match sim.authorize(request, deadline).await {
        Ok(AuthorizeOutcome::Approved { authorization_code }) => {
            Json(AttemptBody::Approved { authorization_code }).into_response()
        }
        Ok(AuthorizeOutcome::Declined { code, category: c, merchant_advice_code }) => {
            Json(AttemptBody::Declined { code, category: category(c).into(), merchant_advice_code }).into_response()
        }
        Err(e) => provider_error(e).into_response(),
    })
}

async fn inquire(
    State(sim): State<Arc<SimulatedAcquirer>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Response, Fail> {
    let deadline = deadline(&headers)?;
    Ok(match sim.inquire(attempt_id(&id)?, deadline).await {
        Ok(AttemptStatus::Authorized { authorization_code }) => {
            Json(AttemptBody::Approved { authorization_code }).into_response()
        }
        Ok(AttemptStatus::Declined { code, category: c }) => {
            Json(AttemptBody::Declined { code, category: category(c).into(), merchant_advice_code: None })
                .into_response()
        }
        Ok(AttemptStatus::Reversed) => Json(AttemptBody::Reversed).into_response(),
        Ok(AttemptStatus::NotFound) => Json(AttemptBody::NotFound).into_response(),
        Err(e) => provider_error(e).into_response(),
    })
}

fn done(result: Result<(), ProviderError>) -> Response {
    match result {
        Ok(()) => Json(serde_json::json!({})).into_response(),
        Err(e) => provider_error(e).into_response(),
    }
}

/// Captures and refunds: the same body, idempotent by its id.
#[derive(Clone, Copy)]
enum AmountCall {
    Capture,
    Refund,
}

async fn amount_call(
    sim: &SimulatedAcquirer,
    headers: &HeaderMap,
    id: &str,
    request: Result<Json<AmountBody>, JsonRejection>,
    call: AmountCall,
) -> Result<Response, Fail> {
    let deadline = deadline(headers)?;
    let b = body(request)?;
    let entry = parse_hex_id(&b.id).ok_or_else(|| bad_request("id: 32 hex digits"))?;
    let (attempt, amount) = (attempt_id(id)?, money(b.amount_minor, &b.currency)?);
    Ok(done(match call {
        AmountCall::Capture => sim.capture(attempt, CaptureId::from_u128(entry), amount, deadline).await,
        AmountCall::Refund => sim.refund(attempt, RefundId::from_u128(entry), amount, deadline).await,
    }))
}

async fn capture(
    State(sim): State<Arc<SimulatedAcquirer>>,
    headers: HeaderMap,
    Path(id): Path<String>,
    request: Result<Json<AmountBody>, JsonRejection>,
) -> Result<Response, Fail> {
    amount_call(&sim, &headers, &id, request, AmountCall::Capture).await
}

async fn refund(
    State(sim): State<Arc<SimulatedAcquirer>>,
    headers: HeaderMap,
    Path(id): Path<String>,
    request: Result<Json<AmountBody>, JsonRejection>,
) -> Result<Response, Fail> {
    amount_call(&sim, &headers, &id, request, AmountCall::Refund).await
}

async fn reverse(
    State(sim): State<Arc<SimulatedAcquirer>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Response, Fail> {
    let deadline = deadline(&headers)?;
    Ok(done(sim.reverse(attempt_id(&id)?, deadline).await))
}

async fn report(
    State(sim): State<Arc<SimulatedAcquirer>>,
    headers: HeaderMap,
    request: Result<Json<ReportRequestBody>, JsonRejection>,
) -> Result<Response, Fail> {
    let deadline = deadline(&headers)?;
    let b = body(request)?;
    if b.entry_ids.len() > 100_000 {
        return Err(bad_request("at most 100000 entry_ids per report"));
    }
    let ids = b
        .entry_ids
        .iter()
        .map(|id| parse_hex_id(id).ok_or_else(|| bad_request(format!("entry id {id:?}: 32 hex digits"))))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(match sim.settlement_report(&ids, deadline).await {
        Ok(lines) => Json(ReportBody {
            lines: lines
                .into_iter()
                .map(|line| ReportLineBody {
                    entry_id: hex_id(line.entry_id),
                    kind: match line.kind {
                        EntryKind::Capture => "capture",
                        EntryKind::Refund => "refund",
                    }
                    .into(),
                    amount_minor: line.amount.minor,
                    currency: line.amount.currency.code().into(),
                })
                .collect(),
        })
        .into_response(),
        Err(e) => provider_error(e).into_response(),
    })
}

/// The provider protocol for one simulator.
pub fn protocol_router(sim: Arc<SimulatedAcquirer>) -> Router {
    Router::new()
        .route("/v1/authorizations", post(authorize))
        .route("/v1/authorizations/{id}", get(inquire))
        .route("/v1/authorizations/{id}/captures", post(capture))
        .route("/v1/authorizations/{id}/refunds", post(refund))
        .route("/v1/authorizations/{id}/reversal", post(reverse))
        .route("/v1/settlement-reports", post(report))
        .with_state(sim)
}

#[derive(Clone)]
struct Control {
    sims: Arc<Vec<Arc<SimulatedAcquirer>>>,
    admin_token_hash: [u8; 32],
}

impl Control {
    fn authorize(&self, headers: &HeaderMap) -> Result<(), Fail> {
        let token = headers
            .get("authorization")
            .and_then(|h| h.to_str().ok())
            .and_then(|h| h.strip_prefix("Bearer "))
            .unwrap_or("");
        let hash: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        if token.is_empty() || hash != self.admin_token_hash {
            return Err(error(
                StatusCode::UNAUTHORIZED,
                "invalid_admin_token",
                "missing or invalid operator token (Authorization: Bearer …, see DIR/admin.token)",
            ));
        }
        Ok(())
    }

    fn sim(&self, name: &str) -> Result<&Arc<SimulatedAcquirer>, Fail> {
        self.sims
            .iter()
            .find(|s| s.name() == name)
            .ok_or_else(|| error(StatusCode::NOT_FOUND, "unknown_provider", format!("no simulated provider {name:?}")))
    }
}

/// Parse a fault request; the error names the field.
pub fn parse_fault(b: &FaultBody) -> Result<Fault, String> {
    let mode = match b.mode.as_str() {
        "down" => FaultMode::Down,
        "error" => FaultMode::Error,
        "slow" => FaultMode::Slow,
        "timeout_after_accept" => FaultMode::TimeoutAfterAccept,
        "soft_decline_burst" => FaultMode::SoftDeclineBurst,
        other => {
            return Err(format!(
                "mode: {other:?} is not one of down, error, slow, timeout_after_accept, soft_decline_burst"
            ));
        }
    };
    let rate = b.rate.unwrap_or(1.0);
    if !(0.0..=1.0).contains(&rate) {
        return Err(format!("rate: {rate} is not between 0.0 and 1.0"));
    }
    // A control knob, not money: the one float in the protocol, read once.
    #[allow(clippy::float_arithmetic)]
    let rate_per_mille = (rate * 1000.0).round() as u32;
    let latency_ms = b.latency_ms.unwrap_or(if mode == FaultMode::Slow { 1000 } else { 0 });
    if latency_ms > 600_000 {
        return Err(format!("latency_ms: {latency_ms} is over 600000"));
    }
    let until = match b.duration_s {
        Some(0) => return Err("duration_s: must be at least 1 (omit it for a fault that lasts until cleared)".into()),
        Some(s) if s > 86_400 => return Err(format!("duration_s: {s} is over a day")),
        Some(s) => Some(tokio::time::Instant::now() + Duration::from_secs(s)),
        None => None,
    };
    Ok(Fault { mode, rate_per_mille, latency_ms, until })
}

async fn set_fault(
    State(control): State<Control>,
    headers: HeaderMap,
    Path(name): Path<String>,
    request: Result<Json<FaultBody>, JsonRejection>,
) -> Result<Response, Fail> {
    control.authorize(&headers)?;
    let sim = control.sim(&name)?;
    let fault = parse_fault(&body(request)?).map_err(bad_request)?;
    sim.set_fault(Some(fault));
    tracing::warn!(provider = %name, mode = fault.mode.as_str(), rate_per_mille = fault.rate_per_mille, "fault injected");
    Ok(Json(serde_json::json!({"provider": name, "mode": fault.mode.as_str(), "rate_per_mille": fault.rate_per_mille}))
        .into_response())
}

async fn clear_fault(
    State(control): State<Control>,
    headers: HeaderMap,
    Path(name): Path<String>,
) -> Result<Response, Fail> {
    control.authorize(&headers)?;
    control.sim(&name)?.set_fault(None);
    tracing::warn!(provider = %name, "fault cleared");
    Ok(StatusCode::NO_CONTENT.into_response())
}

async fn ledger(
    State(control): State<Control>,
    headers: HeaderMap,
    Path(name): Path<String>,
) -> Result<Response, Fail> {
    control.authorize(&headers)?;
    let data = control
        .sim(&name)?
        .ledger()
        .into_iter()
        .map(|e| LedgerRow {
            attempt_id: e.attempt_id.to_string(),
            payment_id: e.payment_id.to_string(),
            amount: e.amount.minor,
            currency: e.amount.currency.code().into(),
            state: match e.state {
                LedgerState::Authorized => "authorized",
                LedgerState::Captured => "captured",
                LedgerState::Reversed => "reversed",
                LedgerState::Refunded => "refunded",
            }
            .into(),
        })
        .collect();
    Ok(Json(LedgerBody { data }).into_response())
}

/// `/sim/{provider}/faults` and `/sim/{provider}/ledger` for these simulators,
/// guarded by the admin token.
pub fn control_router(sims: Vec<Arc<SimulatedAcquirer>>, admin_token: &str) -> Router {
    let control = Control { sims: Arc::new(sims), admin_token_hash: Sha256::digest(admin_token.as_bytes()).into() };
    Router::new()
        .route("/sim/{provider}/faults", post(set_fault).delete(clear_fault))
        .route("/sim/{provider}/ledger", get(ledger))
        .with_state(control)
}

/// Serve `router` (the simulator's protocol, maybe with its control API) on
/// `listener` until `stop`. While the simulator is `down` the port is closed
/// and reopened at the same address when the fault clears.
pub async fn serve(
    sim: Arc<SimulatedAcquirer>,
    listener: TcpListener,
    router: Router,
    mut stop: watch::Receiver<bool>,
) -> std::io::Result<()> {
    let addr: SocketAddr = listener.local_addr()?;
    let mut listener = Some(listener);
    loop {
        let current = match listener.take() {
            Some(l) => l,
            None => {
                tokio::select! {
                    _ = sim.wait_down(false) => {}
                    _ = stop.changed() => return Ok(()),
                }
                let mut attempts = 0;
                loop {
                    match TcpListener::bind(addr).await {
                        Ok(l) => break l,
                        Err(e) if attempts < 50 => {
                            attempts += 1;
                            tracing::debug!(%addr, %e, "rebinding the simulator port");
                            tokio::time::sleep(Duration::from_millis(100)).await;
                        }
                        Err(e) => return Err(e),
                    }
                }
            }
        };
        if sim.is_down() {
            drop(current);
            continue;
        }
        let sim_for_shutdown = Arc::clone(&sim);
        let mut stop_for_shutdown = stop.clone();
        axum::serve(current, router.clone())
            .with_graceful_shutdown(async move {
                tokio::select! {
                    _ = sim_for_shutdown.wait_down(true) => {}
                    _ = stop_for_shutdown.changed() => {}
                }
            })
            .await?;
        if *stop.borrow() {
            return Ok(());
        }
        tracing::warn!(provider = sim.name(), %addr, "provider down: port closed");
    }
}
