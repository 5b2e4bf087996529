//! `kassa up --bus kafka` against a real Kafka-protocol broker (tansu): the
//! four services talk through Kafka topics instead of the embedded bus.

mod common;
#[path = "../../../tests/support/tansu.rs"]
mod tansu;

use common::*;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use tansu::Tansu;

fn kassa_command(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_kassa"))
        .args(args)
        .env("KASSA_LOG", "warn")
        .stdin(Stdio::null())
        .output()
        .expect("run kassa")
}

fn init_topics(brokers: &str) {
    let output = kassa_command(&["kafka", "init-topics", "--brokers", brokers]);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "init-topics failed: {}", String::from_utf8_lossy(&output.stderr));
    for topic in ["payments.commands", "payments.events", "settlement.events", "providers.health"] {
        assert!(stdout.contains(&format!("{topic}: created (8 partitions)")), "{stdout}");
    }
}

/// Cut off until the closed batches hold `entries` entries; their (captured, refunded, net, fees).
fn settle(kassa: &Kassa, entries: u64) -> (i64, i64, i64, i64) {
    let started = Instant::now();
    loop {
        let (status, body) = kassa.operator("POST", "/admin/settlement/cutoff", None);
        assert_eq!(status, 200, "{body}");
        let (_, _, batches) = kassa.call("GET", "/v1/settlement/batches", None, &[]);
        let closed: Vec<_> =
            batches["data"].as_array().unwrap().iter().filter(|b| b["status"] == "closed").cloned().collect();
        let sum = |field: &str| closed.iter().map(|b| b[field].as_i64().unwrap()).sum::<i64>();
        if sum("entries") as u64 == entries {
            return (sum("amount_captured"), sum("amount_refunded"), sum("net"), sum("fees"));
        }
        assert!(started.elapsed() < Duration::from_secs(60), "settlement did not batch {entries} entries: {batches}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn payments_flow_through_the_four_services_over_kafka_and_survive_sigkill() {
    let tansu = Tansu::start();
    let brokers = tansu.brokers();
    init_topics(&brokers);
    let dir = tempfile::tempdir().unwrap();
    let kafka = ["--bus", "kafka", "--brokers", brokers.as_str()];
    let kassa = Kassa::start_with(dir.path(), &kafka);

    let cards = [
        ("4242424242424242", "captured"),
        ("5555555555554444", "captured"),
        ("4000000000000002", "declined"),
        ("4000000000009995", "declined"),
    ];
    let mut payments = Vec::new();
    let mut captured_total = 0;
    for round in 0..4 {
        for (i, (number, expected)) in cards.iter().enumerate() {
            let amount = 1000 + (round * 10 + i) as i64;
            let payment = kassa.pay_and_settle(&pay(number, amount, true));
            assert_eq!(payment["status"], *expected, "{number}: {payment}");
            if *expected == "captured" {
                captured_total += amount;
            }
            payments.push((payment["id"].as_str().unwrap().to_owned(), payment["status"].clone()));
        }
    }
    // A refund, through the bus like every command.
    let (refunded_id, _) = payments.iter().find(|(_, s)| *s == "captured").cloned().unwrap();
    let (status, _, refunded) =
        kassa.call("POST", &format!("/v1/payments/{refunded_id}/refunds"), Some(r#"{"amount": 300}"#), &[]);
    assert_eq!(status, 200, "{refunded}");

    // Each capture and the refund batched once; money conserved.
    let entries = payments.iter().filter(|(_, s)| *s == "captured").count() as u64 + 1;
    assert_eq!(entries, 9);
    let (captured, refunded, net, fees) = settle(&kassa, entries);
    assert_eq!((captured, refunded), (captured_total, 300));
    assert_eq!(net, captured - refunded - fees);
    let started = Instant::now();
    loop {
        let (_, _, reports) = kassa.call("GET", "/v1/reconciliation/reports", None, &[]);
        let matched: u64 = reports["data"].as_array().unwrap().iter().map(|r| r["matched"].as_u64().unwrap()).sum();
        if matched == entries {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(60), "reconciliation did not match {entries} lines: {reports}");
        std::thread::sleep(Duration::from_millis(200));
    }
    let (_, _, events) = kassa.call("GET", &format!("/v1/payments/{refunded_id}/events"), None, &[]);
    let types: Vec<&str> = events["data"].as_array().unwrap().iter().map(|e| e["type"].as_str().unwrap()).collect();
    for expected in ["payment.requested", "payment.authorized", "payment.captured", "payment.refunded"] {
        assert_eq!(types.iter().filter(|t| **t == expected).count(), 1, "{expected} once: {types:?}");
    }

    // SIGKILL, restart on the same data and broker: every payment as it was.
    kassa.kill();
    let kassa = Kassa::start_with(dir.path(), &kafka);
    for (id, status) in &payments {
        let (code, _, payment) = kassa.call("GET", &format!("/v1/payments/{id}"), None, &[]);
        assert_eq!(code, 200);
        let expected = if *id == refunded_id { serde_json::json!("captured") } else { status.clone() };
        assert_eq!(payment["status"], expected, "{id} after restart: {payment}");
    }
    // And it keeps taking payments.
    let payment = kassa.pay_and_settle(&pay("4242424242424242", 777, true));
    assert_eq!(payment["status"], "captured", "{payment}");
    kassa.kill();
}

#[test]
fn kafka_mode_says_what_is_missing() {
    let no_brokers =
        kassa_command(&["up", "--bus", "kafka", "--listen", "127.0.0.1:0", "--data-dir", "/nonexistent/x"]);
    assert!(!no_brokers.status.success());
    let stderr = String::from_utf8_lossy(&no_brokers.stderr);
    assert!(stderr.contains("--brokers"), "{stderr}");

    let tansu = Tansu::start();
    let dir = tempfile::tempdir().unwrap();
    let dir_arg = dir.path().to_str().unwrap();
    let brokers = tansu.brokers();
    let no_topics = kassa_command(&[
        "up",
        "--bus",
        "kafka",
        "--brokers",
        &brokers,
        "--listen",
        "127.0.0.1:0",
        "--data-dir",
        dir_arg,
    ]);
    assert!(!no_topics.status.success());
    let stderr = String::from_utf8_lossy(&no_topics.stderr);
    assert!(stderr.contains("kassa kafka init-topics"), "{stderr}");

    let unsafe_property =
        kassa_command(&["kafka", "init-topics", "--brokers", &brokers, "--kafka-property", "enable.auto.commit=true"]);
    assert!(!unsafe_property.status.success());
    assert!(String::from_utf8_lossy(&unsafe_property.stderr).contains("enable.auto.commit"));
}

#[test]
fn ingest_keeps_accepting_while_the_broker_is_down_up_to_its_outbox_bound() {
    let mut tansu = Tansu::start();
    let brokers = tansu.brokers();
    init_topics(&brokers);
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("kassa.toml");
    // Two events per payment in the outbox: its sealed card and its request.
    std::fs::write(&config, "outcome_wait_ms = 100\noutbox_events_max = 50\n").unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir(&data).unwrap();
    let args = ["--bus", "kafka", "--brokers", brokers.as_str(), "--config", config.to_str().unwrap()];
    let kassa = Kassa::start_with(&data, &args);
    let before = kassa.pay_and_settle(&pay("4242424242424242", 1000, true));
    assert_eq!(before["status"], "captured", "{before}");

    // The broker goes away: payments are still accepted (202, processing) into
    // ingest's outbox, until the outbox bound answers 503 with Retry-After.
    tansu.stop();
    let mut accepted = Vec::new();
    let refused = loop {
        // Some with an Idempotency-Key: their claim cannot reach authorization either, and they
        // are answered after the usual wait, not after the longer wait for a claim's decision.
        let key = format!("outage-{}", accepted.len());
        let keyed = [("Idempotency-Key", key.as_str())];
        let headers: &[(&str, &str)] = if accepted.len() % 4 == 0 { &keyed } else { &[] };
        let sent = Instant::now();
        let (status, headers, body) =
            kassa.call("POST", "/v1/payments", Some(&pay("4242424242424242", 1500, true)), headers);
        assert!(
            sent.elapsed() < Duration::from_secs(3),
            "answered after {:?} while the broker is down",
            sent.elapsed()
        );
        match status {
            202 => accepted.push(body["id"].as_str().unwrap().to_owned()),
            503 => break (headers, body),
            other => panic!("{other} while the broker is down: {body}"),
        }
        assert!(accepted.len() <= 40, "the outbox bound (50 events) never answered 503");
    };
    assert!(accepted.len() >= 20, "only {} accepted before the bound", accepted.len());
    assert_eq!(refused.1["error"]["code"], "bus_unavailable", "{}", refused.1);
    assert!(refused.0.iter().any(|(name, _)| name == "retry-after"), "{:?}", refused.0);

    // The broker is back: everything accepted flows through, once.
    tansu.resume();
    let started = Instant::now();
    for id in &accepted {
        loop {
            let (_, _, payment) = kassa.call("GET", &format!("/v1/payments/{id}"), None, &[]);
            if payment["status"] == "captured" {
                break;
            }
            assert!(started.elapsed() < Duration::from_secs(120), "{id} did not flow through: {payment}");
            std::thread::sleep(Duration::from_millis(200));
        }
        let (_, _, events) = kassa.call("GET", &format!("/v1/payments/{id}/events"), None, &[]);
        let types: Vec<&str> = events["data"].as_array().unwrap().iter().map(|e| e["type"].as_str().unwrap()).collect();
        for once in ["payment.requested", "payment.authorized", "payment.captured"] {
            assert_eq!(types.iter().filter(|t| **t == once).count(), 1, "{id}: {once} once: {types:?}");
        }
    }
    // No provider holds any payment twice.
    let mut held = std::collections::HashMap::new();
    for provider in ["acq-alpha", "acq-beta", "acq-gamma"] {
        let (status, ledger) = kassa.operator("GET", &format!("/sim/{provider}/ledger"), None);
        assert_eq!(status, 200, "{ledger}");
        for entry in ledger["data"].as_array().unwrap() {
            if entry["state"] != "reversed" {
                *held.entry(entry["payment_id"].as_str().unwrap().to_owned()).or_insert(0) += 1;
            }
        }
    }
    for id in &accepted {
        assert_eq!(held.get(id), Some(&1), "{id} is held {:?} times", held.get(id));
    }
    // And new payments are accepted again.
    let after = kassa.pay_and_settle(&pay("4242424242424242", 2000, true));
    assert_eq!(after["status"], "captured", "{after}");
    kassa.kill();
}
