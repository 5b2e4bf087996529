//! The payments API over HTTP (axum). Thin: it moves bytes and headers in and
//! out and calls the ingest service; every rule lives below it.

use crate::ingest::{Answer, IngestService};
use crate::reconciliation::{ReconciliationReport, ReconciliationService};
use crate::settlement::SettlementService;
use axum::Router;
use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, QueryRejection};
use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use kassa_api::{ApiError, ErrorType};
use kassa_domain::BatchId;
use kassa_domain::settlement::BatchState;
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

/// Largest request body accepted (413 beyond).
pub const BODY_BYTES_MAX: usize = 64 * 1024;

#[derive(Debug, Clone)]
struct App {
    ingest: Arc<IngestService>,
    /// Present when settlement runs in this process (`kassa up`).
    settlement: Option<Arc<SettlementService>>,
    /// Present when reconciliation runs in this process (`kassa up`).
    reconciliation: Option<Arc<ReconciliationService>>,
    ready: Arc<AtomicBool>,
    /// SHA-256 of the operator token for `/admin/…`.
    admin_token_hash: [u8; 32],
}

/// The API's routes. `ready` flips to true once Kassa takes payments;
/// `admin_token` guards `/admin/…` (`Authorization: Bearer …`). Settlement's
/// and reconciliation's merchant views are served when those services run in
/// this process (`kassa up`); a separate `kassa settle` / `kassa reconcile`
/// serves them to operators ([`operator_router`]).
pub fn router(
    ingest: Arc<IngestService>,
    settlement: Option<Arc<SettlementService>>,
    reconciliation: Option<Arc<ReconciliationService>>,
    ready: Arc<AtomicBool>,
    admin_token: &str,
) -> Router {
    let admin_token_hash = Sha256::digest(admin_token.as_bytes()).into();
    let mut router = Router::new().route("/healthz", get(healthz)).route("/admin/merchants", post(create_merchant));
    if settlement.is_some() {
        router = router
            .route("/admin/settlement/cutoff", post(cutoff))
            .route("/v1/settlement/batches", get(list_batches))
            .route("/v1/settlement/batches/{id}", get(get_batch));
    }
    if reconciliation.is_some() {
        router = router.route("/v1/reconciliation/reports", get(list_reports));
    }
    router
        .route("/v1/payments", post(create_payment).get(list_payments))
        .route("/v1/payments/{id}", get(get_payment))
        .route("/v1/payments/{id}/capture", post(capture))
        .route("/v1/payments/{id}/void", post(void))
        .route("/v1/payments/{id}/refunds", post(refund))
        .route("/v1/payments/{id}/events", get(payment_events))
        .fallback(|| async { error_response(&ApiError::not_found("route")) })
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(BODY_BYTES_MAX))
        .with_state(App { ingest, settlement, reconciliation, ready, admin_token_hash })
}

/// A known path asked with a method it does not take: the JSON error shape, and
/// axum's `Allow` header.
pub async fn method_not_allowed() -> Response {
    let message = "this path does not take that method (the Allow header lists those it does)";
    error_response(&ApiError::new(405, ErrorType::InvalidRequestError, "method_not_allowed", message))
}

fn error_response(error: &ApiError) -> Response {
    let status = StatusCode::from_u16(error.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut response = (status, axum::Json(error.body())).into_response();
    if error.status == 503 || error.status == 429 {
        response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    }
    response
}

fn answer_response(answer: Answer) -> Response {
    let status = StatusCode::from_u16(answer.status).unwrap_or(StatusCode::OK);
    let mut response = (status, axum::Json(answer.body)).into_response();
    if answer.replayed {
        response.headers_mut().insert("Idempotent-Replayed", HeaderValue::from_static("true"));
    }
    if answer.status == 503 {
        // Breakers probe again within seconds (routing.breaker.open_ms, 5 s by default).
        response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static("5"));
    }
    response
}

fn respond(result: Result<Answer, ApiError>) -> Response {
    match result {
        Ok(answer) => answer_response(answer),
        Err(error) => error_response(&error),
    }
}

fn json(result: Result<serde_json::Value, ApiError>) -> Response {
    respond(result.map(|body| Answer { status: 200, body, replayed: false }))
}

fn header_str<'a>(headers: &'a HeaderMap, name: &str) -> Result<Option<&'a str>, ApiError> {
    match headers.get(name) {
        None => Ok(None),
        Some(value) => value
            .to_str()
            .map(Some)
            .map_err(|_| ApiError::invalid("header_invalid", name, format!("the {name} header must be visible ASCII"))),
    }
}

/// Checks shared by every call: ready, authenticated.
fn merchant(app: &App, headers: &HeaderMap) -> Result<kassa_domain::MerchantId, ApiError> {
    if !app.ready.load(Ordering::Acquire) {
        return Err(ApiError::new(503, ErrorType::RateLimitError, "not_ready", "Kassa is starting; retry shortly"));
    }
    app.ingest.authenticate(header_str(headers, "authorization")?)
}

/// POST bodies: size and content type.
fn post_body(headers: &HeaderMap, body: Result<Bytes, BytesRejection>) -> Result<Bytes, ApiError> {
    let body = body.map_err(|rejection| {
        if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::new(
                413,
                ErrorType::InvalidRequestError,
                "request_too_large",
                format!("request body is over {BODY_BYTES_MAX} bytes"),
            )
        } else {
            ApiError::new(400, ErrorType::InvalidRequestError, "invalid_body", rejection.body_text())
        }
    })?;
    if !body.is_empty() {
        let content_type = header_str(headers, "content-type")?.unwrap_or("");
        let media = content_type.split(';').next().unwrap_or("").trim();
        if !media.eq_ignore_ascii_case("application/json") {
            return Err(ApiError::new(
                415,
                ErrorType::InvalidRequestError,
                "unsupported_media_type",
                format!("send JSON with Content-Type: application/json (got {content_type:?})"),
            ));
        }
    }
    Ok(body)
}

async fn healthz(State(app): State<App>) -> Response {
    health(&app.ready)
}

/// 200 once the process takes work, 503 before.
fn health(ready: &AtomicBool) -> Response {
    if ready.load(Ordering::Acquire) {
        (StatusCode::OK, "ok\n").into_response()
    } else {
        error_response(&ApiError::new(503, ErrorType::RateLimitError, "not_ready", "Kassa is starting"))
    }
}

/// A service this process may not run: its routes answer 404.
fn here<T>(service: &Option<Arc<T>>) -> Result<&Arc<T>, ApiError> {
    service.as_ref().ok_or_else(|| ApiError::not_found("route"))
}

/// A merchant's latest batches.
fn batches_of(
    settlement: &SettlementService,
    merchant: kassa_domain::MerchantId,
) -> Result<serde_json::Value, ApiError> {
    let batches = settlement.batches(merchant, 100).map_err(storage_error)?;
    Ok(serde_json::json!({ "data": batches.iter().map(batch_json).collect::<Vec<_>>() }))
}

/// One batch; with `merchant`, only if it is that merchant's (404 otherwise, never 403).
fn batch_of(
    settlement: &SettlementService,
    id: &str,
    merchant: Option<kassa_domain::MerchantId>,
) -> Result<serde_json::Value, ApiError> {
    let batch_id = BatchId::parse(id).map_err(|_| ApiError::not_found("batch"))?;
    match settlement.batch(batch_id).map_err(storage_error)? {
        Some(batch) if merchant.is_none_or(|m| batch.key.as_ref().is_some_and(|k| k.merchant_id == m)) => {
            Ok(batch_json(&batch))
        }
        _ => Err(ApiError::not_found("batch")),
    }
}

/// Close the open batches now; the ids of those this instance closed, and
/// whether that is all of them (it owns every partition).
async fn cutoff_now(settlement: &SettlementService) -> Result<Answer, ApiError> {
    let done = settlement.cutoff().await.map_err(|error| {
        tracing::warn!(%error, "cut-off not requested");
        ApiError::new(503, ErrorType::RateLimitError, "bus_unavailable", format!("{error}; retry"))
    })?;
    let ids: Vec<String> = done.closed.iter().map(ToString::to_string).collect();
    let body = serde_json::json!({ "closed": ids, "complete": done.complete });
    Ok(Answer { status: 200, body, replayed: false })
}

/// A merchant's latest reconciliation reports.
fn reports_of(
    reconciliation: &ReconciliationService,
    merchant: kassa_domain::MerchantId,
) -> Result<serde_json::Value, ApiError> {
    let reports = reconciliation.reports(merchant, 100).map_err(storage_error)?;
    Ok(serde_json::json!({ "data": reports.iter().map(report_json).collect::<Vec<_>>() }))
}

async fn create_payment(State(app): State<App>, headers: HeaderMap, body: Result<Bytes, BytesRejection>) -> Response {
    let result = async {
        let merchant = merchant(&app, &headers)?;
        let body = post_body(&headers, body)?;
        let key = header_str(&headers, "idempotency-key")?;
        app.ingest.create_payment(merchant, key, &body).await
    };
    respond(result.await)
}

async fn list_payments(
    State(app): State<App>,
    headers: HeaderMap,
    query: Result<Query<HashMap<String, String>>, QueryRejection>,
) -> Response {
    json((|| {
        let merchant = merchant(&app, &headers)?;
        let Ok(Query(query)) = query else {
            return Err(ApiError::invalid("parameter_invalid", "query", "the query string does not parse"));
        };
        app.ingest.list_payments(merchant, kassa_api::parse_list_query(&query)?)
    })())
}

async fn get_payment(State(app): State<App>, headers: HeaderMap, Path(id): Path<String>) -> Response {
    json((|| {
        let merchant = merchant(&app, &headers)?;
        app.ingest.get_payment(merchant, IngestService::parse_payment_id(&id)?)
    })())
}

async fn payment_events(State(app): State<App>, headers: HeaderMap, Path(id): Path<String>) -> Response {
    json((|| {
        let merchant = merchant(&app, &headers)?;
        app.ingest.payment_events(merchant, IngestService::parse_payment_id(&id)?)
    })())
}

async fn command(
    app: App,
    headers: HeaderMap,
    id: String,
    action: &str,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let result = async {
        let merchant = merchant(&app, &headers)?;
        let payment_id = IngestService::parse_payment_id(&id)?;
        let body = post_body(&headers, body)?;
        let key = header_str(&headers, "idempotency-key")?;
        app.ingest.command(merchant, payment_id, action, key, &body).await
    };
    respond(result.await)
}

async fn capture(
    State(app): State<App>,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    command(app, headers, id, "capture", body).await
}

async fn void(
    State(app): State<App>,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    command(app, headers, id, "void", body).await
}

async fn refund(
    State(app): State<App>,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    command(app, headers, id, "refunds", body).await
}

/// Operator calls: the admin token, compared by hash so timing says nothing.
fn operator(app: &App, headers: &HeaderMap) -> Result<(), ApiError> {
    check_admin_token(&app.admin_token_hash, headers)
}

fn check_admin_token(admin_token_hash: &[u8; 32], headers: &HeaderMap) -> Result<(), ApiError> {
    let token = header_str(headers, "authorization")?.and_then(|h| h.strip_prefix("Bearer ")).unwrap_or("");
    let hash: [u8; 32] = Sha256::digest(token.as_bytes()).into();
    if token.is_empty() || &hash != admin_token_hash {
        return Err(ApiError::new(
            401,
            ErrorType::AuthenticationError,
            "invalid_admin_token",
            "missing or invalid operator token (see DIR/admin.token)",
        ));
    }
    Ok(())
}

async fn create_merchant(State(app): State<App>, headers: HeaderMap, body: Result<Bytes, BytesRejection>) -> Response {
    let result = async {
        operator(&app, &headers)?;
        let body = post_body(&headers, body)?;
        let value: serde_json::Value = serde_json::from_slice(&body).map_err(|e| {
            ApiError::new(
                400,
                ErrorType::InvalidRequestError,
                "invalid_json",
                format!("request body is not valid JSON: {e}"),
            )
        })?;
        let name = value
            .get("name")
            .and_then(|n| n.as_str())
            .ok_or_else(|| ApiError::invalid("parameter_missing", "name", "send {\"name\": \"…\"}"))?;
        let (merchant_id, key) = app.ingest.create_merchant(name).await?;
        Ok(Answer {
            status: 201,
            body: serde_json::json!({"id": merchant_id.to_string(), "name": name, "api_key": key.reveal()}),
            replayed: false,
        })
    };
    respond(result.await)
}

fn storage_error(error: kassa_eventlog::LogError) -> ApiError {
    tracing::error!(%error, "settlement read failed");
    ApiError::new(500, ErrorType::ApiError, "internal_error", "Kassa could not read settlement; retry")
}

/// A batch as the API shows it.
pub fn batch_json(batch: &BatchState) -> serde_json::Value {
    let key = batch.key.as_ref();
    let closed = batch.closed.as_ref();
    serde_json::json!({
        "id": batch.batch_id.map(|id| id.to_string()),
        "object": "settlement_batch",
        "status": if closed.is_some() { "closed" } else { "open" },
        "provider": key.map(|k| k.provider.clone()),
        "merchant": key.map(|k| k.merchant_id.to_string()),
        "currency": key.map(|k| k.currency.code()),
        "opened_at": batch.opened_at.map(|t| t.to_string()),
        "closed_at": closed.map(|(_, at)| at.to_string()),
        "entries": batch.entries.len(),
        "amount_captured": batch.captured_minor,
        "amount_refunded": batch.refunded_minor,
        "fees": closed.map(|(t, _)| t.fees.minor),
        "net": closed.map(|(t, _)| t.net.minor),
        "lines": batch.entries.iter().map(|e| serde_json::json!({
            "payment": e.payment_id.to_string(),
            "kind": e.kind,
            "amount": e.amount.minor,
        })).collect::<Vec<_>>(),
    })
}

async fn list_batches(State(app): State<App>, headers: HeaderMap) -> Response {
    json((|| batches_of(here(&app.settlement)?, merchant(&app, &headers)?))())
}

async fn get_batch(State(app): State<App>, headers: HeaderMap, Path(id): Path<String>) -> Response {
    json((|| batch_of(here(&app.settlement)?, &id, Some(merchant(&app, &headers)?)))())
}

async fn cutoff(State(app): State<App>, headers: HeaderMap) -> Response {
    let result = async {
        operator(&app, &headers)?;
        cutoff_now(here(&app.settlement)?).await
    };
    respond(result.await)
}

/// A reconciliation report as the API shows it.
pub fn report_json(report: &ReconciliationReport) -> serde_json::Value {
    let line = |e: &kassa_domain::settlement::SettlementEntry| serde_json::json!({"payment": e.payment_id.to_string(), "kind": e.kind, "amount": e.amount.minor});
    let r = &report.result;
    serde_json::json!({
        "id": report.report_id.to_string(),
        "object": "reconciliation_report",
        "batch": report.batch_id.to_string(),
        "provider": report.provider,
        "created_at": report.created_at.to_string(),
        "status": if r.is_clean() && report.provider_error.is_none() { "matched" } else { "discrepancies" },
        "matched": r.matched.len(),
        "missing": r.missing.iter().map(line).collect::<Vec<_>>(),
        "amount_mismatch": r.amount_mismatch.iter().map(|m| serde_json::json!({
            "payment": m.entry.payment_id.to_string(),
            "kind": m.entry.kind,
            "amount": m.entry.amount.minor,
            "reported_amount": m.reported.amount.minor,
        })).collect::<Vec<_>>(),
        "unexpected": r.unexpected.iter().map(|l| serde_json::json!({"kind": l.kind, "amount": l.amount.minor})).collect::<Vec<_>>(),
        "provider_error": report.provider_error,
    })
}

async fn list_reports(State(app): State<App>, headers: HeaderMap) -> Response {
    json((|| reports_of(here(&app.reconciliation)?, merchant(&app, &headers)?))())
}

/// Operator routes for routing: providers' status, maintenance windows, the
/// rule set, and a payment's recorded routing decisions.
pub fn routing_router(
    authorization: Arc<crate::authorization::AuthorizationService>,
    clock: Arc<dyn crate::Clock>,
    admin_token: &str,
) -> Router {
    let state = RoutingApp { authorization, clock, admin_token_hash: Sha256::digest(admin_token.as_bytes()).into() };
    Router::new()
        .route("/admin/providers", get(providers_status))
        .route("/admin/partitions", get(partitions_owned))
        .route("/admin/providers/{name}/maintenance", post(add_maintenance))
        .route("/admin/routing/rules", get(get_rules).put(put_rules))
        .route("/admin/payments/{id}/routing", get(payment_routing))
        .layer(DefaultBodyLimit::max(BODY_BYTES_MAX))
        .with_state(state)
}

#[derive(Debug, Clone)]
struct RoutingApp {
    authorization: Arc<crate::authorization::AuthorizationService>,
    clock: Arc<dyn crate::Clock>,
    admin_token_hash: [u8; 32],
}

impl RoutingApp {
    fn operator(&self, headers: &HeaderMap) -> Result<(), ApiError> {
        check_admin_token(&self.admin_token_hash, headers)
    }
}

fn body_json<T: serde::de::DeserializeOwned>(
    headers: &HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<T, ApiError> {
    let body = post_body(headers, body)?;
    serde_json::from_slice(&body).map_err(|e| ApiError::invalid("body_invalid", "body", format!("invalid body: {e}")))
}

async fn providers_status(State(app): State<RoutingApp>, headers: HeaderMap) -> Response {
    json((|| {
        app.operator(&headers)?;
        let routing = app.authorization.routing();
        Ok(serde_json::json!({
            "object": "list",
            "rule_set_version": routing.rules().version,
            "data": routing.status(app.clock.now()),
        }))
    })())
}

/// The partitions of `payments.commands` this instance owns now (its share of the group).
async fn partitions_owned(State(app): State<RoutingApp>, headers: HeaderMap) -> Response {
    json((|| {
        app.operator(&headers)?;
        Ok(serde_json::json!({"object": "partitions", "data": app.authorization.partitions_owned()}))
    })())
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct MaintenanceBody {
    start: String,
    end: String,
    #[serde(default)]
    reason: String,
}

async fn add_maintenance(
    State(app): State<RoutingApp>,
    headers: HeaderMap,
    Path(name): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let result = async {
        app.operator(&headers)?;
        let b: MaintenanceBody = body_json(&headers, body)?;
        let start = kassa_domain::Timestamp::parse_rfc3339(&b.start)
            .map_err(|e| ApiError::invalid("parameter_invalid", "start", e))?;
        let end = kassa_domain::Timestamp::parse_rfc3339(&b.end)
            .map_err(|e| ApiError::invalid("parameter_invalid", "end", e))?;
        let window = kassa_domain::routing::maintenance::MaintenanceWindow {
            start_ms: start.unix_ms(),
            end_ms: end.unix_ms(),
            reason: if b.reason.is_empty() { "maintenance".into() } else { b.reason },
        };
        app.authorization.add_maintenance(&name, window).await.map_err(|e| {
            if e.starts_with("unknown provider") {
                ApiError::not_found("provider")
            } else {
                ApiError::invalid("parameter_invalid", "end", e)
            }
        })?;
        let status = app.authorization.routing().status(app.clock.now());
        let provider = status.into_iter().find(|p| p.name == name);
        Ok(Answer { status: 201, body: serde_json::json!(provider), replayed: false })
    };
    respond(result.await)
}

async fn get_rules(State(app): State<RoutingApp>, headers: HeaderMap) -> Response {
    json((|| {
        app.operator(&headers)?;
        Ok(serde_json::json!(*app.authorization.routing().rules()))
    })())
}

async fn put_rules(State(app): State<RoutingApp>, headers: HeaderMap, body: Result<Bytes, BytesRejection>) -> Response {
    let result = async {
        app.operator(&headers)?;
        let rules: kassa_domain::routing::RuleSet = body_json(&headers, body)?;
        let version =
            app.authorization.set_rules(rules).await.map_err(|e| ApiError::invalid("rules_invalid", "rules", e))?;
        Ok(Answer { status: 200, body: serde_json::json!({ "version": version }), replayed: false })
    };
    respond(result.await)
}

async fn payment_routing(State(app): State<RoutingApp>, headers: HeaderMap, Path(id): Path<String>) -> Response {
    json((|| {
        app.operator(&headers)?;
        let payment_id: kassa_domain::PaymentId = id.parse().map_err(|_| ApiError::not_found("payment"))?;
        let decisions = app.authorization.routing_decisions(payment_id).map_err(storage_error)?;
        Ok(serde_json::json!({ "object": "list", "data": decisions }))
    })())
}

/// The operator API of a service that runs as its own process (`kassa settle`,
/// `kassa reconcile`, `kassa authorize`): health and that service's views, all
/// behind the operator token — merchant API keys live with ingest, so a
/// merchant reads its payments there and an operator reads batches and
/// reports here, naming the merchant.
pub fn operator_router(
    settlement: Option<Arc<SettlementService>>,
    reconciliation: Option<Arc<ReconciliationService>>,
    ready: Arc<AtomicBool>,
    admin_token: &str,
) -> Router {
    let state = OperatorApp {
        settlement: settlement.clone(),
        reconciliation: reconciliation.clone(),
        ready,
        admin_token_hash: Sha256::digest(admin_token.as_bytes()).into(),
    };
    let mut router = Router::new().route("/healthz", get(operator_healthz));
    if settlement.is_some() {
        router = router
            .route("/admin/settlement/cutoff", post(operator_cutoff))
            .route("/admin/settlement/batches", get(operator_batches))
            .route("/admin/settlement/batches/{id}", get(operator_batch));
    }
    if reconciliation.is_some() {
        router = router.route("/admin/reconciliation/reports", get(operator_reports));
    }
    if settlement.is_some() || reconciliation.is_some() {
        router = router.route("/admin/partitions", get(operator_partitions));
    }
    router
        .fallback(|| async { error_response(&ApiError::not_found("route")) })
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(BODY_BYTES_MAX))
        .with_state(state)
}

#[derive(Debug, Clone)]
struct OperatorApp {
    settlement: Option<Arc<SettlementService>>,
    reconciliation: Option<Arc<ReconciliationService>>,
    ready: Arc<AtomicBool>,
    admin_token_hash: [u8; 32],
}

impl OperatorApp {
    fn settlement(&self, headers: &HeaderMap) -> Result<&Arc<SettlementService>, ApiError> {
        check_admin_token(&self.admin_token_hash, headers)?;
        here(&self.settlement)
    }

    fn reconciliation(&self, headers: &HeaderMap) -> Result<&Arc<ReconciliationService>, ApiError> {
        check_admin_token(&self.admin_token_hash, headers)?;
        here(&self.reconciliation)
    }
}

async fn operator_healthz(State(app): State<OperatorApp>) -> Response {
    health(&app.ready)
}

/// `?merchant=ID`, required: an operator names whose batches or reports to read.
fn merchant_param(
    query: Result<Query<HashMap<String, String>>, QueryRejection>,
) -> Result<kassa_domain::MerchantId, ApiError> {
    let Ok(Query(query)) = query else {
        return Err(ApiError::invalid("parameter_invalid", "query", "the query string does not parse"));
    };
    let text = query
        .get("merchant")
        .ok_or_else(|| ApiError::invalid("parameter_missing", "merchant", "name the merchant: ?merchant=mer_…"))?;
    kassa_domain::MerchantId::parse(text)
        .map_err(|e| ApiError::invalid("parameter_invalid", "merchant", format!("merchant {text:?}: {e}")))
}

async fn operator_cutoff(State(app): State<OperatorApp>, headers: HeaderMap) -> Response {
    let result = async { cutoff_now(app.settlement(&headers)?).await };
    respond(result.await)
}

async fn operator_batches(
    State(app): State<OperatorApp>,
    headers: HeaderMap,
    query: Result<Query<HashMap<String, String>>, QueryRejection>,
) -> Response {
    json((|| batches_of(app.settlement(&headers)?, merchant_param(query)?))())
}

async fn operator_batch(State(app): State<OperatorApp>, headers: HeaderMap, Path(id): Path<String>) -> Response {
    json((|| batch_of(app.settlement(&headers)?, &id, None))())
}

/// The partitions this instance owns: of `settlement.entries` (a settler), or
/// of `settlement.events` (a reconciler).
async fn operator_partitions(State(app): State<OperatorApp>, headers: HeaderMap) -> Response {
    json((|| {
        let owned = match app.settlement.as_ref() {
            Some(_) => app.settlement(&headers)?.partitions_owned(),
            None => app.reconciliation(&headers)?.partitions_owned(),
        };
        Ok(serde_json::json!({"object": "partitions", "data": owned}))
    })())
}

async fn operator_reports(
    State(app): State<OperatorApp>,
    headers: HeaderMap,
    query: Result<Query<HashMap<String, String>>, QueryRejection>,
) -> Response {
    json((|| reports_of(app.reconciliation(&headers)?, merchant_param(query)?))())
}
