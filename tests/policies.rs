//! The least-privilege S3 policies of `runbooks/iam/`, enforced by a real server: SeaweedFS
//! evaluates IAM policy documents attached to its identities as AWS does. Each host's
//! identity runs what that host runs, and no more: the backup host backs up, releases its
//! claims, and cannot delete a backup; the prune host prunes and cannot back up; the
//! restore host restores, verifies and drills, and can neither write a backup nor delete one.

use std::path::Path;

use crate::common::{SeaweedFs, lifeboat, lifeboat_command, run_command, tree, write_config};

const BUCKET: &str = "policies";
/// The bucket and prefix the shipped policies name.
const SHIPPED_BUCKET: &str = "acme-backups-use1";
const SHIPPED_PREFIX: &str = "lifeboat";

/// (identity, access key, policy file)
const HOSTS: [(&str, &str, &str); 3] = [
    ("backup-host", "backup-host-key", "backup-host.json"),
    ("prune-host", "prune-host-key", "prune-host.json"),
    ("restore-host", "restore-host-key", "restore-host.json"),
];

fn secret_of(key: &str) -> String {
    format!("{key}-secret")
}

/// A policy of runbooks/iam/ for the test's bucket, as SeaweedFS's `-s3.config` holds it.
fn policy(name: &str, file: &str) -> String {
    let text = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("runbooks/iam")
            .join(file),
    )
    .unwrap();
    assert!(text.contains(&format!("arn:aws:s3:::{SHIPPED_BUCKET}/{SHIPPED_PREFIX}/")));
    let document = text.replace(SHIPPED_BUCKET, BUCKET);
    format!(r#"{{"name":"{name}","document":{document}}}"#)
}

/// `lifeboat ARGS` with the credentials of one host's identity.
fn as_host(config: &Path, key: &str, args: &[&str]) -> crate::common::Run {
    run_command(
        lifeboat_command(config)
            .env("AWS_ACCESS_KEY_ID", key)
            .env("AWS_SECRET_ACCESS_KEY", secret_of(key))
            .args(args),
    )
}

fn denied(run: &crate::common::Run) -> bool {
    let output = format!("{}{}", run.stdout, run.stderr);
    output.contains("AccessDenied") || output.contains("Access Denied")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_host_can_do_its_work_and_no_more() {
    let identities: Vec<String> = HOSTS
        .iter()
        .map(|(name, key, _)| {
            format!(
                r#"{{"name":"{name}","credentials":[{{"accessKey":"{key}","secretKey":"{}"}}],"policyNames":["{name}"]}}"#,
                secret_of(key)
            )
        })
        .collect();
    let policies: Vec<String> = HOSTS
        .iter()
        .map(|(name, _, file)| policy(name, file))
        .collect();
    let s3 = SeaweedFs::start_with_identities(&identities, &policies).await;
    s3.create_bucket(BUCKET).await;

    let work = tempfile::tempdir().unwrap();
    let source = work.path().join("etc/app");
    tree::build(&source, 20, 7);
    let config = write_config(
        work.path(),
        &format!(
            "{}[[job]]\nname = \"conf\"\nkind = \"files\"\npaths = [\"{}\"]\nretention = {{ keep_last = 1 }}\n",
            s3.repository("primary", BUCKET, SHIPPED_PREFIX),
            source.display()
        ),
    );
    let [(_, backup_key, _), (_, prune_key, _), (_, restore_key, _)] = HOSTS;

    // The backup host: its repository checks out (the probe is deleted), it backs up twice
    // and releases its claims.
    as_host(&config, backup_key, &["check"]).assert_code(0);
    as_host(&config, backup_key, &["backup", "conf"]).assert_code(0);
    std::thread::sleep(std::time::Duration::from_millis(1100));
    as_host(&config, backup_key, &["backup", "conf"]).assert_code(0);
    let claims = s3
        .keys(BUCKET, &format!("{SHIPPED_PREFIX}/jobs/conf/claims/"))
        .await;
    assert!(claims.is_empty(), "claims left behind: {claims:?}");
    let manifests = s3.manifest_keys(BUCKET).await;
    assert_eq!(manifests.len(), 2, "{manifests:?}");

    // ... but cannot delete one: a stolen backup-host key destroys no backup.
    let refused = as_host(&config, backup_key, &["prune"]);
    assert_ne!(refused.code, 0, "{}{}", refused.stdout, refused.stderr);
    assert!(denied(&refused), "{}{}", refused.stdout, refused.stderr);
    assert_eq!(s3.manifest_keys(BUCKET).await, manifests, "a backup went");
    let first = manifests[0].trim_end_matches("manifest.json").to_string();
    let object = format!("{first}files.tar.zst");
    let deleted = s3
        .client_as(backup_key, &secret_of(backup_key))
        .delete_object()
        .bucket(BUCKET)
        .key(&object)
        .send()
        .await;
    assert!(deleted.is_err(), "the backup host deleted {object}");
    assert!(!s3.object(BUCKET, &object).await.is_empty());

    // The restore host restores, verifies and reads the status; it cannot write a backup.
    let restored = work.path().join("restored");
    as_host(
        &config,
        restore_key,
        &["restore", "conf", "--into", restored.to_str().unwrap()],
    )
    .assert_code(0);
    tree::assert_same(&source, &restored.join(source.strip_prefix("/").unwrap()));
    as_host(
        &config,
        restore_key,
        &["verify", "conf", "--backup", "latest"],
    )
    .assert_code(0);
    let written = as_host(&config, restore_key, &["backup", "conf"]);
    assert_ne!(written.code, 0);
    assert!(denied(&written), "{}{}", written.stdout, written.stderr);
    let removed = as_host(&config, restore_key, &["prune"]);
    assert_ne!(removed.code, 0);
    assert_eq!(s3.manifest_keys(BUCKET).await, manifests);

    // The prune host prunes to the one backup kept, and cannot back up.
    as_host(&config, prune_key, &["prune"]).assert_code(0);
    assert_eq!(s3.manifest_keys(BUCKET).await, manifests[1..]);
    let written = as_host(&config, prune_key, &["backup", "conf"]);
    assert_ne!(written.code, 0);
    assert!(denied(&written), "{}{}", written.stdout, written.stderr);
    lifeboat(&config, &["list", "conf"]).assert_code(0);
}
