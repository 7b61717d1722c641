//! A backup whose source fails midway commits no manifest in any repository, leaves no
//! multipart upload or temp file behind, says why, and the next run succeeds.

use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::Path;

use crate::common::{
    Run, Scenario, SeaweedFs, binary_command, is_root, lifeboat_command, run_command, tree,
};

const NOBODY: u32 = 65_534;

/// Root reads every file, so as root the backup runs as `nobody` to make the file unreadable.
/// The binary is copied beside the test's files first: the checkout may sit in a directory
/// that `nobody` cannot enter.
fn backup_as_unprivileged(config: &Path) -> Run {
    let mut command = lifeboat_command(config);
    if is_root() {
        let binary = config.parent().unwrap().join("lifeboat");
        if !binary.exists() {
            std::fs::copy(env!("CARGO_BIN_EXE_lifeboat"), &binary).unwrap();
            std::fs::set_permissions(&binary, std::fs::Permissions::from_mode(0o755)).unwrap();
        }
        command = binary_command(&binary, config);
        command.uid(NOBODY).gid(NOBODY).env("HOME", "/nonexistent");
    }
    command.args(["backup", "config"]);
    run_command(&mut command)
}

fn files_named(root: &Path, predicate: impl Fn(&str) -> bool) -> Vec<String> {
    walkdir::WalkDir::new(root)
        .into_iter()
        .filter_map(Result::ok)
        .filter(|e| predicate(&e.file_name().to_string_lossy()))
        .map(|e| e.path().display().to_string())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreadable_file_midway_commits_nothing_anywhere() {
    let server = SeaweedFs::start().await;
    server.create_bucket("backups").await;
    let work = tempfile::tempdir().unwrap();
    std::fs::set_permissions(work.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let repo = work.path().join("repo");
    std::fs::create_dir(&repo).unwrap();
    std::fs::set_permissions(&repo, std::fs::Permissions::from_mode(0o777)).unwrap();

    // 24 MiB that zstd cannot shrink go out first (several 5 MiB parts), then the failure.
    let source = work.path().join("src");
    tree::write_file(
        &source.join("a-large.bin"),
        &tree::noise(24 * 1024 * 1024, 3),
        0o644,
    );
    let unreadable = source.join("z-unreadable.conf");
    tree::write_file(&unreadable, b"secret = 1\n", 0o000);

    let config = Scenario::new(work.path())
        .local("local", &repo)
        .raw(&server.repository("s3", "backups", "lb"))
        .files_job("config", &[&source])
        .write();
    std::fs::set_permissions(&config, std::fs::Permissions::from_mode(0o644)).unwrap();

    let run = backup_as_unprivileged(&config);
    run.assert_code(1);
    run.assert_stderr_has(format!(
        "error: unable to read file '{}' for job 'config'",
        unreadable.display()
    ));
    run.assert_stderr_has("Permission denied");

    assert!(
        files_named(&repo, |name| name == "manifest.json").is_empty(),
        "no manifest in the local repository"
    );
    assert!(
        files_named(&repo, |name| name.contains(".lifeboat-tmp-")).is_empty(),
        "no temp file in the local repository"
    );
    let manifests = server.manifest_keys("backups").await;
    assert!(manifests.is_empty(), "no manifest in S3: {manifests:?}");
    assert!(
        server.open_uploads("backups").await.is_empty(),
        "no multipart upload left behind"
    );

    let list = run_command(lifeboat_command(&config).args(["list", "config"]));
    list.assert_code(0);
    list.assert_stdout_has("no backups");

    // Fixed, the next run succeeds.
    std::fs::set_permissions(&unreadable, std::fs::Permissions::from_mode(0o644)).unwrap();
    backup_as_unprivileged(&config).assert_code(0);
    assert_eq!(files_named(&repo, |name| name == "manifest.json").len(), 1);
    assert_eq!(server.manifest_keys("backups").await.len(), 1);
}
