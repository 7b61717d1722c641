//! Test harness: real servers started per test, and helpers to run the `lifeboat` binary.

#![allow(dead_code)]

pub mod faults;
pub mod garage;
pub mod postgres;
pub mod procs;
pub mod redis;
pub mod seaweedfs;
pub mod tree;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub use seaweedfs::SeaweedFs;

/// What a run of the binary printed and how it ended.
#[derive(Debug)]
pub struct Run {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    pub fn from_output(output: Output) -> Run {
        Run {
            code: output.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        }
    }

    #[track_caller]
    pub fn assert_code(&self, code: i32) -> &Run {
        assert_eq!(
            self.code, code,
            "exit code\n--- stdout\n{}\n--- stderr\n{}",
            self.stdout, self.stderr
        );
        self
    }

    /// The run's stderr holds `text`.
    #[track_caller]
    pub fn assert_stderr_has(&self, text: impl AsRef<str>) -> &Run {
        let text = text.as_ref();
        assert!(
            self.stderr.contains(text),
            "stderr lacks {text:?}\n--- stderr\n{}",
            self.stderr
        );
        self
    }

    /// The run's stdout holds `text`.
    #[track_caller]
    pub fn assert_stdout_has(&self, text: impl AsRef<str>) -> &Run {
        let text = text.as_ref();
        assert!(
            self.stdout.contains(text),
            "stdout lacks {text:?}\n--- stdout\n{}",
            self.stdout
        );
        self
    }
}

/// The id of the backup of `job` a `backup` run reports as committed.
pub fn committed_id(run: &Run, job: &str) -> String {
    let prefix = format!("backup {job}/");
    run.stdout
        .lines()
        .find_map(|l| l.strip_prefix(&prefix)?.split(' ').next())
        .unwrap_or_else(|| panic!("no committed backup of {job} in: {}", run.stdout))
        .to_string()
}

/// Backs up `job` (which must succeed); the id committed.
pub fn back_up(config: &Path, job: &str) -> String {
    let run = lifeboat(config, &["backup", job]);
    run.assert_code(0);
    committed_id(&run, job)
}

/// `lifeboat list JOB` shows backup `id` as DAMAGED (`what` says which case, on failure).
#[track_caller]
pub fn assert_listed_damaged(config: &Path, job: &str, id: &str, what: &str) {
    let list = lifeboat(config, &["list", job]);
    assert!(
        list.stdout
            .lines()
            .any(|l| l.contains(id) && l.contains("DAMAGED")),
        "list, {what}: {}",
        list.stdout
    );
}

pub fn lifeboat_command(config: &Path) -> Command {
    binary_command(Path::new(env!("CARGO_BIN_EXE_lifeboat")), config)
}

/// A lifeboat command run from `binary`, with the environment every test run gets.
pub fn binary_command(binary: &Path, config: &Path) -> Command {
    let mut command = Command::new(binary);
    command
        .env_remove("LIFEBOAT_CONFIG")
        .env_remove("LIFEBOAT_IDENTITY_FILE")
        .env_remove("AWS_PROFILE")
        .env("AWS_ACCESS_KEY_ID", seaweedfs::ACCESS_KEY)
        .env("AWS_SECRET_ACCESS_KEY", seaweedfs::SECRET_KEY)
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .arg("--config")
        .arg(config);
    command
}

/// Runs `lifeboat --config CONFIG ARGS...`.
pub fn lifeboat(config: &Path, args: &[&str]) -> Run {
    let output = lifeboat_command(config)
        .args(args)
        .output()
        .expect("run the lifeboat binary");
    Run::from_output(output)
}

pub fn run_command(command: &mut Command) -> Run {
    // A binary copied just now can be "busy": a child another test forked meanwhile holds the
    // copy's descriptor until its own exec closes it.
    for _ in 0..100 {
        match command.output() {
            Err(e) if e.kind() == std::io::ErrorKind::ExecutableFileBusy => {
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            output => return Run::from_output(output.expect("run command")),
        }
    }
    panic!("the binary stayed busy for a second");
}

/// A config built piece by piece, then written as `lifeboat.toml` into its directory:
/// `Scenario::new(work).local("primary", &dir).postgres_job(…).write()`. Pieces come out in
/// the order they were added (a `[table]` after the jobs would take their keys).
#[must_use]
pub struct Scenario {
    dir: PathBuf,
    text: String,
}

impl Scenario {
    pub fn new(dir: &Path) -> Scenario {
        Scenario {
            dir: dir.to_path_buf(),
            text: String::new(),
        }
    }

    /// A local repository `name` at `path`.
    pub fn local(self, name: &str, path: &Path) -> Scenario {
        self.raw(&local_repository(name, path))
    }

    /// A logical PostgreSQL job (see [`postgres_job`]).
    pub fn postgres_job(
        self,
        name: &str,
        dsn: &str,
        password_file: &Path,
        extra: &str,
    ) -> Scenario {
        self.raw(&postgres_job(name, dsn, password_file, extra))
    }

    /// A files job backing up `paths`.
    pub fn files_job(self, name: &str, paths: &[&Path]) -> Scenario {
        self.raw(&files_job(name, paths))
    }

    /// Any other piece of config: an S3 repository's block, a table, keys of the last job.
    pub fn raw(mut self, text: &str) -> Scenario {
        self.text.push_str(text);
        self
    }

    pub fn write(self) -> PathBuf {
        write_config(&self.dir, &self.text)
    }
}

pub fn write_config(dir: &Path, text: &str) -> PathBuf {
    let path = dir.join("lifeboat.toml");
    std::fs::write(&path, text).unwrap();
    path
}

pub fn local_repository(name: &str, path: &Path) -> String {
    format!(
        "[[repository]]\nname = \"{name}\"\ntype = \"local\"\npath = \"{}\"\n\n",
        path.display()
    )
}

/// Writes into `work` a config whose logical job `maindb` backs up `databases` of `cluster`
/// (with the superuser's password in a file) into the local repository `work/repo`, after
/// `preamble` (say, an `[encryption]` table).
pub fn maindb_config(
    work: &Path,
    cluster: &postgres::Postgres,
    databases: &[&str],
    preamble: &str,
) -> PathBuf {
    let password_file = cluster.password_file(work, &cluster.password);
    let listed: Vec<String> = databases.iter().map(|d| format!("\"{d}\"")).collect();
    write_config(
        work,
        &format!(
            "{preamble}{}{}",
            local_repository("local", &work.join("repo")),
            postgres_job(
                "maindb",
                &cluster.dsn("postgres"),
                &password_file,
                &format!("databases = [{}]", listed.join(", "))
            )
        ),
    )
}

/// A `[[job]]` block of a logical `postgres` job connecting with `dsn` and the password in
/// `password_file`; `extra` is appended (more keys).
pub fn postgres_job(name: &str, dsn: &str, password_file: &Path, extra: &str) -> String {
    format!(
        "[[job]]\nname = \"{name}\"\nkind = \"postgres\"\nmode = \"logical\"\ndsn = \"{dsn}\"\npassword_file = \"{}\"\n{extra}\n",
        password_file.display()
    )
}

pub fn files_job(name: &str, paths: &[&Path]) -> String {
    let paths: Vec<String> = paths
        .iter()
        .map(|p| format!("\"{}\"", p.display()))
        .collect();
    format!(
        "[[job]]\nname = \"{name}\"\nkind = \"files\"\npaths = [{}]\n\n",
        paths.join(", ")
    )
}

/// Writes a one-line secret (a password file) with the given mode.
pub fn write_secret(path: &Path, secret: &str, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::write(path, format!("{secret}\n")).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

pub fn is_root() -> bool {
    unsafe { libc::geteuid() == 0 }
}

/// A tmpfs mounted for one test (root needed): a fresh volume, a small disk, a read-only
/// one. Unmounted when dropped.
pub struct Tmpfs(pub PathBuf);

impl Tmpfs {
    pub fn mount(path: &Path, options: &str) -> Tmpfs {
        std::fs::create_dir_all(path).unwrap();
        let mounted = Command::new("mount")
            .args(["-t", "tmpfs", "-o", options, "lifeboat-test"])
            .arg(path)
            .status()
            .unwrap();
        assert!(
            mounted.success(),
            "mount a tmpfs at {} (root needed)",
            path.display()
        );
        Tmpfs(path.to_path_buf())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

/// The one `objects[]` entry of the first manifest found under `repo` named `name`, edited by `edit`,
/// and the manifest sealed again as lifeboat seals it (its `manifest_sha256` is the sha256
/// of the manifest with that value as 64 zeros): damage the seal cannot see.
pub fn edit_manifest_object(repo: &Path, name: &str, edit: impl FnOnce(&mut serde_json::Value)) {
    let manifest_path = walkdir::WalkDir::new(repo)
        .into_iter()
        .filter_map(Result::ok)
        .find(|e| e.file_name() == "manifest.json")
        .expect("a committed manifest")
        .into_path();
    let mut manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&manifest_path).unwrap()).unwrap();
    let object = manifest["objects"]
        .as_array_mut()
        .unwrap()
        .iter_mut()
        .find(|o| o["name"] == name)
        .expect("the object is in the manifest");
    edit(object);
    let zeros = "0".repeat(64);
    manifest["manifest_sha256"] = serde_json::json!(zeros);
    let unsealed = serde_json::to_string_pretty(&manifest).unwrap();
    let seal = {
        use sha2::Digest;
        hex::encode(sha2::Sha256::digest(unsealed.as_bytes()))
    };
    let field = |value: &str| format!("\"manifest_sha256\": \"{value}\"");
    std::fs::write(
        &manifest_path,
        unsealed.replacen(&field(&zeros), &field(&seal), 1),
    )
    .unwrap();
}
