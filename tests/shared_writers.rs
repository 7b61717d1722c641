//! Several writers, one repository: two config files (two "hosts", no shared lock) back up
//! the same job into the same repository in the same second, round after round. Every
//! backup that is committed holds the tree of the run that committed it — so no run's object
//! replaced another's, since the manifest checks every object's sha256 and the trees
//! differ — every run exits 0 or names the conflict, and no claim is left behind.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::common::garage::{self, Garage};
use crate::common::{Run, SeaweedFs, files_job, lifeboat_command, local_repository, run_command};

/// One writer: its config and the tree it backs up.
struct Writer {
    config: PathBuf,
    source: PathBuf,
}

/// What one run of one writer committed.
struct Committed {
    writer: usize,
    round: usize,
    id: String,
}

fn command(config: &Path, env: &[(&str, &str)]) -> Command {
    let mut command = lifeboat_command(config);
    command.envs(env.iter().copied());
    command
}

/// Sleeps until 50 ms into the next second, so that both runs read the same second.
fn wait_for_second_start() {
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap();
    let into = Duration::from_nanos(u64::from(now.subsec_nanos()));
    std::thread::sleep(Duration::from_secs(1) - into + Duration::from_millis(50));
}

/// Two writers of job `conf` into the repository `repository` (a `[[repository]]` block),
/// `rounds` rounds of two backups started together; returns what was committed, after
/// checking every run's exit and message.
fn contend(
    work: &Path,
    repository: &str,
    env: &[(&str, &str)],
    rounds: usize,
) -> (Vec<Writer>, Vec<Committed>) {
    let writers: Vec<Writer> = (0..2)
        .map(|n| {
            let home = work.join(format!("host{n}"));
            let source = home.join("tree");
            std::fs::create_dir_all(&source).unwrap();
            let config = home.join("lifeboat.toml");
            std::fs::write(
                &config,
                format!(
                    "lock_dir = \"{}\"\n{repository}{}",
                    home.join("locks").display(),
                    files_job("conf", &[&source])
                ),
            )
            .unwrap();
            Writer { config, source }
        })
        .collect();
    let mut committed = Vec::new();
    let mut conflicts = 0;
    for round in 0..rounds {
        for (n, writer) in writers.iter().enumerate() {
            // Each round's tree differs from the other writer's and from every other round's,
            // and is large enough that its object takes a moment to write.
            let data = format!("writer {n} round {round}\n").repeat(20_000);
            std::fs::write(writer.source.join("data"), data).unwrap();
        }
        wait_for_second_start();
        let children: Vec<_> = writers
            .iter()
            .map(|writer| {
                command(&writer.config, env)
                    .args(["backup", "conf"])
                    .stdout(Stdio::piped())
                    .stderr(Stdio::piped())
                    .spawn()
                    .unwrap()
            })
            .collect();
        for (n, child) in children.into_iter().enumerate() {
            let run = Run::from_output(child.wait_with_output().unwrap());
            match run.code {
                0 => {
                    let id = crate::common::committed_id(&run, "conf");
                    committed.push(Committed {
                        writer: n,
                        round,
                        id,
                    });
                }
                _ => {
                    conflicts += 1;
                    assert!(
                        run.stderr.contains("was claimed by"),
                        "round {round}, writer {n}: exit {} without naming the conflict:\n{}{}",
                        run.code,
                        run.stdout,
                        run.stderr
                    );
                }
            }
        }
    }
    let ids: BTreeSet<&String> = committed.iter().map(|c| &c.id).collect();
    assert_eq!(ids.len(), committed.len(), "two runs reported one id");
    assert!(
        committed.len() + conflicts == 2 * rounds && committed.len() >= rounds,
        "{} of {} runs committed",
        committed.len(),
        2 * rounds
    );
    (writers, committed)
}

/// Each committed backup restores to exactly the tree its own run backed up, and `verify`
/// finds every object at its manifest's checksum; no claim is left.
fn assert_each_holds_its_own(
    work: &Path,
    env: &[(&str, &str)],
    writers: &[Writer],
    committed: &[Committed],
) {
    let config = &writers[0].config;
    let verify = run_command(command(config, env).args(["verify", "conf"]));
    verify.assert_code(0);
    for backup in committed {
        let into = work.join(format!("restore-{}", backup.id));
        run_command(command(config, env).args([
            "restore",
            "conf",
            "--backup",
            &backup.id,
            "--into",
            into.to_str().unwrap(),
        ]))
        .assert_code(0);
        let writer = &writers[backup.writer];
        let restored = into.join(writer.source.strip_prefix("/").unwrap());
        let data = std::fs::read_to_string(restored.join("data")).unwrap();
        assert_eq!(
            data,
            format!("writer {} round {}\n", backup.writer, backup.round).repeat(20_000),
            "backup {} does not hold the tree of the run that committed it",
            backup.id
        );
        // Nothing of the other writer's tree came along.
        let other = &writers[1 - backup.writer];
        assert!(!into.join(other.source.strip_prefix("/").unwrap()).exists());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_writers_of_one_job_never_overwrite_a_backup_local_and_s3() {
    let work = tempfile::tempdir().unwrap();
    let local = work.path().join("repo");
    let (writers, committed) = contend(
        &work.path().join("local"),
        &local_repository("shared", &local),
        &[],
        20,
    );
    assert_each_holds_its_own(work.path(), &[], &writers, &committed);
    let claims = local.join("jobs/conf/claims");
    assert_eq!(
        std::fs::read_dir(&claims).map(|d| d.count()).unwrap_or(0),
        0,
        "claims left in {}",
        claims.display()
    );

    let s3 = SeaweedFs::start().await;
    s3.create_bucket("shared").await;
    let work_s3 = work.path().join("s3");
    let (writers, committed) = contend(&work_s3, &s3.repository("shared", "shared", "lb"), &[], 20);
    assert_each_holds_its_own(&work_s3, &[], &writers, &committed);
    assert_eq!(
        s3.keys("shared", "lb/jobs/conf/claims/").await,
        Vec::<String>::new()
    );
    // Every run committed: SeaweedFS honours conditional create, so the claim decides.
    assert_eq!(committed.len(), 40);
}

/// Garage ignores conditional create: a run cannot own an id there, so its objects go under
/// names unique to it and a run that lost the id says so instead of committing over the other.
#[test]
fn two_writers_on_a_store_without_conditional_create_never_overwrite_a_backup() {
    let server = Garage::start("lifeboat");
    let work = tempfile::tempdir().unwrap();
    let env = [
        ("AWS_ACCESS_KEY_ID", garage::ACCESS_KEY),
        ("AWS_SECRET_ACCESS_KEY", garage::SECRET_KEY),
    ];
    let (writers, committed) = contend(
        work.path(),
        &server.repository("garage", "lifeboat", ""),
        &env,
        6,
    );
    assert_each_holds_its_own(work.path(), &env, &writers, &committed);
}
