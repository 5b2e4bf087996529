//! A real Kafka-protocol broker (tansu 0.6.0) for one test: its own data
//! directory and port, stopped and started at will, killed when dropped.
//!
//! The binary comes from `KASSA_TANSU`, which `scripts/test.sh` sets after
//! installing tansu (`scripts/tansu.sh install`). Without it the test fails
//! and says so: a Kafka test that skips would pass without testing anything.

#![allow(dead_code)]

use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

#[derive(Debug)]
pub struct Tansu {
    binary: PathBuf,
    dir: tempfile::TempDir,
    port: u16,
    child: Option<Child>,
}

impl Tansu {
    /// Start a broker on a free loopback port; returns once it accepts connections.
    pub fn start() -> Tansu {
        let binary = match std::env::var_os("KASSA_TANSU") {
            Some(path) => PathBuf::from(path),
            None => panic!(
                "KASSA_TANSU is not set: run the tests with scripts/test.sh, which installs the tansu broker \
                 (scripts/tansu.sh install) and points KASSA_TANSU at it"
            ),
        };
        assert!(binary.exists(), "KASSA_TANSU={} does not exist", binary.display());
        let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let mut tansu = Tansu { binary, dir: tempfile::tempdir().unwrap(), port, child: None };
        tansu.resume();
        tansu
    }

    /// `host:port` for `bootstrap.servers`.
    pub fn brokers(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// Start the broker again on the same port and data (after [`Tansu::stop`]).
    pub fn resume(&mut self) {
        assert!(self.child.is_none(), "tansu is already running");
        let url = format!("tcp://127.0.0.1:{}", self.port);
        let log =
            std::fs::OpenOptions::new().create(true).append(true).open(self.dir.path().join("tansu.log")).unwrap();
        let child = Command::new(&self.binary)
            .current_dir(self.dir.path())
            .args(["broker", "--listener-url", &url, "--advertised-listener-url", &url])
            // The sqlite path must be relative: to the working directory, the test's own.
            .args(["--storage-engine", "sqlite://tansu.db"])
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("starting {}: {e}", self.binary.display()));
        self.child = Some(child);
        let started = Instant::now();
        while TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(started.elapsed() < Duration::from_secs(30), "tansu did not listen within 30 s: {}", self.log());
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Stop the broker abruptly (SIGKILL), as a crashed or unplugged broker.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// What the broker logged.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("tansu.log")).unwrap_or_default()
    }
}

impl Drop for Tansu {
    fn drop(&mut self) {
        self.stop();
    }
}
