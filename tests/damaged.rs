//! One flipped byte in a stored object: `verify` names it, `restore` refuses it and writes
//! nothing into the target, and the intact copy in the other repository still restores.

use std::path::Path;

use aws_sdk_s3::primitives::ByteStream;

use crate::common::{SeaweedFs, files_job, lifeboat, local_repository, tree, write_config};

fn flip_middle_byte(data: &mut [u8]) {
    let middle = data.len() / 2;
    data[middle] ^= 0x20;
}

fn assert_nothing_written(into: &Path) {
    assert!(
        !into.exists(),
        "the target '{}' was created",
        into.display()
    );
    let leftovers: Vec<_> = std::fs::read_dir(into.parent().unwrap())
        .unwrap()
        .filter_map(Result::ok)
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with(".lifeboat-restore-")
        })
        .collect();
    assert!(leftovers.is_empty(), "staging left behind: {leftovers:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flipped_byte_is_found_by_verify_and_refused_by_restore() {
    let server = SeaweedFs::start().await;
    server.create_bucket("backups").await;
    let work = tempfile::tempdir().unwrap();
    let source = work.path().join("src");
    tree::build(&source, 50, 2 * 1024 * 1024);
    let config = write_config(
        work.path(),
        &format!(
            "{}{}{}",
            local_repository("local", &work.path().join("repo")),
            server.repository("s3", "backups", "lb"),
            files_job("config", &[&source])
        ),
    );
    lifeboat(&config, &["backup", "config"]).assert_code(0);
    lifeboat(&config, &["verify", "--from", "local"]).assert_code(0);
    lifeboat(&config, &["verify", "--from", "s3"]).assert_code(0);

    let id = std::fs::read_dir(work.path().join("repo/jobs/config/backups"))
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .file_name();
    let id = id.to_str().unwrap().to_string();
    let object_key = format!("jobs/config/backups/{id}/files.tar.zst");

    // Damage the local copy.
    let local_object = work.path().join("repo").join(&object_key);
    let mut bytes = std::fs::read(&local_object).unwrap();
    flip_middle_byte(&mut bytes);
    std::fs::write(&local_object, &bytes).unwrap();

    let verify = lifeboat(&config, &["verify", "--from", "local"]);
    verify.assert_code(1);
    assert!(
        verify.stdout.contains(&format!("DAMAGED  {object_key}")),
        "{}",
        verify.stdout
    );
    assert!(
        verify
            .stderr
            .contains("1 damaged object(s) in repository 'local'"),
        "{}",
        verify.stderr
    );

    let into = work.path().join("restore-from-local");
    let restore = lifeboat(
        &config,
        &[
            "restore",
            "config",
            "--from",
            "local",
            "--into",
            into.to_str().unwrap(),
        ],
    );
    restore.assert_code(1);
    assert!(
        restore.stderr.contains(&format!(
            "damaged object '{object_key}' in repository 'local'"
        )),
        "{}",
        restore.stderr
    );
    assert_nothing_written(&into);

    // The S3 copy is intact and restores.
    let into = work.path().join("restore-from-s3");
    lifeboat(
        &config,
        &[
            "restore",
            "config",
            "--from",
            "s3",
            "--into",
            into.to_str().unwrap(),
        ],
    )
    .assert_code(0);
    tree::assert_same(&source, &into.join(source.strip_prefix("/").unwrap()));

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
    client
        .put_object()
        .bucket("backups")
        .key(&s3_key)
        .body(ByteStream::from(bytes))
        .send()
        .await
        .unwrap();

    let verify = lifeboat(&config, &["verify", "config", "--from", "s3"]);
    verify.assert_code(1);
    assert!(
        verify.stdout.contains(&format!("DAMAGED  {object_key}")),
        "{}",
        verify.stdout
    );
    let into = work.path().join("restore-from-damaged-s3");
    let restore = lifeboat(
        &config,
        &[
            "restore",
            "config",
            "--from",
            "s3",
            "--into",
            into.to_str().unwrap(),
        ],
    );
    restore.assert_code(1);
    assert!(
        restore
            .stderr
            .contains(&format!("damaged object '{object_key}' in repository 's3'")),
        "{}",
        restore.stderr
    );
    assert_nothing_written(&into);
}
