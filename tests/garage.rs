//! The S3 cross-check: what lifeboat does on SeaweedFS it does on Garage, which differs
//! where servers do: no Object Lock (NotImplemented, 501), conditional writes ignored.
//! `check` passes there without `object_lock` and fails with it, naming why; a backup
//! of several parts restores byte for byte and verifies.

use std::path::Path;

use crate::common::garage::{self, Garage};
use crate::common::{Run, Scenario, run_command, tree};

/// `lifeboat ARGS` with Garage's key.
fn on_garage(config: &Path, args: &[&str]) -> Run {
    run_command(
        crate::common::lifeboat_command(config)
            .env("AWS_ACCESS_KEY_ID", garage::ACCESS_KEY)
            .env("AWS_SECRET_ACCESS_KEY", garage::SECRET_KEY)
            .args(args),
    )
}

#[test]
fn garage_checks_backs_up_and_restores_without_object_lock() {
    let server = Garage::start("lifeboat");
    let work = tempfile::tempdir().unwrap();
    let source = work.path().join("src");
    tree::build(&source, 50, 1);
    // More than two parts of 5 MiB: the multipart path.
    tree::write_file(
        &source.join("big.bin"),
        &tree::noise(12 * 1024 * 1024, 3),
        0o640,
    );
    let config = Scenario::new(work.path())
        .raw(&server.repository("garage", "lifeboat", ""))
        .files_job("config", &[&source])
        .write();
    let check = on_garage(&config, &["check"]);
    check.assert_code(0);
    check.assert_stdout_has("Object Lock: not available");

    on_garage(&config, &["backup", "config"]).assert_code(0);
    on_garage(&config, &["verify", "config", "--deep"]).assert_code(0);
    let into = work.path().join("restored");
    on_garage(
        &config,
        &["restore", "config", "--into", into.to_str().unwrap()],
    )
    .assert_code(0);
    tree::assert_same(&source, &into.join(source.strip_prefix("/").unwrap()));

    let locked = Scenario::new(work.path())
        .raw(&server.repository(
            "garage",
            "lifeboat",
            "object_lock = { mode = \"governance\", days = 1 }",
        ))
        .files_job("config", &[&source])
        .write();
    let check = on_garage(&locked, &["check"]);
    check.assert_code(1);
    assert!(
        check
            .stdout
            .contains("FAILED   repository 'garage' (s3://lifeboat/lifeboat)")
            && check.stdout.contains("does not implement Object Lock"),
        "{}",
        check.stdout
    );
}
