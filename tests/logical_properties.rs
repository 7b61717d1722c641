//! What a logical restore brings back beyond the rows: each database as its source created
//! it (encoding, locale provider, collation, owner, privileges, settings, comment, connection
//! limit); what a least-privilege backup lacks, said at backup and made safe at restore; and
//! secrets kept from the children that do not need them, and from other users.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::common::postgres::Postgres;
use crate::common::{
    Scenario, lifeboat, lifeboat_command, local_repository, maindb_config, postgres_job, procs,
    run_command, write_config, write_secret,
};

/// `pg_dumpall --no-role-passwords` of `cluster`, without the random `\restrict` keys and
/// the comments that name the server.
fn dumpall(cluster: &Postgres) -> String {
    let mut command =
        std::process::Command::new(crate::common::postgres::bin_dir().join("pg_dumpall"));
    command
        .env("PGPASSWORD", &cluster.password)
        .arg(format!("--dbname={}", cluster.dsn("postgres")))
        .arg("--no-role-passwords");
    let run = run_command(&mut command);
    run.assert_code(0);
    run.stdout
        .lines()
        .filter(|line| !line.starts_with("\\restrict ") && !line.starts_with("\\unrestrict "))
        .filter(|line| !line.starts_with("--"))
        .collect::<Vec<_>>()
        .join("\n")
}

fn restore(config: &Path, target: &Postgres, args: &[&str]) -> crate::common::Run {
    let mut command = lifeboat_command(config);
    command
        .env("PGPASSWORD", &target.password)
        .args(["restore", "maindb", "--target", &target.dsn("postgres")])
        .args(args);
    run_command(&mut command)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_comes_back_as_its_source_created_it() {
    let source = Postgres::start();
    for sql in [
        "create role owner1 login",
        "create role reader nologin",
        "create database lat with template template0 encoding 'LATIN1' locale 'C' owner owner1 connection limit 7",
        "revoke connect, temporary on database lat from public",
        "grant connect on database lat to reader",
        "alter database lat set work_mem = '8MB'",
        "alter role reader in database lat set search_path = 'shop'",
        "comment on database lat is 'the DATABASE lat; with a quote '' in it'",
        "create database icu with template template0 locale_provider icu icu_locale 'de-DE' locale 'C.UTF-8'",
    ] {
        source.psql("postgres", sql);
    }
    source.psql(
        "lat",
        "create table t (a text); insert into t values ('caf\u{e9}')",
    );
    source.psql(
        "icu",
        "create table words (w text); insert into words values ('a'), ('B'), ('\u{e4}'), ('z')",
    );
    let words = "select string_agg(w, ' ' order by w) from words";
    let ordered = source.psql("icu", words);
    assert_eq!(ordered, "a \u{e4} B z", "ICU orders as German does");

    let work = tempfile::tempdir().unwrap();
    let config = maindb_config(work.path(), &source, &["lat", "icu"], "");
    lifeboat(&config, &["backup", "maindb"]).assert_code(0);

    // Into a fresh cluster, with the roles: pg_dumpall of both are the same.
    let target = Postgres::start();
    let run = restore(&config, &target, &["--globals"]);
    run.assert_code(0);
    assert_eq!(dumpall(&target), dumpall(&source), "{}", run.stdout);
    assert_eq!(target.psql("icu", words), ordered);

    // Under another name, with the same properties.
    restore(&config, &target, &["--database", "lat", "--as", "lat2"]).assert_code(0);
    let properties = "select pg_encoding_to_char(encoding) || ' ' || datcollate || ' ' || datconnlimit || ' ' \
                      || pg_get_userbyid(datdba) || ' ' || datacl::text || ' ' || shobj_description(oid, 'pg_database') \
                      from pg_database where datname = '%s'";
    assert_eq!(
        target.psql("postgres", &properties.replace("%s", "lat2")),
        source.psql("postgres", &properties.replace("%s", "lat"))
    );
    assert_eq!(
        target.psql(
            "postgres",
            "select string_agg(array_to_string(setconfig, ','), ';' order by setrole) from pg_db_role_setting s \
             join pg_database d on d.oid = s.setdatabase where datname = 'lat2'"
        ),
        "work_mem=8MB;search_path=shop"
    );
    assert_eq!(target.psql("lat2", "select a from t"), "caf\u{e9}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_least_privilege_backup_says_what_it_lacks_and_restores_no_login_without_a_password() {
    let source = Postgres::start();
    for sql in [
        "create role backup login password 'backup-pw' in role pg_read_all_data",
        "create role appuser login password 'app-pw'",
        "create database app owner appuser",
        "create database nolimit connection limit 0",
        "create database closed",
        "alter database closed allow_connections false",
        "create database lodb",
    ] {
        source.psql("postgres", sql);
    }
    source.psql("app", "create table t (a int); insert into t values (1)");
    let work = tempfile::tempdir().unwrap();
    let password_file = work.path().join("backup.pass");
    write_secret(&password_file, "backup-pw", 0o600);
    let dsn = source.dsn_as("backup", "postgres");
    let config = write_config(
        work.path(),
        &format!(
            "{}{}[[job]]\nname = \"lobs\"\nkind = \"postgres\"\nmode = \"logical\"\ndsn = \"{dsn}\"\npassword_file = \"{}\"\ndatabases = [\"lodb\"]\n",
            local_repository("local", &work.path().join("repo")),
            postgres_job("maindb", &dsn, &password_file, ""),
            password_file.display()
        ),
    );
    let run = lifeboat(&config, &["backup", "maindb"]);
    run.assert_code(0);
    for said in [
        "note: no role passwords",
        "note: database 'closed' was not backed up: it does not accept connections",
        "note: database 'nolimit' was not backed up: its connection limit is 0",
    ] {
        assert!(run.stdout.contains(said), "{said}\n{}", run.stdout);
    }
    let show = lifeboat(&config, &["show", "latest", "--job", "maindb"]);
    show.assert_code(0);
    show.assert_stdout_has("no role passwords");
    show.assert_stdout_has("'nolimit' was not backed up");

    // Large objects are not pg_read_all_data's: the failure names the grant.
    source.psql("lodb", "select lo_from_bytea(0, 'hello')");
    let run = lifeboat(&config, &["backup", "lobs"]);
    assert_ne!(run.code, 0);
    assert!(
        run.stderr.contains("permission denied for large object")
            && run.stderr.contains("GRANT SELECT ON LARGE OBJECT"),
        "{}",
        run.stderr
    );

    // Restored, the roles that had a password cannot log in until given one, and it says so.
    let target = Postgres::start();
    let run = restore(&config, &target, &["--globals", "--database", "app"]);
    run.assert_code(0);
    run.assert_stdout_has("created NOLOGIN: 'appuser', 'backup'");
    assert_eq!(
        target.psql(
            "postgres",
            "select string_agg(rolname || '=' || rolcanlogin, ',' order by rolname) from pg_roles where rolname in ('appuser', 'backup')"
        ),
        "appuser=false,backup=false"
    );
    let other = Postgres::start();
    let run = restore(
        &config,
        &other,
        &["--globals", "--database", "app", "--keep-login"],
    );
    run.assert_code(0);
    assert!(
        run.stdout
            .contains("can now log in without one being set: 'appuser', 'backup'"),
        "{}",
        run.stdout
    );
    assert_eq!(
        other.psql(
            "postgres",
            "select rolcanlogin from pg_roles where rolname = 'appuser'"
        ),
        "t"
    );
}

/// The environment of process `pid`, as `NAME=value` strings.
pub(crate) fn environment_of(pid: u32) -> Vec<String> {
    std::fs::read(format!("/proc/{pid}/environ"))
        .map(|raw| {
            raw.split(|b| *b == 0)
                .map(|v| String::from_utf8_lossy(v).into_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// Every file under `dir` that the user nobody can read, found by `find` running as nobody.
fn readable_by_nobody(dir: &Path) -> Vec<String> {
    use std::os::unix::process::CommandExt;
    let output = Command::new("find")
        .arg(dir)
        .args(["-type", "f", "-readable"])
        .uid(65534)
        .gid(65534)
        .stderr(Stdio::null())
        .output()
        .unwrap();
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(str::to_string)
        .collect()
}

/// A TMPDIR anyone may write into, as /var/tmp is, on a path anyone may walk.
fn shared_tmp(work: &Path) -> PathBuf {
    let tmp = work.join("tmp");
    std::fs::create_dir(&tmp).unwrap();
    std::fs::set_permissions(work, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o1777)).unwrap();
    tmp
}

/// What `sample` saw: the child's output, files nobody else should have read, and each
/// watched descendant's argv with its environment.
pub(crate) struct Sampled {
    pub output: std::process::Output,
    pub readable: Vec<String>,
    pub environments: Vec<(String, Vec<String>)>,
}

/// Samples, every few milliseconds until `child` ends: files under `tmp` nobody can read,
/// and the environments of its descendants whose argv passes `watched`.
pub(crate) fn sample(
    mut child: Child,
    tmp: &Path,
    watched: impl Fn(&str) -> bool,
    mut on_first_sight: impl FnMut(&str),
) -> Sampled {
    let mut readable = Vec::new();
    let mut environments = Vec::new();
    let mut seen = std::collections::BTreeSet::new();
    while child.try_wait().unwrap().is_none() {
        if crate::common::is_root() {
            readable.extend(readable_by_nobody(tmp));
        }
        for (pid, argv) in procs::descendant_argvs(child.id()) {
            if watched(&argv) && seen.insert(pid) {
                on_first_sight(&argv);
                environments.push((argv, environment_of(pid)));
            }
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    Sampled {
        output: child.wait_with_output().unwrap(),
        readable,
        environments,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plaintext_and_secrets_stay_with_lifeboat() {
    let source = Postgres::start();
    source.create_app_database(200_000);
    let work = tempfile::tempdir().unwrap();
    let tmp = shared_tmp(work.path());
    let identity = work.path().join("restore.key");
    let keygen = lifeboat(
        &work.path().join("unused.toml"),
        &["keygen", "--output", identity.to_str().unwrap()],
    );
    keygen.assert_code(0);
    let config = maindb_config(
        work.path(),
        &source,
        &["app"],
        &format!(
            "[encryption]\nrecipients = [\"{}\"]\n\n",
            keygen.stdout.trim()
        ),
    );
    lifeboat(&config, &["backup", "maindb"]).assert_code(0);
    const PG_SECRET: &str = "pg-secret-in-the-environment";
    let secrets = [
        crate::common::seaweedfs::SECRET_KEY,
        PG_SECRET,
        source.password.as_str(),
    ];
    let holds_secret = |environment: &[String]| {
        environment
            .iter()
            .filter(|v| secrets.iter().any(|secret| v.contains(secret)))
            .cloned()
            .collect::<Vec<_>>()
    };

    // An encrypted dump staged decompressed for pg_restore --jobs: nothing anyone else can
    // read, at any moment; pg_restore gets its password from a passfile nobody else has.
    let target = Postgres::start();
    let child = lifeboat_command(&config)
        .env("TMPDIR", &tmp)
        .env("LIFEBOAT_IDENTITY_FILE", &identity)
        .env("PGPASSWORD", &target.password)
        .args(["restore", "maindb", "--target", &target.dsn("postgres")])
        .args(["--parallel-data", "--jobs", "2", "--globals"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let Sampled {
        output,
        readable,
        environments,
    } = sample(child, &tmp, |argv| argv.contains("pg_restore"), |_| {});
    assert_eq!(
        output.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert_eq!(readable, Vec::<String>::new(), "readable by nobody");
    assert!(!environments.is_empty(), "pg_restore was never seen");
    for (argv, environment) in &environments {
        assert_eq!(holds_secret(environment), Vec::<String>::new(), "{argv}");
        assert!(
            environment
                .iter()
                .any(|v| v.starts_with("PGPASSFILE=/proc/self/fd/")),
            "{argv}: {environment:?}"
        );
    }
    assert_eq!(std::fs::read_dir(&tmp).unwrap().count(), 0);

    // Killed while staging, it leaves the staged plaintext in its private directory; the
    // next restore removes it and says so.
    let mut child = lifeboat_command(&config)
        .env("TMPDIR", &tmp)
        .env("LIFEBOAT_IDENTITY_FILE", &identity)
        .env("PGPASSWORD", &target.password)
        .args([
            "restore",
            "maindb",
            "--target",
            &target.dsn("postgres"),
            "--as",
            "app2",
            "--database",
            "app",
        ])
        .arg("--parallel-data")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    procs::wait_for_descendant(&mut child, |argv| argv.contains("pg_restore"))
        .expect("the restore reached pg_restore");
    child.kill().unwrap();
    child.wait().unwrap();
    let left: Vec<_> = std::fs::read_dir(&tmp)
        .unwrap()
        .filter_map(Result::ok)
        .map(|e| e.path())
        .collect();
    assert_eq!(left.len(), 1, "{left:?}");
    let run = run_command(
        lifeboat_command(&config)
            .env("TMPDIR", &tmp)
            .env("LIFEBOAT_IDENTITY_FILE", &identity)
            .env("PGPASSWORD", &target.password)
            .args([
                "restore",
                "maindb",
                "--target",
                &target.dsn("postgres"),
                "--as",
                "app2",
                "--database",
                "app",
            ]),
    );
    run.assert_code(0);
    assert!(
        run.stderr
            .contains("removed the staging directory of a restore that was stopped")
            && run.stderr.contains(&left[0].display().to_string()),
        "{}",
        run.stderr
    );
    assert_eq!(std::fs::read_dir(&tmp).unwrap().count(), 0);

    // A drill's scratch postmaster and pg_restore hold none of lifeboat's secrets.
    let drill = work.path().join("drill.toml");
    std::fs::write(
        &drill,
        "name = \"secrets\"\njob = \"maindb\"\ndatabase = \"app\"\n\n[[check]]\nname = \"orders\"\nsql = \"select count(*) from shop.orders\"\nexpect = \">= 1\"\n",
    )
    .unwrap();
    let mut stranger_connected = Vec::new();
    let child = lifeboat_command(&config)
        .env("TMPDIR", &tmp)
        .env("LIFEBOAT_IDENTITY_FILE", &identity)
        .env("PGPASSWORD", PG_SECRET)
        .args(["drill", "run"])
        .arg(&drill)
        .arg("--report-dir")
        .arg(work.path().join("reports"))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let Sampled {
        output,
        environments,
        ..
    } = sample(
        child,
        &tmp,
        |argv| argv.contains("pg_restore") || argv.contains("postgres -D"),
        |argv| {
            // Another user tries the scratch cluster's socket, which trusts whoever reaches it.
            let Some(socket_dir) = argv.split(" -k ").nth(1).and_then(|r| r.split(' ').next())
            else {
                return;
            };
            if !crate::common::is_root() {
                return;
            }
            use std::os::unix::process::CommandExt;
            let port = argv
                .split(" -p ")
                .nth(1)
                .and_then(|r| r.split(' ').next())
                .unwrap();
            let tried = Command::new(crate::common::postgres::bin_dir().join("psql"))
                .args([
                    "-h", socket_dir, "-p", port, "-U", "postgres", "-d", "postgres",
                ])
                .args(["--no-psqlrc", "-Atc", "select 1"])
                .env_clear()
                .uid(65534)
                .gid(65534)
                .output()
                .unwrap();
            stranger_connected.push(tried.status.success());
        },
    );
    assert!(
        !stranger_connected.is_empty() || !crate::common::is_root(),
        "the scratch postmaster's socket was never tried"
    );
    assert!(
        stranger_connected.iter().all(|connected| !connected),
        "another user reached the scratch cluster"
    );
    assert_eq!(
        output.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        environments
            .iter()
            .any(|(argv, _)| argv.contains("postgres -D")),
        "the scratch postmaster was never seen"
    );
    for (argv, environment) in &environments {
        assert_eq!(holds_secret(environment), Vec::<String>::new(), "{argv}");
        assert!(
            !environment.iter().any(|v| v.starts_with("AWS_")),
            "{argv}: {environment:?}"
        );
    }
}

/// The heartbeat goes into a database that anyone with CREATEDB may own: a schema or table
/// named lifeboat.heartbeat made there by another role (with a trigger that would run as
/// the backup role, a superuser) is refused before a row is written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_heartbeat_table_another_role_made_is_refused() {
    let cluster = Postgres::start();
    cluster.psql("postgres", "create role app login createdb");
    cluster.psql("postgres", "create database shop2 owner app");
    cluster.psql(
        "shop2",
        "set role app; \
         create schema lifeboat; \
         create table lifeboat.heartbeat (job text primary key, at timestamptz not null); \
         create table lifeboat.ran_as (who text); \
         create function lifeboat.hook() returns trigger language plpgsql as \
           $$begin insert into lifeboat.ran_as values (current_user); return new; end$$; \
         create trigger hook before insert on lifeboat.heartbeat \
           for each row execute function lifeboat.hook()",
    );
    let work = tempfile::tempdir().unwrap();
    let password_file = cluster.password_file(work.path(), &cluster.password);
    let config = Scenario::new(work.path())
        .local("local", &work.path().join("repo"))
        .postgres_job(
            "shop2",
            &cluster.dsn("shop2"),
            &password_file,
            "heartbeat = true",
        )
        .write();
    let refused = lifeboat(&config, &["heartbeat", "shop2"]);
    refused.assert_code(1);
    assert!(
        refused.stderr.contains("refusing to write the heartbeat")
            && refused.stderr.contains("belongs to role 'app'"),
        "{}",
        refused.stderr
    );
    assert_eq!(
        cluster.psql(
            "shop2",
            "select (select count(*) from lifeboat.ran_as) + (select count(*) from lifeboat.heartbeat)"
        ),
        "0"
    );

    // Made again by lifeboat itself, it is written.
    cluster.psql("shop2", "drop schema lifeboat cascade");
    lifeboat(&config, &["heartbeat", "shop2"]).assert_code(0);
    assert_eq!(
        cluster.psql("shop2", "select count(*) from lifeboat.heartbeat"),
        "1"
    );

    // No session of lifeboat's takes the owner's search_path: a function of theirs named
    // like one lifeboat calls (the backup's pg_export_snapshot) is never the one called.
    cluster.psql(
        "shop2",
        "set role app; \
         create table public.ran_as (who text); \
         create function public.pg_export_snapshot() returns text language plpgsql as \
           $$begin insert into public.ran_as values (current_user); \
           return pg_catalog.pg_export_snapshot(); end$$; \
         alter database shop2 set search_path = public, pg_catalog",
    );
    let backup = lifeboat(&config, &["backup", "shop2"]);
    backup.assert_code(0);
    assert_eq!(
        cluster.psql("shop2", "select count(*) from public.ran_as"),
        "0"
    );
}
