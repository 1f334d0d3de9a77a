//! Signed checkpoints: the journal's head (sequence number and hash),
//! signed with an operator's Ed25519 key, for an auditor to keep outside the
//! database. `verify --anchor FILE` later proves that the book still
//! extends that head: a truncation below it, or a history rewritten and
//! re-hashed, no longer contains the signed entry. The signature makes the
//! checkpoint the operator's word: nobody without the key can make one.

use std::path::{Path, PathBuf};

use ed25519_dalek::{Signature, Signer, SigningKey, Verifier, VerifyingKey};
use serde::{Deserialize, Serialize};

use crate::ledger::{Anchor, VerifyReport};

/// A signed head of the journal.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Checkpoint {
    /// The number of journal entries (the last one's sequence number).
    pub seq: u64,
    /// The last entry's hash, hex.
    pub head: String,
    /// When it was signed, unix seconds.
    pub at: i64,
    /// The operator's public key, hex.
    pub public_key: String,
    /// Ed25519 over [`message`], hex.
    pub signature: String,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CheckpointError {
    #[error("the checkpoint's {0} is not valid hex of the right length")]
    Malformed(&'static str),
    #[error("the checkpoint's signature does not verify with its public key (it was altered or forged)")]
    BadSignature,
    #[error("the checkpoint was signed by {signed_by}, not by the expected key {expected}")]
    UnexpectedKey { signed_by: String, expected: String },
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex<const N: usize>(text: &str, what: &'static str) -> Result<[u8; N], CheckpointError> {
    // Byte slicing below needs ASCII: anything else is not hex anyway.
    if text.len() != 2 * N || !text.is_ascii() {
        return Err(CheckpointError::Malformed(what));
    }
    let mut out = [0u8; N];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&text[2 * i..2 * i + 2], 16).map_err(|_| CheckpointError::Malformed(what))?;
    }
    Ok(out)
}

/// What is signed: versioned, so a signature for anything else never fits.
pub fn message(seq: u64, head: &str, at: i64) -> Vec<u8> {
    format!("suanwang ledger checkpoint v1\nseq {seq}\nhead {head}\nat {at}\n").into_bytes()
}

/// A new secret key from the operating system's randomness, and its public key (hex).
pub fn keygen() -> std::io::Result<([u8; 32], String)> {
    use std::io::Read;
    let mut secret = [0u8; 32];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut secret)?;
    let public = hex(SigningKey::from_bytes(&secret).verifying_key().as_bytes());
    Ok((secret, public))
}

/// The secret key in a key file (64 hex digits).
pub fn parse_secret(text: &str) -> Result<[u8; 32], CheckpointError> {
    unhex::<32>(text.trim(), "secret key")
}

/// The public key (hex) of a secret key.
pub fn public_key(secret: &[u8; 32]) -> String {
    hex(SigningKey::from_bytes(secret).verifying_key().as_bytes())
}

/// Signs the head a verify found.
pub fn sign(secret: &[u8; 32], report: &VerifyReport, at: i64) -> Checkpoint {
    let key = SigningKey::from_bytes(secret);
    let signature = key.sign(&message(report.journal_entries, &report.head, at));
    Checkpoint {
        seq: report.journal_entries,
        head: report.head.clone(),
        at,
        public_key: hex(key.verifying_key().as_bytes()),
        signature: hex(&signature.to_bytes()),
    }
}

/// Checks the signature (and that it is `expected_key`'s, if given) and
/// returns the head to verify against.
pub fn check(checkpoint: &Checkpoint, expected_key: Option<&str>) -> Result<Anchor, CheckpointError> {
    let public = unhex::<32>(&checkpoint.public_key, "public key")?;
    let key = VerifyingKey::from_bytes(&public).map_err(|_| CheckpointError::Malformed("public key"))?;
    let signature = Signature::from_bytes(&unhex::<64>(&checkpoint.signature, "signature")?);
    let hash = unhex::<32>(&checkpoint.head, "head")?;
    key.verify(&message(checkpoint.seq, &checkpoint.head, checkpoint.at), &signature)
        .map_err(|_| CheckpointError::BadSignature)?;
    if let Some(expected) = expected_key
        && !expected.trim().eq_ignore_ascii_case(&checkpoint.public_key)
    {
        return Err(CheckpointError::UnexpectedKey {
            signed_by: checkpoint.public_key.clone(),
            expected: expected.trim().to_string(),
        });
    }
    Ok(Anchor { seq: checkpoint.seq, hash })
}

/// Verifies the book in `db` (the voucher rules included, and that it
/// extends `after`, a head signed earlier) and signs its head: refused if
/// anything is wrong, so a checkpoint only ever vouches for a book that
/// verified and never for a history that contradicts an earlier one.
pub fn verify_and_sign(
    db: &Path,
    secret: &[u8; 32],
    at: i64,
    after: Option<Anchor>,
) -> Result<Checkpoint, crate::LedgerError> {
    let (report, problems) = crate::voucher::verify_file(db, after)?;
    if !problems.is_empty() {
        return Err(crate::LedgerError::Corrupt {
            path: db.display().to_string(),
            problem: format!("voucher rules broken, no checkpoint signed: {}", problems.join("; ")),
        });
    }
    Ok(sign(secret, &report, at))
}

/// The file a periodic checkpoint of entry `seq` is kept in.
pub fn file_name(seq: u64) -> String {
    format!("checkpoint-{seq:012}.json")
}

/// What a periodic checkpoint did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Periodic {
    /// A new head, signed and written to this file.
    Written(Checkpoint, PathBuf),
    /// The head `seq` was checkpointed already (this run or an earlier one):
    /// nothing written, the file kept as it is.
    Unchanged(u64),
}

/// The newest checkpoint in `dir`: of all the checkpoint files there, each
/// checked to be signed with `secret`'s key and named after the head it
/// holds, the one of the highest head. Every later checkpoint must extend it.
pub fn newest(dir: &Path, secret: &[u8; 32]) -> Result<Option<(Checkpoint, Anchor)>, crate::LedgerError> {
    let bad = |problem: String| crate::LedgerError::Corrupt { path: dir.display().to_string(), problem };
    let names: Vec<String> = match std::fs::read_dir(dir) {
        Ok(entries) => entries
            .filter_map(|e| e.ok().and_then(|e| e.file_name().into_string().ok()))
            .filter(|n| n.starts_with("checkpoint-") && n.ends_with(".json"))
            .collect(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(bad(format!("cannot read the checkpoints: {e}"))),
    };
    let own = public_key(secret);
    let mut newest: Option<(Checkpoint, Anchor)> = None;
    for name in names {
        let text = std::fs::read_to_string(dir.join(&name)).map_err(|e| bad(format!("{name}: {e}")))?;
        let checkpoint: Checkpoint =
            serde_json::from_str(&text).map_err(|e| bad(format!("{name}: not a checkpoint: {e}")))?;
        let anchor = check(&checkpoint, Some(&own)).map_err(|e| bad(format!("{name}: {e}")))?;
        if name != file_name(checkpoint.seq) {
            return Err(bad(format!(
                "{name} holds the head of entry {}: a checkpoint file was renamed",
                checkpoint.seq
            )));
        }
        if newest.as_ref().is_none_or(|(n, _)| checkpoint.seq > n.seq) {
            newest = Some((checkpoint, anchor));
        }
    }
    Ok(newest)
}

/// A periodic checkpoint into `dir`: if the book's head moved past the
/// newest checkpoint there (or `last`, the newest this process signed, if
/// files were removed), verifies that the book still extends it, then signs
/// the head and writes it as [`file_name`]`(seq)`, whole or not at all
/// (written aside, synced, then renamed), and remembers it in `last`. An
/// existing file is never replaced, so a restart does not re-date a kept
/// checkpoint.
pub fn write_periodic(
    db: &Path,
    secret: &[u8; 32],
    dir: &Path,
    at: i64,
    last: &mut Option<Anchor>,
) -> Result<Periodic, crate::LedgerError> {
    // The head's number is one cheap read: an unchanged book is neither
    // verified nor are the checkpoints read again.
    let head: i64 = rusqlite::Connection::open_with_flags(db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
        .and_then(|c| c.query_row("SELECT COALESCE(MAX(seq), 0) FROM journal", [], |r| r.get(0)))
        .map_err(crate::LedgerError::from)?;
    if let Some(l) = *last
        && head as u64 <= l.seq
    {
        return Ok(Periodic::Unchanged(head as u64));
    }
    let previous = match (newest(dir, secret)?.map(|(_, a)| a), *last) {
        (Some(a), Some(b)) => Some(if a.seq >= b.seq { a } else { b }),
        (a, b) => a.or(b),
    };
    if let Some(p) = &previous
        && head as u64 <= p.seq
    {
        return Ok(Periodic::Unchanged(head as u64));
    }
    let checkpoint = verify_and_sign(db, secret, at, previous)?;
    if dir.join(file_name(checkpoint.seq)).exists() {
        return Ok(Periodic::Unchanged(checkpoint.seq));
    }
    let io = |e: std::io::Error| crate::LedgerError::Corrupt {
        path: dir.display().to_string(),
        problem: format!("cannot write the checkpoint: {e}"),
    };
    std::fs::create_dir_all(dir).map_err(io)?;
    let path = dir.join(file_name(checkpoint.seq));
    let aside = dir.join(format!(".{}.tmp", file_name(checkpoint.seq)));
    {
        use std::io::Write;
        let mut file = std::fs::File::create(&aside).map_err(io)?;
        let text = serde_json::to_string_pretty(&checkpoint).expect("a checkpoint serialises");
        file.write_all(format!("{text}\n").as_bytes()).map_err(io)?;
        file.sync_all().map_err(io)?;
    }
    std::fs::rename(&aside, &path).map_err(io)?;
    *last = Some(check(&checkpoint, None).expect("a checkpoint just signed checks"));
    Ok(Periodic::Written(checkpoint, path))
}
