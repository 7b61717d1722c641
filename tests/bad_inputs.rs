//! Bad input, each run for real: the exit code and the message a user gets, and never a
//! panic. Config, drill files and the command line; a file name that carries a forged log
//! line; a repository that fills up.

use std::path::Path;

use crate::common::{Run, Scenario, Tmpfs, files_job, lifeboat, local_repository, write_config};

/// One bad input: what it is, the config, the command, and what must come of it.
struct Case<'a> {
    what: &'a str,
    config: String,
    args: Vec<String>,
    code: i32,
    says: &'a str,
}

fn run_case(work: &Path, index: usize, case: &Case<'_>) -> Run {
    let dir = work.join(format!("case{index}"));
    std::fs::create_dir_all(&dir).unwrap();
    let config = write_config(&dir, &case.config);
    let args: Vec<&str> = case.args.iter().map(String::as_str).collect();
    let run = lifeboat(&config, &args);
    let said = format!("{}{}", run.stdout, run.stderr);
    assert!(
        !said.contains("panicked") && run.code != 101,
        "{}: a panic\n{said}",
        case.what
    );
    assert_eq!(run.code, case.code, "{}: exit code\n{said}", case.what);
    assert!(
        said.contains(case.says),
        "{}: expected '{}' in\n{said}",
        case.what,
        case.says
    );
    run
}

#[test]
fn bad_input_gets_its_exit_code_and_a_message_never_a_panic() {
    let work = tempfile::tempdir().unwrap();
    let source = work.path().join("etc");
    std::fs::create_dir_all(&source).unwrap();
    std::fs::write(source.join("app.conf"), "listen = 8080\n").unwrap();
    let repo = work.path().join("repo");
    let local = local_repository("r", &repo);
    let job = files_job("conf", &[&source]);
    let a_file = work.path().join("a-file");
    std::fs::write(&a_file, "not a directory").unwrap();
    let drill = work.path().join("forever.toml");
    std::fs::write(
        &drill,
        "name = \"forever\"\njob = \"conf\"\nrto = \"99999999999years\"\n\n[[check]]\nname = \"x\"\npath = \"/etc/hostname\"\ncontains = \"a\"\n",
    )
    .unwrap();
    let s = |args: &[&str]| args.iter().map(|a| a.to_string()).collect::<Vec<_>>();
    let cases = [
        Case {
            what: "a retention window longer than the calendar",
            config: format!("{local}{job}retention = {{ keep_within = \"99999999999years\" }}\n"),
            args: s(&["prune"]),
            code: 2,
            says: "job[0] (conf).retention.keep_within: must be at most 100 years",
        },
        Case {
            what: "a drill's RTO longer than the calendar",
            config: format!("{local}{job}"),
            args: s(&["drill", "run", drill.to_str().unwrap()]),
            code: 2,
            says: "rto",
        },
        Case {
            what: "a grace period longer than the calendar",
            config: format!("{local}{job}"),
            args: s(&["prune", "--grace", "99999999999years"]),
            code: 2,
            says: "must be at most 100 years",
        },
        Case {
            what: "an endpoint with a user and password in it",
            config: format!(
                "[[repository]]\nname = \"s3\"\ntype = \"s3\"\nbucket = \"b\"\nregion = \"us-east-1\"\nendpoint = \"http://127.0.0.1:9000@192.0.2.2\"\n{job}"
            ),
            args: s(&["check"]),
            code: 2,
            says: "192.0.2.2",
        },
        Case {
            what: "a file as a repository's path",
            config: format!("{}{job}", local_repository("r", &a_file)),
            args: s(&["check"]),
            code: 2,
            says: "is a file, not a directory",
        },
        Case {
            what: "a schedule systemd does not take, in check",
            config: format!("{local}{job}schedule = \"every tuesday sometimes\"\n"),
            args: s(&["check"]),
            code: 1,
            says: "FAILED   schedules: job 'conf' schedule: \"every tuesday sometimes\" is not a valid systemd calendar expression",
        },
        Case {
            what: "a repository inside a job's paths",
            config: format!(
                "{}{}",
                local_repository("inside", &source.join("backups")),
                files_job("conf", &[&source])
            ),
            args: s(&["backup", "conf"]),
            code: 0,
            says: "is repository 'inside', which lifeboat writes itself: not stored",
        },
    ];
    for (index, case) in cases.iter().enumerate() {
        run_case(work.path(), index, case);
    }
}

/// A file whose name holds a newline and a forged log line: in text logs, reports and
/// errors it stays inside the one line that names it; JSON logs are JSON, line by line.
#[test]
fn a_file_name_cannot_forge_a_log_line() {
    let work = tempfile::tempdir().unwrap();
    let source = work.path().join("etc");
    std::fs::create_dir_all(&source).unwrap();
    std::fs::write(source.join("app.conf"), "listen = 8080\n").unwrap();
    let forged = "2026-12-07T03:00:00.000000Z ERROR backup failed job=conf error=forged";
    // A FIFO: not stored, so its name is logged and reported.
    let fifo = source.join(format!("evil\n{forged}"));
    let made = std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap();
    assert!(made.success());
    // And one whose name would pass for more fields of the line.
    let fields = source.join("x kind=\"regular file\" error=disk_failed");
    assert!(
        std::process::Command::new("mkfifo")
            .arg(&fields)
            .status()
            .unwrap()
            .success()
    );
    let config = Scenario::new(work.path())
        .local("r", &work.path().join("repo"))
        .files_job("conf", &[&source])
        .write();
    let text = lifeboat(&config, &["backup", "conf"]);
    text.assert_code(0);
    for line in text.stdout.lines().chain(text.stderr.lines()) {
        assert!(
            !line.starts_with(forged),
            "a forged line:\n{}{}",
            text.stdout,
            text.stderr
        );
    }
    assert!(
        text.stderr.contains("evil\\n2026-12-07T03:00:00"),
        "the name, escaped:\n{}",
        text.stderr
    );
    assert!(
        text.stderr.contains(&format!(
            "path=\"{}/x kind=\\\"regular file\\\" error=disk_failed\"",
            source.display()
        )),
        "the name, quoted as one field:\n{}",
        text.stderr
    );
    let json = lifeboat(&config, &["backup", "conf", "--log-format", "json"]);
    json.assert_code(0);
    let mut named = false;
    for line in json.stderr.lines() {
        let event: serde_json::Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {line}\n{}", json.stderr));
        named |= event.to_string().contains("ERROR backup failed");
    }
    assert!(named, "the name is in the JSON log:\n{}", json.stderr);
}

/// A repository on a disk that fills up: the failure is the repository's, named with the
/// OS error, never the source's.
#[test]
fn a_full_repository_is_named_with_its_os_error() {
    // Mounting the small disk needs root, as `.ci/run` runs: Tmpfs::mount fails otherwise.
    let work = tempfile::tempdir().unwrap();
    let small = work.path().join("small");
    let _mounted = Tmpfs::mount(&small, "size=20m");
    let source = work.path().join("src");
    std::fs::create_dir_all(&source).unwrap();
    crate::common::tree::write_file(
        &source.join("big.bin"),
        &crate::common::tree::noise(30 * 1024 * 1024, 11),
        0o644,
    );
    let config = Scenario::new(work.path())
        .local("small", &small)
        .files_job("conf", &[&source])
        .write();
    let run = lifeboat(&config, &["backup", "conf"]);
    run.assert_code(1);
    assert!(
        run.stderr.contains("in repository 'small'")
            && run.stderr.contains("No space left on device")
            && !run.stderr.contains("unable to read file"),
        "{}",
        run.stderr
    );
    // Nothing half-written stays on the full disk.
    let leftovers: Vec<_> = walkdir::WalkDir::new(&small)
        .into_iter()
        .filter_map(Result::ok)
        .filter(|e| e.file_type().is_file() && e.file_name() != "lifeboat.json")
        .map(|e| e.path().display().to_string())
        .collect();
    assert_eq!(leftovers, Vec::<String>::new());

    // A disk already full: the small writes (claim, marker, manifest) fail as loudly.
    let fill = small.join("fill");
    let filled = std::process::Command::new("dd")
        .args(["if=/dev/zero", &format!("of={}", fill.display()), "bs=1M"])
        .stderr(std::process::Stdio::null())
        .status()
        .unwrap();
    assert!(!filled.success(), "dd stops when the disk is full");
    std::fs::remove_file(source.join("big.bin")).unwrap();
    std::fs::write(source.join("small.conf"), "listen = 8080\n").unwrap();
    let run = lifeboat(&config, &["backup", "conf"]);
    assert_eq!(run.code, 1, "{}\n{}", run.stdout, run.stderr);
    assert!(
        run.stderr.contains("'small'") && run.stderr.contains("No space left on device"),
        "{}",
        run.stderr
    );
    std::fs::remove_file(&fill).unwrap();
    let empty: Vec<_> = walkdir::WalkDir::new(&small)
        .into_iter()
        .filter_map(Result::ok)
        .filter(|e| e.file_type().is_file() && e.metadata().unwrap().len() == 0)
        .map(|e| e.path().display().to_string())
        .collect();
    assert_eq!(empty, Vec::<String>::new(), "empty files left behind");
    let list = lifeboat(&config, &["list", "conf"]);
    list.assert_stdout_has("no backups");
}
