//! Container attempts: a job that gives an `image` runs under podman with
//! runc, from an image already present at the site (none is ever pulled).
//!
//! The container gets the same isolation as a bubblewrap attempt, by the
//! engine's own means: the job's own unprivileged user, every capability
//! dropped and no new privileges, a read-only image with a private `/tmp`,
//! its directory as `/work`, no network (or the host's with
//! `--job-host-network`), its own pid, ipc and uts namespaces. Limits and
//! the kill live in a cgroup of ours: podman makes the container's groups
//! below the attempt's (`--cgroup-parent`), so memory, CPU and process
//! limits hold for the whole container, an out-of-memory kill anywhere in it
//! is seen, and freezing and killing the group ends everything, conmon
//! included.
//!
//! A container is not a child of the agent: if the agent dies, conmon keeps
//! it running. Each container attempt therefore has a guard, a small shell
//! in its own session that blocks reading a pipe only the agent holds; when
//! the agent dies, however it dies, the pipe closes and the guard removes
//! the container at once (`podman rm --force`). At its next start the agent
//! removes every container of its previous life (by label) and sweeps their
//! groups.
//!
//! A job's environment reaches the container through a root-only file
//! (`--env-file`), never podman's own environment or command line: a job
//! variable such as `LD_PRELOAD` or `CONTAINERS_CONF` must not reach the
//! engine, and command lines are readable by every user of the host.

use std::collections::BTreeMap;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::cgroup::{Cgroups, Group};

/// The environment podman itself runs with: nothing of the agent's.
const ENGINE_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

#[derive(Debug, thiserror::Error)]
pub enum ContainerError {
    #[error("{0} is not installed (apt-get install podman runc)")]
    Missing(&'static str),
    #[error("podman does not work here: {0}")]
    Broken(String),
    #[error("cgroups: {0}")]
    Cgroup(#[from] crate::cgroup::CgroupError),
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

fn find_program(name: &str) -> Option<PathBuf> {
    ENGINE_PATH.split(':').map(|d| Path::new(d).join(name)).find(|p| p.is_file())
}

/// The site's container engine.
#[derive(Debug)]
pub struct Podman {
    program: PathBuf,
    runtime: PathBuf,
    /// Names this agent's containers and labels them, so that its next life
    /// finds them and no other agent's.
    instance: String,
    cgroups: Cgroups,
    /// The image store's index, whose change says the image list may have.
    image_index: Option<PathBuf>,
    /// The engine's working directory (root only): conmon leaves files
    /// there (an `oom` marker), which belong neither in a job's directory
    /// nor wherever the agent was started.
    engine_dir: PathBuf,
}

/// How a container attempt ended, as podman tells it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ended {
    /// The job's process ran and exited with this code.
    Ran(i32),
    /// The job's command could not be run (not found or not executable
    /// in the image): the job's own mistake.
    CommandFailed(i32),
    /// The engine could not make or start the container: the site's fault.
    EngineFailed(String),
}

/// Removes the container if the agent dies (see the module comment).
pub struct Guard {
    child: std::process::Child,
    /// The write end of the guard's stdin; closing it (the agent's exit)
    /// sets the guard off.
    _trigger: std::io::PipeWriter,
}

impl Guard {
    /// The attempt ended normally: the guard is not needed any more.
    pub fn dismiss(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Podman {
    /// Finds podman and runc, checks the engine answers as root, and removes
    /// what is left of a previous life's containers; returns how many.
    /// `engine_dir` is made (mode 0700) for the engine's own files.
    pub fn detect(instance: &str, engine_dir: &Path) -> Result<(Podman, usize), ContainerError> {
        let program = find_program("podman").ok_or(ContainerError::Missing("podman"))?;
        let runtime = find_program("runc").ok_or(ContainerError::Missing("runc"))?;
        let cgroups = Cgroups::rooted(&format!("{instance}-containers"))?;
        std::fs::create_dir_all(engine_dir)?;
        std::fs::set_permissions(engine_dir, std::os::unix::fs::PermissionsExt::from_mode(0o700))?;
        let mut podman = Podman {
            program,
            runtime,
            instance: instance.to_string(),
            cgroups,
            image_index: None,
            engine_dir: engine_dir.to_path_buf(),
        };
        let info =
            podman.engine().args(["info", "--format", "{{.Store.GraphRoot}}|{{.Store.GraphDriverName}}"]).output()?;
        if !info.status.success() {
            return Err(ContainerError::Broken(String::from_utf8_lossy(&info.stderr).trim().to_string()));
        }
        if let Some((root, driver)) = String::from_utf8_lossy(&info.stdout).trim().split_once('|') {
            podman.image_index = Some(Path::new(root).join(format!("{driver}-images")).join("images.json"));
        }
        // Environment files of a previous life's attempts hold secrets.
        for entry in std::fs::read_dir(engine_dir)?.flatten() {
            if entry.path().extension().is_some_and(|e| e == "env") {
                let _ = std::fs::remove_file(entry.path());
            }
        }
        let swept = podman.sweep();
        Ok((podman, swept))
    }

    /// podman with a clean environment and the options every call needs.
    fn engine(&self) -> Command {
        let mut c = Command::new(&self.program);
        c.env_clear().env("PATH", ENGINE_PATH).stdin(Stdio::null()).current_dir(&self.engine_dir);
        c.arg("--cgroup-manager=cgroupfs").arg("--runtime").arg(&self.runtime);
        c
    }

    /// The label of this agent's containers.
    fn label(&self) -> String {
        format!("suanwang.agent={}", self.instance)
    }

    pub fn container_name(&self, job: u64, attempt: u32) -> String {
        format!("{}-job-{job}-{attempt}", self.instance)
    }

    /// Where an attempt's environment file goes (root only, removed when
    /// the attempt ends or at the agent's next start).
    pub fn env_file(&self, job: u64, attempt: u32) -> PathBuf {
        self.engine_dir.join(format!("job-{job}-{attempt}.env"))
    }

    /// Removes every container of this agent and its groups (a previous
    /// life's attempts); returns how many containers.
    pub fn sweep(&self) -> usize {
        let listed = self
            .engine()
            .args(["ps", "--all", "--quiet", "--filter"])
            .arg(format!("label={}", self.label()))
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).split_whitespace().map(str::to_owned).collect::<Vec<_>>())
            .unwrap_or_default();
        for id in &listed {
            self.remove(id);
        }
        self.cgroups.sweep();
        listed.len()
    }

    /// The images present, under every name a job may use for them, each
    /// with the full name podman is given (`localhost/name:tag`).
    pub fn images(&self) -> BTreeMap<String, String> {
        let output = self.engine().args(["images", "--format", "{{.Repository}}|{{.Tag}}"]).output();
        let text = output.map(|o| String::from_utf8_lossy(&o.stdout).to_string()).unwrap_or_default();
        let mut names = BTreeMap::new();
        for line in text.lines() {
            let Some((repository, tag)) = line.trim().split_once('|') else { continue };
            if repository == "<none>" || tag == "<none>" || repository.is_empty() || tag.is_empty() {
                continue;
            }
            let full = format!("{repository}:{tag}");
            let short = repository
                .strip_prefix("localhost/")
                .or_else(|| repository.strip_prefix("docker.io/library/"))
                .or_else(|| repository.strip_prefix("docker.io/"));
            for name in [Some(repository), short].into_iter().flatten() {
                names.entry(format!("{name}:{tag}")).or_insert_with(|| full.clone());
                if tag == "latest" {
                    names.entry(name.to_string()).or_insert_with(|| full.clone());
                }
            }
        }
        names
    }

    /// Has the image a command of its own (`CMD` or `ENTRYPOINT`) for a job
    /// that gives none? `None` if podman cannot say.
    pub fn has_default_command(&self, full: &str) -> Option<bool> {
        let out = self
            .engine()
            .args(["image", "inspect", "--format", "{{json .Config.Cmd}}|{{json .Config.Entrypoint}}", full])
            .output()
            .ok()
            .filter(|o| o.status.success())?;
        let text = String::from_utf8_lossy(&out.stdout);
        let (cmd, entrypoint) = text.trim().split_once('|')?;
        let empty = |v: &str| matches!(v.trim(), "null" | "[]" | "\"\"" | "");
        Some(!(empty(cmd) && empty(entrypoint)))
    }

    /// When the image store last changed, if it can tell.
    pub fn images_changed(&self) -> Option<std::time::SystemTime> {
        std::fs::metadata(self.image_index.as_ref()?).and_then(|m| m.modified()).ok()
    }

    /// Makes the attempt's cgroup (limits set by the caller's `limits`).
    pub fn group(&self, name: &str, limits: crate::cgroup::Limits) -> Result<Group, ContainerError> {
        Ok(self.cgroups.create(name, limits)?)
    }

    /// Starts the guard of container `name` (before the container).
    pub fn guard(&self, name: &str) -> std::io::Result<Guard> {
        let (reader, trigger) = std::io::pipe()?;
        let mut c = Command::new("/bin/sh");
        c.env_clear()
            .env("PATH", ENGINE_PATH)
            .arg("-c")
            .arg(r#"read _ignored; exec "$0" --cgroup-manager=cgroupfs rm --force --time 0 "$1" >/dev/null 2>&1"#)
            .arg(&self.program)
            .arg(name)
            .stdin(reader)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            // Its own session: a signal to the agent's process group does
            // not reach it.
            .process_group(0);
        let child = c.spawn()?;
        Ok(Guard { child, _trigger: trigger })
    }

    /// The command that runs the attempt's container in the foreground; its
    /// output goes straight to the command's stdout and stderr.
    #[allow(clippy::too_many_arguments)]
    pub fn run_command(
        &self,
        group: &Group,
        name: &str,
        uid: u32,
        dir: &Path,
        image: &str,
        argv: &[String],
        env_file: &Path,
        host_network: bool,
    ) -> Command {
        let mut c = self.engine();
        c.arg("run").arg("--name").arg(name).arg("--label").arg(self.label());
        c.args(["--pull", "never", "--log-driver", "passthrough", "--hostname", "job"]);
        c.args(["--network", if host_network { "host" } else { "none" }]);
        c.arg("--user").arg(format!("{uid}:{uid}"));
        c.args(["--cap-drop", "all", "--security-opt", "no-new-privileges", "--read-only"]);
        // --read-only's own /tmp is root's; the job's must be writable (and
        // counts against its memory limit, being tmpfs).
        c.args(["--tmpfs", "/tmp:rw,nosuid,nodev,mode=1777"]);
        c.args(["--ipc", "private", "--pid", "private", "--uts", "private", "--cgroupns", "private"]);
        // This machine's root cannot raise limits beyond its own (no
        // CAP_SYS_RESOURCE): explicit ulimits, as BACKENDS.md records.
        c.args(["--ulimit", "nofile=1024:1024", "--ulimit", "nproc=4096:4096"]);
        if let Some(parent) = group.relative_path() {
            c.arg("--cgroup-parent").arg(parent);
        }
        c.arg("--volume").arg(format!("{}:/work", dir.display()));
        c.args(["--workdir", "/work"]);
        c.arg("--env-file").arg(env_file);
        c.arg("--").arg(image);
        c.args(argv);
        c
    }

    /// How the container `name` ended, once `podman run` returned `code`.
    pub fn ended(&self, name: &str, code: i32) -> Ended {
        let inspected =
            self.engine().args(["inspect", "--type", "container", "--format", "{{.State.Status}}"]).arg(name).output();
        match inspected {
            Ok(o) if o.status.success() => match String::from_utf8_lossy(&o.stdout).trim() {
                "exited" | "stopped" | "running" | "paused" => Ended::Ran(code),
                // Made but never started: runc could not exec the command.
                _ if matches!(code, 126 | 127) => Ended::CommandFailed(code),
                status => {
                    Ended::EngineFailed(format!("the container was not started (state {status}, podman exit {code})"))
                }
            },
            _ => Ended::EngineFailed(format!("podman could not make the container (exit {code})")),
        }
    }

    /// Removes the container, killing it if it still runs.
    pub fn remove(&self, name: &str) {
        let _ = self
            .engine()
            .args(["rm", "--force", "--time", "0"])
            .arg(name)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

/// Writes `env` as an env file podman reads (`KEY=VALUE` lines; values
/// with line breaks are refused by the server for container jobs), readable
/// by root only.
pub fn write_env_file(path: &Path, env: &BTreeMap<String, String>) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(path)?;
    let mut text = String::new();
    for (key, value) in env {
        if value.contains(['\n', '\r']) {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("the value of {key} has a line break, which a container's environment cannot carry"),
            ));
        }
        text.push_str(key);
        text.push('=');
        text.push_str(value);
        text.push('\n');
    }
    file.write_all(text.as_bytes())
}
