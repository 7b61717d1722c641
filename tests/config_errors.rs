//! Bad config: exit code 2 and a message that names the file, the field and the value.

use crate::common::{Run, lifeboat, write_config};

fn check_with(text: &str) -> Run {
    let work = tempfile::tempdir().unwrap();
    let config = write_config(work.path(), text);
    lifeboat(&config, &["check"])
}

const LOCAL: &str =
    "[[repository]]\nname = \"local\"\ntype = \"local\"\npath = \"/tmp/lifeboat-never-written\"\n";

#[test]
fn unknown_key_is_a_usage_error_naming_the_key() {
    let run = check_with(&format!("{LOCAL}compresion_level = 3\n"));
    run.assert_code(2);
    run.assert_stderr_has("unknown field `compresion_level`");
    run.assert_stderr_has("lifeboat.toml");
}

#[test]
fn bad_duration_is_a_usage_error_naming_field_and_value() {
    let run = check_with(&format!("[targets]\nrpo = \"an hour\"\n{LOCAL}"));
    run.assert_code(2);
    assert!(
        run.stderr
            .contains("targets.rpo: invalid duration \"an hour\""),
        "{}",
        run.stderr
    );
}

#[test]
fn missing_bucket_is_a_usage_error_naming_the_field() {
    let run = check_with("[[repository]]\nname = \"dr\"\ntype = \"s3\"\nregion = \"eu-west-1\"\n");
    run.assert_code(2);
    assert!(
        run.stderr
            .contains("repository[0] (dr).bucket: is required"),
        "{}",
        run.stderr
    );
}

#[test]
fn a_missing_config_file_says_how_to_make_one() {
    let work = tempfile::tempdir().unwrap();
    let run = lifeboat(&work.path().join("absent.toml"), &["list"]);
    run.assert_code(2);
    run.assert_stderr_has("unable to read config file");
    run.assert_stderr_has("init");
}

#[test]
fn init_writes_a_config_that_loads_and_never_overwrites() {
    let work = tempfile::tempdir().unwrap();
    let path = work.path().join("etc/lifeboat.toml");
    lifeboat(&path, &["init"]).assert_code(0);
    let text = std::fs::read_to_string(&path).unwrap();
    lifeboat::config::Config::parse(&text, &path).expect("the written example loads");
    let again = lifeboat(&path, &["init"]);
    again.assert_code(2);
    again.assert_stderr_has("already exists");
}

#[test]
fn keygen_writes_a_private_identity_once_and_prints_its_recipient() {
    let work = tempfile::tempdir().unwrap();
    let key = work.path().join("escrow.key");
    // No config is needed to make a key.
    let missing_config = work.path().join("none.toml");
    let run = lifeboat(
        &missing_config,
        &["keygen", "--output", key.to_str().unwrap()],
    );
    run.assert_code(0);
    let recipient = run.stdout.trim();
    assert!(
        recipient.starts_with("age1") && !recipient.contains('\n'),
        "{}",
        run.stdout
    );
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&key).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let text = std::fs::read_to_string(&key).unwrap();
    assert!(text.contains(recipient) && text.contains("AGE-SECRET-KEY-1"));
    // The secret never reaches stdout or stderr.
    let secret = text
        .lines()
        .find(|l| l.starts_with("AGE-SECRET-KEY-"))
        .unwrap();
    assert!(!run.stdout.contains(secret) && !run.stderr.contains(secret));

    let again = lifeboat(
        &missing_config,
        &["keygen", "--output", key.to_str().unwrap()],
    );
    again.assert_code(1);
    again.assert_stderr_has("unable to create identity file");
    assert_eq!(std::fs::read_to_string(&key).unwrap(), text);
}

#[test]
fn an_endpoint_with_userinfo_is_refused_naming_the_host_it_would_reach() {
    let run = check_with(
        "[[repository]]\nname = \"dr\"\ntype = \"s3\"\nbucket = \"b\"\nregion = \"r\"\nendpoint = \"http://127.0.0.1:9000@192.0.2.2\"\n",
    );
    run.assert_code(2);
    run.assert_stderr_has("repository[0] (dr).endpoint: must not hold a user or password (it holds something before '@', and would reach \"http://192.0.2.2/\", whose host is \"192.0.2.2\")");
    // What stands before '@' may be a password: it is never repeated.
    let run = check_with(
        "[[repository]]\nname = \"dr\"\ntype = \"s3\"\nbucket = \"b\"\nregion = \"r\"\nendpoint = \"http://user:s3cr3tPW@127.0.0.1:18333\"\n",
    );
    run.assert_code(2);
    assert!(!run.stderr.contains("s3cr3tPW"), "{}", run.stderr);
}

#[test]
fn a_duration_too_long_for_the_calendar_is_a_usage_error_not_a_panic() {
    let work = tempfile::tempdir().unwrap();
    let config = write_config(
        work.path(),
        &format!(
            "{LOCAL}[[job]]\nname = \"conf\"\nkind = \"files\"\npaths = [\"/etc/hostname\"]\nretention = {{ keep_within = \"99999999999years\" }}\n"
        ),
    );
    for args in [&["check"][..], &["prune"]] {
        let run = lifeboat(&config, args);
        run.assert_code(2);
        assert!(
            run.stderr
                .contains("job[0] (conf).retention.keep_within: must be at most 100 years"),
            "{args:?}: {}",
            run.stderr
        );
    }
    // And on the command line.
    let plain_dir = work.path().join("plain");
    std::fs::create_dir(&plain_dir).unwrap();
    let plain = write_config(&plain_dir, LOCAL);
    let run = lifeboat(&plain, &["prune", "--grace", "99999999999years"]);
    run.assert_code(2);
    run.assert_stderr_has("must be at most 100 years");
}

#[test]
fn signing_keys_are_checked_where_they_are_configured() {
    let run = check_with(&format!(
        "[signing]\ntrusted_signers = [\"RWQnotakey\"]\n{LOCAL}"
    ));
    run.assert_code(2);
    assert!(
        run.stderr
            .contains("signing.trusted_signers[0]: not a minisign public key (\"RWQnotakey\")"),
        "{}",
        run.stderr
    );
    // A signing key that trusted_signers would refuse signs nothing.
    let work = tempfile::tempdir().unwrap();
    let key = work.path().join("signing.key");
    let other = work.path().join("other.key");
    lifeboat(
        &work.path().join("none.toml"),
        &["keygen", "--signing", "--output", key.to_str().unwrap()],
    )
    .assert_code(0);
    let trusted = lifeboat(
        &work.path().join("none.toml"),
        &["keygen", "--signing", "--output", other.to_str().unwrap()],
    );
    // Never replaced.
    lifeboat(
        &work.path().join("none.toml"),
        &["keygen", "--signing", "--output", key.to_str().unwrap()],
    )
    .assert_code(1);
    let config = write_config(
        work.path(),
        &format!(
            "[signing]\nkey_file = \"signing.key\"\ntrusted_signers = [\"{}\"]\n{LOCAL}[[job]]\nname = \"conf\"\nkind = \"files\"\npaths = [\"/etc/hostname\"]\n",
            trusted.stdout.trim()
        ),
    );
    let run = lifeboat(&config, &["backup", "conf"]);
    assert_ne!(run.code, 0);
    run.assert_stderr_has("is not among signing.trusted_signers");
    assert!(!std::path::Path::new("/tmp/lifeboat-never-written/jobs").exists());
}
