//! Drills that prove more than the newest point: `to_time = "random"` recovers to a moment
//! drawn from the restorable window (the heartbeat row restored must be at or before it, and
//! within the RPO of it), a seed draws its point again; `amcheck = true` runs pg_amcheck on
//! what was restored and fails naming the relation when a heap page is damaged.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use serde_json::Value;

use crate::common::{SeaweedFs, lifeboat};
use crate::postgres_physical::{BUCKET, JOB, archiving_cluster, shared_work_dir};

/// `drill run FILE --format json [ARGS]` with a TMPDIR the scratch cluster's user can use:
/// the first report.
fn drill(config: &Path, work: &Path, file: &Path, args: &[&str]) -> (i32, Value) {
    let tmp = work.join("tmp");
    if !tmp.exists() {
        std::fs::create_dir(&tmp).unwrap();
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o1777)).unwrap();
    }
    let run = crate::common::run_command(
        crate::common::lifeboat_command(config)
            .env("TMPDIR", &tmp)
            .args(["drill", "run", "--format", "json"])
            .arg(file)
            .arg("--report-dir")
            .arg(work.join("reports"))
            .args(args),
    );
    let reports: Value = serde_json::from_str(&run.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}\n{}", run.stdout, run.stderr));
    (run.code, reports["reports"][0].clone())
}

fn at(value: &Value) -> chrono::DateTime<chrono::Utc> {
    value.as_str().unwrap().parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_point_drills_recover_to_the_point_they_drew_and_a_seed_draws_it_again() {
    let region = SeaweedFs::start().await;
    region.create_bucket(BUCKET).await;
    let work = shared_work_dir();
    let (source, config) = archiving_cluster(work.path(), &[&region], "");
    source.psql("postgres", "create table events (id int primary key)");
    // A heartbeat every 5 s, and a WAL switch every 15 s, as a busy server archives.
    let beating = Arc::new(AtomicBool::new(true));
    let beats = {
        let (config, beating) = (config.clone(), beating.clone());
        std::thread::spawn(move || {
            while beating.load(Ordering::SeqCst) {
                lifeboat(&config, &["heartbeat", JOB]).assert_code(0);
                std::thread::sleep(std::time::Duration::from_secs(5));
            }
        })
    };
    lifeboat(&config, &["backup", JOB]).assert_code(0);
    for round in 0..6 {
        std::thread::sleep(std::time::Duration::from_secs(5));
        source.psql("postgres", &format!("insert into events values ({round})"));
        source.archive_current_wal();
        if round == 2 {
            lifeboat(&config, &["backup", JOB]).assert_code(0);
        }
    }
    let file = work.path().join("random.toml");
    std::fs::write(
        &file,
        format!(
            "name = \"random\"\njob = \"{JOB}\"\nto_time = \"random\"\nrpo = \"30s\"\n\n[[check]]\nname = \"events\"\nsql = \"select count(*) from events\"\nexpect = \">= 0\"\n"
        ),
    )
    .unwrap();
    let mut points = Vec::new();
    for seed in 1..=5u64 {
        let (code, report) = drill(&config, work.path(), &file, &["--seed", &seed.to_string()]);
        assert_eq!(code, 0, "seed {seed}: {report}");
        let draw = &report["random"];
        assert_eq!(draw["seed"], seed, "{report}");
        let point = at(&draw["to_time"]);
        assert!(
            at(&draw["window_from"]) <= point && point < at(&draw["window_to"]),
            "{draw}"
        );
        // Recovered to the point: the newest heartbeat is at or before it, within the RPO.
        let marker = at(&report["rpo_marker"]);
        assert!(
            marker <= point,
            "seed {seed}: marker {marker} after {point}"
        );
        assert!(
            report["rpo"]["measured_seconds"].as_f64().unwrap() <= 30.0,
            "{report}"
        );
        assert!(
            report["rpo_marker_source"]
                .as_str()
                .unwrap()
                .contains("heartbeat"),
            "{report}"
        );
        assert!(
            report["checks"]
                .as_array()
                .unwrap()
                .iter()
                .any(|c| c["name"] == "recovered to the moment, not past it" && c["passed"] == true),
            "{report}"
        );
        points.push(point);
    }
    points.dedup();
    assert!(points.len() > 1, "five seeds drew one point: {points:?}");

    // With nothing archived meanwhile, a seed draws its point again.
    beating.store(false, Ordering::SeqCst);
    beats.join().unwrap();
    source.psql("postgres", "alter system set archive_timeout = 0");
    source.psql("postgres", "select pg_reload_conf()");
    source.archive_current_wal();
    let (_, first) = drill(&config, work.path(), &file, &["--seed", "42"]);
    let (_, again) = drill(&config, work.path(), &file, &["--seed", "42"]);
    assert_eq!(first["random"], again["random"]);
    assert_eq!(first["passed"], true, "{first}");
    let text = crate::common::run_command(
        crate::common::lifeboat_command(&config)
            .env("TMPDIR", work.path().join("tmp"))
            .args(["drill", "run"])
            .arg(&file)
            .args(["--seed", "42", "--report-dir"])
            .arg(work.path().join("reports")),
    );
    text.assert_code(0);
    text.assert_stdout_has("random draw (seed 42) in the window of repository 'region1', ");
    text.assert_stdout_has(format!(
        ": recovery to {}",
        at(&first["random"]["to_time"]).format("%Y-%m-%d %H:%M:%S%.3f UTC")
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_amcheck_drill_passes_a_healthy_restore_and_names_a_damaged_heap_page() {
    let region = SeaweedFs::start().await;
    region.create_bucket(BUCKET).await;
    let work = shared_work_dir();
    let (source, config) = archiving_cluster(work.path(), &[&region], "");
    source.psql(
        "postgres",
        "create table victim as select i as id, repeat('x', 100) as pad from generate_series(1, 500) i",
    );
    source.psql("postgres", "create index on victim (id)");
    lifeboat(&config, &["backup", JOB]).assert_code(0);
    let file = work.path().join("amcheck.toml");
    std::fs::write(
        &file,
        format!(
            "name = \"amcheck\"\njob = \"{JOB}\"\namcheck = true\n\n[[check]]\nname = \"rows\"\nsql = \"select count(*) from victim\"\nexpect = \"= 500\"\n"
        ),
    )
    .unwrap();
    let (code, healthy) = drill(&config, work.path(), &file, &[]);
    assert_eq!(code, 0, "{healthy}");
    let phases: Vec<&str> = healthy["phases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap())
        .collect();
    assert!(phases.contains(&"amcheck"), "{phases:?}");
    assert!(
        healthy["checks"]
            .as_array()
            .unwrap()
            .iter()
            .any(|c| c["name"] == "amcheck" && c["passed"] == true),
        "{healthy}"
    );

    // The first line pointers of the table's first page overwritten on disk after a
    // checkpoint (the page is clean in shared buffers, so the next base backup copies the
    // damage as it is): each a used item at offset 8180, 100 bytes long, past the page's end.
    source.psql("postgres", "checkpoint");
    let relative = source.psql("postgres", "select pg_relation_filepath('victim')");
    let data_dir = Path::new(&source.psql("postgres", "show data_directory")).to_path_buf();
    let heap = data_dir.join(relative);
    let mut page = std::fs::read(&heap).unwrap();
    let item: u32 = 8180 | (1 << 15) | (100 << 17);
    for pointer in page[24..40].chunks_mut(4) {
        pointer.copy_from_slice(&item.to_le_bytes());
    }
    std::fs::write(&heap, &page).unwrap();
    lifeboat(&config, &["backup", JOB]).assert_code(0);
    let (code, damaged) = drill(&config, work.path(), &file, &[]);
    assert_eq!(code, 1, "{damaged}");
    assert_eq!(damaged["passed"], false);
    let failed: Vec<&Value> = damaged["checks"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["name"] == "amcheck" && c["passed"] == false)
        .collect();
    assert!(
        failed.iter().any(|c| {
            let returned = c["returned"].as_str().unwrap();
            returned.contains("heap table \"postgres.public.victim\", block 0")
        }),
        "{damaged}"
    );
}
