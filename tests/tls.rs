//! TLS to PostgreSQL with libpq's sslmode meanings, against a real server that refuses every
//! connection without TLS: verify-full needs the right CA and the right host name,
//! verify-ca only the CA, a certificate from another CA is refused with a message that says
//! so, and pg_dump (a child) is held to the same mode.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;

use crate::common::postgres::Postgres;
use crate::common::{Run, Scenario, lifeboat_command, run_command};

fn openssl(dir: &Path, args: &[&str]) {
    let status = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .expect("openssl is installed by .ci/setup");
    assert!(status.success(), "openssl {}", args.join(" "));
}

/// A CA, and a server certificate it signed for the name `localhost` only.
fn certificates(dir: &Path) {
    for ca in ["ca", "other-ca"] {
        openssl(
            dir,
            &[
                "req",
                "-x509",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-days",
                "2",
                "-subj",
                &format!("/CN=lifeboat test {ca}"),
                "-keyout",
                &format!("{ca}.key"),
                "-out",
                &format!("{ca}.crt"),
            ],
        );
    }
    openssl(
        dir,
        &[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            "/CN=localhost",
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
        ],
    );
    std::fs::write(dir.join("san.ext"), "subjectAltName = DNS:localhost\n").unwrap();
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            "san.ext",
            "-out",
            "server.crt",
        ],
    );
    // The server reads its key as postgres, and insists on 0600.
    let key = dir.join("server.key");
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    assert!(
        Command::new("chown")
            .arg("postgres")
            .arg(&key)
            .status()
            .unwrap()
            .success()
    );
}

fn backup_with(work: &Path, source: &Postgres, dsn: &str) -> Run {
    let dir = tempfile::tempdir_in(work).unwrap();
    let password_file = source.password_file(dir.path(), &source.password);
    let config = Scenario::new(dir.path())
        .local("local", &dir.path().join("repo"))
        .postgres_job("maindb", dsn, &password_file, "databases = [\"app\"]")
        .write();
    let mut command = lifeboat_command(&config);
    command.args(["backup", "maindb"]);
    run_command(&mut command)
}

#[test]
fn postgres_connections_honour_sslmode_up_to_verify_full() {
    let work = tempfile::tempdir().unwrap();
    std::fs::set_permissions(work.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let certs = work.path();
    certificates(certs);
    let source = Postgres::start_with(
        &[
            "ssl=on".to_string(),
            format!("ssl_cert_file={}", certs.join("server.crt").display()),
            format!("ssl_key_file={}", certs.join("server.key").display()),
        ],
        &[],
    );
    source.psql("postgres", "create database app");
    source.psql(
        "app",
        "create table t (id int); insert into t select generate_series(1, 100)",
    );
    // From here on the server refuses every TCP connection without TLS.
    let hba = source.dir.path().join("data/pg_hba.conf");
    let rules = std::fs::read_to_string(&hba).unwrap();
    std::fs::write(
        &hba,
        format!("hostnossl all all 0.0.0.0/0 reject\nhostnossl all all ::/0 reject\n{rules}"),
    )
    .unwrap();
    source.psql("postgres", "select pg_reload_conf()");

    let ca = certs.join("ca.crt");
    let other_ca = certs.join("other-ca.crt");
    let dsn = |host: &str, mode: &str, root: &Path| {
        format!(
            "postgresql://postgres@{host}:{}/postgres?sslmode={mode}&sslrootcert={}",
            source.port,
            root.display()
        )
    };

    // verify-full to the name in the certificate, with the CA that signed it: lifeboat's own
    // connection and pg_dump's both pass.
    backup_with(work.path(), &source, &dsn("localhost", "verify-full", &ca)).assert_code(0);
    // The same in key=value form.
    let key_value = format!(
        "host=localhost port={} user=postgres dbname=postgres sslmode=verify-full sslrootcert='{}'",
        source.port,
        ca.display()
    );
    backup_with(work.path(), &source, &key_value).assert_code(0);

    // A certificate from another CA is refused, and the message says what to check.
    let stranger = backup_with(
        work.path(),
        &source,
        &dsn("localhost", "verify-full", &other_ca),
    );
    stranger.assert_code(1);
    assert!(
        stranger.stderr.contains("certificate") && stranger.stderr.contains("sslrootcert"),
        "{}",
        stranger.stderr
    );
    // The host connected to is not the name in the certificate: verify-full refuses,
    // verify-ca (the chain only) accepts.
    let by_address = backup_with(work.path(), &source, &dsn("127.0.0.1", "verify-full", &ca));
    by_address.assert_code(1);
    by_address.assert_stderr_has("certificate");
    backup_with(work.path(), &source, &dsn("127.0.0.1", "verify-ca", &ca)).assert_code(0);
    // Without TLS the server turns lifeboat away: the passes above were over TLS.
    let plain = backup_with(work.path(), &source, &dsn("localhost", "disable", &ca));
    plain.assert_code(1);
    plain.assert_stderr_has("no encryption");
}
