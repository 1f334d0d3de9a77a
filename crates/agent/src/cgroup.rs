//! Control groups (v1) for attempts: one group per attempt in each of the
//! `memory`, `cpu`, `pids` and `freezer` hierarchies, made under the agent's
//! own group of each, so limits hold for the whole process tree and the
//! whole tree can be killed — a `setsid`, a double fork or a daemon cannot
//! leave the group it was born in.
//!
//! The machines this runs on have cgroup v1 only (no usable v2, no
//! systemd), as `../shared/facts/BACKENDS.md` records.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// The hierarchies an attempt's group lives in. `freezer` must be there:
/// killing a tree that is still forking needs it frozen first.
const CONTROLLERS: [&str; 4] = ["memory", "cpu", "pids", "freezer"];

#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error("cgroup v1 hierarchy '{0}' is not mounted under /sys/fs/cgroup")]
    Missing(&'static str),
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> CgroupError + '_ {
    move |source| CgroupError::Io { path: path.to_path_buf(), source }
}

/// Where this agent makes its attempts' groups: for each controller, a
/// directory `<agent's own group>/suanwang/<site>` ([`Cgroups::for_site`]),
/// or `/suanwang/<name>` from the root of every hierarchy
/// ([`Cgroups::rooted`]: the same path in each, which is what a container
/// engine's `--cgroup-parent` names).
#[derive(Debug, Clone)]
pub struct Cgroups {
    bases: Vec<PathBuf>,
    /// Rooted only: the bases in the hierarchies whose limits we do not set
    /// (a container engine makes its groups there too, and we remove them).
    extra: Vec<PathBuf>,
    /// Rooted only: the path of the bases from each hierarchy's root.
    relative: Option<String>,
}

/// Limits for one attempt.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub memory_bytes: u64,
    /// CPU time per 100 ms period, in microseconds.
    pub cpu_quota_us: u64,
    pub pids: u64,
}

/// One attempt's group in every hierarchy.
#[derive(Debug)]
pub struct Group {
    dirs: Vec<PathBuf>,
    extra: Vec<PathBuf>,
    relative: Option<String>,
    /// An eventfd the kernel signals when the group runs out of memory
    /// (`cgroup.event_control`): it counts out-of-memory kills anywhere
    /// below the group, which the group's own counters do not.
    oom_event: Option<std::os::fd::OwnedFd>,
    oom_seen: std::sync::atomic::AtomicBool,
}

/// The agent's own group in a v1 hierarchy, from `/proc/self/cgroup`.
fn own_group(controller: &str) -> Option<PathBuf> {
    let text = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    for line in text.lines() {
        let mut parts = line.splitn(3, ':');
        let (_, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
        if controllers.split(',').any(|c| c == controller) {
            let mount = Path::new("/sys/fs/cgroup").join(controller);
            return Some(mount.join(path.trim_start_matches('/')));
        }
    }
    None
}

impl Cgroups {
    /// Finds (and makes) the agent's directories for `site`.
    pub fn for_site(site: &str) -> Result<Cgroups, CgroupError> {
        let mut bases = Vec::new();
        for controller in CONTROLLERS {
            let own = own_group(controller).ok_or(CgroupError::Missing(controller))?;
            if !own.join("cgroup.procs").exists() {
                return Err(CgroupError::Missing(controller));
            }
            let base = own.join("suanwang").join(site);
            std::fs::create_dir_all(&base).map_err(io(&base))?;
            bases.push(base);
        }
        Ok(Cgroups { bases, extra: Vec::new(), relative: None })
    }

    /// Finds (and makes) `/suanwang/<name>` at the root of each hierarchy.
    pub fn rooted(name: &str) -> Result<Cgroups, CgroupError> {
        let root = Path::new("/sys/fs/cgroup");
        let relative = format!("/suanwang/{name}");
        let mut bases = Vec::new();
        for controller in CONTROLLERS {
            let mount = root.join(controller);
            if !mount.join("cgroup.procs").exists() {
                return Err(CgroupError::Missing(controller));
            }
            let base = mount.join(relative.trim_start_matches('/'));
            std::fs::create_dir_all(&base).map_err(io(&base))?;
            bases.push(base);
        }
        let extra = std::fs::read_dir(root)
            .map_err(io(root))?
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.join("cgroup.procs").exists() && !bases.iter().any(|b| b.starts_with(p)))
            .map(|p| p.join(relative.trim_start_matches('/')))
            .collect();
        Ok(Cgroups { bases, extra, relative: Some(relative) })
    }

    /// Makes the group `name` with its limits.
    pub fn create(&self, name: &str, limits: Limits) -> Result<Group, CgroupError> {
        let dirs: Vec<PathBuf> = self.bases.iter().map(|b| b.join(name)).collect();
        for dir in &dirs {
            match std::fs::create_dir(dir) {
                Ok(()) => {}
                // Left over from a previous life of this attempt: empty it.
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(io(dir)(e)),
            }
        }
        let mut group = self.group(name);
        group.oom_event = oom_eventfd(group.dir("memory"));
        group.write("memory", "memory.limit_in_bytes", &limits.memory_bytes.to_string())?;
        // With swap accounting, the same limit on memory plus swap: a job
        // cannot escape its limit by swapping.
        let memsw = group.dir("memory").join("memory.memsw.limit_in_bytes");
        if memsw.exists() {
            group.write("memory", "memory.memsw.limit_in_bytes", &limits.memory_bytes.to_string())?;
        }
        group.write("cpu", "cpu.cfs_period_us", "100000")?;
        group.write("cpu", "cpu.cfs_quota_us", &limits.cpu_quota_us.max(1000).to_string())?;
        group.write("pids", "pids.max", &limits.pids.to_string())?;
        Ok(group)
    }

    /// Kills everything left in this site's groups (attempts of a previous
    /// life of the agent) and removes the groups; returns how many groups.
    pub fn sweep(&self) -> usize {
        let mut names = std::collections::BTreeSet::new();
        for base in self.bases.iter().chain(&self.extra) {
            if let Ok(entries) = std::fs::read_dir(base) {
                for entry in entries.flatten() {
                    if entry.path().is_dir() {
                        names.insert(entry.file_name().to_string_lossy().to_string());
                    }
                }
            }
        }
        for name in &names {
            let group = self.group(name);
            group.kill_all();
            group.remove();
        }
        names.len()
    }

    fn group(&self, name: &str) -> Group {
        Group {
            dirs: self.bases.iter().map(|b| b.join(name)).collect(),
            extra: self.extra.iter().map(|b| b.join(name)).collect(),
            relative: self.relative.as_ref().map(|r| format!("{r}/{name}")),
            oom_event: None,
            oom_seen: std::sync::atomic::AtomicBool::new(false),
        }
    }
}

/// Asks the kernel to signal an eventfd when the memory group `dir` is out
/// of memory; `None` if it cannot (the group's own counter still tells).
fn oom_eventfd(dir: &Path) -> Option<std::os::fd::OwnedFd> {
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    let control = std::fs::File::open(dir.join("memory.oom_control")).ok()?;
    // SAFETY: eventfd(2) has no memory preconditions; the fd is owned below.
    let event = unsafe {
        let fd = libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC);
        if fd < 0 {
            return None;
        }
        OwnedFd::from_raw_fd(fd)
    };
    let line = format!("{} {}", event.as_raw_fd(), control.as_raw_fd());
    std::fs::write(dir.join("cgroup.event_control"), line).ok()?;
    // The registration holds its own reference to the control file.
    Some(event)
}

/// Every directory at or below `dir`, deepest first.
fn tree(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Ok(entries) = std::fs::read_dir(dir) {
        for entry in entries.flatten() {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                out.extend(tree(&entry.path()));
            }
        }
    }
    if dir.is_dir() {
        out.push(dir.to_path_buf());
    }
    out
}

impl Group {
    fn dir(&self, controller: &str) -> &Path {
        let index = CONTROLLERS.iter().position(|c| *c == controller).expect("known controller");
        &self.dirs[index]
    }

    fn write(&self, controller: &str, file: &str, value: &str) -> Result<(), CgroupError> {
        let path = self.dir(controller).join(file);
        std::fs::write(&path, value).map_err(io(&path))
    }

    /// The `cgroup.procs` files a child writes `0` to (itself) before it
    /// execs, so it and everything it starts are in the group from the first
    /// instruction.
    pub fn procs_files(&self) -> Vec<std::ffi::CString> {
        self.dirs
            .iter()
            .map(|d| {
                std::ffi::CString::new(d.join("cgroup.procs").as_os_str().as_encoded_bytes()).expect("no NUL in path")
            })
            .collect()
    }

    /// The path of the group from each hierarchy's root, for a rooted group
    /// (a container engine's `--cgroup-parent`).
    pub fn relative_path(&self) -> Option<&str> {
        self.relative.as_deref()
    }

    /// The processes in the group and in every group below it.
    pub fn pids(&self) -> Vec<i32> {
        tree(self.dir("freezer"))
            .iter()
            .flat_map(|d| {
                std::fs::read_to_string(d.join("cgroup.procs"))
                    .unwrap_or_default()
                    .lines()
                    .map(str::to_owned)
                    .collect::<Vec<_>>()
            })
            .filter_map(|l| l.trim().parse().ok())
            .collect()
    }

    /// Did the kernel kill something in the group (or below it) for going
    /// over its memory limit?
    pub fn oom_killed(&self) -> bool {
        use std::sync::atomic::Ordering;
        if let Some(event) = &self.oom_event {
            let mut count = [0u8; 8];
            // SAFETY: a non-blocking read of 8 bytes from an eventfd we own into a local buffer.
            let n =
                unsafe { libc::read(std::os::fd::AsRawFd::as_raw_fd(event), count.as_mut_ptr().cast(), count.len()) };
            if n == 8 && u64::from_ne_bytes(count) > 0 {
                self.oom_seen.store(true, Ordering::SeqCst);
            }
        }
        self.oom_seen.load(Ordering::SeqCst) || self.own_oom_counter()
    }

    fn own_oom_counter(&self) -> bool {
        let text = std::fs::read_to_string(self.dir("memory").join("memory.oom_control")).unwrap_or_default();
        let oom_kills =
            text.lines().find_map(|l| l.strip_prefix("oom_kill ")).and_then(|n| n.trim().parse::<u64>().ok());
        match oom_kills {
            Some(n) => n > 0,
            // Older kernels: the limit was hit.
            None => std::fs::read_to_string(self.dir("memory").join("memory.failcnt"))
                .ok()
                .and_then(|n| n.trim().parse::<u64>().ok())
                .is_some_and(|n| n > 0),
        }
    }

    /// Kills every process of the group: freeze it (so nothing forks while
    /// it is being emptied), SIGKILL each process, thaw, until it is empty.
    pub fn kill_all(&self) {
        let state = self.dir("freezer").join("freezer.state");
        let started = Instant::now();
        while started.elapsed() < Duration::from_secs(10) {
            let pids = self.pids();
            if pids.is_empty() {
                return;
            }
            let _ = std::fs::write(&state, "FROZEN");
            let frozen_by = Instant::now() + Duration::from_millis(500);
            while Instant::now() < frozen_by && std::fs::read_to_string(&state).is_ok_and(|s| s.trim() != "FROZEN") {
                std::thread::sleep(Duration::from_millis(2));
            }
            for pid in self.pids() {
                // SAFETY: kill(2) with a pid read from the group.
                unsafe {
                    libc::kill(pid, libc::SIGKILL);
                }
            }
            let _ = std::fs::write(&state, "THAWED");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Removes the group's directories and any group below them (they
    /// must be empty of processes).
    pub fn remove(&self) {
        for top in self.dirs.iter().chain(&self.extra) {
            for dir in tree(top) {
                for _ in 0..100 {
                    if std::fs::remove_dir(&dir).is_ok() || !dir.exists() {
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(10));
                }
            }
        }
    }
}

/// Writes `0` (the calling process) to each `cgroup.procs` file. Runs in a
/// forked child before exec: only async-signal-safe calls.
pub fn join_in_child(files: &[std::ffi::CString]) -> std::io::Result<()> {
    for file in files {
        // SAFETY: open/write/close on a NUL-terminated path in the child.
        unsafe {
            let fd = libc::open(file.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
            if fd < 0 {
                return Err(std::io::Error::last_os_error());
            }
            let written = libc::write(fd, b"0".as_ptr().cast(), 1);
            libc::close(fd);
            if written != 1 {
                return Err(std::io::Error::last_os_error());
            }
        }
    }
    Ok(())
}
