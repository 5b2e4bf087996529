//! Routing against the real `kassa up` over HTTP, with the simulated
//! acquirers' faults injected through the control API: failover when a
//! provider goes down, no double authorization when one times out after
//! accepting, maintenance windows, rules changed without a restart.

mod common;

use common::*;
use std::collections::HashMap;
use std::sync::Arc;

/// Pay `count` times from `threads` threads; the final payments.
fn load(kassa: &Arc<Kassa>, count: usize, threads: usize, number: &'static str) -> Vec<serde_json::Value> {
    let handles: Vec<_> = (0..threads)
        .map(|t| {
            let kassa = Arc::clone(kassa);
            std::thread::spawn(move || {
                (t..count)
                    .step_by(threads)
                    .map(|i| kassa.pay_and_settle(&pay(number, 1000 + i as i64, true)))
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    handles.into_iter().flat_map(|h| h.join().unwrap()).collect()
}

fn authorized(payments: &[serde_json::Value]) -> usize {
    payments.iter().filter(|p| p["status"] == "captured" || p["status"] == "authorized").count()
}

/// Every provider's ledger: payment id → authorizations standing for it.
fn standing_authorizations(kassa: &Kassa) -> HashMap<String, Vec<(String, String)>> {
    let mut standing: HashMap<String, Vec<(String, String)>> = HashMap::new();
    for provider in ["acq-alpha", "acq-beta", "acq-gamma"] {
        let (status, ledger) = kassa.operator("GET", &format!("/sim/{provider}/ledger"), None);
        assert_eq!(status, 200, "{ledger}");
        for row in ledger["data"].as_array().unwrap() {
            if row["state"] != "reversed" {
                standing
                    .entry(row["payment_id"].as_str().unwrap().to_owned())
                    .or_default()
                    .push((provider.to_owned(), row["attempt_id"].as_str().unwrap().to_owned()));
            }
        }
    }
    standing
}

fn provider<'a>(status: &'a serde_json::Value, name: &str) -> &'a serde_json::Value {
    status["data"].as_array().unwrap().iter().find(|p| p["name"] == name).unwrap()
}

#[test]
fn a_provider_down_mid_load_keeps_the_authorization_rate() {
    let dir = tempfile::tempdir().unwrap();
    let kassa = Arc::new(Kassa::start(dir.path()));
    let baseline = load(&kassa, 150, 6, "4242424242424242");
    let baseline_rate = authorized(&baseline) * 10_000 / baseline.len();

    let (status, answer) = kassa.operator("POST", "/sim/acq-alpha/faults", Some(r#"{"mode": "down"}"#));
    assert_eq!(status, 200, "{answer}");
    let faulted = load(&kassa, 150, 6, "4242424242424242");
    let faulted_rate = authorized(&faulted) * 10_000 / faulted.len();
    assert!(
        faulted_rate + 100 >= baseline_rate,
        "authorization rate fell from {baseline_rate} bp to {faulted_rate} bp with one provider down"
    );
    // The breaker saw it and opened; the others took the traffic.
    let (_, status) = kassa.operator("GET", "/admin/providers", None);
    assert_eq!(provider(&status, "acq-alpha")["breaker"]["state"], "open", "{status}");
    let failed_over = faulted.iter().filter(|p| p["provider"] != "acq-alpha").count();
    assert_eq!(failed_over, faulted.len(), "every payment after the fault was authorized elsewhere");
    // Every decision is recorded with its inputs.
    let id = faulted[0]["id"].as_str().unwrap();
    let (status, decisions) = kassa.operator("GET", &format!("/admin/payments/{id}/routing"), None);
    assert_eq!(status, 200);
    let decisions = decisions["data"].as_array().unwrap();
    assert!(!decisions.is_empty());
    assert!(decisions[0]["input"]["providers"].as_array().is_some_and(|p| p.len() == 3), "{decisions:?}");
    // No payment holds two authorizations anywhere.
    for (payment, holds) in standing_authorizations(&kassa) {
        assert_eq!(holds.len(), 1, "payment {payment} is authorized {} times: {holds:?}", holds.len());
    }
    kassa.operator("DELETE", "/sim/acq-alpha/faults", None);
}

#[test]
fn timeout_after_accept_never_authorizes_a_payment_twice() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("kassa.toml");
    std::fs::write(&config, "provider_timeout_ms = 300\n").unwrap();
    let kassa = Arc::new(Kassa::start_with(&dir.path().join("data"), &["--config", config.to_str().unwrap()]));
    let (status, _) =
        kassa.operator("POST", "/sim/acq-alpha/faults", Some(r#"{"mode": "timeout_after_accept", "rate": 0.5}"#));
    assert_eq!(status, 200);
    let payments = load(&kassa, 60, 6, "4242424242424242");
    assert_eq!(authorized(&payments), payments.len(), "each payment ends authorized exactly once");
    let standing = standing_authorizations(&kassa);
    for payment in &payments {
        let id = payment["id"].as_str().unwrap();
        let holds = standing.get(id).cloned().unwrap_or_default();
        assert_eq!(holds.len(), 1, "payment {id}: {holds:?}");
        assert_eq!(
            holds[0].0,
            payment["provider"].as_str().unwrap(),
            "the standing authorization is the one Kassa used"
        );
    }
    kassa.operator("DELETE", "/sim/acq-alpha/faults", None);
}

#[test]
fn maintenance_and_rules_change_routing_without_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let kassa = Arc::new(Kassa::start(dir.path()));
    let now_ms = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as i64;
    let rfc3339 = |ms: i64| kassa_domain::Timestamp(ms).to_string();
    let window = format!(
        r#"{{"start": "{}", "end": "{}", "reason": "card network upgrade"}}"#,
        rfc3339(now_ms - 1000),
        rfc3339(now_ms + 3_600_000)
    );
    let (status, answer) = kassa.operator("POST", "/admin/providers/acq-alpha/maintenance", Some(&window));
    assert_eq!(status, 201, "{answer}");
    assert_eq!(answer["maintenance"]["status"], "in_maintenance", "{answer}");
    let payments = load(&kassa, 20, 4, "4242424242424242");
    assert!(payments.iter().all(|p| p["provider"] == "acq-beta"), "nothing goes to a provider in maintenance");
    let (status, bad) =
        kassa.operator("POST", "/admin/providers/acq-alpha/maintenance", Some(r#"{"start": "soon", "end": "later"}"#));
    assert_eq!((status, bad["error"]["param"].as_str()), (400, Some("start")), "{bad}");
    let (status, _) = kassa.operator("POST", "/admin/providers/acq-nobody/maintenance", Some(&window));
    assert_eq!(status, 404);

    // New rules: everything to gamma first. In effect at once, with a new version.
    let rules = r#"{"version": 1, "rules": [], "fallback": [{"provider": "acq-gamma"}, {"provider": "acq-beta", "priority": 1}]}"#;
    let (status, answer) = kassa.operator("PUT", "/admin/routing/rules", Some(rules));
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["version"], 1);
    let payments = load(&kassa, 10, 2, "4242424242424242");
    assert!(payments.iter().all(|p| p["provider"] == "acq-gamma"), "{payments:?}");
    let (status, bad) =
        kassa.operator("PUT", "/admin/routing/rules", Some(r#"{"fallback": [{"provider": "acq-nobody"}]}"#));
    assert_eq!(status, 400);
    assert!(bad["error"]["message"].as_str().unwrap().contains("acq-nobody"), "{bad}");
    let (_, status) = kassa.operator("GET", "/admin/providers", None);
    assert_eq!(status["rule_set_version"], 1, "a refused rule set changes nothing");
    // Without the token, nothing.
    let (status, _, _) = kassa.call("GET", "/admin/providers", None, &[]);
    assert_eq!(status, 401);
}
