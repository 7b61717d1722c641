//! The fault matrix: each operation run with a fault injected between lifeboat and S3 (a
//! proxy that answers errors, delays, cuts or stalls chosen requests) or into the process.
//! For every case: a transient fault is retried and the run succeeds; a lasting one ends the
//! run non-zero with a message naming the cause; afterwards no manifest points to missing or
//! partial data (`verify` passes), no multipart upload is left once `prune` has run, the next
//! normal run succeeds, and every committed backup still restores byte-identical.

use std::path::PathBuf;
use std::time::Duration;

use crate::common::faults::{Fault, FaultProxy, Rule};
use crate::common::{Run, SeaweedFs, Tmpfs, lifeboat, seaweedfs, tree, write_config};

const BUCKET: &str = "backups";
const JOB: &str = "conf";
/// The S3 calls the faults aim at, by a piece of their request target.
const UPLOAD_PART: &str = "partNumber=";
const CREATE_UPLOAD: &str = "?uploads";
const COMPLETE_UPLOAD: &str = "uploadId=";
const MANIFEST: &str = "manifest.json";
const OBJECT: &str = ".tar.zst";
const LISTING: &str = "list-type=2";
/// Where a lasting cut ends every answer: a range of a part (5 MiB) gets three tries
/// (max_attempts), 3 MiB in all, so it never completes. A cut after 2 MiB would: each try
/// goes on from where the last one stopped.
const LASTING_CUT: u64 = 1 << 20;

#[derive(Debug, Clone, Copy)]
enum Expect {
    /// Exit 0, the fault having been hit and got over.
    Recovers,
    /// Non-zero (not 3), the output naming each of these.
    Fails(&'static [&'static str]),
    /// Exit 3: done where it could be, the output naming each of these.
    Degraded(&'static [&'static str]),
}

/// One outcome, for the table the suite prints.
struct Outcome {
    case: String,
    code: i32,
    said: String,
    /// None while the server is down.
    uploads_left: Option<usize>,
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
    /// While the S3 server is stopped, its uploads cannot be counted.
    s3_down: bool,
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
            s3_down: false,
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
        self.judge(name, run, expect).await
    }

    /// Runs `args` once per case, each with its one rule; the runs, in order.
    async fn cases(&mut self, args: &[&str], cases: Vec<(&str, Rule, Expect)>) -> Vec<Run> {
        let mut runs = Vec::with_capacity(cases.len());
        for (name, rule, expect) in cases {
            runs.push(self.case(name, args, vec![rule], expect).await);
        }
        runs
    }

    /// Checks a run that met a fault against `expect`, and keeps its outcome for the table.
    async fn judge(&mut self, name: &str, run: Run, expect: Expect) -> Run {
        let said = format!("{}{}", run.stdout, run.stderr);
        match expect {
            Expect::Recovers => {
                assert_eq!(run.code, 0, "{name}: the fault was to be got over\n{said}")
            }
            Expect::Fails(words) | Expect::Degraded(words) => {
                let degraded = matches!(expect, Expect::Degraded(_));
                assert!(
                    run.code != 0 && (run.code == 3) == degraded,
                    "{name}: exit {} where {} was due\n{said}",
                    run.code,
                    if degraded {
                        "3 (degraded)"
                    } else {
                        "a failure"
                    }
                );
                for word in words {
                    assert!(said.contains(word), "{name}: no '{word}' in\n{said}");
                }
            }
        }
        let uploads_left = match self.s3_down {
            true => None,
            false => Some(self.s3.open_uploads(BUCKET).await.len()),
        };
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

    fn stop_s3(&mut self) {
        self.s3.stop();
        self.s3_down = true;
    }

    async fn restart_s3(&mut self) {
        self.s3.restart().await;
        self.s3_down = false;
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
                outcome
                    .uploads_left
                    .map_or("(server down)".to_string(), |n| n.to_string()),
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

/// The error and its deepest cause, or the first line printed on success.
fn first_error_line(run: &Run) -> String {
    let line = match run.stderr.lines().find(|l| l.starts_with("error:")) {
        Some(error) => match run.stderr.lines().rfind(|l| l.starts_with("caused by:")) {
            Some(cause) => format!("{error} — {cause}"),
            None => error.to_string(),
        },
        None => run
            .stdout
            .lines()
            .find(|l| !l.trim().is_empty())
            .unwrap_or_default()
            .to_string(),
    };
    line.chars().take(240).collect()
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
            Rule::always("GET", OBJECT, Fault::CutResponseAfter(LASTING_CUT)),
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
    let runs = rig
        .cases(
            &verify,
            vec![
                (
                    "verify: 503 on the object",
                    Rule::once("GET", OBJECT, SLOW_DOWN),
                    Expect::Recovers,
                ),
                (
                    "verify: the object cut after 2 MiB",
                    Rule::once("GET", OBJECT, Fault::CutResponseAfter(2 << 20)),
                    Expect::Recovers,
                ),
                (
                    "verify: the object always cut",
                    Rule::always("GET", OBJECT, Fault::CutResponseAfter(LASTING_CUT)),
                    Expect::Fails(&["files.tar.zst"]),
                ),
                (
                    "verify: the listing always 503",
                    Rule::always("GET", LISTING, SLOW_DOWN),
                    Expect::Fails(&["SlowDown"]),
                ),
            ],
        )
        .await;
    // Unreadable is not damaged: nothing to replace, only to read again.
    let always_cut = &runs[2].stdout;
    assert!(always_cut.contains("UNREADABLE"), "{always_cut}");
    assert!(
        always_cut.contains(": 0 damaged, 1 unreadable"),
        "{always_cut}"
    );
    rig.assert_whole("restore and verify").await;
    rig.assert_every_backup_restores();
    rig.print_table("restore and verify");
}

/// A large object is read as ranged GETs of a part each, several in flight: a range cut
/// midway is resumed on its own and the result is the object byte for byte; every range is
/// pinned to the ETag of the first, so an object replaced meanwhile fails the read instead of
/// handing on a mix of two versions.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_object_is_read_as_ranges_each_resumed_and_all_of_one_version() {
    let mut rig = Rig::start().await;
    lifeboat(&rig.config, &["backup", JOB]).assert_code(0);
    let key = rig
        .s3
        .keys(BUCKET, "lifeboat/")
        .await
        .into_iter()
        .find(|k| k.ends_with(OBJECT))
        .unwrap();
    let stored = rig.s3.object(BUCKET, &key).await;
    let ranges = stored.len().div_ceil(5 << 20);
    assert!(ranges >= 3, "the object is {} bytes", stored.len());
    let into = rig.work.path().join("restored");
    let restore = ["restore", JOB, "--into", into.to_str().unwrap()];
    let restored_tree = into.join(rig.source.strip_prefix("/").unwrap());
    let gets = |rig: &Rig| rig.proxy.count("GET", OBJECT);

    // One GET per part-sized range; one in all with download_concurrency = 1.
    let before = gets(&rig);
    lifeboat(&rig.config, &restore).assert_code(0);
    assert_eq!(gets(&rig) - before, ranges);
    tree::assert_same(&rig.source, &restored_tree);
    std::fs::remove_dir_all(&into).unwrap();
    let single = rig.work.path().join("single");
    std::fs::create_dir(&single).unwrap();
    let single = write_config(
        &single,
        &std::fs::read_to_string(&rig.config)
            .unwrap()
            .replace("max_attempts", "download_concurrency = 1\nmax_attempts"),
    );
    let before = gets(&rig);
    lifeboat(&single, &restore).assert_code(0);
    assert_eq!(gets(&rig) - before, 1);
    tree::assert_same(&rig.source, &restored_tree);
    std::fs::remove_dir_all(&into).unwrap();

    // The second range cut after 1 MiB: that range alone is asked again, from where it was cut.
    let before = gets(&rig);
    let run = rig
        .case(
            "restore: the second range cut after 1 MiB",
            &restore,
            vec![Rule::once("GET", OBJECT, Fault::CutResponseAfter(1 << 20)).after(1)],
            Expect::Recovers,
        )
        .await;
    run.assert_stderr_has("resuming from there");
    assert_eq!(gets(&rig) - before, ranges + 1);
    tree::assert_same(&rig.source, &restored_tree);
    std::fs::remove_dir_all(&into).unwrap();

    // A later range (the first is asked alone) answered as a server that ignores Range
    // would (200, no Content-Range): refused before a byte of it is handed on, naming the
    // object; nothing is restored.
    let run = rig
        .case(
            "restore: a later range answered 200 without Content-Range",
            &restore,
            vec![Rule::once("GET", OBJECT, Fault::RangeIgnored).after(2)],
            Expect::Fails(&[
                OBJECT,
                "asked for the bytes from ",
                "the server answered HTTP 200",
            ]),
        )
        .await;
    assert!(!into.exists(), "{}", run.stderr);

    // Every answer trickling 1 KiB a second, never quiet for a whole stall_timeout (3 s):
    // each try of a range ends at attempt_timeout (4 s), and after max_attempts the read
    // fails naming the object, instead of taking days.
    let started = std::time::Instant::now();
    let run = rig
        .case(
            "restore: every answer trickles 1 KiB a second",
            &restore,
            vec![Rule::always(
                "GET",
                OBJECT,
                Fault::Trickle(Duration::from_secs(1)),
            )],
            Expect::Fails(&[OBJECT, "attempt_timeout"]),
        )
        .await;
    assert!(
        started.elapsed() < Duration::from_secs(60),
        "{}",
        run.stderr
    );
    assert!(!into.exists(), "{}", run.stderr);

    // The object replaced while its later ranges are on their way: the read fails, naming
    // it, and nothing is restored.
    rig.proxy.set(vec![
        Rule::always("GET", OBJECT, Fault::Delay(Duration::from_secs(3))).after(1),
    ]);
    let before = gets(&rig);
    let child = crate::common::lifeboat_command(&rig.config)
        .args(restore)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while gets(&rig) - before < 2 && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut replaced = stored.clone();
    replaced[stored.len() - 1] ^= 1;
    rig.s3
        .client()
        .put_object()
        .bucket(BUCKET)
        .key(&key)
        .body(replaced.into())
        .send()
        .await
        .unwrap();
    let output = child.wait_with_output().unwrap();
    rig.proxy.clear();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("replaced while it was being downloaded") && stderr.contains(OBJECT),
        "{stderr}"
    );
    assert!(!into.exists());

    // Put back, the object restores again.
    rig.s3
        .client()
        .put_object()
        .bucket(BUCKET)
        .key(&key)
        .body(stored.into())
        .send()
        .await
        .unwrap();
    lifeboat(&rig.config, &restore).assert_code(0);
    tree::assert_same(&rig.source, &restored_tree);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicate_and_prune_leave_no_manifest_without_its_data() {
    let mut rig = Rig::start().await;
    // The backups are taken into a local "primary" alone; "dr" (through the proxy) lacks them.
    let primary = rig.work.path().join("primary");
    let job = format!(
        "[[job]]\nname = \"{JOB}\"\nkind = \"files\"\npaths = [\"{}\"]\nretention = {{ keep_last = 2 }}\n",
        rig.source.display()
    );
    std::fs::create_dir_all(rig.work.path().join("primary-only")).unwrap();
    let primary_only = write_config(
        &rig.work.path().join("primary-only"),
        &format!(
            "{}{job}",
            crate::common::local_repository("primary", &primary)
        ),
    );
    std::fs::write(
        &rig.config,
        format!(
            "{}{}{job}",
            crate::common::local_repository("primary", &primary),
            s3_repository("dr", &rig.proxy.endpoint)
        ),
    )
    .unwrap();
    let replicate = ["replicate", JOB];
    let in_dr = |rig: &Rig| -> usize {
        let list = lifeboat(&rig.config, &["list", JOB, "--format", "json"]);
        let value: serde_json::Value = serde_json::from_str(&list.stdout).unwrap();
        value["rows"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|row| {
                row["present_in"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .any(|r| r == "dr")
            })
            .count()
    };

    let cases: Vec<(&str, Rule, Expect)> = vec![
        (
            "replicate: 503 on a part",
            Rule::once("PUT", UPLOAD_PART, SLOW_DOWN),
            Expect::Recovers,
        ),
        (
            "replicate: a part cut after 1 MiB",
            Rule::once("PUT", UPLOAD_PART, Fault::CutRequestAfter(1 << 20)),
            Expect::Recovers,
        ),
        (
            "replicate: every part 503",
            Rule::always("PUT", UPLOAD_PART, SLOW_DOWN),
            Expect::Fails(&["SlowDown", "dr"]),
        ),
        (
            "replicate: the manifest always 500",
            Rule::always("PUT", MANIFEST, INTERNAL),
            Expect::Fails(&["InternalError", "manifest"]),
        ),
        (
            "replicate: the manifest stalled",
            Rule::always("PUT", MANIFEST, Fault::Stall),
            Expect::Fails(&["manifest"]),
        ),
        (
            "replicate: the listing of dr 503",
            Rule::always("GET", LISTING, SLOW_DOWN),
            Expect::Fails(&["SlowDown", "dr"]),
        ),
    ];
    // "dr" joins a config whose primary already holds a backup: an empty repository beside
    // one holding data is seeded on purpose (`--reseed`), then kept up by plain replicate.
    lifeboat(&primary_only, &["backup", JOB]).assert_code(0);
    lifeboat(&rig.config, &["replicate", JOB, "--reseed"]).assert_code(0);
    for (name, rule, expect) in cases {
        lifeboat(&primary_only, &["backup", JOB]).assert_code(0);
        let before = in_dr(&rig);
        rig.case(name, &replicate, vec![rule], expect).await;
        let after = in_dr(&rig);
        match expect {
            Expect::Recovers => assert_eq!(after, before + 1, "{name}"),
            _ => assert_eq!(after, before, "{name}: dr committed a backup"),
        }
        rig.assert_whole(name).await;
        lifeboat(&rig.config, &replicate).assert_code(0);
    }

    // Prune, keep_last = 2: each case has a third backup to remove from both repositories.
    let prune = ["prune", JOB];
    let cases: Vec<(&str, Vec<Rule>, Expect)> = vec![
        (
            "prune: 503 on a delete",
            vec![
                Rule::once("DELETE", "", SLOW_DOWN),
                Rule::once("POST", "?delete", SLOW_DOWN),
            ],
            Expect::Recovers,
        ),
        (
            "prune: every delete 503",
            vec![
                Rule::always("DELETE", "", SLOW_DOWN),
                Rule::always("POST", "?delete", SLOW_DOWN),
            ],
            Expect::Fails(&["SlowDown"]),
        ),
        (
            "prune: the listing of dr 503",
            vec![Rule::always("GET", LISTING, SLOW_DOWN)],
            Expect::Degraded(&["SlowDown", "'dr'"]),
        ),
    ];
    for (name, rules, expect) in cases {
        lifeboat(&rig.config, &["backup", JOB]).assert_code(0);
        rig.case(name, &prune, rules, expect).await;
        // Whatever was cut short, nothing kept points to a removed object.
        rig.assert_whole(name).await;
        assert_eq!(
            rig.backup_ids().len(),
            2,
            "{name}: the next prune finishes the plan"
        );
    }
    rig.assert_every_backup_restores();
    rig.print_table("replicate and prune");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wal_push_and_drill_retry_transient_faults_and_fail_loudly_on_lasting_ones() {
    let mut rig = Rig::start().await;
    lifeboat(&rig.config, &["backup", JOB]).assert_code(0);
    let text = std::fs::read_to_string(&rig.config).unwrap();
    std::fs::write(
        &rig.config,
        format!("{text}\n[[job]]\nname = \"db\"\nkind = \"postgres\"\nmode = \"physical\"\ndsn = \"postgresql://postgres@127.0.0.1:9/postgres\"\n"),
    )
    .unwrap();
    let wal_dir = rig.work.path().join("pg_wal");
    std::fs::create_dir(&wal_dir).unwrap();
    let mut segment_number = 0;
    let mut next_segment = || {
        segment_number += 1;
        let name = format!("0000000100000000{segment_number:08X}");
        let path = wal_dir.join(&name);
        tree::write_file(
            &path,
            &tree::wal_segment(&name, tree::FAKE_SYSTEM, segment_number),
            0o600,
        );
        path
    };
    let cases: Vec<(&str, Rule, Expect)> = vec![
        (
            "wal-push: 503 on the segment",
            Rule::once("PUT", "/wal/", SLOW_DOWN),
            Expect::Recovers,
        ),
        (
            "wal-push: the segment cut after 1 MiB",
            Rule::once("PUT", "/wal/", Fault::CutRequestAfter(1 << 20)),
            Expect::Recovers,
        ),
        (
            "wal-push: the segment stalled once",
            Rule::once("PUT", "/wal/", Fault::Stall),
            Expect::Recovers,
        ),
        (
            "wal-push: every try 503",
            Rule::always("PUT", "/wal/", SLOW_DOWN),
            Expect::Fails(&["SlowDown"]),
        ),
        (
            "wal-push: every try cut",
            Rule::always("PUT", "/wal/", Fault::CutRequestAfter(1 << 20)),
            Expect::Fails(&["s3"]),
        ),
    ];
    for (name, rule, expect) in cases {
        let segment = next_segment();
        let file_name = segment.file_name().unwrap().to_str().unwrap().to_string();
        let push = ["wal-push", "--job", "db", segment.to_str().unwrap()];
        rig.case(name, &push, vec![rule], expect).await;
        if let Expect::Fails(_) = expect {
            // PostgreSQL keeps the segment and calls again: the next try stores it.
            lifeboat(&rig.config, &push).assert_code(0);
        }
        let fetched = rig.work.path().join("fetched");
        lifeboat(
            &rig.config,
            &[
                "wal-fetch",
                "--job",
                "db",
                &file_name,
                fetched.to_str().unwrap(),
            ],
        )
        .assert_code(0);
        assert_eq!(
            std::fs::read(&fetched).unwrap(),
            std::fs::read(&segment).unwrap(),
            "{name}: the archived segment is not the one pushed"
        );
        std::fs::remove_file(&fetched).unwrap();
    }

    let drill = rig.work.path().join("conf.toml");
    std::fs::write(
        &drill,
        format!(
            "name = \"conf\"\njob = \"{JOB}\"\n\n[[check]]\nname = \"the large file is back\"\npath = \"{}\"\nexists = true\n",
            rig.source.join("large.bin").display()
        ),
    )
    .unwrap();
    let reports = rig.work.path().join("reports");
    let run = [
        "drill",
        "run",
        drill.to_str().unwrap(),
        "--report-dir",
        reports.to_str().unwrap(),
    ];
    rig.cases(
        &run,
        vec![
            (
                "drill: 503 on the object",
                Rule::once("GET", OBJECT, SLOW_DOWN),
                Expect::Recovers,
            ),
            (
                "drill: the object cut after 2 MiB",
                Rule::once("GET", OBJECT, Fault::CutResponseAfter(2 << 20)),
                Expect::Recovers,
            ),
            (
                "drill: the object always cut",
                Rule::always("GET", OBJECT, Fault::CutResponseAfter(LASTING_CUT)),
                Expect::Fails(&["files.tar.zst"]),
            ),
            (
                "drill: the manifest always 503",
                Rule::always("GET", MANIFEST, SLOW_DOWN),
                Expect::Fails(&["SlowDown"]),
            ),
        ],
    )
    .await;
    // The next drill, with the faults gone, passes.
    let again = lifeboat(&rig.config, &run);
    assert_eq!(again.code, 0, "{}{}", again.stdout, again.stderr);
    again.assert_stdout_has("drill conf: PASS");
    rig.assert_whole("wal-push and drill").await;
    rig.print_table("wal-push and drill");
}

/// A tmpfs mounted at a path with `options` (`size=4m`, `ro`), unmounted when dropped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn process_faults_a_server_down_a_full_disk_a_read_only_target_lose_nothing() {
    let mut rig = Rig::start().await;
    lifeboat(&rig.config, &["backup", JOB]).assert_code(0);
    let backup = ["backup", JOB];

    // The S3 server is down for the whole run, then comes back.
    rig.stop_s3();
    let run = lifeboat(&rig.config, &backup);
    rig.judge("backup: the S3 server down", run, Expect::Fails(&["'s3'"]))
        .await;
    let into = rig.work.path().join("restored");
    let run = lifeboat(
        &rig.config,
        &["restore", JOB, "--into", into.to_str().unwrap()],
    );
    rig.judge("restore: the S3 server down", run, Expect::Fails(&["'s3'"]))
        .await;
    assert!(!into.exists());
    rig.restart_s3().await;
    rig.assert_whole("the S3 server back").await;
    lifeboat(&rig.config, &backup).assert_code(0);

    // The S3 server goes down mid-upload (each part slowed so that there is a middle).
    rig.proxy.set(vec![Rule::always(
        "PUT",
        UPLOAD_PART,
        Fault::Delay(Duration::from_millis(700)),
    )]);
    let before = rig.backup_ids();
    let parts_before = rig.proxy.count("PUT", UPLOAD_PART);
    let child = crate::common::lifeboat_command(&rig.config)
        .args(backup)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while rig.proxy.count("PUT", UPLOAD_PART) == parts_before
        && std::time::Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(5));
    }
    rig.stop_s3();
    let run = Run::from_output(child.wait_with_output().unwrap());
    rig.proxy.clear();
    rig.judge(
        "backup: the S3 server stopped mid-upload",
        run,
        Expect::Fails(&["files.tar.zst"]),
    )
    .await;
    rig.restart_s3().await;
    assert_eq!(rig.backup_ids(), before, "a backup was committed");
    rig.assert_whole("the S3 server back after a cut upload")
        .await;
    lifeboat(&rig.config, &backup).assert_code(0);

    // The restore disk fills up: 4 MiB for 12 MiB of files.
    let full = Tmpfs::mount(&rig.work.path().join("small"), "size=4m");
    let into = full.0.join("restored");
    let run = lifeboat(
        &rig.config,
        &["restore", JOB, "--into", into.to_str().unwrap()],
    );
    rig.judge(
        "restore: the disk fills up",
        run,
        Expect::Fails(&["unable to stage the restore in", "/small/restored'"]),
    )
    .await;
    assert_eq!(
        std::fs::read_dir(&full.0).unwrap().count(),
        0,
        "a failed restore left its staging or target behind"
    );
    drop(full);

    // A read-only target.
    let read_only = Tmpfs::mount(&rig.work.path().join("read-only"), "size=4m,ro");
    let into = read_only.0.join("restored");
    let run = lifeboat(
        &rig.config,
        &["restore", JOB, "--into", into.to_str().unwrap()],
    );
    rig.judge(
        "restore: a read-only target",
        run,
        Expect::Fails(&["Read-only file system"]),
    )
    .await;
    drop(read_only);

    // lifeboat itself killed mid-restore: the target holds only its staging, which the next
    // restore removes, saying so.
    rig.proxy.set(vec![Rule::always(
        "GET",
        OBJECT,
        Fault::Delay(Duration::from_millis(1_500)),
    )]);
    let into = rig.work.path().join("restored-after-kill");
    let child = crate::common::lifeboat_command(&rig.config)
        .args(["restore", JOB, "--into", into.to_str().unwrap()])
        .spawn()
        .unwrap();
    let proxy = &rig.proxy;
    let gets_before = proxy.count("GET", OBJECT);
    let second = std::cell::RefCell::new(None);
    let killed = crate::common::procs::kill_when(
        child,
        || {
            let downloading = proxy.count("GET", OBJECT) > gets_before;
            if downloading {
                // A second restore into the same directory meanwhile is refused.
                *second.borrow_mut() = Some(lifeboat(
                    &rig.config,
                    &["restore", JOB, "--into", into.to_str().unwrap()],
                ));
            }
            downloading
        },
        "restore",
    );
    rig.proxy.clear();
    assert!(killed, "the restore ended before it could be killed");
    let second = second.into_inner().unwrap();
    second.assert_code(1);
    second.assert_stderr_has("another restore into it is running");
    let left: Vec<String> = std::fs::read_dir(&into)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        left.len() == 1 && left[0].starts_with(".lifeboat-restore-"),
        "a killed restore left {left:?} in its target"
    );
    // What it staged is its user's alone.
    use std::os::unix::fs::MetadataExt;
    for entry in walkdir::WalkDir::new(into.join(&left[0])) {
        let entry = entry.unwrap();
        let mode = entry.metadata().unwrap().mode() & 0o777;
        let private = if entry.file_type().is_dir() {
            0o700
        } else {
            0o600
        };
        assert_eq!(mode & !private, 0, "{} is {mode:o}", entry.path().display());
    }
    let next = lifeboat(
        &rig.config,
        &["restore", JOB, "--into", into.to_str().unwrap()],
    );
    next.assert_code(0);
    let said = format!("removed '{}'", into.join(&left[0]).display());
    next.assert_stdout_has(&said);
    assert!(!into.join(&left[0]).exists());
    tree::assert_same(
        &rig.source,
        &into.join(rig.source.strip_prefix("/").unwrap()),
    );

    rig.assert_whole("process faults").await;
    rig.assert_every_backup_restores();
    rig.print_table("process faults");
}

/// A small deterministic generator for the kill moments; the seed is printed so that a failure
/// can be replayed.
struct Moments(u64);

impl Moments {
    fn next_below(&mut self, bound: u64) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (self.0 >> 33) % bound.max(1)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_backups_killed_at_random_moments_leave_every_committed_backup_whole() {
    let rig = Rig::start().await;
    let backup = ["backup", JOB];
    lifeboat(&rig.config, &backup).assert_code(0);
    // Kill moments spread over a whole backup: the middle of three timed here. The slowest
    // let one stall of this shared machine stretch the span until most kills came too late.
    let mut timings: Vec<u64> = (0..3)
        .map(|_| {
            let started = std::time::Instant::now();
            lifeboat(&rig.config, &backup).assert_code(0);
            started.elapsed().as_millis() as u64
        })
        .collect();
    timings.sort_unstable();
    let span = timings[1].max(50);
    let seed = std::env::var("LIFEBOAT_KILL_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
        });
    eprintln!("kill moments: seed {seed} (LIFEBOAT_KILL_SEED), over {span} ms");
    let mut moments = Moments(seed);
    let mut killed = 0;
    for _ in 0..20 {
        let mut child = crate::common::lifeboat_command(&rig.config)
            .args(backup)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(moments.next_below(span)));
        if child.try_wait().unwrap().is_none() {
            killed += 1;
        }
        child.kill().unwrap();
        child.wait().unwrap();
    }
    eprintln!("{killed} of 20 backups were killed before they ended");
    assert!(
        killed >= 10,
        "too few kills landed mid-backup: {killed} of 20"
    );
    lifeboat(&rig.config, &backup).assert_code(0);
    let prune = lifeboat(&rig.config, &["prune", "--grace", "1ms"]);
    prune.assert_code(0);
    assert_eq!(rig.s3.open_uploads(BUCKET).await, Vec::<String>::new());
    let verify = lifeboat(&rig.config, &["verify", JOB]);
    assert_eq!(verify.code, 0, "{}{}", verify.stdout, verify.stderr);
    // Every backup that committed — the two normal ones and any killed after its manifest —
    // restores byte-identical.
    let committed = rig.backup_ids().len();
    assert!(committed >= 5);
    eprintln!("{committed} committed backup(s) restore identical");
    rig.assert_every_backup_restores();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pg_basebackup_killed_midway_commits_nothing_and_the_committed_base_backup_stays_whole() {
    use crate::common::procs;
    use crate::postgres_physical::{BUCKET, JOB, archiving_cluster, shared_work_dir};
    let s3 = SeaweedFs::start().await;
    s3.create_bucket(BUCKET).await;
    let work = shared_work_dir();
    let (source, config) = archiving_cluster(work.path(), &[&s3], "");
    lifeboat(&config, &["backup", JOB]).assert_code(0);
    // Enough data that pg_basebackup is still streaming when it is killed.
    source.psql(
        "postgres",
        "create table filler as select g, repeat(md5(g::text), 8) as pad from generate_series(1, 300000) g",
    );
    let log_path = work.path().join("killed.log");
    let mut child = crate::common::lifeboat_command(&config)
        .args(["backup", JOB])
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log_path).unwrap())
        .spawn()
        .unwrap();
    let pid = procs::wait_for_descendant(&mut child, |argv| argv.contains("--pgdata=-"))
        .expect("pg_basebackup started");
    procs::wait_until_written(pid, 4 << 20);
    // SAFETY: kill(2) on the pid of a pg_basebackup this test saw lifeboat start.
    unsafe {
        libc::kill(pid as i32, libc::SIGKILL);
    }
    let status = child.wait().unwrap();
    let log = std::fs::read_to_string(&log_path).unwrap();
    assert_eq!(status.code(), Some(1), "{log}");
    assert!(log.contains("pg_basebackup"), "{log}");
    assert_eq!(
        s3.manifest_keys(BUCKET).await.len(),
        1,
        "the killed backup committed"
    );
    lifeboat(&config, &["prune", "--grace", "1ms"]).assert_code(0);
    assert_eq!(s3.open_uploads(BUCKET).await, Vec::<String>::new());
    // The base backup committed before is whole, and the next one works.
    lifeboat(&config, &["verify", JOB]).assert_code(0);
    lifeboat(&config, &["backup", JOB]).assert_code(0);
    assert_eq!(s3.manifest_keys(BUCKET).await.len(), 2);
    lifeboat(&config, &["verify", JOB]).assert_code(0);
}
