//! Watching the processes a command starts: every descendant's argv, sampled while it runs.

use std::collections::{BTreeMap, HashSet};
use std::process::Child;
use std::time::Duration;

fn parent_of(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces and parentheses; fields after the last ')' are plain.
    let rest = &stat[stat.rfind(')')? + 2..];
    rest.split(' ').nth(1)?.parse().ok()
}

fn descendants(root: u32) -> Vec<u32> {
    let pids: Vec<u32> = std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect();
    let mut family: HashSet<u32> = HashSet::from([root]);
    let mut grew = true;
    while grew {
        grew = false;
        for &pid in &pids {
            if !family.contains(&pid) && parent_of(pid).is_some_and(|ppid| family.contains(&ppid)) {
                family.insert(pid);
                grew = true;
            }
        }
    }
    family.into_iter().filter(|&pid| pid != root).collect()
}

/// Samples the argv of every descendant of `child` until it exits; returns pid → argv
/// (NUL-separated arguments joined with spaces) and the child's exit status.
pub fn watch(mut child: Child) -> (BTreeMap<u32, String>, std::process::ExitStatus) {
    let mut seen = BTreeMap::new();
    loop {
        for pid in descendants(child.id()) {
            if let Some(argv) = argv_of(pid) {
                seen.insert(pid, argv);
            }
        }
        if let Some(status) = child.try_wait().unwrap() {
            return (seen, status);
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

fn argv_of(pid: u32) -> Option<String> {
    let raw = std::fs::read(format!("/proc/{pid}/cmdline"))
        .ok()
        .filter(|raw| !raw.is_empty())?;
    let args: Vec<String> = raw
        .split(|b| *b == 0)
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect();
    Some(args.join(" ").trim().to_string())
}

/// Every descendant of `pid` now, with its argv.
pub fn descendant_argvs(pid: u32) -> Vec<(u32, String)> {
    descendants(pid)
        .into_iter()
        .filter_map(|child| argv_of(child).map(|argv| (child, argv)))
        .collect()
}

/// The first descendant of `child` whose argv (joined with spaces) satisfies `wanted`,
/// waiting up to 30 s.
pub fn wait_for_descendant(child: &mut Child, wanted: impl Fn(&str) -> bool) -> Option<u32> {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while std::time::Instant::now() < deadline {
        for pid in descendants(child.id()) {
            if argv_of(pid).is_some_and(|argv| wanted(&argv)) {
                return Some(pid);
            }
        }
        if child.try_wait().unwrap().is_some() {
            return None;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    None
}

/// Waits (up to 60 s) until the process `pid` has written `bytes` in all.
pub fn wait_until_written(pid: u32, bytes: u64) {
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while std::time::Instant::now() < deadline {
        let io = std::fs::read_to_string(format!("/proc/{pid}/io")).unwrap_or_default();
        let written: u64 = io
            .lines()
            .find_map(|l| l.strip_prefix("wchar: "))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0);
        if written >= bytes {
            return;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Kills `child` with SIGKILL as soon as `ready()` holds, checking every 2 ms for up to a
/// minute; returns whether the kill came before the child ended on its own. `what` names
/// the command when it does neither.
pub fn kill_when(mut child: Child, ready: impl Fn() -> bool, what: &str) -> bool {
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while std::time::Instant::now() < deadline {
        if child.try_wait().unwrap().is_some() {
            return false;
        }
        if ready() {
            child.kill().unwrap();
            child.wait().unwrap();
            return true;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    panic!("{what} neither got there nor ended within a minute");
}
