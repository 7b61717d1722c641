//! Physical backups against a real cluster archiving its WAL with `lifeboat wal-push` into
//! real S3 servers: point-in-time recovery keeps exactly the rows committed before the
//! target, recovery to the end of the archive reproduces the source's data, and wal-push
//! keeps PostgreSQL's archive_command promises with a region down.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use crate::common::postgres::{Postgres, free_port, stop_data_dir};
use crate::common::{
    Run, SeaweedFs, Tmpfs, is_root, lifeboat, lifeboat_command, run_command, seaweedfs, tree,
    write_config,
};

pub(crate) const BUCKET: &str = "backups";
pub(crate) const PREFIX: &str = "lifeboat";
pub(crate) const JOB: &str = "maindb-pitr";

/// A work directory the `postgres` user can read (archive_command reads the config in it).
pub(crate) fn shared_work_dir() -> tempfile::TempDir {
    let work = tempfile::tempdir().unwrap();
    std::fs::set_permissions(work.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    work
}

fn physical_config(
    work: &Path,
    regions: &[&SeaweedFs],
    port: u16,
    password_file: &Path,
    extra: &str,
) -> PathBuf {
    let mut text = String::from(extra);
    for (index, region) in regions.iter().enumerate() {
        text.push_str(&region.repository(&format!("region{}", index + 1), BUCKET, PREFIX));
    }
    text.push_str(&format!(
        "[[job]]\nname = \"{JOB}\"\nkind = \"postgres\"\nmode = \"physical\"\ndsn = \"postgresql://postgres@127.0.0.1:{port}/postgres\"\npassword_file = \"{}\"\nheartbeat = true\n",
        password_file.display()
    ));
    write_config(work, &text)
}

/// A cluster archiving into `regions` with `lifeboat wal-push`, and the config naming it.
pub(crate) fn archiving_cluster(
    work: &Path,
    regions: &[&SeaweedFs],
    extra: &str,
) -> (Postgres, PathBuf) {
    let password_file = work.join("pg.pass");
    // The archiver reads the config from the first segment on; the port is known later.
    let config = physical_config(work, regions, 5432, &password_file, extra);
    let archive_command = format!(
        "{} --config {} wal-push --job {JOB} %p",
        env!("CARGO_BIN_EXE_lifeboat"),
        config.display()
    );
    let source = Postgres::start_with(
        &[
            "archive_mode=on".to_string(),
            format!("archive_command={archive_command}"),
            "archive_timeout=60s".to_string(),
        ],
        &[
            ("AWS_ACCESS_KEY_ID", seaweedfs::ACCESS_KEY),
            ("AWS_SECRET_ACCESS_KEY", seaweedfs::SECRET_KEY),
            ("AWS_EC2_METADATA_DISABLED", "true"),
        ],
    );
    crate::common::write_secret(&password_file, &source.password, 0o600);
    physical_config(work, regions, source.port, &password_file, extra);
    // A restored copy must not depend on /var/run/postgresql existing on this machine; the
    // source's own command line (-k) still wins for the source.
    source.psql(
        "postgres",
        "alter system set unix_socket_directories = '/tmp'",
    );
    source.psql(
        "postgres",
        "alter system set listen_addresses = '127.0.0.1'",
    );
    (source, config)
}

/// The server's clock now, as RFC 3339 UTC with microseconds.
fn server_now(source: &Postgres) -> String {
    source.psql(
        "postgres",
        "select to_char(clock_timestamp() at time zone 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"')",
    )
}

/// Writes the source's archiving (set on its command line) into `postgresql.auto.conf`, so
/// that a copy restored with --keep-archiving archives too.
pub(crate) fn archive_from_restored_copies(source: &Postgres) {
    let archive_command = source.psql("postgres", "show archive_command");
    source.psql("postgres", "alter system set archive_mode = on");
    source.psql(
        "postgres",
        &format!(
            "alter system set archive_command = '{}'",
            archive_command.replace('\'', "''")
        ),
    );
}

/// Inserts ids `from..=to` into the table `events`.
pub(crate) fn insert_events(server: &Postgres, from: u32, to: u32) {
    server.psql(
        "postgres",
        &format!("insert into events select generate_series({from}, {to})"),
    );
}

/// Three batches of 100 events, each ended by a WAL switch and archived: the segment
/// names, in order. Stores keep times to the second, so the last is archived over a second
/// after the first.
fn archive_three_batches(source: &Postgres) -> Vec<String> {
    let mut batches = Vec::new();
    for batch in 0..3 {
        if batch == 2 {
            std::thread::sleep(std::time::Duration::from_millis(1500));
        }
        insert_events(source, batch * 100 + 1, batch * 100 + 100);
        batches.push(source.archive_current_wal());
    }
    batches
}

/// `lifeboat restore JOB --data-dir DIR ARGS... --start --port PORT`: a restored cluster
/// started on a free port.
pub(crate) fn restore_started(config: &Path, data_dir: &Path, port: u16, args: &[&str]) -> Run {
    let port = port.to_string();
    let mut all = vec!["restore", JOB, "--data-dir", data_dir.to_str().unwrap()];
    all.extend_from_slice(args);
    all.extend(["--start", "--port", &port]);
    lifeboat(config, &all)
}

/// Stops the server a restore started, even when an assertion fails first.
pub(crate) struct Restored(pub(crate) PathBuf);

impl Drop for Restored {
    fn drop(&mut self) {
        stop_data_dir(&self.0);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn point_in_time_recovery_keeps_exactly_the_rows_committed_before_the_target() {
    let region = SeaweedFs::start().await;
    region.create_bucket(BUCKET).await;
    let work = shared_work_dir();
    let (source, config) = archiving_cluster(work.path(), &[&region], "");
    source.psql(
        "postgres",
        "create table events (id int primary key, at timestamptz not null default clock_timestamp())",
    );
    let insert = |id: u32| {
        source.psql(
            "postgres",
            &format!("insert into events (id) values ({id})"),
        );
        std::thread::sleep(std::time::Duration::from_millis(300));
    };
    for id in 1..=3 {
        insert(id);
    }

    lifeboat(&config, &["backup", JOB]).assert_code(0);
    let show = lifeboat(
        &config,
        &["show", "latest", "--job", JOB, "--format", "json"],
    );
    show.assert_code(0);
    let manifest: serde_json::Value = serde_json::from_str(&show.stdout).unwrap();
    assert_eq!(manifest["kind"], "postgres-physical");
    assert_eq!(manifest["objects"][0]["name"], "base.tar.zst");
    let first_wal = manifest["source"]["first_wal"].as_str().unwrap();
    assert!(first_wal.starts_with("00000001"), "{manifest}");
    assert!(manifest["source"]["stop_lsn"].is_string(), "{manifest}");

    // After the backup, a row every 20 s for three minutes, as an application writes: the
    // archiver ships them through archive_timeout (60 s), nothing forces a WAL switch. The
    // server's clock after each commit is the moment a user would name.
    let mut committed = Vec::new();
    for id in 4..=12 {
        source.psql(
            "postgres",
            &format!("insert into events (id) values ({id})"),
        );
        committed.push((
            id,
            server_now(&source),
            source.psql("postgres", "select pg_current_wal_insert_lsn()"),
        ));
        if id == 10 {
            // A newer backup, which ends after the target: the restore must not pick it.
            lifeboat(&config, &["backup", JOB]).assert_code(0);
        }
        if id < 12 {
            std::thread::sleep(std::time::Duration::from_secs(20));
        }
    }
    source.archive_current_wal();
    // Someone dropped a table at 14:02; recover to 14:01: here, just after row 8 committed.
    let (_, target, _) = committed
        .iter()
        .find(|(id, _, _)| *id == 8)
        .unwrap()
        .clone();

    let data_dir = work.path().join("restored");
    let port = free_port();
    let _restored = Restored(data_dir.clone());
    let run = restore_started(&config, &data_dir, port, &["--to-time", &target]);
    run.assert_code(0);
    let first_backup = manifest["id"].as_str().unwrap();
    assert!(
        run.stdout
            .contains(&format!("restored {JOB}/{first_backup} from")),
        "the newest backup that ends before the target: {}",
        run.stdout
    );
    let restored = Postgres::attach(port, &source.password);
    assert_eq!(
        restored.psql(
            "postgres",
            "select string_agg(id::text, ',' order by id) from events"
        ),
        "1,2,3,4,5,6,7,8",
        "exactly the rows committed before {target}"
    );
    // Their commit timestamps came through unchanged.
    assert_eq!(
        restored.psql(
            "postgres",
            "select string_agg(at::text, ',' order by id) from events"
        ),
        source.psql(
            "postgres",
            "select string_agg(at::text, ',' order by id) from events where id <= 8"
        )
    );
    assert_eq!(restored.psql("postgres", "select pg_is_in_recovery()"), "f");

    // The same by WAL position: everything up to just after row 6's commit.
    let (_, _, lsn) = committed
        .iter()
        .find(|(id, _, _)| *id == 6)
        .unwrap()
        .clone();
    let by_lsn = work.path().join("restored-by-lsn");
    let lsn_port = free_port();
    let _by_lsn = Restored(by_lsn.clone());
    restore_started(&config, &by_lsn, lsn_port, &["--to-lsn", &lsn]).assert_code(0);
    assert_eq!(
        Postgres::attach(lsn_port, &source.password).psql(
            "postgres",
            "select string_agg(id::text, ',' order by id) from events"
        ),
        "1,2,3,4,5,6",
        "exactly the rows committed before {lsn}"
    );

    // A target before the first backup ended cannot be reached from any backup.
    let early = lifeboat(
        &config,
        &[
            "restore",
            JOB,
            "--data-dir",
            work.path().join("too-early").to_str().unwrap(),
            "--to-time",
            "2020-01-01T00:00:00Z",
        ],
    );
    early.assert_code(1);
    early.assert_stderr_has("that ends before 2020-01-01");
    assert!(!work.path().join("too-early").exists());

    // The data directory must be empty.
    let occupied = lifeboat(
        &config,
        &["restore", JOB, "--data-dir", data_dir.to_str().unwrap()],
    );
    occupied.assert_code(1);
    occupied.assert_stderr_has("not empty");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recovery_to_the_end_of_the_archive_reproduces_the_source_data() {
    let region = SeaweedFs::start().await;
    region.create_bucket(BUCKET).await;
    let work = shared_work_dir();
    let (source, config) = archiving_cluster(work.path(), &[&region], "");
    source.create_app_database(50_000);
    // What a cluster restored to a moment and promoted carries into every base backup of
    // it: a restore of one to the end of the archive used to stop at that old moment.
    for setting in [
        "recovery_target_time = '2000-01-01 00:00:00+00'",
        "recovery_target_action = 'promote'",
    ] {
        source.psql("postgres", &format!("alter system set {setting}"));
    }
    lifeboat(&config, &["backup", JOB]).assert_code(0);

    // Changes after the base backup reach the restore through the WAL archive only.
    source.psql(
        "app",
        "update shop.orders set status = 'shipped' where id % 7 = 0; \
         delete from shop.order_lines where order_id % 11 = 0; \
         insert into shop.orders (customer_id, created_at, total, status) \
           select 1 + i % 100, now(), i, 'new' from generate_series(1, 20000) i",
    );
    source.archive_current_wal();
    let expected = source.data_fingerprint("app");

    let data_dir = work.path().join("restored");
    let port = free_port();
    let _restored = Restored(data_dir.clone());
    let restore = restore_started(&config, &data_dir, port, &[]);
    restore.assert_code(0);
    restore.assert_stdout_has("removed recovery settings the base backup carried (this restore sets its own): recovery_target_time, recovery_target_action");
    let restored = Postgres::attach(port, &source.password);
    let actual = restored.data_fingerprint("app");
    // Every table's rows (and the large objects) are identical. Sequences are WAL-logged
    // 32 values ahead, so after recovery they may stand further on, never behind.
    let (tables, sequences) = split_sequences(&expected);
    let (restored_tables, restored_sequences) = split_sequences(&actual);
    assert_eq!(restored_tables, tables);
    for ((name, value), (restored_name, restored_value)) in
        sequences.iter().zip(&restored_sequences)
    {
        assert_eq!(name, restored_name);
        assert!(
            restored_value >= value,
            "sequence {name} went back: {restored_value} < {value}"
        );
    }
    // The restored cluster does not write a new timeline into the job's archive.
    assert_eq!(restored.psql("postgres", "show archive_mode"), "off");
    // What wal-fetch fetched ahead went with the end of recovery (recovery_end_command).
    assert!(!data_dir.join("pg_wal/.lifeboat-prefetch").exists());
}

/// The two ways a DR restore meets its disk: as the `postgres` user into a directory it
/// owns whose parent it cannot write (staging beside the target would be refused), and as
/// root onto a freshly mounted volume (a rename from beside it would cross filesystems).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_physical_restore_as_postgres_into_its_own_directory_and_onto_a_fresh_volume() {
    assert!(
        is_root(),
        "running as postgres and mounting a tmpfs need root"
    );
    let region = SeaweedFs::start().await;
    region.create_bucket(BUCKET).await;
    let work = shared_work_dir();
    let (source, config) = archiving_cluster(work.path(), &[&region], "");
    std::fs::set_permissions(&config, std::fs::Permissions::from_mode(0o644)).unwrap();
    source.create_app_database(50_000);
    lifeboat(&config, &["backup", JOB]).assert_code(0);
    source.psql(
        "app",
        "insert into shop.orders (customer_id, created_at, total, status) \
           select 1 + i % 100, now(), i, 'new' from generate_series(1, 5000) i",
    );
    source.archive_current_wal();
    let source_fingerprint = source.data_fingerprint("app");
    let (expected, _) = split_sequences(&source_fingerprint);

    // postgres into its own directory under a root-owned 0755 parent.
    let parent = work.path().join("srv");
    std::fs::create_dir(&parent).unwrap();
    std::fs::set_permissions(&parent, std::fs::Permissions::from_mode(0o755)).unwrap();
    let data_dir = parent.join("pgdata");
    std::fs::create_dir(&data_dir).unwrap();
    std::fs::set_permissions(&data_dir, std::fs::Permissions::from_mode(0o700)).unwrap();
    let (uid, gid) = postgres_user();
    std::os::unix::fs::chown(&data_dir, Some(uid), Some(gid)).unwrap();
    let port = free_port();
    let restored = Restored(data_dir.clone());
    let mut command = lifeboat_command(&config);
    {
        use std::os::unix::process::CommandExt;
        command.uid(uid).gid(gid).env("HOME", "/nonexistent");
    }
    command.args([
        "restore",
        JOB,
        "--data-dir",
        data_dir.to_str().unwrap(),
        "--start",
        "--port",
        &port.to_string(),
    ]);
    run_command(&mut command).assert_code(0);
    let fingerprint = Postgres::attach(port, &source.password).data_fingerprint("app");
    assert_eq!(split_sequences(&fingerprint).0, expected);
    drop(restored);
    let stray: Vec<_> = std::fs::read_dir(&parent)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(
        stray,
        ["pgdata"],
        "something was written beside the data directory"
    );

    // Root onto a tmpfs mounted at the data directory itself.
    let volume = Tmpfs::mount(&work.path().join("new-disk"), "size=1g,mode=0700");
    let port = free_port();
    let restored = Restored(volume.0.clone());
    restore_started(&config, &volume.0, port, &[]).assert_code(0);
    let fingerprint = Postgres::attach(port, &source.password).data_fingerprint("app");
    assert_eq!(split_sequences(&fingerprint).0, expected);
    drop(restored);
    assert!(
        std::fs::read_dir(&volume.0).unwrap().all(|e| !e
            .unwrap()
            .file_name()
            .to_string_lossy()
            .starts_with(".lifeboat-restore-")),
        "staging was left in the data directory"
    );
    drop(volume);

    // A forged base backup: a file set-id to the server's user, and postgresql.auto.conf a
    // symlink, so that setting up recovery fails once the tree is in place.
    let keys = region.keys(BUCKET, PREFIX).await;
    let base_key = keys
        .iter()
        .find(|k| k.ends_with("/base.tar.zst"))
        .unwrap()
        .clone();
    let manifest_key = base_key.replace("base.tar.zst", "manifest.json");
    let genuine_base = region.object(BUCKET, &base_key).await;
    let genuine_manifest = region.object(BUCKET, &manifest_key).await;
    let forge = |auto_conf_symlink: bool| {
        let tar = zstd::decode_all(&genuine_base[..]).unwrap();
        let mut archive = tar::Archive::new(&tar[..]);
        let mut builder = tar::Builder::new(Vec::new());
        for entry in archive.entries().unwrap() {
            let mut entry = entry.unwrap();
            let path = entry.path().unwrap().into_owned();
            if auto_conf_symlink && path == Path::new("postgresql.auto.conf") {
                let mut header = tar::Header::new_gnu();
                header.set_entry_type(tar::EntryType::Symlink);
                header.set_size(0);
                header.set_mode(0o777);
                header.set_uid(0);
                header.set_gid(0);
                header.set_mtime(1);
                builder
                    .append_link(&mut header, &path, "/nonexistent")
                    .unwrap();
                continue;
            }
            let mut header = entry.header().clone();
            builder.append_data(&mut header, &path, &mut entry).unwrap();
        }
        let mut header = tar::Header::new_gnu();
        header.set_entry_type(tar::EntryType::Regular);
        header.set_mode(0o6755);
        header.set_uid(0);
        header.set_gid(0);
        header.set_mtime(1);
        header.set_size(4);
        builder
            .append_data(&mut header, "evil", &b"#!/\n"[..])
            .unwrap();
        let tar = builder.into_inner().unwrap();
        let stored = zstd::encode_all(&tar[..], 3).unwrap();
        let mut manifest = lifeboat::manifest::Manifest::from_json(&genuine_manifest).unwrap();
        let object = manifest
            .objects
            .iter_mut()
            .find(|o| o.name == "base.tar.zst")
            .unwrap();
        {
            use sha2::Digest;
            object.size = stored.len() as u64;
            object.sha256 = hex::encode(sha2::Sha256::digest(&stored));
            object.raw_size = tar.len() as u64;
            object.raw_sha256 = hex::encode(sha2::Sha256::digest(&tar));
        }
        (stored, manifest.to_json())
    };
    let client = region.client();
    let put = |key: String, body: Vec<u8>| {
        let client = client.clone();
        async move {
            client
                .put_object()
                .bucket(BUCKET)
                .key(key)
                .body(body.into())
                .send()
                .await
                .unwrap();
        }
    };
    let (stored, manifest) = forge(true);
    put(base_key.clone(), stored).await;
    put(manifest_key.clone(), manifest).await;
    let data_dir = work.path().join("forged");
    let run = lifeboat(
        &config,
        &["restore", JOB, "--data-dir", data_dir.to_str().unwrap()],
    );
    run.assert_code(1);
    run.assert_stderr_has("unable to set up recovery");
    assert!(
        !data_dir.exists(),
        "a failed restore left its data directory"
    );

    // The same without the trap restores, and the file has no set-id bits.
    let (stored, manifest) = forge(false);
    put(base_key.clone(), stored).await;
    put(manifest_key.clone(), manifest).await;
    lifeboat(
        &config,
        &["restore", JOB, "--data-dir", data_dir.to_str().unwrap()],
    )
    .assert_code(0);
    use std::os::unix::fs::MetadataExt;
    let evil = std::fs::metadata(data_dir.join("evil")).unwrap();
    assert_eq!(evil.mode() & 0o7777, 0o755);
    assert_eq!(std::fs::metadata(&data_dir).unwrap().mode() & 0o777, 0o700);
}

/// The uid and gid of the `postgres` user.
pub(crate) fn postgres_user() -> (u32, u32) {
    let out = std::process::Command::new("id")
        .arg("postgres")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let number = |key: &str| -> u32 {
        let at = text.find(key).unwrap() + key.len();
        text[at..].split('(').next().unwrap().parse().unwrap()
    };
    (number("uid="), number("gid="))
}

/// A fingerprint without its sequences line, and the sequences' values by name.
fn split_sequences(fingerprint: &str) -> (Vec<&str>, Vec<(String, u64)>) {
    let mut others = Vec::new();
    let mut sequences = Vec::new();
    for line in fingerprint.lines() {
        if line.contains("_seq=") {
            for pair in line.split(',') {
                let (name, value) = pair.split_once('=').unwrap();
                sequences.push((name.to_string(), value.parse().unwrap()));
            }
        } else {
            others.push(line);
        }
    }
    (others, sequences)
}

/// A WAL segment named `name` in its own directory, 16 MiB, whose content depends on `seed`.
fn fake_segment(dir: &Path, name: &str, seed: u8) -> PathBuf {
    let dir = dir.join(format!("pg_wal-{seed}"));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(name);
    std::fs::write(
        &path,
        tree::wal_segment(name, tree::FAKE_SYSTEM, seed.into()),
    )
    .unwrap();
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wal_push_keeps_the_archive_command_promises_with_a_region_down() {
    let region1 = SeaweedFs::start().await;
    let mut region2 = SeaweedFs::start().await;
    region1.create_bucket(BUCKET).await;
    region2.create_bucket(BUCKET).await;
    let work = shared_work_dir();
    let config = physical_config(
        work.path(),
        &[&region1, &region2],
        5432,
        &work.path().join("unused.pass"),
        "min_repositories = 1\n",
    );
    let name = "000000010000000000000007";
    let key = format!("{PREFIX}/jobs/{JOB}/wal/00000001/{name}.zst");
    let segment = fake_segment(work.path(), name, 1);
    let segment_arg = segment.to_str().unwrap();

    let first = lifeboat(&config, &["wal-push", segment_arg]);
    first.assert_code(0);
    first.assert_stdout_has("stored in region1, region2");
    let stored = region1.object(BUCKET, &key).await;
    assert_eq!(region2.object(BUCKET, &key).await, stored);
    assert_eq!(
        zstd::decode_all(&stored[..]).unwrap(),
        std::fs::read(&segment).unwrap()
    );

    // PostgreSQL retries a segment it is unsure about: the same bytes succeed, unchanged.
    let again = lifeboat(&config, &["wal-push", "--job", JOB, segment_arg]);
    again.assert_code(0);
    assert!(
        again.stdout.contains("already held by region1, region2")
            && !again.stdout.contains("stored in"),
        "{}",
        again.stdout
    );
    assert_eq!(region1.object(BUCKET, &key).await, stored);

    // A different file under an archived name is refused, and the archive keeps the first.
    let impostor = fake_segment(work.path(), name, 2);
    let refused = lifeboat(&config, &["wal-push", impostor.to_str().unwrap()]);
    refused.assert_code(1);
    assert!(
        refused
            .stderr
            .contains("already holds a different file under that name"),
        "{}",
        refused.stderr
    );
    assert_eq!(region1.object(BUCKET, &key).await, stored);

    // Names that are not WAL files never become keys.
    let odd = work.path().join("notes.txt");
    std::fs::write(&odd, "x").unwrap();
    let bad = lifeboat(&config, &["wal-push", odd.to_str().unwrap()]);
    bad.assert_code(2);
    assert!(
        bad.stderr
            .contains("'notes.txt' is not the name of a WAL archive file")
    );

    // Region 2 down: with min_repositories = 1 the push succeeds into region 1 and says
    // what region 2 lacks.
    region2.stop();
    let next_name = "000000010000000000000008";
    let next = fake_segment(work.path(), next_name, 3);
    let degraded = lifeboat(&config, &["wal-push", next.to_str().unwrap()]);
    degraded.assert_code(0);
    assert!(
        degraded
            .stdout
            .contains("warning: repository 'region2' lacks 000000010000000000000008")
            && degraded.stdout.contains("lifeboat replicate maindb-pitr"),
        "{}",
        degraded.stdout
    );
    let next_key = format!("{PREFIX}/jobs/{JOB}/wal/00000001/{next_name}.zst");
    assert_eq!(
        zstd::decode_all(&region1.object(BUCKET, &next_key).await[..]).unwrap(),
        std::fs::read(&next).unwrap()
    );

    // wal-fetch reads what the first reachable region holds, and says "not archived" (exit 1,
    // quietly) for what no reachable region holds.
    let fetched = work.path().join("fetched");
    let fetch = lifeboat(
        &config,
        &["wal-fetch", next_name, fetched.to_str().unwrap()],
    );
    fetch.assert_code(0);
    assert_eq!(
        std::fs::read(&fetched).unwrap(),
        std::fs::read(&next).unwrap()
    );
    let absent = lifeboat(
        &config,
        &[
            "wal-fetch",
            "000000010000000000000099",
            fetched.to_str().unwrap(),
        ],
    );
    absent.assert_code(1);
    assert_eq!(absent.stderr.trim(), "", "quiet on a missing segment");
    // Asked to read only from the region that is down, it cannot tell: PostgreSQL must stop
    // recovery (exit above 125), not take it for the end of the archive.
    let unsure = lifeboat(
        &config,
        &[
            "wal-fetch",
            "--from",
            "region2",
            next_name,
            fetched.to_str().unwrap(),
        ],
    );
    unsure.assert_code(255);
    unsure.assert_stderr_has("region2");

    // Back up: replicate copies the segment region 2 missed.
    region2.restart().await;
    let replicate = lifeboat(&config, &["replicate", JOB]);
    replicate.assert_code(0);
    assert!(
        replicate
            .stdout
            .contains(&format!("copied {JOB}/wal/{next_name}.zst")),
        "{}",
        replicate.stdout
    );
    assert_eq!(
        region2.object(BUCKET, &next_key).await,
        region1.object(BUCKET, &next_key).await
    );
    let settled = lifeboat(&config, &["replicate", JOB]);
    settled.assert_code(0);
    settled.assert_stdout_has("nothing to copy");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_without_archiving_is_refused_with_the_setting_to_change() {
    let region = SeaweedFs::start().await;
    region.create_bucket(BUCKET).await;
    let source = Postgres::start();
    let work = shared_work_dir();
    let password_file = work.path().join("pg.pass");
    crate::common::write_secret(&password_file, &source.password, 0o600);
    let config = physical_config(work.path(), &[&region], source.port, &password_file, "");
    let run = lifeboat(&config, &["backup", JOB]);
    run.assert_code(1);
    run.assert_stderr_has("archive_mode is off");
    run.assert_stderr_has("archive_command = 'lifeboat --config");
    assert!(region.manifest_keys(BUCKET).await.is_empty());
    let check = lifeboat(&config, &["check"]);
    check.assert_code(1);
    assert!(
        check
            .stdout
            .contains("FAILED   job 'maindb-pitr' (postgres-physical)")
            && check.stdout.contains("archive_mode is off"),
        "{}",
        check.stdout
    );
}

/// A job archives one cluster. A backup of another (a cluster made again by initdb or
/// pg_upgrade, a DSN pointed at the wrong server) into it is refused before it is taken:
/// its WAL would otherwise be mixed with the first cluster's under the same names.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_of_another_cluster_into_the_job_is_refused() {
    let region = SeaweedFs::start().await;
    region.create_bucket(BUCKET).await;
    let work = shared_work_dir();
    let (source, config) = archiving_cluster(work.path(), &[&region], "");
    lifeboat(&config, &["backup", JOB]).assert_code(0);
    let system = source.psql(
        "postgres",
        "select system_identifier from pg_control_system()",
    );
    let key = format!("{PREFIX}/jobs/{JOB}/cluster.json");
    let record: serde_json::Value =
        serde_json::from_slice(&region.object(BUCKET, &key).await).unwrap();
    assert_eq!(record["system_identifier"], system.as_str(), "{record}");
    assert_eq!(record["wal_segment_size"], 16 << 20, "{record}");

    // The job's record names another cluster: this server is the stranger now.
    let mut other = record.clone();
    other["system_identifier"] = "7000000000000000001".into();
    region
        .client()
        .put_object()
        .bucket(BUCKET)
        .key(&key)
        .body(serde_json::to_vec(&other).unwrap().into())
        .send()
        .await
        .unwrap();
    let manifests = region.manifest_keys(BUCKET).await;
    let refused = lifeboat(&config, &["backup", JOB]);
    refused.assert_code(1);
    assert!(
        refused.stderr.contains(&format!(
            "refusing to back up job '{JOB}': the server is the cluster with system identifier {system}"
        )) && refused
            .stderr
            .contains("repository 'region1' holds this job's backups and WAL of the cluster 7000000000000000001"),
        "{}",
        refused.stderr
    );
    refused.assert_stderr_has("a job of its own");
    assert_eq!(region.manifest_keys(BUCKET).await, manifests);
}

/// One segment missing from the archive with later ones behind it used to read as the end
/// of the archive: PostgreSQL promoted before the gap, exit 0, and the rows after it were
/// gone though their WAL was archived. Now the restore knows the gap before it starts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gap_in_the_archive_is_refused_named_and_filled_from_another_region() {
    let region1 = SeaweedFs::start().await;
    let region2 = SeaweedFs::start().await;
    region1.create_bucket(BUCKET).await;
    region2.create_bucket(BUCKET).await;
    let work = shared_work_dir();
    let (source, config) = archiving_cluster(work.path(), &[&region1, &region2], "");
    source.psql("postgres", "create table events (id int primary key)");
    lifeboat(&config, &["backup", JOB]).assert_code(0);
    let batches = archive_three_batches(&source);
    // The second batch's segment is lost in region 1; region 2 still holds it.
    let lost = &batches[1];
    let key = format!("{PREFIX}/jobs/{JOB}/wal/00000001/{lost}.zst");
    let delete = |region: &SeaweedFs| {
        let client = region.client();
        let key = key.clone();
        async move {
            client
                .delete_object()
                .bucket(BUCKET)
                .key(key)
                .send()
                .await
                .unwrap();
        }
    };
    delete(&region1).await;
    let rows = |port: u16| {
        Postgres::attach(port, &source.password).psql("postgres", "select count(*) from events")
    };

    let only_region1 = work.path().join("only-region1");
    let port = free_port();
    let _restored = Restored(only_region1.clone());
    let refused = restore_started(&config, &only_region1, port, &["--from", "region1"]);
    refused.assert_code(1);
    assert!(
        refused.stderr.contains(&format!(
            "WAL segment {lost} is in none of the repositories 'region1', and the archive goes on after it ({} (stored ",
            batches[2]
        )) && refused
            .stderr
            .contains(&format!("recovery would stop at the end of {}", batches[0])),
        "{}",
        refused.stderr
    );
    refused.assert_stderr_has("--accept-gap");
    assert!(!only_region1.exists(), "a refused restore wrote the target");

    // A drill of region 1 fails on the gap: it proves nothing about the lost rows.
    let drill = work.path().join("region1.toml");
    std::fs::write(
        &drill,
        format!(
            "name = \"region1\"\njob = \"{JOB}\"\nfrom = \"region1\"\n\n[[check]]\nname = \"every event\"\nsql = \"select count(*) from events\"\nexpect = \"= 300\"\n"
        ),
    )
    .unwrap();
    let tmp = work.path().join("tmp");
    std::fs::create_dir(&tmp).unwrap();
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o1777)).unwrap();
    let drilled = crate::common::run_command(
        crate::common::lifeboat_command(&config)
            .env("TMPDIR", &tmp)
            .args(["drill", "run"])
            .arg(&drill)
            .arg("--report-dir")
            .arg(work.path().join("reports")),
    );
    drilled.assert_code(1);
    assert!(
        format!("{}{}", drilled.stdout, drilled.stderr).contains(&format!(
            "WAL segment {lost} is in none of the repositories 'region1'"
        )),
        "{}\n{}",
        drilled.stdout,
        drilled.stderr
    );

    let accepted = restore_started(
        &config,
        &only_region1,
        port,
        &["--from", "region1", "--accept-gap"],
    );
    accepted.assert_code(0);
    accepted.assert_stdout_has(format!(
            "--accept-gap: recovering to the gap: WAL segment {lost} is in no repository, so recovery ends with {}",
            batches[0]
        ));
    assert_eq!(rows(port), "100");

    // Both regions: the segment is read where it survives, and every row comes back.
    let both = work.path().join("both");
    let port = free_port();
    let _both = Restored(both.clone());
    let whole = restore_started(&config, &both, port, &[]);
    whole.assert_code(0);
    assert!(
        whole
            .stdout
            .contains(&format!("the archive reaches the end of {}", batches[2])),
        "{}",
        whole.stdout
    );
    assert_eq!(rows(port), "300");

    // Lost everywhere: status measures exposure from the last gap-free point and says why.
    delete(&region2).await;
    let status = lifeboat(&config, &["status", "--format", "json"]);
    let report: serde_json::Value = serde_json::from_str(&status.stdout).unwrap();
    let job = &report["jobs"][0];
    assert_eq!(job["wal_gap"], lost.as_str(), "{job}");
    let at =
        |field: &str| chrono::DateTime::parse_from_rfc3339(job[field].as_str().unwrap()).unwrap();
    assert!(at("gap_free_wal_at") < at("newest_wal_at"), "{job}");
    let text = lifeboat(&config, &["status"]);
    text.assert_stdout_has(format!(
        "WAL archive gap: segment {lost} is in no repository"
    ));
}

/// A segment that is there but does not replay (an older lifeboat stored it unchecked, or
/// a disk damaged it before it was archived) also reads as the end of WAL to PostgreSQL.
/// wal-fetch takes a copy damaged past its first page for damaged and reads another
/// region's; damage within the records only PostgreSQL sees, so the restore checks where
/// replay actually ended and fails when it is short.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recovery_that_ends_before_the_archive_does_fails() {
    let region1 = SeaweedFs::start().await;
    let region2 = SeaweedFs::start().await;
    region1.create_bucket(BUCKET).await;
    region2.create_bucket(BUCKET).await;
    let work = shared_work_dir();
    let (source, config) = archiving_cluster(work.path(), &[&region1, &region2], "");
    source.psql("postgres", "create table events (id int primary key)");
    lifeboat(&config, &["backup", JOB]).assert_code(0);
    let batches = archive_three_batches(&source);
    let key = format!("{PREFIX}/jobs/{JOB}/wal/00000001/{}.zst", batches[0]);
    let genuine = zstd::decode_all(&region1.object(BUCKET, &key).await[..]).unwrap();
    let replace = |region: &SeaweedFs, raw: Vec<u8>| {
        let client = region.client();
        let key = key.clone();
        async move {
            client
                .put_object()
                .bucket(BUCKET)
                .key(key)
                .body(zstd::encode_all(&raw[..], 3).unwrap().into())
                .send()
                .await
                .unwrap();
        }
    };
    let restore = |name: &str, args: &[&str]| {
        let dir = work.path().join(name);
        let port = free_port();
        let run = restore_started(&config, &dir, port, args);
        (Restored(dir), run, port)
    };

    // Region 1's copy has a page past the first overwritten: it is passed over.
    let mut past_first_page = genuine.clone();
    past_first_page[8192..2 * 8192].fill(0x77);
    replace(&region1, past_first_page).await;
    let (_whole, run, port) = restore("whole", &[]);
    run.assert_code(0);
    assert_eq!(
        Postgres::attach(port, &source.password).psql("postgres", "select count(*) from events"),
        "300"
    );
    // With region 1 alone, recovery stops rather than promote early.
    let (_only, run, _) = restore("only-region1", &["--from", "region1"]);
    run.assert_code(1);
    let in_repository = format!("jobs/{JOB}/wal/00000001/{}.zst", batches[0]);
    assert!(
        run.stderr.contains("could not restore file")
            && run.stderr.contains(&format!(
                "damaged '{in_repository}' in repository 'region1'"
            ))
            && run.stderr.contains("its page at byte 8192"),
        "{}",
        run.stderr
    );

    // Every page header right, the records after the first one's zeroed: only replay shows it.
    let mut records_lost = genuine.clone();
    records_lost[40..8192].fill(0);
    replace(&region1, records_lost.clone()).await;
    replace(&region2, records_lost).await;
    let (_short, short, _) = restore("short", &[]);
    short.assert_code(1);
    assert!(
        short.stderr.contains("stopped replaying at LSN")
            && short.stderr.contains(&format!(
                "short of the end of the archive, {} (stored",
                batches[2]
            )),
        "{}",
        short.stderr
    );
    assert!(
        short.stderr.contains("lifeboat-recovery.log' says why")
            && short.stderr.contains("lifeboat stopped the server"),
        "{}",
        short.stderr
    );

    // The newest segment's records zeroed: it looks like the zeros after a WAL switch to
    // every check before replay; only where replay ended shows it, one segment short.
    let last_key = format!("{PREFIX}/jobs/{JOB}/wal/00000001/{}.zst", batches[2]);
    let last = zstd::decode_all(&region1.object(BUCKET, &last_key).await[..]).unwrap();
    let mut last_zeroed = last.clone();
    last_zeroed[40..].fill(0);
    for region in [&region1, &region2] {
        region
            .client()
            .put_object()
            .bucket(BUCKET)
            .key(&last_key)
            .body(zstd::encode_all(&last_zeroed[..], 3).unwrap().into())
            .send()
            .await
            .unwrap();
    }
    replace(&region1, genuine.clone()).await;
    replace(&region2, genuine.clone()).await;
    let (_last, run, _) = restore("last-zeroed", &[]);
    run.assert_code(1);
    run.assert_stderr_has(format!(
        "short of the end of the archive, {} (stored",
        batches[2]
    ));
    for region in [&region1, &region2] {
        region
            .client()
            .put_object()
            .bucket(BUCKET)
            .key(&last_key)
            .body(zstd::encode_all(&last[..], 3).unwrap().into())
            .send()
            .await
            .unwrap();
    }

    // Repositories that lack their marker (unmounted, emptied, a mistyped prefix) cannot
    // say a segment is not archived: recovery stops at the end of what they hold instead of
    // promoting.
    replace(&region1, genuine.clone()).await;
    replace(&region2, genuine).await;
    for region in [&region1, &region2] {
        region
            .client()
            .delete_object()
            .bucket(BUCKET)
            .key(format!("{PREFIX}/lifeboat.json"))
            .send()
            .await
            .unwrap();
    }
    let (_unmounted, run, _) = restore("unmounted", &[]);
    run.assert_code(1);
    assert!(
        run.stderr.contains("holds no marker 'lifeboat.json'")
            && run.stderr.contains("could not restore file"),
        "{}",
        run.stderr
    );
    // PostgreSQL removes recovery.signal when it promotes.
    assert!(
        work.path().join("unmounted/recovery.signal").exists(),
        "a stopped recovery promoted"
    );
}

/// After a failover by restore: a cluster restored to a moment with --keep-archiving is the
/// new primary, archives a new timeline into the job and is backed up. Its base backups used
/// to carry the restore's `recovery_target_time`, and a restore of one to the end stopped at
/// that old moment with exit 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_promoted_restore_becomes_a_primary_whose_backups_restore_whole() {
    let region = SeaweedFs::start().await;
    region.create_bucket(BUCKET).await;
    let work = shared_work_dir();
    let (mut source, config) = archiving_cluster(work.path(), &[&region], "");
    archive_from_restored_copies(&source);
    source.psql("postgres", "create table events (id int primary key)");
    let insert = insert_events;
    insert(&source, 1, 100);
    lifeboat(&config, &["backup", JOB]).assert_code(0);
    insert(&source, 101, 200);
    let target = server_now(&source);
    insert(&source, 201, 300);
    source.archive_current_wal();
    source.stop();

    let primary_dir = work.path().join("new-primary");
    let port = free_port();
    let _primary = Restored(primary_dir.clone());
    let failover = restore_started(
        &config,
        &primary_dir,
        port,
        &["--to-time", &target, "--keep-archiving"],
    );
    failover.assert_code(0);
    assert!(
        failover
            .stdout
            .contains("recovery settings removed from postgresql.auto.conf after promotion"),
        "{}",
        failover.stdout
    );
    let primary = Postgres::attach(port, &source.password);
    let count = |server: &Postgres| server.psql("postgres", "select count(*) from events");
    assert_eq!(count(&primary), "200");
    let auto_conf = std::fs::read_to_string(primary_dir.join("postgresql.auto.conf")).unwrap();
    assert!(
        !auto_conf.contains("recovery_target") && !auto_conf.contains("restore_command"),
        "{auto_conf}"
    );
    assert_eq!(primary.psql("postgres", "show archive_mode"), "on");

    // The new primary is backed up into the same job, and writes on.
    insert(&primary, 1001, 1100);
    let config = physical_config(
        work.path(),
        &[&region],
        port,
        &work.path().join("pg.pass"),
        "",
    );
    lifeboat(&config, &["backup", JOB]).assert_code(0);
    insert(&primary, 1101, 1200);
    primary.archive_current_wal();
    let newest = region
        .manifest_keys(BUCKET)
        .await
        .into_iter()
        .max()
        .unwrap();
    let base = region
        .object(BUCKET, &newest.replace("manifest.json", "base.tar.zst"))
        .await;
    let mut archive = tar::Archive::new(zstd::Decoder::new(&base[..]).unwrap());
    let carried = archive
        .entries()
        .unwrap()
        .map(Result::unwrap)
        .find(|entry| entry.path().unwrap().to_str() == Some("postgresql.auto.conf"))
        .map(|mut entry| std::io::read_to_string(&mut entry).unwrap())
        .unwrap();
    assert!(!carried.contains("recovery_target"), "{carried}");

    // Restored to the end, the new primary's backup brings back every row it had.
    let again = work.path().join("again");
    let again_port = free_port();
    let _again = Restored(again.clone());
    restore_started(&config, &again, again_port, &[]).assert_code(0);
    let restored = Postgres::attach(again_port, &source.password);
    assert_eq!(count(&restored), "400");
    assert_eq!(
        restored.psql("postgres", "select max(id) from events"),
        "1200"
    );
}

/// A failover by restore while the old primary kept running and was backed up into the
/// same job (split brain). A target on the new timeline used to pick the old primary's newer
/// backup and fail with "requested timeline 2 is not a child of this server's history"; a
/// target on the old timeline after the branch could not be reached at all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn targets_on_either_side_of_a_timeline_branch_pick_the_backup_on_their_path() {
    let region = SeaweedFs::start().await;
    region.create_bucket(BUCKET).await;
    let work = shared_work_dir();
    let (source, config) = archiving_cluster(work.path(), &[&region], "");
    archive_from_restored_copies(&source);
    source.psql("postgres", "create table events (id int primary key)");
    let insert = insert_events;
    let ids = |server: &Postgres| {
        server.psql(
            "postgres",
            "select count(*) || ' ' || min(id) || '..' || max(id) from events",
        )
    };
    insert(&source, 1, 100);
    lifeboat(&config, &["backup", JOB]).assert_code(0);
    insert(&source, 101, 200);
    let branch = server_now(&source);
    insert(&source, 201, 300);
    source.archive_current_wal();

    // Timeline 2: restored to the branch moment, promoted, writing.
    let primary_dir = work.path().join("timeline2");
    let port = free_port();
    let _primary = Restored(primary_dir.clone());
    restore_started(
        &config,
        &primary_dir,
        port,
        &["--to-time", &branch, "--keep-archiving"],
    )
    .assert_code(0);
    let primary = Postgres::attach(port, &source.password);
    insert(&primary, 1001, 1100);
    let on_timeline2 = server_now(&primary);
    insert(&primary, 1101, 1200);
    primary.archive_current_wal();

    // The old primary goes on writing on timeline 1 and is backed up after the branch.
    insert(&source, 301, 350);
    let on_timeline1 = server_now(&source);
    insert(&source, 351, 400);
    let split = lifeboat(&config, &["backup", JOB]);
    split.assert_code(0);
    assert!(
        split
            .stderr
            .contains("split brain: timeline 2 branched off this server's timeline 1 at"),
        "{}",
        split.stderr
    );
    source.archive_current_wal();
    let check = lifeboat(&config, &["check"]);
    check.assert_code(1);
    assert!(
        check
            .stdout
            .contains("split brain: timeline 2 in job 'maindb-pitr''s archive"),
        "{}",
        check.stdout
    );

    // A timeline-2 moment: the first backup, on the path, not the old primary's newer one.
    let restore_to = |name: &str, args: &[&str]| {
        let dir = work.path().join(name);
        let port = free_port();
        let run = restore_started(&config, &dir, port, args);
        (Restored(dir), run, port)
    };
    let (_two, run, port2) = restore_to("at-timeline2", &["--to-time", &on_timeline2]);
    run.assert_code(0);
    let first_backup = region
        .manifest_keys(BUCKET)
        .await
        .into_iter()
        .min()
        .unwrap();
    let first_id = first_backup.rsplit('/').nth(1).unwrap();
    run.assert_stdout_has(format!("base backup {first_id}"));
    // 1..200 from timeline 1 up to the branch, then 1001..1100 from timeline 2.
    assert_eq!(
        ids(&Postgres::attach(port2, &source.password)),
        "300 1..1100"
    );

    // A timeline-1 moment after the branch, asked for by its timeline.
    let (_one, run, port1) = restore_to(
        "at-timeline1",
        &["--timeline", "1", "--to-time", &on_timeline1],
    );
    run.assert_code(0);
    assert_eq!(
        ids(&Postgres::attach(port1, &source.password)),
        "350 1..350"
    );

    // To the end of the archive: timeline 2's, from the first backup; the old primary's
    // newer one is passed by, and the report says why.
    let (_end, run, port_end) = restore_to("at-end", &[]);
    run.assert_code(0);
    let split_id = region
        .manifest_keys(BUCKET)
        .await
        .into_iter()
        .max()
        .unwrap();
    let split_id = split_id.rsplit('/').nth(1).unwrap();
    assert!(
        run.stdout.contains(&format!("base backup {first_id}"))
            && run.stdout.contains(&format!(
                "warning: passed by: backup {split_id} (timeline 1"
            ))
            && run.stdout.contains("(split brain)"),
        "{}",
        run.stdout
    );
    assert_eq!(
        ids(&Postgres::attach(port_end, &source.password)),
        "400 1..1200"
    );

    // The old primary's backup is named for what it is.
    let status = lifeboat(&config, &["status"]);
    status.assert_stdout_has("split brain");

    // Timeline 2's history lost: `latest` cannot find timeline 2, and says so rather than
    // end on timeline 1 in silence.
    region
        .client()
        .delete_object()
        .bucket(BUCKET)
        .key(format!(
            "{PREFIX}/jobs/{JOB}/wal/00000002/00000002.history.zst"
        ))
        .send()
        .await
        .unwrap();
    let (_lost, run, _) = restore_to("history-lost", &[]);
    run.assert_code(1);
    assert!(
        run.stderr
            .contains("WAL of a later timeline is archived (from 00000002")
            && run.stderr.contains("the history file 00000002.history"),
        "{}",
        run.stderr
    );
    let status = lifeboat(&config, &["status"]);
    status.assert_stdout_has("its history file, 00000002.history");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_physical_drill_from_the_second_region_measures_the_archive_rpo() {
    let region1 = SeaweedFs::start().await;
    let region2 = SeaweedFs::start().await;
    region1.create_bucket(BUCKET).await;
    region2.create_bucket(BUCKET).await;
    let work = shared_work_dir();
    let (source, config) = archiving_cluster(work.path(), &[&region1, &region2], "");
    source.psql(
        "postgres",
        "create table orders as select i as id from generate_series(1, 1000) i",
    );
    lifeboat(&config, &["backup", JOB]).assert_code(0);
    source.psql(
        "postgres",
        "insert into orders select i from generate_series(1001, 1500) i",
    );

    // The minutely timer's heartbeat reaches the archive through archive_timeout (60 s)
    // alone: nothing forces a WAL switch.
    let beat = lifeboat(&config, &["heartbeat", JOB]);
    beat.assert_code(0);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    while source.psql(
        "postgres",
        "select coalesce(last_archived_time > (select at from lifeboat.heartbeat), false) from pg_stat_archiver",
    ) != "t"
    {
        assert!(
            std::time::Instant::now() < deadline,
            "archive_timeout did not ship the heartbeat within 120 s"
        );
        std::thread::sleep(std::time::Duration::from_millis(500));
    }

    let drill = work.path().join("second-region.toml");
    std::fs::write(
        &drill,
        format!(
            "name = \"second-region\"\njob = \"{JOB}\"\nfrom = \"region2\"\nrto = \"15m\"\nrpo = \"2m\"\n\n\
             [[check]]\nname = \"every order\"\nsql = \"select count(*) from orders\"\nexpect = \"= 1500\"\n"
        ),
    )
    .unwrap();
    let tmp = work.path().join("tmp");
    std::fs::create_dir(&tmp).unwrap();
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o1777)).unwrap();
    // The scratch server replays the archive through lifeboat's relay: the storage
    // credentials in lifeboat's environment never reach the postmaster's, where a check
    // (a superuser there) could read them.
    let child = crate::common::lifeboat_command(&config)
        .env("TMPDIR", &tmp)
        .args(["drill", "run", "--format", "json"])
        .arg(&drill)
        .arg("--report-dir")
        .arg(work.path().join("reports"))
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let sampled = crate::logical_properties::sample(
        child,
        &tmp,
        |argv| argv.contains("postgres -D") || argv.contains("wal-fetch"),
        |_| {},
    );
    let stdout = String::from_utf8_lossy(&sampled.output.stdout).into_owned();
    assert_eq!(
        sampled.output.status.code(),
        Some(0),
        "{stdout}{}",
        String::from_utf8_lossy(&sampled.output.stderr)
    );
    assert!(
        sampled
            .environments
            .iter()
            .any(|(argv, _)| argv.contains("postgres -D")),
        "the scratch postmaster was never seen"
    );
    for (argv, environment) in &sampled.environments {
        assert!(
            !environment
                .iter()
                .any(|v| v.starts_with("AWS_") || v.contains(seaweedfs::SECRET_KEY)),
            "{argv}: {environment:?}"
        );
    }
    let reports: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    let report = &reports["reports"][0];
    assert_eq!(report["passed"], true, "{report}");
    assert_eq!(report["kind"], "postgres-physical");
    assert_eq!(report["repositories"], serde_json::json!(["region2"]));
    let rpo = report["rpo"]["measured_seconds"].as_f64().unwrap();
    assert!(rpo < 120.0, "RPO {rpo} s");
    assert!(
        report["rpo_marker_source"]
            .as_str()
            .unwrap()
            .contains("heartbeat"),
        "{report}"
    );
    let phases: Vec<&str> = report["phases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap())
        .collect();
    assert!(phases.contains(&"WAL replay"), "{phases:?}");
    assert_eq!(
        std::fs::read_dir(&tmp).unwrap().count(),
        0,
        "the scratch cluster is removed"
    );
}

/// A target the archive does not reach stops recovery with PostgreSQL's own error; the
/// restore fails with the log's last lines and how to go on from there (the directory holds
/// a base backup part-way through recovery).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recovery_that_stops_short_says_how_to_go_on() {
    let region = SeaweedFs::start().await;
    region.create_bucket(BUCKET).await;
    let work = shared_work_dir();
    let (source, config) = archiving_cluster(work.path(), &[&region], "");
    source.create_app_database(50_000);
    lifeboat(&config, &["backup", JOB]).assert_code(0);
    source.archive_current_wal();
    let data_dir = work.path().join("restored");
    let _restored = Restored(data_dir.clone());
    let beyond = (chrono::Utc::now() + chrono::Duration::hours(1)).to_rfc3339();
    let run = restore_started(&config, &data_dir, free_port(), &["--to-time", &beyond]);
    assert_ne!(run.code, 0, "{}", run.stdout);
    for said in [
        "recovery ended before configured recovery target was reached",
        "holds the base backup part-way through recovery",
        &format!("pg_ctl -D {} start", data_dir.display()),
    ] {
        assert!(run.stderr.contains(said), "{said}: {}", run.stderr);
    }
    // The server's wal-fetch runs with its own user's home, not the restoring root's: no
    // warning about files it may not read crowds the log's last lines.
    assert!(!run.stderr.contains("Permission denied"), "{}", run.stderr);
}

/// A segment whose last pages are zeros (a damaged disk under the archive) decodes and
/// passes every check before replay; PostgreSQL takes the zeros for the end of WAL and
/// promotes. A drill must fail there, not pass on part of the archive.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_physical_drill_whose_replay_ends_short_of_the_archive_fails() {
    let region = SeaweedFs::start().await;
    region.create_bucket(BUCKET).await;
    let work = shared_work_dir();
    let (source, config) = archiving_cluster(work.path(), &[&region], "");
    source.psql("postgres", "create table events (id int, pad text)");
    lifeboat(&config, &["backup", JOB]).assert_code(0);
    source.psql(
        "postgres",
        "insert into events select i, repeat('x', 200) from generate_series(1, 200000) i",
    );
    source.archive_current_wal();

    // The segment before the last is full: the WAL went on into the last one.
    let mut segments: Vec<String> = region
        .keys(BUCKET, &format!("{PREFIX}/jobs/{JOB}/wal/"))
        .await
        .into_iter()
        .filter(|k| k.ends_with(".zst") && k.rsplit('/').next().unwrap().len() == 28)
        .collect();
    segments.sort();
    assert!(segments.len() >= 4, "{segments:?}");
    let key = segments[segments.len() - 2].clone();
    let name = key.rsplit('/').next().unwrap().trim_end_matches(".zst");
    let damaged = work.path().join("damaged");
    std::fs::create_dir(&damaged).unwrap();
    let segment = damaged.join(name);
    lifeboat(
        &config,
        &["wal-fetch", "--job", JOB, name, segment.to_str().unwrap()],
    )
    .assert_code(0);
    let mut raw = std::fs::read(&segment).unwrap();
    raw[8 << 20..].fill(0);
    std::fs::write(&segment, &raw).unwrap();
    region
        .client()
        .delete_object()
        .bucket(BUCKET)
        .key(&key)
        .send()
        .await
        .unwrap();
    lifeboat(
        &config,
        &["wal-push", "--job", JOB, segment.to_str().unwrap()],
    )
    .assert_code(0);

    // A check that the lost rows do not fail: only the drill's own end check can.
    let drill = work.path().join("short.toml");
    std::fs::write(
        &drill,
        format!(
            "name = \"short\"\njob = \"{JOB}\"\n\n[[check]]\nname = \"some events\"\nsql = \"select count(*) from events\"\nexpect = \">= 1\"\n"
        ),
    )
    .unwrap();
    let tmp = work.path().join("tmp");
    std::fs::create_dir(&tmp).unwrap();
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o1777)).unwrap();
    let run = run_command(
        lifeboat_command(&config)
            .env("TMPDIR", &tmp)
            .args(["drill", "run", "--format", "json"])
            .arg(&drill)
            .arg("--report-dir")
            .arg(work.path().join("reports")),
    );
    run.assert_code(1);
    let reports: serde_json::Value = serde_json::from_str(&run.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}{}", run.stdout, run.stderr));
    let report = &reports["reports"][0];
    assert_eq!(report["passed"], false, "{report}");
    assert!(
        report["failure"]
            .as_str()
            .unwrap()
            .contains("short of the end of the archive"),
        "{report}"
    );
    // The FAILED report says which backup failed and how far the drill got.
    assert_ne!(report["backup"], "latest", "{report}");
    assert_eq!(report["rto"]["met"], false, "{report}");
    assert!(
        report["phases"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p["name"] == "WAL replay"),
        "{report}"
    );
    assert_eq!(
        std::fs::read_dir(&tmp).unwrap().count(),
        0,
        "the scratch cluster is removed"
    );
}
