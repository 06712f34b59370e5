//! The credentials a loader sees, and what processes it starts run with.
//!
//! bpftrace 0.17 refuses to run unless `geteuid() == 0` ("bpftrace currently only supports
//! running as the root user"), although under `bpftime load` it needs no privilege at all.
//! Inside a loader (a process that has this library in `LD_PRELOAD`), the exported
//! `getuid`/`geteuid`/`getresuid` (and their gid twins) answer 0, while the process's real
//! credentials stay what they were: the kernel still sees the unprivileged user for every
//! file, signal and ptrace check. Only the libc calls lie; a raw `syscall(SYS_geteuid)` or
//! `/proc/self/status` tells the truth. `BPFTIME_REAL_CREDS=1` turns the lie off.
//!
//! Processes a loader starts (`bpftrace -c CMD`) are targets, not loaders: an `execve` from a
//! loader replaces this library in the new program's `LD_PRELOAD` by the agent found beside
//! it (`libbpftime_agent.so`, or `BPFTIME_AGENT_LIB`), so the command runs as under
//! `bpftime start` on the same store (`BPFTIME_STORE` is inherited), with its true
//! credentials.
//!
//! The decision is made once, from the environment at the first call: the library counts as
//! preloaded when `LD_PRELOAD` names `libbpftime_syscall_server`. Test executables that link
//! the rlib (and so export the same symbols) keep real credentials.

use std::ffi::{CString, OsStr};
use std::os::unix::ffi::{OsStrExt as _, OsStringExt as _};
use std::sync::atomic::{AtomicU8, Ordering};

/// The file name of this library.
pub const SERVER_LIB: &str = "libbpftime_syscall_server";
/// The agent's file name.
pub const AGENT_LIB: &str = "libbpftime_agent.so";
/// Set to `1` to make the loader see its real credentials.
pub const REAL_CREDS_ENV: &str = "BPFTIME_REAL_CREDS";

/// 0 = not decided, 1 = fake root, 2 = real credentials.
static MODE: AtomicU8 = AtomicU8::new(0);

fn getenv(name: &str) -> Option<Vec<u8>> {
    std::env::var_os(name).map(|v| v.into_vec())
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

/// Whether this process is a loader under `bpftime load` (this library preloaded).
pub fn preloaded() -> bool {
    getenv("LD_PRELOAD").is_some_and(|v| contains(&v, SERVER_LIB.as_bytes()))
}

/// Whether the loader's libc credential calls answer root.
pub fn fake_root() -> bool {
    match MODE.load(Ordering::Relaxed) {
        1 => true,
        2 => false,
        _ => {
            let real = getenv(REAL_CREDS_ENV).is_some_and(|v| !v.is_empty() && v != b"0");
            let fake = preloaded() && !real;
            MODE.store(if fake { 1 } else { 2 }, Ordering::Relaxed);
            fake
        }
    }
}

/// The agent library to preload into programs a loader starts: `BPFTIME_AGENT_LIB`, else
/// `libbpftime_agent.so` in the directory of the preloaded server library.
fn agent_path(preload: &[u8]) -> Option<Vec<u8>> {
    if let Some(p) = getenv("BPFTIME_AGENT_LIB").filter(|p| !p.is_empty()) {
        return Some(p);
    }
    let entry = preload
        .split(|&c| c == b':' || c == b' ')
        .find(|e| contains(e, SERVER_LIB.as_bytes()))?;
    let dir = match entry.iter().rposition(|&c| c == b'/') {
        Some(i) => &entry[..=i],
        None => b"".as_slice(),
    };
    let mut p = dir.to_vec();
    p.extend_from_slice(AGENT_LIB.as_bytes());
    std::path::Path::new(OsStr::from_bytes(&p))
        .is_file()
        .then_some(p)
}

/// `LD_PRELOAD=value` for a program a loader starts: this library replaced by the agent (or
/// dropped when the agent cannot be found). `None` when `entry` is not an `LD_PRELOAD` naming
/// this library.
pub fn child_preload(entry: &[u8]) -> Option<Vec<u8>> {
    let value = entry.strip_prefix(b"LD_PRELOAD=")?;
    if !contains(value, SERVER_LIB.as_bytes()) {
        return None;
    }
    let agent = agent_path(value);
    let mut out = b"LD_PRELOAD=".to_vec();
    let mut first = true;
    for part in value.split(|&c| c == b':' || c == b' ') {
        if part.is_empty() {
            continue;
        }
        let part = if contains(part, SERVER_LIB.as_bytes()) {
            match &agent {
                Some(a) => a.as_slice(),
                None => continue,
            }
        } else {
            part
        };
        if !first {
            out.push(b':');
        }
        out.extend_from_slice(part);
        first = false;
    }
    Some(out)
}

/// The environment for a program started by the loader: `env` with `LD_PRELOAD` rewritten
/// (see [`child_preload`]); `None` when nothing changes.
pub fn child_env(env: &[&[u8]]) -> Option<Vec<CString>> {
    let mut changed = false;
    let out = env
        .iter()
        .map(|e| match child_preload(e) {
            Some(n) => {
                changed = true;
                n
            }
            None => e.to_vec(),
        })
        .map(|v| CString::new(v).ok())
        .collect::<Option<Vec<_>>>()?;
    changed.then_some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn child_preload_swaps_the_server_for_the_agent() {
        let dir = std::env::temp_dir().join(format!("creds-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(AGENT_LIB), b"").unwrap();
        let server = format!("{}/libbpftime_syscall_server.so", dir.display());
        let entry = format!("LD_PRELOAD={server}:/x/other.so");
        let got = child_preload(entry.as_bytes()).unwrap();
        assert_eq!(
            String::from_utf8(got).unwrap(),
            format!("LD_PRELOAD={}/{AGENT_LIB}:/x/other.so", dir.display())
        );
        assert!(child_preload(b"LD_PRELOAD=/x/other.so").is_none());
        assert!(child_preload(b"PATH=/bin").is_none());
        // No agent beside it: the server is dropped, the rest kept.
        let got = child_preload(b"LD_PRELOAD=/nonexistent/libbpftime_syscall_server.so:/y.so");
        assert_eq!(got.as_deref(), Some(b"LD_PRELOAD=/y.so".as_slice()));
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn child_env_changes_only_ld_preload() {
        let env: Vec<&[u8]> = vec![
            b"A=1",
            b"LD_PRELOAD=/n/libbpftime_syscall_server.so",
            b"B=2",
        ];
        let out = child_env(&env).unwrap();
        let out: Vec<&[u8]> = out.iter().map(|c| c.as_bytes()).collect();
        assert_eq!(out, vec![b"A=1".as_slice(), b"LD_PRELOAD=", b"B=2"]);
        assert!(child_env(&[b"A=1".as_slice()]).is_none());
    }
}
