//! Drill and key edges: every run keeps its own report, a drill refused before it starts
//! still leaves a FAILED one, a check that returns several rows fails, reports escape and
//! cut what the data returned and never hold a secret; identities kept under a passphrase,
//! SSH recipients and a rekey that would lock this host out are refused by name.

use std::io::Write;
use std::path::Path;

use crate::common::postgres::Postgres;
use crate::common::{
    Scenario, lifeboat, lifeboat_command, local_repository, run_command, write_config,
};

fn drill_run(config: &Path, file: &Path, reports: &Path) -> crate::common::Run {
    run_command(
        lifeboat_command(config)
            .args(["drill", "run"])
            .arg(file)
            .arg("--report-dir")
            .arg(reports),
    )
}

fn reports_in(dir: &Path, extension: &str) -> Vec<std::path::PathBuf> {
    let mut found: Vec<_> = std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .filter_map(Result::ok)
                .map(|e| e.path())
                .filter(|p| p.extension().is_some_and(|e| e == extension))
                .collect()
        })
        .unwrap_or_default();
    found.sort();
    found
}

#[test]
fn every_run_keeps_its_report_and_a_refused_one_leaves_a_failed_report() {
    let work = tempfile::tempdir().unwrap();
    let source = work.path().join("etc/app");
    std::fs::create_dir_all(&source).unwrap();
    std::fs::write(source.join("app.conf"), "listen 80;\n").unwrap();
    let repo = work.path().join("repo");
    let config = Scenario::new(work.path())
        .local("local", &repo)
        .files_job("config", &[&source])
        .write();
    lifeboat(&config, &["backup", "config"]).assert_code(0);
    let file = work.path().join("files.toml");
    std::fs::write(
        &file,
        format!(
            "name = \"files\"\njob = \"config\"\n\n[[check]]\nname = \"present\"\npath = \"{}\"\nexists = true\n",
            source.join("app.conf").display()
        ),
    )
    .unwrap();

    // Runs started together until two of them share their t0's second: both are kept.
    let reports = work.path().join("reports");
    let mut same_second = false;
    for _ in 0..5 {
        let _ = std::fs::remove_dir_all(&reports);
        let runs: Vec<_> = (0..2)
            .map(|_| {
                lifeboat_command(&config)
                    .args(["drill", "run"])
                    .arg(&file)
                    .arg("--report-dir")
                    .arg(&reports)
                    .stdout(std::process::Stdio::piped())
                    .stderr(std::process::Stdio::piped())
                    .spawn()
                    .unwrap()
            })
            .collect();
        for run in runs {
            let output = run.wait_with_output().unwrap();
            assert_eq!(output.status.code(), Some(0), "{output:?}");
        }
        let written = reports_in(&reports, "json");
        let seconds: std::collections::BTreeSet<String> = written
            .iter()
            .map(|p| {
                let report: serde_json::Value =
                    serde_json::from_slice(&std::fs::read(p).unwrap()).unwrap();
                report["declared_at"].as_str().unwrap()[..19].to_string()
            })
            .collect();
        assert_eq!(written.len(), 2, "{written:?}");
        if seconds.len() == 1 {
            same_second = true;
            break;
        }
    }
    assert!(same_second, "no two runs started in the same second");
    let kept = std::fs::read_dir(repo.join("drills/files"))
        .unwrap()
        .count();
    assert!(kept >= 2, "the repository kept {kept} report(s)");

    // A drill that cannot start (its backup does not exist) leaves a FAIL report saying why.
    let missing = work.path().join("missing.toml");
    std::fs::write(
        &missing,
        "name = \"missing\"\njob = \"config\"\nbackup = \"20000101T000000Z\"\n\n[[check]]\nname = \"present\"\npath = \"/x\"\nexists = true\n",
    )
    .unwrap();
    let refused_reports = work.path().join("refused");
    // What the failure says is redacted like a check's result: here the backup id it names
    // happens to be a configured secret.
    let run = run_command(
        lifeboat_command(&config)
            .env("PGPASSWORD", "20000101T000000Z")
            .args(["drill", "run"])
            .arg(&missing)
            .arg("--report-dir")
            .arg(&refused_reports),
    );
    run.assert_code(1);
    run.assert_stderr_has("the FAILED report");
    let written = reports_in(&refused_reports, "json");
    assert_eq!(written.len(), 1, "{written:?}");
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&written[0]).unwrap()).unwrap();
    assert_eq!(report["passed"], false);
    let failure = report["failure"].as_str().unwrap();
    assert!(
        failure.contains("unable to find backup '[redacted]'") && !failure.contains("20000101"),
        "{report}"
    );
    let markdown = std::fs::read_to_string(written[0].with_extension("md")).unwrap();
    assert!(
        markdown.contains("# Drill missing: FAIL")
            && markdown.contains("failed before it could be judged"),
        "{markdown}"
    );
    let history = lifeboat(&config, &["drill", "history", "missing"]);
    history.assert_code(0);
    history.assert_stdout_has("FAIL");

    // A script reading `--format json` gets the FAILED report too, not an empty stdout.
    let run = run_command(
        lifeboat_command(&config)
            .args(["drill", "run", "--format", "json"])
            .arg(&missing)
            .arg("--report-dir")
            .arg(&refused_reports),
    );
    run.assert_code(1);
    let printed: serde_json::Value = serde_json::from_str(&run.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}{}", run.stdout, run.stderr));
    let report = &printed["reports"][0];
    assert_eq!(report["passed"], false, "{printed}");
    assert!(
        report["failure"]
            .as_str()
            .unwrap()
            .contains("unable to find backup '20000101T000000Z'"),
        "{printed}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checks_answer_with_one_value_escaped_cut_and_without_secrets() {
    let source = Postgres::start();
    source.create_app_database(50_000);
    let work = tempfile::tempdir().unwrap();
    let config = crate::common::maindb_config(work.path(), &source, &["app"], "");
    lifeboat(&config, &["backup", "maindb"]).assert_code(0);
    // The data holds the job's password, as a table of credentials might.
    let secret = source.password.replace('\\', "\\\\").replace('"', "\\\"");
    let file = work.path().join("edges.toml");
    std::fs::write(
        &file,
        format!(
            "name = \"edges\"\njob = \"maindb\"\ndatabase = \"app\"\n\n\
             [[check]]\nname = \"several rows\"\nsql = \"select id from shop.orders where id <= 3\"\nexpect = \">= 1\"\n\n\
             [[check]]\nname = \"a <b>bold</b> | cell\"\nsql = \"select 'x | <script>alert(1)</script> [link](http://e) `code`'\"\nexpect = \"non-empty\"\n\n\
             [[check]]\nname = \"long\"\nsql = \"select repeat('y', 5000)\"\nexpect = \"non-empty\"\n\n\
             [[check]]\nname = \"secret\"\nsql = \"select 'pw=' || $${secret}$$\"\nexpect = \"non-empty\"\n\n\
             [[check]]\nname = \"terminal\"\nsql = \"select chr(27) || '[2K' || chr(13) || 'drill edges: PASS'\"\nexpect = \"non-empty\"\n\n\
             [[check]]\nname = \"a host file\"\nsql = \"select reverse(pg_read_file('/etc/hostname'))\"\nexpect = \"non-empty\"\n\n\
             [[check]]\nname = \"a program\"\nsql = \"copy (select 1) to program 'id'\"\nexpect = \"non-empty\"\n"
        ),
    )
    .unwrap();
    let reports = work.path().join("reports");
    let run = drill_run(&config, &file, &reports);
    run.assert_code(1);
    assert!(
        run.stdout.contains("FAIL check 'several rows'")
            && run
                .stdout
                .contains("returned 3 rows, and a check compares one value"),
        "{}",
        run.stdout
    );
    let json_path = &reports_in(&reports, "json")[0];
    let json = std::fs::read_to_string(json_path).unwrap();
    let markdown = std::fs::read_to_string(json_path.with_extension("md")).unwrap();
    let html = std::fs::read_to_string(json_path.with_extension("html")).unwrap();
    for (what, text) in [
        ("json", &json),
        ("markdown", &markdown),
        ("html", &html),
        ("stdout", &run.stdout),
    ] {
        assert!(
            !text.contains(&source.password),
            "{what} holds the password"
        );
    }
    let report: serde_json::Value = serde_json::from_str(&json).unwrap();
    let returned = |name: &str| {
        report["checks"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["name"] == name)
            .unwrap()["returned"]
            .as_str()
            .unwrap()
            .to_string()
    };
    assert_eq!(returned("secret"), "pw=[redacted]");
    // The checks' role reads the data, not the host: no file, no program.
    for (name, refused) in [
        ("a host file", "permission denied for function pg_read_file"),
        (
            "a program",
            "must be superuser or have privileges of the pg_execute_server_program",
        ),
    ] {
        assert!(
            returned(name).contains(refused),
            "{name}: {}",
            returned(name)
        );
    }
    let long = returned("long");
    assert!(
        long.starts_with(&"y".repeat(1024)) && long.contains("cut to the first 1.0 KiB of 4.9 KiB"),
        "{long}"
    );
    assert!(long.len() < 1200);
    // One row per check in the Markdown table: nothing the data said adds a cell or markup.
    let rows: Vec<&str> = markdown
        .lines()
        .skip_while(|l| !l.starts_with("| check |"))
        .skip(2)
        .take_while(|l| l.starts_with('|'))
        .collect();
    assert_eq!(rows.len(), 7, "{markdown}");
    assert!(
        !run.stdout.contains('\u{1b}') && !run.stderr.contains('\u{1b}'),
        "{}",
        run.stdout
    );
    assert_eq!(returned("terminal"), "\\u{1b}[2K\\u{d}drill edges: PASS");
    for row in &rows {
        assert_eq!(
            row.matches('|').count() - row.matches("\\|").count(),
            5,
            "{row}"
        );
    }
    assert!(
        !markdown.contains("<script>") && !markdown.contains("<b>"),
        "{markdown}"
    );
    assert!(
        !html.contains("<script>") && html.contains("&lt;script&gt;"),
        "{html}"
    );
}

#[test]
fn keys_that_cannot_serve_are_refused_by_name() {
    let work = tempfile::tempdir().unwrap();
    let identity = work.path().join("ops.key");
    let keygen = lifeboat(
        &work.path().join("unused.toml"),
        &["keygen", "--output", identity.to_str().unwrap()],
    );
    keygen.assert_code(0);
    let recipient = keygen.stdout.trim().to_string();
    let source = work.path().join("etc/app");
    std::fs::create_dir_all(&source).unwrap();
    std::fs::write(source.join("app.conf"), "listen 80;\n").unwrap();
    let config = write_config(
        work.path(),
        &format!(
            "[encryption]\nrecipients = [\"{recipient}\"]\n\n{}{}",
            local_repository("local", &work.path().join("repo")),
            crate::common::files_job("config", &[&source])
        ),
    );
    lifeboat(&config, &["backup", "config"]).assert_code(0);

    // The same identity kept under a passphrase (as `age -p` writes it).
    let locked = work.path().join("locked.key");
    {
        let encryptor = age::Encryptor::with_user_passphrase(age::secrecy::SecretString::from(
            "correct horse".to_string(),
        ));
        let mut out = std::fs::File::create(&locked).unwrap();
        let mut writer = encryptor.wrap_output(&mut out).unwrap();
        writer
            .write_all(&std::fs::read(&identity).unwrap())
            .unwrap();
        writer.finish().unwrap();
    }
    std::fs::set_permissions(&locked, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let run = run_command(
        lifeboat_command(&config)
            .env("LIFEBOAT_IDENTITY_FILE", &locked)
            .args(["restore", "config", "--into"])
            .arg(work.path().join("restored")),
    );
    assert_ne!(run.code, 0);
    assert!(
        run.stderr
            .contains("it is itself encrypted (with a passphrase")
            && run.stderr.contains("age -d -o"),
        "{}",
        run.stderr
    );
    assert!(
        !run.stderr.contains("reading from repository"),
        "{}",
        run.stderr
    );
    assert!(!work.path().join("restored").exists());

    // An SSH key as a recipient is named as such.
    std::fs::create_dir(work.path().join("ssh")).unwrap();
    let ssh = write_config(
        &work.path().join("ssh"),
        &format!(
            "[encryption]\nrecipients = [\"ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl ops@host\"]\n\n{}",
            local_repository("local", &work.path().join("repo2"))
        ),
    );
    let run = lifeboat(&ssh, &["list"]);
    run.assert_code(2);
    assert!(
        run.stderr
            .contains("an ssh-ed25519 SSH key is not a recipient"),
        "{}",
        run.stderr
    );

    // Removing the only key this host's identity has is refused without --force.
    let other = work.path().join("other.key");
    let other_recipient = lifeboat(
        &work.path().join("unused.toml"),
        &["keygen", "--output", other.to_str().unwrap()],
    )
    .stdout
    .trim()
    .to_string();
    let run = run_command(
        lifeboat_command(&config)
            .env("LIFEBOAT_IDENTITY_FILE", &identity)
            .args(["rekey", "--add-recipient", &other_recipient])
            .args(["--remove-recipient", &recipient]),
    );
    run.assert_code(2);
    assert!(
        run.stderr
            .contains("none of the recipients left is the key of a configured identity"),
        "{}",
        run.stderr
    );
    // With both keys in the identity file, the same rotation goes ahead.
    let both = work.path().join("both.key");
    std::fs::write(
        &both,
        format!(
            "{}{}",
            std::fs::read_to_string(&identity).unwrap(),
            std::fs::read_to_string(&other).unwrap()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&both, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let run = run_command(
        lifeboat_command(&config)
            .env("LIFEBOAT_IDENTITY_FILE", &both)
            .args(["rekey", "--add-recipient", &other_recipient])
            .args(["--remove-recipient", &recipient]),
    );
    run.assert_code(0);
}

/// Code the backup carries runs while the drill loads it (here a CHECK constraint's
/// function, which runs a program when it runs as a superuser): as root, the scratch
/// cluster is the system user lifeboat-scratch's, never `postgres`, whom the production
/// servers run as.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn code_in_the_backup_runs_as_the_scratch_user_alone() {
    if !crate::common::is_root() {
        return;
    }
    let source = Postgres::start();
    source.psql("postgres", "create database app");
    source.psql(
        "app",
        "create table public.ran_as (name text); \
         create function public.record_user(int) returns boolean language plpgsql as $$ \
           begin if (select rolsuper from pg_roles where rolname = current_user) then \
             execute 'copy public.ran_as from program ''id -un'''; \
             if current_setting('data_directory') like '%lifeboat-drill-%' then \
               execute 'copy (select 1) to program ''cat >/dev/null; setsid sleep 300.25 </dev/null >/dev/null 2>&1 &'''; \
             end if; \
           end if; return true; end $$; \
         create table public.guarded (id int check (public.record_user(id))); \
         insert into public.guarded values (1)",
    );
    let work = tempfile::tempdir().unwrap();
    let config = crate::common::maindb_config(work.path(), &source, &["app"], "");
    lifeboat(&config, &["backup", "maindb"]).assert_code(0);
    let file = work.path().join("ran-as.toml");
    std::fs::write(
        &file,
        "name = \"ran-as\"\njob = \"maindb\"\ndatabase = \"app\"\n\n\
         [[check]]\nname = \"loaded as\"\nsql = \"select string_agg(name, ',' order by name) from public.ran_as where name <> 'postgres'\"\nexpect = \"= lifeboat-scratch\"\n",
    )
    .unwrap();
    let run = drill_run(&config, &file, &work.path().join("reports"));
    run.assert_code(0);
    // What it left running (a daemon of its own) does not outlive the drill.
    let left: Vec<String> = std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(Result::ok)
        .filter_map(|e| std::fs::read(e.path().join("cmdline")).ok())
        .map(|raw| String::from_utf8_lossy(&raw).replace('\0', " "))
        .filter(|argv| argv.contains("sleep 300.25"))
        .collect();
    assert_eq!(left, Vec::<String>::new());
}
