//! Secrets hygiene over a whole run: every command lifeboat has, at the most verbose log
//! level and in both log formats, against real servers with passwords, S3 credentials and an
//! age identity — and not one of those secrets in any log line, report, manifest, metrics
//! file, stored file, or in the argv of any child process.

use std::path::{Path, PathBuf};
use std::process::Stdio;

use crate::common::postgres::Postgres;
use crate::common::redis::{PASSWORD as REDIS_PASSWORD, Redis};
use crate::common::{
    SeaweedFs, files_job, lifeboat_command, local_repository, postgres_job, procs, seaweedfs,
    write_config, write_secret,
};

/// Everything one command printed, and the argv of every process it started.
struct Seen {
    output: String,
    argvs: Vec<String>,
    code: i32,
}

fn run_watched(config: &Path, env: &[(&str, &str)], args: &[&str]) -> Seen {
    let dir = tempfile::tempdir().unwrap();
    let (out, err) = (dir.path().join("out"), dir.path().join("err"));
    let mut command = lifeboat_command(config);
    for (name, value) in env {
        command.env(name, value);
    }
    let child = command
        .args(args)
        .stdout(std::fs::File::create(&out).unwrap())
        .stderr(std::fs::File::create(&err).unwrap())
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    let (argvs, status) = procs::watch(child);
    // The arguments are not part of the output: one of them carries a password on purpose.
    Seen {
        output: format!(
            "{}{}",
            std::fs::read_to_string(&out).unwrap(),
            std::fs::read_to_string(&err).unwrap()
        ),
        argvs: argvs.into_values().collect(),
        code: status.code().unwrap_or(-1),
    }
}

/// Every file under `dir`, with its bytes.
fn files_under(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut found = Vec::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(next) = pending.pop() {
        for entry in std::fs::read_dir(&next).into_iter().flatten().flatten() {
            let path = entry.path();
            if path.is_dir() {
                pending.push(path);
            } else if let Ok(bytes) = std::fs::read(&path) {
                found.push((path, bytes));
            }
        }
    }
    found
}

fn contains(haystack: &[u8], needle: &str) -> bool {
    haystack
        .windows(needle.len())
        .any(|window| window == needle.as_bytes())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_secret_reaches_a_log_line_a_report_a_stored_file_or_a_childs_argv() {
    let s3 = SeaweedFs::start().await;
    s3.create_bucket("backups").await;
    let source = Postgres::start();
    source.create_app_database(50_000);
    let target = Postgres::start();
    let redis = Redis::start(&[]);
    let work = tempfile::tempdir().unwrap();
    let identity = work.path().join("restore.key");
    let keygen = run_watched(
        &work.path().join("none.toml"),
        &[],
        &["keygen", "--output", identity.to_str().unwrap()],
    );
    assert_eq!(keygen.code, 0, "{}", keygen.output);
    let recipient = keygen
        .output
        .lines()
        .find(|l| l.starts_with("age1"))
        .unwrap();
    let identity_secret = std::fs::read_to_string(&identity)
        .unwrap()
        .lines()
        .find(|l| l.starts_with("AGE-SECRET-KEY-"))
        .unwrap()
        .to_string();
    let pg_password = source.password_file(work.path(), &source.password);
    let redis_password = work.path().join("redis.pass");
    write_secret(&redis_password, REDIS_PASSWORD, 0o600);
    let conf_dir = work.path().join("etc-app");
    std::fs::create_dir(&conf_dir).unwrap();
    std::fs::write(conf_dir.join("app.conf"), "listen 8080\n").unwrap();
    let metrics = work.path().join("metrics");
    let repo = work.path().join("repo");
    let config_text = |pg_password: &Path| {
        format!(
            "metrics_dir = \"{}\"\nlock = \"{}\"\nlock_password_file = \"{}\"\n\n[encryption]\nrecipients = [\"{recipient}\"]\nidentity_file = \"{}\"\n\n{}{}{}{}[[job]]\nname = \"sessions\"\nkind = \"redis\"\nurl = \"{}\"\npassword_file = \"{}\"\n",
            metrics.display(),
            redis.url(),
            redis_password.display(),
            identity.display(),
            local_repository("local", &repo),
            s3.repository("s3", "backups", "lifeboat"),
            files_job("conf", &[&conf_dir]),
            postgres_job(
                "maindb",
                &source.dsn("postgres"),
                pg_password,
                "heartbeat = true"
            ),
            redis.url(),
            redis_password.display()
        )
    };
    let config = write_config(work.path(), &config_text(&pg_password));
    let reports = work.path().join("reports");
    let drill = work.path().join("maindb.toml");
    std::fs::write(
        &drill,
        "name = \"maindb-scratch\"\njob = \"maindb\"\ndatabase = \"app\"\n\n[[check]]\nname = \"orders\"\nsql = \"select count(*) from shop.orders\"\nexpect = \">= 50000\"\n",
    )
    .unwrap();
    let target_dsn = target.dsn("postgres");
    let encoded_password = target.password.replace('\\', "%5C").replace(':', "%3A");
    let with_password =
        target_dsn.replacen("postgres@", &format!("postgres:{encoded_password}@"), 1);

    let target_env = [("PGPASSWORD", target.password.as_str())];
    let mut seen = Vec::new();
    let none: &[(&str, &str)] = &[];
    for (env, args, code) in [
        (none, vec!["-vv", "check"], Some(0)),
        (none, vec!["-vv", "backup", "maindb"], Some(0)),
        (
            none,
            vec!["-vv", "--log-format", "json", "backup", "sessions"],
            Some(0),
        ),
        (none, vec!["-vv", "backup", "conf"], Some(0)),
        (none, vec!["-vv", "list"], Some(0)),
        (none, vec!["-vv", "verify", "--deep"], Some(0)),
        (none, vec!["-vv", "replicate", "--verify"], Some(0)),
        (
            &target_env[..],
            vec![
                "-vv",
                "restore",
                "maindb",
                "--globals",
                "--target",
                &target_dsn,
            ],
            Some(0),
        ),
        // The same again: the databases exist now, so it fails, and says so without secrets.
        (
            &target_env[..],
            vec![
                "-vv",
                "--log-format",
                "json",
                "restore",
                "maindb",
                "--target",
                &target_dsn,
            ],
            Some(1),
        ),
        (
            none,
            vec!["-vv", "restore", "maindb", "--target", &with_password],
            Some(2),
        ),
        (
            none,
            vec![
                "-vv",
                "drill",
                "run",
                drill.to_str().unwrap(),
                "--report-dir",
                reports.to_str().unwrap(),
            ],
            Some(0),
        ),
        // WARNING or OK, depending on which jobs have a drill: what it prints is the point.
        (none, vec!["-vv", "status"], None),
        (none, vec!["-vv", "prune", "--dry-run"], Some(0)),
        (none, vec!["-vv", "rekey", "--dry-run"], Some(0)),
    ] {
        let run = run_watched(&config, env, &args);
        if let Some(code) = code {
            assert_eq!(
                run.code,
                code,
                "lifeboat {}:\n{}",
                args[1..]
                    .join(" ")
                    .replace(&with_password, "DSN-WITH-PASSWORD"),
                run.output
            );
        }
        seen.push(run);
    }
    assert!(
        seen.iter()
            .flat_map(|s| &s.argvs)
            .any(|argv| argv.contains("pg_dump")),
        "the children were watched"
    );

    // A wrong password is a secret too: the failure names the file, not its content.
    let wrong = "wr0ng-Secret-Passw0rd";
    let wrong_file = work.path().join("wrong.pass");
    write_secret(&wrong_file, wrong, 0o600);
    let wrong_config_dir = work.path().join("wrong");
    std::fs::create_dir(&wrong_config_dir).unwrap();
    let wrong_config = write_config(&wrong_config_dir, &config_text(&wrong_file));
    let failed = run_watched(&wrong_config, &[], &["-vv", "backup", "maindb"]);
    assert_eq!(failed.code, 1, "{}", failed.output);
    assert!(failed.output.contains("password"), "{}", failed.output);
    seen.push(failed);

    let secrets = [
        ("the source's PostgreSQL password", source.password.clone()),
        ("the target's PostgreSQL password", target.password.clone()),
        (
            "the target's PostgreSQL password, as written in a DSN",
            encoded_password.clone(),
        ),
        ("the Redis password", REDIS_PASSWORD.to_string()),
        ("the S3 secret key", seaweedfs::SECRET_KEY.to_string()),
        ("the age identity", identity_secret.clone()),
        ("a wrong password", wrong.to_string()),
    ];
    let mut written = files_under(&repo);
    written.extend(files_under(&reports));
    written.extend(files_under(&metrics));
    assert!(
        written.iter().any(|(p, _)| p.ends_with("manifest.json"))
            && written
                .iter()
                .any(|(p, _)| p.extension().is_some_and(|e| e == "html"))
            && written
                .iter()
                .any(|(p, _)| p.extension().is_some_and(|e| e == "prom")),
        "manifests, drill reports and metrics were written"
    );
    for (what, secret) in &secrets {
        for run in &seen {
            assert!(
                !run.output.contains(secret.as_str()),
                "{what} is in the output of:\n{}",
                run.output
            );
            for argv in &run.argvs {
                assert!(
                    !argv.contains(secret.as_str()),
                    "{what} is in a child's argv: {argv}"
                );
            }
        }
        for (path, bytes) in &written {
            assert!(!contains(bytes, secret), "{what} is in {}", path.display());
        }
    }
}
