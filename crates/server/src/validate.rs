//! Validation at the door: every request field that is stored, shown to
//! someone else or handed to a process is checked here, before anything is
//! written, and refused with a 400 that names the field.
//!
//! The limits are the platform's, not the topology's (unknown sites and
//! accelerator types are checked against the network in `world::State::spec`).

use std::collections::{BTreeMap, BTreeSet};

use suanwang_api::JobRequest;

use crate::error::{Error, Result};

/// Longest job name, organisation name or token label, in characters.
pub const MAX_NAME_CHARS: usize = 256;
/// Most environment entries (plain and secret together).
pub const MAX_ENV_ENTRIES: usize = 256;
/// Longest environment value, in bytes.
pub const MAX_ENV_VALUE_BYTES: usize = 32 * 1024;
/// Most command arguments (the program included).
pub const MAX_COMMAND_ARGS: usize = 4096;
/// Longest single argument, in bytes: the kernel's `MAX_ARG_STRLEN`
/// (128 KiB with its NUL), so that no accepted job fails to start.
pub const MAX_ARG_BYTES: usize = 128 * 1024 - 1;
/// Most accelerator types a job may accept.
pub const MAX_ACCEPTED_TYPES: usize = 16;
/// Most datasets a job may read.
pub const MAX_DATASETS: usize = 64;
/// Longest time limit: one year.
pub const MAX_TIME_LIMIT_S: u64 = 365 * 86_400;
/// Latest deadline: ten years after submission.
pub const MAX_DEADLINE_S: u64 = 10 * 365 * 86_400;
/// Largest budget: one hundred million yuan.
pub const MAX_BUDGET_FEN: i64 = 10_000_000_000;
/// Largest memory request: 16 TiB.
pub const MAX_MEMORY_MB: u64 = 16 * 1024 * 1024;
/// Most CPU cores one attempt may ask for.
pub const MAX_CPUS: u32 = 4096;
/// Largest weight of time, cost or carbon.
pub const MAX_WEIGHT: u32 = 1_000_000;
/// Longest image reference.
pub const MAX_IMAGE_CHARS: usize = 256;

/// A name shown to people: bounded, and no control characters (no ANSI
/// escapes, no CR/LF that could forge lines in a terminal or a log).
pub fn display_name(field: &str, text: &str) -> Result<()> {
    let chars = text.chars().count();
    if chars > MAX_NAME_CHARS {
        return Err(Error::invalid(field, format!("must be at most {MAX_NAME_CHARS} characters, got {chars}")));
    }
    if let Some(c) = text.chars().find(|c| c.is_control()) {
        return Err(Error::invalid(field, format!("must not contain control characters (found U+{:04X})", c as u32)));
    }
    Ok(())
}

/// An identifier of an organisation or a site: 1 to 64 of `a-z 0-9 . _ -`,
/// starting with a letter or digit (safe in paths, URLs, logs and SQL).
pub fn identifier(field: &str, text: &str) -> Result<()> {
    let ok = !text.is_empty()
        && text.len() <= 64
        && text.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'_' | b'-'))
        && text.as_bytes()[0].is_ascii_alphanumeric();
    if ok {
        Ok(())
    } else {
        Err(Error::invalid(
            field,
            format!(
                "'{}' is not an identifier: 1 to 64 of a-z, 0-9, '.', '_', '-', starting with a letter or digit",
                printable(text)
            ),
        ))
    }
}

/// Text made safe to echo in an error message.
fn printable(text: &str) -> String {
    let mut out: String = text.chars().take(64).map(|c| if c.is_control() { '?' } else { c }).collect();
    if text.chars().count() > 64 {
        out.push('…');
    }
    out
}

fn env_name(field: &str, key: &str) -> Result<()> {
    let bytes = key.as_bytes();
    let ok = !bytes.is_empty()
        && key.len() <= 256
        && (bytes[0].is_ascii_alphabetic() || bytes[0] == b'_')
        && bytes.iter().all(|b| b.is_ascii_alphanumeric() || *b == b'_');
    if !ok {
        return Err(Error::invalid(
            field,
            format!("'{}' is not a variable name ([A-Za-z_][A-Za-z0-9_]*, at most 256)", printable(key)),
        ));
    }
    if key.starts_with("SUANWANG_") {
        return Err(Error::invalid(
            field,
            format!("'{key}': names starting with SUANWANG_ are reserved for the platform"),
        ));
    }
    Ok(())
}

fn env_map(field: &str, env: &BTreeMap<String, String>) -> Result<()> {
    for (key, value) in env {
        env_name(field, key)?;
        if value.contains('\0') {
            return Err(Error::invalid(field, format!("the value of {key} contains a NUL byte")));
        }
        if value.len() > MAX_ENV_VALUE_BYTES {
            return Err(Error::invalid(
                field,
                format!("the value of {key} is {} bytes, at most {MAX_ENV_VALUE_BYTES}", value.len()),
            ));
        }
    }
    Ok(())
}

/// An image reference: 1 to 256 of `A-Z a-z 0-9 . _ - / : @`.
pub fn image_reference(field: &str, image: &str) -> Result<()> {
    let ok = !image.is_empty()
        && image.len() <= MAX_IMAGE_CHARS
        && image.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-' | b'/' | b':' | b'@'));
    if !ok {
        return Err(Error::invalid(
            field,
            format!(
                "'{}' is not an image reference (at most {MAX_IMAGE_CHARS} of A-Z a-z 0-9 . _ - / : @)",
                printable(image)
            ),
        ));
    }
    Ok(())
}

/// Most image names an agent may report.
pub const MAX_SITE_IMAGES: usize = 4096;

/// What an agent says its site can run: bounded, and image names that a
/// job could name.
pub fn capabilities(caps: &suanwang_api::Capabilities) -> Result<()> {
    if caps.images.len() > MAX_SITE_IMAGES {
        return Err(Error::invalid(
            "capabilities.images",
            format!("at most {MAX_SITE_IMAGES} names, got {}", caps.images.len()),
        ));
    }
    for image in &caps.images {
        image_reference("capabilities.images", image)?;
    }
    Ok(())
}

/// A site report's own limits (the pools' names are checked against the site).
pub fn site_report(report: &suanwang_api::SiteReport) -> Result<()> {
    if report.backend.is_empty()
        || report.backend.len() > 32
        || !report.backend.bytes().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'-')
    {
        return Err(Error::invalid("backend", "1 to 32 characters of a-z, 0-9 and '-'"));
    }
    if report.problem.as_ref().is_some_and(|p| p.len() > 1000 || p.is_empty()) {
        return Err(Error::invalid("problem", "1 to 1000 bytes when given"));
    }
    if report.pools.len() > 64 {
        return Err(Error::invalid("pools", format!("at most 64, got {}", report.pools.len())));
    }
    for (i, p) in report.pools.iter().enumerate() {
        if p.total > 10_000_000 {
            return Err(Error::invalid(&format!("pools[{i}].total"), format!("at most 10000000, got {}", p.total)));
        }
        for (name, n) in [("usable", p.usable), ("drained", p.drained), ("down", p.down), ("reserved", p.reserved)] {
            if n > p.total {
                return Err(Error::invalid(&format!("pools[{i}].{name}"), format!("{n} of {} in all", p.total)));
            }
        }
    }
    Ok(())
}

/// Every limit of a job request that does not need the network.
pub fn job_request(req: &JobRequest) -> Result<()> {
    display_name("name", &req.name)?;
    if req.command.is_empty() && req.image.is_none() {
        return Err(Error::invalid("command", "a job needs a command (or an image)"));
    }
    if req.command.len() > MAX_COMMAND_ARGS {
        return Err(Error::invalid(
            "command",
            format!("at most {MAX_COMMAND_ARGS} arguments, got {}", req.command.len()),
        ));
    }
    if req.command.first().is_some_and(|p| p.is_empty()) {
        return Err(Error::invalid("command", "the program name is empty"));
    }
    for (i, arg) in req.command.iter().enumerate() {
        if arg.contains('\0') {
            return Err(Error::invalid("command", format!("argument {i} contains a NUL byte")));
        }
        if arg.len() > MAX_ARG_BYTES {
            return Err(Error::invalid(
                "command",
                format!("argument {i} is {} bytes, at most {MAX_ARG_BYTES}", arg.len()),
            ));
        }
    }
    env_map("env", &req.env)?;
    env_map("secret_env", &req.secret_env)?;
    if req.env.len() + req.secret_env.len() > MAX_ENV_ENTRIES {
        return Err(Error::invalid(
            "env",
            format!(
                "at most {MAX_ENV_ENTRIES} variables (env and secret_env together), got {}",
                req.env.len() + req.secret_env.len()
            ),
        ));
    }
    if let Some(key) = req.env.keys().find(|k| req.secret_env.contains_key(*k)) {
        return Err(Error::invalid("secret_env", format!("{key} is also in env")));
    }
    if let Some(image) = &req.image {
        image_reference("image", image)?;
        // A container's environment travels in a file of KEY=VALUE lines.
        for (field, env) in [("env", &req.env), ("secret_env", &req.secret_env)] {
            if let Some(key) = env.iter().find(|(_, v)| v.contains(['\n', '\r'])).map(|(k, _)| k) {
                return Err(Error::invalid(
                    field,
                    format!("the value of {key} contains a line break, which a container job cannot carry"),
                ));
            }
        }
    }
    if req.gpus == 0 || req.gpus > suanwang_core::job::MAX_GANG {
        return Err(Error::invalid(
            "gpus",
            format!("must be between 1 and {}, got {}", suanwang_core::job::MAX_GANG, req.gpus),
        ));
    }
    if req.accelerators.is_empty() {
        return Err(Error::invalid("accelerators", "must name at least one accelerator type"));
    }
    if req.accelerators.len() > MAX_ACCEPTED_TYPES {
        return Err(Error::invalid(
            "accelerators",
            format!("at most {MAX_ACCEPTED_TYPES} types, got {}", req.accelerators.len()),
        ));
    }
    let mut seen = BTreeSet::new();
    for name in &req.accelerators {
        if !seen.insert(name.as_str()) {
            return Err(Error::invalid("accelerators", format!("'{}' is listed twice", printable(name))));
        }
    }
    if req.estimate_s == 0 || req.estimate_s > suanwang_core::job::MAX_ESTIMATE_S {
        return Err(Error::invalid(
            "estimate_s",
            format!("must be between 1 and {}, got {}", suanwang_core::job::MAX_ESTIMATE_S, req.estimate_s),
        ));
    }
    if let Some(limit) = req.time_limit_s
        && (limit == 0 || limit > MAX_TIME_LIMIT_S)
    {
        return Err(Error::invalid("time_limit_s", format!("must be between 1 and {MAX_TIME_LIMIT_S}, got {limit}")));
    }
    if let Some(memory) = req.memory_mb
        && !(16..=MAX_MEMORY_MB).contains(&memory)
    {
        return Err(Error::invalid("memory_mb", format!("must be between 16 and {MAX_MEMORY_MB}, got {memory}")));
    }
    if let Some(cpus) = req.cpus
        && (cpus == 0 || cpus > MAX_CPUS)
    {
        return Err(Error::invalid("cpus", format!("must be between 1 and {MAX_CPUS}, got {cpus}")));
    }
    if req.retries > suanwang_core::job::MAX_RETRIES {
        return Err(Error::invalid(
            "retries",
            format!("must be at most {}, got {}", suanwang_core::job::MAX_RETRIES, req.retries),
        ));
    }
    if req.datasets.len() > MAX_DATASETS {
        return Err(Error::invalid("datasets", format!("at most {MAX_DATASETS} datasets, got {}", req.datasets.len())));
    }
    if let Some(deadline) = req.deadline_s
        && (deadline == 0 || deadline > MAX_DEADLINE_S)
    {
        return Err(Error::invalid("deadline_s", format!("must be between 1 and {MAX_DEADLINE_S}, got {deadline}")));
    }
    if let Some(budget) = req.budget_fen
        && !(0..=MAX_BUDGET_FEN).contains(&budget)
    {
        return Err(Error::invalid("budget_fen", format!("must be between 0 and {MAX_BUDGET_FEN}, got {budget}")));
    }
    if let Some(w) = req.weights {
        if w.time > MAX_WEIGHT || w.cost > MAX_WEIGHT || w.carbon > MAX_WEIGHT {
            return Err(Error::invalid("weights", format!("each weight must be at most {MAX_WEIGHT}")));
        }
        if w.time == 0 && w.cost == 0 && w.carbon == 0 {
            return Err(Error::invalid("weights", "time, cost and carbon weights are all zero"));
        }
    }
    if let Some(origin) = &req.origin {
        identifier("origin", origin)?;
    }
    if let Some(org) = &req.org {
        identifier("org", org)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn good() -> JobRequest {
        serde_json::from_value(serde_json::json!({
            "name": "train", "command": ["sh", "-c", "true"], "gpus": 1,
            "accelerators": ["A100"], "estimate_s": 60
        }))
        .unwrap()
    }

    fn refused(edit: impl FnOnce(&mut JobRequest), field: &str) {
        let mut req = good();
        edit(&mut req);
        let e = job_request(&req).expect_err("must be refused");
        assert_eq!(e.body.field.as_deref(), Some(field), "{}", e.body.message);
        assert_eq!(e.status, axum::http::StatusCode::BAD_REQUEST);
    }

    #[test]
    fn every_limit_names_its_field() {
        assert!(job_request(&good()).is_ok());
        refused(|r| r.name = "x".repeat(257), "name");
        refused(|r| r.name = "\u{1b}[31mred".into(), "name");
        refused(|r| r.name = "a\r\nb".into(), "name");
        refused(|r| _ = r.env.insert(String::new(), "v".into()), "env");
        refused(|r| _ = r.env.insert("A=B".into(), "v".into()), "env");
        refused(|r| _ = r.env.insert("1A".into(), "v".into()), "env");
        refused(|r| _ = r.env.insert("A\0".into(), "v".into()), "env");
        refused(|r| _ = r.env.insert("A".into(), "v\0".into()), "env");
        refused(|r| _ = r.env.insert("SUANWANG_TOKEN".into(), "v".into()), "env");
        refused(|r| _ = r.secret_env.insert("B C".into(), "v".into()), "secret_env");
        refused(
            |r| {
                r.env.insert("K".into(), "1".into());
                r.secret_env.insert("K".into(), "2".into());
            },
            "secret_env",
        );
        refused(|r| r.env = (0..257).map(|i| (format!("V{i}"), String::new())).collect(), "env");
        refused(|r| r.command = vec!["x".into(); 4097], "command");
        refused(|r| r.command = vec!["sh".into(), "a\0b".into()], "command");
        refused(|r| r.command = vec![], "command");
        refused(|r| r.accelerators = vec!["A100".into(), "A100".into()], "accelerators");
        refused(|r| r.gpus = 0, "gpus");
        refused(|r| r.estimate_s = 0, "estimate_s");
        refused(|r| r.time_limit_s = Some(0), "time_limit_s");
        refused(|r| r.time_limit_s = Some(MAX_TIME_LIMIT_S + 1), "time_limit_s");
        refused(|r| r.memory_mb = Some(1), "memory_mb");
        refused(|r| r.cpus = Some(0), "cpus");
        refused(|r| r.retries = 11, "retries");
        refused(|r| r.deadline_s = Some(0), "deadline_s");
        refused(|r| r.budget_fen = Some(-1), "budget_fen");
        refused(|r| r.image = Some("evil image;rm".into()), "image");
        refused(|r| r.origin = Some("../etc".into()), "origin");
        refused(|r| r.org = Some("Acme Corp".into()), "org");
    }

    #[test]
    fn identifiers_are_a_safe_alphabet() {
        for ok in ["acme", "jinan-icc", "a.b_c-1", "0x"] {
            assert!(identifier("id", ok).is_ok(), "{ok}");
        }
        for bad in ["", "-a", "Acme", "a b", "a/b", "a\nb", &"a".repeat(65)] {
            assert!(identifier("id", bad).is_err(), "{bad:?}");
        }
    }
}
