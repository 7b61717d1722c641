//! What a backup holds in memory: a backup of data that does not compress, into two S3
//! regions and a local repository at the default part settings, peaks within the bound
//! `check` prints (README, "Memory"), and every region restores it byte for byte.

use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};

use crate::common::{Scenario, SeaweedFs, lifeboat, lifeboat_command, local_repository, tree};

const BUCKET: &str = "backups";
const PREFIX: &str = "lifeboat";

/// Runs lifeboat with `args` to its end and returns its exit code and its peak RSS in bytes.
/// Measured by GNU time, whose child is forked from that small program: a child spawned
/// straight from this test process would be charged the whole test process's peak RSS,
/// which the kernel carries into the child's high-water mark across exec.
fn peak_rss(config: &Path, args: &[&str]) -> (i32, u64) {
    let report = tempfile::NamedTempFile::new().unwrap();
    let lifeboat = lifeboat_command(config);
    let status = Command::new("/usr/bin/time")
        .arg("-o")
        .arg(report.path())
        .args(["-f", "%M"])
        .arg(lifeboat.get_program())
        .args(lifeboat.get_args())
        .args(args)
        .envs(lifeboat.get_envs().filter_map(|(k, v)| Some((k, v?))))
        .env_remove("LIFEBOAT_CONFIG")
        .env_remove("LIFEBOAT_IDENTITY_FILE")
        .env_remove("AWS_PROFILE")
        .stdout(Stdio::null())
        .status()
        .expect("run /usr/bin/time (Debian package `time`)");
    let text = std::fs::read_to_string(report.path()).unwrap();
    let kib: u64 = text
        .lines()
        .last()
        .and_then(|line| line.trim().parse().ok())
        .unwrap_or_else(|| panic!("GNU time reported no peak RSS: {text:?}"));
    (status.code().unwrap_or(-1), kib * 1024)
}

/// Files of bytes that zstd cannot shrink, `total` bytes in all.
fn incompressible_tree(dir: &std::path::Path, total: usize) {
    std::fs::create_dir_all(dir).unwrap();
    let mut rng = fastrand::Rng::with_seed(0x6c69_6665_626f_6174);
    let per_file = 32 << 20;
    for index in 0..total.div_ceil(per_file) {
        let mut file = std::fs::File::create(dir.join(format!("blob-{index}.bin"))).unwrap();
        let mut left = per_file.min(total - index * per_file);
        let mut block = vec![0u8; 1 << 20];
        while left > 0 {
            rng.fill(&mut block);
            let take = left.min(block.len());
            file.write_all(&block[..take]).unwrap();
            left -= take;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_into_two_regions_and_a_local_repository_stays_within_its_memory_bound() {
    let region_a = SeaweedFs::start().await;
    let region_b = SeaweedFs::start().await;
    region_a.create_bucket(BUCKET).await;
    region_b.create_bucket(BUCKET).await;
    let work = tempfile::tempdir().unwrap();
    let source = work.path().join("data");
    incompressible_tree(&source, 128 << 20);
    // The default part settings, not the tests' smaller ones; two zstd workers on any
    // machine, so the bound is the same everywhere.
    let default_parts = |text: String| text.replace("part_size = \"5MiB\"\n", "");
    let config = Scenario::new(work.path())
        .raw(&default_parts(region_a.repository("a", BUCKET, PREFIX)))
        .raw(&default_parts(region_b.repository("b", BUCKET, PREFIX)))
        .raw(&local_repository("local", &work.path().join("repo")))
        .files_job("data", &[&source])
        .raw("[compression]\nthreads = 2\n")
        .write();
    let loaded = lifeboat::config::Config::load(&config).unwrap();
    let bound = lifeboat::backup::memory_bound(&loaded).total();
    assert_eq!(
        lifeboat::backup::memory_bound(&loaded).parts,
        2 * 4 * (8 << 20),
        "two regions at the default 8 MiB × 4"
    );
    lifeboat(&config, &["check"]).assert_stdout_has(format!(
        "memory: a backup holds at most about {}",
        bytesize::ByteSize(bound).display().iec()
    ));

    let (code, peak) = peak_rss(&config, &["-q", "backup", "data"]);
    assert_eq!(code, 0, "the backup failed");
    let allowed = bound + bound / 4;
    assert!(
        peak <= allowed,
        "peak RSS {} MiB, more than the bound {} MiB + 25%",
        peak >> 20,
        bound >> 20
    );

    // Both regions were sent the same shared chunks: each restores the tree byte for byte,
    // reading ranges ahead within their bound.
    for region in ["a", "b"] {
        let into = work.path().join(format!("restored-{region}"));
        let (code, peak) = peak_rss(
            &config,
            &[
                "restore",
                "data",
                "--from",
                region,
                "--into",
                into.to_str().unwrap(),
            ],
        );
        assert_eq!(code, 0, "the restore from {region} failed");
        tree::assert_same(&source, &into.join(source.strip_prefix("/").unwrap()));
        let repository = loaded
            .repositories
            .iter()
            .find(|r| r.name == region)
            .unwrap();
        let bound = lifeboat::restore::memory_bound(repository);
        assert!(
            peak <= bound + bound / 4,
            "restore from {region}: peak RSS {} MiB, more than the bound {} MiB + 25%",
            peak >> 20,
            bound >> 20
        );
    }
    lifeboat(&config, &["verify", "data"]).assert_code(0);
}
