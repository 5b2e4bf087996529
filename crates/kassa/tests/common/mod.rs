//! Shared by the end-to-end tests: start the real `kassa up`, and a minimal HTTP client.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct Kassa {
    pub child: Child,
    pub addr: String,
    pub key: String,
    /// The operator token (`DIR/admin.token`).
    pub admin: String,
}

impl Kassa {
    pub fn start(dir: &Path) -> Kassa {
        Kassa::start_with(dir, &[])
    }

    pub fn start_with(dir: &Path, extra: &[&str]) -> Kassa {
        Kassa::spawn("up", dir, extra)
    }

    /// `kassa COMMAND --listen 127.0.0.1:0 EXTRA… --data-dir DIR`, once healthy.
    /// `key` is the demo merchant's (ingest and `up` only); `admin` is read
    /// from `--admin-token-file` when given, else `DIR/admin.token`.
    pub fn spawn(command: &str, dir: &Path, extra: &[&str]) -> Kassa {
        // Port 0: the kernel picks a free port and kassa writes it to DIR/kassa.addr, so
        // tests running side by side (each with its simulators' ports) never collide.
        let addr_file = dir.join("kassa.addr");
        let _ = std::fs::remove_file(&addr_file);
        let mut child = Command::new(env!("CARGO_BIN_EXE_kassa"))
            .args([command, "--listen", "127.0.0.1:0"])
            .args(extra)
            .arg("--data-dir")
            .arg(dir)
            .env("KASSA_LOG", std::env::var("KASSA_TEST_LOG").unwrap_or_else(|_| "warn".into()))
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn kassa");
        let started = Instant::now();
        let addr = loop {
            if let Ok(addr) = std::fs::read_to_string(&addr_file)
                && !addr.is_empty()
                && let Ok((200, _, _)) = request(&addr, "GET", "/healthz", None, &[], b"")
            {
                break addr;
            }
            if let Ok(Some(status)) = child.try_wait() {
                panic!("kassa {command} exited before becoming healthy: {status}");
            }
            assert!(started.elapsed() < Duration::from_secs(60), "kassa {command} did not become healthy");
            std::thread::sleep(Duration::from_millis(50));
        };
        let key =
            std::fs::read_to_string(dir.join("demo-merchant.key")).map(|k| k.trim().to_owned()).unwrap_or_default();
        let admin_file = extra
            .iter()
            .position(|a| *a == "--admin-token-file")
            .map_or_else(|| dir.join("admin.token"), |i| std::path::PathBuf::from(extra[i + 1]));
        let admin = std::fs::read_to_string(admin_file).unwrap().trim().to_owned();
        Kassa { child, addr, key, admin }
    }

    pub fn call(
        &self,
        method: &str,
        path: &str,
        body: Option<&str>,
        headers: &[(&str, &str)],
    ) -> (u16, Vec<(String, String)>, serde_json::Value) {
        let auth = format!("Bearer {}", self.key);
        let mut all = vec![("Authorization", auth.as_str())];
        all.extend_from_slice(headers);
        let (status, headers, body) =
            request(&self.addr, method, path, body.map(|_| "application/json"), &all, body.unwrap_or("").as_bytes())
                .unwrap();
        let json = serde_json::from_slice(&body).unwrap_or(serde_json::Value::Null);
        (status, headers, json)
    }

    /// An operator call (`/admin/…`, `/sim/…`) with the admin token.
    pub fn operator(&self, method: &str, path: &str, body: Option<&str>) -> (u16, serde_json::Value) {
        let auth = format!("Bearer {}", self.admin);
        let (status, _, body) = request(
            &self.addr,
            method,
            path,
            body.map(|_| "application/json"),
            &[("Authorization", auth.as_str())],
            body.unwrap_or("").as_bytes(),
        )
        .unwrap();
        (status, serde_json::from_slice(&body).unwrap_or(serde_json::Value::Null))
    }

    /// Create a payment and wait for its final status (polling while it is processing).
    pub fn pay_and_settle(&self, body: &str) -> serde_json::Value {
        let (status, _, payment) = self.call("POST", "/v1/payments", Some(body), &[]);
        assert!(matches!(status, 200 | 202 | 402 | 503), "{status}: {payment}");
        let Some(id) = payment["id"].as_str().map(str::to_owned) else { return payment };
        let started = Instant::now();
        let mut payment = payment;
        while payment["status"] == "processing" {
            assert!(started.elapsed() < Duration::from_secs(60), "payment {id} stayed processing");
            std::thread::sleep(Duration::from_millis(50));
            payment = self.call("GET", &format!("/v1/payments/{id}"), None, &[]).2;
        }
        payment
    }

    pub fn kill(mut self) {
        self.child.kill().unwrap(); // SIGKILL
        self.child.wait().unwrap();
    }

    pub fn terminate(mut self) -> std::process::ExitStatus {
        Command::new("kill").args(["-TERM", &self.child.id().to_string()]).status().unwrap();
        self.child.wait().unwrap()
    }
}

/// A failing test must not leave `kassa up` running.
impl Drop for Kassa {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Status, lower-cased headers, body.
pub type Response = (u16, Vec<(String, String)>, Vec<u8>);

/// A minimal HTTP/1.1 client: one request per connection.
pub fn request(
    addr: &str,
    method: &str,
    path: &str,
    content_type: Option<&str>,
    headers: &[(&str, &str)],
    body: &[u8],
) -> std::io::Result<Response> {
    let mut stream = TcpStream::connect(addr)?;
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut head =
        format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n", body.len());
    if let Some(content_type) = content_type {
        head.push_str(&format!("Content-Type: {content_type}\r\n"));
    }
    for (name, value) in headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes())?;
    stream.write_all(body)?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw)?;
    let split = raw.windows(4).position(|w| w == b"\r\n\r\n").ok_or(std::io::ErrorKind::InvalidData)?;
    let head = String::from_utf8_lossy(&raw[..split]).to_string();
    let mut lines = head.lines();
    let status: u16 = lines.next().and_then(|l| l.split_whitespace().nth(1)).and_then(|s| s.parse().ok()).unwrap_or(0);
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    Ok((status, headers, raw[split + 4..].to_vec()))
}

pub fn pay(number: &str, amount: i64, capture: bool) -> String {
    format!(
        r#"{{"amount": {amount}, "currency": "EUR", "capture": {capture}, "reference": "order-1",
            "card": {{"number": "{number}", "exp_month": 12, "exp_year": 2030, "cvc": "123"}}}}"#
    )
}
