//! Users' Slurm batch scripts as job requests.
//!
//! The `#SBATCH` directives a user of the province's centres writes become
//! a [`JobRequest`]; the script itself becomes the command, run by the
//! interpreter of its `#!` line. As with `sbatch`, directives are read from
//! the top of the script up to its first command. A directive the network
//! cannot honour (several nodes, job arrays, dependencies) is refused with
//! its line; one it need not honour (an output file, a partition) is
//! ignored with a note, and an unknown one with a warning.

use std::collections::BTreeMap;

use crate::JobRequest;

/// A script read as a request, and what was ignored on the way.
#[derive(Debug, Clone, PartialEq)]
pub struct Parsed {
    pub request: JobRequest,
    /// `line N: --opt: ...`, one per directive ignored or defaulted.
    pub notes: Vec<String>,
}

/// Why a script cannot be a job.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SbatchError {
    #[error("line {line}: {directive}: {problem}")]
    Directive { line: usize, directive: String, problem: String },
    #[error("line 1: {0}")]
    Interpreter(String),
}

/// Largest script accepted (it travels as one argument of its interpreter).
pub const MAX_SCRIPT_BYTES: usize = 64 * 1024;

/// Does this text look like a batch script (a `#!` line, or `#SBATCH`
/// directives), rather than a job file?
pub fn is_batch_script(text: &str) -> bool {
    text.starts_with("#!") || text.lines().any(|l| l.trim_start().starts_with("#SBATCH"))
}

/// Splits a directive's words as a shell would, for the quoting users write
/// (`--job-name="my run"`, `'...'`).
fn words(text: &str) -> Result<Vec<String>, String> {
    let mut out = Vec::new();
    let mut word = String::new();
    let mut in_word = false;
    let mut quote: Option<char> = None;
    for c in text.chars() {
        match (quote, c) {
            (Some(q), c) if c == q => quote = None,
            (Some(_), c) => word.push(c),
            (None, '"' | '\'') => {
                quote = Some(c);
                in_word = true;
            }
            (None, c) if c.is_whitespace() => {
                if in_word {
                    out.push(std::mem::take(&mut word));
                    in_word = false;
                }
            }
            (None, '#') if !in_word => break,
            (None, c) => {
                word.push(c);
                in_word = true;
            }
        }
    }
    if quote.is_some() {
        return Err("an unclosed quote".into());
    }
    if in_word {
        out.push(word);
    }
    Ok(out)
}

/// Slurm's time formats: `M`, `M:S`, `H:M:S`, `D-H`, `D-H:M`, `D-H:M:S`.
pub fn parse_time(text: &str) -> Option<u64> {
    let number = |s: &str| {
        if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) { s.parse::<u64>().ok() } else { None }
    };
    // Checked all the way: a time too large to count is no time.
    let hms = |h: u64, m: u64, s: u64| h.checked_mul(3600)?.checked_add(m.checked_mul(60)?)?.checked_add(s);
    let (days, rest) = match text.split_once('-') {
        Some((d, rest)) => (number(d)?, Some(rest)),
        None => (0, None),
    };
    let seconds = match rest {
        Some(rest) => {
            let parts: Vec<&str> = rest.split(':').collect();
            match parts.as_slice() {
                [h] => hms(number(h)?, 0, 0)?,
                [h, m] => hms(number(h)?, number(m)?, 0)?,
                [h, m, s] => hms(number(h)?, number(m)?, number(s)?)?,
                _ => return None,
            }
        }
        None => {
            let parts: Vec<&str> = text.split(':').collect();
            match parts.as_slice() {
                [m] => hms(0, number(m)?, 0)?,
                [m, s] => hms(0, number(m)?, number(s)?)?,
                [h, m, s] => hms(number(h)?, number(m)?, number(s)?)?,
                _ => return None,
            }
        }
    };
    days.checked_mul(86_400)?.checked_add(seconds).filter(|&s| s > 0)
}

/// Slurm's memory sizes: a number of MiB, or with a `K`, `M`, `G` or `T` suffix.
fn parse_mem_mb(text: &str) -> Option<u64> {
    let (digits, factor_kb) = match text.char_indices().last()? {
        (i, 'K' | 'k') => (&text[..i], 1),
        (i, 'M' | 'm') => (&text[..i], 1024),
        (i, 'G' | 'g') => (&text[..i], 1024 * 1024),
        (i, 'T' | 't') => (&text[..i], 1024 * 1024 * 1024),
        _ => (text, 1024),
    };
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let kb = digits.parse::<u64>().ok()?.checked_mul(factor_kb)?;
    Some(kb.div_ceil(1024)).filter(|&mb| mb > 0)
}

/// The network's name for a Slurm GPU type (`a100` is `A100`, `910b` is
/// `Ascend910B`): the same letters, or the same after a vendor's prefix.
fn accelerator_for(gres_type: &str, network: &[String]) -> Option<String> {
    let want = gres_type.to_ascii_lowercase();
    network
        .iter()
        .find(|a| a.to_ascii_lowercase() == want)
        .or_else(|| network.iter().find(|a| a.to_ascii_lowercase().ends_with(&want) && want.len() >= 3))
        .cloned()
}

/// The command that runs the script as `sbatch` would: its `#!`
/// interpreter (with its arguments) given the script to run.
fn command_for(script: &str) -> Result<Vec<String>, SbatchError> {
    let first = script.lines().next().unwrap_or_default();
    let interpreter: Vec<String> = match first.strip_prefix("#!") {
        Some(line) => line.split_whitespace().map(str::to_string).collect(),
        None => vec!["/bin/sh".into()],
    };
    let program = interpreter
        .iter()
        .rev()
        .find(|w| !w.starts_with('-'))
        .map(|w| w.rsplit('/').next().unwrap_or(w).to_string())
        .ok_or_else(|| SbatchError::Interpreter("an empty #! line".into()))?;
    let shells = ["sh", "bash", "dash", "zsh", "ksh", "python", "python3"];
    if !shells.contains(&program.as_str()) {
        return Err(SbatchError::Interpreter(format!(
            "the interpreter '{program}' cannot be given a script to run (sh, bash, dash, zsh, ksh or python)"
        )));
    }
    let mut command = interpreter;
    command.push("-c".into());
    command.push(script.to_string());
    Ok(command)
}

/// Reads a batch script as a job request for a network whose accelerator
/// types are `network`.
pub fn parse(script: &str, network: &[String]) -> Result<Parsed, SbatchError> {
    if script.len() > MAX_SCRIPT_BYTES {
        return Err(SbatchError::Interpreter(format!(
            "the script is {} bytes, more than {MAX_SCRIPT_BYTES}",
            script.len()
        )));
    }
    let command = command_for(script)?;
    let mut notes = Vec::new();
    let mut name = String::new();
    let mut gpus: Option<(u32, Option<String>, usize)> = None;
    let mut time_limit: Option<u64> = None;
    let mut cpus: Option<u32> = None;
    let mut mem: Option<(u64, &'static str, usize)> = None;
    for (i, raw) in script.lines().enumerate() {
        let line = i + 1;
        let text = raw.trim();
        if i == 0 && text.starts_with("#!") {
            continue;
        }
        // Like sbatch: directives until the first command.
        if !text.is_empty() && !text.starts_with('#') {
            break;
        }
        let Some(rest) = text.strip_prefix("#SBATCH") else { continue };
        let refuse =
            |directive: &str, problem: String| SbatchError::Directive { line, directive: directive.into(), problem };
        let tokens = words(rest).map_err(|p| refuse("#SBATCH", p))?;
        let mut k = 0;
        while k < tokens.len() {
            let token = &tokens[k];
            k += 1;
            // `--opt=value`, `--opt value`, `-X value`, `-Xvalue`.
            let (option, inline) = match token.split_once('=') {
                Some((o, v)) if o.starts_with("--") => (o.to_string(), Some(v.to_string())),
                _ if token.starts_with('-') && !token.starts_with("--") && token.len() > 2 => {
                    (token[..2].to_string(), Some(token[2..].to_string()))
                }
                _ => (token.clone(), None),
            };
            let takes_value =
                !matches!(option.as_str(), "--exclusive" | "--requeue" | "--no-requeue" | "--hold" | "-H");
            let value = match (inline, takes_value) {
                (Some(v), _) => v,
                (None, false) => String::new(),
                (None, true) => {
                    let v = tokens.get(k).cloned().ok_or_else(|| refuse(&option, "needs a value".into()))?;
                    k += 1;
                    v
                }
            };
            let count = |v: &str| v.parse::<u32>().ok().filter(|n| *n >= 1);
            match option.as_str() {
                "--job-name" | "-J" => name = value,
                "--gres" => {
                    let mut gpu = None;
                    for item in value.split(',') {
                        let parts: Vec<&str> = item.split(':').collect();
                        match parts.as_slice() {
                            ["gpu"] => gpu = Some((1, None)),
                            ["gpu", n] if count(n).is_some() => gpu = Some((count(n).unwrap_or(1), None)),
                            ["gpu", t, n] if count(n).is_some() => {
                                gpu = Some((count(n).unwrap_or(1), Some(t.to_string())))
                            }
                            ["gpu", t] => gpu = Some((1, Some(t.to_string()))),
                            _ => notes.push(format!("line {line}: --gres={item}: not a GPU, ignored")),
                        }
                    }
                    if let Some((n, t)) = gpu {
                        gpus = Some((n, t, line));
                    }
                }
                "--gpus" | "-G" | "--gpus-per-node" | "--gpus-per-task" => {
                    let parts: Vec<&str> = value.split(':').collect();
                    let wanted = match parts.as_slice() {
                        [n] => count(n).map(|n| (n, None)),
                        [t, n] => count(n).map(|n| (n, Some(t.to_string()))),
                        _ => None,
                    };
                    let (n, t) = wanted.ok_or_else(|| refuse(&option, format!("'{value}' is not [type:]count")))?;
                    gpus = Some((n, t, line));
                }
                "--time" | "-t" => {
                    time_limit = Some(parse_time(&value).ok_or_else(|| {
                        refuse(&option, format!("'{value}' is not a time (minutes, M:S, H:M:S, D-H, D-H:M or D-H:M:S)"))
                    })?);
                }
                "--cpus-per-task" | "-c" => {
                    cpus = Some(count(&value).ok_or_else(|| refuse(&option, format!("'{value}' is not a count")))?);
                }
                "--mem" | "--mem-per-gpu" | "--mem-per-cpu" => {
                    let mb = parse_mem_mb(&value).ok_or_else(|| refuse(&option, format!("'{value}' is not a size")))?;
                    let per = match option.as_str() {
                        "--mem" => "job",
                        "--mem-per-gpu" => "gpu",
                        _ => "cpu",
                    };
                    mem = Some((mb, per, line));
                }
                "--nodes" | "-N" => {
                    if !matches!(value.as_str(), "1" | "1-1") {
                        return Err(refuse(
                            &option,
                            format!(
                                "{value} nodes cannot be honoured: a job of the network runs on one node of one site"
                            ),
                        ));
                    }
                }
                "--ntasks" | "-n" | "--ntasks-per-node" => {
                    if value != "1" {
                        return Err(refuse(
                            &option,
                            format!(
                                "{value} tasks cannot be honoured: a job runs as one task (use --cpus-per-task for threads)"
                            ),
                        ));
                    }
                }
                "--array" | "-a" => {
                    return Err(refuse(&option, "job arrays cannot be honoured: submit each job".into()));
                }
                "--dependency" | "-d" => {
                    return Err(refuse(
                        &option,
                        "dependencies cannot be honoured: submit the job when the other ended".into(),
                    ));
                }
                "--output" | "-o" | "--error" | "-e" | "--open-mode" => notes.push(format!(
                    "line {line}: {option}: ignored: the job's output is kept as its log (suanwang logs ID)"
                )),
                "--partition" | "-p" | "--account" | "-A" | "--qos" | "-q" | "--reservation" | "--constraint"
                | "-C" | "--nodelist" | "-w" | "--exclude" | "-x" => notes
                    .push(format!("line {line}: {option}: ignored: the network chooses the site and its partition")),
                "--mail-type" | "--mail-user" | "--chdir" | "-D" | "--export" | "--exclusive" | "--requeue"
                | "--no-requeue" | "--comment" | "--signal" => {
                    notes.push(format!("line {line}: {option}: ignored"));
                }
                other => notes.push(format!("line {line}: {other}: unknown directive, ignored")),
            }
        }
    }
    let (count, accelerators) = match gpus {
        None => {
            return Err(SbatchError::Directive {
                line: 1,
                directive: "--gres".into(),
                problem: "the script asks for no GPU (--gres=gpu[:type]:N or --gpus): every job of the network runs on accelerators".into(),
            });
        }
        Some((n, None, _)) => (n, network.to_vec()),
        Some((n, Some(t), line)) => match accelerator_for(&t, network) {
            Some(a) => (n, vec![a]),
            None => {
                return Err(SbatchError::Directive {
                    line,
                    directive: "--gres".into(),
                    problem: format!("GPU type '{t}' is not an accelerator of the network ({})", network.join(", ")),
                });
            }
        },
    };
    let memory_mb = mem.map(|(mb, per, _)| match per {
        "gpu" => mb.saturating_mul(count as u64),
        "cpu" => mb.saturating_mul(cpus.unwrap_or(1) as u64),
        _ => mb,
    });
    let estimate_s = match time_limit {
        Some(t) => t,
        None => {
            notes.push("no --time: the estimate and the time limit default to one hour".into());
            3600
        }
    };
    let request = JobRequest {
        name,
        command,
        env: BTreeMap::new(),
        secret_env: BTreeMap::new(),
        image: None,
        gpus: count,
        accelerators,
        // What the user gave as the limit is all the scheduler is told:
        // it plans with it, as Slurm's backfill does.
        estimate_s,
        time_limit_s: Some(time_limit.unwrap_or(3600)),
        memory_mb,
        cpus,
        retries: 0,
        datasets: Vec::new(),
        deadline_s: None,
        budget_fen: None,
        weights: None,
        origin: None,
        org: None,
    };
    Ok(Parsed { request, notes })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn network() -> Vec<String> {
        ["H100", "A100", "Ascend910B", "V100"].map(String::from).to_vec()
    }

    #[test]
    fn a_gpu_training_script_becomes_its_request() {
        let script = "#!/bin/bash\n#SBATCH --job-name=\"llama ft\"\n#SBATCH --gres=gpu:a100:2 --time=01:00:00\n#SBATCH -c 8\n#SBATCH --mem=64G\n#SBATCH --output=train-%j.out\n\nsrun python train.py\n#SBATCH --gres=gpu:h100:8\n";
        let p = parse(script, &network()).unwrap();
        let r = &p.request;
        assert_eq!((r.name.as_str(), r.gpus, r.accelerators.clone()), ("llama ft", 2, vec!["A100".to_string()]));
        assert_eq!((r.time_limit_s, r.estimate_s, r.cpus, r.memory_mb), (Some(3600), 3600, Some(8), Some(65536)));
        assert_eq!(r.command, vec!["/bin/bash".to_string(), "-c".into(), script.into()]);
        // Directives after the first command are not directives, as for sbatch.
        assert_eq!(p.notes, vec!["line 6: --output: ignored: the job's output is kept as its log (suanwang logs ID)"]);
    }

    #[test]
    fn refusals_name_the_line() {
        let err = |s: &str| parse(s, &network()).unwrap_err().to_string();
        assert_eq!(
            err("#!/bin/sh\n#SBATCH --gres=gpu:2\n#SBATCH --nodes=4\necho"),
            "line 3: --nodes: 4 nodes cannot be honoured: a job of the network runs on one node of one site"
        );
        assert!(
            err("#!/bin/sh\n#SBATCH --gres=gpu:tpu:2\n")
                .starts_with("line 2: --gres: GPU type 'tpu' is not an accelerator")
        );
        assert!(err("#!/bin/sh\n#SBATCH -c 4\necho cpu only\n").contains("asks for no GPU"));
        assert!(
            err("#!/bin/sh\n#SBATCH --gpus=1 --time=forever\n").starts_with("line 2: --time: 'forever' is not a time")
        );
        assert!(err("#!/bin/sh\n#SBATCH --gpus=1\n#SBATCH --array=0-9\n").starts_with("line 3: --array"));
        assert!(err("#!/usr/bin/perl\n#SBATCH --gpus=1\n").starts_with("line 1: the interpreter 'perl'"));
        assert!(err("#!/bin/sh\n#SBATCH --job-name=\"open\n").starts_with("line 2: #SBATCH: an unclosed quote"));
    }

    #[test]
    fn gpus_in_every_spelling_and_types_of_the_network() {
        let one = |d: &str| parse(&format!("#!/bin/sh\n#SBATCH {d}\n"), &network()).unwrap().request;
        assert_eq!(one("--gres=gpu:910b:4").accelerators, vec!["Ascend910B".to_string()]);
        assert_eq!((one("--gpus=h100:3").gpus, one("-G 2").gpus, one("--gres=gpu").gpus), (3, 2, 1));
        assert_eq!(one("--gres=gpu:2").accelerators, network(), "no type: any accelerator of the network");
        assert_eq!(one("--gpus=2 --mem-per-gpu=10G").memory_mb, Some(20 * 1024));
        assert_eq!(one("--gpus=1 -c4 --mem-per-cpu=512M").memory_mb, Some(2048));
        let unknown = parse("#!/bin/sh\n#SBATCH --gpus=1 --frobnicate=3\n", &network()).unwrap();
        assert_eq!(unknown.notes[0], "line 2: --frobnicate: unknown directive, ignored");
    }

    proptest::proptest! {
        /// Any script: a request or a refusal naming its line, never a panic;
        /// and a request asks for what the directives said.
        #[test]
        fn any_script_is_a_request_or_a_refusal_with_its_line(
            lines in proptest::collection::vec(
                proptest::prop_oneof![
                    "#SBATCH --[a-z-]{1,12}(=[a-z0-9:,-]{0,12})?",
                    "#SBATCH -[a-zA-Z] ?[a-z0-9:]{0,8}",
                    "#SBATCH --gres=gpu(:[a-z0-9]{1,5})?(:[0-9]{1,3})?",
                    "#SBATCH --time=[0-9:-]{1,12}",
                    "#SBATCH --mem=[0-9]{1,22}[KMGT]?",
                    "[a-z #\"']{0,20}",
                ],
                0..8,
            )
        ) {
            let script = format!("#!/bin/sh\n{}\n", lines.join("\n"));
            match parse(&script, &network()) {
                Ok(p) => {
                    proptest::prop_assert!(p.request.gpus >= 1);
                    proptest::prop_assert!(!p.request.accelerators.is_empty());
                    proptest::prop_assert!(p.request.estimate_s >= 1);
                    proptest::prop_assert_eq!(p.request.command.last(), Some(&script));
                }
                Err(e) => proptest::prop_assert!(e.to_string().starts_with("line "), "{}", e),
            }
        }
    }

    #[test]
    fn slurm_times() {
        for (text, seconds) in
            [("90", 5400), ("10:30", 630), ("1:00:00", 3600), ("2-0", 172_800), ("1-2:3", 93_780), ("1-0:0:1", 86_401)]
        {
            assert_eq!(parse_time(text), Some(seconds), "{text}");
        }
        for bad in ["", "0", "-1", "1:2:3:4", "a", "1-", "9999999999999999999"] {
            assert_eq!(parse_time(bad), None, "{bad}");
        }
    }
}
