//! Restores of hostile archives, run as root and as an unprivileged user: whatever the
//! archive holds — entries that reach outside the target directly, through `..`, through an
//! absolute path, through a symlink made earlier in the same archive or a chain of them, hard
//! links out, devices, FIFOs, and every pair of entries of the same name and different types
//! in both orders — nothing outside the target changes. Each archive is restored twice: under
//! a forged manifest (sealed correctly, checksums matching), which fails naming the entry, and
//! under the genuine manifest with the object replaced, which fails naming the object before
//! anything is unpacked. Either way the target holds nothing.

use std::collections::BTreeMap;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::common::{Run, Scenario, Tmpfs, binary_command, is_root, run_command, tree};

const NOBODY: u32 = 65_534;

#[derive(Clone, Copy, Debug, PartialEq)]
enum Kind {
    Directory,
    File,
    Symlink,
    HardLink,
    Device,
    Fifo,
}

struct Entry {
    kind: Kind,
    name: String,
    /// Symlink or hard link target.
    link: Option<String>,
}

fn entry(kind: Kind, name: &str, link: Option<&str>) -> Entry {
    Entry {
        kind,
        name: name.to_string(),
        link: link.map(str::to_string),
    }
}

/// A tar whose names and link names are written raw, as an attacker would send them.
fn hostile_tar(entries: &[Entry]) -> Vec<u8> {
    let mut builder = tar::Builder::new(Vec::new());
    for entry in entries {
        let mut header = tar::Header::new_gnu();
        let (kind, data): (tar::EntryType, &[u8]) = match entry.kind {
            Kind::Directory => (tar::EntryType::Directory, b""),
            Kind::File => (tar::EntryType::Regular, b"written by a hostile archive\n"),
            Kind::Symlink => (tar::EntryType::Symlink, b""),
            Kind::HardLink => (tar::EntryType::Link, b""),
            Kind::Device => (tar::EntryType::Char, b""),
            Kind::Fifo => (tar::EntryType::Fifo, b""),
        };
        header.set_entry_type(kind);
        // Set-id bits, world-writable, and a time far in the past: any of it seen outside
        // the target is a finding.
        header.set_mode(0o6777);
        header.set_uid(NOBODY as u64);
        header.set_gid(NOBODY as u64);
        header.set_mtime(1);
        header.set_size(data.len() as u64);
        if entry.kind == Kind::Device {
            header.set_device_major(1).unwrap();
            header.set_device_minor(3).unwrap();
        }
        let old = header.as_old_mut();
        assert!(entry.name.len() < old.name.len(), "{}", entry.name);
        old.name[..entry.name.len()].copy_from_slice(entry.name.as_bytes());
        if let Some(link) = &entry.link {
            assert!(link.len() < old.linkname.len(), "{link}");
            old.linkname[..link.len()].copy_from_slice(link.as_bytes());
        }
        header.set_cksum();
        builder.append(&header, data).unwrap();
    }
    builder.into_inner().unwrap()
}

/// What can change about an inode: mode, owner, link count, size, times (ctime moves with
/// any change of the others), extended attributes, and its contents or link target.
#[derive(Debug, PartialEq)]
struct InodeState {
    mode: u32,
    owner: (u32, u32),
    nlink: u64,
    size: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
    xattrs: Vec<String>,
    content: String,
}

fn xattr_names(path: &Path) -> Vec<String> {
    let c_path = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
    let mut buffer = vec![0u8; 4096];
    // SAFETY: a valid C string and a buffer of the length given.
    let len =
        unsafe { libc::llistxattr(c_path.as_ptr(), buffer.as_mut_ptr().cast(), buffer.len()) };
    if len < 0 {
        return Vec::new();
    }
    let mut names: Vec<String> = buffer[..len as usize]
        .split(|b| *b == 0)
        .filter(|n| !n.is_empty())
        .map(|n| String::from_utf8_lossy(n).into_owned())
        .collect();
    names.sort();
    names
}

fn inode_state(path: &Path) -> InodeState {
    let meta = std::fs::symlink_metadata(path).unwrap();
    let content = if meta.file_type().is_symlink() {
        std::fs::read_link(path).unwrap().display().to_string()
    } else if meta.is_file() {
        hex::encode(Sha256::digest(std::fs::read(path).unwrap()))
    } else if meta.is_dir() {
        let mut names: Vec<String> = std::fs::read_dir(path)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names.join("/")
    } else {
        String::new()
    };
    InodeState {
        mode: meta.mode(),
        owner: (meta.uid(), meta.gid()),
        nlink: meta.nlink(),
        size: if meta.is_dir() { 0 } else { meta.size() },
        mtime: (meta.mtime(), meta.mtime_nsec()),
        ctime: (meta.ctime(), meta.ctime_nsec()),
        xattrs: xattr_names(path),
        content,
    }
}

/// Every inode under `fence` but the target's own tree, and every directory on the way up
/// to the root: what a restore into `target` must leave exactly as it was.
fn outside_state(fence: &Path, target: &Path) -> BTreeMap<PathBuf, InodeState> {
    let mut states = BTreeMap::new();
    for entry in walkdir::WalkDir::new(fence)
        .into_iter()
        .filter_entry(|e| e.path() != target)
    {
        let entry = entry.unwrap();
        states.insert(entry.path().to_path_buf(), inode_state(entry.path()));
    }
    // Making and removing the target changes its parent's times, and nothing else of it.
    if let Some(parent) = states.get_mut(target.parent().unwrap()) {
        parent.mtime = (0, 0);
        parent.ctime = (0, 0);
    }
    let mut up = fence.parent();
    while let Some(dir) = up {
        let mut state = inode_state(dir);
        // Other tests come and go beside ours: only the directory's own attributes count.
        state.content.clear();
        state.nlink = 0;
        state.ctime = (0, 0);
        state.mtime = (0, 0);
        states.insert(dir.to_path_buf(), state);
        up = dir.parent();
    }
    states
}

/// The attacks: archives and the entry each must be refused at.
fn attacks(outside: &str, outside_file: &str, fence: &str) -> Vec<(String, Vec<Entry>, String)> {
    use Kind::*;
    let mut cases: Vec<(String, Vec<Entry>, String)> = vec![
        (
            "a directory through '..'".into(),
            vec![entry(Directory, "../outside", None)],
            "../outside".into(),
        ),
        (
            "a file at an absolute path".into(),
            vec![entry(File, &format!("{outside}/planted"), None)],
            format!("{outside}/planted"),
        ),
        (
            "a directory over a symlink to an outside directory".into(),
            vec![
                entry(Symlink, "etc", Some(outside)),
                entry(Directory, "etc", None),
            ],
            "etc".into(),
        ),
        (
            "a file through a symlink made earlier".into(),
            vec![
                entry(Symlink, "etc", Some(outside)),
                entry(File, "etc/victim", None),
            ],
            "etc/victim".into(),
        ),
        (
            "a file through a chain of symlinks".into(),
            vec![
                entry(Symlink, "a", Some("b")),
                entry(Symlink, "b", Some(outside)),
                entry(File, "a/planted", None),
            ],
            "a/planted".into(),
        ),
        (
            "a relative symlink that climbs out".into(),
            vec![entry(Symlink, "up", Some("../outside"))],
            "up".into(),
        ),
        (
            "a hard link to an absolute path".into(),
            vec![entry(HardLink, "h", Some(outside_file))],
            "h".into(),
        ),
        (
            "a hard link through '..'".into(),
            vec![entry(HardLink, "h", Some("../outside-file"))],
            "h".into(),
        ),
        (
            "a hard link through a symlink made earlier".into(),
            vec![
                entry(Symlink, "s", Some(fence)),
                entry(HardLink, "h", Some("s/outside-file")),
            ],
            "h".into(),
        ),
        (
            "a device node inside".into(),
            vec![entry(Device, "null", None)],
            "null".into(),
        ),
        (
            "a device node through '..'".into(),
            vec![entry(Device, "../null", None)],
            "../null".into(),
        ),
        (
            "a FIFO through a symlink".into(),
            vec![
                entry(Symlink, "s", Some(outside)),
                entry(Fifo, "s/fifo", None),
            ],
            "s/fifo".into(),
        ),
        (
            "a symlink through a symlink".into(),
            vec![
                entry(Symlink, "s", Some(outside)),
                entry(Symlink, "s/victim", Some("/etc/passwd")),
            ],
            "s/victim".into(),
        ),
        (
            "a file stored twice".into(),
            vec![entry(File, "d/twice", None), entry(File, "d/twice", None)],
            "d/twice".into(),
        ),
        (
            "a symlink then a file of its name".into(),
            vec![
                entry(Symlink, "d/a", Some("/etc")),
                entry(File, "d/a", None),
            ],
            "d/a".into(),
        ),
        (
            "a hard link through a symlink to a file".into(),
            vec![
                entry(Symlink, "s", Some(outside_file)),
                entry(HardLink, "h", Some("s")),
                entry(File, "h", None),
            ],
            "h".into(),
        ),
    ];
    // Every pair of entries of the same name and different types, in both orders, then a
    // file written beneath the name.
    let kinds = [Directory, File, Symlink, HardLink, Device, Fifo];
    for first in kinds {
        for second in kinds {
            if first == second {
                continue;
            }
            let make = |kind: Kind| match kind {
                Symlink => entry(Symlink, "x", Some(outside)),
                HardLink => entry(HardLink, "x", Some("first")),
                other => entry(other, "x", None),
            };
            let mut entries = vec![entry(File, "first", None), make(first), make(second)];
            entries.push(entry(File, "x/inner", None));
            cases.push((
                format!("a {first:?} then a {second:?} named 'x'"),
                entries,
                "x".into(),
            ));
        }
    }
    cases
}

struct Rig {
    _work: tempfile::TempDir,
    config: PathBuf,
    binary: PathBuf,
    backup_dir: PathBuf,
    genuine_manifest: Vec<u8>,
    genuine_object: Vec<u8>,
    fence: PathBuf,
}

impl Rig {
    fn new() -> Rig {
        let work = tempfile::tempdir().unwrap();
        std::fs::set_permissions(work.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let source = work.path().join("src");
        tree::write_file(&source.join("app.conf"), b"a = 1\n", 0o644);
        let repo = work.path().join("repo");
        let config = Scenario::new(work.path())
            .local("local", &repo)
            .files_job("config", &[&source])
            .write();
        std::fs::set_permissions(&config, std::fs::Permissions::from_mode(0o644)).unwrap();
        // The checkout may sit where the unprivileged user cannot enter.
        let binary = work.path().join("lifeboat");
        std::fs::copy(env!("CARGO_BIN_EXE_lifeboat"), &binary).unwrap();
        std::fs::set_permissions(&binary, std::fs::Permissions::from_mode(0o755)).unwrap();
        run_command(binary_command(&binary, &config).args(["backup", "config"])).assert_code(0);
        let backups = repo.join("jobs/config/backups");
        let id = std::fs::read_dir(&backups)
            .unwrap()
            .next()
            .unwrap()
            .unwrap()
            .file_name();
        let backup_dir = backups.join(id);
        for entry in walkdir::WalkDir::new(&repo) {
            let entry = entry.unwrap();
            let mode = if entry.file_type().is_dir() {
                0o755
            } else {
                0o644
            };
            std::fs::set_permissions(entry.path(), std::fs::Permissions::from_mode(mode)).unwrap();
        }

        // The fence: what lies around the target, owned by the unprivileged user where it
        // could write it, so that only lifeboat stands between an archive and it.
        let fence = work.path().join("fence");
        let outside = fence.join("outside");
        tree::write_file(&outside.join("victim"), b"precious\n", 0o640);
        tree::write_file(&fence.join("outside-file"), b"precious too\n", 0o640);
        std::fs::set_permissions(&outside, std::fs::Permissions::from_mode(0o750)).unwrap();
        if is_root() {
            for path in [
                &fence,
                &outside,
                &outside.join("victim"),
                &fence.join("outside-file"),
            ] {
                std::os::unix::fs::chown(path, Some(NOBODY), Some(NOBODY)).unwrap();
            }
        }
        // An attribute a restore must not add to or take from; a filesystem without user
        // xattrs still compares the rest.
        let victim =
            std::ffi::CString::new(outside.join("victim").into_os_string().into_encoded_bytes())
                .unwrap();
        // SAFETY: valid C strings and a value of the length given.
        unsafe {
            libc::setxattr(
                victim.as_ptr(),
                c"user.origin".as_ptr(),
                b"fence".as_ptr().cast(),
                5,
                0,
            );
        }
        Rig {
            genuine_manifest: std::fs::read(backup_dir.join("manifest.json")).unwrap(),
            genuine_object: std::fs::read(backup_dir.join("files.tar.zst")).unwrap(),
            _work: work,
            config,
            binary,
            backup_dir,
            fence,
        }
    }

    /// Puts `tar` in place of the backup's object, compressed; with `forge`, the manifest
    /// is rewritten (and sealed) to match it, else the genuine one stays.
    fn plant(&self, tar: &[u8], forge: bool) {
        let stored = zstd::encode_all(tar, 3).unwrap();
        std::fs::write(self.backup_dir.join("files.tar.zst"), &stored).unwrap();
        let mut manifest = lifeboat::manifest::Manifest::from_json(&self.genuine_manifest).unwrap();
        if forge {
            let object = &mut manifest.objects[0];
            object.size = stored.len() as u64;
            object.sha256 = hex::encode(Sha256::digest(&stored));
            object.raw_size = tar.len() as u64;
            object.raw_sha256 = hex::encode(Sha256::digest(tar));
        }
        std::fs::write(self.backup_dir.join("manifest.json"), manifest.to_json()).unwrap();
    }

    fn restore(&self, target: &Path, unprivileged: bool) -> Run {
        let mut command = binary_command(&self.binary, &self.config);
        command.args(["restore", "config", "--into", target.to_str().unwrap()]);
        if unprivileged {
            command.uid(NOBODY).gid(NOBODY).env("HOME", "/nonexistent");
        }
        run_command(&mut command)
    }

    fn restore_genuine(&self) {
        std::fs::write(
            self.backup_dir.join("manifest.json"),
            &self.genuine_manifest,
        )
        .unwrap();
        std::fs::write(self.backup_dir.join("files.tar.zst"), &self.genuine_object).unwrap();
    }
}

fn run_every_attack(unprivileged: bool) {
    let rig = Rig::new();
    let target = rig.fence.join("target");
    let outside = rig.fence.join("outside");
    let outside_file = rig.fence.join("outside-file");
    let cases = attacks(
        outside.to_str().unwrap(),
        outside_file.to_str().unwrap(),
        rig.fence.to_str().unwrap(),
    );
    let object_key = format!(
        "jobs/config/backups/{}/files.tar.zst",
        rig.backup_dir.file_name().unwrap().to_string_lossy()
    );
    let mut findings = Vec::new();
    for (what, entries, refused_at) in &cases {
        let tar = hostile_tar(entries);
        for forge in [true, false] {
            // The unprivileged user restores into a directory of its own.
            if unprivileged {
                std::fs::create_dir(&target).unwrap();
                std::os::unix::fs::chown(&target, Some(NOBODY), Some(NOBODY)).unwrap();
            }
            let before = outside_state(&rig.fence, &target);
            rig.plant(&tar, forge);
            let run = rig.restore(&target, unprivileged);
            let after = outside_state(&rig.fence, &target);
            let case = format!(
                "{what} ({}, {})",
                if forge {
                    "forged manifest"
                } else {
                    "replaced object"
                },
                if unprivileged { "unprivileged" } else { "root" }
            );
            if before != after {
                for (path, state) in &after {
                    if before.get(path) != Some(state) {
                        findings.push(format!(
                            "{case}: '{}' changed: {:?} -> {state:?}",
                            path.display(),
                            before.get(path)
                        ));
                    }
                }
            }
            let expected = if forge {
                format!("archive entry '{refused_at}'")
            } else {
                format!("damaged object '{object_key}'")
            };
            if run.code != 1 || !run.stderr.contains(&expected) {
                findings.push(format!(
                    "{case}: expected exit 1 naming {expected}, got {}: {}",
                    run.code, run.stderr
                ));
            }
            // What the restore refuses, `verify --deep` refuses, naming the same entry,
            // without writing anything.
            if forge && !unprivileged {
                let verify = run_command(
                    binary_command(&rig.binary, &rig.config).args(["verify", "--deep"]),
                );
                let refusal = format!("REFUSED  {object_key}: refusing {expected}");
                if verify.code != 1 || !verify.stdout.contains(&refusal) {
                    findings.push(format!(
                        "{case}: expected verify --deep to exit 1 with '{refusal}', got {}: {}{}",
                        verify.code, verify.stdout, verify.stderr
                    ));
                }
            }
            let left: Vec<_> = match std::fs::read_dir(&target) {
                Ok(entries) => entries.map(|e| e.unwrap().file_name()).collect(),
                Err(_) => Vec::new(),
            };
            if !left.is_empty() {
                findings.push(format!("{case}: the target holds {left:?}"));
            }
            if target.exists() {
                std::fs::remove_dir_all(&target).unwrap();
            }
        }
    }
    assert!(findings.is_empty(), "{}", findings.join("\n"));

    // The genuine backup still restores, after all that.
    rig.restore_genuine();
    if unprivileged {
        std::fs::create_dir(&target).unwrap();
        std::os::unix::fs::chown(&target, Some(NOBODY), Some(NOBODY)).unwrap();
    }
    rig.restore(&target, unprivileged).assert_code(0);
}

#[test]
fn hostile_archives_change_nothing_outside_the_target_as_root() {
    run_every_attack(false);
}

#[test]
fn hostile_archives_change_nothing_outside_the_target_unprivileged() {
    if !is_root() {
        // Already unprivileged: the test above is this one.
        return;
    }
    run_every_attack(true);
}

/// A forged manifest can make a tiny object stand for any raw size: a zstd bomb (64 MiB of
/// zeros in a few KiB) under a manifest that says 4 KiB stops as soon as it passes that,
/// before it fills the 16 MiB volume it is restored onto.
#[test]
fn a_zstd_bomb_stops_at_its_manifest_size_before_it_fills_the_disk() {
    assert!(is_root(), "mounting a tmpfs needs root");
    let rig = Rig::new();
    let mut header = tar::Header::new_gnu();
    header.set_entry_type(tar::EntryType::Regular);
    header.set_mode(0o644);
    header.set_uid(0);
    header.set_gid(0);
    header.set_mtime(1);
    let zeros = vec![0u8; 64 << 20];
    header.set_size(zeros.len() as u64);
    let mut builder = tar::Builder::new(Vec::new());
    builder
        .append_data(&mut header, "bomb", &zeros[..])
        .unwrap();
    let tar = builder.into_inner().unwrap();
    let stored = zstd::encode_all(&tar[..], 19).unwrap();
    assert!(stored.len() < 64 << 10, "{} bytes", stored.len());
    std::fs::write(rig.backup_dir.join("files.tar.zst"), &stored).unwrap();
    let mut manifest = lifeboat::manifest::Manifest::from_json(&rig.genuine_manifest).unwrap();
    let object = &mut manifest.objects[0];
    object.size = stored.len() as u64;
    object.sha256 = hex::encode(Sha256::digest(&stored));
    object.raw_size = 4096;
    object.raw_sha256 = hex::encode(Sha256::digest(&tar[..4096]));
    std::fs::write(rig.backup_dir.join("manifest.json"), manifest.to_json()).unwrap();

    let volume = Tmpfs::mount(&rig.fence.join("volume"), "size=16m");
    let run = rig.restore(&volume.0, false);
    run.assert_code(1);
    assert!(
        run.stderr
            .contains("decompresses to more bytes than its manifest's raw_size"),
        "{}",
        run.stderr
    );
    assert_eq!(std::fs::read_dir(&volume.0).unwrap().count(), 0);
}

/// A GNU sparse entry (as `tar --sparse` writes) restores with its holes: 256 MiB of which
/// a few KiB are data fit on a 16 MiB volume, read back equal.
#[test]
fn a_sparse_entry_restores_sparse() {
    assert!(is_root(), "mounting a tmpfs needs root");
    let rig = Rig::new();
    let source = rig.fence.join("sparse-source");
    std::fs::create_dir(&source).unwrap();
    let file = source.join("disk.img");
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::File::create(&file).unwrap();
        f.set_len(256 << 20).unwrap();
        f.write_all_at(b"start", 0).unwrap();
        f.write_all_at(b"middle", 100 << 20).unwrap();
        f.write_all_at(b"end", (256 << 20) - 3).unwrap();
    }
    let tar_path = rig.fence.join("sparse.tar");
    run_command(
        std::process::Command::new("tar")
            .args(["--sparse", "--format=gnu", "-cf"])
            .arg(&tar_path)
            .arg("-C")
            .arg(&source)
            .arg("disk.img"),
    )
    .assert_code(0);
    let tar = std::fs::read(&tar_path).unwrap();
    assert!(tar.len() < 1 << 20, "tar wrote {} bytes", tar.len());
    rig.plant(&tar, true);

    let volume = Tmpfs::mount(&rig.fence.join("volume"), "size=16m");
    rig.restore(&volume.0, false).assert_code(0);
    let restored = volume.0.join("disk.img");
    let meta = std::fs::metadata(&restored).unwrap();
    assert_eq!(meta.len(), 256 << 20);
    assert!(
        meta.blocks() * 512 < 1 << 20,
        "{} blocks allocated",
        meta.blocks()
    );
    let (mut original, mut copy) = (
        std::fs::File::open(&file).unwrap(),
        std::fs::File::open(&restored).unwrap(),
    );
    let digest = |f: &mut std::fs::File| {
        use std::io::Read;
        let mut hasher = Sha256::new();
        let mut buffer = vec![0u8; 1 << 20];
        loop {
            let n = f.read(&mut buffer).unwrap();
            if n == 0 {
                break;
            }
            hasher.update(&buffer[..n]);
        }
        hex::encode(hasher.finalize())
    };
    assert_eq!(digest(&mut original), digest(&mut copy));
}

/// Directories whose entries come after their children, and modes that shut their owner
/// out, restored by an unprivileged user: every directory gets its mode, deepest first, and
/// the tree lands whole.
#[test]
fn directories_listed_after_their_children_get_their_modes_as_nobody() {
    if !is_root() {
        return;
    }
    let rig = Rig::new();
    let directory = |name: &str, mode: u32| {
        let mut header = tar::Header::new_gnu();
        header.set_entry_type(tar::EntryType::Directory);
        header.set_mode(mode);
        header.set_uid(NOBODY as u64);
        header.set_gid(NOBODY as u64);
        header.set_mtime(1_000);
        header.set_size(0);
        (header, name.to_string())
    };
    let mut builder = tar::Builder::new(Vec::new());
    for (mut header, name) in [directory("a/b", 0o755), directory("c/d", 0o500)] {
        builder.append_data(&mut header, name, &[][..]).unwrap();
    }
    let mut file = tar::Header::new_gnu();
    file.set_entry_type(tar::EntryType::Regular);
    file.set_mode(0o600);
    file.set_uid(NOBODY as u64);
    file.set_gid(NOBODY as u64);
    file.set_mtime(1_000);
    file.set_size(4);
    builder
        .append_data(&mut file, "a/b/f", &b"data"[..])
        .unwrap();
    for (mut header, name) in [directory("a", 0o000), directory("c", 0o000)] {
        builder.append_data(&mut header, name, &[][..]).unwrap();
    }
    rig.plant(&builder.into_inner().unwrap(), true);
    let target = rig.fence.join("target");
    std::fs::create_dir(&target).unwrap();
    std::os::unix::fs::chown(&target, Some(NOBODY), Some(NOBODY)).unwrap();
    rig.restore(&target, true).assert_code(0);
    let mode = |path: &str| std::fs::symlink_metadata(target.join(path)).unwrap().mode() & 0o7777;
    assert_eq!((mode("a"), mode("c")), (0, 0));
    assert_eq!((mode("a/b"), mode("c/d")), (0o755, 0o500));
    assert_eq!(std::fs::read(target.join("a/b/f")).unwrap(), b"data");
}

/// A tar of one entry of `kind` named `name` (a symlink to `link`), after a PAX extended
/// header holding `records`.
fn tar_with_records(
    kind: tar::EntryType,
    name: &str,
    link: Option<&str>,
    records: &[(&str, &[u8])],
) -> Vec<u8> {
    let records: Vec<_> = records
        .iter()
        .map(|(key, value)| lifeboat::pax::Record {
            key: key.to_string(),
            value: value.to_vec(),
        })
        .collect();
    let data = lifeboat::pax::encode_records(&records);
    let mut builder = tar::Builder::new(Vec::new());
    let mut pax = tar::Header::new_ustar();
    pax.set_entry_type(tar::EntryType::XHeader);
    pax.set_path("PaxHeaders/entry").unwrap();
    pax.set_size(data.len() as u64);
    pax.set_cksum();
    builder.append(&pax, &data[..]).unwrap();
    let mut header = tar::Header::new_gnu();
    header.set_entry_type(kind);
    header.set_mode(0o644);
    header.set_mtime(1_000);
    header.set_uid(0);
    header.set_gid(0);
    let body: &[u8] = if kind == tar::EntryType::Regular {
        b"data\n"
    } else {
        b""
    };
    header.set_size(body.len() as u64);
    if let Some(link) = link {
        header.set_link_name(link).unwrap();
    }
    builder.append_data(&mut header, name, body).unwrap();
    builder.into_inner().unwrap()
}

/// PAX records lifeboat never writes are refused before the entry is made: attributes
/// outside the user, trusted and security namespaces (the raw ACL attributes), an ACL
/// naming a user by name, attributes on a link, and a value whose newline would let its
/// tail pose as a record of its own (`linkpath=/etc/evil`) to the tar crate's reader.
#[test]
fn pax_records_lifeboat_never_writes_are_refused() {
    assert!(is_root(), "the fence is owned by another user");
    let rig = Rig::new();
    let target = rig.fence.join("target");
    let file = tar::EntryType::Regular;
    let smuggled: &[u8] = b"x\n22 linkpath=/etc/evil\n";
    let mut capability = vec![0u8; 20];
    capability[3] = 0x02;
    capability.push(0);
    // A hard link whose data is a header GNU tar would read as a device node.
    let hidden = {
        let mut device = tar::Header::new_ustar();
        device.set_entry_type(tar::EntryType::Char);
        device.set_path("a/mem").unwrap();
        device.set_mode(0o666);
        device.set_size(0);
        device.set_cksum();
        let mut builder = tar::Builder::new(Vec::new());
        let mut first = tar::Header::new_gnu();
        first.set_entry_type(tar::EntryType::Regular);
        first.set_mode(0o644);
        first.set_size(0);
        first.set_path("a/first").unwrap();
        first.set_cksum();
        builder.append(&first, std::io::empty()).unwrap();
        let mut link = tar::Header::new_gnu();
        link.set_entry_type(tar::EntryType::Link);
        link.set_mode(0o644);
        link.set_path("a/f").unwrap();
        link.set_link_name("a/first").unwrap();
        link.set_size(512);
        link.set_cksum();
        builder.append(&link, &device.as_bytes()[..]).unwrap();
        builder.into_inner().unwrap()
    };
    let cases: [(&str, Vec<u8>); 13] = [
        (
            "a raw ACL attribute",
            tar_with_records(
                file,
                "a/f",
                None,
                &[("SCHILY.xattr.system.posix_acl_access", b"\x02\0\0\0")],
            ),
        ),
        (
            "an attribute of no kept namespace",
            tar_with_records(file, "a/f", None, &[("SCHILY.xattr.os2.name", b"x")]),
        ),
        (
            "an ACL naming a user",
            tar_with_records(
                file,
                "a/f",
                None,
                &[(
                    "SCHILY.acl.access",
                    b"user::rw-,user:nobody:r--,group::r--,mask::r--,other::---",
                )],
            ),
        ),
        (
            "a record smuggled in a value",
            tar_with_records(file, "a/f", None, &[("SCHILY.xattr.user.note", smuggled)]),
        ),
        (
            "attributes on a symlink",
            tar_with_records(
                tar::EntryType::Symlink,
                "a/f",
                Some("elsewhere"),
                &[("SCHILY.xattr.user.note", b"x")],
            ),
        ),
        (
            "a path record GNU tar reads and the tar crate does not",
            tar_with_records(file, "a/f", None, &[("path", b"a/f-elsewhere")]),
        ),
        (
            "a default ACL on a file",
            tar_with_records(
                file,
                "a/f",
                None,
                &[("SCHILY.acl.default", b"user::rw-,group::r--,other::r--")],
            ),
        ),
        (
            "an ACL naming a user without a mask",
            tar_with_records(
                file,
                "a/f",
                None,
                &[(
                    "SCHILY.acl.access",
                    b"user::rw-,user:1000:rwx,group::r--,other::r--",
                )],
            ),
        ),
        (
            "a capability of the wrong size",
            tar_with_records(
                file,
                "a/f",
                None,
                &[("SCHILY.xattr.security.capability", &capability)],
            ),
        ),
        (
            "an attribute value over 64 KiB",
            tar_with_records(
                file,
                "a/f",
                None,
                &[("SCHILY.xattr.user.big", &[b'v'; 70_000])],
            ),
        ),
        (
            "an attribute without a name",
            tar_with_records(file, "a/f", None, &[("SCHILY.xattr.user.", b"x")]),
        ),
        ("a hard link carrying a header in its data", hidden),
        (
            "a name longer than Linux takes",
            tar_with_records(file, &format!("a/f/{}", "n".repeat(300)), None, &[]),
        ),
    ];
    let mut findings = Vec::new();
    for (what, tar) in cases {
        let before = outside_state(&rig.fence, &target);
        rig.plant(&tar, true);
        let run = rig.restore(&target, false);
        if run.code != 1 || !run.stderr.contains("archive entry 'a/f") {
            findings.push(format!("{what}: exit {}: {}", run.code, run.stderr));
        }
        let verify = run_command(binary_command(&rig.binary, &rig.config).arg("verify"));
        if verify.code != 1
            || !verify.stdout.contains("REFUSED")
            || !verify.stdout.contains("archive entry 'a/f")
        {
            findings.push(format!(
                "{what}: verify exit {}: {}",
                verify.code, verify.stdout
            ));
        }
        if outside_state(&rig.fence, &target) != before {
            findings.push(format!("{what}: something outside the target changed"));
        }
        let left: Vec<_> = std::fs::read_dir(&target)
            .map(|d| d.map(|e| e.unwrap().file_name()).collect())
            .unwrap_or_default();
        if !left.is_empty() {
            findings.push(format!("{what}: the target holds {left:?}"));
        }
        let _ = std::fs::remove_dir_all(&target);
    }
    assert!(findings.is_empty(), "{}", findings.join("\n"));
}

/// Restoring as another user than root, attributes only root may set (`trusted.*`) are not
/// restored, and the restore says which, as it does for owners; the user's own attributes
/// and the ACL are restored, even an ACL that takes write access from the owner (it is set
/// after the attributes, which need it).
#[test]
fn attributes_that_need_root_are_named_when_restored_unprivileged() {
    assert!(is_root(), "the restore runs as nobody");
    let rig = Rig::new();
    let tar = tar_with_records(
        tar::EntryType::Regular,
        "f",
        None,
        &[
            ("SCHILY.xattr.user.note", b"kept"),
            ("SCHILY.xattr.trusted.origin", b"root only"),
            (
                "SCHILY.acl.access",
                b"user::r--,user:0:r--,group::r--,mask::r--,other::---",
            ),
        ],
    );
    rig.plant(&tar, true);
    let target = rig.fence.join("target");
    std::fs::create_dir(&target).unwrap();
    std::os::unix::fs::chown(&target, Some(NOBODY), Some(NOBODY)).unwrap();
    let run = rig.restore(&target, true);
    run.assert_code(0);
    let said = format!("{}{}", run.stdout, run.stderr);
    assert!(said.contains("trusted.origin of 'f'"), "{said}");
    let attributes = run_command(
        std::process::Command::new("getfattr")
            .args(["-d", "-m", "-"])
            .arg(target.join("f")),
    );
    attributes.assert_stdout_has("user.note=\"kept\"");
    assert!(
        !attributes.stdout.contains("trusted.origin"),
        "{}",
        attributes.stdout
    );
    let acl = run_command(
        std::process::Command::new("getfacl")
            .arg("-n")
            .arg(target.join("f")),
    );
    acl.assert_stdout_has("user:0:r--");
    assert_eq!(std::fs::read(target.join("f")).unwrap(), b"data\n");
}
