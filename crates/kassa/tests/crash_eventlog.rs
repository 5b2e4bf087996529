//! Crash tests against the real binary: a child process appends from several
//! threads and prints every acknowledged (durable) append; we kill it without
//! warning, reopen the log, and check that every acknowledged event is there
//! and the whole chain verifies.

use kassa_eventlog::{EventLog, LogConfig};
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};

fn kassa() -> Command {
    Command::new(env!("CARGO_BIN_EXE_kassa"))
}

/// Run the torture load until `acks` acknowledgements were read, then either
/// SIGKILL it or let it exit abruptly on its own; return what was acknowledged.
fn run_until_killed(dir: &Path, acks: usize, self_exit: bool) -> Vec<(u64, u128)> {
    let mut command = kassa();
    command.args(["log", "torture", "--threads", "4", "--path"]).arg(dir);
    if self_exit {
        command.args(["--exit-after", &acks.to_string()]);
    }
    let mut child = command.stdout(Stdio::piped()).stderr(Stdio::inherit()).spawn().expect("spawn kassa");
    let stdout = child.stdout.take().unwrap();
    let mut acked = Vec::new();
    for line in BufReader::new(stdout).lines() {
        let Ok(line) = line else { break };
        let mut parts = line.split_whitespace();
        assert_eq!(parts.next(), Some("acked"), "unexpected output: {line}");
        let position: u64 = parts.next().unwrap().parse().unwrap();
        let id = u128::from_str_radix(parts.next().unwrap(), 16).unwrap();
        acked.push((position, id));
        if !self_exit && acked.len() >= acks {
            child.kill().expect("SIGKILL");
            break;
        }
    }
    child.wait().unwrap();
    acked
}

fn check(dir: &Path, acked: &[(u64, u128)]) {
    let log = EventLog::open(dir, LogConfig::default()).expect("the log reopens after the crash");
    let report = log.verify().expect("the whole chain verifies after the crash");
    let max_acked = acked.iter().map(|a| a.0).max().unwrap();
    assert!(report.head_position >= max_acked, "head {} lost acknowledged {max_acked}", report.head_position);
    let all = log.read_from(1, usize::MAX).unwrap();
    for &(position, id) in acked {
        assert_eq!(all[(position - 1) as usize].event_id, id, "acknowledged event at {position} is not there");
    }
}

#[test]
fn sigkill_mid_append_loses_no_acknowledged_event() {
    let dir = tempfile::tempdir().unwrap();
    let first = run_until_killed(dir.path(), 300, false);
    assert!(first.len() >= 300);
    check(dir.path(), &first);
    // And again on the recovered log: the chain continues across crashes.
    let mut second = run_until_killed(dir.path(), 300, false);
    second.extend(first);
    check(dir.path(), &second);
}

#[test]
fn abrupt_exit_without_closing_loses_no_acknowledged_event() {
    let dir = tempfile::tempdir().unwrap();
    let acked = run_until_killed(dir.path(), 200, true);
    assert!(acked.len() >= 200);
    check(dir.path(), &acked);
}

#[test]
fn verify_command_reports_the_chain() {
    let dir = tempfile::tempdir().unwrap();
    run_until_killed(dir.path(), 50, true);
    let output = kassa().args(["log", "verify", "--path"]).arg(dir.path()).output().unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let report: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(report["verified"], true);
    assert!(report["events"].as_u64().unwrap() >= 50);

    let missing = kassa().args(["log", "verify", "--path", "/nonexistent/kassa"]).output().unwrap();
    assert!(!missing.status.success());
    assert!(String::from_utf8_lossy(&missing.stderr).contains("no event log at"));
}
