//! The fault matrix: each operation run with a fault injected between lifeboat and S3 (a
//! proxy that answers errors, delays, cuts or stalls chosen requests) or into the process.
//! For every case: a transient fault is retried and the run succeeds; a lasting one ends the
//! run non-zero with a message naming the cause; afterwards no manifest points to missing or
//! partial data (`verify` passes), no multipart upload is left once `prune` has run, the next
//! normal run succeeds, and every committed backup still restores byte-identical.

use std::path::PathBuf;
use std::time::Duration;

use crate::common::faults::{Fault, FaultProxy, Rule};
use crate::common::{Run, SeaweedFs, lifeboat, seaweedfs, tree, write_config};

const BUCKET: &str = "backups";
const JOB: &str = "conf";
/// The S3 calls the faults aim at, by a piece of their request target.
const UPLOAD_PART: &str = "partNumber=";
const CREATE_UPLOAD: &str = "?uploads";
const COMPLETE_UPLOAD: &str = "uploadId=";
const MANIFEST: &str = "manifest.json";
const OBJECT: &str = ".tar.zst";
const LISTING: &str = "list-type=2";

#[derive(Debug, Clone, Copy)]
enum Expect {
    /// Exit 0, the fault having been hit and got over.
    Recovers,
    /// Non-zero (not 3), the output naming each of these.
    Fails(&'static [&'static str]),
}

/// One outcome, for the table the suite prints.
struct Outcome {
    case: String,
    code: i32,
    said: String,
    uploads_left: usize,
}

/// A SeaweedFS behind the fault proxy, a config whose only repository goes through it, and a
/// tree of configuration files (one 12 MiB file, so objects are uploaded in parts).
struct Rig {
    s3: SeaweedFs,
    proxy: FaultProxy,
    work: tempfile::TempDir,
    source: PathBuf,
    config: PathBuf,
    outcomes: Vec<Outcome>,
}

impl Rig {
    async fn start() -> Rig {
        let s3 = SeaweedFs::start().await;
        s3.create_bucket(BUCKET).await;
        let proxy = FaultProxy::start(&s3.endpoint);
        let work = tempfile::tempdir().unwrap();
        let source = work.path().join("etc/app");
        tree::build(&source, 30, 0);
        tree::write_file(&source.join("large.bin"), &tree::noise(12 << 20, 7), 0o640);
        let config = write_config(
            work.path(),
            &format!(
                "{}[[job]]\nname = \"{JOB}\"\nkind = \"files\"\npaths = [\"{}\"]\n",
                s3_repository("s3", &proxy.endpoint),
                source.display()
            ),
        );
        Rig {
            s3,
            proxy,
            work,
            source,
            config,
            outcomes: Vec::new(),
        }
    }

    /// Runs `args` with `rules` in force and checks the outcome against `expect`.
    async fn case(&mut self, name: &str, args: &[&str], rules: Vec<Rule>, expect: Expect) -> Run {
        self.proxy.set(rules);
        let run = lifeboat(&self.config, args);
        let faulted = self.proxy.faulted();
        self.proxy.clear();
        assert!(
            !faulted.is_empty(),
            "{name}: no request met the fault; the case tests nothing"
        );
        let said = format!("{}{}", run.stdout, run.stderr);
        match expect {
            Expect::Recovers => {
                assert_eq!(run.code, 0, "{name}: the fault was to be got over\n{said}")
            }
            Expect::Fails(words) => {
                assert!(
                    run.code != 0 && run.code != 3,
                    "{name}: exit {} where a failure was due\n{said}",
                    run.code
                );
                for word in words {
                    assert!(said.contains(word), "{name}: no '{word}' in\n{said}");
                }
            }
        }
        let uploads_left = self.s3.open_uploads(BUCKET).await.len();
        self.outcomes.push(Outcome {
            case: name.to_string(),
            code: run.code,
            said: first_error_line(&run),
            uploads_left,
        });
        run
    }

    /// What must hold after any case: every committed backup whole, no upload left once
    /// prune has run, and the next backup fine.
    async fn assert_whole(&self, name: &str) {
        let verify = lifeboat(&self.config, &["verify", JOB]);
        assert_eq!(
            verify.code, 0,
            "{name}: a manifest points to missing or damaged data\n{}{}",
            verify.stdout, verify.stderr
        );
        let prune = lifeboat(&self.config, &["prune", "--grace", "1ms"]);
        assert_eq!(prune.code, 0, "{name}: {}{}", prune.stdout, prune.stderr);
        assert_eq!(
            self.s3.open_uploads(BUCKET).await,
            Vec::<String>::new(),
            "{name}: uploads left after prune"
        );
    }

    fn backup_ids(&self) -> Vec<String> {
        let list = lifeboat(&self.config, &["list", JOB, "--format", "json"]);
        list.assert_code(0);
        let value: serde_json::Value = serde_json::from_str(&list.stdout).unwrap();
        let mut ids: Vec<String> = value["rows"]
            .as_array()
            .unwrap()
            .iter()
            .map(|b| b["id"].as_str().unwrap().to_string())
            .collect();
        ids.sort();
        ids
    }

    /// Every committed backup restores to the source tree, byte for byte.
    fn assert_every_backup_restores(&self) {
        let ids = self.backup_ids();
        assert!(!ids.is_empty());
        for id in ids {
            let into = self.work.path().join(format!("restored-{id}"));
            lifeboat(
                &self.config,
                &[
                    "restore",
                    JOB,
                    "--backup",
                    &id,
                    "--into",
                    into.to_str().unwrap(),
                ],
            )
            .assert_code(0);
            tree::assert_same(
                &self.source,
                &into.join(self.source.strip_prefix("/").unwrap()),
            );
            std::fs::remove_dir_all(&into).unwrap();
        }
    }

    fn print_table(&self, title: &str) {
        eprintln!(
            "\n{title}\n| case | exit | uploads left before prune | said |\n|---|---|---|---|"
        );
        for outcome in &self.outcomes {
            eprintln!(
                "| {} | {} | {} | {} |",
                outcome.case,
                outcome.code,
                outcome.uploads_left,
                outcome.said.replace('|', "\\|")
            );
        }
    }
}

/// An S3 repository at `endpoint` with short timeouts, so that a stalled request is given up
/// in seconds.
fn s3_repository(name: &str, endpoint: &str) -> String {
    format!(
        "[[repository]]\nname = \"{name}\"\ntype = \"s3\"\nbucket = \"{BUCKET}\"\nprefix = \"lifeboat\"\nregion = \"{}\"\nendpoint = \"{endpoint}\"\npath_style = true\npart_size = \"5MiB\"\nmax_attempts = 3\nattempt_timeout = \"4s\"\nstall_timeout = \"3s\"\n\n",
        seaweedfs::REGION
    )
}

fn first_error_line(run: &Run) -> String {
    run.stderr
        .lines()
        .find(|l| l.starts_with("error:"))
        .or_else(|| run.stdout.lines().find(|l| !l.trim().is_empty()))
        .unwrap_or_default()
        .chars()
        .take(160)
        .collect()
}

const SLOW_DOWN: Fault = Fault::Respond(503, "SlowDown");
const INTERNAL: Fault = Fault::Respond(500, "InternalError");

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backup_survives_transient_s3_faults_and_commits_nothing_on_lasting_ones() {
    let mut rig = Rig::start().await;
    let backup = ["backup", JOB];
    lifeboat(&rig.config, &backup).assert_code(0);

    let transient: Vec<(&str, Rule)> = vec![
        (
            "backup: 503 SlowDown on the first part",
            Rule::once("PUT", UPLOAD_PART, SLOW_DOWN),
        ),
        (
            "backup: 503 SlowDown on the third part",
            Rule::once("PUT", UPLOAD_PART, SLOW_DOWN).after(2),
        ),
        (
            "backup: 500 on CreateMultipartUpload",
            Rule::once("POST", CREATE_UPLOAD, INTERNAL),
        ),
        (
            "backup: 500 on CompleteMultipartUpload",
            Rule::once("POST", COMPLETE_UPLOAD, INTERNAL),
        ),
        (
            "backup: 503 on the manifest",
            Rule::once("PUT", MANIFEST, SLOW_DOWN),
        ),
        (
            "backup: a part cut after 1 MiB",
            Rule::once("PUT", UPLOAD_PART, Fault::CutRequestAfter(1 << 20)),
        ),
        (
            "backup: the manifest cut after 100 bytes",
            Rule::once("PUT", MANIFEST, Fault::CutRequestAfter(100)),
        ),
        (
            "backup: every part delayed 1 s",
            Rule::always("PUT", UPLOAD_PART, Fault::Delay(Duration::from_secs(1))),
        ),
        (
            "backup: a part stalled (attempt_timeout)",
            Rule::once("PUT", UPLOAD_PART, Fault::Stall),
        ),
        (
            "backup: the listing answered 503",
            Rule::once("GET", LISTING, SLOW_DOWN),
        ),
    ];
    for (name, rule) in transient {
        let before = rig.backup_ids().len();
        rig.case(name, &backup, vec![rule], Expect::Recovers).await;
        assert_eq!(
            rig.backup_ids().len(),
            before + 1,
            "{name}: no backup committed"
        );
        rig.assert_whole(name).await;
    }

    let lasting: Vec<(&str, Rule, &'static [&'static str])> = vec![
        (
            "backup: every part answered 503",
            Rule::always("PUT", UPLOAD_PART, SLOW_DOWN),
            &["SlowDown", "files.tar.zst"],
        ),
        (
            "backup: every part cut after 1 MiB",
            Rule::always("PUT", UPLOAD_PART, Fault::CutRequestAfter(1 << 20)),
            &["files.tar.zst"],
        ),
        (
            "backup: CompleteMultipartUpload always 500",
            Rule::always("POST", COMPLETE_UPLOAD, INTERNAL),
            &["InternalError"],
        ),
        (
            "backup: CreateMultipartUpload refused (403)",
            Rule::always("POST", CREATE_UPLOAD, Fault::Respond(403, "AccessDenied")),
            &["AccessDenied"],
        ),
        (
            "backup: the manifest always 503",
            Rule::always("PUT", MANIFEST, SLOW_DOWN),
            &["SlowDown", "manifest"],
        ),
        (
            "backup: the manifest stalled",
            Rule::always("PUT", MANIFEST, Fault::Stall),
            &["manifest"],
        ),
        (
            "backup: every part stalled",
            Rule::always("PUT", UPLOAD_PART, Fault::Stall),
            &["files.tar.zst"],
        ),
    ];
    for (name, rule, words) in lasting {
        let before = rig.backup_ids();
        rig.case(name, &backup, vec![rule], Expect::Fails(words))
            .await;
        assert_eq!(rig.backup_ids(), before, "{name}: a backup was committed");
        rig.assert_whole(name).await;
        lifeboat(&rig.config, &backup).assert_code(0);
    }
    rig.assert_every_backup_restores();
    rig.print_table("backup");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restore_and_verify_resume_or_retry_transient_faults_and_name_lasting_ones() {
    let mut rig = Rig::start().await;
    lifeboat(&rig.config, &["backup", JOB]).assert_code(0);
    let into = rig.work.path().join("restored");
    let into_arg = into.to_str().unwrap().to_string();
    let restore = ["restore", JOB, "--into", into_arg.as_str()];
    let restored_tree = into.join(rig.source.strip_prefix("/").unwrap());

    let transient: Vec<(&str, Rule)> = vec![
        (
            "restore: 503 on the object",
            Rule::once("GET", OBJECT, SLOW_DOWN),
        ),
        (
            "restore: the object cut after 2 MiB",
            Rule::once("GET", OBJECT, Fault::CutResponseAfter(2 << 20)),
        ),
        (
            "restore: the object stalled after 2 MiB",
            Rule::once("GET", OBJECT, Fault::StallResponseAfter(2 << 20)),
        ),
        (
            "restore: the manifest answered 500",
            Rule::once("GET", MANIFEST, INTERNAL),
        ),
        (
            "restore: every request delayed 300 ms",
            Rule::always("*", "", Fault::Delay(Duration::from_millis(300))),
        ),
    ];
    for (name, rule) in transient {
        rig.case(name, &restore, vec![rule], Expect::Recovers).await;
        tree::assert_same(&rig.source, &restored_tree);
        std::fs::remove_dir_all(&into).unwrap();
    }
    let lasting: Vec<(&str, Rule, &'static [&'static str])> = vec![
        (
            "restore: the object always cut after 2 MiB",
            Rule::always("GET", OBJECT, Fault::CutResponseAfter(2 << 20)),
            &["files.tar.zst"],
        ),
        (
            "restore: the object always stalls",
            Rule::always("GET", OBJECT, Fault::StallResponseAfter(1 << 20)),
            &["files.tar.zst", "stall"],
        ),
        (
            "restore: the object always 503",
            Rule::always("GET", OBJECT, SLOW_DOWN),
            &["files.tar.zst", "SlowDown"],
        ),
        (
            "restore: the object gone (404)",
            Rule::always("GET", OBJECT, Fault::Respond(404, "NoSuchKey")),
            &["files.tar.zst"],
        ),
    ];
    for (name, rule, words) in lasting {
        rig.case(name, &restore, vec![rule], Expect::Fails(words))
            .await;
        assert!(
            !into.exists(),
            "{name}: a failed restore left {}",
            into.display()
        );
    }

    let verify = ["verify", JOB];
    rig.case(
        "verify: 503 on the object",
        &verify,
        vec![Rule::once("GET", OBJECT, SLOW_DOWN)],
        Expect::Recovers,
    )
    .await;
    rig.case(
        "verify: the object cut after 2 MiB",
        &verify,
        vec![Rule::once("GET", OBJECT, Fault::CutResponseAfter(2 << 20))],
        Expect::Recovers,
    )
    .await;
    let run = rig
        .case(
            "verify: the object always cut",
            &verify,
            vec![Rule::always(
                "GET",
                OBJECT,
                Fault::CutResponseAfter(2 << 20),
            )],
            Expect::Fails(&["files.tar.zst"]),
        )
        .await;
    // Unreadable is not damaged: nothing to replace, only to read again.
    assert!(run.stdout.contains("UNREADABLE"), "{}", run.stdout);
    assert!(
        run.stdout.contains(": 0 damaged, 1 unreadable"),
        "{}",
        run.stdout
    );
    rig.case(
        "verify: the listing always 503",
        &verify,
        vec![Rule::always("GET", LISTING, SLOW_DOWN)],
        Expect::Fails(&["SlowDown"]),
    )
    .await;
    rig.assert_whole("restore and verify").await;
    rig.assert_every_backup_restores();
    rig.print_table("restore and verify");
}
