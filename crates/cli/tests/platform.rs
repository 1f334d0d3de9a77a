//! End-to-end tests of the running platform: the real `suanwang serve` and
//! `suanwang agent` binaries on free loopback ports, a two-site network,
//! real processes in the real sandbox. Timings are shortened (leases of
//! 4 s, sites down after 4 s of silence) so failures are detected quickly.
//! The harness here is shared with the `hostile` tests.

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use suanwang_api::client::{Client, ClientError};
use suanwang_api::{Balances, Bill, Job, JobEvent, JobList, JobRequest, JobState};

const TOPOLOGY: &str = r#"
name = "two-sites"
[[accelerator]]
type = "A100"
speed = 1.0
memory_gb = 80
power_w = 400
domestic = false

[[site]]
id = "a"
name = "Site A"
city = "Jinan"
level = "city"
lat = 36.6
lon = 117.1
pue = 1.3
green_share = 0.2
provider = "a-co"
  [[site.pool]]
  type = "A100"
  count = 8
  price_fen_per_hour = 900

[[site]]
id = "b"
name = "Site B"
city = "Qingdao"
level = "city"
lat = 36.0
lon = 120.3
pue = 1.4
green_share = 0.1
provider = "b-co"
  [[site.pool]]
  type = "A100"
  count = 8
  price_fen_per_hour = 2000

[[link]]
a = "a"
b = "b"
bandwidth_gbps = 100
latency_ms = 4.5
price_fen_per_gb = 2
"#;

pub fn exe() -> &'static str {
    env!("CARGO_BIN_EXE_suanwang")
}

pub fn run(args: &[&str]) -> Output {
    Command::new(exe()).args(args).output().expect("binary runs")
}

pub fn run_ok(args: &[&str]) -> String {
    let o = run(args);
    assert!(o.status.success(), "{args:?}: {}", String::from_utf8_lossy(&o.stderr));
    String::from_utf8_lossy(&o.stdout).trim().to_string()
}

pub struct Platform {
    pub dir: PathBuf,
    pub db: PathBuf,
    topology: PathBuf,
    port: u16,
    pub url: String,
    server: Option<Child>,
    pub agents: HashMap<String, Child>,
    pub operator: String,
    /// Extra arguments of `serve` (timings, quotas).
    serve_args: Vec<String>,
}

impl Platform {
    pub fn new(name: &str) -> Platform {
        Platform::with(name, &["--lease-s", "4", "--heartbeat-s", "1", "--site-timeout-s", "4"])
    }

    /// A platform whose server runs with `serve_args` (instead of the short timings).
    pub fn with(name: &str, serve_args: &[&str]) -> Platform {
        Platform::with_topology(name, TOPOLOGY, serve_args)
    }

    /// A platform on a network of the test's own.
    pub fn with_topology(name: &str, topology_toml: &str, serve_args: &[&str]) -> Platform {
        let dir = std::env::temp_dir().join(format!("suanwang-platform-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let topology = dir.join("net.toml");
        std::fs::write(&topology, topology_toml).unwrap();
        let db = dir.join("suanwang.db");
        let operator = run_ok(&["admin", "--db", db.to_str().unwrap(), "bootstrap"]);
        let mut p = Platform {
            dir,
            db,
            topology,
            port: 0,
            url: String::new(),
            server: None,
            agents: HashMap::new(),
            operator,
            serve_args: serve_args.iter().map(|a| a.to_string()).collect(),
        };
        p.start_server();
        p
    }

    pub fn start_server(&mut self) {
        let listen = format!("127.0.0.1:{}", self.port);
        let mut child = Command::new(exe())
            .args([
                "serve",
                "--db",
                self.db.to_str().unwrap(),
                "--topology",
                self.topology.to_str().unwrap(),
                "--listen",
                &listen,
            ])
            .args(&self.serve_args)
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(rest) = line.strip_prefix("suanwang serving on http://") {
                    let _ = tx.send(rest.split_whitespace().next().unwrap_or_default().to_string());
                }
            }
        });
        let address = rx.recv_timeout(Duration::from_secs(30)).expect("server starts");
        self.port = address.rsplit(':').next().unwrap().parse().unwrap();
        self.url = format!("http://{address}");
        self.server = Some(child);
    }

    pub fn server_pid(&self) -> u32 {
        self.server.as_ref().unwrap().id()
    }

    pub fn kill_server(&mut self) {
        let mut server = self.server.take().unwrap();
        server.kill().unwrap();
        server.wait().unwrap();
    }

    pub fn db(&self) -> &str {
        self.db.to_str().unwrap()
    }

    /// The provider token of a site's agent, kept in a file as an operator would.
    pub fn agent_token_file(&self, site: &str) -> PathBuf {
        let file = self.dir.join(format!("{site}.token"));
        if !file.exists() {
            let token = run_ok(&["admin", "--db", self.db(), "token", "--role", "provider", "--site", site]);
            std::fs::write(&file, token).unwrap();
        }
        file
    }

    pub fn start_agent(&mut self, site: &str) {
        self.start_agent_with(site, &[]);
    }

    pub fn start_agent_with(&mut self, site: &str, extra: &[&str]) {
        let token_file = self.agent_token_file(site);
        let workdir = self.workdir(site);
        let child = Command::new(exe())
            .args(["agent", "--server", &self.url, "--site", site, "--backend", "local", "--workdir"])
            .arg(&workdir)
            .arg("--token-file")
            .arg(&token_file)
            // Container jobs only where a test asks for them (`containers`).
            .args(if extra.contains(&"--containers") { &[][..] } else { &["--containers", "no"][..] })
            .args(extra)
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        self.agents.insert(site.to_string(), child);
        // Wait for the site to come up, so placements do not race the agent's start.
        let operator = Client::new(&self.url, &self.operator);
        let started = Instant::now();
        loop {
            let sites: Vec<suanwang_api::Site> = operator.get("/v1/sites").unwrap();
            if sites.iter().any(|s| s.id == site && s.up) {
                break;
            }
            assert!(started.elapsed() < Duration::from_secs(30), "the agent of {site} never polled");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn workdir(&self, site: &str) -> PathBuf {
        self.dir.join(format!("work-{site}"))
    }

    pub fn kill_agent(&mut self, site: &str) {
        let mut agent = self.agents.remove(site).unwrap();
        agent.kill().unwrap(); // SIGKILL
        agent.wait().unwrap();
    }

    /// An organisation with money, and a consumer client for it.
    pub fn org(&self, id: &str, home: &str) -> Client {
        run_ok(&["admin", "--db", self.db(), "org", id, "--kind", "enterprise"]);
        let operator = Client::new(&self.url, &self.operator);
        let _: serde_json::Value =
            operator.post("/v1/orgs", &serde_json::json!({"id": id, "kind": "enterprise", "home": home})).unwrap();
        run_ok(&[
            "ledger",
            "--db",
            self.db(),
            "deposit",
            id,
            "10000000",
            "--id",
            &format!("{:x}", id.len() * 7919 + home.len()),
        ]);
        self.consumer(id)
    }

    /// A new consumer token of an organisation (made by `suanwang admin`).
    pub fn consumer_token(&self, org: &str) -> String {
        run_ok(&["admin", "--db", self.db(), "token", "--role", "consumer", "--org", org])
    }

    /// A client with a new consumer token of an organisation.
    pub fn consumer(&self, org: &str) -> Client {
        Client::new(&self.url, &self.consumer_token(org))
    }

    pub fn wait(&self, client: &Client, id: u64, what: &str, done: impl Fn(&Job) -> bool) -> Job {
        let started = Instant::now();
        loop {
            let job: Job = client.get(&format!("/v1/jobs/{id}")).unwrap();
            if done(&job) {
                return job;
            }
            assert!(started.elapsed() < Duration::from_secs(60), "job {id} never {what}: {job:?}");
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    pub fn verify(&self) {
        let out = run_ok(&["ledger", "verify", self.db()]);
        assert!(out.contains(": ok: "), "{out}");
    }
}

impl Drop for Platform {
    fn drop(&mut self) {
        for (_, mut agent) in self.agents.drain() {
            let _ = agent.kill();
            let _ = agent.wait();
        }
        if let Some(mut server) = self.server.take() {
            let _ = server.kill();
            let _ = server.wait();
        }
    }
}

pub fn job(command: &str) -> JobRequest {
    JobRequest {
        name: "test".into(),
        command: vec!["sh".into(), "-c".into(), command.into()],
        env: Default::default(),
        secret_env: Default::default(),
        image: None,
        gpus: 8,
        accelerators: vec!["A100".into()],
        estimate_s: 60,
        time_limit_s: None,
        memory_mb: None,
        cpus: None,
        retries: 0,
        datasets: vec![],
        deadline_s: None,
        budget_fen: None,
        weights: None,
        origin: None,
        org: None,
    }
}

pub fn submit(client: &Client, request: &JobRequest) -> u64 {
    let job: Job = client.post("/v1/jobs", request).unwrap();
    job.id
}

pub fn logs(client: &Client, id: u64) -> String {
    let mut out = Vec::new();
    client.stream(&format!("/v1/jobs/{id}/logs"), &mut out).unwrap();
    String::from_utf8_lossy(&out).to_string()
}

pub fn bill_lines(client: &Client) -> Bill {
    client.get("/v1/bill").unwrap()
}

#[test]
fn a_job_runs_on_an_agent_and_is_billed_once() {
    let mut p = Platform::new("run");
    p.start_agent("a");
    p.start_agent("b");
    let acme = p.org("acme", "a");
    let id = submit(&acme, &job("echo hello from $SUANWANG_JOB; sleep 1; echo bye"));
    let done = p.wait(&acme, id, "succeeded", |j| j.state.is_terminal());
    assert_eq!(done.state, JobState::Succeeded, "{done:?}");
    assert_eq!((done.site.as_deref(), done.exit_code, done.attempts), (Some("a"), Some(0), 1));
    let out = logs(&acme, id);
    assert!(out.starts_with("=== attempt 1 at a ===\n"), "{out}");
    assert!(out.contains(&format!("hello from {id}")) && out.contains("bye"), "{out}");
    let bill = bill_lines(&acme);
    assert_eq!(bill.lines.len(), 1);
    assert_eq!((bill.lines[0].job, bill.lines[0].attempt, bill.lines[0].cause.as_str()), (id, 1, "succeeded"));
    let l = &bill.lines[0];
    assert_eq!(l.compute_fen - l.card_fen - l.subsidy_fen + l.transfer_fen, l.org_fen, "a bill line adds up: {l:?}");
    let balances: Balances = acme.get("/v1/vouchers").unwrap();
    assert_eq!((balances.wallet_fen, balances.wallet_held_fen), (10_000_000 - bill.org_fen, 0));
    let events: Vec<JobEvent> = acme.get(&format!("/v1/jobs/{id}/events")).unwrap();
    let kinds: Vec<&str> = events.iter().map(|e| e.kind.as_str()).collect();
    assert_eq!(kinds, ["submitted", "placed", "leased", "started", "succeeded"]);
    p.verify();
}

#[test]
fn cancelling_a_running_job_kills_it_at_once_and_bills_the_time_it_ran() {
    let mut p = Platform::new("cancel");
    p.start_agent("a");
    let acme = p.org("acme", "a");
    let marker = format!("suanwang-cancel-{}", std::process::id());
    let id = submit(&acme, &job(&format!("echo started; exec sleep 300 # {marker}")));
    p.wait(&acme, id, "started", |j| j.started_at.is_some());
    let held: Balances = acme.get("/v1/vouchers").unwrap();
    assert!(held.wallet_held_fen > 0);
    std::thread::sleep(Duration::from_secs(2));
    let cancelled: Job = acme.post(&format!("/v1/jobs/{id}/cancel"), &()).unwrap();
    assert_eq!(cancelled.state, JobState::Cancelled);
    // The stop reaches the agent on its long poll, not at the next heartbeat.
    let started = Instant::now();
    while Command::new("pgrep").args(["-f", &marker]).output().unwrap().status.success() {
        assert!(started.elapsed() < Duration::from_millis(1500), "process still running");
        std::thread::sleep(Duration::from_millis(50));
    }
    let bill = bill_lines(&acme);
    assert_eq!(bill.lines.len(), 1, "{bill:?}");
    assert_eq!(bill.lines[0].cause, "cancelled");
    assert!(bill.lines[0].accel_seconds >= 8 * 2, "the time it ran is billed: {bill:?}");
    let released: Balances = acme.get("/v1/vouchers").unwrap();
    assert_eq!((released.wallet_held_fen, released.wallet_fen), (0, 10_000_000 - bill.org_fen));
    let again = acme.post::<_, Job>(&format!("/v1/jobs/{id}/cancel"), &()).unwrap_err();
    assert!(matches!(again, ClientError::Api { status: 409, .. }), "{again}");
    p.verify();
}

#[test]
fn a_killed_agent_s_job_is_requeued_run_elsewhere_and_billed_once() {
    let mut p = Platform::new("agent-killed");
    p.start_agent("a");
    p.start_agent("b");
    let acme = p.org("acme", "a");
    let id = submit(&acme, &job("echo attempt $SUANWANG_ATTEMPT; sleep 3; echo finished"));
    let running = p.wait(&acme, id, "started", |j| j.started_at.is_some());
    assert_eq!(running.site.as_deref(), Some("a"));
    p.kill_agent("a");
    let done = p.wait(&acme, id, "finished", |j| j.state.is_terminal());
    assert_eq!((done.state, done.site.as_deref(), done.attempts), (JobState::Succeeded, Some("b"), 2), "{done:?}");
    let events: Vec<JobEvent> = acme.get(&format!("/v1/jobs/{id}/events")).unwrap();
    assert!(events.iter().any(|e| e.kind == "requeued"), "{events:?}");
    let bill = bill_lines(&acme);
    let causes: Vec<(u32, &str, &str, i64)> =
        bill.lines.iter().map(|l| (l.attempt, l.site.as_str(), l.cause.as_str(), l.org_fen)).collect();
    assert_eq!(causes.len(), 2, "{bill:?}");
    assert_eq!((causes[0].0, causes[0].1, causes[0].3), (1, "a", 0), "{bill:?}");
    assert!(["lost (not billed)", "site down (not billed)"].contains(&causes[0].2), "{bill:?}");
    assert_eq!((causes[1].0, causes[1].1, causes[1].2), (2, "b", "succeeded"), "billed once: {bill:?}");
    let balances: Balances = acme.get("/v1/vouchers").unwrap();
    assert_eq!((balances.wallet_held_fen, balances.wallet_fen), (0, 10_000_000 - bill.org_fen));
    let out = logs(&acme, id);
    assert!(out.contains("=== attempt 2 at b ===\nattempt 2"), "{out}");
    p.verify();
}

#[test]
fn a_server_restart_loses_no_job_hold_or_log() {
    let mut p = Platform::new("restart");
    p.start_agent("a");
    let acme = p.org("acme", "a");
    let running = submit(&acme, &job("echo before; sleep 5; echo after"));
    let mut waiting = job("echo second");
    waiting.gpus = 8;
    let queued = submit(&acme, &waiting);
    p.wait(&acme, running, "started", |j| j.started_at.is_some());
    std::thread::sleep(Duration::from_millis(500));
    assert!(logs(&acme, running).contains("before"));
    let held: Balances = acme.get("/v1/vouchers").unwrap();
    p.kill_server();
    p.start_server();
    let acme = p.consumer("acme");
    let after_restart: Balances = acme.get("/v1/vouchers").unwrap();
    assert_eq!(after_restart.wallet_held_fen, held.wallet_held_fen, "the hold survived");
    let first = p.wait(&acme, running, "finished", |j| j.state.is_terminal());
    assert_eq!((first.state, first.attempts), (JobState::Succeeded, 1), "{first:?}");
    let out = logs(&acme, running);
    assert!(out.contains("before") && out.contains("after"), "{out}");
    let second = p.wait(&acme, queued, "finished", |j| j.state.is_terminal());
    assert_eq!(second.state, JobState::Succeeded);
    assert_eq!(bill_lines(&acme).lines.len(), 2);
    p.verify();
}

#[test]
fn a_consumer_sees_and_touches_only_its_own_jobs() {
    let mut p = Platform::new("tenancy");
    p.start_agent("a");
    let alice = p.org("alice", "a");
    let bob = p.org("bob", "b");
    let mut long = job("sleep 20");
    long.gpus = 1;
    let id = submit(&alice, &long);
    let not_found = |e: ClientError| matches!(e, ClientError::Api { status: 404, .. });
    assert!(not_found(bob.get::<Job>(&format!("/v1/jobs/{id}")).unwrap_err()));
    assert!(not_found(bob.post::<_, Job>(&format!("/v1/jobs/{id}/cancel"), &()).unwrap_err()));
    assert!(not_found(bob.get::<Vec<JobEvent>>(&format!("/v1/jobs/{id}/events")).unwrap_err()));
    let bobs: JobList = bob.get("/v1/jobs").unwrap();
    assert!(bobs.jobs.is_empty());
    let alices: JobList = alice.get("/v1/jobs").unwrap();
    assert_eq!(alices.jobs.len(), 1);
    let forbidden = bob.get::<Balances>("/v1/vouchers?org=alice").unwrap_err();
    assert!(matches!(forbidden, ClientError::Api { status: 403, .. }), "{forbidden}");
    let mut for_alice = job("true");
    for_alice.org = Some("alice".into());
    assert!(matches!(bob.post::<_, Job>("/v1/jobs", &for_alice).unwrap_err(), ClientError::Api { status: 403, .. }));
    let provider =
        Client::new(&p.url, &run_ok(&["admin", "--db", p.db(), "token", "--role", "provider", "--site", "a"]));
    assert!(matches!(
        provider.post::<_, Job>("/v1/jobs", &job("true")).unwrap_err(),
        ClientError::Api { status: 403, .. }
    ));
    let stranger = Client::new(&p.url, "sw_not_a_token");
    assert!(matches!(stranger.get::<JobList>("/v1/jobs").unwrap_err(), ClientError::Api { status: 401, .. }));
    let operator = Client::new(&p.url, &p.operator);
    let by_org: JobList = operator.get("/v1/jobs?org=alice").unwrap();
    assert_eq!(by_org.jobs.len(), 1);
    let none: JobList = operator.get("/v1/jobs?org=bob").unwrap();
    assert!(none.jobs.is_empty());
    assert!(matches!(bob.get::<JobList>("/v1/jobs?org=alice").unwrap_err(), ClientError::Api { status: 400, .. }));
    let cancelled: Job = alice.post(&format!("/v1/jobs/{id}/cancel"), &()).unwrap();
    assert_eq!(cancelled.state, JobState::Cancelled);
}

/// Sends a raw body with a JSON content type.
fn raw(p: &Platform, token: &str, path: &str, body: &[u8]) -> (u16, serde_json::Value) {
    let agent: ureq::Agent = ureq::Agent::config_builder().http_status_as_error(false).build().into();
    let mut response = agent
        .post(&format!("{}{path}", p.url))
        .header("Authorization", &format!("Bearer {token}"))
        .header("Content-Type", "application/json")
        .send(body)
        .unwrap();
    let status = response.status().as_u16();
    let text = response.body_mut().read_to_string().unwrap();
    (status, serde_json::from_str(&text).unwrap_or_else(|_| panic!("not JSON: {text}")))
}

#[test]
fn bad_input_gets_a_4xx_json_error_and_stores_nothing() {
    let p = Platform::new("bad-input");
    let acme = p.org("acme", "a");
    let token = p.consumer_token("acme");
    let good = serde_json::to_value(job("true")).unwrap();
    let with = |key: &str, value: serde_json::Value| {
        let mut v = good.clone();
        v[key] = value;
        serde_json::to_vec(&v).unwrap()
    };
    let cases: Vec<(&str, Vec<u8>, u16, &str)> = vec![
        ("malformed", b"{\"gpus\": 2,".to_vec(), 400, "body"),
        ("unknown field", with("colour", serde_json::json!("red")), 400, "colour"),
        ("wrong type", with("gpus", serde_json::json!("two")), 400, "gpus"),
        ("negative count", with("gpus", serde_json::json!(-1)), 400, "gpus"),
        ("absurd count", with("gpus", serde_json::json!(1_000_000)), 400, "gpus"),
        ("zero estimate", with("estimate_s", serde_json::json!(0)), 400, "estimate_s"),
        ("unknown accelerator", with("accelerators", serde_json::json!(["Z9000"])), 400, "accelerators"),
        ("unknown site", with("origin", serde_json::json!("atlantis")), 400, "origin"),
        ("negative budget", with("budget_fen", serde_json::json!(-5)), 400, "budget_fen"),
        ("oversized", vec![b' '; 2 << 20], 413, ""),
    ];
    for (name, body, status, field) in cases {
        let (got, error) = raw(&p, &token, "/v1/jobs", &body);
        assert_eq!(got, status, "{name}: {error}");
        assert!(error["code"].is_string() && error["message"].is_string(), "{name}: {error}");
        if !field.is_empty() {
            assert_eq!(error["field"].as_str(), Some(field), "{name}: {error}");
        }
    }
    let (status, error) = raw(&p, &token, "/v1/jobs/abc/cancel", b"");
    assert_eq!((status, error["field"].as_str()), (400, Some("id")));
    let list: JobList = acme.get("/v1/jobs").unwrap();
    assert!(list.jobs.is_empty(), "nothing stored: {list:?}");
    let openapi: serde_json::Value = acme.get("/openapi.json").unwrap();
    assert!(openapi["paths"]["/v1/jobs"].is_object() && openapi["components"]["schemas"]["JobRequest"].is_object());
}

#[test]
fn admin_adds_a_site_that_the_server_uses_after_a_restart() {
    let mut p = Platform::new("site");
    let bad = run(&[
        "admin",
        "--db",
        p.db(),
        "site",
        "c",
        "--city",
        "Yantai",
        "--level",
        "edge",
        "--lat",
        "37.4",
        "--lon",
        "121.4",
        "--provider",
        "c-co",
        "--pool",
        "Z9:4:800",
        "--link",
        "a:40:3:2",
    ]);
    assert!(!bad.status.success());
    assert!(
        String::from_utf8_lossy(&bad.stderr).contains("site 'c' pool 1 (Z9): unknown accelerator type 'Z9'"),
        "{}",
        String::from_utf8_lossy(&bad.stderr)
    );
    let out = run_ok(&[
        "admin",
        "--db",
        p.db(),
        "site",
        "c",
        "--city",
        "Yantai",
        "--level",
        "edge",
        "--lat",
        "37.4",
        "--lon",
        "121.4",
        "--provider",
        "c-co",
        "--pool",
        "A100:4:800",
        "--link",
        "a:40:3:2",
    ]);
    assert!(out.contains("now has 3 sites"), "{out}");
    p.kill_server();
    p.start_server();
    let operator = Client::new(&p.url, &p.operator);
    let sites: Vec<suanwang_api::Site> = operator.get("/v1/sites").unwrap();
    assert_eq!(sites.iter().map(|s| s.id.as_str()).collect::<Vec<_>>(), ["a", "b", "c"]);
    // The database keeps its network: another one is refused.
    let other = run(&["serve", "--db", p.db(), "--topology", "shandong", "--listen", "127.0.0.1:0"]);
    assert!(!other.status.success());
    assert!(String::from_utf8_lossy(&other.stderr).contains("holds network 'two-sites', not 'shandong'"));
}

/// Processes whose command line contains `text`.
fn processes(text: &str) -> Vec<u32> {
    let o = Command::new("pgrep").args(["-f", text]).output().unwrap();
    String::from_utf8_lossy(&o.stdout).lines().filter_map(|l| l.trim().parse().ok()).collect()
}

#[test]
fn up_supervises_its_agents_stops_them_on_sigterm_and_reuses_its_tokens() {
    let dir = std::env::temp_dir().join(format!("suanwang-platform-{}-up", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let topology = dir.join("net.toml");
    std::fs::write(&topology, TOPOLOGY).unwrap();
    let db = dir.join("up.db");
    let workdir = dir.join("work");
    let start = || {
        let mut child = Command::new(exe())
            .args(["up", "--listen", "127.0.0.1:0", "--topology", topology.to_str().unwrap()])
            .args(["--db", db.to_str().unwrap(), "--workdir", workdir.to_str().unwrap()])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let mut url = String::new();
        let mut operator = None;
        while let Ok(line) = rx.recv_timeout(Duration::from_secs(60)) {
            if let Some(rest) = line.strip_prefix("suanwang is up at ") {
                url = rest.split(':').take(3).collect::<Vec<_>>().join(":");
            }
            if let Some(token) = line.strip_prefix("operator token (shown once): ") {
                operator = Some(token.to_string());
            }
            if line.starts_with("more organisations") {
                break;
            }
        }
        assert!(url.starts_with("http://127.0.0.1:"), "up did not start");
        (child, url, operator)
    };
    let (mut up, url, operator) = start();
    let operator = Client::new(&url, &operator.expect("a first start makes an operator token"));
    let wait_up = |what: &str| {
        let started = Instant::now();
        loop {
            let sites: Vec<suanwang_api::Site> = operator.get("/v1/sites").unwrap();
            if sites.iter().all(|s| s.up && s.capabilities.sandboxed) {
                return;
            }
            assert!(started.elapsed() < Duration::from_secs(30), "{what}: {sites:?}");
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    wait_up("both agents start sandboxed");
    let agent_of_a = format!("agent --server {url} --site a ");
    let first = processes(&agent_of_a);
    assert_eq!(first.len(), 1, "{first:?}");
    // An agent that dies is restarted.
    Command::new("kill").args(["-9", &first[0].to_string()]).status().unwrap();
    let started = Instant::now();
    loop {
        let now = processes(&agent_of_a);
        if now.len() == 1 && now != first {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(10), "the agent of a was not restarted");
        std::thread::sleep(Duration::from_millis(100));
    }
    let tokens_before = std::fs::read_to_string(workdir.join(".tokens/a.token")).unwrap();
    // SIGTERM: every agent stops, then up.
    Command::new("kill").args(["-TERM", &up.id().to_string()]).status().unwrap();
    let status = up.wait().unwrap();
    assert!(status.success(), "{status}");
    assert!(processes(&format!("agent --server {url} ")).is_empty(), "agents left behind");
    // A site added to the database's network gets its agent at the next start.
    run_ok(&[
        "admin",
        "--db",
        db.to_str().unwrap(),
        "site",
        "c",
        "--city",
        "Weifang",
        "--level",
        "edge",
        "--lat",
        "36.7",
        "--lon",
        "119.1",
        "--provider",
        "c-co",
        "--pool",
        "A100:4:900",
        "--link",
        "a:10:3:2",
    ]);
    // A second start reuses its tokens instead of minting more.
    let (mut up, url, operator_again) = start();
    assert!(operator_again.is_none());
    assert_eq!(std::fs::read_to_string(workdir.join(".tokens/a.token")).unwrap(), tokens_before);
    let operator = Client::new(&url, &run_ok(&["admin", "--db", db.to_str().unwrap(), "bootstrap", "--force"]));
    let started = Instant::now();
    loop {
        let sites: Vec<suanwang_api::Site> = operator.get("/v1/sites").unwrap();
        if sites.len() == 3 && sites.iter().all(|s| s.up) {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(30), "the agents of a, b and the added c: {sites:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
    let listed = run_ok(&["admin", "--db", db.to_str().unwrap(), "token", "list"]);
    let live_provider_tokens =
        listed.lines().filter(|l| l.contains("provider") && l.trim_end().ends_with(" -")).count();
    assert_eq!(live_provider_tokens, 3, "{listed}");
    Command::new("kill").args(["-INT", &up.id().to_string()]).status().unwrap();
    assert!(up.wait().unwrap().success());
    assert!(processes(&format!("agent --server {url} ")).is_empty(), "agents left behind after SIGINT");
}

/// The checkpoint files in `dir`, oldest first.
fn checkpoint_files(dir: &std::path::Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|d| {
            d.filter_map(|e| e.ok().map(|e| e.path())).filter(|p| p.extension().is_some_and(|x| x == "json")).collect()
        })
        .unwrap_or_default();
    files.sort();
    files
}

#[test]
fn the_server_writes_signed_checkpoints_that_an_auditor_verifies() {
    let keys = std::env::temp_dir().join(format!("suanwang-checkpoint-keys-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&keys);
    std::fs::create_dir_all(&keys).unwrap();
    let key = keys.join("operator.key");
    let public = run_ok(&["ledger", "keygen", "--out", key.to_str().unwrap()]);
    let dir = keys.join("checkpoints");
    let p = Platform::with(
        "checkpoints",
        &[
            "--checkpoint-key",
            key.to_str().unwrap(),
            "--checkpoint-dir",
            dir.to_str().unwrap(),
            "--checkpoint-every-s",
            "1",
        ],
    );
    let wait_for = |n: usize| {
        let deadline = Instant::now() + Duration::from_secs(30);
        while checkpoint_files(&dir).len() < n {
            assert!(Instant::now() < deadline, "no checkpoint {n} in {}: {:?}", dir.display(), checkpoint_files(&dir));
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    wait_for(1);
    // Each write moves the head, and the next period signs it.
    p.org("acme", "a");
    wait_for(2);
    p.org("betacorp", "a");
    wait_for(3);
    let files = checkpoint_files(&dir);
    let mut seqs = Vec::new();
    for file in &files {
        let checkpoint: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(file).unwrap()).unwrap();
        seqs.push(checkpoint["seq"].as_u64().unwrap());
        assert_eq!(checkpoint["public_key"].as_str(), Some(public.as_str()));
        // The auditor's check: the signature, then that the live book extends the head.
        let out = run_ok(&["ledger", "verify", p.db(), "--anchor", file.to_str().unwrap(), "--public-key", &public]);
        assert!(out.contains("extends the expected head"), "{out}");
    }
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "a checkpoint only when the head moved: {seqs:?}");
    // Without the key the server writes none, and a bad key stops it at once.
    std::fs::write(keys.join("bad.key"), "not a key").unwrap();
    let o = run(&[
        "serve",
        "--db",
        p.db(),
        "--listen",
        "127.0.0.1:0",
        "--checkpoint-key",
        keys.join("bad.key").to_str().unwrap(),
    ]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("--checkpoint-key"), "{}", String::from_utf8_lossy(&o.stderr));
}

#[test]
fn a_users_slurm_script_runs_as_a_job_and_a_multi_node_one_is_refused_by_its_line() {
    let mut p = Platform::new("sbatch");
    p.start_agent("a");
    let acme = p.org("acme", "a");
    let token = p.consumer_token("acme");
    let client = |args: &[&str]| {
        Command::new(exe()).args(args).env("SUANWANG_SERVER", &p.url).env("SUANWANG_TOKEN", &token).output().unwrap()
    };
    let script = p.dir.join("train.sbatch");
    std::fs::write(
        &script,
        "#!/bin/sh\n#SBATCH --job-name=train\n#SBATCH --gres=gpu:a100:1\n#SBATCH --time=00:02:00\n#SBATCH --output=train-%j.out\n\necho \"step 1 of $SUANWANG_JOB\"\nexit 3\n",
    )
    .unwrap();
    let o = client(&["--json", "submit", script.to_str().unwrap()]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(String::from_utf8_lossy(&o.stderr).contains("line 5: --output: ignored"), "{o:?}");
    let job: Job = serde_json::from_slice(&o.stdout).unwrap();
    let done = p.wait(&acme, job.id, "failed", |j| j.state.is_terminal());
    assert_eq!((done.state, done.exit_code, done.name.as_str()), (JobState::Failed, Some(3), "train"), "{done:?}");
    assert!(logs(&acme, job.id).contains(&format!("step 1 of {}", job.id)));
    std::fs::write(&script, "#!/bin/bash\n#SBATCH --gres=gpu:a100:1\n#SBATCH --nodes=2\nsrun hostname\n").unwrap();
    let o = client(&["submit", script.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("train.sbatch: line 3: --nodes: 2 nodes cannot be honoured"),
        "{o:?}"
    );
    p.verify();
}
