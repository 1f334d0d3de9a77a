//! The platform as a hostile tenant tries it: jobs that look for
//! credentials and use them, reports forged without an attempt's secret,
//! providers reading other organisations' secrets, processes that try to
//! outlive their attempt, jobs that eat memory or print a gigabyte, work
//! that fails to get free retries, tokens that should be dead. Real
//! binaries, real sandbox, real processes.

use std::process::Command;
use std::time::{Duration, Instant};

use suanwang_api::client::{Client, ClientError};
use suanwang_api::{Job, JobEvent, JobList, JobState, TokenInfo, TokenResponse};

use crate::platform::{Platform, bill_lines, job, logs, run, run_ok, submit};

fn status_of(e: ClientError) -> u16 {
    match e {
        ClientError::Api { status, .. } => status,
        ClientError::Transport(t) => panic!("no answer: {t}"),
    }
}

/// Is a process whose whole command line is `cmdline` alive?
fn alive(cmdline: &str) -> bool {
    Command::new("pgrep").args(["-f", &format!("^{cmdline}$")]).output().unwrap().status.success()
}

fn wait_dead(cmdline: &str, within: Duration) {
    let started = Instant::now();
    while alive(cmdline) {
        assert!(started.elapsed() < within, "'{cmdline}' still alive after {within:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn wait_alive(cmdline: &str) {
    let started = Instant::now();
    while !alive(cmdline) {
        assert!(started.elapsed() < Duration::from_secs(30), "'{cmdline}' never started");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A job that hunts for credentials everywhere it can see and tries them
/// on every agent endpoint of the server.
const HUNTER: &str = r#"
import os, re, json, urllib.request
pattern = re.compile(rb"sw_[0-9a-f]{64}")
found = set()
for k, v in os.environ.items():
    found.update(pattern.findall(v.encode()))
for pid in os.listdir("/proc"):
    for name in ("environ", "cmdline"):
        try:
            found.update(pattern.findall(open(f"/proc/{pid}/{name}", "rb").read()))
        except Exception:
            pass
for root, dirs, files in os.walk("/", onerror=None):
    # /usr is the host's read-only system; /proc was read above.
    if root.startswith(("/proc", "/sys", "/usr", "/dev")):
        dirs[:] = []
        continue
    for f in files:
        try:
            p = os.path.join(root, f)
            if os.path.getsize(p) < 1 << 20:
                found.update(pattern.findall(open(p, "rb").read()))
        except Exception:
            pass
print("FOUND", len(found))
server = os.environ["TARGET"]
statuses = []
for token in [b"", b"sw_" + b"0" * 64] + sorted(found):
    for path in ["/v1/agent/lease", "/v1/agent/attempts/1/1/start", "/v1/agent/attempts/1/1/heartbeat",
                 "/v1/agent/attempts/1/1/logs?offset=0", "/v1/agent/attempts/1/1/finish", "/v1/jobs"]:
        body = json.dumps({"end": "exited", "exit_code": 0, "wall_s": 1} if path.endswith("finish") else {}).encode()
        req = urllib.request.Request(server + path, data=body, method="POST" if "agent" in path else "GET",
                                     headers={"Authorization": "Bearer " + token.decode(), "Content-Type": "application/json"})
        try:
            statuses.append(urllib.request.urlopen(req, timeout=5).status)
        except urllib.error.HTTPError as e:
            statuses.append(e.code)
        except Exception as e:
            statuses.append(str(type(e).__name__))
print("STATUSES", " ".join(map(str, statuses)))
"#;

#[test]
fn a_job_finds_no_credential_and_every_agent_endpoint_refuses_it() {
    let mut p = Platform::new("hunter");
    // With the host's network, so the job can reach the server at all.
    p.start_agent_with("a", &["--job-host-network"]);
    let acme = p.org("acme", "a");
    // Another organisation's job, running at the same site, is the prize.
    let victim = p.org("victim", "a");
    let mut long = job("sleep 60");
    long.gpus = 1;
    long.secret_env.insert("HF_TOKEN".into(), "hf_victim_secret".into());
    let victim_job = submit(&victim, &long);
    p.wait(&victim, victim_job, "started", |j| j.started_at.is_some());
    let mut hunter = job("");
    hunter.command = vec!["python3".into(), "-c".into(), HUNTER.into()];
    hunter.env.insert("TARGET".into(), p.url.clone());
    hunter.gpus = 1;
    hunter.time_limit_s = Some(120);
    let id = submit(&acme, &hunter);
    let done = p.wait(&acme, id, "finished", |j| j.state.is_terminal());
    let out = logs(&acme, id);
    assert_eq!(done.state, JobState::Succeeded, "{done:?}\n{out}");
    assert!(out.contains("FOUND 0"), "the job found a token: {out}");
    let statuses = out.lines().find_map(|l| l.strip_prefix("STATUSES ")).unwrap_or_else(|| panic!("{out}"));
    for status in statuses.split(' ') {
        assert!(status == "401", "an agent endpoint answered {status}: {out}");
    }
    assert!(!out.contains("sw_") && !out.contains("hf_victim_secret"), "{out}");
    let victim_now: Job = victim.get(&format!("/v1/jobs/{victim_job}")).unwrap();
    assert_eq!(victim_now.state, JobState::Running, "the victim's job was not touched");
    let _: Job = victim.post(&format!("/v1/jobs/{victim_job}/cancel"), &()).unwrap();
    p.verify();
}

#[test]
fn a_report_without_the_attempt_secret_or_from_another_site_is_refused() {
    let mut p = Platform::new("forge");
    p.start_agent("a");
    let acme = p.org("acme", "a");
    let mut long = job("echo running; sleep 60");
    long.gpus = 1;
    let id = submit(&acme, &long);
    p.wait(&acme, id, "started", |j| j.started_at.is_some());
    let own_site = Client::new(&p.url, std::fs::read_to_string(p.agent_token_file("a")).unwrap().trim());
    let other_site = Client::new(&p.url, std::fs::read_to_string(p.agent_token_file("b")).unwrap().trim());
    let base = format!("/v1/agent/attempts/{id}/1");
    let finish = serde_json::json!({"end": "exited", "exit_code": 0, "wall_s": 1});
    for (client, secret) in [(&own_site, ""), (&own_site, "sw_guess"), (&other_site, "")] {
        let headers: &[(&str, &str)] = if secret.is_empty() { &[] } else { &[("X-Attempt-Secret", secret)] };
        for (path, body) in
            [("start", serde_json::json!({})), ("heartbeat", serde_json::json!({})), ("finish", finish.clone())]
        {
            let e = client.post_with::<_, serde_json::Value>(&format!("{base}/{path}"), headers, &body).unwrap_err();
            assert_eq!(status_of(e), 403, "{path} with secret {secret:?}");
        }
        let e = client
            .post_bytes_with::<serde_json::Value>(&format!("{base}/logs?offset=0"), headers, b"forged output\n")
            .unwrap_err();
        assert_eq!(status_of(e), 403);
    }
    let job: Job = acme.get(&format!("/v1/jobs/{id}")).unwrap();
    assert_eq!(job.state, JobState::Running, "{job:?}");
    assert!(!logs(&acme, id).contains("forged"));
    let _: Job = acme.post(&format!("/v1/jobs/{id}/cancel"), &()).unwrap();
}

#[test]
fn a_provider_sees_only_its_site_s_jobs_and_never_a_secret() {
    let mut p = Platform::new("provider-view");
    p.start_agent("a");
    p.start_agent("b");
    let alice = p.org("alice", "a");
    let bob = p.org("bob", "b");
    let mut secretive = job("case \"$HF_TOKEN\" in hf_alice_s*t) echo has-secret;; esac; sleep 30");
    // All of site a, so that bob's job goes to b.
    secretive.gpus = 8;
    secretive.env.insert("PLAIN".into(), "visible-to-alice".into());
    secretive.secret_env.insert("HF_TOKEN".into(), "hf_alice_secret".into());
    let alice_job = submit(&alice, &secretive);
    let mut other = job("sleep 30");
    other.gpus = 1;
    let bob_job = submit(&bob, &other);
    p.wait(&alice, alice_job, "started", |j| j.started_at.is_some());
    assert_eq!(p.wait(&alice, alice_job, "at a", |j| j.site.is_some()).site.as_deref(), Some("a"));
    p.wait(&bob, bob_job, "started", |j| j.started_at.is_some());
    assert_eq!(p.wait(&bob, bob_job, "at b", |j| j.site.is_some()).site.as_deref(), Some("b"));
    // The secret reached the job...
    let started = Instant::now();
    while !logs(&alice, alice_job).contains("has-secret") {
        assert!(started.elapsed() < Duration::from_secs(10), "{}", logs(&alice, alice_job));
        std::thread::sleep(Duration::from_millis(100));
    }
    // ...but no listing shows it, to anyone.
    let provider_a = Client::new(&p.url, std::fs::read_to_string(p.agent_token_file("a")).unwrap().trim());
    let listed: JobList = provider_a.get("/v1/jobs").unwrap();
    assert_eq!(listed.jobs.iter().map(|j| j.id).collect::<Vec<_>>(), [alice_job]);
    assert!(listed.jobs[0].request.env.is_empty(), "a provider does not see the job's environment");
    assert_eq!(status_of(provider_a.get::<Job>(&format!("/v1/jobs/{bob_job}")).unwrap_err()), 404);
    let raw =
        |client: &Client, path: &str| serde_json::to_string(&client.get::<serde_json::Value>(path).unwrap()).unwrap();
    for (client, is_provider, path) in [
        (&provider_a, true, "/v1/jobs".to_string()),
        (&provider_a, true, format!("/v1/jobs/{alice_job}")),
        (&provider_a, true, format!("/v1/jobs/{alice_job}/events")),
        (&alice, false, format!("/v1/jobs/{alice_job}")),
        (&alice, false, "/v1/jobs".to_string()),
        (&alice, false, format!("/v1/jobs/{alice_job}/events")),
    ] {
        let text = raw(client, &path);
        assert!(!text.contains("hf_alice_secret"), "{path} shows the secret: {text}");
        if is_provider {
            assert!(!text.contains("visible-to-alice"), "{path} shows the environment to a provider: {text}");
        }
    }
    let own: Job = alice.get(&format!("/v1/jobs/{alice_job}")).unwrap();
    assert_eq!(own.secret_keys, ["HF_TOKEN"]);
    // A provider may not cancel, and may not submit.
    assert_eq!(status_of(provider_a.post::<_, Job>(&format!("/v1/jobs/{alice_job}/cancel"), &()).unwrap_err()), 404);
    for id in [alice_job, bob_job] {
        let owner = if id == alice_job { &alice } else { &bob };
        let _: Job = owner.post(&format!("/v1/jobs/{id}/cancel"), &()).unwrap();
    }
    // Secrets are deleted once the job has ended...
    assert_eq!(db_count(&p, "SELECT COUNT(*) FROM job_secrets"), 0, "a finished job's secrets are gone");
    // ...from the file too: once the log is checkpointed into it (as any
    // copy or backup would be), no byte of the value is left.
    let o = Command::new("python3")
        .args([
            "-c",
            &format!(
                "import sqlite3; c = sqlite3.connect('{0}'); print(c.execute('PRAGMA wal_checkpoint(TRUNCATE)').fetchone()); c.close(); \
                 import os; data = open('{0}', 'rb').read() + (open('{0}-wal', 'rb').read() if os.path.exists('{0}-wal') else b''); \
                 print('LEFT', data.count(b'hf_alice_secret'))",
                p.db()
            ),
        ])
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.contains("(0, ") && out.contains("LEFT 0"), "{out}{}", String::from_utf8_lossy(&o.stderr));
}

/// One number from the database (read with Python's sqlite3).
fn db_count(p: &Platform, sql: &str) -> i64 {
    let o = Command::new("python3")
        .args(["-c", &format!("import sqlite3; print(sqlite3.connect('{}').execute('{sql}').fetchone()[0])", p.db())])
        .output()
        .unwrap();
    String::from_utf8_lossy(&o.stdout)
        .trim()
        .parse()
        .unwrap_or_else(|_| panic!("{}", String::from_utf8_lossy(&o.stderr)))
}

#[test]
fn a_setsid_grandchild_dies_with_cancel_time_limit_and_agent_death() {
    let mut p = Platform::new("escape");
    p.start_agent("a");
    let acme = p.org("acme", "a");
    let escaping = |n: u32, limit: Option<u64>| {
        let mut j = job(&format!("setsid sleep 987{n} & (setsid sh -c 'sleep 988{n}' &) ; sleep 300"));
        j.gpus = 1;
        j.time_limit_s = limit;
        submit(&acme, &j)
    };
    // Cancel.
    let cancelled = escaping(1, None);
    wait_alive("sleep 9871");
    wait_alive("sleep 9881");
    let _: Job = acme.post(&format!("/v1/jobs/{cancelled}/cancel"), &()).unwrap();
    wait_dead("sleep 9871", Duration::from_secs(2));
    wait_dead("sleep 9881", Duration::from_secs(2));
    // Time limit.
    let limited = escaping(2, Some(3));
    wait_alive("sleep 9872");
    let done = p.wait(&acme, limited, "failed", |j| j.state.is_terminal());
    assert_eq!(done.state, JobState::Failed);
    assert!(done.reason.as_deref().unwrap_or_default().contains("time limit"), "{done:?}");
    wait_dead("sleep 9872", Duration::from_secs(2));
    wait_dead("sleep 9882", Duration::from_secs(2));
    let bill = bill_lines(&acme);
    let line = bill.lines.iter().find(|l| l.job == limited).expect("the time-limited attempt is billed");
    assert_eq!(line.cause, "time limit");
    assert!(line.accel_seconds >= 3, "{line:?}");
    // The agent dies: so does everything it ran.
    let orphaned = escaping(3, None);
    p.wait(&acme, orphaned, "started", |j| j.started_at.is_some());
    wait_alive("sleep 9873");
    p.kill_agent("a");
    wait_dead("sleep 9873", Duration::from_secs(3));
    wait_dead("sleep 9883", Duration::from_secs(3));
    let _: Job = acme.post(&format!("/v1/jobs/{orphaned}/cancel"), &()).unwrap();
}

#[test]
fn a_job_over_its_memory_limit_is_killed_with_a_clear_reason_and_billed() {
    let mut p = Platform::new("memory");
    p.start_agent("a");
    let acme = p.org("acme", "a");
    let mut hog = job("");
    hog.command = vec![
        "python3".into(),
        "-c".into(),
        "x = bytearray(512 << 20); x[::4096] = b'1' * len(x[::4096]); print('survived')".into(),
    ];
    hog.gpus = 1;
    hog.memory_mb = Some(64);
    let id = submit(&acme, &hog);
    let done = p.wait(&acme, id, "failed", |j| j.state.is_terminal());
    assert_eq!(done.state, JobState::Failed, "{done:?}");
    assert!(done.reason.as_deref().unwrap_or_default().contains("memory limit"), "{done:?}");
    assert!(!logs(&acme, id).contains("survived"));
    let events: Vec<JobEvent> = acme.get(&format!("/v1/jobs/{id}/events")).unwrap();
    assert!(events.iter().any(|e| e.detail.contains("64 MiB")), "{events:?}");
    assert_eq!(bill_lines(&acme).lines.iter().filter(|l| l.job == id).count(), 1);
}

#[test]
fn finished_attempts_leave_no_directory_behind_without_retention() {
    let mut p = Platform::new("retention");
    p.start_agent_with("a", &["--retention-s", "0"]);
    let acme = p.org("acme", "a");
    let mut quick = job("echo data > /work/file; echo pid1: $(tr '\\0' ' ' < /proc/1/cmdline); \
         unshare -r true 2>/dev/null && echo userns-allowed || echo userns-denied; echo done");
    quick.gpus = 1;
    let id = submit(&acme, &quick);
    assert_eq!(p.wait(&acme, id, "finished", |j| j.state.is_terminal()).state, JobState::Succeeded);
    let out = logs(&acme, id);
    assert!(out.contains("bwrap --args 3 -- sh -c"), "{out}");
    assert!(out.contains("userns-denied"), "a job may make user namespaces: {out}");
    assert!(!out.contains(p.dir.to_str().unwrap()), "the host's paths are not shown inside: {out}");
    let dir = p.workdir("a").join(format!("jobs/job-{id}-1"));
    let started = Instant::now();
    while dir.exists() {
        assert!(started.elapsed() < Duration::from_secs(5), "{} is still there", dir.display());
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(logs(&acme, id).contains("done"));
}

#[test]
fn two_jobs_cannot_read_each_other_s_work_directories() {
    let mut p = Platform::new("neighbours");
    p.start_agent("a");
    let alice = p.org("alice", "a");
    let bob = p.org("bob", "a");
    let mut keeper = job("echo alice-private-data > /work/secret.txt; sleep 30");
    keeper.gpus = 1;
    let alice_job = submit(&alice, &keeper);
    p.wait(&alice, alice_job, "started", |j| j.started_at.is_some());
    let alice_dir = p.workdir("a").join(format!("jobs/job-{alice_job}-1"));
    let started = Instant::now();
    while !alice_dir.join("secret.txt").exists() {
        assert!(started.elapsed() < Duration::from_secs(10));
        std::thread::sleep(Duration::from_millis(50));
    }
    let mut snoop = job(&format!(
        "cat {0}/secret.txt; ls {0}; ls {1}; cat /proc/*/environ; find / -name secret.txt 2>/dev/null; echo snooped",
        alice_dir.display(),
        p.workdir("a").display()
    ));
    snoop.gpus = 1;
    let bob_job = submit(&bob, &snoop);
    p.wait(&bob, bob_job, "finished", |j| j.state.is_terminal());
    let out = logs(&bob, bob_job);
    assert!(out.contains("snooped"), "{out}");
    assert!(!out.contains("alice-private-data"), "{out}");
    // On the host: the directory belongs to the job's own user, mode 0700.
    let meta = std::fs::metadata(&alice_dir).unwrap();
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    assert_eq!(meta.permissions().mode() & 0o777, 0o700);
    assert_eq!(meta.uid(), 1_000_000_000 + alice_job as u32);
    let _: Job = alice.post(&format!("/v1/jobs/{alice_job}/cancel"), &()).unwrap();
}

#[test]
fn a_failing_job_is_billed_once_and_retried_only_when_it_asked() {
    let mut p = Platform::new("failing");
    p.start_agent("a");
    let acme = p.org("acme", "a");
    let mut failing = job("echo attempt $SUANWANG_ATTEMPT; sleep 1; exit 3");
    failing.gpus = 1;
    let once = submit(&acme, &failing);
    let done = p.wait(&acme, once, "failed", |j| j.state.is_terminal());
    assert_eq!((done.state, done.attempts, done.exit_code), (JobState::Failed, 1, Some(3)), "{done:?}");
    assert!(done.reason.as_deref().unwrap_or_default().contains("exited with code 3"), "{done:?}");
    let events: Vec<JobEvent> = acme.get(&format!("/v1/jobs/{once}/events")).unwrap();
    assert_eq!(events.iter().filter(|e| e.kind == "failed").count(), 1, "one failed event: {events:?}");
    failing.retries = 2;
    let retried = submit(&acme, &failing);
    let done = p.wait(&acme, retried, "failed", |j| j.state.is_terminal());
    assert_eq!((done.state, done.attempts), (JobState::Failed, 3), "{done:?}");
    let out = logs(&acme, retried);
    for n in 1..=3 {
        assert!(out.contains(&format!("=== attempt {n} at a ===\nattempt {n}")), "{out}");
    }
    let bill = bill_lines(&acme);
    let lines: Vec<_> = bill.lines.iter().map(|l| (l.job, l.attempt, l.cause.as_str())).collect();
    assert_eq!(lines.iter().filter(|l| l.0 == once).collect::<Vec<_>>(), [&(once, 1, "failed (exit code 3)")]);
    assert_eq!(lines.iter().filter(|l| l.0 == retried).count(), 3, "{lines:?}");
    assert!(bill.lines.iter().all(|l| l.accel_seconds >= 1 && l.org_fen > 0), "{bill:?}");
    p.verify();
}

#[test]
fn revoked_and_expired_tokens_get_401() {
    let p = Platform::new("tokens");
    let _acme = p.org("acme", "a");
    let operator = Client::new(&p.url, &p.operator);
    let made: TokenResponse = operator
        .post(
            "/v1/tokens",
            &serde_json::json!({"role": "consumer", "org": "acme", "label": "short", "expires_in_s": 1}),
        )
        .unwrap();
    let short = Client::new(&p.url, &made.token);
    let _: JobList = short.get("/v1/jobs").unwrap();
    std::thread::sleep(Duration::from_millis(2100));
    assert_eq!(status_of(short.get::<JobList>("/v1/jobs").unwrap_err()), 401);
    // Revoked through the API: at once.
    let made: TokenResponse =
        operator.post("/v1/tokens", &serde_json::json!({"role": "consumer", "org": "acme"})).unwrap();
    let revoked = Client::new(&p.url, &made.token);
    let _: JobList = revoked.get("/v1/jobs").unwrap();
    let info: TokenInfo = operator.post(&format!("/v1/tokens/{}/revoke", made.id), &()).unwrap();
    assert!(info.revoked_at.is_some());
    assert_eq!(status_of(revoked.get::<JobList>("/v1/jobs").unwrap_err()), 401);
    // Revoked on the database file by `suanwang admin` while the server runs.
    let token = run_ok(&["admin", "--db", p.db(), "token", "--role", "consumer", "--org", "acme", "--label", "cli"]);
    let cli = Client::new(&p.url, &token);
    let _: JobList = cli.get("/v1/jobs").unwrap();
    let listed = run_ok(&["admin", "--db", p.db(), "token", "list"]);
    let id =
        listed.lines().find(|l| l.contains(" cli ")).and_then(|l| l.split_whitespace().next()).unwrap().to_string();
    assert!(!listed.contains(&token), "the list never shows a token");
    run_ok(&["admin", "--db", p.db(), "token", "revoke", &id]);
    std::thread::sleep(Duration::from_millis(2100));
    assert_eq!(status_of(cli.get::<JobList>("/v1/jobs").unwrap_err()), 401);
    let tokens: Vec<TokenInfo> = operator.get("/v1/tokens").unwrap();
    assert_eq!(tokens.iter().filter(|t| t.revoked_at.is_some()).count(), 2);
    let o = run(&["admin", "--db", p.db(), "token", "revoke", "nosuchtoken"]);
    assert!(!o.status.success());
}

#[test]
fn an_agent_s_token_is_rotated_without_stopping_its_jobs() {
    let mut p = Platform::new("rotate");
    p.start_agent("a");
    let acme = p.org("acme", "a");
    let mut long = job("echo before; sleep 6; echo after");
    long.gpus = 1;
    let id = submit(&acme, &long);
    p.wait(&acme, id, "started", |j| j.started_at.is_some());
    let file = p.agent_token_file("a");
    let old = std::fs::read_to_string(&file).unwrap();
    let new = run_ok(&["admin", "--db", p.db(), "token", "--role", "provider", "--site", "a", "--label", "rotated"]);
    std::fs::write(&file, &new).unwrap();
    let operator = Client::new(&p.url, &p.operator);
    let tokens: Vec<TokenInfo> = operator.get("/v1/tokens").unwrap();
    let old_id = tokens.iter().find(|t| t.site.as_deref() == Some("a") && t.label.is_empty()).unwrap().id.clone();
    let _: TokenInfo = operator.post(&format!("/v1/tokens/{old_id}/revoke"), &()).unwrap();
    assert_eq!(status_of(Client::new(&p.url, old.trim()).get::<JobList>("/v1/jobs").unwrap_err()), 401);
    let done = p.wait(&acme, id, "finished", |j| j.state.is_terminal());
    assert_eq!((done.state, done.attempts), (JobState::Succeeded, 1), "{done:?}");
    assert!(logs(&acme, id).contains("after"));
    // The agent goes on taking work with the new token.
    let mut next = job("echo next");
    next.gpus = 1;
    let second = submit(&acme, &next);
    assert_eq!(p.wait(&acme, second, "finished", |j| j.state.is_terminal()).state, JobState::Succeeded);
}

#[test]
fn logs_survive_a_ten_second_server_outage() {
    let mut p = Platform::with("outage", &["--lease-s", "20", "--heartbeat-s", "1", "--site-timeout-s", "20"]);
    p.start_agent("a");
    let acme = p.org("acme", "a");
    let mut printer = job("for i in $(seq 1 80); do echo line $i; sleep 0.2; done");
    printer.gpus = 1;
    let id = submit(&acme, &printer);
    p.wait(&acme, id, "started", |j| j.started_at.is_some());
    std::thread::sleep(Duration::from_secs(2));
    p.kill_server();
    std::thread::sleep(Duration::from_secs(10));
    p.start_server();
    let acme = p.consumer("acme");
    let done = p.wait(&acme, id, "finished", |j| j.state.is_terminal());
    assert_eq!((done.state, done.attempts), (JobState::Succeeded, 1), "{done:?}");
    let out = logs(&acme, id);
    let lines: Vec<&str> = out.lines().filter(|l| l.starts_with("line ")).collect();
    let expected: Vec<String> = (1..=80).map(|i| format!("line {i}")).collect();
    assert_eq!(lines, expected, "every line once, in order");
}

/// Peak resident memory of a process, KiB.
fn peak_rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

#[test]
fn a_gigabyte_of_output_keeps_the_agent_small_and_the_log_marked() {
    let mut p = Platform::with(
        "gigabyte",
        &["--lease-s", "4", "--heartbeat-s", "1", "--site-timeout-s", "4", "--log-quota-mb", "8"],
    );
    p.start_agent("a");
    let acme = p.org("acme", "a");
    let mut loud = job("yes 0123456789abcdef | head -c 1000000000; echo; echo LAST LINE");
    loud.gpus = 1;
    let id = submit(&acme, &loud);
    let done = p.wait(&acme, id, "finished", |j| j.state.is_terminal());
    assert_eq!(done.state, JobState::Succeeded, "{done:?}");
    let pid = p.agents["a"].id();
    let rss = peak_rss_kib(pid);
    assert!(rss <= 64 * 1024, "agent peak RSS {rss} KiB over 64 MiB");
    let out = logs(&acme, id);
    assert!(out.len() < 9 << 20, "{} bytes kept", out.len());
    assert!(out.trim_end().ends_with("LAST LINE"), "the last line is kept");
    let marker = out.lines().find(|l| l.starts_with("[truncated: ")).expect("a truncation marker");
    let dropped: u64 = marker.trim_start_matches("[truncated: ").split(' ').next().unwrap().parse().unwrap();
    assert!(dropped > 900_000_000 && dropped < 1_000_000_000, "{marker}");
    let events: Vec<JobEvent> = acme.get(&format!("/v1/jobs/{id}/events")).unwrap();
    assert!(events.iter().any(|e| e.kind == "log_truncated"), "{events:?}");
    // Under the quota, the log is complete to the byte.
    let mut quiet = job("yes 0123456789abcdef | head -c 5000000; echo; echo LAST LINE");
    quiet.gpus = 1;
    let id = submit(&acme, &quiet);
    p.wait(&acme, id, "finished", |j| j.state.is_terminal());
    let out = logs(&acme, id);
    let body = out.strip_prefix("=== attempt 1 at a ===\n").unwrap();
    assert_eq!(body.len(), 5_000_000 + 1 + "LAST LINE\n".len());
    assert!(body.ends_with("\nLAST LINE\n"));
}

/// A raw request with a JSON body.
fn raw_post(p: &Platform, token: &str, path: &str, body: &serde_json::Value) -> (u16, serde_json::Value) {
    let agent: ureq::Agent = ureq::Agent::config_builder().http_status_as_error(false).build().into();
    let mut response = agent
        .post(&format!("{}{path}", p.url))
        .header("Authorization", &format!("Bearer {token}"))
        .send_json(body)
        .unwrap();
    let status = response.status().as_u16();
    let text = response.body_mut().read_to_string().unwrap();
    (status, serde_json::from_str(&text).unwrap_or_else(|_| panic!("not JSON: {text}")))
}

#[test]
fn garbage_at_the_door_gets_a_400_naming_its_field_and_stores_nothing() {
    let mut p = Platform::new("garbage");
    p.start_agent("a");
    let acme = p.org("acme", "a");
    let token = p.consumer_token("acme");
    let good = serde_json::to_value(job("true")).unwrap();
    let with = |key: &str, value: serde_json::Value| {
        let mut v = good.clone();
        v[key] = value;
        v
    };
    let cases = [
        ("long name", with("name", serde_json::json!("n".repeat(100_000))), "name"),
        ("ANSI name", with("name", serde_json::json!("\u{1b}[31mred")), "name"),
        ("CRLF name", with("name", serde_json::json!("a\r\nb")), "name"),
        ("empty env key", with("env", serde_json::json!({"": "x"})), "env"),
        ("A=B env key", with("env", serde_json::json!({"A=B": "x"})), "env"),
        ("NUL env key", with("env", serde_json::json!({"A\u{0}": "x"})), "env"),
        ("NUL env value", with("env", serde_json::json!({"A": "x\u{0}y"})), "env"),
        ("reserved env key", with("env", serde_json::json!({"SUANWANG_JOB": "1"})), "env"),
        ("NUL argument", with("command", serde_json::json!(["sh", "a\u{0}b"])), "command"),
        ("too many arguments", with("command", serde_json::json!(vec!["x"; 4097])), "command"),
        // The kernel's limit is 128 KiB with the NUL: one more could not be exec'd.
        ("argument past exec's limit", with("command", serde_json::json!(["sh", "y".repeat(128 * 1024)])), "command"),
        ("duplicate types", with("accelerators", serde_json::json!(["A100", "A100"])), "accelerators"),
        ("image nobody runs", with("image", serde_json::json!("busybox:latest")), "image"),
        ("absurd time limit", with("time_limit_s", serde_json::json!(u64::MAX)), "time_limit_s"),
        ("absurd retries", with("retries", serde_json::json!(1000)), "retries"),
        ("unsafe origin", with("origin", serde_json::json!("../../etc")), "origin"),
    ];
    for (name, body, field) in cases {
        let (status, error) = raw_post(&p, &token, "/v1/jobs", &body);
        assert_eq!(status, 400, "{name}: {error}");
        assert_eq!(error["field"].as_str(), Some(field), "{name}: {error}");
        let (status, _) = raw_post(&p, &token, "/v1/quote", &body);
        assert_eq!(status, 400, "{name} (quote)");
    }
    let (status, error) =
        raw_post(&p, &p.operator, "/v1/orgs", &serde_json::json!({"id": "Evil Org\n", "kind": "enterprise"}));
    assert_eq!((status, error["field"].as_str()), (400, Some("id")), "{error}");
    let list: JobList = acme.get("/v1/jobs").unwrap();
    assert_eq!(list.total, 0, "nothing stored");
}

#[test]
fn the_command_line_reports_rejections_closed_pipes_and_busy_ports() {
    let mut p = Platform::new("cli");
    p.start_agent("a");
    let acme_token = {
        let _ = p.org("acme", "a");
        p.consumer_token("acme")
    };
    let file = p.dir.join("huge.toml");
    std::fs::write(&file, "command = [\"true\"]\ngpus = 64\naccelerators = [\"A100\"]\nestimate_s = 60\n").unwrap();
    let client = |args: &[&str]| {
        Command::new(crate::platform::exe())
            .args(args)
            .env("SUANWANG_SERVER", &p.url)
            .env("SUANWANG_TOKEN", &acme_token)
            .output()
            .unwrap()
    };
    let o = client(&["submit", file.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("was rejected: cannot fit anywhere"), "{o:?}");
    std::fs::write(&file, "command = [\"true\"]\ngpus = 1\naccelerators = [\"A100\"]\nestimate_s = 60\n").unwrap();
    for _ in 0..3 {
        assert!(client(&["submit", file.to_str().unwrap()]).status.success());
    }
    let o = client(&["jobs", "--limit", "2"]);
    assert!(String::from_utf8_lossy(&o.stdout).contains("2 more (use --limit N or --all)"), "{o:?}");
    let o = client(&["jobs", "--all", "--json"]);
    let all: JobList = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!((all.jobs.len(), all.total), (4, 4), "{all:?}");
    let o = client(&["jobs", "--limit", "5000"]);
    assert!(o.status.success(), "a big --limit is capped, not refused: {o:?}");
    // A closed pipe ends quietly.
    let mut child = Command::new(crate::platform::exe())
        .args(["jobs", "--all"])
        .env("SUANWANG_SERVER", &p.url)
        .env("SUANWANG_TOKEN", &acme_token)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    let o = child.wait_with_output().unwrap();
    assert!(o.status.code() != Some(101), "no panic on a closed pipe: {}", String::from_utf8_lossy(&o.stderr));
    // A second server on the same port names the port.
    let port = p.url.rsplit(':').next().unwrap().to_string();
    let o = run(&[
        "serve",
        "--db",
        &p.dir.join("other.db").display().to_string(),
        "--listen",
        &format!("127.0.0.1:{port}"),
    ]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains(&format!("127.0.0.1:{port}")) && err.contains("--listen"), "{err}");
}

#[test]
fn an_agent_cut_off_from_the_server_kills_its_attempt_before_the_lease_ends() {
    let mut p = Platform::new("cutoff");
    p.start_agent("a");
    let acme = p.org("acme", "a");
    let mut quiet = job("sleep 9991");
    quiet.gpus = 1;
    let id = submit(&acme, &quiet);
    wait_alive("sleep 9991");
    p.kill_server();
    let cut = Instant::now();
    wait_dead("sleep 9991", Duration::from_secs(8));
    // The server would expire the lease 4 s after the last heartbeat it got.
    assert!(cut.elapsed() < Duration::from_secs(4), "killed only {:?} after the server went away", cut.elapsed());
    p.start_server();
    let acme = p.consumer("acme");
    let again = p.wait(&acme, id, "run again", |j| j.attempts == 2 && j.started_at.is_some());
    assert_eq!(again.state, JobState::Running);
    let bill = bill_lines(&acme);
    assert!(bill.lines.iter().all(|l| l.org_fen == 0), "the lost attempt is not billed: {bill:?}");
    let _: Job = acme.post(&format!("/v1/jobs/{id}/cancel"), &()).unwrap();
}

#[test]
fn a_restarted_agent_reports_the_attempts_of_its_previous_life_at_once() {
    let mut p = Platform::with("leftovers", &["--lease-s", "30", "--heartbeat-s", "1", "--site-timeout-s", "30"]);
    p.start_agent("a");
    let acme = p.org("acme", "a");
    let mut long = job("sleep 9992");
    long.gpus = 1;
    let id = submit(&acme, &long);
    wait_alive("sleep 9992");
    p.kill_agent("a");
    wait_dead("sleep 9992", Duration::from_secs(3));
    let restarted = Instant::now();
    p.start_agent("a");
    // Long before the 30 s lease would expire, the job runs again.
    let again = p.wait(&acme, id, "run again", |j| j.attempts == 2);
    assert!(restarted.elapsed() < Duration::from_secs(10), "{again:?}");
    let events: Vec<JobEvent> = acme.get(&format!("/v1/jobs/{id}/events")).unwrap();
    assert!(events.iter().any(|e| e.detail.contains("the agent restarted")), "{events:?}");
    let bill = bill_lines(&acme);
    assert!(bill.lines.iter().all(|l| l.org_fen == 0), "{bill:?}");
    let _: Job = acme.post(&format!("/v1/jobs/{id}/cancel"), &()).unwrap();
}

#[test]
fn a_tenant_with_nothing_to_pay_with_or_too_many_jobs_stores_nothing() {
    let p = Platform::with(
        "flood",
        &["--lease-s", "4", "--heartbeat-s", "1", "--site-timeout-s", "4", "--max-active-jobs-per-org", "3"],
    );
    let _rich = p.org("rich", "a");
    run_ok(&["admin", "--db", p.db(), "org", "poor", "--kind", "enterprise"]);
    let poor = p.consumer("poor");
    let mut big = job("true");
    big.gpus = 1;
    big.command = vec!["true".into(), "A".repeat(100_000)];
    assert_eq!(status_of(poor.post::<_, Job>("/v1/jobs", &big).unwrap_err()), 402);
    let listed: JobList = poor.get("/v1/jobs").unwrap();
    assert_eq!(listed.total, 0, "nothing stored for a tenant who cannot pay");
    // No agent runs: jobs stay pending, and the fourth is one too many.
    let rich = p.consumer("rich");
    for _ in 0..3 {
        submit(&rich, &big);
    }
    assert_eq!(status_of(rich.post::<_, Job>("/v1/jobs", &big).unwrap_err()), 429);
    let listed: JobList = rich.get("/v1/jobs").unwrap();
    assert_eq!(listed.total, 3);
}

#[test]
fn a_page_of_big_jobs_ends_early_and_says_where_the_next_begins() {
    let p = Platform::new("pages");
    let acme = p.org("acme", "a");
    let mut big = job("true");
    big.gpus = 1;
    big.command =
        vec!["true".into(), "A".repeat(120_000), "B".repeat(120_000), "C".repeat(120_000), "D".repeat(120_000)];
    // No agent: they wait. Each stored request is about 480 KB.
    let ids: Vec<u64> = (0..12).map(|_| submit(&acme, &big)).collect();
    let first: JobList = acme.get("/v1/jobs?limit=1000").unwrap();
    assert_eq!(first.total, 12);
    assert!(first.jobs.len() < 12, "a page carries at most about 4 MiB of requests");
    let next = first.next_before.expect("the page says where the next one starts");
    assert_eq!(next, first.jobs.last().unwrap().id);
    let second: JobList = acme.get(&format!("/v1/jobs?limit=1000&before={next}")).unwrap();
    let mut seen: Vec<u64> = first.jobs.iter().chain(&second.jobs).map(|j| j.id).collect();
    let mut rest = second.next_before;
    while let Some(before) = rest {
        let page: JobList = acme.get(&format!("/v1/jobs?limit=1000&before={before}")).unwrap();
        seen.extend(page.jobs.iter().map(|j| j.id));
        rest = page.next_before;
    }
    seen.reverse();
    assert_eq!(seen, ids, "every job once, across the pages");
}

#[test]
fn a_job_cannot_raise_its_limits_past_the_site_s_share() {
    let mut p = Platform::new("limits");
    p.start_agent_with("a", &["--memory-mb-per-gpu", "512", "--cpus-per-gpu", "1"]);
    let acme = p.org("acme", "a");
    let mut greedy = job("sleep 9993");
    greedy.gpus = 1;
    greedy.memory_mb = Some(16 << 20);
    greedy.cpus = Some(4096);
    let id = submit(&acme, &greedy);
    wait_alive("sleep 9993");
    // The cgroups of the job's own process, as the host sees them.
    let pid = String::from_utf8(Command::new("pgrep").args(["-f", "^sleep 9993$"]).output().unwrap().stdout).unwrap();
    let groups = std::fs::read_to_string(format!("/proc/{}/cgroup", pid.trim())).unwrap();
    let value = |controller: &str, file: &str| {
        let path = groups
            .lines()
            .find_map(|l| l.split_once(&format!(":{controller}:")).map(|(_, p)| p.to_string()))
            .unwrap_or_else(|| panic!("{groups}"));
        assert!(path.ends_with(&format!("/job-{id}-1")), "{path}");
        std::fs::read_to_string(format!("/sys/fs/cgroup/{controller}{path}/{file}"))
            .unwrap()
            .trim()
            .parse::<u64>()
            .unwrap()
    };
    assert_eq!(value("memory", "memory.limit_in_bytes"), 512 << 20, "memory capped at the site's share");
    assert_eq!(value("cpu", "cpu.cfs_quota_us"), 100_000, "one core, the site's share");
    let _: Job = acme.post(&format!("/v1/jobs/{id}/cancel"), &()).unwrap();
}

#[test]
fn a_stalled_server_cannot_keep_an_attempt_alive_past_its_lease() {
    let mut p = Platform::new("stalled");
    p.start_agent("a");
    let acme = p.org("acme", "a");
    let mut quiet = job("sleep 9994");
    quiet.gpus = 1;
    submit(&acme, &quiet);
    wait_alive("sleep 9994");
    // The server accepts connections but answers nothing.
    let server = p.server_pid();
    Command::new("kill").args(["-STOP", &server.to_string()]).status().unwrap();
    let stalled = Instant::now();
    let dead = {
        let mut dead = false;
        while stalled.elapsed() < Duration::from_secs(8) {
            if !alive("sleep 9994") {
                dead = true;
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        dead
    };
    let took = stalled.elapsed();
    Command::new("kill").args(["-CONT", &server.to_string()]).status().unwrap();
    assert!(dead && took < Duration::from_secs(4), "the attempt lived {took:?} past a 4 s lease's last renewal");
}

#[test]
fn an_organisation_s_logs_share_one_quota() {
    let mut p = Platform::with(
        "org-quota",
        &[
            "--lease-s",
            "4",
            "--heartbeat-s",
            "1",
            "--site-timeout-s",
            "4",
            "--log-quota-mb",
            "1",
            "--log-quota-per-org-mb",
            "1",
        ],
    );
    p.start_agent("a");
    let acme = p.org("acme", "a");
    let mut loud = job("yes 0123456789abcdef | head -c 800000; echo; echo LAST LINE");
    loud.gpus = 1;
    let first = submit(&acme, &loud);
    assert_eq!(p.wait(&acme, first, "finished", |j| j.state.is_terminal()).state, JobState::Succeeded);
    let out = logs(&acme, first);
    assert!(!out.contains("[truncated"), "the first job is within both quotas");
    let second = submit(&acme, &loud);
    assert_eq!(p.wait(&acme, second, "finished", |j| j.state.is_terminal()).state, JobState::Succeeded);
    let out = logs(&acme, second);
    assert!(out.contains("[truncated: "), "the organisation's megabyte is used up");
    assert!(out.trim_end().ends_with("LAST LINE"), "the last lines are kept");
    assert!(out.len() < 400_000, "{} bytes kept", out.len());
    let events: Vec<JobEvent> = acme.get(&format!("/v1/jobs/{second}/events")).unwrap();
    assert!(events.iter().any(|e| e.detail.contains("organisation's log quota")), "{events:?}");
}
