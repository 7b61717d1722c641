//! Signed manifests against a bucket writer: a backup signed by the trusted key restores and
//! `minisign -Vm` accepts it; a manifest changed and re-sealed by hand, one left unsigned, one
//! signed by another key, and one with another backup's signature beside it are each refused
//! by restore, verify, drill and replicate, naming the object — and `minisign` refuses the
//! changed one too.

use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::common::{Run, files_job, lifeboat, local_repository, write_config};

fn keygen(dir: &Path, name: &str) -> (PathBuf, String) {
    let path = dir.join(name);
    let run = lifeboat(
        &dir.join("none.toml"),
        &["keygen", "--signing", "--output", path.to_str().unwrap()],
    );
    run.assert_code(0);
    (path, run.stdout.trim().to_string())
}

fn minisign_verifies(manifest: &Path, public_key: &str) -> bool {
    std::process::Command::new("minisign")
        .args(["-Vm", manifest.to_str().unwrap(), "-P", public_key])
        .output()
        .expect("minisign is installed by .ci/setup")
        .status
        .success()
}

/// `manifest` with `host` changed and its seal recomputed, as the README says how.
fn resealed(manifest: &[u8]) -> Vec<u8> {
    let text = String::from_utf8(manifest.to_vec()).unwrap();
    let edited = regex::Regex::new(r#""host": "[^"]*""#)
        .unwrap()
        .replace(&text, r#""host": "attacker""#)
        .into_owned();
    let seal = regex::Regex::new(r#""manifest_sha256": "([0-9a-f]{64})""#).unwrap();
    let zeroed = seal
        .replace(
            &edited,
            format!(r#""manifest_sha256": "{}""#, "0".repeat(64)),
        )
        .into_owned();
    let sum = hex::encode(Sha256::digest(zeroed.as_bytes()));
    seal.replace(&zeroed, format!(r#""manifest_sha256": "{sum}""#))
        .into_owned()
        .into_bytes()
}

/// What a bucket writer leaves: (what, manifest, signature beside it, why it is refused).
type Case = (&'static str, Vec<u8>, Option<Vec<u8>>, &'static str);

fn assert_refused(run: &Run, what: &str, object: &str, why: &str) {
    assert_eq!(run.code, 1, "{what}: {}\n{}", run.stdout, run.stderr);
    let said = format!("{}{}", run.stdout, run.stderr);
    assert!(
        said.contains(object) && said.contains(why),
        "{what}: expected '{object}' and '{why}' in:\n{said}"
    );
}

#[test]
fn only_manifests_signed_by_a_trusted_key_are_used() {
    let work = tempfile::tempdir().unwrap();
    let (key, public) = keygen(work.path(), "signing.key");
    let (other_key, _) = keygen(work.path(), "other.key");
    let source = work.path().join("etc");
    std::fs::create_dir_all(&source).unwrap();
    let conf = source.join("app.conf");
    std::fs::write(&conf, "listen = 8080\n").unwrap();
    let (a, b) = (work.path().join("a"), work.path().join("b"));
    let config = write_config(
        work.path(),
        &format!(
            "[signing]\nkey_file = \"{}\"\ntrusted_signers = [\"{public}\"]\n\n{}{}{}",
            key.display(),
            local_repository("a", &a),
            local_repository("b", &b),
            files_job("conf", &[&source])
        ),
    );
    let drill = work.path().join("drill.toml");
    std::fs::write(
        &drill,
        format!(
            "name = \"signed\"\njob = \"conf\"\nbackup = \"latest\"\n\n[[check]]\nname = \"config back\"\npath = \"{}\"\ncontains = \"listen\"\n",
            conf.display()
        ),
    )
    .unwrap();
    let drill_run = || {
        lifeboat(
            &config,
            &[
                "drill",
                "run",
                drill.to_str().unwrap(),
                "--report-dir",
                work.path().join("reports").to_str().unwrap(),
            ],
        )
    };
    let backup = || crate::common::back_up(&config, "conf");
    let first = backup();
    std::thread::sleep(std::time::Duration::from_millis(1100));
    let id = backup();
    let dir = |root: &Path, id: &str| root.join(format!("jobs/conf/backups/{id}"));
    let object = format!("jobs/conf/backups/{id}/manifest.json");

    // Genuine: everything takes it, and so does minisign.
    assert!(minisign_verifies(
        &dir(&a, &id).join("manifest.json"),
        &public
    ));
    lifeboat(&config, &["verify", "conf"]).assert_code(0);
    drill_run().assert_code(0);
    let into = work.path().join("restored");
    lifeboat(
        &config,
        &["restore", "conf", "--into", into.to_str().unwrap()],
    )
    .assert_code(0);

    let genuine = std::fs::read(dir(&a, &id).join("manifest.json")).unwrap();
    let genuine_signature = std::fs::read(dir(&a, &id).join("manifest.json.minisig")).unwrap();
    let other_signer = lifeboat::signing::Signer::load(&other_key).unwrap();
    let first_signature = std::fs::read(dir(&a, &first).join("manifest.json.minisig")).unwrap();
    // (manifest, signature) as a bucket writer leaves them, and what each is refused for.
    let cases: Vec<Case> = vec![
        (
            "re-sealed by hand",
            resealed(&genuine),
            Some(genuine_signature.clone()),
            "does not match it",
        ),
        ("unsigned", genuine.clone(), None, "it is not signed"),
        (
            "signed by another key",
            resealed(&genuine),
            Some(other_signer.sign(&resealed(&genuine), &object).unwrap()),
            "which is not in trusted_signers",
        ),
        (
            "another backup's signature",
            genuine.clone(),
            Some(first_signature),
            "does not match it",
        ),
    ];
    let plant = |root: &Path, manifest: &[u8], signature: &Option<Vec<u8>>| {
        let at = dir(root, &id);
        std::fs::write(at.join("manifest.json"), manifest).unwrap();
        let signature_path = at.join("manifest.json.minisig");
        match signature {
            Some(bytes) => std::fs::write(&signature_path, bytes).unwrap(),
            None => {
                let _ = std::fs::remove_file(&signature_path);
            }
        }
    };
    for (what, manifest, signature, why) in &cases {
        for root in [&a, &b] {
            plant(root, manifest, signature);
        }
        let into = work
            .path()
            .join(format!("restored-{}", what.replace(' ', "-")));
        assert_refused(
            &lifeboat(
                &config,
                &[
                    "restore",
                    "conf",
                    "--backup",
                    &id,
                    "--into",
                    into.to_str().unwrap(),
                ],
            ),
            &format!("restore, {what}"),
            &object,
            why,
        );
        assert!(!into.exists(), "restore, {what}: something was written");
        assert_refused(
            &lifeboat(&config, &["verify", "conf"]),
            &format!("verify, {what}"),
            &object,
            why,
        );
        let drill = drill_run();
        assert_eq!(
            drill.code, 1,
            "drill, {what}: {}\n{}",
            drill.stdout, drill.stderr
        );
        // list and status do not count it: the newest backup is the one before.
        crate::common::assert_listed_damaged(&config, "conf", &id, what);
        let status = lifeboat(&config, &["status", "--format", "json"]);
        assert_eq!(status.code, 2, "status, {what}: {}", status.stdout);
        let status: serde_json::Value = serde_json::from_str(&status.stdout).unwrap();
        assert_eq!(status["jobs"][0]["newest_backup"], first.as_str(), "{what}");
        // Replicate copies nothing of it into a repository that lacks it.
        std::fs::remove_dir_all(dir(&b, &id)).unwrap();
        let replicate = lifeboat(&config, &["replicate", "conf"]);
        assert_refused(&replicate, &format!("replicate, {what}"), &object, why);
        assert!(
            !dir(&b, &id).join("manifest.json").exists(),
            "replicate, {what}: copied"
        );
        std::fs::create_dir_all(dir(&b, &id)).unwrap();
        for entry in std::fs::read_dir(dir(&a, &id)).unwrap() {
            let entry = entry.unwrap();
            std::fs::copy(entry.path(), dir(&b, &id).join(entry.file_name())).unwrap();
        }
    }
    // The changed manifest fails minisign as it fails lifeboat.
    plant(&a, &resealed(&genuine), &Some(genuine_signature.clone()));
    assert!(!minisign_verifies(
        &dir(&a, &id).join("manifest.json"),
        &public
    ));
    // Put back, it is trusted again everywhere.
    for root in [&a, &b] {
        plant(root, &genuine, &Some(genuine_signature.clone()));
    }
    lifeboat(&config, &["verify", "conf"]).assert_code(0);
    lifeboat(&config, &["replicate", "conf"]).assert_code(0);

    // A genuine backup, manifest and signature, copied under a newer id (a replay): no
    // reader takes it for a backup, and retention gives it no slot.
    let replay = {
        let at = chrono::NaiveDateTime::parse_from_str(&id, "%Y%m%dT%H%M%SZ").unwrap()
            + chrono::Duration::seconds(1);
        at.format("%Y%m%dT%H%M%SZ").to_string()
    };
    for root in [&a, &b] {
        std::fs::create_dir_all(dir(root, &replay)).unwrap();
        for entry in std::fs::read_dir(dir(root, &id)).unwrap() {
            let entry = entry.unwrap();
            std::fs::copy(entry.path(), dir(root, &replay).join(entry.file_name())).unwrap();
        }
    }
    crate::common::assert_listed_damaged(&config, "conf", &replay, "a replay");
    let status = lifeboat(&config, &["status", "--format", "json"]);
    let status: serde_json::Value = serde_json::from_str(&status.stdout).unwrap();
    assert_eq!(status["jobs"][0]["newest_backup"], id.as_str());
    let keep_one = work.path().join("keep-one");
    std::fs::create_dir_all(&keep_one).unwrap();
    let pruning = write_config(
        &keep_one,
        &format!(
            "[signing]\ntrusted_signers = [\"{public}\"]\n\n{}{}{}retention = {{ keep_last = 1 }}\n",
            local_repository("a", &a),
            local_repository("b", &b),
            files_job("conf", &[&source])
        ),
    );
    lifeboat(&pruning, &["prune", "conf"]).assert_code(0);
    for root in [&a, &b] {
        assert!(
            dir(root, &id).join("manifest.json").exists(),
            "the newest genuine backup stays"
        );
        assert!(
            !dir(root, &first).join("manifest.json").exists(),
            "the older one goes"
        );
    }
    let into = work.path().join("after-prune");
    lifeboat(
        &config,
        &[
            "restore",
            "conf",
            "--backup",
            &id,
            "--into",
            into.to_str().unwrap(),
        ],
    )
    .assert_code(0);
}

/// Timeline history files steer a recovery: with signing they are signed by `wal-push`, and a
/// restore host that requires signatures fetches only a signed one — a planted history file
/// stops recovery (exit 255) naming it instead of sending it down another timeline.
#[test]
fn history_files_are_signed_and_a_planted_one_is_refused() {
    let work = tempfile::tempdir().unwrap();
    let (key, public) = keygen(work.path(), "signing.key");
    let (a, b) = (work.path().join("a"), work.path().join("b"));
    let job = "[[job]]\nname = \"db\"\nkind = \"postgres\"\nmode = \"physical\"\ndsn = \"postgresql://postgres@127.0.0.1:9/postgres\"\n";
    let config = write_config(
        work.path(),
        &format!(
            "[signing]\nkey_file = \"{}\"\ntrusted_signers = [\"{public}\"]\n\n{}{}{job}",
            key.display(),
            local_repository("a", &a),
            local_repository("b", &b),
        ),
    );
    let pg_wal = work.path().join("pg_wal");
    std::fs::create_dir_all(&pg_wal).unwrap();
    let history = pg_wal.join("00000002.history");
    std::fs::write(&history, "1\t0/3000000\tno recovery target specified\n").unwrap();
    lifeboat(&config, &["wal-push", history.to_str().unwrap()]).assert_code(0);
    let stored = "jobs/db/wal/00000002/00000002.history.zst";
    for root in [&a, &b] {
        assert!(root.join(format!("{stored}.minisig")).exists());
    }
    let fetch = |name: &str| {
        let dest = work.path().join(format!("fetched-{name}"));
        let _ = std::fs::remove_file(&dest);
        let run = lifeboat(&config, &["wal-fetch", name, dest.to_str().unwrap()]);
        (run, dest)
    };
    let (run, dest) = fetch("00000002.history");
    run.assert_code(0);
    assert_eq!(
        std::fs::read(&dest).unwrap(),
        std::fs::read(&history).unwrap()
    );

    // A history file for timeline 3, planted unsigned in both repositories.
    let planted = "1\t0/3000000\tno recovery target specified\n2\t0/5000000\tplanted\n";
    let compressed = zstd::encode_all(planted.as_bytes(), 3).unwrap();
    for root in [&a, &b] {
        let at = root.join("jobs/db/wal/00000003/00000003.history.zst");
        std::fs::create_dir_all(at.parent().unwrap()).unwrap();
        std::fs::write(&at, &compressed).unwrap();
    }
    let (run, dest) = fetch("00000003.history");
    run.assert_code(255);
    assert!(
        run.stderr
            .contains("jobs/db/wal/00000003/00000003.history.zst")
            && run.stderr.contains("it is not signed"),
        "{}",
        run.stderr
    );
    assert!(!dest.exists(), "nothing was handed to PostgreSQL");

    // A genuine one with its signature swapped for another file's: refused too.
    std::fs::copy(
        a.join(format!("{stored}.minisig")),
        a.join("jobs/db/wal/00000003/00000003.history.zst.minisig"),
    )
    .unwrap();
    let (run, _) = fetch("00000003.history");
    run.assert_code(255);
    run.assert_stderr_has("does not match it");

    // The genuine timeline-2 history and its signature, copied into the timeline-3 slot:
    // signed, but as another file.
    for root in [&a, &b] {
        let slot = root.join("jobs/db/wal/00000003/00000003.history.zst");
        std::fs::copy(root.join(stored), &slot).unwrap();
        std::fs::copy(
            root.join(format!("{stored}.minisig")),
            root.join("jobs/db/wal/00000003/00000003.history.zst.minisig"),
        )
        .unwrap();
    }
    let (run, _) = fetch("00000003.history");
    run.assert_code(255);
    run.assert_stderr_has("a copy moved here");

    // Replicate spreads no untrusted history file: with it gone from b, nothing comes back.
    let slot = "jobs/db/wal/00000003/00000003.history.zst";
    std::fs::remove_file(b.join(slot)).unwrap();
    std::fs::remove_file(b.join(format!("{slot}.minisig"))).unwrap();
    let replicate = lifeboat(&config, &["replicate", "db"]);
    assert_eq!(
        replicate.code, 1,
        "{}\n{}",
        replicate.stdout, replicate.stderr
    );
    assert!(
        !b.join(slot).exists(),
        "an untrusted history file was copied"
    );
    // A genuine one stored without its signature gets it back from the other repository.
    std::fs::remove_file(b.join(format!("{stored}.minisig"))).unwrap();
    let _ = lifeboat(&config, &["replicate", "db"]);
    assert!(b.join(format!("{stored}.minisig")).exists());
    let (run, _) = {
        let dest = work.path().join("fetched-from-b");
        let run = lifeboat(
            &config,
            &[
                "wal-fetch",
                "00000002.history",
                dest.to_str().unwrap(),
                "--from",
                "b",
            ],
        );
        (run, dest)
    };
    run.assert_code(0);
}
