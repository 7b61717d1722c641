//! The WAL archive as PostgreSQL's `restore_command` sees it: `wal-fetch` exits 1 ("not
//! archived", which ends recovery) only when a repository that is there answers that it
//! lacks the file; anything it cannot tell exits 255, which stops recovery.

use crate::common::{Run, files_job, lifeboat, local_repository, tree, write_config};

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

/// A local repository and a physical job `db` that has archived the genuine segment
/// 000000010000000000000005 of `tree::FAKE_SYSTEM`: the repository has learned the cluster.
struct Archive {
    work: tempfile::TempDir,
    config: std::path::PathBuf,
    repository: std::path::PathBuf,
}

const NAME: &str = "000000010000000000000006";

impl Archive {
    fn new() -> Archive {
        let work = tempfile::tempdir().unwrap();
        let repository = work.path().join("repo");
        let config = write_config(
            work.path(),
            &format!(
                "{}[[job]]\nname = \"db\"\nkind = \"postgres\"\nmode = \"physical\"\ndsn = \"postgresql://postgres@127.0.0.1:9/postgres\"\n",
                local_repository("local", &repository),
            ),
        );
        let archive = Archive {
            work,
            config,
            repository,
        };
        let first = "000000010000000000000005";
        archive
            .push(first, &tree::wal_segment(first, tree::FAKE_SYSTEM, 5))
            .assert_code(0);
        archive
    }

    /// `wal-push` of `bytes` as PostgreSQL hands it over: `pg_wal/NAME`.
    fn push(&self, name: &str, bytes: &[u8]) -> Run {
        let dir = self.work.path().join("pg_wal");
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(name);
        std::fs::write(&path, bytes).unwrap();
        lifeboat(
            &self.config,
            &["wal-push", "--job", "db", path.to_str().unwrap()],
        )
    }

    fn stored(&self, name: &str) -> bool {
        self.repository
            .join(format!("jobs/db/wal/{}/{name}.zst", &name[..8]))
            .exists()
    }

    /// Pushing `bad` as NAME is refused saying `why`, stores nothing, and the genuine
    /// segment is archived after it and comes back whole.
    fn refuses_then_takes_the_genuine(&self, bad: &[u8], why: &str) {
        let refused = self.push(NAME, bad);
        refused.assert_code(1);
        assert!(
            refused.stderr.contains(&format!(
                "refusing to archive WAL file '{NAME}' of job 'db'"
            )) && refused.stderr.contains(why),
            "{}",
            refused.stderr
        );
        assert!(refused.stderr.contains("nothing was stored"));
        assert!(!self.stored(NAME), "a refused file was stored");

        let genuine = tree::wal_segment(NAME, tree::FAKE_SYSTEM, 6);
        self.push(NAME, &genuine).assert_code(0);
        let fetched = self.work.path().join("fetched");
        lifeboat(
            &self.config,
            &["wal-fetch", "--job", "db", NAME, fetched.to_str().unwrap()],
        )
        .assert_code(0);
        assert_eq!(std::fs::read(&fetched).unwrap(), genuine);
    }
}

/// A segment cut short (a full disk, a copy stopped halfway) was archived, and PostgreSQL's
/// later push of the whole one refused as a different file.
#[test]
fn wal_push_refuses_a_truncated_segment() {
    let archive = Archive::new();
    let genuine = tree::wal_segment(NAME, tree::FAKE_SYSTEM, 6);
    archive.refuses_then_takes_the_genuine(
        &genuine[..8 << 20],
        "it is 8388608 bytes long and its header gives segments of 16777216 bytes",
    );
}

#[test]
fn wal_push_refuses_an_empty_file() {
    let archive = Archive::new();
    archive.refuses_then_takes_the_genuine(&[], "it is 0 bytes long, too short");
}

#[test]
fn wal_push_refuses_bytes_that_are_no_wal() {
    let archive = Archive::new();
    archive.refuses_then_takes_the_genuine(
        &tree::noise(16 << 20, 99),
        "it does not start with a WAL page header",
    );
}

/// Segment 3's contents under segment 6's name: replayed, it would put old WAL where new
/// WAL belongs.
#[test]
fn wal_push_refuses_a_segment_under_another_name() {
    let archive = Archive::new();
    let other = "000000010000000000000003";
    archive.refuses_then_takes_the_genuine(
        &tree::wal_segment(other, tree::FAKE_SYSTEM, 3),
        &format!("its header says it holds the WAL at 0/3000000 (segment {other}), not 0/6000000"),
    );
}

/// A right first page in front of damage: the header alone does not vouch for a segment.
#[test]
fn wal_push_refuses_a_segment_damaged_past_its_first_page() {
    let archive = Archive::new();
    let mut damaged = tree::wal_segment(NAME, tree::FAKE_SYSTEM, 6);
    damaged[8192..].copy_from_slice(&tree::noise((16 << 20) - 8192, 42));
    archive.refuses_then_takes_the_genuine(
        &damaged,
        "its page at byte 8192 (WAL 0/6002000) has magic",
    );
}

/// Another cluster's segment under a name this job has not used yet.
#[test]
fn wal_push_refuses_another_clusters_segment() {
    let archive = Archive::new();
    let foreign = tree::FAKE_SYSTEM + 1;
    archive.refuses_then_takes_the_genuine(
        &tree::wal_segment(NAME, foreign, 6),
        &format!(
            "it was written by the cluster with system identifier {foreign}, and this job archives the cluster {} (learned from wal-push of 000000010000000000000005)",
            tree::FAKE_SYSTEM
        ),
    );
}

/// A repository written by an older lifeboat may hold a segment that can never be replayed;
/// the genuine segment is refused (the archive keeps what it has) with which copy is valid
/// and what to remove.
#[test]
fn a_conflict_with_a_broken_archived_copy_says_which_one_is_valid() {
    let archive = Archive::new();
    let genuine = tree::wal_segment(NAME, tree::FAKE_SYSTEM, 6);
    let key = format!("jobs/db/wal/00000001/{NAME}.zst");
    let broken = zstd::encode_all(&genuine[..8 << 20], 1).unwrap();
    std::fs::write(archive.repository.join(&key), &broken).unwrap();

    let refused = archive.push(NAME, &genuine);
    refused.assert_code(1);
    assert!(
        refused
            .stderr
            .contains("already holds a different file under that name, and that one can never be replayed: it is 8388608 bytes long")
            && refused.stderr.contains("The file being pushed is a valid segment")
            && refused.stderr.contains(&format!("remove '{key}' from repository 'local'")),
        "{}",
        refused.stderr
    );
    assert_eq!(
        std::fs::read(archive.repository.join(&key)).unwrap(),
        broken
    );
    std::fs::remove_file(archive.repository.join(&key)).unwrap();
    archive.push(NAME, &genuine).assert_code(0);

    // Two valid segments of the cluster under one name: said as such.
    let other = tree::wal_segment(NAME, tree::FAKE_SYSTEM, 8);
    let twice = archive.push(NAME, &other);
    twice.assert_code(1);
    assert!(
        twice
            .stderr
            .contains("both are valid segments of this job's cluster"),
        "{}",
        twice.stderr
    );
}

/// One repository's cluster record planted (another cluster), damaged, oversized or a FIFO:
/// the segment still goes to the repository whose record matches it, and the warning names
/// the record; only when no record matches is the segment refused.
#[test]
fn one_bad_cluster_record_does_not_stop_archiving_into_the_others() {
    let work = tempfile::tempdir().unwrap();
    let (a, b) = (work.path().join("a"), work.path().join("b"));
    let config = write_config(
        work.path(),
        &format!(
            "min_repositories = 1\n{}{}[[job]]\nname = \"db\"\nkind = \"postgres\"\nmode = \"physical\"\ndsn = \"postgresql://postgres@127.0.0.1:9/postgres\"\n",
            local_repository("a", &a),
            local_repository("b", &b),
        ),
    );
    let dir = work.path().join("pg_wal");
    std::fs::create_dir_all(&dir).unwrap();
    let push = |segment: u64, system: u64| {
        let name = format!("0000000100000000{segment:08X}");
        let path = dir.join(&name);
        std::fs::write(&path, tree::wal_segment(&name, system, segment)).unwrap();
        lifeboat(
            &config,
            &["wal-push", "--job", "db", path.to_str().unwrap()],
        )
    };
    push(1, tree::FAKE_SYSTEM).assert_code(0);
    let record = b.join("jobs/db/cluster.json");
    let genuine = std::fs::read_to_string(&record).unwrap();
    let planted = genuine.replace(&tree::FAKE_SYSTEM.to_string(), "42");
    let huge = format!("{genuine}{}", " ".repeat(1 << 20));
    let cases: [(&str, &dyn Fn()); 4] = [
        ("another cluster", &|| {
            std::fs::write(&record, &planted).unwrap()
        }),
        ("damaged", &|| {
            std::fs::write(&record, "{\"system_id").unwrap()
        }),
        ("oversized", &|| std::fs::write(&record, &huge).unwrap()),
        ("a FIFO", &|| {
            rustix::fs::mknodat(
                rustix::fs::CWD,
                &record,
                rustix::fs::FileType::Fifo,
                rustix::fs::Mode::from_raw_mode(0o600),
                0,
            )
            .unwrap();
        }),
    ];
    for (segment, (what, plant)) in (2..).zip(cases) {
        std::fs::remove_file(&record).unwrap();
        plant();
        let run = push(segment, tree::FAKE_SYSTEM);
        run.assert_code(0);
        assert!(
            run.stdout.contains("; stored in a\n")
                && run.stdout.contains("warning: repository 'b' lacks")
                && run.stdout.contains("jobs/db/cluster.json"),
            "{what}: {}",
            run.stdout
        );
        assert!(
            run.stderr.is_empty() || !run.stderr.contains("panicked"),
            "{what}: {}",
            run.stderr
        );
        std::fs::remove_file(&record).unwrap();
        std::fs::write(&record, &genuine).unwrap();
    }
    // Every record names another cluster: refused, and nothing stored.
    let name = "000000010000000000000009";
    let refused = push(9, tree::FAKE_SYSTEM + 1);
    refused.assert_code(1);
    refused.assert_stderr_has("repository 'b' records the same");
    assert!(!a.join(format!("jobs/db/wal/00000001/{name}.zst")).exists());
    assert!(!b.join(format!("jobs/db/wal/00000001/{name}.zst")).exists());
}

/// A timeline history that PostgreSQL cannot follow used to be archived, after which every
/// restore following the timeline failed; now it is refused, and a real one is taken.
#[test]
fn wal_push_refuses_a_history_that_is_none() {
    let archive = Archive::new();
    for (name, bytes, why) in [
        ("00000003.history", tree::noise(100, 3), "it is not text"),
        ("00000002.history", Vec::new(), "it names no ancestor"),
        (
            "00000001.history",
            b"1\t0/3000000\tx\n".to_vec(),
            "timeline 1 has no history",
        ),
        (
            "00000004.history",
            b"1\t0/3000000\tx\n5\t0/4000000\ty\n".to_vec(),
            "line 2 names timeline 5, which is no ancestor of timeline 4",
        ),
    ] {
        let refused = archive.push(name, &bytes);
        refused.assert_code(1);
        assert!(
            refused
                .stderr
                .contains(&format!("refusing to archive WAL file '{name}' of job 'db': it is no timeline history: {why}")),
            "{name}: {}",
            refused.stderr
        );
        assert!(
            !archive
                .repository
                .join(format!("jobs/db/wal/{}/{name}.zst", &name[..8]))
                .exists()
        );
    }
    archive
        .push(
            "00000002.history",
            b"1\t0/6000000\tno recovery target specified\n",
        )
        .assert_code(0);
}

/// The spool `wal-fetch` fetches ahead into, beside the file PostgreSQL asks for.
fn spool_of(pg_wal: &std::path::Path) -> std::path::PathBuf {
    pg_wal.join(".lifeboat-prefetch")
}

/// The spooled copy of segment `name`.
fn spooled(spool: &std::path::Path, name: &str) -> std::path::PathBuf {
    let found: Vec<String> = names_in(spool)
        .into_iter()
        .filter(|n| n.starts_with(&format!("{name}.")))
        .collect();
    assert_eq!(found.len(), 1, "{found:?}");
    spool.join(&found[0])
}

/// The names in `dir`, sorted; none when it is not there.
fn names_in(dir: &std::path::Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

/// Waits until the prefetch pass has left the spool holding exactly `segments` (besides its
/// lock file and the note of the segment served last, and with no temp file of a fetch in
/// progress).
fn wait_for_spool(spool: &std::path::Path, segments: &[&str]) {
    let mut expected: Vec<String> = segments.iter().map(|s| s.to_string()).collect();
    expected.sort();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        // Segments are spooled as NAME.OPTIONS, OPTIONS naming the options that fetched them.
        let mut names: Vec<String> = names_in(spool)
            .into_iter()
            .filter(|name| name != ".lock" && name != ".served")
            .map(|name| match name.split_once('.') {
                Some((segment, _)) if !segment.is_empty() => segment.to_string(),
                _ => name,
            })
            .collect();
        names.sort();
        if names == expected {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the spool holds {names:?}, not {expected:?}"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// `wal-fetch` of one segment starts a pass that fetches the next ones into the spool, each
/// checked; the next calls are served from it, byte for byte, and what recovery is past
/// leaves it. A damaged archived segment is never named in the spool: its call fetches it
/// and refuses it. `wal-prefetch --clear` (the restore's recovery_end_command) removes it.
#[test]
fn wal_fetch_serves_the_segments_a_pass_fetched_ahead_and_never_an_unchecked_one() {
    let archive = Archive::new();
    let name = |n: u64| format!("00000001{n:016X}");
    let segment = |n: u64| tree::wal_segment(&name(n), tree::FAKE_SYSTEM, n);
    for n in 6..=0xC {
        archive.push(&name(n), &segment(n)).assert_code(0);
    }
    // Segment 0xA damaged in the archive: valid zstd, but not the segment under its name.
    let damaged = archive
        .repository
        .join(format!("jobs/db/wal/00000001/{}.zst", name(0xA)));
    std::fs::write(&damaged, zstd::encode_all(&segment(0xB)[..], 1).unwrap()).unwrap();
    // Left by a pass that was killed.
    let pg_wal = archive.work.path().join("restored/pg_wal");
    let spool = spool_of(&pg_wal);
    std::fs::create_dir_all(&spool).unwrap();
    std::fs::write(spool.join(".lifeboat-wal-fetch-left"), b"junk").unwrap();

    let with_depth = |depth: u32| {
        let text = std::fs::read_to_string(&archive.config).unwrap();
        let text = text
            .lines()
            .filter(|l| !l.starts_with("wal_prefetch"))
            .collect::<Vec<_>>()
            .join("\n");
        std::fs::write(&archive.config, format!("{text}\nwal_prefetch = {depth}\n")).unwrap();
    };
    with_depth(4);
    let asked = pg_wal.join("RECOVERYXLOG");
    let fetch = |n: u64| {
        lifeboat(
            &archive.config,
            &[
                "wal-fetch",
                "--job",
                "db",
                &name(n),
                asked.to_str().unwrap(),
            ],
        )
    };
    // Options that leave no repository to ask are no "not archived".
    let none_left = lifeboat(
        &archive.config,
        &[
            "wal-fetch",
            "--job",
            "db",
            "--exclude",
            "local",
            &name(5),
            asked.to_str().unwrap(),
        ],
    );
    none_left.assert_code(255);
    none_left.assert_stderr_has("no repository of");
    fetch(5).assert_code(0);
    assert_eq!(std::fs::read(&asked).unwrap(), segment(5));
    // 6 to 9, but 0xA (damaged) left out; the killed pass's temp file is gone.
    wait_for_spool(&spool, &[&name(6), &name(7), &name(8), &name(9)]);
    for n in 6..=9 {
        assert_eq!(
            std::fs::read(spooled(&spool, &name(n))).unwrap(),
            segment(n)
        );
    }

    // Served from the spool: the archive's copy of 6 is gone, and 6 still comes back whole,
    // but only to a call with the options that fetched it: one reading `--from` a repository
    // is answered by that repository alone.
    std::fs::remove_file(
        archive
            .repository
            .join(format!("jobs/db/wal/00000001/{}.zst", name(6))),
    )
    .unwrap();
    lifeboat(
        &archive.config,
        &[
            "wal-fetch",
            "--job",
            "db",
            "--from",
            "local",
            &name(6),
            asked.to_str().unwrap(),
        ],
    )
    .assert_code(1);
    assert_eq!(std::fs::read(&asked).unwrap(), segment(5));
    fetch(6).assert_code(0);
    assert_eq!(std::fs::read(&asked).unwrap(), segment(6));
    // The pass after 6 fetches 0xA again and refuses it again.
    wait_for_spool(&spool, &[&name(7), &name(8), &name(9)]);
    fetch(7).assert_code(0);
    assert_eq!(std::fs::read(&asked).unwrap(), segment(7));
    // After 7: 8 and 9 kept, 0xB fetched, 0xA still refused.
    wait_for_spool(&spool, &[&name(8), &name(9), &name(0xB)]);
    fetch(9).assert_code(0);
    assert_eq!(std::fs::read(&asked).unwrap(), segment(9));
    // 8 is behind recovery now; 0xC is fetched.
    wait_for_spool(&spool, &[&name(0xB), &name(0xC)]);
    // The config changed (a repository removed, another identity: here a comment): what was
    // fetched under the old one is not served, and 0xB is not archived any more.
    std::fs::remove_file(
        archive
            .repository
            .join(format!("jobs/db/wal/00000001/{}.zst", name(0xB))),
    )
    .unwrap();
    let text = std::fs::read_to_string(&archive.config).unwrap();
    std::fs::write(&archive.config, format!("# changed\n{text}")).unwrap();
    fetch(0xB).assert_code(1);
    assert_eq!(std::fs::read(&asked).unwrap(), segment(9));
    let refused = fetch(0xA);
    refused.assert_code(255);
    assert!(
        refused
            .stderr
            .contains(&format!("damaged 'jobs/db/wal/00000001/{}.zst'", name(0xA))),
        "{}",
        refused.stderr
    );
    assert_eq!(std::fs::read(&asked).unwrap(), segment(9));

    // Another timeline served: the first one's segments go.
    let other = "00000002000000000000000D";
    archive
        .push(other, &tree::wal_segment(other, tree::FAKE_SYSTEM, 0xD))
        .assert_code(0);
    lifeboat(
        &archive.config,
        &["wal-fetch", "--job", "db", other, asked.to_str().unwrap()],
    )
    .assert_code(0);
    wait_for_spool(&spool, &[]);

    lifeboat(
        &archive.config,
        &[
            "wal-prefetch",
            "--clear",
            "--spool",
            spool.to_str().unwrap(),
        ],
    )
    .assert_code(0);
    assert!(!spool.exists());

    // Off: nothing is fetched ahead.
    with_depth(0);
    fetch(0xC).assert_code(0);
    assert_eq!(std::fs::read(&asked).unwrap(), segment(0xC));
    assert!(!spool.exists());
}
