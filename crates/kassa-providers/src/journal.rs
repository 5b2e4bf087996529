//! A simulated acquirer's journal: every change to its ledger, one line each,
//! appended before the change is made, so a simulator started again on the
//! same file knows what it held — as a real acquirer does across Kassa's
//! restarts (reconciliation asks it for captures made before them).
//!
//! A line is `<crc32c of the JSON, 8 hex digits> <JSON>\n`, appended whole to a
//! file opened for appending (a failed write is cut back off; if that fails
//! too, the journal takes no more changes, and the simulator refuses them as
//! unavailable until it restarts). A crash of the process loses nothing
//! written; a crash of the machine may lose the last changes or damage a line
//! (it is not synced: a simulator). A last line cut short (no newline) is
//! dropped at open; any other line that does not check out is an error naming
//! it, and the simulator does not start. The file is locked while open: one
//! simulator a journal. No card data is ever written. It grows by a line a
//! change and is read whole at start (about 300 bytes a captured payment).

use kassa_domain::{AttemptId, CaptureId, Currency, DeclineCategory, Money, PaymentId, RefundId};
use serde::{Deserialize, Serialize};
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

/// One change to a simulated acquirer's ledger.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JournalOp {
    /// An authorization approved and held, with the code it was given.
    Approved {
        attempt_id: AttemptId,
        payment_id: PaymentId,
        amount: Money,
        authorization_code: String,
    },
    Declined {
        attempt_id: AttemptId,
        code: String,
        category: DeclineCategory,
    },
    Captured {
        attempt_id: AttemptId,
        capture_id: CaptureId,
        amount: Money,
    },
    /// A reversal: of what is held, or of an attempt not seen yet (refused if it comes).
    Reversed {
        attempt_id: AttemptId,
    },
    Refunded {
        attempt_id: AttemptId,
        refund_id: RefundId,
        amount: Money,
    },
}

/// A journal that cannot be read or written, saying which file and line.
#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    #[error("simulator journal {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("simulator journal {path}, line {line}: {reason}")]
    Damaged { path: PathBuf, line: usize, reason: String },
    #[error("simulator journal {path} is in use by another simulator")]
    InUse { path: PathBuf },
}

/// The line's fields as written: ids as 32 hex digits, amounts in minor units
/// with their currency's code. A format of its own, so the domain's types can
/// change without changing it.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
enum Line {
    Approved { attempt: String, payment: String, minor: i64, currency: String, code: String },
    Declined { attempt: String, code: String, category: DeclineCategory },
    Captured { attempt: String, capture: String, minor: i64, currency: String },
    Reversed { attempt: String },
    Refunded { attempt: String, refund: String, minor: i64, currency: String },
}

fn hex(id: u128) -> String {
    format!("{id:032x}")
}

/// `text` as exactly `digits` hex digits: no sign, no prefix.
fn hex_exact(text: &str, digits: usize) -> Option<u128> {
    let hex = text.len() == digits && text.bytes().all(|b| b.is_ascii_hexdigit());
    hex.then(|| u128::from_str_radix(text, 16).ok()).flatten()
}

fn id(text: &str) -> Result<u128, String> {
    hex_exact(text, 32).ok_or_else(|| {
        let shown: String = text.chars().take(40).collect();
        format!("an id is 32 hex digits, found {shown:?}")
    })
}

fn money(minor: i64, currency: &str) -> Result<Money, String> {
    let currency = Currency::from_code(currency).map_err(|e| e.to_string())?;
    if minor <= 0 {
        return Err(format!("an amount is above zero, found {minor}"));
    }
    Ok(Money { minor, currency })
}

impl JournalOp {
    fn to_line(&self) -> Line {
        match self {
            JournalOp::Approved { attempt_id, payment_id, amount, authorization_code } => Line::Approved {
                attempt: hex(attempt_id.as_u128()),
                payment: hex(payment_id.as_u128()),
                minor: amount.minor,
                currency: amount.currency.code().to_owned(),
                code: authorization_code.clone(),
            },
            JournalOp::Declined { attempt_id, code, category } => {
                Line::Declined { attempt: hex(attempt_id.as_u128()), code: code.clone(), category: *category }
            }
            JournalOp::Captured { attempt_id, capture_id, amount } => Line::Captured {
                attempt: hex(attempt_id.as_u128()),
                capture: hex(capture_id.as_u128()),
                minor: amount.minor,
                currency: amount.currency.code().to_owned(),
            },
            JournalOp::Reversed { attempt_id } => Line::Reversed { attempt: hex(attempt_id.as_u128()) },
            JournalOp::Refunded { attempt_id, refund_id, amount } => Line::Refunded {
                attempt: hex(attempt_id.as_u128()),
                refund: hex(refund_id.as_u128()),
                minor: amount.minor,
                currency: amount.currency.code().to_owned(),
            },
        }
    }

    fn from_line(line: Line) -> Result<JournalOp, String> {
        Ok(match line {
            Line::Approved { attempt, payment, minor, currency, code } => JournalOp::Approved {
                attempt_id: AttemptId::from_u128(id(&attempt)?),
                payment_id: PaymentId::from_u128(id(&payment)?),
                amount: money(minor, &currency)?,
                authorization_code: code,
            },
            Line::Declined { attempt, code, category } => {
                JournalOp::Declined { attempt_id: AttemptId::from_u128(id(&attempt)?), code, category }
            }
            Line::Captured { attempt, capture, minor, currency } => JournalOp::Captured {
                attempt_id: AttemptId::from_u128(id(&attempt)?),
                capture_id: CaptureId::from_u128(id(&capture)?),
                amount: money(minor, &currency)?,
            },
            Line::Reversed { attempt } => JournalOp::Reversed { attempt_id: AttemptId::from_u128(id(&attempt)?) },
            Line::Refunded { attempt, refund, minor, currency } => JournalOp::Refunded {
                attempt_id: AttemptId::from_u128(id(&attempt)?),
                refund_id: RefundId::from_u128(id(&refund)?),
                amount: money(minor, &currency)?,
            },
        })
    }

    /// The journal line for this change, newline included.
    pub fn encode(&self) -> Vec<u8> {
        let json = serde_json::to_string(&self.to_line()).expect("a journal line always serializes");
        format!("{:08x} {json}\n", crc32c::crc32c(json.as_bytes())).into_bytes()
    }

    /// A line (without its newline) back into a change; the reason when it does not check out.
    pub fn decode(line: &[u8]) -> Result<JournalOp, String> {
        let text = std::str::from_utf8(line).map_err(|_| "not UTF-8".to_owned())?;
        let (crc, json) = text.split_once(' ').ok_or("no checksum before the change")?;
        let crc = hex_exact(crc, 8).ok_or("the checksum is not 8 hex digits")?;
        if u128::from(crc32c::crc32c(json.as_bytes())) != crc {
            return Err("the checksum does not match: the line is damaged".into());
        }
        let line: Line = serde_json::from_str(json).map_err(|e| format!("not a journal change: {e}"))?;
        JournalOp::from_line(line)
    }
}

/// The open journal a simulated acquirer appends its changes to.
#[derive(Debug)]
pub struct Journal {
    path: PathBuf,
    file: File,
    /// Bytes of whole lines: where a failed append is cut back to.
    len: u64,
    /// Set when a failed append could not be cut back: a part of a line would
    /// damage every line after it, so no more are written.
    broken: bool,
}

impl Journal {
    /// Open (creating if missing) the journal at `path` and read back its changes, oldest first.
    pub fn open(path: impl AsRef<Path>) -> Result<(Journal, Vec<JournalOp>), JournalError> {
        let path = path.as_ref().to_path_buf();
        let io = |source| JournalError::Io { path: path.clone(), source };
        let mut file = OpenOptions::new().read(true).append(true).create(true).open(&path).map_err(io)?;
        // Held until the file is closed: one simulator a journal.
        rustix::fs::flock(&file, rustix::fs::FlockOperation::NonBlockingLockExclusive).map_err(|e| {
            if e == rustix::io::Errno::WOULDBLOCK { JournalError::InUse { path: path.clone() } } else { io(e.into()) }
        })?;
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes).map_err(io)?;
        let mut ops = Vec::new();
        let mut start = 0;
        let mut line = 0;
        while start < bytes.len() {
            line += 1;
            let Some(len) = bytes[start..].iter().position(|&b| b == b'\n') else {
                // Cut short by a crash mid-append: that change was never acted on.
                tracing::warn!(path = %path.display(), line, "simulator journal: dropping a last line cut short");
                file.set_len(start as u64).map_err(io)?;
                break;
            };
            let op = JournalOp::decode(&bytes[start..start + len]).map_err(|reason| JournalError::Damaged {
                path: path.clone(),
                line,
                reason,
            })?;
            ops.push(op);
            start += len + 1;
        }
        Ok((Journal { path, file, len: start as u64, broken: false }, ops))
    }

    /// Append one change. A failed append is cut off again, so the journal
    /// never holds part of a line before a whole one.
    pub fn append(&mut self, op: &JournalOp) -> Result<(), JournalError> {
        let error = |source| JournalError::Io { path: self.path.clone(), source };
        if self.broken {
            return Err(error(std::io::Error::other("an earlier append failed and could not be cut off")));
        }
        let line = op.encode();
        match self.file.write_all(&line) {
            Ok(()) => {
                self.len += line.len() as u64;
                Ok(())
            }
            Err(source) => {
                self.broken = self.file.set_len(self.len).is_err();
                Err(error(source))
            }
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A journal on a file that takes no writes (opened read-only), for tests of failures.
    #[cfg(test)]
    pub(crate) fn read_only(path: &Path) -> Journal {
        let file = File::open(path).unwrap();
        let len = file.metadata().unwrap().len();
        Journal { path: path.to_path_buf(), file, len, broken: false }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(json: &str) -> Vec<u8> {
        format!("{:08x} {json}", crc32c::crc32c(json.as_bytes())).into_bytes()
    }

    #[test]
    fn lines_that_check_out_but_say_nothing_valid_are_refused_with_why() {
        let attempt = "0".repeat(32);
        for (json, why) in [
            (format!(r#"{{"op":"reversed","attempt":"{}"}}"#, "0".repeat(31)), "32 hex digits"),
            (format!(r#"{{"op":"reversed","attempt":"+{}"}}"#, "0".repeat(31)), "32 hex digits"),
            (format!(r#"{{"op":"reversed","attempt":"{attempt}","extra":1}}"#), "unknown field"),
            (r#"{"op":"vanished"}"#.to_owned(), "unknown variant"),
            (
                format!(
                    r#"{{"op":"captured","attempt":"{attempt}","capture":"{attempt}","minor":0,"currency":"EUR"}}"#
                ),
                "above zero",
            ),
            (
                format!(
                    r#"{{"op":"captured","attempt":"{attempt}","capture":"{attempt}","minor":5,"currency":"XXX"}}"#
                ),
                "XXX",
            ),
        ] {
            let error = JournalOp::decode(&line(&json)).unwrap_err();
            assert!(error.contains(why), "{json}: {error}");
        }
        assert!(JournalOp::decode(b"+0000000 {}").unwrap_err().contains("checksum"));
        let op = JournalOp::Reversed { attempt_id: AttemptId::from_u128(7) };
        let encoded = op.encode();
        assert_eq!(JournalOp::decode(&encoded[..encoded.len() - 1]), Ok(op));
    }

    #[test]
    fn a_failed_append_is_cut_off_or_stops_the_journal() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("j");
        let op = JournalOp::Reversed { attempt_id: AttemptId::from_u128(7) };
        let (mut journal, _) = Journal::open(&path).unwrap();
        journal.append(&op).unwrap();
        // A second simulator on the same file is refused while the first holds it.
        assert!(matches!(Journal::open(&path), Err(JournalError::InUse { .. })));
        drop(journal);
        // A file that takes no writes (opened read-only): the append fails, and the
        // journal cannot cut it back either, so it takes no more.
        let mut read_only = Journal::read_only(&path);
        assert!(read_only.append(&op).is_err());
        assert!(read_only.broken);
        assert!(read_only.append(&op).unwrap_err().to_string().contains("earlier append failed"));
        drop(read_only);
        let (_, ops) = Journal::open(&path).unwrap();
        assert_eq!(ops, vec![op]);
    }
}
