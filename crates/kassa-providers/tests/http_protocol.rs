//! The provider HTTP protocol end to end: a simulator on a loopback port, the
//! HTTP connector, and the fault-injection control API.

use kassa_domain::*;
use kassa_providers::http_sim::{control_router, protocol_router, serve};
use kassa_providers::*;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

const DEADLINE: Duration = Duration::from_millis(400);
const TOKEN: &str = "test-admin-token";

fn request(attempt: u128, number: &str) -> AuthorizeRequest {
    let now = Timestamp::from_unix_ms(1_795_651_200_000);
    AuthorizeRequest {
        attempt_id: AttemptId::from_u128(attempt),
        payment_id: PaymentId::from_u128(attempt + 1000),
        merchant_id: MerchantId::from_u128(1),
        amount: Money::new(1999, Currency::from_code("EUR").unwrap()),
        card: CardDetails::parse(number, 12, 2030, "123", now).unwrap(),
    }
}

struct World {
    sim: Arc<SimulatedAcquirer>,
    connector: HttpConnector,
    base: String,
    http: reqwest::Client,
    _stop: watch::Sender<bool>,
}

async fn world() -> World {
    let config = SimulatorConfig { latency_ms_min: 1, latency_ms_max: 3, seed: 7 };
    let sim = Arc::new(SimulatedAcquirer::new("acq-test", config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let router = protocol_router(Arc::clone(&sim)).merge(control_router(vec![Arc::clone(&sim)], TOKEN));
    let (stop, stopped) = watch::channel(false);
    tokio::spawn(serve(Arc::clone(&sim), listener, router, stopped));
    let connector = HttpConnector::new("acq-test", base.clone()).unwrap();
    World { sim, connector, base, http: reqwest::Client::new(), _stop: stop }
}

impl World {
    async fn control(&self, method: reqwest::Method, path: &str, body: Option<&str>) -> (u16, serde_json::Value) {
        let mut request = self.http.request(method, format!("{}{path}", self.base)).bearer_auth(TOKEN);
        if let Some(body) = body {
            request = request.header("content-type", "application/json").body(body.to_owned());
        }
        let response = request.send().await.unwrap();
        let status = response.status().as_u16();
        let text = response.text().await.unwrap();
        (status, serde_json::from_str(&text).unwrap_or(serde_json::Value::Null))
    }
}

#[tokio::test]
async fn the_whole_lifecycle_over_http() {
    let w = world().await;
    let c = &w.connector;
    let eur = |minor| Money::new(minor, Currency::from_code("EUR").unwrap());
    let approved = c.authorize(request(1, "4242424242424242"), DEADLINE).await.unwrap();
    assert!(matches!(approved, AuthorizeOutcome::Approved { .. }));
    assert_eq!(
        c.authorize(request(2, "4000000000000002"), DEADLINE).await.unwrap(),
        AuthorizeOutcome::Declined {
            code: "do_not_honor".into(),
            category: DeclineCategory::Hard,
            merchant_advice_code: None
        }
    );
    assert!(matches!(c.inquire(AttemptId::from_u128(1), DEADLINE).await, Ok(AttemptStatus::Authorized { .. })));
    assert_eq!(c.inquire(AttemptId::from_u128(99), DEADLINE).await, Ok(AttemptStatus::NotFound));
    c.capture(AttemptId::from_u128(1), CaptureId::from_u128(11), eur(1999), DEADLINE).await.unwrap();
    c.capture(AttemptId::from_u128(1), CaptureId::from_u128(11), eur(1999), DEADLINE).await.unwrap(); // idempotent
    c.refund(AttemptId::from_u128(1), RefundId::from_u128(12), eur(500), DEADLINE).await.unwrap();
    let refused = c.refund(AttemptId::from_u128(1), RefundId::from_u128(13), eur(5000), DEADLINE).await;
    assert!(matches!(refused, Err(ProviderError::Refused { .. })), "{refused:?}");
    let report = c.settlement_report(&[11, 12, 404], DEADLINE).await.unwrap();
    assert_eq!(report.len(), 2);
    let (status, ledger) = w.control(reqwest::Method::GET, "/sim/acq-test/ledger", None).await;
    assert_eq!(status, 200);
    let rows = ledger["data"].as_array().unwrap();
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0]["state"], "captured");
    assert_eq!(rows[0]["amount"], 1999);
    assert_eq!(rows[0]["payment_id"], PaymentId::from_u128(1001).to_string());
}

#[tokio::test]
async fn down_refuses_connections_and_comes_back() {
    let w = world().await;
    w.connector.authorize(request(1, "4242424242424242"), DEADLINE).await.unwrap(); // a pooled connection exists
    let (status, _) = w.control(reqwest::Method::POST, "/sim/acq-test/faults", Some(r#"{"mode":"down"}"#)).await;
    assert_eq!(status, 200);
    // The control API shares the port in this test, so clear the fault by hand.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let result = w.connector.authorize(request(2, "4242424242424242"), DEADLINE).await;
    assert!(matches!(result, Err(ProviderError::Unavailable { .. })), "down must be a refused connection: {result:?}");
    assert_eq!(w.sim.ledger().len(), 1, "a refused call never reached the provider");
    w.sim.set_fault(None);
    let mut back = false;
    for _ in 0..50 {
        if w.connector.authorize(request(3, "4242424242424242"), DEADLINE).await.is_ok() {
            back = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(back, "the port reopens when the fault clears");
}

#[tokio::test]
async fn timeout_after_accept_is_unknown_and_inquiry_finds_it() {
    let w = world().await;
    let (status, _) =
        w.control(reqwest::Method::POST, "/sim/acq-test/faults", Some(r#"{"mode":"timeout_after_accept"}"#)).await;
    assert_eq!(status, 200);
    let result = w.connector.authorize(request(1, "4242424242424242"), DEADLINE).await;
    assert!(matches!(result, Err(ProviderError::Timeout { .. })), "{result:?}");
    let (status, _) = w.control(reqwest::Method::DELETE, "/sim/acq-test/faults", None).await;
    assert_eq!(status, 204);
    assert!(matches!(
        w.connector.inquire(AttemptId::from_u128(1), DEADLINE).await,
        Ok(AttemptStatus::Authorized { .. })
    ));
}

#[tokio::test]
async fn error_and_soft_decline_burst() {
    let w = world().await;
    w.control(reqwest::Method::POST, "/sim/acq-test/faults", Some(r#"{"mode":"error","rate":1.0}"#)).await;
    let result = w.connector.authorize(request(1, "4242424242424242"), DEADLINE).await;
    assert!(matches!(result, Err(ProviderError::Unavailable { .. })), "a 503 means it did not act: {result:?}");
    w.control(reqwest::Method::POST, "/sim/acq-test/faults", Some(r#"{"mode":"soft_decline_burst"}"#)).await;
    assert_eq!(
        w.connector.authorize(request(2, "4242424242424242"), DEADLINE).await.unwrap(),
        AuthorizeOutcome::Declined {
            code: "issuer_unavailable".into(),
            category: DeclineCategory::Soft,
            merchant_advice_code: None
        }
    );
    w.control(reqwest::Method::POST, "/sim/acq-test/faults", Some(r#"{"mode":"error","rate":0.0}"#)).await;
    assert!(w.connector.authorize(request(3, "4242424242424242"), DEADLINE).await.is_ok(), "rate 0 hits nothing");
    assert!(w.sim.calls() >= 3);
}

#[tokio::test]
async fn a_timed_fault_clears_by_itself() {
    let w = world().await;
    w.control(reqwest::Method::POST, "/sim/acq-test/faults", Some(r#"{"mode":"error","duration_s":1}"#)).await;
    assert!(w.connector.authorize(request(1, "4242424242424242"), DEADLINE).await.is_err());
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert!(w.connector.authorize(request(2, "4242424242424242"), DEADLINE).await.is_ok());
}

#[tokio::test]
async fn the_control_api_refuses_bad_requests_clearly() {
    let w = world().await;
    let anonymous = w.http.post(format!("{}/sim/acq-test/faults", w.base)).body("{}").send().await.unwrap();
    assert_eq!(anonymous.status().as_u16(), 401);
    for (body, says) in [
        (r#"{"mode":"exploded"}"#, "mode"),
        (r#"{"mode":"slow","rate":1.5}"#, "rate"),
        (r#"{"mode":"slow","duration_s":0}"#, "duration_s"),
        (r#"{"mode":"slow","colour":"red"}"#, "colour"),
        ("not json", "JSON"),
    ] {
        let (status, answer) = w.control(reqwest::Method::POST, "/sim/acq-test/faults", Some(body)).await;
        assert_eq!(status, 400, "{body}");
        let message = answer["error"]["message"].as_str().unwrap_or_default().to_owned();
        assert!(message.contains(says), "{body}: {message}");
    }
    let (status, _) = w.control(reqwest::Method::GET, "/sim/nobody/ledger", None).await;
    assert_eq!(status, 404);
    // The protocol refuses a malformed authorization without acting.
    let bad = w
        .http
        .post(format!("{}/v1/authorizations", w.base))
        .header("content-type", "application/json")
        .body(r#"{"attempt_id":"att_x"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status().as_u16(), 400);
    assert!(w.sim.ledger().is_empty());
}

#[tokio::test]
async fn a_refused_authorization_is_unknown_not_did_not_act() {
    let w = world().await;
    // A card the simulator refuses with 400 (expired by its clock): the connector
    // cannot tell that from a proxy's or a rate limiter's 4xx, so it is unknown.
    let mut stale = request(1, "4242424242424242");
    stale.card =
        CardDetails::parse("4242424242424242", 1, 2020, "123", Timestamp::from_unix_ms(1_577_836_800_000)).unwrap();
    let result = w.connector.authorize(stale, DEADLINE).await;
    assert!(matches!(result, Err(ProviderError::Timeout { .. })), "{result:?}");
    assert!(w.sim.ledger().is_empty());
}
