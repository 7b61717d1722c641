//! Directory trees for round-trip tests, and an exact comparison of two trees.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{MetadataExt, PermissionsExt, symlink};
use std::path::{Path, PathBuf};

/// Deterministic bytes that zstd cannot shrink much (xorshift64*).
pub fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut state = seed | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        state ^= state >> 12;
        state ^= state << 25;
        state ^= state >> 27;
        out.extend_from_slice(&state.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes());
    }
    out.truncate(len);
    out
}

pub fn write_file(path: &Path, data: &[u8], mode: u32) {
    fs::create_dir_all(path.parent().unwrap()).unwrap();
    let mut file = fs::File::create(path).unwrap();
    file.write_all(data).unwrap();
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).unwrap();
}

fn set_mtime(path: &Path, secs: i64) {
    filetime::set_symlink_file_times(
        path,
        filetime::FileTime::from_unix_time(secs, 0),
        filetime::FileTime::from_unix_time(secs, 0),
    )
    .unwrap();
}

/// A configuration-like tree: `files` small files in nested directories, a relative and an
/// absolute symlink, an empty file, modes 0600/0755/0700, old mtimes, and one large file of
/// `large` bytes.
pub fn build(root: &Path, files: usize, large: usize) {
    fs::create_dir_all(root).unwrap();
    for index in 0..files {
        let dir = root
            .join(format!("d{:02}", index % 25))
            .join(format!("sub{}", index % 4));
        let mode = if index % 3 == 0 {
            0o600
        } else if index % 3 == 1 {
            0o755
        } else {
            0o644
        };
        let body = format!("setting_{index} = {}\n", index * 7).repeat(1 + index % 5);
        let path = dir.join(format!("file{index:04}.conf"));
        write_file(&path, body.as_bytes(), mode);
        set_mtime(&path, 1_600_000_000 + index as i64 * 60);
    }
    write_file(&root.join("empty.conf"), b"", 0o644);
    write_file(&root.join("big/blob.bin"), &noise(large, 7), 0o640);
    symlink("d00/sub0/file0000.conf", root.join("relative-link")).unwrap();
    symlink("/etc/hostname", root.join("absolute-link")).unwrap();
    fs::create_dir_all(root.join("private")).unwrap();
    write_file(
        &root.join("private/secret.key"),
        b"not really a key\n",
        0o600,
    );
    fs::set_permissions(root.join("private"), fs::Permissions::from_mode(0o700)).unwrap();
    fs::create_dir_all(root.join("empty-dir")).unwrap();
    // Names past the 100 bytes of a plain tar header, for files and symlink targets.
    let deep = root.join("long".repeat(20)).join("name-".repeat(30));
    write_file(&deep.join("value.conf"), b"deep = true\n", 0o644);
    symlink(deep.join("value.conf"), root.join("long-target-link")).unwrap();
    // Directory mtimes last: writing children changes them.
    for entry in walkdir::WalkDir::new(root).contents_first(true) {
        let entry = entry.unwrap();
        if entry.file_type().is_dir() {
            set_mtime(entry.path(), 1_650_000_000);
        }
    }
}

#[derive(Debug, PartialEq, Eq)]
struct Entry {
    path: PathBuf,
    kind: &'static str,
    mode: u32,
    mtime: Option<i64>,
    uid: u32,
    gid: u32,
    link: Option<PathBuf>,
    content_sha256: Option<String>,
}

fn describe(root: &Path) -> Vec<Entry> {
    use sha2::{Digest, Sha256};
    let mut entries = Vec::new();
    for entry in walkdir::WalkDir::new(root)
        .follow_links(false)
        .sort_by_file_name()
        .min_depth(1)
    {
        let entry = entry.unwrap();
        let meta = fs::symlink_metadata(entry.path()).unwrap();
        let kind = if meta.is_dir() {
            "dir"
        } else if meta.file_type().is_symlink() {
            "symlink"
        } else {
            "file"
        };
        let content_sha256 =
            (kind == "file").then(|| hex::encode(Sha256::digest(fs::read(entry.path()).unwrap())));
        entries.push(Entry {
            path: entry.path().strip_prefix(root).unwrap().to_path_buf(),
            kind,
            mode: if kind == "symlink" {
                0
            } else {
                meta.permissions().mode() & 0o7777
            },
            // Symlink times are not part of what a restore promises.
            mtime: (kind != "symlink").then(|| meta.mtime()),
            uid: meta.uid(),
            gid: meta.gid(),
            link: (kind == "symlink").then(|| fs::read_link(entry.path()).unwrap()),
            content_sha256,
        });
    }
    entries
}

/// Panics with the first difference in paths, types, modes, mtimes, owners, links or bytes.
pub fn assert_same(original: &Path, restored: &Path) {
    let want = describe(original);
    let got = describe(restored);
    for (w, g) in want.iter().zip(&got) {
        assert_eq!(w, g, "restored tree differs from the original");
    }
    assert_eq!(
        want.len(),
        got.len(),
        "restored tree has a different number of entries"
    );
}

/// The system identifier of the clusters `wal_segment` pretends to be, unless told another.
pub const FAKE_SYSTEM: u64 = 7_000_000_000_000_000_001;

/// 16 MiB that wal-push takes for the segment `name` of the cluster `system`: PostgreSQL 15's
/// long page header (magic, flags, timeline, page address, system identifier, segment and
/// block size, little-endian), a short header on every later 8 KiB page, and noise from
/// `seed` between them.
pub fn wal_segment(name: &str, system: u64, seed: u64) -> Vec<u8> {
    let segment_size: u32 = 16 << 20;
    let timeline = u32::from_str_radix(&name[..8], 16).unwrap();
    let log = u64::from_str_radix(&name[8..16], 16).unwrap();
    let segment = u64::from_str_radix(&name[16..24], 16).unwrap();
    let page_address = (log << 32) | (segment * u64::from(segment_size));
    let header = [
        &0xD110u16.to_le_bytes()[..],
        &2u16.to_le_bytes(),
        &timeline.to_le_bytes(),
        &page_address.to_le_bytes(),
        &0u32.to_le_bytes(),
        &[0; 4],
        &system.to_le_bytes(),
        &segment_size.to_le_bytes(),
        &8192u32.to_le_bytes(),
    ]
    .concat();
    let mut bytes = noise(segment_size as usize, seed);
    bytes[..header.len()].copy_from_slice(&header);
    // Every later page starts with its own short header.
    for (index, page) in bytes.chunks_mut(8192).enumerate().skip(1) {
        let short = [
            &0xD110u16.to_le_bytes()[..],
            &0u16.to_le_bytes(),
            &timeline.to_le_bytes(),
            &(page_address + index as u64 * 8192).to_le_bytes(),
            &0u32.to_le_bytes(),
            &[0; 4],
        ]
        .concat();
        page[..short.len()].copy_from_slice(&short);
    }
    bytes
}
