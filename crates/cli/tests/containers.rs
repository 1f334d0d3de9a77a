//! Jobs given as container images, on the real platform: podman with runc,
//! the local image `suanwang-test-busybox` (made by `scripts/test-image.sh`
//! from Debian's static busybox), agents with `--containers yes` and
//! `--containers no` side by side.

use std::process::Command;
use std::sync::Once;
use std::time::{Duration, Instant};

use suanwang_api::client::ClientError;
use suanwang_api::{Job, JobEvent, JobState, Quote};

use crate::platform::{Platform, bill_lines, job, logs, submit};

const IMAGE: &str = "suanwang-test-busybox";

/// Makes the test image once per test run.
fn test_image() {
    static MADE: Once = Once::new();
    MADE.call_once(|| {
        let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/test-image.sh");
        let out = Command::new("bash").arg(&script).output().expect("bash runs");
        assert!(
            out.status.success(),
            "{}: {} (container tests need podman, runc and busybox-static: see .ci/run)",
            script.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    });
}

fn in_image(command: &str) -> suanwang_api::JobRequest {
    let mut j = job(command);
    j.image = Some(IMAGE.into());
    j.gpus = 1;
    j
}

fn alive(cmdline: &str) -> bool {
    Command::new("pgrep").args(["-f", &format!("^{cmdline}$")]).output().unwrap().status.success()
}

fn wait_until(what: &str, within: Duration, done: impl Fn() -> bool) {
    let started = Instant::now();
    while !done() {
        assert!(started.elapsed() < within, "{what} within {within:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// podman's containers of this test's agents.
fn containers_named(prefix: &str) -> Vec<String> {
    let out = Command::new("podman").args(["ps", "--all", "--format", "{{.Names}}"]).output().unwrap();
    String::from_utf8_lossy(&out.stdout).lines().filter(|n| n.starts_with(prefix)).map(str::to_owned).collect()
}

#[test]
fn a_container_job_runs_as_its_own_user_without_credentials_or_network() {
    test_image();
    let mut p = Platform::new("ctr-run");
    p.start_agent_with("a", &["--containers", "yes"]);
    let acme = p.org("acme", "a");
    let mut j = in_image(
        "echo uid=$(id -u); echo secret=$MY_SECRET; echo path=$PATH; env | sort; \
         echo nets=$(cat /proc/net/dev | tail -n +3 | cut -d: -f1 | tr -d ' ' | tr '\\n' ,); \
         echo data > /work/out && echo wrote-work; touch /etc/evil 2>/dev/null || echo image-read-only; \
         echo t > /tmp/t && echo tmp-writable; \
         ls /proc | grep -c '^[0-9]' | sed 's/^/procs=/'",
    );
    j.secret_env.insert("MY_SECRET".into(), "s3cr3t".into());
    j.env.insert("PLAIN".into(), "a b=c".into());
    let id = submit(&acme, &j);
    let done = p.wait(&acme, id, "finished", |j| j.state.is_terminal());
    let out = logs(&acme, id);
    assert_eq!(done.state, JobState::Succeeded, "{done:?}\n{out}");
    assert!(out.starts_with("=== attempt 1 at a ===\n"), "{out}");
    assert!(out.contains(&format!("uid={}", 1_000_000_000 + id)), "not the job's own user: {out}");
    assert!(out.contains("secret=s3cr3t") && out.contains("PLAIN=a b=c"), "{out}");
    // The image's PATH, not the host's.
    assert!(out.contains("path=/bin\n"), "{out}");
    assert!(out.contains(&format!("SUANWANG_JOB={id}")) && out.contains("HOME=/work"), "{out}");
    assert!(!out.contains("sw_") && !out.contains("SUANWANG_TOKEN") && !out.contains("SUANWANG_AGENT"), "{out}");
    assert!(out.contains("nets=lo,\n"), "the job has a network: {out}");
    assert!(out.contains("wrote-work") && out.contains("image-read-only") && out.contains("tmp-writable"), "{out}");
    // Its own pid space: the shell and its few children only.
    let procs: u32 = out.lines().find_map(|l| l.strip_prefix("procs=")).unwrap().parse().unwrap();
    assert!(procs < 10, "sees the host's processes: {out}");
    let bill = bill_lines(&acme);
    assert_eq!(bill.lines.iter().filter(|l| l.job == id && l.cause == "succeeded").count(), 1, "{bill:?}");
    // Nothing is left: no container, no environment file (podman removes
    // it after the report; slow when the machine is busy).
    wait_until("the container is removed", Duration::from_secs(20), || containers_named("a-").is_empty());
    assert!(!p.workdir("a").join(format!(".engine/job-{id}-1.env")).exists());
    p.verify();
}

#[test]
fn image_jobs_go_only_where_the_image_is_and_unknown_images_are_refused() {
    test_image();
    let mut p = Platform::new("ctr-place");
    p.start_agent_with("a", &["--containers", "yes"]);
    p.start_agent_with("b", &["--containers", "no"]);
    // Home at b: without the image, b would be the natural place.
    let acme = p.org("acme", "b");
    let mut j = in_image("echo ran");
    let quote: Quote = acme.post("/v1/quote", &j).unwrap();
    assert_eq!(quote.best_site.as_deref(), Some("a"), "{quote:?}");
    let why = serde_json::to_string(&quote).unwrap();
    assert!(why.contains("site cannot run the job's container image"), "{why}");
    let id = submit(&acme, &j);
    let done = p.wait(&acme, id, "finished", |j| j.state.is_terminal());
    assert_eq!((done.state, done.site.as_deref()), (JobState::Succeeded, Some("a")), "{done:?}");
    // An image no site holds: 400 naming the field, nothing stored.
    j.image = Some("nosuch/image:1".into());
    let before: suanwang_api::JobList = acme.get("/v1/jobs").unwrap();
    match acme.post::<_, Job>("/v1/jobs", &j) {
        Err(ClientError::Api { status: 400, error }) => {
            assert_eq!(error.field.as_deref(), Some("image"));
            assert!(error.message.contains("no site has the image 'nosuch/image:1'"), "{error:?}");
            assert!(error.message.contains(IMAGE), "the message lists what exists: {error:?}");
        }
        other => panic!("{other:?}"),
    }
    // A line break in a value cannot travel to a container.
    j.image = Some(IMAGE.into());
    j.env.insert("MULTI".into(), "one\ntwo".into());
    match acme.post::<_, Job>("/v1/jobs", &j) {
        Err(ClientError::Api { status: 400, error }) => assert_eq!(error.field.as_deref(), Some("env")),
        other => panic!("{other:?}"),
    }
    let after: suanwang_api::JobList = acme.get("/v1/jobs").unwrap();
    assert_eq!(before.jobs.len(), after.jobs.len());
    // The sites list says who runs containers.
    let sites: Vec<suanwang_api::Site> = acme.get("/v1/sites").unwrap();
    let a = sites.iter().find(|s| s.id == "a").unwrap();
    let b = sites.iter().find(|s| s.id == "b").unwrap();
    assert!(a.capabilities.containers && a.capabilities.images.iter().any(|i| i == IMAGE), "{a:?}");
    assert!(!b.capabilities.containers && b.capabilities.images.is_empty(), "{b:?}");
}

#[test]
fn a_container_s_processes_die_with_cancel_time_limit_and_the_agent() {
    test_image();
    let mut p = Platform::new("ctr-escape");
    p.start_agent_with("a", &["--containers", "yes"]);
    let acme = p.org("acme", "a");
    let escaping = |n: u32, limit: Option<u64>| {
        let mut j = in_image(&format!("setsid sleep 977{n} & (setsid sh -c 'sleep 978{n}' &) ; sleep 300"));
        j.time_limit_s = limit;
        submit(&acme, &j)
    };
    let cancelled = escaping(1, None);
    wait_until("sleep 9771 starts", Duration::from_secs(30), || alive("sleep 9771") && alive("sleep 9781"));
    let _: Job = acme.post(&format!("/v1/jobs/{cancelled}/cancel"), &()).unwrap();
    wait_until("the cancel kills the container", Duration::from_secs(3), || {
        !alive("sleep 9771") && !alive("sleep 9781")
    });
    let limited = escaping(2, Some(3));
    wait_until("sleep 9772 starts", Duration::from_secs(30), || alive("sleep 9772"));
    let done = p.wait(&acme, limited, "failed", |j| j.state.is_terminal());
    assert_eq!(done.state, JobState::Failed);
    assert!(done.reason.as_deref().unwrap_or_default().contains("time limit"), "{done:?}");
    wait_until("the time limit kills the container", Duration::from_secs(3), || {
        !alive("sleep 9772") && !alive("sleep 9782")
    });
    let line = bill_lines(&acme).lines.into_iter().find(|l| l.job == limited).expect("billed");
    assert_eq!(line.cause, "time limit");
    // The agent is killed outright: its guard removes the container.
    let orphaned = escaping(3, None);
    p.wait(&acme, orphaned, "started", |j| j.started_at.is_some());
    wait_until("sleep 9773 starts", Duration::from_secs(30), || alive("sleep 9773"));
    p.kill_agent("a");
    wait_until("the agent's death kills the container", Duration::from_secs(5), || {
        !alive("sleep 9773") && !alive("sleep 9783")
    });
    // The dead agent's environment file (the job's secrets) is still there...
    let env_file = p.workdir("a").join(format!(".engine/job-{orphaned}-1.env"));
    assert!(env_file.exists(), "{}", env_file.display());
    // ...until the agent's next life, which reports the attempt lost and
    // leaves nothing behind.
    p.start_agent_with("a", &["--containers", "yes"]);
    wait_until("the dead attempt's secrets are removed", Duration::from_secs(20), || !env_file.exists());
    let events = || -> Vec<JobEvent> { acme.get(&format!("/v1/jobs/{orphaned}/events")).unwrap() };
    wait_until("attempt 1 reported lost", Duration::from_secs(20), || {
        events().iter().any(|e| e.detail.contains("restarted"))
    });
    let _: Job = acme.post(&format!("/v1/jobs/{orphaned}/cancel"), &()).unwrap();
    wait_until("no container left", Duration::from_secs(10), || {
        containers_named("a-").is_empty() || !alive("sleep 300")
    });
}

#[test]
fn a_container_over_its_memory_limit_or_without_its_command_fails_as_its_own_fault() {
    test_image();
    let mut p = Platform::new("ctr-fail");
    p.start_agent_with("a", &["--containers", "yes"]);
    let acme = p.org("acme", "a");
    let mut hog = in_image("x=$(head -c 200000000 /dev/zero | tr '\\0' a); echo survived ${#x}");
    hog.memory_mb = Some(32);
    let hog_id = submit(&acme, &hog);
    let done = p.wait(&acme, hog_id, "failed", |j| j.state.is_terminal());
    assert_eq!(done.state, JobState::Failed, "{done:?}");
    assert!(done.reason.as_deref().unwrap_or_default().contains("memory limit"), "{done:?}");
    assert!(!logs(&acme, hog_id).contains("survived"));
    let events: Vec<JobEvent> = acme.get(&format!("/v1/jobs/{hog_id}/events")).unwrap();
    assert!(events.iter().any(|e| e.detail.contains("memory limit of 32 MiB")), "{events:?}");
    // A command the image does not have: the job's mistake, billed, not retried.
    let mut missing = in_image("");
    missing.command = vec!["no-such-program".into()];
    let missing_id = submit(&acme, &missing);
    let done = p.wait(&acme, missing_id, "failed", |j| j.state.is_terminal());
    assert_eq!((done.state, done.attempts), (JobState::Failed, 1), "{done:?}");
    let events: Vec<JobEvent> = acme.get(&format!("/v1/jobs/{missing_id}/events")).unwrap();
    assert!(events.iter().any(|e| e.detail.contains("cannot be run in the image")), "{events:?}");
    assert!(logs(&acme, missing_id).contains("no-such-program"), "podman's error is in the log");
    // No command, and the image has none of its own: the job's mistake too.
    let mut bare = in_image("");
    bare.command = vec![];
    let bare_id = submit(&acme, &bare);
    let done = p.wait(&acme, bare_id, "failed", |j| j.state.is_terminal());
    assert_eq!((done.state, done.attempts), (JobState::Failed, 1), "{done:?}");
    let events: Vec<JobEvent> = acme.get(&format!("/v1/jobs/{bare_id}/events")).unwrap();
    assert!(events.iter().any(|e| e.detail.contains("has no command of its own")), "{events:?}");
    // A job that exits 125 (podman's own error code) is still its own failure.
    let sly = submit(&acme, &in_image("exit 125"));
    let done = p.wait(&acme, sly, "failed", |j| j.state.is_terminal());
    assert_eq!((done.state, done.attempts, done.exit_code), (JobState::Failed, 1, Some(125)), "{done:?}");
    let bill = bill_lines(&acme);
    for id in [hog_id, missing_id, bare_id, sly] {
        assert_eq!(bill.lines.iter().filter(|l| l.job == id).count(), 1, "job {id} billed once: {bill:?}");
    }
    p.verify();
}
