//! How an attempt's process is started and how its whole tree is killed.
//!
//! Sandboxed (the default): the attempt runs as its own unprivileged user
//! (uid and gid [`JOB_ID_BASE`] + job id, never root, never the agent's),
//! under bubblewrap with every namespace unshared (no network, its own pid
//! space, no view of the host's processes or files), the host's `/usr`
//! read-only, a private `/tmp`, and its own directory (mode 0700, owned by
//! its user) as `/work`; inside a cgroup of its own with memory, CPU and
//! process limits. The agent's files, the database, other jobs'
//! directories and the agent's credentials are not in its file system.
//!
//! A job that gives an `image` runs in a container instead (see
//! [`crate::container`]): the same user, limits, cgroup and kill, by
//! podman's and runc's means, on sandboxed agents whose machine has them.
//!
//! Unsandboxed (`--unsandboxed`, for machines without bubblewrap or
//! cgroups): the attempt runs as the agent's user in its own process group,
//! with the same clean environment; a `setsid` can escape the kill. It runs
//! no containers.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::cgroup::{Cgroups, Group, Limits};
use crate::container::{ContainerError, Ended, Guard, Podman};

/// Jobs run as uid and gid `JOB_ID_BASE + job id`.
pub const JOB_ID_BASE: u32 = 1_000_000_000;
/// The largest job id that still maps to a valid uid.
pub const MAX_JOB_ID: u64 = (u32::MAX - 2 - JOB_ID_BASE) as u64;

/// The paths of the host a sandboxed job may read.
const READ_ONLY: [&str; 1] = ["/usr"];
/// Files of `/etc` programs commonly need (absent ones are skipped).
const ETC_FILES: [&str; 6] =
    ["/etc/ld.so.cache", "/etc/alternatives", "/etc/localtime", "/etc/ssl", "/etc/ca-certificates", "/etc/mime.types"];

#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    #[error("bubblewrap (bwrap) is not installed: apt-get install bubblewrap")]
    NoBubblewrap,
    #[error("the sandbox needs root to run jobs as their own users (the agent runs as uid {0})")]
    NotRoot(u32),
    #[error("cgroups: {0}")]
    Cgroup(#[from] crate::cgroup::CgroupError),
    #[error("a trial sandbox failed: {0}")]
    Trial(String),
    #[error("job id {0} is too large to map to a user id")]
    JobIdTooLarge(u64),
    #[error("containers: {0}")]
    Containers(#[from] ContainerError),
    #[error("this site runs no containers (podman and runc, on a sandboxed agent)")]
    NoContainers,
    #[error("the image '{0}' is not at this site (sites run only the images they hold)")]
    NoSuchImage(String),
    /// The job's own mistake, not the site's: no retry anywhere would help.
    #[error("the image {0} has no command of its own (no CMD or ENTRYPOINT): give the job a command")]
    NoDefaultCommand(String),
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// Site-wide resource defaults for attempts that do not ask.
#[derive(Debug, Clone, Copy)]
pub struct Defaults {
    pub memory_mb_per_gpu: u64,
    pub cpus_per_gpu: u32,
    pub pids_max: u64,
    /// Give jobs the host's network (default: none, only their own loopback).
    pub host_network: bool,
}

impl Default for Defaults {
    fn default() -> Self {
        Defaults { memory_mb_per_gpu: 8192, cpus_per_gpu: 2, pids_max: 1024, host_network: false }
    }
}

/// bwrap's options, NUL-separated, in an anonymous memory file at offset 0.
fn options_file(options: &[std::ffi::OsString]) -> std::io::Result<std::fs::File> {
    use std::io::{Seek, Write};
    use std::os::fd::FromRawFd;
    // SAFETY: memfd_create with a static NUL-terminated name; the new fd
    // is owned by the File.
    let mut file = unsafe {
        let fd = libc::memfd_create(c"bwrap-args".as_ptr(), libc::MFD_CLOEXEC);
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        std::fs::File::from_raw_fd(fd)
    };
    for option in options {
        file.write_all(option.as_encoded_bytes())?;
        file.write_all(&[0])?;
    }
    file.seek(std::io::SeekFrom::Start(0))?;
    Ok(file)
}

/// Whether the agent runs container jobs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Containers {
    /// When podman and runc work here (the default).
    Auto,
    /// Always: the agent refuses to start without them.
    Required,
    Off,
}

/// How this agent isolates attempts.
#[derive(Debug)]
pub enum Isolation {
    Sandboxed { cgroups: Cgroups, defaults: Defaults, podman: Option<Box<Podman>> },
    Unsandboxed,
}

/// A container attempt's parts.
pub struct ContainerAttempt {
    pub name: String,
    /// The image's full name, as podman knows it.
    pub image: String,
    env_file: PathBuf,
    guard: std::sync::Mutex<Option<Guard>>,
    /// Removed already (each kill and the clean-up would otherwise run
    /// podman again, ~0.15 s each).
    removed: std::sync::atomic::AtomicBool,
}

/// One attempt's isolation, made before it starts and undone after.
pub struct Prepared {
    pub group: Option<Group>,
    pub uid: Option<u32>,
    /// The attempt's directory as the job sees it.
    pub workdir_inside: PathBuf,
    /// The memory limit applied, MiB (0: none).
    pub memory_mb: u64,
    pub container: Option<ContainerAttempt>,
}

/// What an attempt asks of its sandbox.
#[derive(Debug, Clone, Copy)]
pub struct Request<'a> {
    pub job: u64,
    pub attempt: u32,
    pub gpus: u32,
    pub memory_mb: Option<u64>,
    pub cpus: Option<u32>,
    pub image: Option<&'a str>,
    /// Does the job give a command (else an image's own runs)?
    pub command_given: bool,
}

fn bwrap_path() -> Option<PathBuf> {
    std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .chain([PathBuf::from("/usr/bin")])
        .map(|d| d.join("bwrap"))
        .find(|p| p.is_file())
}

impl Isolation {
    /// Sets up the sandbox for `site` and proves it works with a trial run
    /// in a directory under `scratch` (which jobs' users must be able to
    /// traverse); kills what is left of attempts of a previous life of the
    /// agent.
    pub fn sandboxed(
        site: &str,
        scratch: &Path,
        defaults: Defaults,
        containers: Containers,
    ) -> Result<(Isolation, usize), SandboxError> {
        let bwrap = bwrap_path().ok_or(SandboxError::NoBubblewrap)?;
        // SAFETY: geteuid has no preconditions.
        let euid = unsafe { libc::geteuid() };
        if euid != 0 {
            return Err(SandboxError::NotRoot(euid));
        }
        let cgroups = Cgroups::for_site(site)?;
        let mut swept = cgroups.sweep();
        // Next to the jobs' directories, not among them.
        let engine_dir = scratch.parent().unwrap_or(scratch).join(".engine");
        let podman = match containers {
            Containers::Off => None,
            Containers::Auto => match Podman::detect(site, &engine_dir) {
                Ok((podman, left)) => {
                    swept += left;
                    Some(Box::new(podman))
                }
                Err(e) => {
                    eprintln!("agent {site}: no container jobs at this site: {e}");
                    None
                }
            },
            Containers::Required => {
                let (podman, left) = Podman::detect(site, &engine_dir)?;
                swept += left;
                Some(Box::new(podman))
            }
        };
        let isolation = Isolation::Sandboxed { cgroups, defaults, podman };
        // A trial: the real path, as a job would take it.
        let dir = std::fs::canonicalize(scratch)?.join(".sandbox-trial");
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        let trial =
            Request { job: 0, attempt: 0, gpus: 1, memory_mb: None, cpus: None, image: None, command_given: true };
        let prepared = isolation.prepare(&trial, &dir).map_err(|e| SandboxError::Trial(e.to_string()))?;
        let mut command = isolation.command(
            &prepared,
            &dir,
            &["sh".into(), "-c".into(), "test \"$(id -u)\" != 0 && touch /work/ok".into()],
            &Default::default(),
        )?;
        let status = command.status().map_err(|e| SandboxError::Trial(format!("{}: {e}", bwrap.display())))?;
        let ok = status.success() && dir.join("ok").exists();
        isolation.cleanup(&prepared);
        let _ = std::fs::remove_dir_all(&dir);
        if !ok {
            return Err(SandboxError::Trial(format!(
                "bwrap exited with {status} (are unprivileged user namespaces enabled?)"
            )));
        }
        Ok((isolation, swept))
    }

    pub fn is_sandboxed(&self) -> bool {
        matches!(self, Isolation::Sandboxed { .. })
    }

    fn podman(&self) -> Option<&Podman> {
        match self {
            Isolation::Sandboxed { podman, .. } => podman.as_deref(),
            Isolation::Unsandboxed => None,
        }
    }

    /// The images this site can run, by the names jobs may give (empty
    /// without containers).
    pub fn images(&self) -> std::collections::BTreeMap<String, String> {
        self.podman().map(|p| p.images()).unwrap_or_default()
    }

    /// When the site's image store last changed (containers only).
    pub fn images_changed(&self) -> Option<std::time::SystemTime> {
        self.podman().and_then(|p| p.images_changed())
    }

    pub fn runs_containers(&self) -> bool {
        self.podman().is_some()
    }

    /// Makes the attempt's cgroup and hands its directory to its user.
    pub fn prepare(&self, request: &Request<'_>, dir: &Path) -> Result<Prepared, SandboxError> {
        let Request { job, attempt, gpus, memory_mb, cpus, image, command_given } = *request;
        match self {
            Isolation::Unsandboxed if image.is_some() => Err(SandboxError::NoContainers),
            Isolation::Unsandboxed => Ok(Prepared {
                group: None,
                uid: None,
                workdir_inside: dir.to_path_buf(),
                memory_mb: 0,
                container: None,
            }),
            Isolation::Sandboxed { cgroups, defaults, podman } => {
                if job > MAX_JOB_ID {
                    return Err(SandboxError::JobIdTooLarge(job));
                }
                let uid = JOB_ID_BASE + job as u32;
                std::os::unix::fs::chown(dir, Some(uid), Some(uid))?;
                std::fs::set_permissions(dir, std::os::unix::fs::PermissionsExt::from_mode(0o700))?;
                // The site's share per accelerator is the most an attempt
                // gets: a request may lower it, never raise it (the bill
                // counts accelerators, not memory or cores).
                let host_cpus = std::thread::available_parallelism().map_or(1, |n| n.get() as u64);
                let share_cpus = gpus as u64 * defaults.cpus_per_gpu as u64;
                let cpus = cpus.map_or(share_cpus, u64::from).min(share_cpus).clamp(1, host_cpus);
                let share_mb = gpus as u64 * defaults.memory_mb_per_gpu;
                let memory_mb = memory_mb.unwrap_or(share_mb).min(share_mb);
                let limits = Limits {
                    memory_bytes: memory_mb.saturating_mul(1 << 20),
                    cpu_quota_us: cpus * 100_000,
                    pids: defaults.pids_max,
                };
                let name = format!("job-{job}-{attempt}");
                let Some(image) = image else {
                    let group = cgroups.create(&name, limits)?;
                    return Ok(Prepared {
                        group: Some(group),
                        uid: Some(uid),
                        workdir_inside: PathBuf::from("/work"),
                        memory_mb,
                        container: None,
                    });
                };
                let podman = podman.as_ref().ok_or(SandboxError::NoContainers)?;
                let full = podman.images().remove(image).ok_or_else(|| SandboxError::NoSuchImage(image.to_string()))?;
                if !command_given && podman.has_default_command(&full) == Some(false) {
                    return Err(SandboxError::NoDefaultCommand(image.to_string()));
                }
                // (A container of a previous life was removed by the sweep at start.)
                let container_name = podman.container_name(job, attempt);
                let group = podman.group(&name, limits)?;
                let guard = podman.guard(&container_name)?;
                let env_file = podman.env_file(job, attempt);
                Ok(Prepared {
                    group: Some(group),
                    uid: Some(uid),
                    workdir_inside: PathBuf::from("/work"),
                    memory_mb,
                    container: Some(ContainerAttempt {
                        name: container_name,
                        image: full,
                        env_file,
                        guard: std::sync::Mutex::new(Some(guard)),
                        removed: std::sync::atomic::AtomicBool::new(false),
                    }),
                })
            }
        }
    }

    /// The command that runs `argv` for a prepared attempt, with exactly
    /// `env` as its environment. Nothing of the agent's environment passes.
    pub fn command(
        &self,
        prepared: &Prepared,
        dir: &Path,
        argv: &[String],
        env: &std::collections::BTreeMap<String, String>,
    ) -> Result<Command, SandboxError> {
        let mut command = match (self, &prepared.group, prepared.uid) {
            (Isolation::Sandboxed { defaults, podman: Some(podman), .. }, Some(group), Some(uid))
                if prepared.container.is_some() =>
            {
                let container = prepared.container.as_ref().expect("container attempt");
                crate::container::write_env_file(&container.env_file, env)?;
                let mut c = podman.run_command(
                    group,
                    &container.name,
                    uid,
                    dir,
                    &container.image,
                    argv,
                    &container.env_file,
                    defaults.host_network,
                );
                // podman itself is the agent's: root, and not in the
                // attempt's group (its container is, by --cgroup-parent).
                // SAFETY: prctl(2) in the forked child before exec: podman
                // dies with the attempt's thread, its container with the guard.
                unsafe {
                    c.pre_exec(|| {
                        if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                            return Err(std::io::Error::last_os_error());
                        }
                        Ok(())
                    });
                }
                return Ok(c);
            }
            (Isolation::Sandboxed { defaults, .. }, Some(group), Some(uid)) => {
                // bwrap's own options go through a memory file (`--args 3`),
                // not its command line: inside the sandbox its command line
                // is the first process's, and would show the host's paths.
                let mut options: Vec<std::ffi::OsString> = Vec::new();
                let mut add = |items: &[&str]| options.extend(items.iter().map(std::ffi::OsString::from));
                add(&["--die-with-parent", "--new-session", "--unshare-user", "--unshare-ipc", "--unshare-pid"]);
                // No user namespaces of its own inside: less kernel to attack.
                add(&["--disable-userns"]);
                add(&["--unshare-uts", "--unshare-cgroup-try", "--hostname", "job"]);
                if !defaults.host_network {
                    add(&["--unshare-net"]);
                }
                for path in READ_ONLY {
                    add(&["--ro-bind", path, path]);
                }
                for link in ["bin", "lib", "lib64", "sbin"] {
                    let target = format!("usr/{link}");
                    if Path::new("/usr").join(link).exists() {
                        add(&["--symlink", &target, &format!("/{link}")]);
                    }
                }
                for path in ETC_FILES {
                    add(&["--ro-bind-try", path, path]);
                }
                add(&["--proc", "/proc", "--dev", "/dev", "--tmpfs", "/tmp", "--bind"]);
                options.push(dir.as_os_str().to_owned());
                options.extend(["/work", "--chdir", "/work"].map(std::ffi::OsString::from));
                let args_fd = options_file(&options);
                let mut c = Command::new(bwrap_path().unwrap_or_else(|| PathBuf::from("/usr/bin/bwrap")));
                c.args(["--args", "3", "--"]);
                c.args(argv);
                let files = group.procs_files();
                // SAFETY: the closure runs in the forked child before exec
                // and only makes async-signal-safe system calls: it puts
                // bwrap's options on fd 3, joins the attempt's cgroups while
                // still root, then drops to the job's user for good.
                unsafe {
                    c.pre_exec(move || {
                        let fd = match &args_fd {
                            Ok(f) => std::os::fd::AsRawFd::as_raw_fd(f),
                            Err(_) => return Err(std::io::Error::from_raw_os_error(libc::EBADF)),
                        };
                        if fd == 3 {
                            if libc::fcntl(3, libc::F_SETFD, 0) != 0 {
                                return Err(std::io::Error::last_os_error());
                            }
                        } else if libc::dup2(fd, 3) != 3 {
                            return Err(std::io::Error::last_os_error());
                        }
                        crate::cgroup::join_in_child(&files)?;
                        if libc::setgroups(0, std::ptr::null()) != 0 || libc::setgid(uid) != 0 || libc::setuid(uid) != 0
                        {
                            return Err(std::io::Error::last_os_error());
                        }
                        Ok(())
                    });
                }
                c
            }
            _ => {
                let mut c = Command::new(&argv[0]);
                c.args(&argv[1..]).current_dir(dir).process_group(0);
                c
            }
        };
        command.env_clear().envs(env);
        Ok(command)
    }

    /// Removes an attempt's container, once.
    fn remove_container(&self, prepared: &Prepared) {
        if let (Some(podman), Some(container)) = (self.podman(), &prepared.container)
            && !container.removed.swap(true, std::sync::atomic::Ordering::SeqCst)
        {
            podman.remove(&container.name);
        }
    }

    /// Kills the attempt's whole process tree (`leader` is the process the
    /// agent started).
    pub fn kill(&self, prepared: &Prepared, leader: u32) {
        self.remove_container(prepared);
        match &prepared.group {
            Some(group) => group.kill_all(),
            // SAFETY: kill(2) of the process group the agent created for the attempt.
            None => unsafe {
                libc::kill(-(leader as i32), libc::SIGKILL);
            },
        }
    }

    /// Did the attempt hit its memory limit?
    pub fn oom_killed(&self, prepared: &Prepared) -> bool {
        prepared.group.as_ref().is_some_and(|g| g.oom_killed())
    }

    /// How a container attempt whose `podman run` returned `code` ended
    /// (call before [`Isolation::kill`], which removes the container);
    /// `None` for other attempts.
    pub fn container_end(&self, prepared: &Prepared, code: i32) -> Option<Ended> {
        let (podman, container) = (self.podman()?, prepared.container.as_ref()?);
        Some(podman.ended(&container.name, code))
    }

    /// Kills anything left and removes the attempt's cgroup.
    pub fn cleanup(&self, prepared: &Prepared) {
        self.remove_container(prepared);
        if let Some(container) = &prepared.container {
            let _ = std::fs::remove_file(&container.env_file);
            if let Some(guard) = container.guard.lock().expect("guard lock").take() {
                guard.dismiss();
            }
        }
        if let Some(group) = &prepared.group {
            group.kill_all();
            group.remove();
        }
    }
}
