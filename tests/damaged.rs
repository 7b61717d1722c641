//! One flipped byte in a stored object: `verify` names it, `restore` refuses it and writes
//! nothing into the target, and the intact copy in the other repository still restores.

use std::path::Path;

use aws_sdk_s3::primitives::ByteStream;

use crate::common::{Scenario, SeaweedFs, lifeboat, tree};

fn flip_middle_byte(data: &mut [u8]) {
    let middle = data.len() / 2;
    data[middle] ^= 0x20;
}

/// The config of a files job `config` over `source`, backed up once into the local repository
/// `work/repo`, and that repository.
fn backed_up_locally(work: &Path, source: &Path) -> (std::path::PathBuf, std::path::PathBuf) {
    let repo = work.join("repo");
    let config = Scenario::new(work)
        .local("local", &repo)
        .files_job("config", &[source])
        .write();
    lifeboat(&config, &["backup", "config"]).assert_code(0);
    (config, repo)
}

/// The id of the one backup of job `config` in the local repository at `repo`.
fn only_backup(repo: &Path) -> String {
    let mut ids = std::fs::read_dir(repo.join("jobs/config/backups")).unwrap();
    ids.next()
        .unwrap()
        .unwrap()
        .file_name()
        .into_string()
        .unwrap()
}

fn restore_from(config: &Path, repository: &str, into: &Path) -> crate::common::Run {
    let into = into.to_str().unwrap();
    lifeboat(
        config,
        &["restore", "config", "--from", repository, "--into", into],
    )
}

/// `verify` names the damaged object and fails; `restore` refuses it and leaves neither the
/// target nor its staging directory behind.
fn assert_damage_is_caught(config: &Path, work: &Path, repository: &str, object_key: &str) {
    let verify = lifeboat(config, &["verify", "config", "--from", repository]);
    verify.assert_code(1);
    verify.assert_stdout_has(format!("DAMAGED  {object_key}"));
    let summary = format!("1 damaged object(s) in repository '{repository}'");
    verify.assert_stderr_has(&summary);

    let into = work.join(format!("restore-from-damaged-{repository}"));
    let restore = restore_from(config, repository, &into);
    restore.assert_code(1);
    let message = format!("damaged object '{object_key}' in repository '{repository}'");
    restore.assert_stderr_has(&message);
    // It reads from that repository alone: no word of another one to read from.
    assert!(
        !restore.stderr.contains("reading from"),
        "{}",
        restore.stderr
    );
    assert!(
        !into.exists(),
        "the target '{}' was created",
        into.display()
    );
    let staging: Vec<_> = std::fs::read_dir(work)
        .unwrap()
        .filter_map(Result::ok)
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with(".lifeboat-restore-")
        })
        .collect();
    assert!(staging.is_empty(), "staging left behind: {staging:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flipped_byte_is_found_by_verify_and_refused_by_restore() {
    let server = SeaweedFs::start().await;
    server.create_bucket("backups").await;
    let work = tempfile::tempdir().unwrap();
    let source = work.path().join("src");
    tree::build(&source, 50, 2 * 1024 * 1024);
    let config = Scenario::new(work.path())
        .local("local", &work.path().join("repo"))
        .raw(&server.repository("s3", "backups", "lb"))
        .files_job("config", &[&source])
        .write();
    lifeboat(&config, &["backup", "config"]).assert_code(0);
    lifeboat(&config, &["verify", "--from", "local"]).assert_code(0);
    lifeboat(&config, &["verify", "--from", "s3"]).assert_code(0);

    let id = only_backup(&work.path().join("repo"));
    let object_key = format!("jobs/config/backups/{id}/files.tar.zst");

    // Damage the local copy.
    let local_object = work.path().join("repo").join(&object_key);
    let mut bytes = std::fs::read(&local_object).unwrap();
    flip_middle_byte(&mut bytes);
    std::fs::write(&local_object, &bytes).unwrap();
    assert_damage_is_caught(&config, work.path(), "local", &object_key);

    // The S3 copy is intact and restores.
    let into = work.path().join("restore-from-s3");
    restore_from(&config, "s3", &into).assert_code(0);
    tree::assert_same(&source, &into.join(source.strip_prefix("/").unwrap()));
    // A drill from any repository passes on the S3 copy, and its report says the local one
    // is damaged: a PASS never hides a copy that could not serve.
    let drill = work.path().join("any.toml");
    std::fs::write(
        &drill,
        format!(
            "name = \"any\"\njob = \"config\"\n\n[[check]]\nname = \"there\"\npath = \"{}\"\nexists = true\n",
            source.display()
        ),
    )
    .unwrap();
    let drilled = lifeboat(
        &config,
        &[
            "drill",
            "run",
            drill.to_str().unwrap(),
            "--format",
            "json",
            "--report-dir",
            work.path().join("reports").to_str().unwrap(),
        ],
    );
    drilled.assert_code(0);
    let report: serde_json::Value = serde_json::from_str(&drilled.stdout).unwrap();
    let warnings = report["reports"][0]["warnings"].to_string();
    assert!(
        warnings.contains("served by repository 's3'") && warnings.contains("'local' failed"),
        "{warnings}"
    );

    // Damage the S3 copy too.
    let client = server.client();
    let s3_key = format!("lb/{object_key}");
    let object = client
        .get_object()
        .bucket("backups")
        .key(&s3_key)
        .send()
        .await
        .unwrap();
    let mut bytes = object.body.collect().await.unwrap().into_bytes().to_vec();
    flip_middle_byte(&mut bytes);
    let body = ByteStream::from(bytes);
    client
        .put_object()
        .bucket("backups")
        .key(&s3_key)
        .body(body)
        .send()
        .await
        .unwrap();
    assert_damage_is_caught(&config, work.path(), "s3", &object_key);
}

/// A manifest edited by hand — an object renamed to point elsewhere, a size changed — is
/// found by `verify` and refused by `restore`, which reads the intact manifest of the other
/// repository when there is one and touches no target otherwise.
#[test]
fn a_manifest_edited_by_hand_is_found_by_verify_and_refused_by_restore() {
    let work = tempfile::tempdir().unwrap();
    let source = work.path().join("src");
    tree::build(&source, 20, 0);
    let config = Scenario::new(work.path())
        .local("a", &work.path().join("a"))
        .local("b", &work.path().join("b"))
        .files_job("config", &[&source])
        .write();
    lifeboat(&config, &["backup", "config"]).assert_code(0);
    let id = only_backup(&work.path().join("a"));
    let key = format!("jobs/config/backups/{id}/manifest.json");
    let original = std::fs::read_to_string(work.path().join("a").join(&key)).unwrap();
    // Something for the renamed entry to point at.
    let object_dir = work
        .path()
        .join("a")
        .join(&key)
        .parent()
        .unwrap()
        .to_path_buf();
    std::fs::copy(
        object_dir.join("files.tar.zst"),
        object_dir.join("other.tar.zst"),
    )
    .unwrap();
    let size = regex::Regex::new(r#""size": (\d+)"#).unwrap();
    let stored = size.captures(&original).unwrap()[1].parse::<u64>().unwrap();
    let edits = [
        (
            "an object renamed",
            original.replace("\"name\": \"files.tar.zst\"", "\"name\": \"other.tar.zst\""),
        ),
        (
            "a size changed",
            original.replacen(
                &format!("\"size\": {stored}"),
                &format!("\"size\": {}", stored + 1),
                1,
            ),
        ),
    ];
    for (what, edited) in edits {
        assert_ne!(edited, original, "{what}: the edit changed nothing");
        std::fs::write(work.path().join("a").join(&key), &edited).unwrap();

        let verify = lifeboat(&config, &["verify", "config", "--from", "a"]);
        verify.assert_code(1);
        assert!(
            verify.stdout.contains(&format!("DAMAGED  {key}"))
                && verify.stdout.contains("changed after lifeboat wrote it"),
            "{what}: {}",
            verify.stdout
        );
        let into = work.path().join("restored");
        let restore = restore_from(&config, "a", &into);
        restore.assert_code(1);
        assert!(
            restore
                .stderr
                .contains(&format!("manifest '{key}' in repository 'a'"))
                && restore.stderr.contains("changed after lifeboat wrote it"),
            "{what}: {}",
            restore.stderr
        );
        assert!(!into.exists(), "{what}: the target was created");
        // Without --from, the intact manifest in 'b' serves.
        lifeboat(
            &config,
            &["restore", "config", "--into", into.to_str().unwrap()],
        )
        .assert_code(0);
        tree::assert_same(&source, &into.join(source.strip_prefix("/").unwrap()));
        std::fs::remove_dir_all(&into).unwrap();
    }
}

/// `show` without `--from` reads every repository: a backup the first lacks, or holds with
/// an unreadable manifest, is shown from the one that holds it whole, and `latest` is the
/// newest any of them holds.
#[test]
fn show_reads_the_backup_from_whichever_repository_holds_it() {
    let work = tempfile::tempdir().unwrap();
    let source = work.path().join("src");
    tree::write_file(&source.join("a.conf"), b"a\n", 0o644);
    let (first, second) = (work.path().join("first"), work.path().join("second"));
    let config = Scenario::new(work.path())
        .local("first", &first)
        .local("second", &second)
        .files_job("config", &[&source])
        .write();
    lifeboat(&config, &["backup", "config"]).assert_code(0);
    let backups = first.join("jobs/config/backups");
    let id = only_backup(&first);
    std::fs::write(backups.join(&id).join("manifest.json"), b"{ not json").unwrap();
    let shown = lifeboat(&config, &["show", &id, "--format", "json"]);
    shown.assert_code(0);
    shown.assert_stdout_has(format!("\"id\": \"{id}\""));
    std::fs::remove_dir_all(backups.join(&id)).unwrap();
    let latest = lifeboat(&config, &["show", "latest", "--job", "config"]);
    latest.assert_code(0);
    latest.assert_stdout_has(&id);
    let from_first = lifeboat(&config, &["show", &id, "--from", "first"]);
    from_first.assert_code(1);
}

/// An object of several blocks is checked block by block as it downloads, and unpacked only
/// as far as it matched: a byte flipped in its last block, or a manifest whose block digest
/// does not match an intact object, fails the restore with the block named and leaves no
/// target, and `verify` finds the same.
#[test]
fn a_block_that_does_not_match_its_digest_fails_the_restore_and_verify() {
    let work = tempfile::tempdir().unwrap();
    let source = work.path().join("src");
    tree::build(&source, 20, 20 << 20);
    let (config, repo) = backed_up_locally(work.path(), &source);
    let object_key = format!("jobs/config/backups/{}/files.tar.zst", only_backup(&repo));
    let manifest_path = repo.join(&object_key).with_file_name("manifest.json");
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&manifest_path).unwrap()).unwrap();
    let blocks = &manifest["objects"][0]["block_digests"];
    assert_eq!(blocks["sha256"].as_array().unwrap().len(), 3, "{manifest}");

    // The last block's digest no longer matches the intact object.
    let intact_manifest = std::fs::read(&manifest_path).unwrap();
    crate::common::edit_manifest_object(&repo, "files.tar.zst", |object| {
        object["block_digests"]["sha256"][1] = serde_json::json!("ab".repeat(32));
    });
    let verify = lifeboat(&config, &["verify", "config"]);
    verify.assert_code(1);
    verify.assert_stdout_has(format!("DAMAGED  {object_key}"));
    verify.assert_stderr_has("do not match block digest 2 of 3");
    let into = work.path().join("restored");
    let restore = restore_from(&config, "local", &into);
    restore.assert_code(1);
    restore.assert_stderr_has("do not match block digest 2 of 3");
    assert!(!into.exists(), "the target was created");

    // A byte flipped in the object's last block, under its own manifest.
    std::fs::write(&manifest_path, intact_manifest).unwrap();
    let object = repo.join(&object_key);
    let mut bytes = std::fs::read(&object).unwrap();
    let last = bytes.len() - 100;
    bytes[last] ^= 0x20;
    std::fs::write(&object, &bytes).unwrap();
    assert_damage_is_caught(&config, work.path(), "local", &object_key);
    let restore = restore_from(&config, "local", &into);
    restore.assert_stderr_has("do not match block digest 3 of 3");

    bytes[last] ^= 0x20;
    std::fs::write(&object, &bytes).unwrap();
    restore_from(&config, "local", &into).assert_code(0);
    tree::assert_same(&source, &into.join(source.strip_prefix("/").unwrap()));
}

/// A manifest longer than any lifeboat writes (planted in a bucket) is read only as far as
/// the limit and refused, naming it, instead of being parsed whole by every `list`.
#[test]
fn a_manifest_over_the_limit_is_refused_unread() {
    let work = tempfile::tempdir().unwrap();
    let source = work.path().join("src");
    tree::write_file(&source.join("a.conf"), b"a\n", 0o644);
    let (config, repo) = backed_up_locally(work.path(), &source);
    let id = only_backup(&repo);
    let manifest = repo.join(format!("jobs/config/backups/{id}/manifest.json"));
    let mut planted = std::fs::read(&manifest).unwrap();
    planted.resize(17 << 20, b' ');
    std::fs::write(&manifest, planted).unwrap();
    let shown = lifeboat(&config, &["show", &id, "--from", "local"]);
    shown.assert_code(1);
    shown.assert_stderr_has("it is over 16.0 MiB");
}
