//! Finding the PostgreSQL client binaries that fit a server: the configured `bin_dir`, else
//! `pg_config --bindir`, `/usr/lib/postgresql/*/bin` and PATH. The same major version as the
//! server is preferred, else the oldest newer one: pg_dump refuses servers newer than itself,
//! and its output is only promised to load into servers at least as new as it is.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::error::{Error, ErrorKind, Result};

#[derive(Debug, Clone)]
pub struct Binaries {
    pub dir: PathBuf,
    pub major: u32,
}

/// "pg_dump (PostgreSQL) 15.18 (Debian 15.18-0+deb12u1)" → 15.
fn parse_major(version_output: &str) -> Option<u32> {
    let after = version_output.split(')').nth(1)?.trim();
    let number = after.split(|c: char| !c.is_ascii_digit()).next()?;
    number.parse().ok()
}

fn major_of(dir: &Path) -> Option<u32> {
    let output = Command::new(dir.join("pg_dump"))
        .arg("--version")
        .output()
        .ok()?;
    output
        .status
        .success()
        .then(|| parse_major(&String::from_utf8_lossy(&output.stdout)))?
}

fn candidates() -> Vec<PathBuf> {
    let mut dirs = Vec::new();
    if let Ok(output) = Command::new("pg_config").arg("--bindir").output()
        && output.status.success()
    {
        dirs.push(PathBuf::from(
            String::from_utf8_lossy(&output.stdout).trim(),
        ));
    }
    if let Ok(entries) = std::fs::read_dir("/usr/lib/postgresql") {
        dirs.extend(entries.filter_map(Result::ok).map(|e| e.path().join("bin")));
    }
    if let Some(path) = std::env::var_os("PATH") {
        dirs.extend(std::env::split_paths(&path));
    }
    let mut seen = Vec::new();
    dirs.into_iter()
        .filter(|dir| dir.join("pg_dump").is_file())
        .filter_map(|dir| {
            let real = dir.join("pg_dump").canonicalize().ok()?;
            // Debian's /usr/bin/pg_dump is pg_wrapper, which picks a version by its own rules;
            // lifeboat picks the version itself, from the real binaries.
            if real.file_name()? != "pg_dump" {
                return None;
            }
            let real_dir = real.parent()?.to_path_buf();
            (!seen.contains(&real_dir)).then(|| {
                seen.push(real_dir.clone());
                real_dir
            })
        })
        .collect()
}

impl Binaries {
    pub fn find(configured: Option<&Path>, server_major: u32) -> Result<Binaries> {
        let dirs = match configured {
            Some(dir) => vec![dir.to_path_buf()],
            None => candidates(),
        };
        let found: Vec<Binaries> = dirs
            .into_iter()
            .filter_map(|dir| major_of(&dir).map(|major| Binaries { dir, major }))
            .collect();
        let fitting = found
            .iter()
            .filter(|b| b.major >= server_major)
            .min_by_key(|b| b.major)
            .cloned();
        fitting.ok_or_else(|| {
            let seen: Vec<String> = found.iter().map(|b| format!("{} ({})", b.dir.display(), b.major)).collect();
            let message = if seen.is_empty() {
                match configured {
                    Some(dir) => format!("unable to run pg_dump from bin_dir '{}'", dir.display()),
                    None => "unable to find pg_dump (looked at pg_config --bindir, /usr/lib/postgresql/*/bin and PATH)".to_string(),
                }
            } else {
                format!(
                    "unable to use pg_dump: the server is PostgreSQL {server_major} and the only client binaries found are older: {}",
                    seen.join(", ")
                )
            };
            Error::new(ErrorKind::Source, message).with_hint(format!(
                "install postgresql-client-{server_major} (or newer), or set bin_dir on the job"
            ))
        })
    }

    /// A client tool (pg_dump, pg_restore, psql): see `process::tool`.
    pub fn command(&self, program: &str) -> Command {
        crate::sources::process::tool(self.dir.join(program))
    }

    /// A client tool that forks workers (pg_restore): see `process::tool_with_workers`.
    pub fn command_with_workers(&self, program: &str) -> Command {
        crate::sources::process::tool_with_workers(self.dir.join(program))
    }

    /// A server or its control program (postgres, initdb, pg_ctl): see `process::server`.
    pub fn server_command(&self, program: &str) -> Command {
        crate::sources::process::server(self.dir.join(program))
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn majors_are_read_from_version_output() {
        assert_eq!(
            super::parse_major("pg_dump (PostgreSQL) 15.18 (Debian 15.18-0+deb12u1)\n"),
            Some(15)
        );
        assert_eq!(super::parse_major("pg_dump (PostgreSQL) 17devel"), Some(17));
        assert_eq!(super::parse_major("pg_dump (PostgreSQL) 9.6.24"), Some(9));
        assert_eq!(super::parse_major("garbage"), None);
    }
}
