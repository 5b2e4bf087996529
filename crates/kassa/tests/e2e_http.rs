//! End to end against the real `kassa up` binary over real HTTP: the payments
//! API's contract, and durability through SIGKILL.

mod common;

use common::*;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};
#[test]
fn the_payments_api_over_http() {
    let dir = tempfile::tempdir().unwrap();
    let kassa = Kassa::start(dir.path());

    let (status, _, payment) = kassa.call("POST", "/v1/payments", Some(&pay("4242424242424242", 1999, true)), &[]);
    assert_eq!(status, 200, "{payment}");
    assert_eq!(payment["status"], "captured");
    assert_eq!(payment["amount_captured"], 1999);
    assert_eq!(payment["card"]["last4"], "4242");
    assert!(!payment.to_string().contains("4242424242424242"), "no full card number in a response");
    let id = payment["id"].as_str().unwrap().to_owned();
    assert!(id.starts_with("pay_"));

    for (number, code, attempts) in [
        ("4000000000000002", "do_not_honor", 1),
        ("4000000000009995", "insufficient_funds", 1),
        ("4000000000000119", "providers_unavailable", 3),
    ] {
        let (status, headers, answer) = kassa.call("POST", "/v1/payments", Some(&pay(number, 500, true)), &[]);
        let declined = if code == "providers_unavailable" {
            // No provider could take it: a clear error to retry later, with the declined payment.
            assert_eq!(status, 503, "{answer}");
            assert_eq!(answer["error"]["code"], "providers_unavailable");
            assert!(headers.iter().any(|(k, _)| k == "retry-after"), "{headers:?}");
            answer["payment"].clone()
        } else {
            assert_eq!(status, 200);
            answer
        };
        assert_eq!(declined["status"], "declined", "{declined}");
        assert_eq!(declined["decline_code"], code);
        let path = format!("/v1/payments/{}/events", declined["id"].as_str().unwrap());
        let (_, _, events) = kassa.call("GET", &path, None, &[]);
        let started =
            events["data"].as_array().unwrap().iter().filter(|e| e["type"] == "payment.authorization_started").count();
        assert_eq!(started, attempts, "{code}");
    }
    // A processing error at the first acquirer, then the next one approves.
    let (status, _, failed_over) = kassa.call("POST", "/v1/payments", Some(&pay("4000000000000127", 500, true)), &[]);
    assert_eq!((status, failed_over["status"].as_str()), (200, Some("captured")), "{failed_over}");
    assert_eq!(failed_over["provider"], "acq-beta", "{failed_over}");
    let path = format!("/v1/payments/{}/events", failed_over["id"].as_str().unwrap());
    let (_, _, events) = kassa.call("GET", &path, None, &[]);
    let started =
        events["data"].as_array().unwrap().iter().filter(|e| e["type"] == "payment.authorization_started").count();
    assert_eq!(started, 2, "{events}");

    // Authorize only, capture part, refund part, refuse what is not allowed.
    let (_, _, held) = kassa.call("POST", "/v1/payments", Some(&pay("5555555555554444", 1000, false)), &[]);
    assert_eq!(held["status"], "authorized");
    let base = format!("/v1/payments/{}", held["id"].as_str().unwrap());
    let (status, _, captured) = kassa.call("POST", &format!("{base}/capture"), Some(r#"{"amount": 600}"#), &[]);
    assert_eq!((status, captured["amount_captured"].as_i64()), (200, Some(600)), "{captured}");
    let (status, _, refunded) = kassa.call("POST", &format!("{base}/refunds"), Some(r#"{"amount": 200}"#), &[]);
    assert_eq!((status, refunded["amount_refunded"].as_i64()), (200, Some(200)), "{refunded}");
    let (status, _, error) = kassa.call("POST", &format!("{base}/refunds"), Some(r#"{"amount": 401}"#), &[]);
    assert_eq!((status, error["error"]["code"].as_str()), (400, Some("amount_too_large")), "{error}");
    let (status, _, error) = kassa.call("POST", &format!("{base}/void"), None, &[]);
    assert_eq!((status, error["error"]["code"].as_str()), (409, Some("payment_state_conflict")), "{error}");
    // Captured in full: another capture is a conflict with the state, not a bad amount.
    let full = kassa.pay_and_settle(&pay("4242424242424242", 500, true));
    assert_eq!(full["status"], "captured", "{full}");
    let full_base = format!("/v1/payments/{}", full["id"].as_str().unwrap());
    let (status, _, error) = kassa.call("POST", &format!("{full_base}/capture"), Some("{}"), &[]);
    assert_eq!((status, error["error"]["code"].as_str()), (409, Some("payment_state_conflict")), "{error}");
    assert!(error["error"]["message"].as_str().unwrap().contains("nothing is left to capture"), "{error}");
    let (_, _, events) = kassa.call("GET", &format!("{base}/events"), None, &[]);
    let types: Vec<&str> = events["data"].as_array().unwrap().iter().map(|e| e["type"].as_str().unwrap()).collect();
    assert_eq!(
        &types[..5],
        [
            "payment.requested",
            "payment.authorization_started",
            "payment.authorized",
            "payment.captured",
            "payment.refunded"
        ]
    );

    // Idempotency: same key and body replays; same key, other body is refused.
    let headers = [("Idempotency-Key", "order-77")];
    let (status, _, first) = kassa.call("POST", "/v1/payments", Some(&pay("4242424242424242", 777, true)), &headers);
    assert_eq!(status, 200);
    let (status, replay_headers, again) =
        kassa.call("POST", "/v1/payments", Some(&pay("4242424242424242", 777, true)), &headers);
    assert_eq!((status, &again), (200, &first));
    assert!(replay_headers.iter().any(|(k, v)| k == "idempotent-replayed" && v == "true"));
    let (status, _, error) = kassa.call("POST", "/v1/payments", Some(&pay("4242424242424242", 778, true)), &headers);
    assert_eq!((status, error["error"]["code"].as_str()), (409, Some("idempotency_key_reused")));
    // A request refused for its input keeps no answer under its key: corrected, it goes through.
    let headers = [("Idempotency-Key", "order-78")];
    for _ in 0..2 {
        let (status, replayed, error) =
            kassa.call("POST", "/v1/payments", Some(&pay("4242424242424241", 780, true)), &headers);
        assert_eq!((status, error["error"]["param"].as_str()), (400, Some("card[number]")), "{error}");
        assert!(!replayed.iter().any(|(k, _)| k == "idempotent-replayed"), "a refusal was replayed");
    }
    let (status, _, fixed) = kassa.call("POST", "/v1/payments", Some(&pay("4242424242424242", 780, true)), &headers);
    assert_eq!((status, fixed["status"].as_str()), (200, Some("captured")), "{fixed}");

    // A known path with a method it does not take: 405, in the error shape, with Allow.
    let (status, headers, error) = kassa.call("DELETE", "/v1/payments", None, &[]);
    assert_eq!((status, error["error"]["code"].as_str()), (405, Some("method_not_allowed")), "{error}");
    assert!(headers.iter().any(|(k, v)| k == "allow" && v.contains("POST")), "{headers:?}");

    // Listing: newest first, paged.
    let (status, _, page) = kassa.call("GET", "/v1/payments?limit=2", None, &[]);
    assert_eq!(status, 200);
    assert_eq!(page["data"].as_array().unwrap().len(), 2);
    assert_eq!(page["data"][0]["id"], fixed["id"]);
    assert_eq!(page["has_more"], true);
    // The next page starts right after the cursor.
    let ids = |page: &serde_json::Value| -> Vec<String> {
        page["data"].as_array().unwrap().iter().map(|p| p["id"].as_str().unwrap().to_owned()).collect()
    };
    let (_, _, all) = kassa.call("GET", "/v1/payments?limit=100", None, &[]);
    let cursor = &ids(&page)[1];
    let (status, _, next) = kassa.call("GET", &format!("/v1/payments?limit=2&starting_after={cursor}"), None, &[]);
    assert_eq!(status, 200, "{next}");
    assert_eq!(ids(&next), ids(&all)[2..4].to_vec());
    let (status, _, error) = kassa.call("GET", "/v1/payments?starting_after=pay_01M8SVE94KRM3B6A0G091YXR3D", None, &[]);
    assert_eq!((status, error["error"]["param"].as_str()), (400, Some("starting_after")), "{error}");
    assert_eq!(error["error"]["code"], "resource_missing", "{error}");

    // Bad input: clear errors, nothing written.
    let (status, _, error) = kassa.call("POST", "/v1/payments", Some(r#"{"amount": 19.99, "currency": "EUR"}"#), &[]);
    assert_eq!((status, error["error"]["param"].as_str()), (400, Some("amount")));
    let (status, _, _) = kassa.call("GET", &format!("/v1/payments/{}", "pay_00000000000000000000000000"), None, &[]);
    assert_eq!(status, 404);
    let (status, _, _) = kassa.call("GET", "/v1/payments/not-an-id", None, &[]);
    assert_eq!(status, 404);
    let (status, _, _) = {
        let r = request(&kassa.addr, "GET", "/v1/payments", None, &[], b"").unwrap();
        (r.0, r.1, r.2)
    };
    assert_eq!(status, 401);
    let r = request(
        &kassa.addr,
        "POST",
        "/v1/payments",
        Some("text/plain"),
        &[("Authorization", &format!("Bearer {}", kassa.key))],
        b"{}",
    )
    .unwrap();
    assert_eq!(r.0, 415);
    let big = vec![b' '; 70 * 1024];
    let r = request(
        &kassa.addr,
        "POST",
        "/v1/payments",
        Some("application/json"),
        &[("Authorization", &format!("Bearer {}", kassa.key))],
        &big,
    )
    .unwrap();
    assert_eq!(r.0, 413);

    // SIGTERM: a clean stop, exit 0; and the data is still there after a restart.
    assert!(kassa.terminate().success());
    let kassa = Kassa::start(dir.path());
    let (status, _, again) = kassa.call("GET", &format!("/v1/payments/{id}"), None, &[]);
    assert_eq!((status, again["status"].as_str()), (200, Some("captured")));
    kassa.kill();
}

#[test]
fn a_payment_answered_2xx_survives_sigkill() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    let dir = tempfile::tempdir().unwrap();
    let kassa = Kassa::start(dir.path());
    let addr = kassa.addr.clone();
    let key = kassa.key.clone();
    let answered_count = Arc::new(AtomicUsize::new(0));
    // Four clients send payments one after another; Kassa is killed while they still do,
    // so some requests (and their authorizations) are in flight at the kill.
    let clients: Vec<_> = (0..4)
        .map(|c| {
            let (addr, key, answered_count) = (addr.clone(), key.clone(), Arc::clone(&answered_count));
            std::thread::spawn(move || {
                let (mut answered, mut unanswered) = (Vec::new(), Vec::new());
                for i in 0..40 {
                    let card = if (c + i) % 5 == 0 { "4000000000000002" } else { "4242424242424242" };
                    let body = pay(card, 100 + i, i % 2 == 0);
                    let auth = format!("Bearer {key}");
                    let idem = format!("c{c}-{i}");
                    let headers = [("Authorization", auth.as_str()), ("Idempotency-Key", idem.as_str())];
                    match request(&addr, "POST", "/v1/payments", Some("application/json"), &headers, body.as_bytes()) {
                        // (A body cut off by the kill does not parse: that one counts as unanswered.)
                        Ok(r)
                            if (200..300).contains(&r.0)
                                && serde_json::from_slice::<serde_json::Value>(&r.2).is_ok() =>
                        {
                            let json: serde_json::Value = serde_json::from_slice(&r.2).unwrap();
                            let (id, status) = (json["id"].as_str().unwrap(), json["status"].as_str().unwrap());
                            answered.push((id.to_owned(), status.to_owned(), idem, body));
                            answered_count.fetch_add(1, Ordering::SeqCst);
                        }
                        // Killed mid-request (or refused after): it may or may not have been taken.
                        _ => {
                            unanswered.push((idem, body));
                            break;
                        }
                    }
                }
                (answered, unanswered)
            })
        })
        .collect();
    let started = Instant::now();
    while answered_count.load(Ordering::SeqCst) < 40 {
        assert!(started.elapsed() < Duration::from_secs(60), "the clients got no answers");
        std::thread::sleep(Duration::from_millis(5));
    }
    // No warning, no flush, requests in flight.
    kassa.kill();
    let mut answered = Vec::new();
    let mut unanswered = Vec::new();
    for client in clients {
        let (a, u) = client.join().unwrap();
        answered.extend(a);
        unanswered.extend(u);
    }
    assert!(answered.len() >= 40);
    // Each client is always mid-request, so the kill cuts some off.
    assert!(!unanswered.is_empty(), "no request was in flight at the kill");

    let kassa = Kassa::start(dir.path());
    let resolved = |id: &str| {
        // A payment still processing when killed resolves to one outcome.
        let started = Instant::now();
        loop {
            let (code, _, payment) = kassa.call("GET", &format!("/v1/payments/{id}"), None, &[]);
            if code == 200 && payment["status"] != "processing" {
                break payment;
            }
            assert!(started.elapsed() < Duration::from_secs(30), "{id} did not resolve: {code} {payment}");
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    let one_story = |id: &str| {
        let (_, _, events) = kassa.call("GET", &format!("/v1/payments/{id}/events"), None, &[]);
        let count = |kind: &str| events["data"].as_array().unwrap().iter().filter(|e| e["type"] == kind).count();
        assert_eq!(count("payment.requested"), 1, "{id}: {events}");
        assert_eq!(count("payment.authorized") + count("payment.declined"), 1, "{id}: one outcome, {events}");
        assert!(count("payment.captured") <= 1, "{id} captured twice: {events}");
    };
    for (id, status, idem, body) in &answered {
        let after = resolved(id);
        if status != "processing" {
            assert_eq!(after["status"].as_str(), Some(status.as_str()), "{id} changed across the crash");
        }
        one_story(id);
        // A client retrying after the crash gets the same payment, never a second one.
        let (code, _, again) = kassa.call("POST", "/v1/payments", Some(body), &[("Idempotency-Key", idem)]);
        assert!((200..300).contains(&code), "retry of {idem}: {code}");
        assert_eq!(again["id"].as_str(), Some(id.as_str()), "retry of {idem}");
    }
    // A request cut off by the kill, sent again with its key: one payment, whether or not
    // the first one had been taken.
    for (idem, body) in &unanswered {
        let (code, _, payment) = kassa.call("POST", "/v1/payments", Some(body), &[("Idempotency-Key", idem)]);
        assert!((200..300).contains(&code), "retry of {idem}: {code} {payment}");
        let id = payment["id"].as_str().unwrap();
        resolved(id);
        one_story(id);
    }
    let mut listed = 0;
    let mut after = String::new();
    loop {
        let (_, _, page) = kassa.call("GET", &format!("/v1/payments?limit=100{after}"), None, &[]);
        let data = page["data"].as_array().unwrap();
        listed += data.len();
        match data.last() {
            Some(last) if page["has_more"] == true => {
                after = format!("&starting_after={}", last["id"].as_str().unwrap())
            }
            _ => break,
        }
    }
    assert_eq!(listed, answered.len() + unanswered.len(), "no payment was created twice");
    assert!(kassa.terminate().success());
    for service in ["ingest", "authorization"] {
        let output = Command::new(env!("CARGO_BIN_EXE_kassa"))
            .args(["log", "verify", "--path"])
            .arg(dir.path().join(service))
            .output()
            .unwrap();
        assert!(output.status.success(), "{service}: {}", String::from_utf8_lossy(&output.stderr));
    }
}

fn create_merchant(dir: &Path, name: &str) -> String {
    let output = Command::new(env!("CARGO_BIN_EXE_kassa"))
        .args(["merchant", "create", name, "--data-dir"])
        .arg(dir)
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let text = String::from_utf8(output.stdout).unwrap();
    text.split_whitespace().find(|w| w.starts_with("sk_")).expect("a key is printed").to_owned()
}

#[test]
fn merchants_are_created_running_or_stopped_and_see_only_their_own_payments() {
    let dir = tempfile::tempdir().unwrap();
    let kassa = Kassa::start(dir.path());
    let (_, _, demo_payment) = kassa.call("POST", "/v1/payments", Some(&pay("4242424242424242", 100, true)), &[]);

    // While kassa up holds the data directory: through its admin API.
    let other = Kassa {
        key: create_merchant(dir.path(), "Other Shop"),
        addr: kassa.addr.clone(),
        child: Command::new("true").spawn().unwrap(),
        admin: String::new(),
    };
    let (status, _, own) = other.call("POST", "/v1/payments", Some(&pay("4242424242424242", 200, true)), &[]);
    assert_eq!((status, own["status"].as_str()), (200, Some("captured")));
    let (status, _, _) =
        other.call("GET", &format!("/v1/payments/{}", demo_payment["id"].as_str().unwrap()), None, &[]);
    assert_eq!(status, 404, "another merchant's payment does not exist for you");
    let (_, _, list) = other.call("GET", "/v1/payments", None, &[]);
    assert_eq!(list["data"].as_array().unwrap().len(), 1);
    let (status, _, _) = kassa.call("POST", "/admin/merchants", Some(r#"{"name": "x"}"#), &[]);
    assert_eq!(status, 401, "a merchant key is not the operator token");
    assert!(kassa.terminate().success());

    // While stopped: straight into the log.
    let third_key = create_merchant(dir.path(), "Third");
    let kassa = Kassa::start(dir.path());
    let third = Kassa {
        key: third_key,
        addr: kassa.addr.clone(),
        child: Command::new("true").spawn().unwrap(),
        admin: String::new(),
    };
    let (status, _, _) = third.call("GET", "/v1/payments", None, &[]);
    assert_eq!(status, 200);
    kassa.kill();

    let missing = Command::new(env!("CARGO_BIN_EXE_kassa"))
        .args(["merchant", "create", "x", "--data-dir", "/nonexistent/kassa"])
        .output()
        .unwrap();
    assert!(!missing.status.success());
    assert!(String::from_utf8_lossy(&missing.stderr).contains("no Kassa data directory"));
}

#[test]
fn settlement_cutoff_over_http() {
    let dir = tempfile::tempdir().unwrap();
    let kassa = Kassa::start(dir.path());
    let mut ids = Vec::new();
    for amount in [1999, 1000] {
        let (_, _, payment) = kassa.call("POST", "/v1/payments", Some(&pay("4242424242424242", amount, true)), &[]);
        assert_eq!(payment["status"], "captured");
        ids.push(payment["id"].as_str().unwrap().to_owned());
    }
    let (status, _, _) =
        kassa.call("POST", &format!("/v1/payments/{}/refunds", ids[1]), Some(r#"{"amount": 300}"#), &[]);
    assert_eq!(status, 200);
    let admin = std::fs::read_to_string(dir.path().join("admin.token")).unwrap().trim().to_owned();
    let operator = Kassa {
        key: String::new(),
        addr: kassa.addr.clone(),
        child: Command::new("true").spawn().unwrap(),
        admin: String::new(),
    };
    let cut = |token: &str| {
        let auth = format!("Bearer {token}");
        let r = request(&operator.addr, "POST", "/admin/settlement/cutoff", None, &[("Authorization", &auth)], b"")
            .unwrap();
        (r.0, serde_json::from_slice::<serde_json::Value>(&r.2).unwrap_or_default())
    };
    assert_eq!(cut(&kassa.key).0, 401, "a merchant key cannot cut off");
    // Settlement follows the events asynchronously: cut until the batch holds all three entries.
    let started = Instant::now();
    let batch = loop {
        let (status, body) = cut(&admin);
        assert_eq!(status, 200, "{body}");
        let (_, _, batches) = kassa.call("GET", "/v1/settlement/batches", None, &[]);
        let closed: Vec<_> =
            batches["data"].as_array().unwrap().iter().filter(|b| b["status"] == "closed").cloned().collect();
        let entries: u64 = closed.iter().map(|b| b["entries"].as_u64().unwrap()).sum();
        if entries == 3 {
            break closed;
        }
        assert!(started.elapsed() < Duration::from_secs(30), "settlement did not batch the entries: {batches}");
        std::thread::sleep(Duration::from_millis(100));
    };
    let captured: i64 = batch.iter().map(|b| b["amount_captured"].as_i64().unwrap()).sum();
    let refunded: i64 = batch.iter().map(|b| b["amount_refunded"].as_i64().unwrap()).sum();
    let fees: i64 = batch.iter().map(|b| b["fees"].as_i64().unwrap()).sum();
    let net: i64 = batch.iter().map(|b| b["net"].as_i64().unwrap()).sum();
    assert_eq!((captured, refunded), (2999, 300));
    assert_eq!(net, captured - refunded - fees, "money is conserved");
    assert!(batch.iter().all(|b| b["merchant"].as_str().is_some_and(|m| m.starts_with("mer_"))), "{batch:?}");
    let batch_id = batch[0]["id"].as_str().unwrap();
    let (status, _, one) = kassa.call("GET", &format!("/v1/settlement/batches/{batch_id}"), None, &[]);
    assert_eq!((status, one["id"].as_str()), (200, Some(batch_id)));
    for id in &ids {
        let started = Instant::now();
        loop {
            let (_, _, events) = kassa.call("GET", &format!("/v1/payments/{id}/events"), None, &[]);
            let settled = events["data"].as_array().unwrap().iter().filter(|e| e["type"] == "payment.settled").count();
            if settled == 1 {
                break;
            }
            assert!(settled == 0 && started.elapsed() < Duration::from_secs(30), "{id} settled {settled} times");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    // Reconciliation matched the acquirer's report against each closed batch.
    let started = Instant::now();
    loop {
        let (status, _, reports) = kassa.call("GET", "/v1/reconciliation/reports", None, &[]);
        assert_eq!(status, 200);
        let data = reports["data"].as_array().unwrap();
        let matched: u64 = data.iter().map(|r| r["matched"].as_u64().unwrap()).sum();
        if matched == 3 {
            assert!(data.iter().all(|r| r["status"] == "matched"), "{reports}");
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(30), "no clean reconciliation: {reports}");
        std::thread::sleep(Duration::from_millis(100));
    }
    kassa.kill();
}

#[test]
fn captures_made_before_a_restart_reconcile_after_it() {
    // The simulated acquirers keep their ledger in the data directory, as a real acquirer
    // keeps it across Kassa's restarts: what they captured before is reported after.
    let dir = tempfile::tempdir().unwrap();
    let kassa = Kassa::start(dir.path());
    for amount in [1999, 2500] {
        let payment = kassa.pay_and_settle(&pay("4242424242424242", amount, true));
        assert_eq!(payment["status"], "captured", "{payment}");
    }
    kassa.kill();
    let journals: Vec<_> = std::fs::read_dir(dir.path().join("simulators")).unwrap().collect();
    assert_eq!(journals.len(), 3, "one journal a simulated acquirer");

    let kassa = Kassa::start(dir.path());
    let started = Instant::now();
    loop {
        let (status, body) = kassa.operator("POST", "/admin/settlement/cutoff", None);
        assert_eq!(status, 200, "{body}");
        let (_, _, reports) = kassa.call("GET", "/v1/reconciliation/reports", None, &[]);
        let data = reports["data"].as_array().unwrap();
        let matched: u64 = data.iter().map(|r| r["matched"].as_u64().unwrap()).sum();
        let missing: usize = data.iter().map(|r| r["missing"].as_array().map_or(0, Vec::len)).sum();
        assert_eq!(missing, 0, "a capture made before the restart was reported missing: {reports}");
        if matched == 2 {
            assert!(data.iter().all(|r| r["status"] == "matched"), "{reports}");
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(30), "no clean reconciliation: {reports}");
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(kassa.terminate().success());
}

#[test]
fn a_config_file_sets_providers_and_bad_ones_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("kassa.toml");
    std::fs::write(
        &config,
        "outcome_wait_ms = 5000\n[[providers]]\nname = \"acq-north\"\nlatency_ms_min = 1\nlatency_ms_max = 2\n",
    )
    .unwrap();
    let data = dir.path().join("data");
    let kassa = Kassa::start_with(&data, &["--config", config.to_str().unwrap()]);
    let (_, _, payment) = kassa.call("POST", "/v1/payments", Some(&pay("4242424242424242", 100, true)), &[]);
    assert_eq!(payment["provider"], "acq-north", "{payment}");
    kassa.kill();

    std::fs::write(&config, "[[providers]]\nname = \"acq-north\"\nlatency_ms = 5\n").unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_kassa"))
        .args(["up", "--config", config.to_str().unwrap(), "--data-dir"])
        .arg(&data)
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("latency_ms") && stderr.contains("kassa.toml"), "{stderr}");
}
