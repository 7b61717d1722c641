//! The WAL archive as PostgreSQL's `restore_command` sees it: `wal-fetch` exits 1 ("not
//! archived", which ends recovery) only when a repository that is there answers that it
//! lacks the file; anything it cannot tell exits 255, which stops recovery.

use crate::common::{files_job, lifeboat, local_repository, write_config};

/// An unmounted repository (its mount point empty, or gone) lacks every file, and used to
/// read as "not archived": PostgreSQL then ended recovery early and promoted, losing
/// whatever the archive held after that point. Now only a repository holding its marker
/// can say a file is not there.
#[test]
fn wal_fetch_from_an_unmounted_repository_stops_recovery() {
    let work = tempfile::tempdir().unwrap();
    let mount = work.path().join("volume");
    let repository = mount.join("lifeboat");
    let source = work.path().join("etc");
    std::fs::create_dir_all(&source).unwrap();
    std::fs::write(source.join("app.conf"), "a = 1\n").unwrap();
    let config = write_config(
        work.path(),
        &format!(
            "{}{}[[job]]\nname = \"db\"\nkind = \"postgres\"\nmode = \"physical\"\ndsn = \"postgresql://postgres@127.0.0.1:9/postgres\"\n",
            local_repository("local", &repository),
            files_job("conf", &[&source])
        ),
    );
    // The first backup writes the repository's marker.
    lifeboat(&config, &["backup", "conf"]).assert_code(0);
    let dest = work.path().join("fetched");
    let fetch = |name: &str| {
        lifeboat(
            &config,
            &["wal-fetch", "--job", "db", name, dest.to_str().unwrap()],
        )
    };
    let absent = fetch("000000010000000000000001");
    absent.assert_code(1);
    assert_eq!(absent.stderr.trim(), "", "quiet on a missing segment");

    // Unmounted: the mount point is there, empty.
    std::fs::rename(&repository, work.path().join("elsewhere")).unwrap();
    let unmounted = fetch("000000010000000000000001");
    unmounted.assert_code(255);
    assert!(
        unmounted.stderr.contains("repository 'local'")
            && unmounted.stderr.contains("holds no marker 'lifeboat.json'"),
        "{}",
        unmounted.stderr
    );
    // Gone altogether.
    std::fs::remove_dir_all(&mount).unwrap();
    fetch("000000010000000000000001").assert_code(255);
    assert!(!dest.exists());
}

/// A recovery target without a zone is refused saying what to add: read as UTC or as the
/// host's zone, it would recover to another moment than the operator meant.
#[test]
fn a_target_time_without_a_zone_says_what_to_add() {
    let work = tempfile::tempdir().unwrap();
    let config = write_config(
        work.path(),
        &local_repository("local", &work.path().join("repo")),
    );
    let run = lifeboat(
        &config,
        &[
            "restore",
            "db",
            "--data-dir",
            work.path().join("data").to_str().unwrap(),
            "--to-time",
            "2026-11-26 14:01:00",
        ],
    );
    run.assert_code(2);
    assert!(
        run.stderr
            .contains("it has no time zone: write 2026-11-26T14:01:00Z for UTC"),
        "{}",
        run.stderr
    );
}
