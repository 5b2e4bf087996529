//! `kassa merchant create`: straight into the ingest log when Kassa is
//! stopped; through the running instance's admin API when `kassa up` holds
//! the log (RocksDB allows one writer process).

use anyhow::{Context, bail};
use clap::{Args, Subcommand};
use kassa_eventlog::{EventLog, LogConfig, LogError};
use kassa_services::{Clock, SystemClock};
use std::io::{Read, Write};
use std::path::PathBuf;
use std::time::Duration;

#[derive(Subcommand, Debug)]
pub enum MerchantCommand {
    /// Create a merchant and print its new API key (sk_…). The key is shown once and stored only hashed.
    Create(CreateArgs),
}

#[derive(Args, Debug)]
pub struct CreateArgs {
    /// The merchant's name (1 to 100 characters).
    pub name: String,
    /// Kassa's data directory (as given to `kassa up`).
    #[arg(long, default_value = "./kassa-data", env = "KASSA_DATA_DIR")]
    pub data_dir: PathBuf,
}

pub fn run(command: MerchantCommand) -> anyhow::Result<()> {
    let MerchantCommand::Create(args) = command;
    let log_path = args.data_dir.join("ingest");
    anyhow::ensure!(
        args.data_dir.is_dir(),
        "no Kassa data directory at {}: start `kassa up --data-dir {}` once first",
        args.data_dir.display(),
        args.data_dir.display()
    );
    match EventLog::open(&log_path, LogConfig::default()) {
        Ok(log) => {
            let (request, merchant_id, key) = kassa_services::ingest::new_merchant(&args.name, SystemClock.now())
                .map_err(|e| anyhow::anyhow!("{}", e.message))?;
            log.append_blocking(request).context("recording the merchant")?;
            println!("merchant {merchant_id} \"{}\" created; API key: {}", args.name, key.reveal());
            Ok(())
        }
        Err(LogError::Storage { reason, .. }) if reason.contains("LOCK") => create_through_running(&args),
        Err(error) => Err(error).with_context(|| format!("opening {}", log_path.display())),
    }
}

/// `kassa up` holds the log: ask it over its admin API.
fn create_through_running(args: &CreateArgs) -> anyhow::Result<()> {
    let read = |name: &str| -> anyhow::Result<String> {
        let path = args.data_dir.join(name);
        Ok(std::fs::read_to_string(&path)
            .with_context(|| format!("kassa up is running but {} is unreadable", path.display()))?
            .trim()
            .to_owned())
    };
    let address = read(crate::up::ADDRESS_FILE)?;
    let token = read("admin.token")?;
    let body = serde_json::json!({ "name": args.name }).to_string();
    let mut stream = std::net::TcpStream::connect(&address)
        .with_context(|| format!("kassa up holds the data directory but does not answer at {address}"))?;
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    write!(
        stream,
        "POST /admin/merchants HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\nAuthorization: Bearer {token}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
    let status = head.split_whitespace().nth(1).unwrap_or("?");
    let json: serde_json::Value = serde_json::from_str(body).unwrap_or(serde_json::Value::Null);
    if status != "201" {
        bail!("kassa up refused: {status} {}", json["error"]["message"].as_str().unwrap_or(body));
    }
    println!(
        "merchant {} \"{}\" created; API key: {}",
        json["id"].as_str().unwrap_or("?"),
        args.name,
        json["api_key"].as_str().unwrap_or("?")
    );
    Ok(())
}
