//! age encryption against real servers: files, PostgreSQL (logical, and physical with its
//! WAL) and Redis backups stored as `age(zstd(raw))`, restored byte-identical with the
//! right key, refused with a wrong one before anything is written, and readable with the
//! standard `age` and `zstd` tools alone.

use std::collections::BTreeSet;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use sha2::{Digest, Sha256};

use crate::common::postgres::{Postgres, free_port};
use crate::common::redis::Redis;
use crate::common::{
    Run, Scenario, SeaweedFs, files_job, lifeboat, lifeboat_command, local_repository,
    postgres_job, procs, run_command, tree, write_config, write_secret,
};
use crate::postgres_physical::{JOB as PHYSICAL_JOB, Restored, archiving_cluster, shared_work_dir};

const BUCKET: &str = "backups";
const PREFIX: &str = "lifeboat";

/// `lifeboat keygen --output DIR/NAME`: the identity's path and its recipient.
fn keygen(dir: &Path, name: &str) -> (PathBuf, String) {
    let path = dir.join(name);
    let run = lifeboat(
        &dir.join("unused.toml"),
        &["keygen", "--output", path.to_str().unwrap()],
    );
    run.assert_code(0);
    (path, run.stdout.trim().to_string())
}

/// Runs lifeboat with `LIFEBOAT_IDENTITY_FILE` set to `identity`.
fn with_identity(config: &Path, identity: &Path, args: &[&str]) -> Run {
    let mut command = lifeboat_command(config);
    command.env("LIFEBOAT_IDENTITY_FILE", identity).args(args);
    run_command(&mut command)
}

fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// `age -d -i IDENTITY < stored | zstd -d`, as the runbook for "lifeboat is unavailable"
/// does it: the raw stream, from standard tools alone.
fn standard_tools_decode(stored: &[u8], identity: &Path) -> Vec<u8> {
    let mut age = Command::new("age")
        .args(["-d", "-i"])
        .arg(identity)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("the age tool is installed by .ci/setup");
    let zstd = Command::new("zstd")
        .args(["-d", "-c"])
        .stdin(age.stdout.take().unwrap())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = age.stdin.take().unwrap();
    let input = stored.to_vec();
    let feeder = std::thread::spawn(move || stdin.write_all(&input));
    let output = zstd.wait_with_output().unwrap();
    feeder.join().unwrap().unwrap();
    assert!(age.wait().unwrap().success(), "age -d failed");
    assert!(output.status.success(), "zstd -d failed");
    output.stdout
}

fn manifest(config: &Path, job: &str) -> serde_json::Value {
    let show = lifeboat(
        config,
        &["show", "latest", "--job", job, "--format", "json"],
    );
    show.assert_code(0);
    serde_json::from_str(&show.stdout).unwrap()
}

/// Every object of `job`'s newest backup is an age file to exactly `recipients`, which zstd
/// alone cannot read, and which `age -d | zstd -d` turns back into the raw stream.
async fn assert_sealed(
    s3: &SeaweedFs,
    config: &Path,
    job: &str,
    recipients: &[&str],
    escrow: &Path,
) -> serde_json::Value {
    let manifest = manifest(config, job);
    let objects = manifest["objects"].as_array().unwrap();
    assert!(!objects.is_empty());
    for object in objects {
        let name = object["name"].as_str().unwrap();
        assert!(name.ends_with(".zst.age"), "{object}");
        assert_eq!(object["encryption"], "age");
        assert_eq!(object["recipients"], serde_json::json!(recipients));
        let key = format!(
            "{PREFIX}/jobs/{job}/backups/{}/{name}",
            manifest["id"].as_str().unwrap()
        );
        let stored = s3.object(BUCKET, &key).await;
        assert!(stored.starts_with(b"age-encryption.org/v1\n"), "{key}");
        assert_eq!(sha256_hex(&stored), object["sha256"].as_str().unwrap());
        assert!(
            zstd::decode_all(&stored[..]).is_err(),
            "zstd alone read {key}"
        );
        let raw = standard_tools_decode(&stored, escrow);
        assert_eq!(raw.len() as u64, object["raw_size"].as_u64().unwrap());
        assert_eq!(
            sha256_hex(&raw),
            object["raw_sha256"].as_str().unwrap(),
            "{key}"
        );
    }
    manifest
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn encrypted_files_postgres_and_redis_backups_restore_only_with_a_recipients_key() {
    let s3 = SeaweedFs::start().await;
    s3.create_bucket(BUCKET).await;
    let source = Postgres::start();
    source.create_app_database(50_000);
    let redis = Redis::start(&[]);
    let mut connection = redis.connection().unwrap();
    let mut pipe = redis::pipe();
    for index in 0..2_000 {
        pipe.cmd("SET")
            .arg(format!("session:{index}"))
            .arg(format!("user-{index}"))
            .ignore();
    }
    let () = pipe.query(&mut connection).unwrap();
    let work = tempfile::tempdir().unwrap();
    let (ops, ops_recipient) = keygen(work.path(), "ops.key");
    let (escrow, escrow_recipient) = keygen(work.path(), "escrow.key");
    let (stranger, _) = keygen(work.path(), "stranger.key");
    std::fs::write(
        work.path().join("escrow.pub"),
        format!("# the offline escrow key, in the safe\n{escrow_recipient}\n"),
    )
    .unwrap();
    let tree_root = work.path().join("etc-app");
    tree::build(&tree_root, 60, 2);
    let marker = tree_root.join("escrow-check.conf");
    std::fs::write(&marker, "listen 443;\n").unwrap();
    let pg_password = source.password_file(work.path(), &source.password);
    let redis_password = work.path().join("redis.pass");
    write_secret(&redis_password, crate::common::redis::PASSWORD, 0o600);
    let config = write_config(
        work.path(),
        &format!(
            "[encryption]\nrecipients = [\"{ops_recipient}\"]\nrecipients_file = \"escrow.pub\"\n\n{}{}{}{}[[job]]\nname = \"sessions\"\nkind = \"redis\"\nurl = \"{}\"\npassword_file = \"{}\"\n",
            s3.repository("s3", BUCKET, PREFIX),
            local_repository("local", &work.path().join("repo")),
            files_job("conf", &[&tree_root]),
            postgres_job("maindb", &source.dsn("postgres"), &pg_password, ""),
            redis.url(),
            redis_password.display()
        ),
    );
    let recipients = [ops_recipient.as_str(), escrow_recipient.as_str()];

    // `check` finds a restore key that matches no recipient before a restore needs it.
    let checked = with_identity(&config, &ops, &["check"]);
    checked.assert_code(0);
    assert!(
        checked.stdout.contains("encrypting to 2 recipient(s)")
            && checked.stdout.contains("opens what is encrypted to them"),
        "{}",
        checked.stdout
    );
    let mismatched = with_identity(&config, &stranger, &["check"]);
    mismatched.assert_code(1);
    mismatched.assert_stdout_has("matches none of the recipients");

    // Backing up needs no identity at all: the backup host holds public keys only.
    for job in ["conf", "maindb", "sessions"] {
        lifeboat(&config, &["backup", job]).assert_code(0);
    }
    let conf = assert_sealed(&s3, &config, "conf", &recipients, &escrow).await;
    assert_sealed(&s3, &config, "maindb", &recipients, &escrow).await;
    let sessions = assert_sealed(&s3, &config, "sessions", &recipients, &escrow).await;

    // Files: a stranger's key, no key, and a key others can read are refused before the
    // target exists; the ops key restores the tree exactly.
    let into = work.path().join("restored-conf");
    let into_arg = into.to_str().unwrap();
    let wrong = with_identity(&config, &stranger, &["restore", "conf", "--into", into_arg]);
    wrong.assert_code(1);
    let object_key = format!(
        "jobs/conf/backups/{}/files.tar.zst.age",
        conf["id"].as_str().unwrap()
    );
    assert!(
        wrong
            .stderr
            .contains(&format!("unable to decrypt object '{object_key}'"))
            && wrong
                .stderr
                .contains("does not match any recipient it was encrypted to"),
        "{}",
        wrong.stderr
    );
    wrong.assert_stderr_has(&escrow_recipient);
    assert!(!into.exists(), "a refused restore created its target");
    let keyless = lifeboat(&config, &["restore", "conf", "--into", into_arg]);
    keyless.assert_code(1);
    assert!(
        keyless.stderr.contains("no identity file is configured")
            && keyless.stderr.contains("LIFEBOAT_IDENTITY_FILE"),
        "{}",
        keyless.stderr
    );
    let exposed = work.path().join("exposed.key");
    std::fs::copy(&ops, &exposed).unwrap();
    std::fs::set_permissions(&exposed, std::fs::Permissions::from_mode(0o644)).unwrap();
    let readable = with_identity(&config, &exposed, &["restore", "conf", "--into", into_arg]);
    readable.assert_code(2);
    assert!(
        readable.stderr.contains("readable by group or others")
            && readable.stderr.contains("chmod 600"),
        "{}",
        readable.stderr
    );
    assert!(!into.exists());
    with_identity(&config, &ops, &["restore", "conf", "--into", into_arg]).assert_code(0);
    tree::assert_same(&tree_root, &into.join(tree_root.strip_prefix("/").unwrap()));

    // PostgreSQL: the wrong key creates no database on the target; the escrow key alone
    // restores every row.
    let target = Postgres::start();
    let mut wrong_pg = lifeboat_command(&config);
    wrong_pg
        .env("PGPASSWORD", &target.password)
        .env("LIFEBOAT_IDENTITY_FILE", &stranger)
        .args(["restore", "maindb", "--target", &target.dsn("postgres")]);
    run_command(&mut wrong_pg).assert_code(1);
    assert_eq!(
        target.psql(
            "postgres",
            "select count(*) from pg_database where datname = 'app'"
        ),
        "0"
    );
    let mut restore_pg = lifeboat_command(&config);
    restore_pg
        .env("PGPASSWORD", &target.password)
        .env("LIFEBOAT_IDENTITY_FILE", &escrow)
        .args([
            "restore",
            "maindb",
            "--globals",
            "--target",
            &target.dsn("postgres"),
        ]);
    run_command(&mut restore_pg).assert_code(0);
    assert_eq!(
        target.data_fingerprint("app"),
        source.data_fingerprint("app")
    );

    // Redis: the RDB restored as a file is the one backed up, byte for byte.
    let rdb = work.path().join("restored.rdb");
    with_identity(
        &config,
        &ops,
        &["restore", "sessions", "--into", rdb.to_str().unwrap()],
    )
    .assert_code(0);
    let restored = std::fs::read(&rdb).unwrap();
    assert_eq!(
        sha256_hex(&restored),
        sessions["objects"][0]["raw_sha256"].as_str().unwrap()
    );

    // The key-escrow drill: the escrow key alone, from the S3 region alone, even with a
    // stranger's key in the environment; and a drill with the wrong key fails.
    let drill = |name: &str, key: &str| {
        let file = work.path().join(format!("{name}.toml"));
        std::fs::write(
            &file,
            format!(
                "name = \"{name}\"\njob = \"conf\"\nfrom = \"s3\"\nidentity_file = \"{key}\"\n\n[[check]]\nname = \"intact\"\npath = \"{}\"\nsha256 = \"{}\"\n",
                marker.display(),
                sha256_hex(b"listen 443;\n")
            ),
        )
        .unwrap();
        let mut command = lifeboat_command(&config);
        command
            .env("LIFEBOAT_IDENTITY_FILE", &stranger)
            .args(["drill", "run"])
            .arg(&file)
            .arg("--report-dir")
            .arg(work.path().join("reports"));
        run_command(&mut command)
    };
    let escrow_drill = drill("escrow-key", "escrow.key");
    escrow_drill.assert_code(0);
    escrow_drill.assert_stdout_has("drill escrow-key: PASS");
    let wrong_drill = drill("wrong-key", "stranger.key");
    wrong_drill.assert_code(1);
    assert!(
        format!("{}{}", wrong_drill.stdout, wrong_drill.stderr)
            .contains("does not match any recipient"),
        "{}\n{}",
        wrong_drill.stdout,
        wrong_drill.stderr
    );

    // verify: without a key the stored checksums, and it says so; --deep insists on a key;
    // with one it decrypts; a byte flipped in the ciphertext is found without any key.
    let shallow = lifeboat(&config, &["verify", "conf"]);
    shallow.assert_code(0);
    assert!(
        shallow
            .stdout
            .contains("checked by their stored sha256 only"),
        "{}",
        shallow.stdout
    );
    let deep_keyless = lifeboat(&config, &["verify", "conf", "--deep"]);
    deep_keyless.assert_code(1);
    assert!(
        deep_keyless
            .stderr
            .contains("no identity file is configured"),
        "{}",
        deep_keyless.stderr
    );
    let deep = with_identity(&config, &ops, &["verify", "--deep"]);
    deep.assert_code(0);
    assert!(
        !deep.stdout.contains("stored sha256 only"),
        "{}",
        deep.stdout
    );
    let local_object = work.path().join("repo").join(&object_key);
    let mut damaged = std::fs::read(&local_object).unwrap();
    let middle = damaged.len() / 2;
    damaged[middle] ^= 0x01;
    std::fs::write(&local_object, damaged).unwrap();
    let found = lifeboat(&config, &["verify", "conf", "--from", "local"]);
    found.assert_code(1);
    found.assert_stdout_has("DAMAGED");
}

/// The `lifeboat-wal` note in an encrypted WAL object's header: its raw sha256.
fn wal_note_sha(stored: &[u8]) -> String {
    let header = String::from_utf8_lossy(&stored[..stored.len().min(4096)]);
    let line = header
        .lines()
        .find(|l| l.starts_with("-> lifeboat-wal "))
        .expect("an encrypted segment carries lifeboat's note");
    line.split(' ').nth(2).unwrap().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_encrypted_physical_backup_and_its_wal_replay_with_the_key_and_only_with_it() {
    let region = SeaweedFs::start().await;
    region.create_bucket(BUCKET).await;
    let work = shared_work_dir();
    let (identity, recipient) = keygen(work.path(), "restore.key");
    let (stranger, _) = keygen(work.path(), "stranger.key");
    // The restored server runs wal-fetch as postgres: the key must be postgres's own.
    let chown = Command::new("chown")
        .args(["postgres"])
        .arg(&identity)
        .status()
        .unwrap();
    assert!(chown.success());
    let (source, config) = archiving_cluster(
        work.path(),
        &[&region],
        &format!("[encryption]\nrecipients = [\"{recipient}\"]\n\n"),
    );
    source.psql("postgres", "create table events (id int primary key)");
    source.psql(
        "postgres",
        "insert into events select generate_series(1, 1000)",
    );
    lifeboat(&config, &["backup", PHYSICAL_JOB]).assert_code(0);
    source.psql(
        "postgres",
        "insert into events select generate_series(1001, 2000)",
    );
    source.archive_current_wal();

    // Segments are sealed and carry their raw sha256; history files stay zstd.
    let wal = region
        .keys(BUCKET, &format!("{PREFIX}/jobs/{PHYSICAL_JOB}/wal/"))
        .await;
    let segments: Vec<&String> = wal.iter().filter(|k| k.ends_with(".zst.age")).collect();
    assert!(segments.len() >= 2, "{wal:?}");
    assert!(
        wal.iter()
            .filter(|k| !k.ends_with(".zst.age"))
            .all(|k| k.ends_with(".backup.zst") || k.ends_with(".history.zst")),
        "{wal:?}"
    );
    let segment_key = segments[0];
    let stored = region.object(BUCKET, segment_key).await;
    let raw = standard_tools_decode(&stored, &identity);
    assert_eq!(raw.len(), 16 << 20);
    assert_eq!(wal_note_sha(&stored), sha256_hex(&raw));

    // wal-push of the same segment again (no key on this host) succeeds; a different file
    // under its name fails, as PostgreSQL requires.
    let name = segment_key
        .rsplit('/')
        .next()
        .unwrap()
        .trim_end_matches(".zst.age");
    let again = work.path().join("again");
    std::fs::create_dir(&again).unwrap();
    let segment = again.join(name);
    std::fs::write(&segment, &raw).unwrap();
    let seg_arg = segment.to_str().unwrap();
    lifeboat(&config, &["wal-push", "--job", PHYSICAL_JOB, seg_arg]).assert_code(0);
    let mut different = raw.clone();
    different[100] ^= 0xff;
    std::fs::write(&segment, &different).unwrap();
    let conflict = lifeboat(&config, &["wal-push", "--job", PHYSICAL_JOB, seg_arg]);
    conflict.assert_code(1);
    conflict.assert_stderr_has("already holds a different file");

    // A stranger's key: refused before the data directory is made.
    let data_dir = work.path().join("restored");
    let port = free_port().to_string();
    let restore_args = [
        "restore",
        PHYSICAL_JOB,
        "--data-dir",
        data_dir.to_str().unwrap(),
        "--start",
        "--port",
        &port,
    ];
    let wrong = with_identity(&config, &stranger, &restore_args);
    wrong.assert_code(1);
    wrong.assert_stderr_has("does not match any recipient");
    assert!(!data_dir.exists());
    // wal-fetch with the wrong key stops recovery rather than ending it quietly.
    let fetched = work.path().join("fetched");
    let mut fetch = lifeboat_command(&config);
    fetch
        .args(["wal-fetch", "--job", PHYSICAL_JOB, "--identity-file"])
        .arg(&stranger)
        .arg(name)
        .arg(&fetched);
    let fetch = run_command(&mut fetch);
    fetch.assert_code(255);
    fetch.assert_stderr_has("does not match any recipient");
    assert!(!fetched.exists());

    let _restored = Restored(data_dir.clone());
    with_identity(&config, &identity, &restore_args).assert_code(0);
    let restored = Postgres::attach(port.parse().unwrap(), &source.password);
    assert_eq!(
        restored.psql("postgres", "select count(*), sum(id) from events"),
        source.psql("postgres", "select count(*), sum(id) from events"),
    );

    // A drill decrypts the archive itself and relays the segments to its scratch server:
    // the key stays lifeboat's (a copy only root reads), the server never holds it.
    let root_only = work.path().join("root-only.key");
    std::fs::copy(&identity, &root_only).unwrap();
    std::fs::set_permissions(&root_only, std::fs::Permissions::from_mode(0o600)).unwrap();
    let drill = work.path().join("encrypted.toml");
    std::fs::write(
        &drill,
        format!(
            "name = \"encrypted\"\njob = \"{PHYSICAL_JOB}\"\nidentity_file = \"{}\"\n\n[[check]]\nname = \"events\"\nsql = \"select count(*) from events\"\nexpect = \"= 2000\"\n",
            root_only.display()
        ),
    )
    .unwrap();
    let drilled = run_command(
        lifeboat_command(&config)
            .args(["drill", "run"])
            .arg(&drill)
            .arg("--report-dir")
            .arg(work.path().join("reports")),
    );
    drilled.assert_code(0);
    drilled.assert_stdout_has("drill encrypted: PASS");

    // Key rotation: the base backup and every archived segment move to the new key; the
    // old key opens none of them, and a restore with the new key alone replays them all.
    let (new_identity, new_recipient) = keygen(work.path(), "new.key");
    assert!(
        Command::new("chown")
            .arg("postgres")
            .arg(&new_identity)
            .status()
            .unwrap()
            .success()
    );
    let rekey_args = [
        "rekey",
        "--add-recipient",
        &new_recipient,
        "--remove-recipient",
        &recipient,
        // Away from the key this host holds: a new key proven elsewhere.
        "--force",
        "--format",
        "json",
    ];
    // The plan a dry run prints is what the rekey then re-encrypts.
    let planned = with_identity(
        &config,
        &identity,
        &[&rekey_args[..], &["--dry-run"]].concat(),
    );
    planned.assert_code(0);
    let rekey = with_identity(&config, &identity, &rekey_args);
    rekey.assert_code(0);
    let planned: serde_json::Value = serde_json::from_str(&planned.stdout).unwrap();
    let done: serde_json::Value = serde_json::from_str(&rekey.stdout).unwrap();
    let plan_of = |report: &serde_json::Value| -> Vec<serde_json::Value> {
        let fields = [
            "repository",
            "backups_rekeyed",
            "backups_already",
            "objects_rekeyed",
        ];
        let wal = ["wal_rekeyed", "wal_already", "failures"];
        report["repositories"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| {
                fields
                    .iter()
                    .chain(&wal)
                    .map(|f| (f.to_string(), r[f].clone()))
                    .collect()
            })
            .collect()
    };
    assert_eq!(plan_of(&planned), plan_of(&done), "{done:#}");
    assert_eq!(planned["recipients"], done["recipients"]);
    assert!(
        done["repositories"][0]["wal_rekeyed"].as_u64().unwrap() > 0,
        "{done:#}"
    );
    assert!(
        !done["repositories"][0]["backups_rekeyed"]
            .as_array()
            .unwrap()
            .is_empty(),
        "{done:#}"
    );
    let mut sealed: Vec<String> = region
        .keys(BUCKET, &format!("{PREFIX}/jobs/{PHYSICAL_JOB}/"))
        .await
        .into_iter()
        .filter(|k| k.ends_with(".age"))
        .collect();
    sealed.sort();
    assert!(sealed.iter().any(|k| k.contains("/backups/")), "{sealed:?}");
    assert!(sealed.len() > segments.len(), "{sealed:?}");
    for key in &sealed {
        let stored = region.object(BUCKET, key).await;
        assert!(
            !age_opens(&stored, &identity),
            "the old key still opens {key}"
        );
        let raw = standard_tools_decode(&stored, &new_identity);
        if key.contains("/wal/") {
            assert_eq!(wal_note_sha(&stored), sha256_hex(&raw), "{key}");
        }
    }
    let rotated_dir = work.path().join("restored-after-rotation");
    let rotated_port = free_port().to_string();
    let _rotated = Restored(rotated_dir.clone());
    with_identity(
        &config,
        &new_identity,
        &[
            "restore",
            PHYSICAL_JOB,
            "--data-dir",
            rotated_dir.to_str().unwrap(),
            "--start",
            "--port",
            &rotated_port,
        ],
    )
    .assert_code(0);
    assert_eq!(
        Postgres::attach(rotated_port.parse().unwrap(), &source.password)
            .psql("postgres", "select count(*), sum(id) from events"),
        source.psql("postgres", "select count(*), sum(id) from events"),
    );
}

/// Whether `age -d -i IDENTITY` opens `stored`.
fn age_opens(stored: &[u8], identity: &Path) -> bool {
    let mut age = Command::new("age")
        .args(["-d", "-o", "/dev/null", "-i"])
        .arg(identity)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut stdin = age.stdin.take().unwrap();
    // age stops reading once the header fails; a broken pipe is its answer, not an error.
    let _ = stdin.write_all(stored);
    drop(stdin);
    age.wait().unwrap().success()
}

/// The keys under `dir` (recursively) whose file name ends with `.age`.
fn sealed_files(dir: &Path) -> BTreeSet<PathBuf> {
    let mut found = BTreeSet::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(next) = pending.pop() {
        let Ok(entries) = std::fs::read_dir(&next) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_dir() {
                pending.push(path);
            } else if path.to_string_lossy().ends_with(".age") {
                found.insert(path);
            }
        }
    }
    found
}

/// Starts `rekey ARGS` with `identity` and kills it with SIGKILL once `count` new `.age`
/// files have appeared in the local repository; whether the kill came before it ended.
fn kill_rekey_after(
    config: &Path,
    identity: &Path,
    args: &[&str],
    repo: &Path,
    count: usize,
) -> bool {
    let before = sealed_files(repo);
    let child = lifeboat_command(config)
        .env("LIFEBOAT_IDENTITY_FILE", identity)
        .arg("rekey")
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    procs::kill_when(
        child,
        || sealed_files(repo).difference(&before).count() >= count,
        "rekey",
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rekey_moves_every_backup_to_the_new_key_and_a_kill_never_strands_one() {
    let s3 = SeaweedFs::start().await;
    s3.create_bucket(BUCKET).await;
    let work = tempfile::tempdir().unwrap();
    let (old, old_recipient) = keygen(work.path(), "old.key");
    let (new, new_recipient) = keygen(work.path(), "new.key");
    let source = work.path().join("data");
    std::fs::create_dir(&source).unwrap();
    let repo = work.path().join("repo");
    let config = write_config(
        work.path(),
        &format!(
            "[encryption]\nrecipients = [\"{old_recipient}\"]\n\n{}{}{}",
            local_repository("local", &repo),
            s3.repository("s3", BUCKET, PREFIX),
            files_job("conf", &[&source])
        ),
    );
    // Three backups, each of different incompressible data, so re-encrypting takes a
    // moment to kill in.
    let mut expected = Vec::new();
    for seed in 1..=3u64 {
        let data = tree::noise(24 << 20, seed);
        std::fs::write(source.join("data.bin"), &data).unwrap();
        lifeboat(&config, &["backup", "conf"]).assert_code(0);
        expected.push((
            manifest(&config, "conf")["id"]
                .as_str()
                .unwrap()
                .to_string(),
            sha256_hex(&data),
        ));
        std::thread::sleep(Duration::from_millis(1100));
    }
    // Restores backup `id` from `repository` with `key`: the restored file's sha256, or None.
    let restore_with = |key: &Path, repository: &str, id: &str| -> Option<String> {
        let into = tempfile::tempdir_in(work.path())
            .unwrap()
            .keep()
            .join("out");
        let run = with_identity(
            &config,
            key,
            &[
                "restore",
                "conf",
                "--backup",
                id,
                "--from",
                repository,
                "--into",
                into.to_str().unwrap(),
            ],
        );
        (run.code == 0).then(|| {
            let restored = into
                .join(source.strip_prefix("/").unwrap())
                .join("data.bin");
            sha256_hex(&std::fs::read(restored).unwrap())
        })
    };

    let args = [
        "--add-recipient",
        &new_recipient,
        "--remove-recipient",
        &old_recipient,
        "--force",
    ];
    let mut killed = 0;
    for count in 1..=3 {
        killed += usize::from(kill_rekey_after(&config, &old, &args, &repo, count));
        // Every backup, in every repository, still restores byte-identical with one of the
        // two keys.
        for repository in ["local", "s3"] {
            for (id, sha) in &expected {
                let restored = restore_with(&old, repository, id)
                    .or_else(|| restore_with(&new, repository, id));
                assert_eq!(
                    restored.as_ref(),
                    Some(sha),
                    "backup {id} in {repository} after kill {count}"
                );
            }
        }
    }
    assert!(
        killed >= 2,
        "only {killed} of 3 rekeys were killed before they ended"
    );

    // Without --force, a rotation away from the only key this host holds is refused.
    let refused = with_identity(
        &config,
        &old,
        &[
            "rekey",
            "--add-recipient",
            &new_recipient,
            "--remove-recipient",
            &old_recipient,
        ],
    );
    refused.assert_code(2);
    assert!(
        refused
            .stderr
            .contains("none of the recipients left is the key of a configured identity")
            && refused.stderr.contains("--force"),
        "{}",
        refused.stderr
    );
    let finished = with_identity(
        &config,
        &old,
        &[
            "rekey",
            "--add-recipient",
            &new_recipient,
            "--remove-recipient",
            &old_recipient,
            "--force",
        ],
    );
    finished.assert_code(0);
    finished.assert_stdout_has("warning: [encryption]");
    // Only the new key reads anything now, and nothing but what manifests name is left.
    for repository in ["local", "s3"] {
        for (id, sha) in &expected {
            assert_eq!(
                restore_with(&new, repository, id).as_ref(),
                Some(sha),
                "{id} in {repository}"
            );
            assert_eq!(
                restore_with(&old, repository, id),
                None,
                "the old key still reads {id} in {repository}"
            );
        }
    }
    // Each repository holds exactly what its own manifest names (each was re-encrypted on
    // its own, so the new objects' names may differ between them).
    for (id, _) in &expected {
        for repository in ["local", "s3"] {
            let show = lifeboat(
                &config,
                &[
                    "show", id, "--job", "conf", "--from", repository, "--format", "json",
                ],
            );
            let manifest: serde_json::Value = serde_json::from_str(&show.stdout).unwrap();
            let object = &manifest["objects"][0];
            assert_eq!(object["recipients"], serde_json::json!([new_recipient]));
            let name = object["name"].as_str().unwrap();
            let mut held: Vec<String> = match repository {
                "s3" => s3
                    .keys(BUCKET, &format!("{PREFIX}/jobs/conf/backups/{id}/"))
                    .await
                    .into_iter()
                    .map(|k| k.rsplit('/').next().unwrap().to_string())
                    .collect(),
                _ => std::fs::read_dir(repo.join(format!("jobs/conf/backups/{id}")))
                    .unwrap()
                    .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                    .collect(),
            };
            held.sort();
            let mut wanted = vec!["manifest.json".to_string(), name.to_string()];
            wanted.sort();
            assert_eq!(held, wanted, "{id} in {repository}");
            if repository == "s3" {
                let stored = s3
                    .object(BUCKET, &format!("{PREFIX}/jobs/conf/backups/{id}/{name}"))
                    .await;
                let raw = standard_tools_decode(&stored, &new);
                assert_eq!(sha256_hex(&raw), object["raw_sha256"].as_str().unwrap());
            }
        }
    }
    let again = with_identity(
        &config,
        &new,
        &[
            "rekey",
            "--add-recipient",
            &new_recipient,
            "--remove-recipient",
            &old_recipient,
        ],
    );
    again.assert_code(0);
    assert!(
        again
            .stdout
            .contains("re-encrypted 0 object(s) of 0 backup(s) (3 already)"),
        "{}",
        again.stdout
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_server_side_encryption_is_asked_for_every_object_written() {
    let s3 = SeaweedFs::start().await;
    s3.create_bucket(BUCKET).await;
    let work = tempfile::tempdir().unwrap();
    let source = work.path().join("etc");
    std::fs::create_dir(&source).unwrap();
    // Large enough for a multipart upload (5 MiB parts), and a small file beside it.
    std::fs::write(source.join("big.bin"), tree::noise(12 << 20, 7)).unwrap();
    std::fs::write(source.join("small.conf"), "x = 1\n").unwrap();
    let repository = s3
        .repository("s3", BUCKET, PREFIX)
        .replace("max_attempts = 2\n", "max_attempts = 2\nsse = \"AES256\"\n");
    let config = write_config(
        work.path(),
        &format!("{repository}{}", files_job("conf", &[&source])),
    );
    lifeboat(&config, &["backup", "conf"]).assert_code(0);
    let keys = s3
        .keys(BUCKET, &format!("{PREFIX}/jobs/conf/backups/"))
        .await;
    assert_eq!(keys.len(), 2, "{keys:?}");
    for key in keys {
        let head = s3
            .client()
            .head_object()
            .bucket(BUCKET)
            .key(&key)
            .send()
            .await
            .unwrap();
        assert_eq!(
            head.server_side_encryption().map(|s| s.as_str()),
            Some("AES256"),
            "{key}"
        );
    }
    let bad = Scenario::new(work.path())
        .raw(&repository.replace("sse = \"AES256\"", "sse = \"rot13\""))
        .files_job("conf", &[&source])
        .write();
    let refused = lifeboat(&bad, &["backup", "conf"]);
    refused.assert_code(2);
    refused.assert_stderr_has("repository[0] (s3).sse: must be \"AES256\", \"aws:kms\" or \"aws:kms:dsse\" (got \"rot13\")");
}
