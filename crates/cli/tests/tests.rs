//! End-to-end tests of the `suanwang` binary: `simulate` in both output
//! formats, the report, determinism, every bad-input path, `topology`, the
//! ledger commands, and the running platform: `platform` (a job's life,
//! recovery, tenancy), `hostile` (the platform under attack by tenants),
//! `containers` (jobs given as images, under podman) and `conformance`
//! (every operation against the OpenAPI document).

mod conformance;
mod containers;
mod hostile;
mod platform;
mod slurm;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

fn suanwang(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_suanwang")).args(args).output().expect("binary runs")
}

fn excerpt() -> String {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../sim/tests/data/itp-cluster06-400.csv")
        .to_string_lossy()
        .to_string()
}

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("suanwang-cli-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).to_string()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).to_string()
}

fn json_run(extra: &[&str]) -> Value {
    let trace = excerpt();
    let mut args = vec!["simulate", "--trace", trace.as_str(), "--format", "json"];
    args.extend_from_slice(extra);
    let o = suanwang(&args);
    assert!(o.status.success(), "{}", stderr(&o));
    // Exactly one JSON object on stdout, and a silent stderr when it is not a terminal.
    let text = stdout(&o);
    assert_eq!(text.trim().lines().count(), 1, "{text}");
    assert_eq!(stderr(&o), "");
    serde_json::from_str(&text).expect("valid JSON")
}

#[test]
fn simulate_json_has_every_field_for_every_policy() {
    let v = json_run(&["--policy", "all", "--seed", "3", "--load", "0.8"]);
    assert_eq!(v["jobs"], 400);
    assert_eq!(v["seed"], 3);
    assert_eq!(v["load"], 0.8);
    assert!(v["trace"].as_str().unwrap().ends_with("itp-cluster06-400.csv"));
    let policies = v["policies"].as_array().unwrap();
    let names: Vec<&str> = policies.iter().map(|p| p["policy"].as_str().unwrap()).collect();
    assert_eq!(names, ["local", "fifo", "sjf", "fair", "las", "cheapest", "network"]);
    for p in policies {
        for key in [
            "jobs_completed",
            "mean_jct_s",
            "p50_jct_s",
            "p95_jct_s",
            "p99_jct_s",
            "mean_wait_s",
            "makespan_s",
            "utilization",
            "compute_cost_fen",
            "transfer_cost_fen",
            "transfer_gb",
            "carbon_kg",
            "jain_fairness",
            "preemptions",
            "wall_ms",
        ] {
            assert!(p.get(key).is_some_and(|x| x.is_number()), "{key} missing for {}", p["policy"]);
        }
        assert_eq!(p["jobs_completed"], 400);
    }
}

#[test]
fn simulate_says_which_estimates_the_scheduler_had_and_how_good_they_were() {
    let v = json_run(&["--policy", "fifo,network", "--estimates", "history"]);
    for p in v["policies"].as_array().unwrap() {
        let e = &p["estimates"];
        assert_eq!((e["estimator"].as_str(), e["oracle"].as_bool()), (Some("history"), Some(false)), "{p}");
        assert!(e["under_share"].as_f64().unwrap() > 0.0 && e["median_ratio"].as_f64().unwrap() > 0.0, "{e}");
    }
    let v = json_run(&["--policy", "fifo", "--estimates", "exact"]);
    assert_eq!(v["policies"][0]["estimates"]["oracle"], true);
    let v = json_run(&["--policy", "fifo"]);
    assert_eq!(v["policies"][0]["estimates"]["estimator"], "noisy:1-2", "the default until issue 10 changes it");
    let trace = excerpt();
    let o = suanwang(&["simulate", "--trace", &trace, "--policy", "fifo", "--estimates", "exact"]);
    assert!(stdout(&o).contains("exact (ORACLE)"), "{}", stdout(&o));
}

#[test]
fn simulate_is_deterministic_apart_from_wall_time() {
    let strip = |mut v: Value| {
        for p in v["policies"].as_array_mut().unwrap() {
            p.as_object_mut().unwrap().remove("wall_ms");
        }
        v
    };
    let a = strip(json_run(&["--policy", "network,las,fifo", "--seed", "9"]));
    let b = strip(json_run(&["--policy", "network,las,fifo", "--seed", "9"]));
    assert_eq!(a, b);
    let c = strip(json_run(&["--policy", "network,las,fifo", "--seed", "10"]));
    assert_ne!(a, c);
}

#[test]
fn simulate_defaults_run_the_bundled_trace_as_a_table() {
    let o = suanwang(&["simulate", "--policy", "fifo,network"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let text = stdout(&o);
    assert!(text.starts_with("trace itp-cluster01 (1595 jobs) on shandong"), "{text}");
    assert!(
        text.contains("mean JCT s")
            && text.lines().any(|l| l.starts_with("network"))
            && text.lines().any(|l| l.starts_with("fifo"))
    );
}

#[test]
fn simulate_writes_an_html_report() {
    let dir = temp_dir("report");
    let trace = excerpt();
    let o = suanwang(&["simulate", "--trace", &trace, "--policy", "fifo,network", "--report", dir.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    let page = std::fs::read_to_string(dir.join("index.html")).unwrap();
    assert!(page.starts_with("<!doctype html>"));
    assert_eq!(page.matches("<svg").count(), 4);
}

#[test]
fn other_formats_and_column_maps_run() {
    let gavel = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../trace/tests/data/gavel.trace");
    let o = suanwang(&["simulate", "--trace", gavel.to_str().unwrap(), "--policy", "network", "--format", "json"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let dir = temp_dir("csv");
    let csv = dir.join("jobs.csv");
    std::fs::write(&csv, "start,secs,n,team\n0,3600,4,a\n60,7200,8,b\n120,600,1,a\n").unwrap();
    let o = suanwang(&[
        "simulate",
        "--trace",
        csv.to_str().unwrap(),
        "--trace-format",
        "csv",
        "--columns",
        "submit=start,duration=secs,gpus=n,user=team",
        "--policy",
        "network",
        "--format",
        "json",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(v["policies"][0]["jobs_completed"], 3);
    // A requested-time column: the users' own estimates (three times the
    // truth, and one asked nothing and gets the history's hour).
    let asked = dir.join("asked.csv");
    std::fs::write(
        &asked,
        "start,secs,n,req
0,3600,4,10800
60,7200,8,21600
120,600,1,
",
    )
    .unwrap();
    let args = |estimates: &str, file: &Path| {
        let mut a: Vec<String> = ["simulate", "--trace", file.to_str().unwrap(), "--trace-format", "csv", "--columns"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        a.push("submit=start,duration=secs,gpus=n,estimate=req".into());
        a.extend(["--policy", "fifo", "--format", "json", "--estimates", estimates].map(String::from));
        a
    };
    let o = suanwang(&args("user", &asked).iter().map(String::as_str).collect::<Vec<_>>());
    assert!(o.status.success(), "{}", stderr(&o));
    let v: Value = serde_json::from_str(&stdout(&o)).unwrap();
    let e = &v["policies"][0]["estimates"];
    assert_eq!(
        (e["estimator"].as_str(), e["median_ratio"].as_f64(), e["p90_ratio"].as_f64()),
        (Some("user"), Some(3.0), Some(6.0)),
        "{e}"
    );
    // A trace without one cannot give user estimates.
    let o = suanwang(&["simulate", "--trace", &excerpt(), "--estimates", "user"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("--estimates user: the trace records no requested run times"), "{}", stderr(&o));
}

fn fails_with(args: &[&str], expected: &str) {
    let o = suanwang(args);
    assert_eq!(o.status.code(), Some(1), "{args:?} should fail: {}", stdout(&o));
    let err = stderr(&o);
    assert!(err.contains(expected), "{args:?}: expected '{expected}' in: {err}");
    assert_eq!(stdout(&o), "", "nothing on stdout on failure");
}

#[test]
fn bad_input_gets_a_clear_error_and_a_failing_exit() {
    let dir = temp_dir("bad");
    fails_with(&["simulate", "--policy", "fifo,magic"], "--policy: unknown policy 'magic'");
    // A bad value of an option is a usage error (exit 2), named by clap.
    for (value, expected) in [("noisy:2-1", "0 < LO < HI"), ("psychic", "'psychic' is not an estimator")] {
        let o = suanwang(&["simulate", "--estimates", value]);
        assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
        assert!(stderr(&o).contains("--estimates") && stderr(&o).contains(expected), "{}", stderr(&o));
    }
    fails_with(
        &["simulate", "--trace", "/nonexistent.csv", "--trace-format", "itp"],
        "/nonexistent.csv:0: cannot read",
    );
    let bad = dir.join("bad.csv");
    std::fs::write(&bad, "job_id,submission_time,duration,num_gpu\na,0,100,1\nb,10,ten,1\n").unwrap();
    fails_with(
        &["simulate", "--trace", bad.to_str().unwrap()],
        &format!("{}:3: duration: 'ten' is not a number of seconds", bad.display()),
    );
    let topo = dir.join("net.toml");
    std::fs::write(&topo, "name = \"x\"\n[[accelerator]]\ntype = \"A100\"\nspeed = 1.0\nmemory_gb = 80\npower_w = 400\ndomestic = false\n").unwrap();
    fails_with(
        &["simulate", "--topology", topo.to_str().unwrap()],
        &format!("{}: topology: has no [[site]] entries", topo.display()),
    );
    fails_with(&["simulate", "--load=-1"], "--load must be a positive number, got -1");
    fails_with(&["simulate", "--load", "0"], "--load must be a positive number, got 0");
    fails_with(&["simulate", "--columns", "submit=a"], "--columns needs --trace-format csv");
    fails_with(&["simulate", "--trace-format", "csv"], "--trace-format csv needs --columns");
    fails_with(&["simulate", "--trace-format", "slurm"], "unknown trace format 'slurm'");
    let empty = dir.join("empty.csv");
    std::fs::write(&empty, "job_id,submission_time,duration,num_gpu\n").unwrap();
    fails_with(&["simulate", "--trace", empty.to_str().unwrap()], "the trace has no jobs");
    // Usage errors are clap's: exit code 2.
    let o = suanwang(&["simulate", "--format", "xml"]);
    assert_eq!(o.status.code(), Some(2));
}

#[test]
fn topology_prints_the_bundled_network() {
    let o = suanwang(&["topology", "shandong"]);
    assert!(o.status.success());
    let text = stdout(&o);
    assert!(text.starts_with("shandong: 24 sites"), "{text}");
    assert!(text.contains("jinan-scc") && text.contains("hub-qingyang") && text.contains("Illustrative"));
    assert!(Path::new(env!("CARGO_BIN_EXE_suanwang")).exists());
}

fn ledger(db: &Path, args: &[&str]) -> Output {
    let mut all = vec!["ledger", "--db", db.to_str().unwrap(), "--now", "2026-03-01"];
    all.extend_from_slice(args);
    suanwang(&all)
}

fn ledger_ok(db: &Path, args: &[&str]) -> String {
    let o = ledger(db, args);
    assert!(o.status.success(), "{args:?}: {}", stderr(&o));
    stdout(&o)
}

#[test]
fn ledger_voucher_flow_from_the_command_line() {
    let db = temp_dir("ledger").join("books.db");
    ledger_ok(&db, &["init"]);
    ledger_ok(&db, &["org", "acme", "--kind", "enterprise", "--name", "Acme AI"]);
    ledger_ok(
        &db,
        &[
            "programme",
            "create",
            "--issuer",
            "sd-bureau",
            "--id",
            "sd-2026",
            "--budget-fen",
            "1000000",
            "--from",
            "2026-01-01",
            "--until",
            "2027-01-01",
            "--kinds",
            "enterprise,university",
            "--org-year-cap-fen",
            "300000",
            "--job-cap-fen",
            "100000",
        ],
    );
    ledger_ok(&db, &["deposit", "acme", "100000", "--id", "a1"]);
    ledger_ok(&db, &["grant", "sd-2026", "acme", "50000", "--id", "a2"]);
    // Repeating a transfer id is safe.
    ledger_ok(&db, &["grant", "sd-2026", "acme", "50000", "--id", "a2"]);
    let quote: Value = serde_json::from_str(&ledger_ok(
        &db,
        &["--json", "quote", "acme", "--site", "jinan-icc", "--accel", "Ascend910B", "--accel-seconds", "36000"],
    ))
    .unwrap();
    // 10 hours at 6.50 yuan: 6,500 fen, 30% domestic.
    assert_eq!((quote["compute_fen"].as_i64(), quote["subsidy_fen"].as_i64()), (Some(6500), Some(1950)));
    ledger_ok(
        &db,
        &[
            "hold",
            "job-1",
            "acme",
            "--site",
            "jinan-icc",
            "--accel",
            "Ascend910B",
            "--accel-seconds",
            "36000",
            "--transfer-fen",
            "300",
        ],
    );
    let settled: Value = serde_json::from_str(&ledger_ok(
        &db,
        &["--json", "settle", "job-1", "--accel-seconds", "18000", "--transfer-fen", "300"],
    ))
    .unwrap();
    assert_eq!(settled["bill"]["subsidy_fen"].as_i64(), Some(975));
    // A settled job's bill is not held again.
    let again = ledger(
        &db,
        &[
            "hold",
            "job-1",
            "acme",
            "--site",
            "jinan-icc",
            "--accel",
            "Ascend910B",
            "--accel-seconds",
            "36000",
            "--transfer-fen",
            "300",
        ],
    );
    assert_eq!(again.status.code(), Some(1));
    assert!(stderr(&again).contains("[already_settled]"), "{}", stderr(&again));
    let csv =
        ledger_ok(&db, &["statement", "jinan-icc-co", "--from", "2026-01-01", "--to", "2027-01-01", "--format", "csv"]);
    assert!(csv.starts_with("job,org,site,accel,programme,settled_at,accel_seconds"), "{csv}");
    assert!(csv.contains("job-1,acme,jinan-icc,Ascend910B,sd-2026,"));
    let report: Value = serde_json::from_str(&ledger_ok(&db, &["report", "--format", "json"])).unwrap();
    assert_eq!(report[0]["spent_fen"].as_i64(), Some(975));
    let text = ledger_ok(&db, &["accounts"]);
    assert!(text.contains("wallet") && text.contains("voucher"));
    let o = suanwang(&["ledger", "verify", db.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stdout(&o).contains(": ok: "), "{}", stdout(&o));
    // The head an auditor keeps, and gives back later.
    let out = stdout(&o);
    let head = out.lines().find_map(|l| l.strip_prefix("head ")).unwrap_or_else(|| panic!("{out}")).to_string();
    let o = suanwang(&["ledger", "verify", db.to_str().unwrap(), "--expect-head", &head]);
    assert!(o.status.success() && stdout(&o).contains("extends the expected head"), "{}", stderr(&o));
    let (seq, _) = head.split_once(':').unwrap();
    let forged = format!("{seq}:{}", "ab".repeat(32));
    let o = suanwang(&["ledger", "verify", db.to_str().unwrap(), "--expect-head", &forged]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("history was rewritten"), "{}", stderr(&o));
    let o = suanwang(&["ledger", "verify", db.to_str().unwrap(), "--expect-head", "nonsense"]);
    assert_eq!(o.status.code(), Some(2), "a malformed head is a usage error");
    // Signed checkpoints: the operator signs the head, the auditor keeps it.
    let dir = db.parent().unwrap();
    let key = dir.join("operator.key");
    let _ = std::fs::remove_file(&key);
    let public = ledger_ok(&db, &["keygen", "--out", key.to_str().unwrap()]).trim().to_string();
    assert_eq!(public.len(), 64, "{public}");
    let earlier = dir.join("earlier-copy.db");
    std::fs::copy(&db, &earlier).unwrap();
    ledger_ok(&db, &["deposit", "acme", "1", "--id", "c1"]);
    let kept = dir.join("checkpoint.json");
    ledger_ok(&db, &["checkpoint", "--key", key.to_str().unwrap(), "--out", kept.to_str().unwrap()]);
    let anchored = |path: &Path, file: &Path, key: &str| {
        suanwang(&["ledger", "verify", path.to_str().unwrap(), "--anchor", file.to_str().unwrap(), "--public-key", key])
    };
    let o = anchored(&db, &kept, &public);
    assert!(o.status.success() && stdout(&o).contains("extends the expected head"), "{}", stderr(&o));
    // A checkpoint anyone could have signed proves nothing: the key is required.
    let o = suanwang(&["ledger", "verify", db.to_str().unwrap(), "--anchor", kept.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("--public-key"), "{}", stderr(&o));
    // The book named by --db, as on every command.
    let o = suanwang(&["ledger", "verify", "--db", db.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    // The book without its last commit (an older copy) does not reach the head.
    let o = anchored(&earlier, &kept, &public);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("before the anchored entry"), "{}", stderr(&o));
    // Another key, or an edited checkpoint, is refused.
    let o = anchored(&db, &kept, &"0".repeat(64));
    assert!(
        stderr(&o).contains("[bad_checkpoint]") && stderr(&o).contains("not by the expected key"),
        "{}",
        stderr(&o)
    );
    let text = std::fs::read_to_string(&kept).unwrap();
    let v: Value = serde_json::from_str(&text).unwrap();
    let forged = dir.join("forged.json");
    std::fs::write(&forged, text.replace(&format!("\"seq\": {}", v["seq"]), "\"seq\": 1")).unwrap();
    let o = anchored(&db, &forged, &public);
    assert!(stderr(&o).contains("does not verify"), "{}", stderr(&o));
    // A key is never overwritten.
    assert_eq!(ledger(&db, &["keygen", "--out", key.to_str().unwrap()]).status.code(), Some(1));
    // A declared relation stops the subsidy.
    ledger_ok(&db, &["relate", "acme", "jinan-icc-co", "--why", "acme holds 51% of the centre"]);
    let quote =
        ledger_ok(&db, &["quote", "acme", "--site", "jinan-icc", "--accel", "Ascend910B", "--accel-seconds", "3600"]);
    assert!(quote.contains("[related_party]"), "{quote}");
}

#[test]
fn ledger_refusals_name_their_code_and_change_nothing() {
    let db = temp_dir("ledger-bad").join("books.db");
    ledger_ok(&db, &["org", "acme", "--kind", "enterprise"]);
    let fails = |args: &[&str], expected: &str| {
        let o = ledger(&db, args);
        assert_eq!(o.status.code(), Some(1), "{args:?}");
        assert!(stderr(&o).contains(expected), "{args:?}: {}", stderr(&o));
    };
    fails(&["org", "x", "--kind", "club"], "must be enterprise, university or institute");
    fails(&["deposit", "acme", "10", "--id", "xyz"], "--id: transfer id must be hex digits");
    fails(&["deposit", "nobody", "10", "--id", "1"], "[not_found] organisation 'nobody' not found");
    fails(
        &["deposit", "acme", "--id", "1", "--", "-10"],
        "[invalid_argument] invalid amount: must be positive, got -10",
    );
    ledger_ok(
        &db,
        &[
            "programme",
            "create",
            "--issuer",
            "sd-bureau",
            "--id",
            "p",
            "--budget-fen",
            "100",
            "--from",
            "2026-01-01",
            "--until",
            "2027-01-01",
            "--org-year-cap-fen",
            "100",
            "--job-cap-fen",
            "100",
        ],
    );
    fails(&["grant", "p", "acme", "101", "--id", "2"], "[programme_exhausted]");
    fails(
        &[
            "programme",
            "create",
            "--issuer",
            "sd-bureau",
            "--id",
            "q",
            "--budget-fen",
            "100",
            "--from",
            "2027-01-01",
            "--until",
            "2026-01-01",
            "--org-year-cap-fen",
            "1",
            "--job-cap-fen",
            "1",
        ],
        "valid_until",
    );
    fails(
        &["quote", "acme", "--site", "atlantis", "--accel", "H100", "--accel-seconds", "10"],
        "--site: no site 'atlantis'",
    );
    fails(&["settle", "ghost", "--accel-seconds", "10"], "[not_found] job 'ghost' not found");
    // Ids from one safe alphabet, so that account names cannot collide
    // (`card x --accel y:z` against `card x:y --accel z`), and accelerator
    // types of the network only.
    fails(&["org", "x:y", "--kind", "enterprise"], "[invalid_argument] invalid org: 'x:y' is not an id");
    fails(&["org", &"a".repeat(100_000), "--kind", "enterprise"], "is not an id");
    fails(
        &["card", "acme", "--accel", "y:z", "--hours", "1", "--price-fen", "1", "--id", "90"],
        "[unknown_accelerator]",
    );
    fails(
        &["card", "acme", "--accel", "H1OO-typo", "--hours", "1", "--price-fen", "1", "--id", "91"],
        "'H1OO-typo' is not an accelerator type",
    );
    // Times and timeouts that would wrap are refused with a code.
    let o = suanwang(&["ledger", "--db", db.to_str().unwrap(), "--now", "9223372036854775000", "init"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("[invalid_time]"), "{}", stderr(&o));
    fails(
        &[
            "hold",
            "job-x",
            "acme",
            "--site",
            "jinan-icc",
            "--accel",
            "Ascend910B",
            "--accel-seconds",
            "10",
            "--timeout-s",
            "9223372036854775807",
        ],
        "[timeout_too_long]",
    );
    // Corrections move money only along permitted flows, with a reason.
    ledger_ok(&db, &["deposit", "acme", "500", "--id", "a0"]);
    ledger_ok(&db, &["grant", "p", "acme", "50", "--id", "a1"]);
    for (debit, credit) in [
        ("voucher:p:acme", "wallet:acme"),
        ("programme:p", "wallet:acme"),
        ("treasury", "programme:p"),
        ("wallet:acme", "voucher:p:acme"),
        ("wallet:acme", "treasury"),
    ] {
        fails(
            &["transfer", "--id", "78", "--debit", debit, "--credit", credit, "--amount", "1", "--reason", "x"],
            "[flow_not_permitted]",
        );
    }
    fails(
        &["transfer", "--id", "79", "--debit", "wallet:acme", "--credit", "bank", "--amount", "1", "--reason", ""],
        "a correction needs a reason",
    );
    let done = ledger_ok(
        &db,
        &[
            "transfer",
            "--id",
            "7a",
            "--debit",
            "wallet:acme",
            "--credit",
            "bank",
            "--amount",
            "100",
            "--reason",
            "refund of a double deposit",
        ],
    );
    assert!(done.trim().ends_with("7a of 100 fen done"), "{done}");
    // Every amount and time argument at the edge of i64: refused with a
    // code, never wrapped, and the books still verify.
    let max = i64::MAX.to_string();
    let m = max.as_str();
    for (args, expected) in [
        (
            vec!["card", "acme", "--accel", "H100", "--hours", m, "--price-fen", "1", "--id", "b0"],
            "[invalid_argument] --hours: too large",
        ),
        (
            vec!["card", "acme", "--accel", "H100", "--hours", "1", "--price-fen", m, "--id", "b1"],
            "[insufficient_funds]",
        ),
        (
            vec!["quote", "acme", "--site", "jinan-icc", "--accel", "Ascend910B", "--accel-seconds", m],
            "invalid accel_seconds",
        ),
        (
            vec![
                "hold",
                "jx",
                "acme",
                "--site",
                "jinan-icc",
                "--accel",
                "Ascend910B",
                "--accel-seconds",
                "1",
                "--transfer-fen",
                m,
            ],
            "invalid transfer_fen",
        ),
        (vec!["deposit", "acme", m, "--id", "b2"], "[overflow]"),
        (vec!["programme", "fund", "p", m, "--id", "b3", "--reason", "x"], "[overflow]"),
        (vec!["programme", "defund", "p", m, "--id", "b4", "--reason", "x"], "[programme_exhausted]"),
        (vec!["grant", "p", "acme", m, "--id", "b5"], "[programme_exhausted]"),
        (vec!["settle", "ghost", "--accel-seconds", m], "[not_found]"),
        (
            vec![
                "transfer",
                "--id",
                "b6",
                "--debit",
                "bank",
                "--credit",
                "wallet:acme",
                "--amount",
                m,
                "--reason",
                "r",
            ],
            "[overflow]",
        ),
        (vec!["statement", "x", "--from", "0", "--to", m], "[invalid_time]"),
        (vec!["statement", "x", "--from", "2026-01-01", "--to", m], "[invalid_time]"),
        (
            vec![
                "programme",
                "create",
                "--id",
                "q9",
                "--issuer",
                "i9",
                "--budget-fen",
                "1",
                "--from",
                "2026-01-01",
                "--until",
                m,
                "--org-year-cap-fen",
                "1",
                "--job-cap-fen",
                "1",
            ],
            "[invalid_time]",
        ),
        (
            vec![
                "programme",
                "create",
                "--id",
                "q9",
                "--issuer",
                "i9",
                "--budget-fen",
                m,
                "--from",
                "2026-01-01",
                "--until",
                "2027-01-01",
                "--org-year-cap-fen",
                "1",
                "--job-cap-fen",
                "1",
            ],
            "[overflow]",
        ),
        (
            vec![
                "programme",
                "create",
                "--id",
                "q9",
                "--issuer",
                "i9",
                "--budget-fen",
                "1",
                "--from",
                "2026-01-01",
                "--until",
                "2027-01-01",
                "--org-year-cap-fen",
                "1",
                "--job-cap-fen",
                "1",
                "--rate-bp",
                m,
            ],
            "invalid rate_bp",
        ),
        (
            vec![
                "programme",
                "create",
                "--id",
                "q9",
                "--issuer",
                "i9",
                "--budget-fen",
                "1",
                "--from",
                "2026-01-01",
                "--until",
                "2027-01-01",
                "--org-year-cap-fen",
                "1",
                "--job-cap-fen",
                "1",
                "--cap-per",
                "city",
            ],
            "--cap-per",
        ),
    ] {
        fails(&args, expected);
    }
    let o = suanwang(&["ledger", "--db", db.to_str().unwrap(), "--now", "someday", "init"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains("--now: [invalid_time] invalid date: 'someday' is not a date (YYYY-MM-DD)"),
        "{}",
        stderr(&o)
    );
    let o = suanwang(&["ledger", "verify", db.to_str().unwrap()]);
    assert!(o.status.success(), "refusals left the books intact: {}", stderr(&o));
    let o = suanwang(&["ledger", "verify", "/nonexistent/books.db"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("no such file"));
}
