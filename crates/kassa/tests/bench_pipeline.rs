//! `kassa bench` end to end, small: more captures than one append carries,
//! so settlement's close and reconciliation each commit theirs in several
//! pieces kept in flight together; every payment must still be decided,
//! batched, closed and reconciled, with no discrepancy.

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
}
