//! A directory tree backed up to a local and an S3 repository in one run, restored from each
//! into an empty directory: bytes, modes, owners, mtimes and symlinks come back exactly.

use std::path::Path;
use std::process::Command;

use crate::common::{
    Scenario, SeaweedFs, Tmpfs, files_job, is_root, lifeboat, local_repository, run_command, tree,
    write_config,
};

fn restored_root(into: &Path, source: &Path) -> std::path::PathBuf {
    into.join(source.strip_prefix("/").unwrap())
}

/// The config of a files job `config` over `source`, into a local repository under `work`.
fn local_files_config(work: &Path, source: &Path) -> std::path::PathBuf {
    Scenario::new(work)
        .local("local", &work.join("repo"))
        .files_job("config", &[source])
        .write()
}

/// `restore config --into into`.
fn restore_into(config: &Path, into: &Path) -> crate::common::Run {
    lifeboat(
        config,
        &["restore", "config", "--into", into.to_str().unwrap()],
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tree_of_a_thousand_files_restores_exactly_from_local_and_s3() {
    let server = SeaweedFs::start().await;
    server.create_bucket("backups").await;
    let work = tempfile::tempdir().unwrap();
    let source = work.path().join("etc-app");
    tree::build(&source, 1_000, 100 * 1024 * 1024);

    let config = Scenario::new(work.path())
        .local("local", &work.path().join("repo"))
        .raw(&server.repository("s3", "backups", "lifeboat"))
        .files_job("config", &[&source])
        .write();
    let backup = lifeboat(&config, &["backup", "config"]);
    backup.assert_code(0);
    backup.assert_stdout_has("repositories: local, s3");

    let list = lifeboat(&config, &["list", "config"]);
    list.assert_code(0);
    list.assert_stdout_has("local,s3");

    for repository in ["local", "s3"] {
        let into = work.path().join(format!("restored-{repository}"));
        lifeboat(
            &config,
            &[
                "restore",
                "config",
                "--from",
                repository,
                "--into",
                into.to_str().unwrap(),
            ],
        )
        .assert_code(0);
        let restored = restored_root(&into, &source);
        run_command(
            Command::new("diff")
                .arg("-r")
                .arg("--no-dereference")
                .arg(&source)
                .arg(&restored),
        )
        .assert_code(0);
        tree::assert_same(&source, &restored);
        // The restored data is a copy; the original was never touched.
        assert!(source.join("big/blob.bin").exists());
    }

    // A stored object is a standard zstd frame holding a tar stream.
    let objects: Vec<_> = walkdir::WalkDir::new(work.path().join("repo/jobs/config/backups"))
        .into_iter()
        .filter_map(Result::ok)
        .filter(|e| e.file_name() == "files.tar.zst")
        .collect();
    assert_eq!(objects.len(), 1);
    let listing = run_command(Command::new("sh").arg("-c").arg(format!(
        "zstd -dc '{}' | tar -tf - | grep -c 'file[0-9]*.conf$'",
        objects[0].path().display()
    )));
    listing.assert_code(0);
    assert_eq!(listing.stdout.trim(), "1000");
}

#[test]
fn restore_refuses_a_directory_that_is_not_empty() {
    let work = tempfile::tempdir().unwrap();
    let source = work.path().join("src");
    tree::write_file(&source.join("a.conf"), b"a = 1\n", 0o644);
    let config = local_files_config(work.path(), &source);
    lifeboat(&config, &["backup", "config"]).assert_code(0);
    let into = work.path().join("busy");
    tree::write_file(&into.join("keep.me"), b"precious\n", 0o644);
    let run = restore_into(&config, &into);
    run.assert_code(1);
    run.assert_stderr_has("is not empty");
    assert_eq!(std::fs::read(into.join("keep.me")).unwrap(), b"precious\n");
    assert_eq!(std::fs::read_dir(&into).unwrap().count(), 1);

    // A directory of the user's own that merely looks like lifeboat's staging is not taken
    // for a leftover: nothing of it is removed, and the target is not empty.
    let lookalike = work.path().join("lookalike");
    tree::write_file(
        &lookalike.join(".lifeboat-restore-notes/todo"),
        b"mine\n",
        0o644,
    );
    let run = restore_into(&config, &lookalike);
    run.assert_code(1);
    run.assert_stderr_has("is not empty");
    assert_eq!(
        std::fs::read(lookalike.join(".lifeboat-restore-notes/todo")).unwrap(),
        b"mine\n"
    );

    // A restore killed while it moved its tree into place left part of it there, with its
    // staging directory listing what it was moving: the next restore removes both and says
    // so. (The staging layout is lifeboat's own: a marker file, and the journal `moving`.)
    let partial = work.path().join("partial");
    let staging = partial.join(".lifeboat-restore-0badc0de");
    tree::write_file(&staging.join(".lifeboat-staging"), b"", 0o600);
    std::fs::write(staging.join("moving"), b"tmp\0").unwrap();
    tree::write_file(&partial.join("tmp/half/moved.conf"), b"x\n", 0o644);
    let run = restore_into(&config, &partial);
    run.assert_code(0);
    for removed in [&staging, &partial.join("tmp")] {
        let said = format!("removed '{}'", removed.display());
        assert!(run.stdout.contains(&said), "{said}: {}", run.stdout);
    }
    assert!(!partial.join("tmp/half").exists());
    assert_eq!(
        std::fs::read(restored_root(&partial, &source).join("a.conf")).unwrap(),
        b"a = 1\n"
    );

    // Killed after its move ended, a restore leaves a whole tree and a staging directory
    // without a journal: nothing there is a leftover to remove, so the next restore refuses
    // the directory as not empty and the tree (with what was added to it since) stays.
    tree::write_file(&partial.join("tmp/added-since"), b"mine\n", 0o644);
    let staging = partial.join(".lifeboat-restore-0badf00d");
    tree::write_file(&staging.join(".lifeboat-staging"), b"", 0o600);
    let run = restore_into(&config, &partial);
    run.assert_code(1);
    run.assert_stderr_has("is not empty");
    assert_eq!(
        std::fs::read(partial.join("tmp/added-since")).unwrap(),
        b"mine\n"
    );

    // A journal never takes a filesystem's lost+found for something it moved.
    let volume = work.path().join("volume");
    tree::write_file(
        &volume.join("lost+found/#1234"),
        b"recovered by fsck\n",
        0o600,
    );
    let staging = volume.join(".lifeboat-restore-0badbeef");
    tree::write_file(&staging.join(".lifeboat-staging"), b"", 0o600);
    std::fs::write(staging.join("moving"), b"lost+found\0").unwrap();
    let run = restore_into(&config, &volume);
    run.assert_code(1);
    run.assert_stderr_has("is not empty");
    assert!(volume.join("lost+found/#1234").exists());

    // A relative target, as typed at a shell.
    let run = run_command(
        crate::common::lifeboat_command(&config)
            .current_dir(work.path())
            .args(["restore", "config", "--into", "relative/here"]),
    );
    run.assert_code(0);
    assert_eq!(
        std::fs::read(restored_root(&work.path().join("relative/here"), &source).join("a.conf"))
            .unwrap(),
        b"a = 1\n"
    );
}

#[test]
fn backup_all_keeps_going_after_a_failed_job() {
    let work = tempfile::tempdir().unwrap();
    let good = work.path().join("good");
    tree::write_file(&good.join("a.conf"), b"a = 1\n", 0o644);
    let missing = work.path().join("missing");
    let config = Scenario::new(work.path())
        .local("local", &work.path().join("repo"))
        .files_job("broken", &[&missing])
        .files_job("good", &[&good])
        .write();
    let run = lifeboat(&config, &["backup", "--all"]);
    run.assert_code(1);
    run.assert_stderr_has(format!(
        "unable to read path '{}' for job 'broken'",
        missing.display()
    ));
    run.assert_stdout_has("backup good/");
    let list = lifeboat(&config, &["list"]);
    list.assert_stdout_has("good ");
    assert!(!list.stdout.contains("broken "), "{}", list.stdout);
}

/// "Attach a new disk and restore onto it": the target is a mount point, so staging beside it
/// would sit on another filesystem. Staging lives inside it, and nothing crosses a filesystem.
#[test]
fn a_restore_onto_a_freshly_mounted_volume_lands_whole() {
    assert!(is_root(), "mounting a tmpfs needs root");
    let work = tempfile::tempdir().unwrap();
    let source = work.path().join("etc-app");
    tree::build(&source, 200, 8 * 1024 * 1024);
    let config = local_files_config(work.path(), &source);
    lifeboat(&config, &["backup", "config"]).assert_code(0);
    let volume = Tmpfs::mount(&work.path().join("new-disk"), "size=64m");
    // What mkfs.ext4 leaves on a new filesystem.
    std::fs::create_dir(volume.0.join("lost+found")).unwrap();
    let run = restore_into(&config, &volume.0);
    run.assert_code(0);
    tree::assert_same(&source, &restored_root(&volume.0, &source));
    let top: Vec<_> = std::fs::read_dir(&volume.0)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    let mut top = top;
    top.sort();
    assert_eq!(top, ["lost+found", "tmp"], "staging was left on the volume");
}

/// Names of one file are stored as hard links to the first, and restored as links: one copy
/// of the data in the object and on disk, the link count and inode sharing as in the source.
#[test]
fn hard_links_are_stored_once_and_restored_as_links() {
    use std::os::unix::fs::MetadataExt;
    let work = tempfile::tempdir().unwrap();
    let source = work.path().join("src");
    let data = tree::noise(4 * 1024 * 1024, 7);
    tree::write_file(&source.join("a/data.bin"), &data, 0o640);
    std::fs::create_dir_all(source.join("b")).unwrap();
    std::fs::hard_link(source.join("a/data.bin"), source.join("b/same.bin")).unwrap();
    std::fs::hard_link(source.join("a/data.bin"), source.join("b/again.bin")).unwrap();
    let config = local_files_config(work.path(), &source);
    lifeboat(&config, &["backup", "config"]).assert_code(0);
    let object = walkdir::WalkDir::new(work.path().join("repo"))
        .into_iter()
        .filter_map(Result::ok)
        .find(|e| e.file_name() == "files.tar.zst")
        .unwrap()
        .into_path();
    // Noise does not compress: stored twice or three times, it would show.
    let stored = std::fs::metadata(&object).unwrap().len();
    assert!(stored < 5 * 1024 * 1024, "{stored} bytes stored");
    let listing = run_command(Command::new("sh").arg("-c").arg(format!(
        "zstd -dc '{}' | tar -tvf - | grep -c ' link to '",
        object.display()
    )));
    assert_eq!(listing.stdout.trim(), "2", "{}", listing.stdout);

    let into = work.path().join("restored");
    restore_into(&config, &into).assert_code(0);
    let root = restored_root(&into, &source);
    let first = std::fs::metadata(root.join("a/data.bin")).unwrap();
    assert_eq!(first.nlink(), 3);
    for other in ["b/same.bin", "b/again.bin"] {
        let meta = std::fs::metadata(root.join(other)).unwrap();
        assert_eq!((meta.ino(), meta.nlink()), (first.ino(), 3), "{other}");
    }
    assert_eq!(std::fs::read(root.join("b/again.bin")).unwrap(), data);
    assert_eq!(first.mode() & 0o7777, 0o640);
}

/// What `tar --xattrs --acls` keeps, a files backup keeps: extended attributes (`user.*`,
/// `trusted.*`, a file capability — one whose bytes hold a newline too), ACLs (access and a
/// directory's default), three hard links to one file, and a 1 GiB sparse file, which is
/// stored and restored without its holes. FIFOs and sockets are not stored, and both the
/// backup and the restore say so, as the manifest records it. GNU tar lists the object.
#[test]
fn attributes_acls_links_and_holes_restore_as_they_were() {
    use std::os::unix::fs::MetadataExt;
    assert!(
        is_root(),
        "trusted.* attributes and file capabilities need root"
    );
    let work = tempfile::tempdir().unwrap();
    let source = work.path().join("src");
    tree::write_file(&source.join("app/app.conf"), b"listen = 80\n", 0o640);
    tree::write_file(
        &source.join("data/shared.bin"),
        &tree::noise(64 * 1024, 3),
        0o644,
    );
    std::fs::copy("/bin/true", source.join("app/server")).unwrap();
    let sh = |script: &str| {
        run_command(
            Command::new("sh")
                .arg("-ec")
                .arg(script)
                .current_dir(&source),
        )
        .assert_code(0);
    };
    sh("setfattr -n user.checksum -v 'sha256:abc' app/app.conf
        setfattr -n user.multi -v 0x0a0a00ff app/app.conf
        setfattr -n trusted.origin -v puppet data
        setfacl -m u:65534:r,g:1:rw app/app.conf
        setfacl -m u:65534:rwx data && setfacl -d -m u:65534:rx data
        setcap cap_dac_override,cap_fowner+ep app/server
        ln data/shared.bin data/second.bin && ln data/shared.bin app/third.bin
        truncate -s 1G data/disk.img
        printf head | dd of=data/disk.img conv=notrunc status=none
        head -c 3145728 /dev/urandom | dd of=data/disk.img bs=1M seek=512 conv=notrunc status=none
        printf tail | dd of=data/disk.img bs=1 seek=1073741820 conv=notrunc status=none
        mkfifo app/control.fifo");
    // The capability's bytes hold a newline, which a PAX record must carry whole.
    let capability = run_command(
        Command::new("getfattr")
            .args(["-n", "security.capability", "--only-values"])
            .arg(source.join("app/server")),
    );
    assert!(
        capability.stdout.as_bytes().contains(&b'\n'),
        "{:?}",
        capability.stdout
    );
    let _socket = std::os::unix::net::UnixListener::bind(source.join("app/admin.sock")).unwrap();

    let config = local_files_config(work.path(), &source);
    let backup = lifeboat(&config, &["backup", "config"]);
    backup.assert_code(0);
    for name in ["app/control.fifo' (fifo)", "app/admin.sock' (socket)"] {
        backup.assert_stdout_has(name);
    }
    let object = walkdir::WalkDir::new(work.path().join("repo"))
        .into_iter()
        .filter_map(Result::ok)
        .find(|e| e.file_name() == "files.tar.zst")
        .unwrap()
        .into_path();
    // The holes are not stored: 1 GiB of them would compress, but not to this.
    let manifest = std::fs::read_to_string(object.with_file_name("manifest.json")).unwrap();
    let manifest = lifeboat::manifest::Manifest::from_json(manifest.as_bytes()).unwrap();
    assert!(
        manifest.objects[0].raw_size < 8 << 20,
        "{} bytes",
        manifest.objects[0].raw_size
    );
    assert_eq!(manifest.source.not_stored, Some(2));
    let kinds: Vec<_> = manifest
        .source
        .not_stored_entries
        .iter()
        .map(|e| e.kind.as_str())
        .collect();
    assert_eq!(kinds, ["socket", "fifo"]);
    let listing = run_command(Command::new("sh").arg("-c").arg(format!(
        "zstd -dc '{}' | tar --xattrs --acls -tvf -",
        object.display()
    )));
    listing.assert_code(0);
    for line in [
        "+ 0/0",
        "app/app.conf",
        "data/disk.img",
        "data/second.bin link to",
    ] {
        assert!(listing.stdout.contains(line), "{line}: {}", listing.stdout);
    }

    let into = work.path().join("restored");
    let restore = restore_into(&config, &into);
    restore.assert_code(0);
    assert!(
        restore.stdout.contains("2 entries are not in the backup")
            || restore.stderr.contains("2 entries are not in the backup"),
        "{}{}",
        restore.stdout,
        restore.stderr
    );
    let root = restored_root(&into, &source);
    // Sockets and FIFOs are not restored; everything else is as it was.
    drop(_socket);
    std::fs::remove_file(source.join("app/admin.sock")).unwrap();
    std::fs::remove_file(source.join("app/control.fifo")).unwrap();
    let dump = |dir: &Path, command: &[&str]| {
        let run = run_command(
            Command::new(command[0])
                .args(&command[1..])
                .arg(".")
                .current_dir(dir),
        );
        run.assert_code(0);
        run.stdout
    };
    let attributes = ["getfattr", "-R", "-d", "-m", "-", "-e", "hex"];
    let acls = ["getfacl", "-R", "-n"];
    for (command, present) in [
        (
            &attributes[..],
            &[
                "security.capability",
                "trusted.origin",
                "user.multi=0x0a0a00ff",
            ][..],
        ),
        (&acls[..], &["user:65534:r--", "default:user:65534:r-x"][..]),
    ] {
        let expected = dump(&source, command);
        for attribute in present {
            assert!(expected.contains(attribute), "{attribute}: {expected}");
        }
        assert_eq!(dump(&root, command), expected, "{command:?}");
    }
    let first = std::fs::metadata(root.join("data/shared.bin")).unwrap();
    for other in ["data/second.bin", "app/third.bin"] {
        let meta = std::fs::metadata(root.join(other)).unwrap();
        assert_eq!((meta.ino(), meta.nlink()), (first.ino(), 3), "{other}");
    }
    let (original, copy) = (source.join("data/disk.img"), root.join("data/disk.img"));
    let du = |path: &Path| std::fs::metadata(path).unwrap().blocks();
    assert_eq!(du(&copy), du(&original));
    assert_eq!(std::fs::metadata(&copy).unwrap().len(), 1 << 30);
    run_command(Command::new("cmp").arg(&original).arg(&copy)).assert_code(0);
}

/// Entries a backup cannot keep do not fail it, nor leave a backup that cannot restore: an
/// entry deeper than any restore makes, and one whose path is longer than the system reads
/// (anyone who may write in the tree can make one) are passed over and named, by the backup
/// and the restore, and what was stored restores.
#[test]
fn entries_a_backup_cannot_keep_are_named_and_the_rest_restores() {
    let work = tempfile::tempdir().unwrap();
    let source = work.path().join("src");
    tree::write_file(&source.join("app.conf"), b"kept\n", 0o644);
    let mut deep = source.join("deep");
    for _ in 0..lifeboat::archive::MAX_DEPTH {
        deep.push("d");
    }
    tree::write_file(&deep.join("f"), b"too deep\n", 0o644);
    // 20 names of 250 bytes: 5,000 bytes, past PATH_MAX, made one `cd` at a time.
    run_command(Command::new("python3").current_dir(&source).arg("-c").arg(
        "import os\nos.mkdir('long'); os.chdir('long')\nfor _ in range(20):\n    os.mkdir('n' * 250); os.chdir('n' * 250)\nopen('f', 'w').write('x')",
    ))
    .assert_code(0);
    let config = local_files_config(work.path(), &source);
    let backup = lifeboat(&config, &["backup", "config"]);
    backup.assert_code(0);
    for kind in [
        "(deeper than 128 directories)",
        "(path longer than the system reads)",
    ] {
        assert!(backup.stdout.contains(kind), "{kind}: {}", backup.stdout);
    }
    let into = work.path().join("restored");
    let restore = restore_into(&config, &into);
    restore.assert_code(0);
    restore.assert_stdout_has("2 entries are not in the backup");
    let root = restored_root(&into, &source);
    assert_eq!(std::fs::read(root.join("app.conf")).unwrap(), b"kept\n");
    // The temporary directory cannot remove what it cannot reach by path.
    run_command(
        Command::new("rm")
            .arg("-rf")
            .arg("long")
            .current_dir(&source),
    )
    .assert_code(0);
}

/// The newest `files.tar.zst` of `job` under `repo`.
fn newest_object(repo: &Path, job: &str) -> std::path::PathBuf {
    let mut objects: Vec<_> = walkdir::WalkDir::new(repo.join("jobs").join(job))
        .into_iter()
        .filter_map(Result::ok)
        .filter(|e| e.file_name() == "files.tar.zst")
        .map(|e| e.into_path())
        .collect();
    objects.sort();
    objects.pop().unwrap()
}

/// Configured paths mean what they mean to tar: a symlink is stored as the link, unless the
/// path ends with '/' (or `follow = true`), when the directory it points to is stored under
/// the path's name; a path listed twice or inside another is stored once. Each backup
/// verifies, restores, and unpacks with `zstd -d | tar -x` into the same tree; a path beneath
/// a link another path stores is refused before anything is read.
#[test]
fn configured_paths_mean_what_they_mean_to_tar() {
    let work = tempfile::tempdir().unwrap();
    let source = work.path().join("src");
    let app = source.join("opt/app");
    tree::write_file(&app.join("releases/5/conf/a.conf"), b"a = 5\n", 0o644);
    std::os::unix::fs::symlink("releases/5", app.join("current")).unwrap();
    let etc = source.join("etc");
    tree::write_file(&etc.join("app/x.conf"), b"x\n", 0o600);
    tree::write_file(&etc.join("y.conf"), b"y\n", 0o644);
    let current = app.join("current");
    let job = |name: &str, paths: &[String], extra: &str| {
        let paths: Vec<String> = paths.iter().map(|p| format!("\"{p}\"")).collect();
        format!(
            "[[job]]\nname = \"{name}\"\nkind = \"files\"\npaths = [{}]\n{extra}\n",
            paths.join(", ")
        )
    };
    let shown = |p: &Path| p.display().to_string();
    let repo = work.path().join("repo");
    let config = write_config(
        work.path(),
        &[
            local_repository("local", &repo),
            job("link", &[shown(&current)], ""),
            job("slash", &[format!("{}/", shown(&current))], ""),
            job("follow", &[shown(&current)], "follow = true"),
            job(
                "overlap",
                &[shown(&etc), shown(&etc.join("app")), shown(&etc)],
                "",
            ),
            job("beneath", &[shown(&app), shown(&current.join("conf"))], ""),
        ]
        .concat(),
    );

    let check = lifeboat(&config, &["check"]);
    for line in [
        "stored as the link only".to_string(),
        format!(
            "the directory '{}' is stored under the name '{}'",
            shown(&std::fs::canonicalize(app.join("releases/5")).unwrap()),
            shown(&current)
        ),
        format!("note: path '{}/app' lies inside", shown(&etc)),
        format!("a symlink that path '{}' stores as a link", shown(&app)),
    ] {
        assert!(check.stdout.contains(&line), "{line}: {}", check.stdout);
    }
    let refused = lifeboat(&config, &["backup", "beneath"]);
    refused.assert_code(1);
    assert!(
        refused
            .stderr
            .contains("a restore would find the link where this path needs a directory")
            && refused
                .stderr
                .contains(&format!("list '{}/'", shown(&current))),
        "{}",
        refused.stderr
    );

    for name in ["link", "slash", "follow", "overlap"] {
        let backup = lifeboat(&config, &["backup", name]);
        backup.assert_code(0);
        lifeboat(&config, &["verify", name, "--deep"]).assert_code(0);
        let into = work.path().join(format!("restored-{name}"));
        lifeboat(
            &config,
            &["restore", name, "--into", into.to_str().unwrap()],
        )
        .assert_code(0);
        let object = newest_object(&repo, name);
        let unpacked = work.path().join(format!("unpacked-{name}"));
        std::fs::create_dir(&unpacked).unwrap();
        run_command(Command::new("sh").arg("-c").arg(format!(
            "zstd -dc '{}' | tar -xpf - -C '{}'",
            object.display(),
            unpacked.display()
        )))
        .assert_code(0);
        let listing = run_command(Command::new("sh").arg("-c").arg(format!(
            "zstd -dc '{}' | tar -tf - | sort | uniq -d",
            object.display()
        )));
        assert_eq!(listing.stdout, "", "{name}: entries stored twice");
        for tree in [&into, &unpacked] {
            let restored_current = restored_root(tree, &current);
            match name {
                "link" => assert_eq!(
                    std::fs::read_link(&restored_current).unwrap(),
                    Path::new("releases/5"),
                    "{name} in {}",
                    tree.display()
                ),
                "slash" | "follow" => {
                    let kind = std::fs::symlink_metadata(&restored_current).unwrap();
                    assert!(kind.is_dir(), "{name} in {}", tree.display());
                    assert_eq!(
                        std::fs::read(restored_current.join("conf/a.conf")).unwrap(),
                        b"a = 5\n"
                    );
                }
                _ => {
                    tree::assert_same(&etc, &restored_root(tree, &etc));
                    assert!(backup.stdout.contains("its entries are stored once"));
                }
            }
        }
    }
}

/// What the tree holds comes back as it was, through lifeboat and through GNU tar alike:
/// times before 1970, link targets byte for byte (`file/.` is not `file`; one longer than a
/// tar header), and nothing of lifeboat's own repository though it lies inside the path. A
/// path that names a FIFO, or ends with '/' but names a file, is refused before anything is
/// read; `/` itself is a path like any other.
#[test]
fn old_times_exact_link_targets_and_lifeboats_own_files() {
    let work = tempfile::tempdir().unwrap();
    let source = work.path().join("src");
    tree::write_file(&source.join("d/old"), b"old\n", 0o644);
    let before_1970 = std::time::UNIX_EPOCH - std::time::Duration::from_secs(86_400 * 365);
    std::fs::File::options()
        .write(true)
        .open(source.join("d/old"))
        .unwrap()
        .set_modified(before_1970)
        .unwrap();
    let long_target = "t".repeat(150);
    for (name, target) in [
        ("dot", "file/."),
        ("doubled", "a//b"),
        ("long", long_target.as_str()),
    ] {
        std::os::unix::fs::symlink(target, source.join("d").join(name)).unwrap();
    }
    let fifo = source.join("fifo");
    let c_fifo = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    // SAFETY: a valid C string.
    assert_eq!(unsafe { libc::mkfifo(c_fifo.as_ptr(), 0o600) }, 0);
    let repo = source.join("repo");
    let shown = |p: &Path| p.display().to_string();
    // The same tree through a symlink: the repository inside it is still lifeboat's own.
    let spelled = work.path().join("spelled");
    std::os::unix::fs::symlink(&source, &spelled).unwrap();
    let config = write_config(
        work.path(),
        &format!(
            "{}{}[[job]]\nname = \"spelled\"\nkind = \"files\"\npaths = [\"{}/\"]\n\n[[job]]\nname = \"fifo\"\nkind = \"files\"\npaths = [\"{}\"]\n\n[[job]]\nname = \"slash\"\nkind = \"files\"\npaths = [\"{}/\"]\n\n[[job]]\nname = \"root\"\nkind = \"files\"\npaths = [\"/\"]\nexclude = [\"/*\"]\n",
            local_repository("local", &repo),
            files_job("config", &[&source]),
            shown(&spelled),
            shown(&fifo),
            shown(&source.join("d/old")),
        ),
    );
    let check = lifeboat(&config, &["check"]);
    assert!(
        check.stdout.contains("is a fifo")
            && check.stdout.contains("ends with '/' but names a file"),
        "{}",
        check.stdout
    );
    let through = lifeboat(&config, &["backup", "spelled"]);
    through.assert_code(0);
    assert!(
        through
            .stdout
            .contains("is repository 'local', which lifeboat writes itself"),
        "{}",
        through.stdout
    );
    lifeboat(&config, &["backup", "fifo"]).assert_code(1);
    lifeboat(&config, &["backup", "slash"]).assert_code(1);
    lifeboat(&config, &["backup", "root"]).assert_code(0);
    let into_root = work.path().join("restored-root");
    lifeboat(
        &config,
        &["restore", "root", "--into", into_root.to_str().unwrap()],
    )
    .assert_code(0);

    let first = lifeboat(&config, &["backup", "config"]);
    first.assert_code(0);
    assert!(
        first
            .stdout
            .contains(&format!("'{}' is repository 'local'", shown(&repo))),
        "{}",
        first.stdout
    );
    lifeboat(&config, &["backup", "config"]).assert_code(0);
    let objects: Vec<u64> = walkdir::WalkDir::new(repo.join("jobs/config"))
        .into_iter()
        .filter_map(Result::ok)
        .filter(|e| e.file_name() == "files.tar.zst")
        .map(|e| e.metadata().unwrap().len())
        .collect();
    assert_eq!(objects.len(), 2);
    assert_eq!(objects[0], objects[1], "the second backup holds the first");
    lifeboat(&config, &["verify", "config"]).assert_code(0);

    let into = work.path().join("restored");
    restore_into(&config, &into).assert_code(0);
    let object = newest_object(&repo, "config");
    let unpacked = work.path().join("unpacked");
    std::fs::create_dir(&unpacked).unwrap();
    run_command(Command::new("sh").arg("-c").arg(format!(
        "zstd -dc '{}' | tar -xpf - -C '{}'",
        object.display(),
        unpacked.display()
    )))
    .assert_code(0);
    for tree in [&into, &unpacked] {
        let d = restored_root(tree, &source.join("d"));
        assert_eq!(
            std::fs::metadata(d.join("old"))
                .unwrap()
                .modified()
                .unwrap(),
            before_1970,
            "{}",
            tree.display()
        );
        for (name, target) in [
            ("dot", "file/."),
            ("doubled", "a//b"),
            ("long", long_target.as_str()),
        ] {
            assert_eq!(
                std::fs::read_link(d.join(name)).unwrap().as_os_str(),
                target,
                "{name} in {}",
                tree.display()
            );
        }
        assert!(!restored_root(tree, &repo).exists());
    }
}
