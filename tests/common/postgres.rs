//! A real PostgreSQL for tests: a scratch cluster made with initdb in a temp dir (as the
//! `postgres` user when the tests run as root, since initdb refuses root), listening on a
//! free loopback port with password authentication, stopped by its pid when dropped.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::Run;

pub const SUPERUSER: &str = "postgres";

pub struct Postgres {
    child: Option<Child>,
    pub dir: tempfile::TempDir,
    pub port: u16,
    /// The superuser's password; it has a ':' and a '\' so passfile escaping is exercised.
    pub password: String,
    /// `-c name=value` settings beyond the defaults, and environment for the server.
    settings: Vec<String>,
    env: Vec<(String, String)>,
}

pub fn bin_dir() -> PathBuf {
    if let Ok(dir) = std::env::var("LIFEBOAT_TEST_PG_BIN") {
        return PathBuf::from(dir);
    }
    let mut found: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .map(|entries| {
            entries
                .filter_map(Result::ok)
                .map(|e| e.path().join("bin"))
                .filter(|p| p.join("initdb").exists())
                .collect()
        })
        .unwrap_or_default();
    found.sort();
    found.pop().unwrap_or_else(|| {
        panic!("PostgreSQL server binaries (initdb, postgres) are needed for the PostgreSQL tests; run `bash .ci/setup` (it installs postgresql), or set LIFEBOAT_TEST_PG_BIN")
    })
}

fn postgres_ids() -> (u32, u32) {
    let name = std::ffi::CString::new("postgres").unwrap();
    // SAFETY: getpwnam returns static storage or null; the ids are copied out at once.
    unsafe {
        let entry = libc::getpwnam(name.as_ptr());
        assert!(
            !entry.is_null(),
            "the `postgres` user is needed to run initdb as root; run `bash .ci/setup`"
        );
        ((*entry).pw_uid, (*entry).pw_gid)
    }
}

fn as_cluster_owner(command: &mut Command) {
    if super::is_root() {
        use std::os::unix::process::CommandExt;
        let (uid, gid) = postgres_ids();
        command.uid(uid).gid(gid);
    }
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind(("127.0.0.1", 0))
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl Postgres {
    pub fn start() -> Postgres {
        Postgres::start_with(&[], &[])
    }

    /// A server with extra `name=value` settings, whose processes (archive_command too)
    /// get `env`.
    pub fn start_with(settings: &[String], env: &[(&str, &str)]) -> Postgres {
        let dir = tempfile::tempdir().unwrap();
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .subsec_nanos();
        let password = format!("pw:{}\\{nanos}", std::process::id());
        if super::is_root() {
            let (uid, gid) = postgres_ids();
            std::os::unix::fs::chown(dir.path(), Some(uid), Some(gid)).unwrap();
        }
        let pwfile = dir.path().join("pwfile");
        std::fs::write(&pwfile, format!("{password}\n")).unwrap();
        if super::is_root() {
            let (uid, gid) = postgres_ids();
            std::os::unix::fs::chown(&pwfile, Some(uid), Some(gid)).unwrap();
        }
        let mut initdb = Command::new(bin_dir().join("initdb"));
        initdb
            .arg("-D")
            .arg(dir.path().join("data"))
            .args([
                "-U",
                SUPERUSER,
                "--auth=scram-sha-256",
                "-E",
                "UTF8",
                "--locale=C.UTF-8",
                "--no-sync",
            ])
            .arg(format!("--pwfile={}", pwfile.display()));
        as_cluster_owner(&mut initdb);
        let output = initdb.output().expect("run initdb");
        assert!(
            output.status.success(),
            "initdb failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        std::fs::remove_file(&pwfile).unwrap();

        let mut server = Postgres {
            child: None,
            dir,
            port: 0,
            password,
            settings: settings.to_vec(),
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        };
        for _ in 0..5 {
            server.port = free_port();
            server.spawn();
            if server.wait_ready() {
                return server;
            }
            server.stop();
        }
        let log =
            std::fs::read_to_string(server.dir.path().join("postgres.log")).unwrap_or_default();
        panic!("PostgreSQL did not start; its log:\n{log}");
    }

    fn spawn(&mut self) {
        let log = std::fs::File::create(self.dir.path().join("postgres.log")).unwrap();
        let mut command = Command::new(bin_dir().join("postgres"));
        command
            .arg("-D")
            .arg(self.dir.path().join("data"))
            .arg("-p")
            .arg(self.port.to_string())
            .arg("-k")
            .arg(self.dir.path())
            .args([
                "-c",
                "listen_addresses=127.0.0.1",
                "-c",
                "fsync=off",
                "-c",
                "full_page_writes=off",
            ])
            .args(["-c", "synchronous_commit=off", "-c", "max_connections=50"])
            .args(self.settings.iter().flat_map(|s| ["-c", s.as_str()]))
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        as_cluster_owner(&mut command);
        self.child = Some(command.spawn().expect("start postgres"));
    }

    fn wait_ready(&mut self) -> bool {
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if self.child.as_mut().unwrap().try_wait().unwrap().is_some() {
                return false;
            }
            if self.try_psql("postgres", "select 1").code == 0 {
                return true;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        false
    }

    /// Fast shutdown (SIGINT) of the postmaster we started, then wait for it.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
            let deadline = Instant::now() + Duration::from_secs(20);
            while Instant::now() < deadline {
                if child.try_wait().unwrap().is_some() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// A server that something else started (a restore with `--start`) on `port`, reached
    /// with `password`; dropping it stops nothing.
    pub fn attach(port: u16, password: &str) -> Postgres {
        Postgres {
            child: None,
            dir: tempfile::tempdir().unwrap(),
            port,
            password: password.to_string(),
            settings: Vec::new(),
            env: Vec::new(),
        }
    }

    /// Switches to a new WAL segment and waits until the archiver has archived the one
    /// that ended, so everything committed before is in the archive.
    pub fn archive_current_wal(&self) -> String {
        let segment = self.psql("postgres", "select pg_walfile_name(pg_switch_wal())");
        let deadline = Instant::now() + Duration::from_secs(90);
        loop {
            let archived = self.psql(
                "postgres",
                "select coalesce(last_archived_wal, '') || '|' || coalesce(last_failed_wal, '') from pg_stat_archiver",
            );
            let (last, _failed) = archived.split_once('|').unwrap();
            if last.len() >= 24 && &last[..24] >= segment.as_str() {
                return segment;
            }
            assert!(
                Instant::now() < deadline,
                "segment {segment} was not archived within 90 s (pg_stat_archiver: {archived}); server log:\n{}",
                std::fs::read_to_string(self.dir.path().join("postgres.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn dsn(&self, database: &str) -> String {
        format!(
            "postgresql://{SUPERUSER}@127.0.0.1:{}/{database}",
            self.port
        )
    }

    pub fn dsn_as(&self, user: &str, database: &str) -> String {
        format!("postgresql://{user}@127.0.0.1:{}/{database}", self.port)
    }

    /// A psql command against this server with the superuser's password in its environment.
    pub fn command(&self, program: &str, database: &str) -> Command {
        let mut command = Command::new(bin_dir().join(program));
        command
            .env("PGPASSWORD", &self.password)
            .env("PGCONNECT_TIMEOUT", "5")
            .arg(format!("--dbname={}", self.dsn(database)));
        command
    }

    pub fn try_psql(&self, database: &str, sql: &str) -> Run {
        let mut command = self.command("psql", database);
        command.args([
            "--no-psqlrc",
            "-v",
            "ON_ERROR_STOP=1",
            "--tuples-only",
            "--no-align",
            "--quiet",
            "-c",
            sql,
        ]);
        super::run_command(&mut command)
    }

    #[track_caller]
    pub fn psql(&self, database: &str, sql: &str) -> String {
        let run = self.try_psql(database, sql);
        run.assert_code(0);
        run.stdout.trim().to_string()
    }

    /// Writes a password file for `password`, readable only by its owner.
    pub fn password_file(&self, dir: &Path, password: &str) -> PathBuf {
        let path = dir.join(format!("pg-{}.pass", self.port));
        super::write_secret(&path, password, 0o600);
        path
    }

    /// A realistic application database `app`, owned by the role `app_owner`: foreign keys,
    /// indexes, a sequence, a view, a function, non-ASCII text, bytea, NULLs, a large object,
    /// a comment, a grant, and `orders_rows` rows in one table (at least 50 000: the order
    /// lines refer to the first 50 000 orders).
    pub fn create_app_database(&self, orders_rows: u64) {
        assert!(orders_rows >= 50_000, "the order lines need 50 000 orders");
        self.psql(
            "postgres",
            "create role app_owner login password 'app-owner-pw'; create role app_reader nologin",
        );
        self.psql("postgres", "create database app owner app_owner");
        self.psql(
            "app",
            &APP_SCHEMA.replace("ORDERS_ROWS", &orders_rows.to_string()),
        );
    }

    /// For every user table of `database`: its name and an ordered checksum of its rows;
    /// then sequences' values and large objects.
    pub fn data_fingerprint(&self, database: &str) -> String {
        let tables = self.psql(
            database,
            "select format('%I.%I', n.nspname, c.relname) from pg_class c join pg_namespace n on n.oid = c.relnamespace \
             where c.relkind = 'r' and n.nspname not in ('pg_catalog', 'information_schema') order by 1",
        );
        let mut lines = Vec::new();
        for table in tables.lines() {
            let sum = self.psql(database, &format!("select count(*) || ' ' || coalesce(md5(string_agg(t::text, E'\\n' order by t::text)), '-') from {table} t"));
            lines.push(format!("{table} {sum}"));
        }
        lines.push(self.psql(
            database,
            "select coalesce(string_agg(format('%I.%I=%s', schemaname, sequencename, last_value), ',' order by schemaname, sequencename), '-') from pg_sequences",
        ));
        lines.push(self.psql(
            database,
            "select count(*) || ' ' || coalesce(md5(string_agg(oid::text || ':' || encode(lo_get(oid), 'hex'), ',' order by oid)), '-') from pg_largeobject_metadata",
        ));
        lines.join("\n")
    }

    /// `pg_dump --schema-only` of `database`, without the random `\restrict` key that
    /// recent pg_dump versions write into every dump.
    pub fn schema(&self, database: &str) -> String {
        let mut command = self.command("pg_dump", database);
        command.arg("--schema-only");
        let run = super::run_command(&mut command);
        run.assert_code(0);
        run.stdout
            .lines()
            .filter(|line| !line.starts_with("\\restrict ") && !line.starts_with("\\unrestrict "))
            .collect::<Vec<_>>()
            .join("\n")
    }
}

/// Stops (fast shutdown) the server running from `data_dir` that a test had lifeboat start,
/// by the pid in its postmaster.pid.
pub fn stop_data_dir(data_dir: &Path) {
    let Ok(pid_file) = std::fs::read_to_string(data_dir.join("postmaster.pid")) else {
        return;
    };
    let pid: i32 = pid_file.lines().next().unwrap().trim().parse().unwrap();
    unsafe { libc::kill(pid, libc::SIGINT) };
    let deadline = Instant::now() + Duration::from_secs(30);
    // A daemonized postmaster is not our child to reap; its pid file goes when it ends.
    while data_dir.join("postmaster.pid").exists() && unsafe { libc::kill(pid, 0) } == 0 {
        if Instant::now() > deadline {
            unsafe { libc::kill(pid, libc::SIGKILL) };
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        self.stop();
    }
}

const APP_SCHEMA: &str = r#"
set role app_owner;
create schema shop;
create table shop.customers (
    id bigserial primary key,
    name text not null,
    email text unique,
    country text,
    note text
);
create table shop.orders (
    id bigserial primary key,
    customer_id bigint not null references shop.customers (id),
    created_at timestamptz not null,
    total numeric(12, 2),
    status text check (status in ('new', 'paid', 'shipped'))
);
create index orders_by_customer on shop.orders (customer_id, created_at);
create table shop.order_lines (
    order_id bigint references shop.orders (id) on delete cascade,
    line int,
    sku text,
    qty int,
    payload bytea,
    primary key (order_id, line)
);
create sequence shop.invoice_numbers start 1000;
create view shop.customer_totals as
    select c.id, c.name, sum(o.total) as total
    from shop.customers c left join shop.orders o on o.customer_id = c.id
    group by c.id, c.name;
create function shop.order_count(cid bigint) returns bigint language sql stable
    as $$ select count(*) from shop.orders where customer_id = cid $$;
comment on table shop.orders is 'Bestellungen — orders ✓';
insert into shop.customers (name, email, country, note)
    select 'Kunde ' || i || ' Ærøskøbing 東京 ✓', 'c' || i || '@example.com',
           case when i % 7 = 0 then null else 'DE' end,
           case when i % 3 = 0 then null else repeat('ü', i % 20) end
    from generate_series(1, 10000) i;
insert into shop.orders (customer_id, created_at, total, status)
    select 1 + (i % 10000), timestamptz '2026-01-01 00:00:00+00' + i * interval '1 second',
           (i % 100000) / 7.0, (array['new', 'paid', 'shipped'])[1 + i % 3]
    from generate_series(1, ORDERS_ROWS) i;
insert into shop.order_lines
    select i, 1, 'SKU-' || i, i % 5, case when i % 4 = 0 then null else decode(md5(i::text), 'hex') end
    from generate_series(1, 50000) i;
select setval('shop.invoice_numbers', 4242);
-- A live shop: its newest order is from now, as a drill's freshness check expects.
update shop.orders set created_at = now() where id = (select max(id) from shop.orders);
select lo_from_bytea(0, convert_to('large object ✓ payload', 'UTF8'));
grant select on shop.customers to app_reader;
reset role;
analyze;
"#;
