//! Restore drills against real servers: a drill restores into a scratch cluster from the
//! "dr" repository, checks the data, measures RTO and RPO (from the heartbeat), writes its
//! reports, and removes the scratch cluster, also when interrupted; failing checks and
//! targets fail the drill.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use crate::common::postgres::Postgres;
use crate::common::{Run, Scenario, lifeboat_command, procs, run_command};

fn drill(config: &Path, file: &Path, reports: &Path, tmp: &Path) -> Run {
    run_command(
        lifeboat_command(config)
            .env("TMPDIR", tmp)
            .args(["drill", "run"])
            .arg(file)
            .arg("--report-dir")
            .arg(reports),
    )
}

/// A TMPDIR for the drill under `work`. Scratch clusters are made there; as root they belong
/// to `postgres`, which must be able to reach them.
fn scratch_tmp(work: &Path) -> PathBuf {
    let tmp = work.join("tmp");
    std::fs::create_dir(&tmp).unwrap();
    std::fs::set_permissions(work, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o1777)).unwrap();
    tmp
}

/// The scratch clusters a drill leaves behind in `tmp` (none, when it cleans up).
fn leftovers(tmp: &Path) -> Vec<String> {
    std::fs::read_dir(tmp)
        .unwrap()
        .filter_map(Result::ok)
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|name| name.starts_with("lifeboat-drill-"))
        .collect()
}

fn report_json(reports: &Path) -> serde_json::Value {
    let newest = std::fs::read_dir(reports)
        .unwrap()
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .max_by_key(|p| std::fs::metadata(p).unwrap().modified().unwrap())
        .expect("a JSON report");
    serde_json::from_slice(&std::fs::read(newest).unwrap()).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drills_restore_check_measure_and_clean_up() {
    let source = Postgres::start();
    source.create_app_database(50_000);
    let work = tempfile::tempdir().unwrap();
    let tmp = scratch_tmp(work.path());
    let reports = work.path().join("reports");
    let password_file = source.password_file(work.path(), &source.password);
    let config = Scenario::new(work.path())
        .local("primary", &work.path().join("primary"))
        .local("dr", &work.path().join("dr"))
        .postgres_job(
            "maindb",
            &source.dsn("postgres"),
            &password_file,
            "databases = [\"app\"]\nheartbeat = true",
        )
        .write();
    crate::common::lifeboat(&config, &["backup", "maindb"]).assert_code(0);
    let heartbeat = source.psql(
        "app",
        "select extract(epoch from at) from lifeboat.heartbeat where job = 'maindb'",
    );
    let heartbeat: f64 = heartbeat.parse().unwrap();

    // Region loss: restore from "dr" into a scratch cluster; every check passes.
    let file = work.path().join("region-loss.toml");
    std::fs::write(
        &file,
        r#"name = "region-loss"
description = "The primary region is gone: restore the main database from dr."
job = "maindb"
from = "dr"
database = "app"

[[check]]
name = "orders are back"
sql = "select count(*) from shop.orders"
expect = ">= 50000"

[[check]]
name = "non-ASCII text survived"
sql = "select name from shop.customers where id = 1"
expect = "~ Ærøskøbing"
"#,
    )
    .unwrap();
    let run = drill(&config, &file, &reports, &tmp);
    run.assert_code(0);
    run.assert_stdout_has("drill region-loss: PASS");
    let report = report_json(&reports);
    assert_eq!(report["passed"], true);
    assert_eq!(report["repositories"], serde_json::json!(["dr"]));
    assert!(
        report["rpo_marker_source"]
            .as_str()
            .unwrap()
            .contains("heartbeat"),
        "{report}"
    );
    // RPO is t0 minus the restored heartbeat: the heartbeat's age at t0, within a second.
    let declared: chrono::DateTime<chrono::Utc> =
        report["declared_at"].as_str().unwrap().parse().unwrap();
    let age = declared.timestamp_micros() as f64 / 1e6 - heartbeat;
    let measured = report["rpo"]["measured_seconds"].as_f64().unwrap();
    assert!(
        (measured - age).abs() < 1.0,
        "RPO {measured} s, heartbeat age {age} s"
    );
    let markdown = std::fs::read_to_string(report["written"][1].as_str().unwrap()).unwrap();
    assert!(
        markdown.starts_with("# Drill region-loss: PASS"),
        "{markdown}"
    );
    assert!(markdown.contains("| RTO | 4h00m |"), "{markdown}");
    let html = std::fs::read_to_string(report["written"][2].as_str().unwrap()).unwrap();
    assert!(
        html.contains("<title>Drill region-loss: PASS</title>") && html.contains("<svg"),
        "{html}"
    );
    assert!(
        html.contains("load (pg_restore)"),
        "the timeline names the phases"
    );
    let phases: Vec<&str> = report["phases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        phases,
        [
            "find backup",
            "start target",
            "download and verify",
            "load (pg_restore)",
            "checks"
        ]
    );
    assert!(
        report["projection"]["rto_seconds"].as_f64().unwrap() > 0.0,
        "{report}"
    );
    assert!(leftovers(&tmp).is_empty(), "{:?}", leftovers(&tmp));

    // The report is kept with the backups, in every repository, and history lists it.
    assert_eq!(report["stored_in"], serde_json::json!(["primary", "dr"]));
    for repository in ["primary", "dr"] {
        let kept = work.path().join(repository).join("drills/region-loss");
        assert_eq!(
            std::fs::read_dir(&kept).unwrap().count(),
            1,
            "{}",
            kept.display()
        );
    }
    let history = crate::common::lifeboat(&config, &["drill", "history"]);
    history.assert_code(0);
    let line = history
        .stdout
        .lines()
        .find(|l| l.starts_with("region-loss"))
        .unwrap_or_else(|| panic!("{}", history.stdout));
    assert!(
        line.contains("PASS") && line.ends_with("primary,dr"),
        "{line}"
    );

    // Every region on its own: one report per repository holding the backup.
    let run = run_command(
        lifeboat_command(&config)
            .env("TMPDIR", &tmp)
            .args(["drill", "run", "--each-repository", "--format", "json"])
            .arg(&file)
            .arg("--report-dir")
            .arg(&reports),
    );
    run.assert_code(0);
    let each: serde_json::Value = serde_json::from_str(&run.stdout).unwrap();
    let sources: Vec<(&str, bool)> = each["reports"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["repositories"][0].as_str().unwrap(),
                r["passed"].as_bool().unwrap(),
            )
        })
        .collect();
    assert_eq!(sources, [("primary", true), ("dr", true)]);
    assert!(leftovers(&tmp).is_empty(), "{:?}", leftovers(&tmp));

    // A check that does not hold fails the drill and says what came back.
    let failing = work.path().join("failing.toml");
    std::fs::write(
        &failing,
        "name = \"too-many\"\njob = \"maindb\"\nexclude = [\"primary\"]\ndatabase = \"app\"\n\n[[check]]\nname = \"a million orders\"\nsql = \"select count(*) from shop.orders\"\nexpect = \">= 1000000\"\n",
    )
    .unwrap();
    let run = drill(&config, &failing, &reports, &tmp);
    run.assert_code(1);
    assert!(
        run.stdout
            .contains("FAIL check 'a million orders': expected >= 1000000, got 50000"),
        "{}",
        run.stdout
    );
    run.assert_stderr_has("drill 'too-many' failed");
    assert!(leftovers(&tmp).is_empty(), "{:?}", leftovers(&tmp));

    // A backup older than the RPO target fails on RPO, and says so.
    std::thread::sleep(std::time::Duration::from_millis(2100));
    let strict = work.path().join("strict.toml");
    std::fs::write(
        &strict,
        "name = \"strict\"\njob = \"maindb\"\ndatabase = \"app\"\nrpo = \"1s\"\n",
    )
    .unwrap();
    let run = drill(&config, &strict, &reports, &tmp);
    run.assert_code(1);
    assert!(
        run.stderr.contains("RPO") && run.stderr.contains("over the target 1.0s"),
        "{}",
        run.stderr
    );
    assert_eq!(report_json(&reports)["rpo"]["met"], false);
    let history = crate::common::lifeboat(&config, &["drill", "history", "--format", "json"]);
    history.assert_code(0);
    let history: serde_json::Value = serde_json::from_str(&history.stdout).unwrap();
    let verdicts: Vec<(&str, bool)> = history["rows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| (r["drill"].as_str().unwrap(), r["passed"].as_bool().unwrap()))
        .collect();
    assert_eq!(
        verdicts,
        [
            ("strict", false),
            ("too-many", false),
            ("region-loss", true),
            ("region-loss", true),
            ("region-loss", true)
        ],
        "newest first: the one from dr alone, the two from each repository"
    );

    // A malformed drill file: exit 2, naming the file, the line and the field.
    let bad = work.path().join("bad.toml");
    std::fs::write(
        &bad,
        "name = \"bad\"\njob = \"maindb\"\n\n[[check]]\nname = \"c\"\nsql = \"select 1\"\nexpect = \"roughly 1\"\n",
    )
    .unwrap();
    let run = drill(&config, &bad, &reports, &tmp);
    run.assert_code(2);
    run.assert_stderr_has(format!(
        "invalid drill file '{}', line 7: check[0].expect",
        bad.display()
    ));
}

/// Processes whose command line mentions `path`.
fn processes_mentioning(path: &Path) -> Vec<String> {
    let needle = path.to_string_lossy().into_owned();
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(Result::ok)
        .filter(|e| e.file_name().to_string_lossy().parse::<u32>().is_ok())
        .filter_map(|e| std::fs::read(e.path().join("cmdline")).ok())
        .map(|raw| String::from_utf8_lossy(&raw).replace('\0', " "))
        .filter(|argv| argv.contains(&needle))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_interrupted_drill_leaves_no_scratch_cluster_behind() {
    let source = Postgres::start();
    source.create_app_database(1_000_000);
    let work = tempfile::tempdir().unwrap();
    let tmp = scratch_tmp(work.path());
    let password_file = source.password_file(work.path(), &source.password);
    let config = Scenario::new(work.path())
        .local("local", &work.path().join("repo"))
        .postgres_job(
            "maindb",
            &source.dsn("postgres"),
            &password_file,
            "databases = [\"app\"]",
        )
        .write();
    crate::common::lifeboat(&config, &["backup", "maindb"]).assert_code(0);
    let file = work.path().join("interrupted.toml");
    std::fs::write(
        &file,
        "name = \"interrupted\"\njob = \"maindb\"\ndatabase = \"app\"\n\n[[check]]\nname = \"orders\"\nsql = \"select count(*) from shop.orders\"\nexpect = \">= 1\"\n",
    )
    .unwrap();
    let mut child = lifeboat_command(&config)
        .env("TMPDIR", &tmp)
        .args(["drill", "run"])
        .arg(&file)
        .arg("--report-dir")
        .arg(work.path().join("reports"))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Interrupt it while pg_restore is loading the scratch cluster.
    procs::wait_for_descendant(&mut child, |argv| argv.contains("pg_restore"))
        .expect("the drill reached pg_restore");
    std::thread::sleep(std::time::Duration::from_millis(300));
    assert!(
        !leftovers(&tmp).is_empty(),
        "the scratch cluster exists mid-drill"
    );
    // SAFETY: kill(2) on the lifeboat this test started.
    unsafe {
        libc::kill(child.id() as i32, libc::SIGINT);
    }
    let output = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(130), "{stderr}");
    assert!(stderr.contains("interrupted"), "{stderr}");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !processes_mentioning(&tmp).is_empty() && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    assert!(
        processes_mentioning(&tmp).is_empty(),
        "left running: {:?}",
        processes_mentioning(&tmp)
    );
    let left: Vec<_> = std::fs::read_dir(&tmp)
        .unwrap()
        .filter_map(Result::ok)
        .map(|e| e.file_name())
        .collect();
    assert!(left.is_empty(), "left in TMPDIR: {left:?}");

    // Killed (SIGKILL) while a check runs: the scratch server dies with it, and the next
    // drill removes the directory and names it.
    let slow = work.path().join("slow.toml");
    std::fs::write(
        &slow,
        "name = \"slow\"\njob = \"maindb\"\ndatabase = \"app\"\n\n[[check]]\nname = \"slow\"\nsql = \"select count(*) from pg_sleep(60)\"\nexpect = \">= 0\"\n",
    )
    .unwrap();
    let mut child = lifeboat_command(&config)
        .env("TMPDIR", &tmp)
        .args(["drill", "run"])
        .arg(&slow)
        .arg("--report-dir")
        .arg(work.path().join("reports"))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    procs::wait_for_descendant(&mut child, |argv| argv.contains("SELECT"))
        .expect("the drill reached its check");
    child.kill().unwrap();
    child.wait().unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !processes_mentioning(&tmp).is_empty() && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    assert!(
        processes_mentioning(&tmp).is_empty(),
        "left running after SIGKILL: {:?}",
        processes_mentioning(&tmp)
    );
    let left = leftovers(&tmp);
    assert_eq!(left.len(), 1, "{left:?}");
    let run = run_command(
        lifeboat_command(&config)
            .env("TMPDIR", &tmp)
            .args(["drill", "run"])
            .arg(&file)
            .arg("--report-dir")
            .arg(work.path().join("reports")),
    );
    run.assert_code(0);
    assert!(
        run.stderr
            .contains("of a drill that was stopped before it ended")
            && run.stderr.contains(&left[0]),
        "{}",
        run.stderr
    );
    assert!(leftovers(&tmp).is_empty(), "{:?}", leftovers(&tmp));
}

#[test]
fn a_files_drill_checks_the_restored_tree() {
    let work = tempfile::tempdir().unwrap();
    let source = work.path().join("etc/nginx");
    std::fs::create_dir_all(&source).unwrap();
    let config_text = "server { listen 80; }\n";
    std::fs::write(source.join("nginx.conf"), config_text).unwrap();
    let config = Scenario::new(work.path())
        .local("local", &work.path().join("repo"))
        .files_job("config", &[&source])
        .write();
    crate::common::lifeboat(&config, &["backup", "config"]).assert_code(0);
    let conf = source.join("nginx.conf");
    let sha = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(
        config_text.as_bytes(),
    ));
    let file = work.path().join("config-files.toml");
    let write_drill = |extra: &str| {
        std::fs::write(
            &file,
            format!(
                "name = \"config-files\"\njob = \"config\"\n\n[[check]]\nname = \"present\"\npath = \"{0}\"\nexists = true\n\n[[check]]\nname = \"intact\"\npath = \"{0}\"\nsha256 = \"{sha}\"\n\n[[check]]\nname = \"listens\"\npath = \"{0}\"\ncontains = \"listen 80\"\n{extra}",
                conf.display()
            ),
        )
        .unwrap();
    };
    let reports = work.path().join("reports");
    write_drill("");
    let run = run_command(
        lifeboat_command(&config)
            .args(["drill", "run"])
            .arg(&file)
            .arg("--report-dir")
            .arg(&reports),
    );
    run.assert_code(0);
    run.assert_stdout_has("drill config-files: PASS");

    write_drill(&format!(
        "\n[[check]]\nname = \"no stray file\"\npath = \"{}\"\nexists = true\n",
        source.join("missing.conf").display()
    ));
    let run = run_command(
        lifeboat_command(&config)
            .args(["drill", "run"])
            .arg(&file)
            .arg("--report-dir")
            .arg(&reports),
    );
    run.assert_code(1);
    assert!(
        run.stdout.contains("FAIL check 'no stray file'") && run.stdout.contains("got missing"),
        "{}",
        run.stdout
    );
}

/// A files drill measures its download and unpacking apart from the rest of its RTO: the
/// report's rates add up to the RTO, and `status` projects a larger newest backup from those
/// rates (start-up once, bytes at the measured rates), not from the drill's whole time. A
/// drill too small to measure a download rate projects nothing for a larger backup, and
/// `status` says so.
#[test]
fn a_drill_projects_a_larger_backup_from_its_rates() {
    let work = tempfile::tempdir().unwrap();
    let source = work.path().join("data");
    std::fs::create_dir_all(&source).unwrap();
    std::fs::write(source.join("small.conf"), "x = 1\n").unwrap();
    let config = Scenario::new(work.path())
        .local("local", &work.path().join("repo"))
        .files_job("data", &[&source])
        .write();
    let file = work.path().join("data.toml");
    std::fs::write(
        &file,
        format!(
            "name = \"data\"\njob = \"data\"\n\n[[check]]\nname = \"there\"\npath = \"{}\"\nexists = true\n",
            source.join("small.conf").display()
        ),
    )
    .unwrap();
    let reports = work.path().join("reports");
    let drill = || {
        let run = run_command(
            lifeboat_command(&config)
                .args(["drill", "run", "--format", "json", "--report-dir"])
                .arg(&reports)
                .arg(&file),
        );
        run.assert_code(0);
        let json: serde_json::Value = serde_json::from_str(&run.stdout).unwrap();
        json["reports"][0].clone()
    };
    let status = || {
        let run = crate::common::lifeboat(&config, &["status", "--format", "json"]);
        let json: serde_json::Value = serde_json::from_str(&run.stdout).unwrap();
        (run, json["jobs"][0].clone())
    };
    let grow = |name: &str, mib: usize, seed: u64| {
        std::fs::write(
            source.join(name),
            crate::common::tree::noise(mib << 20, seed),
        )
        .unwrap();
        crate::common::lifeboat(&config, &["backup", "data"]).assert_code(0);
    };

    // Too small to tell: no projection for a backup larger than the drill could tell about.
    crate::common::lifeboat(&config, &["backup", "data"]).assert_code(0);
    let tiny = drill();
    assert_eq!(
        tiny["projection"]["rates"]["stream_bytes_per_second"],
        serde_json::Value::Null,
        "{tiny}"
    );
    grow("large.bin", 12, 1);
    let (run, job) = status();
    assert_eq!(
        job["projected_rto_seconds"],
        serde_json::Value::Null,
        "{job}"
    );
    run.assert_stdout_has("too little to measure a download rate");

    // A drill of 12 MiB measures its rates, which with its fixed time make its RTO.
    let measured = drill();
    let rates = &measured["projection"]["rates"];
    let number = |value: &serde_json::Value| value.as_f64().unwrap_or_else(|| panic!("{measured}"));
    let (fixed, per_byte) = (
        number(&rates["fixed_seconds"]),
        number(&rates["per_byte_seconds"]),
    );
    let rto = number(&measured["rto"]["measured_seconds"]);
    assert!((fixed + per_byte - rto).abs() < 1e-6, "{measured}");
    let stream = number(&rates["stream_bytes_per_second"]);
    let unpack = number(&rates["unpack_bytes_per_second"]);

    // A newest backup four times as large: the fixed time once, the bytes at the rates.
    grow("larger.bin", 36, 2);
    let show = crate::common::lifeboat(
        &config,
        &["show", "latest", "--job", "data", "--format", "json"],
    );
    let manifest: serde_json::Value = serde_json::from_str(&show.stdout).unwrap();
    let total = |field: &str| -> f64 {
        manifest["objects"]
            .as_array()
            .unwrap()
            .iter()
            .map(|o| o[field].as_f64().unwrap())
            .sum()
    };
    let expected = fixed + (total("size") / stream).max(total("raw_size") / unpack);
    let (_, job) = status();
    let projected = number(&job["projected_rto_seconds"]);
    assert!(
        (projected - expected).abs() < 1e-6 * expected,
        "{projected} against {expected}: {job}"
    );
    let linear = rto / number(&measured["restored_bytes"]) * total("raw_size");
    assert!(
        projected < linear,
        "{projected} is the whole drill time scaled ({linear})"
    );
}

/// A drill with a DSN target: its checks run read-only (a check that writes fails and
/// writes nothing), the database it restored is dropped when it ends unless `keep = true`,
/// and a target that is the job's own source server is refused before anything is restored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drill_into_a_server_writes_nothing_with_its_checks_and_drops_what_it_restored() {
    let source = Postgres::start();
    source.create_app_database(50_000);
    let work = tempfile::tempdir().unwrap();
    let tmp = scratch_tmp(work.path());
    let reports = work.path().join("reports");
    let password_file = source.password_file(work.path(), &source.password);
    let config = Scenario::new(work.path())
        .local("primary", &work.path().join("primary"))
        .postgres_job(
            "maindb",
            &source.dsn("postgres"),
            &password_file,
            "databases = [\"app\"]",
        )
        .write();
    crate::common::lifeboat(&config, &["backup", "maindb"]).assert_code(0);
    let target = Postgres::start();
    target.psql(
        "postgres",
        "create role app_owner login; create role app_reader nologin",
    );
    let drill_file = |name: &str, dsn: &str, keep: bool| {
        let file = work.path().join(format!("{name}.toml"));
        std::fs::write(
            &file,
            format!(
                r#"name = "{name}"
job = "maindb"
database = "app"
target = "{dsn}"
keep = {keep}

[[check]]
name = "orders are back"
sql = "select count(*) from shop.orders"
expect = ">= 50000"

[[check]]
name = "a check that writes"
sql = "create table shop.written_by_a_check(); select 1"
expect = "= 1"

[[check]]
name = "a check that turns its transaction read-write"
sql = "set transaction read write"
expect = "non-empty"

[[check]]
name = "a check that turns the session read-write"
database = "postgres"
sql = "select set_config('default_transaction_read_only', 'off', false)"
expect = "non-empty"

[[check]]
name = "a check that commits, then writes"
database = "postgres"
sql = "commit; set transaction read write; create table public.written_by_a_check()"
expect = "non-empty"
"#
            ),
        )
        .unwrap();
        file
    };
    let run_against = |file: &Path, password: &str| {
        run_command(
            lifeboat_command(&config)
                .env("TMPDIR", &tmp)
                .env("PGPASSWORD", password)
                .args(["drill", "run"])
                .arg(file)
                .arg("--report-dir")
                .arg(&reports),
        )
    };
    let databases = |cluster: &Postgres| {
        cluster.psql(
            "postgres",
            "select count(*) from pg_database where datname = 'app'",
        )
    };

    // The writing check fails; the database restored for the drill is gone after it.
    let file = drill_file("into-server", &target.dsn("postgres"), false);
    let run = run_against(&file, &target.password);
    run.assert_code(1);
    let report = report_json(&reports);
    assert_eq!(report["checks"][0]["passed"], true, "{report}");
    assert_eq!(report["checks"][1]["passed"], false, "{report}");
    assert!(
        report["checks"][1]["returned"]
            .as_str()
            .unwrap()
            .contains("multiple commands"),
        "{report}"
    );
    assert_eq!(report["checks"][2]["passed"], false, "{report}");
    assert_eq!(report["checks"][4]["passed"], false, "{report}");
    assert_eq!(
        target.psql(
            "postgres",
            "select count(*) from pg_tables where tablename = 'written_by_a_check'"
        ),
        "0"
    );
    assert!(
        report["warnings"]
            .to_string()
            .contains("dropped the restored database 'app'"),
        "{report}"
    );
    assert_eq!(databases(&target), "0");

    // keep = true leaves it, without the check's table.
    let file = drill_file("into-server-kept", &target.dsn("postgres"), true);
    run_against(&file, &target.password).assert_code(1);
    assert_eq!(databases(&target), "1");
    assert_eq!(
        target.psql(
            "app",
            "select count(*) from pg_tables where tablename = 'written_by_a_check'"
        ),
        "0"
    );
    assert!(
        report_json(&reports)["warnings"]
            .to_string()
            .contains("kept the restored database(s) app"),
    );

    // Once more onto the kept database: refused in the drill's own terms (no restore flag
    // a drill file cannot set), and the database there stays as it is.
    let kept = target.data_fingerprint("app");
    let run = run_against(&file, &target.password);
    run.assert_code(1);
    assert!(
        run.stderr
            .contains("on its target, database 'app' exists already")
            && run.stderr.contains("drop 'app' on that server first")
            && !run.stderr.contains("--as")
            && !run.stderr.contains("--clean"),
        "{}",
        run.stderr
    );
    assert_eq!(target.data_fingerprint("app"), kept);
    // No table at all, but a large object and a function: refused as well, kept whole.
    target.psql("postgres", "drop database app");
    target.psql("postgres", "create database app");
    target.psql(
        "app",
        "select lo_from_bytea(424242, 'precious'); create function keep() returns int language sql as 'select 1'",
    );
    run_against(&file, &target.password).assert_code(1);
    assert_eq!(
        target.psql(
            "app",
            "select convert_from(lo_get(424242), 'UTF8') || keep()"
        ),
        "precious1"
    );

    // The job's own source is no drill target.
    let before = source.data_fingerprint("app");
    let file = drill_file("into-source", &source.dsn("postgres"), false);
    let run = run_against(&file, &source.password);
    run.assert_code(2);
    run.assert_stderr_has("it is the job's own source server");
    assert_eq!(source.data_fingerprint("app"), before);
    assert_eq!(databases(&source), "1");
}
