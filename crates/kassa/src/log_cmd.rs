//! `kassa log …`: verify and inspect an event log; and the load generator the
//! crash tests kill.

use anyhow::Context;
use clap::{Args, Subcommand};
use kassa_eventlog::{AppendRequest, EventLog, LogConfig, NewEvent};
use kassa_services::authorization::decode_routing_decided;
use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

#[derive(Subcommand, Debug)]
pub enum LogCommand {
    /// Read the whole log, checking every checksum, position and hash-chain link.
    /// Prints the event count and head hash (publish the hash to detect later truncation).
    Verify(PathArg),
    /// Print events as JSON lines: position, stream, type, time, payload size;
    /// a routing decision also with all its inputs (`routing`), as JSON.
    Dump {
        #[command(flatten)]
        path: PathArg,
        /// First position to print (1-based).
        #[arg(long, default_value_t = 1)]
        from: u64,
        /// How many events to print at most.
        #[arg(long, default_value_t = 100)]
        limit: usize,
    },
    /// Test tool: append synthetic events from several threads until killed,
    /// printing `acked <position> <event_id>` for every durable append.
    #[command(hide = true)]
    Torture(TortureArgs),
}

#[derive(Args, Debug)]
pub struct PathArg {
    /// The event log directory, e.g. ./kassa-data/ingest
    #[arg(long)]
    pub path: PathBuf,
}

#[derive(Args, Debug)]
pub struct TortureArgs {
    #[command(flatten)]
    pub path: PathArg,
    /// Appending threads.
    #[arg(long, default_value_t = 4)]
    pub threads: u64,
    /// Exit abruptly (no destructors, no flush) after this many acknowledgements.
    #[arg(long)]
    pub exit_after: Option<u64>,
}

pub fn run(command: LogCommand) -> anyhow::Result<()> {
    match command {
        LogCommand::Verify(PathArg { path }) => {
            let log = open_existing(&path)?;
            let report = log.verify().with_context(|| format!("verifying {}", path.display()))?;
            println!(
                "{}",
                serde_json::json!({
                    "path": path.display().to_string(),
                    "events": report.events,
                    "head_position": report.head_position,
                    "head_hash": hex::encode(report.head_hash),
                    "verified": true,
                })
            );
            Ok(())
        }
        LogCommand::Dump { path: PathArg { path }, from, limit } => {
            let log = open_existing(&path)?;
            let stdout = std::io::stdout();
            let mut out = stdout.lock();
            for envelope in log.iter_from(from).take(limit) {
                let e = envelope.with_context(|| format!("reading {}", path.display()))?;
                let mut line = serde_json::json!({
                    "position": e.position,
                    "stream_id": format!("{:032x}", e.stream_id),
                    "stream_seq": e.stream_seq,
                    "type": e.event_type,
                    "timestamp_ms": e.timestamp_ms,
                    "event_id": format!("{:032x}", e.event_id),
                    "payload_bytes": e.payload.len(),
                });
                // Recorded compactly (MessagePack): shown as the JSON an auditor reads.
                // One that does not read says why, and the dump goes on.
                match decode_routing_decided(&e.event_type, &e.payload) {
                    Some(Ok(decided)) => line["routing"] = serde_json::to_value(decided)?,
                    Some(Err(error)) => line["routing_error"] = error.to_string().into(),
                    None => {}
                }
                writeln!(out, "{line}")?;
            }
            Ok(())
        }
        LogCommand::Torture(args) => torture(args),
    }
}

fn open_existing(path: &std::path::Path) -> anyhow::Result<EventLog> {
    anyhow::ensure!(path.is_dir(), "no event log at {}: the directory does not exist", path.display());
    EventLog::open(path, LogConfig::default()).with_context(|| format!("opening the event log at {}", path.display()))
}

fn torture(args: TortureArgs) -> anyhow::Result<()> {
    let log = Arc::new(EventLog::open(&args.path.path, LogConfig::default())?);
    let next_id = Arc::new(AtomicU64::new(log.head_position() + 1));
    let acked = Arc::new(AtomicU64::new(0));
    let threads: Vec<_> = (0..args.threads)
        .map(|_| {
            let (log, next_id, acked) = (Arc::clone(&log), Arc::clone(&next_id), Arc::clone(&acked));
            let exit_after = args.exit_after;
            std::thread::spawn(move || -> anyhow::Result<()> {
                loop {
                    let id = u128::from(next_id.fetch_add(1, Ordering::Relaxed)) | (0xABu128 << 120);
                    let event = NewEvent {
                        event_id: id,
                        event_type: "test.tortured".into(),
                        stream_id: id % 64,
                        timestamp_ms: 0,
                        causation_id: None,
                        correlation_id: None,
                        payload: id.to_le_bytes().to_vec(),
                    };
                    let appended = log.append_blocking(AppendRequest { events: vec![event], ..Default::default() })?;
                    let line = format!("acked {} {id:032x}\n", appended.last_position);
                    std::io::stdout().lock().write_all(line.as_bytes())?;
                    let count = acked.fetch_add(1, Ordering::Relaxed) + 1;
                    if exit_after.is_some_and(|limit| count >= limit) {
                        std::process::exit(0);
                    }
                }
            })
        })
        .collect();
    for thread in threads {
        thread.join().map_err(|_| anyhow::anyhow!("torture thread panicked"))??;
    }
    Ok(())
}
