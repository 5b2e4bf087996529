//! `kassa bench` end to end, small: more captures than one append carries,
//! so settlement's close and reconciliation each commit theirs in several
//! pieces kept in flight together; every payment must still be decided,
//! batched, closed and reconciled, with no discrepancy, and each captured
//! payment's history must show it settled and reconciled. Then the routing
//! decisions in the authorization log, read offline as an auditor would.

use std::process::Command;

#[test]
fn the_pipeline_benchmark_reconciles_every_capture() {
    let dir = tempfile::tempdir().unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_kassa"))
        .args(["bench", "--payments", "2500", "--concurrency", "256", "--latency-ms-min", "1", "--latency-ms-max", "3"])
        .arg("--data-dir")
        .arg(dir.path())
        .env("KASSA_LOG", "warn")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "kassa bench failed:\n{stdout}\n{stderr}");
    // One in ten cards is hard-declined.
    assert!(stdout.contains("captured 2250, declined 250, other 0"), "{stdout}");
    assert!(stdout.contains("2250 entries in 1 batches, 2250 lines matched, no discrepancy"), "{stdout}");
    assert!(stdout.contains("recorded settled and reconciled on their payments: 2250 of 2250 captures"), "{stdout}");

    // What an auditor reads offline: each routing decision with its inputs, and it follows from them.
    let dump = Command::new(env!("CARGO_BIN_EXE_kassa"))
        .args(["log", "dump", "--limit", "200", "--path"])
        .arg(dir.path().join("authorization"))
        .env("KASSA_LOG", "warn")
        .output()
        .unwrap();
    assert!(dump.status.success(), "log dump: {}", String::from_utf8_lossy(&dump.stderr));
    let mut decisions = 0;
    for line in String::from_utf8_lossy(&dump.stdout).lines() {
        let event: serde_json::Value = serde_json::from_str(line).unwrap();
        if let Some(routing) = event.get("routing") {
            let input: kassa_domain::routing::RoutingInput = serde_json::from_value(routing["input"].clone()).unwrap();
            let decision: kassa_domain::routing::RoutingDecision =
                serde_json::from_value(routing["decision"].clone()).unwrap();
            assert_eq!(kassa_domain::routing::route(&input), decision, "{line}");
            decisions += 1;
        }
    }
    assert!(decisions > 10, "{decisions} routing decisions in the first 200 events");
}
