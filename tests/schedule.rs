//! `lifeboat schedule`: the systemd units it writes pass `systemd-analyze verify` (which
//! rejects a broken copy of them), its crontab lines parse and fire when systemd's timers
//! would, and a bad calendar expression is refused naming where it came from.

use std::path::Path;
use std::process::Command;
use std::str::FromStr;

use crate::common::{files_job, lifeboat, local_repository, write_config};

fn scheduled_config(work: &Path, backup_calendar: &str) -> std::path::PathBuf {
    let tree = work.join("etc");
    std::fs::create_dir_all(&tree).unwrap();
    std::fs::write(
        work.join("quarterly.toml"),
        format!(
            "name = \"quarterly\"\njob = \"conf\"\nschedule = \"quarterly\"\n\n[[check]]\nname = \"etc is back\"\npath = \"{}\"\nexists = true\n",
            tree.display()
        ),
    )
    .unwrap();
    write_config(
        work,
        &format!(
            "[schedule]\nprune = \"daily\"\nreplicate = \"*-*-* *:30:00\"\ndrills = [\"quarterly.toml\"]\n\n{}{}schedule = \"{backup_calendar}\"\n",
            local_repository("local", &work.join("repo")),
            files_job("conf", &[&tree]).trim_end().to_string() + "\n"
        ),
    )
}

/// `lifeboat schedule systemd --install --unit-dir UNITS`.
fn install_units(config: &Path, units: &Path) -> crate::common::Run {
    lifeboat(
        config,
        &[
            "schedule",
            "systemd",
            "--install",
            "--unit-dir",
            units.to_str().unwrap(),
        ],
    )
}

/// `systemd-analyze` is the independent judge of units and calendars; `.ci/setup` installs
/// it, and its absence fails the test rather than skipping the check.
fn require_systemd_analyze() {
    assert!(
        Command::new("systemd-analyze")
            .arg("--version")
            .output()
            .is_ok(),
        "systemd-analyze is needed to check the units; run `bash .ci/setup` (it installs systemd)"
    );
}

#[test]
fn installed_units_pass_systemd_analyze_verify() {
    let work = tempfile::tempdir().unwrap();
    let config = scheduled_config(work.path(), "*-*-* 03:00:00");
    // A physical job with a heartbeat, and metrics for the status timer to refresh.
    let metrics = work.path().join("metrics");
    std::fs::write(
        &config,
        format!(
            "metrics_dir = \"{}\"\n{}\n[[job]]\nname = \"pitr\"\nkind = \"postgres\"\nmode = \"physical\"\ndsn = \"postgresql://backup@127.0.0.1:9/postgres\"\nheartbeat = true\nschedule = \"daily\"\n",
            metrics.display(),
            std::fs::read_to_string(&config).unwrap()
        ),
    )
    .unwrap();
    let units = work.path().join("units");
    std::fs::create_dir_all(&units).unwrap();
    let run = install_units(&config, &units);
    run.assert_code(0);
    let mut names: Vec<String> = std::fs::read_dir(&units)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(
        names,
        [
            "lifeboat-backup-conf.service",
            "lifeboat-backup-conf.timer",
            "lifeboat-backup-pitr.service",
            "lifeboat-backup-pitr.timer",
            "lifeboat-drill-quarterly.service",
            "lifeboat-drill-quarterly.timer",
            "lifeboat-failure@.service",
            "lifeboat-heartbeat-pitr.service",
            "lifeboat-heartbeat-pitr.timer",
            "lifeboat-prune.service",
            "lifeboat-prune.timer",
            "lifeboat-replicate.service",
            "lifeboat-replicate.timer",
            "lifeboat-status.service",
            "lifeboat-status.timer",
            "lifeboat-verify-archive-pitr.service",
            "lifeboat-verify-archive-pitr.timer",
            "lifeboat-verify-conf.service",
            "lifeboat-verify-conf.timer",
            "lifeboat-verify-pitr.service",
            "lifeboat-verify-pitr.timer",
        ]
    );
    let read = |name: &str| std::fs::read_to_string(units.join(name)).unwrap();
    let has = |unit: &str, line: &str| unit.lines().any(|l| l == line);
    let backup = read("lifeboat-backup-conf.service");
    for line in [
        "Type=oneshot",
        "User=lifeboat",
        "Group=lifeboat",
        "EnvironmentFile=-/etc/lifeboat/environment",
        "OnFailure=lifeboat-failure@%n.service",
        "SuccessExitStatus=75",
        "Nice=10",
        "IOSchedulingClass=best-effort",
        "ProtectSystem=strict",
        &format!("ReadWritePaths=-{}", work.path().join("repo").display()),
        &format!("ReadWritePaths=-{}", metrics.display()),
        "PrivateTmp=true",
        "NoNewPrivileges=true",
        "UMask=0077",
        // A files job reads what other users own, and needs nothing else of root.
        "CapabilityBoundingSet=CAP_DAC_READ_SEARCH",
    ] {
        assert!(has(&backup, line), "{line} in\n{backup}");
    }
    assert!(
        backup.contains(&format!(
            " --config {} backup conf\n",
            config.canonicalize().unwrap().display()
        )),
        "{backup}"
    );
    let prune = read("lifeboat-prune.service");
    assert!(!prune.contains("Nice="), "only backups are niced");
    assert!(has(&prune, "CapabilityBoundingSet="), "{prune}");
    let timer = read("lifeboat-backup-conf.timer");
    for line in [
        "OnCalendar=*-*-* 03:00:00",
        "Persistent=true",
        "RandomizedDelaySec=5min",
        "WantedBy=timers.target",
    ] {
        assert!(has(&timer, line), "{line} in\n{timer}");
    }
    assert!(read("lifeboat-drill-quarterly.timer").contains("OnCalendar=quarterly\n"));
    // The physical job's heartbeat every minute, on time; the newest backup verified weekly;
    // the state refreshed every 15 minutes, a WARNING being no failure of the unit.
    let heartbeat = read("lifeboat-heartbeat-pitr.timer");
    assert!(has(&heartbeat, "OnCalendar=minutely"), "{heartbeat}");
    assert!(!heartbeat.contains("RandomizedDelaySec"), "{heartbeat}");
    assert!(read("lifeboat-heartbeat-pitr.service").contains(" heartbeat pitr\n"));
    assert!(has(
        &read("lifeboat-verify-pitr.timer"),
        "OnCalendar=weekly"
    ));
    assert!(read("lifeboat-verify-pitr.service").contains(" verify pitr --backup latest\n"));
    let status = read("lifeboat-status.service");
    assert!(status.contains(" status --write-metrics\n"), "{status}");
    assert!(has(&status, "SuccessExitStatus=1"), "{status}");
    assert!(has(&read("lifeboat-status.timer"), "OnCalendar=*:0/15"));
    // A drill runs as root, so that its scratch cluster runs as lifeboat-scratch, away from
    // the keys and credentials of the lifeboat user.
    let drill = read("lifeboat-drill-quarterly.service");
    assert!(!drill.contains("User="), "{drill}");
    // The failure hook is handed no credential.
    let hook = read("lifeboat-failure@.service");
    assert!(!hook.contains("EnvironmentFile"), "{hook}");
    assert!(has(&hook, "User=lifeboat"), "{hook}");

    require_systemd_analyze();
    let verify = |paths: &[std::path::PathBuf]| {
        Command::new("systemd-analyze")
            .arg("verify")
            .args(paths)
            .output()
            .unwrap()
    };
    let all: Vec<_> = names.iter().map(|n| units.join(n)).collect();
    let output = verify(&all);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    // The check has teeth: the same timer with a calendar systemd cannot read fails it.
    let broken = units.join("broken.timer");
    std::fs::write(&broken, timer.replace("*-*-* 03:00:00", "at three-ish")).unwrap();
    std::fs::write(units.join("broken.service"), &backup).unwrap();
    assert!(!verify(&[broken]).status.success());

    // systemd's own exposure score of each service: 0 is locked down, 10 is a root shell.
    // Below 3 is what systemd calls "OK"; a root service with no hardening scores 9.6.
    for name in names.iter().filter(|n| n.ends_with(".service")) {
        let exposure = exposure(&units.join(name));
        assert!(exposure < 3.0, "{name}: exposure {exposure}");
    }
    let unhardened = units.join("plain.service");
    std::fs::write(
        &unhardened,
        "[Service]\nType=oneshot\nExecStart=/bin/true\n",
    )
    .unwrap();
    assert!(exposure(&unhardened) > 9.0);
}

/// `systemd-analyze security --offline`'s overall exposure level of a unit file.
fn exposure(unit: &Path) -> f64 {
    let output = Command::new("systemd-analyze")
        .args(["security", "--offline=true"])
        .arg(unit)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&output.stdout);
    let line = text
        .lines()
        .find(|l| l.contains("Overall exposure level"))
        .unwrap_or_else(|| panic!("no exposure level for {}:\n{text}", unit.display()));
    line.split(": ")
        .nth(1)
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("unreadable: {line}"))
}

/// When systemd would next fire `calendar`, in UTC, as "YYYY-MM-DD HH:MM:SS".
fn systemd_next(calendar: &str) -> String {
    let output = Command::new("systemd-analyze")
        .env("TZ", "UTC")
        .args(["calendar", calendar])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&output.stdout);
    let line = text
        .lines()
        .find(|l| l.trim_start().starts_with("Next elapse:"))
        .unwrap_or_else(|| panic!("{text}"));
    // "Next elapse: Fri 2026-11-27 03:00:00 UTC"
    let fields: Vec<&str> = line.split_whitespace().collect();
    format!("{} {}", fields[3], fields[4])
}

#[test]
fn cron_lines_parse_and_fire_when_the_timers_would() {
    require_systemd_analyze();
    let work = tempfile::tempdir().unwrap();
    let config = scheduled_config(work.path(), "Mon *-*-* 04:15:00");
    let run = lifeboat(&config, &["schedule", "cron"]);
    run.assert_code(0);
    let lines: Vec<&str> = run.stdout.lines().filter(|l| !l.starts_with('#')).collect();
    assert_eq!(lines.len(), 6, "{}", run.stdout);
    let calendars = [
        "Mon *-*-* 04:15:00",
        "weekly",
        "daily",
        "*-*-* *:30:00",
        "quarterly",
        "*:0/15",
    ];
    let now = chrono::Utc::now();
    for (line, calendar) in lines.iter().zip(calendars) {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let pattern = fields[..5].join(" ");
        let cron = croner::Cron::from_str(&pattern)
            .unwrap_or_else(|e| panic!("'{pattern}' from {line}: {e}"));
        assert!(fields[5].ends_with("lifeboat"), "{line}");
        let next = cron.find_next_occurrence(&now, false).unwrap();
        assert_eq!(
            next.format("%Y-%m-%d %H:%M:%S").to_string(),
            systemd_next(calendar),
            "{calendar} as cron '{pattern}'"
        );
    }
}

#[test]
fn a_bad_calendar_is_refused_naming_its_origin() {
    let work = tempfile::tempdir().unwrap();
    require_systemd_analyze();
    let config = scheduled_config(work.path(), "at three-ish");
    let run = lifeboat(&config, &["schedule", "systemd"]);
    run.assert_code(2);
    run.assert_stderr_has(
        "job 'conf' schedule: \"at three-ish\" is not a valid systemd calendar expression",
    );
    // Valid for systemd, but no cron line says it exactly.
    let config = scheduled_config(work.path(), "Mon..Fri *-*-* 04:00:00");
    let run = lifeboat(&config, &["schedule", "cron"]);
    run.assert_code(2);
    run.assert_stderr_has(
        "job 'conf' schedule: \"Mon..Fri *-*-* 04:00:00\" has no exact cron equivalent",
    );
}

/// A job backed up daily against a 1h RPO is in breach for 23 hours a day: `check` says so
/// (a warning: the config works) with the figures, and a schedule that meets the RPO, or a
/// looser RPO, is quiet. The example config `init` writes is consistent.
#[test]
fn check_warns_when_a_schedule_cannot_meet_the_rpo() {
    require_systemd_analyze();
    let work = tempfile::tempdir().unwrap();
    let tree = work.path().join("etc");
    std::fs::create_dir_all(&tree).unwrap();
    let config_with = |calendar: &str, rpo: &str| {
        write_config(
            work.path(),
            &format!(
                "[targets]\nrpo = \"{rpo}\"\n\n{}{}schedule = \"{calendar}\"\n",
                local_repository("local", &work.path().join("repo")),
                files_job("conf", &[&tree]).trim_end().to_string() + "\n"
            ),
        )
    };
    let warning = "warning: schedule \"daily\" leaves up to 1day between backups (plus up to 5m of randomized delay), longer than the RPO of 1h";
    let run = lifeboat(&config_with("daily", "1h"), &["check"]);
    run.assert_code(0);
    run.assert_stdout_has("WARNING  job 'conf' (files)\n");
    run.assert_stdout_has(warning);
    // Weekdays only: the weekend is the longest gap, which the first runs do not show.
    let run = lifeboat(&config_with("Mon..Fri *:0/30", "1h"), &["check"]);
    run.assert_code(0);
    assert!(
        run.stdout
            .contains("leaves up to 2days 30m between backups"),
        "{}",
        run.stdout
    );
    // A date runs once (or never again): no repetition meets any RPO.
    let run = lifeboat(&config_with("2020-01-01 00:00:00", "1h"), &["check"]);
    run.assert_code(0);
    assert!(
        run.stdout
            .contains("warning: schedule \"2020-01-01 00:00:00\" runs at most once more"),
        "{}",
        run.stdout
    );
    // A repetition limited to one year stops: after its last run, nothing.
    use chrono::Datelike;
    let next_year = chrono::Utc::now().year() + 1;
    let limited = format!("{next_year}-*-* 03:00:00");
    let run = lifeboat(&config_with(&limited, "2d"), &["check"]);
    run.assert_code(0);
    run.assert_stdout_has(format!(
        "warning: schedule \"{limited}\" stops: its last run is {next_year}-12-31 03:00 UTC"
    ));
    for (calendar, rpo) in [("*:0/30", "1h"), ("daily", "2d")] {
        let run = lifeboat(&config_with(calendar, rpo), &["check"]);
        run.assert_code(0);
        assert!(
            !run.stdout.contains("WARNING"),
            "{calendar} against {rpo}: {}",
            run.stdout
        );
    }

    let example = work.path().join("example.toml");
    lifeboat(&example, &["init"]).assert_code(0);
    let run = lifeboat(&example, &["check"]);
    assert!(
        !run.stdout.contains("warning: schedule"),
        "the example config's schedules do not meet its own RPO:\n{}",
        run.stdout
    );
    run.assert_stdout_has("job 'config' (files)");
}

/// A newline in any value a unit is made of would start a directive of its own (`Unit=` in a
/// timer, `ExecStartPre=` in a service): refused, named, and nothing written.
#[test]
fn a_value_that_would_add_a_line_to_a_unit_is_refused() {
    let work = tempfile::tempdir().unwrap();
    let tree = work.path().join("etc");
    std::fs::create_dir_all(&tree).unwrap();
    for (setting, named) in [
        ("prune = \"daily\\nUnit=evil.service\"", "schedule.prune"),
        (
            "prune = \"weekly\"\non_failure = \"/bin/true\\nExecStartPre=/bin/sh -c evil\"",
            "schedule.on_failure",
        ),
        (
            "prune = \"weekly\"\nenvironment_file = \"/etc/lifeboat/env\\nExecStartPre=/bin/evil\"",
            "schedule.environment_file",
        ),
    ] {
        let config = write_config(
            work.path(),
            &format!(
                "[schedule]\n{setting}\n\n{}{}",
                local_repository("local", &work.path().join("repo")),
                files_job("conf", &[&tree])
            ),
        );
        refused(&config, named, setting);
    }
    // A backslash ends a path's line by joining the next one to it; a quote ends its quoting.
    for path in ["/srv/backups\\", "/srv/back\" /bin/evil \""] {
        let config = write_config(
            work.path(),
            &format!(
                "[schedule]\nprune = \"weekly\"\n\n[[repository]]\nname = \"local\"\ntype = \"local\"\npath = {path:?}\n\n{}",
                files_job("conf", &[&tree])
            ),
        );
        refused(&config, "a local repository, metrics_dir or lock_dir", path);
    }
    fn refused(config: &Path, named: &str, setting: &str) {
        let units = config.parent().unwrap().join("units");
        std::fs::create_dir_all(&units).unwrap();
        let run = install_units(config, &units);
        run.assert_code(2);
        assert!(
            run.stderr.contains(&format!("{named}: "))
                && (run.stderr.contains("holds a control character")
                    || run.stderr.contains("holds a quote or a backslash")),
            "{setting}: {}",
            run.stderr
        );
        assert_eq!(std::fs::read_dir(&units).unwrap().count(), 0, "{setting}");
    }
}

/// systemd reads `%` as a specifier and `$` as a variable in `ExecStart=`: a config whose
/// path holds them (and a space) is run from exactly that path.
#[test]
fn exec_lines_keep_percent_dollar_and_spaces_literal() {
    require_systemd_analyze();
    let work = tempfile::tempdir().unwrap();
    let odd = work.path().join("we ird%h$HOME");
    std::fs::create_dir_all(&odd).unwrap();
    let config = scheduled_config(&odd, "daily");
    let units = work.path().join("units");
    std::fs::create_dir_all(&units).unwrap();
    install_units(&config, &units).assert_code(0);
    let backup = std::fs::read_to_string(units.join("lifeboat-backup-conf.service")).unwrap();
    let exec = backup
        .lines()
        .find(|l| l.starts_with("ExecStart="))
        .unwrap();
    let path = config.canonicalize().unwrap().display().to_string();
    assert!(
        exec.contains(&format!(
            " --config \"{}\" backup conf",
            path.replace('%', "%%").replace('$', "$$")
        )),
        "{exec}"
    );
    // systemd's own reading of the line: the path, unexpanded.
    let shown = Command::new("systemd-analyze")
        .args(["verify"])
        .arg(units.join("lifeboat-backup-conf.service"))
        .output()
        .unwrap();
    assert!(
        shown.status.success(),
        "{}",
        String::from_utf8_lossy(&shown.stderr)
    );
}
