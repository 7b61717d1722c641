//! Extended attributes and POSIX ACLs as PAX records, with the keywords GNU tar and star use
//! (`tar --xattrs --acls`): `SCHILY.xattr.NAME` holds an attribute's raw value, and
//! `SCHILY.acl.access` / `SCHILY.acl.default` an ACL in its text form, entries separated by
//! commas (`user::rw-,user:1000:r--,…`, which `acl_from_text` and so GNU tar read). Ids are
//! written as numbers, as the archive's owners are: a name means another user on another
//! host.
//!
//! A value holding a newline byte (a file capability can) is written as libarchive writes
//! attributes, `LIBARCHIVE.xattr.NAME` with the value in base64: the tar crate splits PAX
//! records on newlines before it reads their lengths, so it cannot read such a value raw,
//! and its splitting would let the value's tail pose as a record of its own. bsdtar restores
//! those; GNU tar skips them with a warning, which `runbooks/without-lifeboat.md` says.
//!
//! ACLs are read from and written to the kernel's own encoding of them, the
//! `system.posix_acl_access` and `system.posix_acl_default` attributes, rather than through
//! libacl (which the ACL crates bind): that keeps a C library and its headers out of the
//! build for a format of a few fixed-size entries.

use std::ffi::{CString, OsStr};
use std::io;
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use rustix::io::Errno;

pub const XATTR: &str = "SCHILY.xattr.";
pub const XATTR_BASE64: &str = "LIBARCHIVE.xattr.";
pub const ACL_ACCESS: &str = "SCHILY.acl.access";
pub const ACL_DEFAULT: &str = "SCHILY.acl.default";

const ACCESS_ATTRIBUTE: &str = "system.posix_acl_access";
const DEFAULT_ATTRIBUTE: &str = "system.posix_acl_default";

/// The attribute namespaces kept: users' own, and (readable by root only) `trusted.*` and
/// `security.*`: file capabilities and SELinux labels.
const NAMESPACES: [&str; 3] = ["user.", "trusted.", "security."];

/// The attribute that grants a program privileges, as a set-id bit does.
pub const CAPABILITY: &str = "security.capability";

/// The longest attribute name Linux takes (`XATTR_NAME_MAX`).
const MAX_NAME: usize = 255;

/// The largest attribute value Linux takes (`XATTR_SIZE_MAX`).
const MAX_VALUE: usize = 64 * 1024;

/// Text from an archive as a message shows it: escaped, and cut when long (a record can
/// be as long as the archive).
fn shown(text: &str) -> String {
    const SHOWN: usize = 256;
    let mut out: String = text
        .chars()
        .take(SHOWN)
        .collect::<String>()
        .escape_debug()
        .to_string();
    if text.chars().nth(SHOWN).is_some() {
        out.push_str(&format!("… ({} bytes)", text.len()));
    }
    out
}

/// One PAX record: a keyword and its value, which may be any bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub key: String,
    pub value: Vec<u8>,
}

/// Where a file's attributes are read: its open descriptor, or (for a directory) its path,
/// never followed if it is a symlink.
#[derive(Clone, Copy)]
pub enum Inode<'a> {
    Open(BorrowedFd<'a>),
    Path(&'a Path),
}

impl Inode<'_> {
    fn list(&self) -> rustix::io::Result<Vec<u8>> {
        read_sized(
            || match self {
                Inode::Open(fd) => rustix::fs::flistxattr_query(fd),
                Inode::Path(path) => rustix::fs::llistxattr_query(*path),
            },
            |buffer| match self {
                Inode::Open(fd) => rustix::fs::flistxattr(fd, buffer),
                Inode::Path(path) => rustix::fs::llistxattr(*path, buffer),
            },
        )
    }

    fn get(&self, name: &OsStr) -> rustix::io::Result<Vec<u8>> {
        read_sized(
            || match self {
                Inode::Open(fd) => rustix::fs::fgetxattr_query(fd, name),
                Inode::Path(path) => rustix::fs::lgetxattr_query(*path, name),
            },
            |buffer| match self {
                Inode::Open(fd) => rustix::fs::fgetxattr(fd, name, buffer),
                Inode::Path(path) => rustix::fs::lgetxattr(*path, name, buffer),
            },
        )
    }
}

/// Reads into a buffer of the size `query` reports, again while the value grows between
/// the two calls.
fn read_sized(
    query: impl Fn() -> rustix::io::Result<usize>,
    read: impl Fn(&mut [u8]) -> rustix::io::Result<usize>,
) -> rustix::io::Result<Vec<u8>> {
    for _ in 0..8 {
        let size = query()?;
        if size == 0 {
            return Ok(Vec::new());
        }
        let mut buffer = vec![0; size];
        match read(&mut buffer) {
            Ok(n) => {
                buffer.truncate(n);
                return Ok(buffer);
            }
            Err(Errno::RANGE) => continue,
            Err(e) => return Err(e),
        }
    }
    Err(Errno::RANGE)
}

/// The PAX records of an inode's extended attributes and ACLs, in name order. A filesystem
/// without extended attributes has none; an attribute removed while it is read is left out.
pub fn read(inode: Inode<'_>) -> io::Result<Vec<Record>> {
    let list = match inode.list() {
        Ok(list) => list,
        Err(Errno::NOTSUP) => return Ok(Vec::new()),
        Err(e) => return Err(e.into()),
    };
    let mut names: Vec<&[u8]> = list.split(|b| *b == 0).filter(|n| !n.is_empty()).collect();
    names.sort();
    let mut records = Vec::new();
    for name in names {
        let name = OsStr::from_bytes(name);
        let text = name.to_string_lossy();
        let acl_key = match text.as_ref() {
            ACCESS_ATTRIBUTE => Some(ACL_ACCESS),
            DEFAULT_ATTRIBUTE => Some(ACL_DEFAULT),
            _ => None,
        };
        let kept = acl_key.is_some() || NAMESPACES.iter().any(|ns| text.starts_with(ns));
        if !kept {
            continue;
        }
        let value = match inode.get(name) {
            Ok(value) => value,
            // Removed since it was listed, or one the filesystem lists but will not give.
            Err(Errno::NODATA | Errno::NOTSUP) => continue,
            Err(e) => return Err(e.into()),
        };
        match acl_key {
            Some(key) => {
                let entries = decode_acl(&value).map_err(|why| {
                    io::Error::new(io::ErrorKind::InvalidData, format!("{text}: {why}"))
                })?;
                // An access ACL of owner, group and other only is the mode itself.
                if key == ACL_ACCESS && entries.iter().all(|e| e.tag.is_mode()) {
                    continue;
                }
                records.push(Record {
                    key: key.to_string(),
                    value: acl_text(&entries).into_bytes(),
                });
            }
            None => records.push(xattr_record(name.as_bytes(), value)),
        }
    }
    Ok(records)
}

/// The record of the attribute `name`: as GNU tar writes it, unless the name or the value
/// holds a byte the tar crate cannot read back (a newline) or a PAX keyword cannot hold.
fn xattr_record(name: &[u8], value: Vec<u8>) -> Record {
    use base64::Engine;
    let plain = |b: &u8| (0x21..=0x7e).contains(b);
    if name.iter().all(plain) && !value.contains(&b'\n') {
        return Record {
            key: format!("{XATTR}{}", escape_name(name, |b| b == b'%' || b == b'=')),
            value,
        };
    }
    Record {
        key: format!(
            "{XATTR_BASE64}{}",
            escape_name(name, |b| !plain(&b) || b == b'%' || b == b'=')
        ),
        value: base64::engine::general_purpose::STANDARD
            .encode(value)
            .into_bytes(),
    }
}

/// An attribute name as a PAX keyword, the bytes `escaped` says as `%XX`.
fn escape_name(name: &[u8], escaped: impl Fn(u8) -> bool) -> String {
    let mut out = String::new();
    for &b in name {
        if escaped(b) {
            out.push_str(&format!("%{b:02X}"));
        } else {
            out.push(b as char);
        }
    }
    out
}

/// The attribute name a keyword's `%XX` escapes stand for.
fn unescape_name(keyword: &str) -> Result<Vec<u8>, String> {
    let bytes = keyword.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut at = 0;
    while at < bytes.len() {
        if bytes[at] == b'%' {
            let byte = keyword
                .get(at + 1..at + 3)
                .and_then(|hex| u8::from_str_radix(hex, 16).ok())
                .ok_or_else(|| format!("attribute name '{}' has a bad % escape", shown(keyword)))?;
            out.push(byte);
            at += 3;
        } else {
            out.push(bytes[at]);
            at += 1;
        }
    }
    Ok(out)
}

/// The data of a PAX extended header holding `records`: `LEN KEY=VALUE\n` each, where LEN
/// counts the whole record, its own digits included.
pub fn encode_records(records: &[Record]) -> Vec<u8> {
    let mut out = Vec::new();
    for record in records {
        let rest = 1 + record.key.len() + 1 + record.value.len() + 1;
        let mut length = rest + 1;
        while length != rest + length.to_string().len() {
            length = rest + length.to_string().len();
        }
        out.extend_from_slice(format!("{length} {}=", record.key).as_bytes());
        out.extend_from_slice(&record.value);
        out.push(b'\n');
    }
    out
}

/// What an archive entry's PAX records ask to be set on the inode restored from it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Attributes {
    /// Extended attributes, by name.
    pub xattrs: Vec<(CString, Vec<u8>)>,
    /// The ACLs in the kernel's encoding: access, and a directory's default.
    pub access_acl: Option<Vec<u8>>,
    pub default_acl: Option<Vec<u8>>,
}

impl Attributes {
    pub fn is_empty(&self) -> bool {
        self.xattrs.is_empty() && self.access_acl.is_none() && self.default_acl.is_none()
    }

    /// Takes the attributes and ACLs out of an entry's PAX records, ignoring the records
    /// that describe the entry itself (path, size, times). An attribute outside the kept
    /// namespaces, or an ACL that does not parse, is an error: lifeboat never writes one.
    pub fn from_records<'r>(
        records: impl IntoIterator<Item = (&'r str, &'r [u8])>,
    ) -> Result<Attributes, String> {
        let mut attributes = Attributes::default();
        for (key, value) in records {
            let xattr = match (key.strip_prefix(XATTR), key.strip_prefix(XATTR_BASE64)) {
                (Some(name), _) => Some((unescape_name(name)?, value.to_vec())),
                (None, Some(name)) => {
                    use base64::Engine;
                    let value = base64::engine::general_purpose::STANDARD
                        .decode(value)
                        .map_err(|_| format!("{key} is not base64"))?;
                    Some((unescape_name(name)?, value))
                }
                (None, None) if key == ACL_ACCESS || key == ACL_DEFAULT => None,
                // Anything else changes what another reader makes of the entry (a `path` or
                // `size` the tar reader and GNU tar weigh differently) or is not lifeboat's.
                (None, None) => {
                    return Err(format!(
                        "a PAX record '{}', which lifeboat never writes",
                        shown(key)
                    ));
                }
            };
            if let Some((name, value)) = xattr {
                let shown = shown(&String::from_utf8_lossy(&name));
                if name.len() > MAX_NAME {
                    return Err(format!(
                        "extended attribute name '{shown}' is {} bytes long; Linux takes at most {MAX_NAME}",
                        name.len()
                    ));
                }
                if !NAMESPACES.iter().any(|ns| name.starts_with(ns.as_bytes())) {
                    return Err(format!(
                        "extended attribute '{shown}' is outside the namespaces lifeboat stores (user, trusted, security)"
                    ));
                }
                if NAMESPACES.iter().any(|ns| name == ns.as_bytes()) {
                    return Err(format!(
                        "extended attribute '{shown}' has no name after its namespace"
                    ));
                }
                if value.len() > MAX_VALUE {
                    return Err(format!(
                        "extended attribute '{shown}' holds {} bytes; Linux takes at most {MAX_VALUE}",
                        value.len()
                    ));
                }
                if name == CAPABILITY.as_bytes() {
                    check_capability(&value)?;
                }
                let name = CString::new(name)
                    .map_err(|_| format!("extended attribute name '{shown}' holds a NUL byte"))?;
                attributes.xattrs.push((name, value));
            } else if key == ACL_ACCESS || key == ACL_DEFAULT {
                let text = std::str::from_utf8(value).map_err(|_| format!("{key} is not text"))?;
                let entries = parse_acl(text)
                    .and_then(|entries| check_acl(&entries).map(|()| entries))
                    .map_err(|why| format!("{key}: {why}"))?;
                let encoded = Some(encode_acl(&entries));
                if key == ACL_ACCESS {
                    attributes.access_acl = encoded;
                } else {
                    attributes.default_acl = encoded;
                }
            }
        }
        Ok(attributes)
    }

    /// Sets every attribute on the open inode `fd`, skipping `security.capability` when
    /// `without_capabilities`. Returns, for each one the kernel refused, its name and why.
    pub fn apply(&self, fd: impl AsFd, without_capabilities: bool) -> Vec<(String, Errno)> {
        let mut refused = Vec::new();
        let acls = [
            (ACCESS_ATTRIBUTE, &self.access_acl),
            (DEFAULT_ATTRIBUTE, &self.default_acl),
        ];
        for (name, value) in &self.xattrs {
            let shown = name.to_string_lossy();
            if without_capabilities && shown == CAPABILITY {
                continue;
            }
            if let Err(e) =
                rustix::fs::fsetxattr(&fd, name.as_c_str(), value, rustix::fs::XattrFlags::empty())
            {
                refused.push((shown.into_owned(), e));
            }
        }
        // ACLs last: one that takes write access from the owner would stop a non-root
        // owner from setting the attributes.
        for (name, value) in acls {
            if let Some(value) = value
                && let Err(e) =
                    rustix::fs::fsetxattr(&fd, name, value, rustix::fs::XattrFlags::empty())
            {
                refused.push((name.to_string(), e));
            }
        }
        refused
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Tag {
    UserObj = 0x01,
    User = 0x02,
    GroupObj = 0x04,
    Group = 0x08,
    Mask = 0x10,
    Other = 0x20,
}

impl Tag {
    fn from_raw(raw: u16) -> Option<Tag> {
        Some(match raw {
            0x01 => Tag::UserObj,
            0x02 => Tag::User,
            0x04 => Tag::GroupObj,
            0x08 => Tag::Group,
            0x10 => Tag::Mask,
            0x20 => Tag::Other,
            _ => return None,
        })
    }

    /// Entries of the owner, the owning group and others: what the mode holds.
    fn is_mode(self) -> bool {
        matches!(self, Tag::UserObj | Tag::GroupObj | Tag::Other)
    }

    fn word(self) -> &'static str {
        match self {
            Tag::UserObj | Tag::User => "user",
            Tag::GroupObj | Tag::Group => "group",
            Tag::Mask => "mask",
            Tag::Other => "other",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct AclEntry {
    tag: Tag,
    id: u32,
    permissions: u16,
}

/// The version of the kernel's ACL encoding, and the id of entries without one.
const ACL_VERSION: u32 = 2;
const NO_ID: u32 = u32::MAX;

fn decode_acl(value: &[u8]) -> Result<Vec<AclEntry>, String> {
    let (version, entries) = value
        .split_first_chunk::<4>()
        .ok_or("shorter than its header")?;
    if u32::from_le_bytes(*version) != ACL_VERSION || entries.len() % 8 != 0 {
        return Err("not a version 2 ACL".into());
    }
    entries
        .chunks_exact(8)
        .map(|entry| {
            let raw_tag = u16::from_le_bytes([entry[0], entry[1]]);
            let tag = Tag::from_raw(raw_tag).ok_or(format!("unknown ACL tag {raw_tag:#x}"))?;
            Ok(AclEntry {
                tag,
                permissions: u16::from_le_bytes([entry[2], entry[3]]) & 0o7,
                id: u32::from_le_bytes([entry[4], entry[5], entry[6], entry[7]]),
            })
        })
        .collect()
}

fn encode_acl(entries: &[AclEntry]) -> Vec<u8> {
    let mut out = ACL_VERSION.to_le_bytes().to_vec();
    for entry in entries {
        out.extend_from_slice(&(entry.tag as u16).to_le_bytes());
        out.extend_from_slice(&entry.permissions.to_le_bytes());
        let id = match entry.tag {
            Tag::User | Tag::Group => entry.id,
            _ => NO_ID,
        };
        out.extend_from_slice(&id.to_le_bytes());
    }
    out
}

fn acl_text(entries: &[AclEntry]) -> String {
    let mut text = String::new();
    for entry in entries {
        let id = match entry.tag {
            Tag::User | Tag::Group => entry.id.to_string(),
            _ => String::new(),
        };
        let permissions: String = [(4, 'r'), (2, 'w'), (1, 'x')]
            .iter()
            .map(|(bit, c)| {
                if entry.permissions & bit != 0 {
                    *c
                } else {
                    '-'
                }
            })
            .collect();
        if !text.is_empty() {
            text.push(',');
        }
        text.push_str(&format!("{}:{id}:{permissions}", entry.tag.word()));
    }
    text
}

/// Parses the long text form, one entry a line (or a comma), ordered as the kernel wants
/// them: by tag, then by id.
/// What the kernel asks of an ACL before it sets one (`posix_acl_valid`): one entry each for
/// the owner, the group and others, and a mask whenever named users or groups are there.
/// An empty default ACL is none at all.
fn check_acl(entries: &[AclEntry]) -> Result<(), String> {
    if entries.is_empty() {
        return Ok(());
    }
    let count = |tag: Tag| entries.iter().filter(|e| e.tag == tag).count();
    for (tag, word) in [
        (Tag::UserObj, "user::"),
        (Tag::GroupObj, "group::"),
        (Tag::Other, "other::"),
    ] {
        if count(tag) != 1 {
            return Err(format!("it has no '{word}' entry, which every ACL has"));
        }
    }
    if count(Tag::User) + count(Tag::Group) > 0 && count(Tag::Mask) == 0 {
        return Err("it names users or groups but has no 'mask::' entry".to_string());
    }
    Ok(())
}

/// A file capability as the kernel takes it (`vfs_cap_data`): its revision, and the size
/// that revision has.
fn check_capability(value: &[u8]) -> Result<(), String> {
    let revision = value
        .get(..4)
        .map(|magic| u32::from_le_bytes(magic.try_into().expect("four bytes")) & 0xff00_0000);
    // Revision 1 (12 bytes) is read by no kernel that writes capabilities today.
    let size = match revision {
        Some(0x0200_0000) => 20,
        Some(0x0300_0000) => 24,
        _ => return Err(format!("{CAPABILITY} is of no revision Linux knows")),
    };
    if value.len() != size {
        return Err(format!(
            "{CAPABILITY} is {} bytes long; its revision has {size}",
            value.len()
        ));
    }
    Ok(())
}

fn parse_acl(text: &str) -> Result<Vec<AclEntry>, String> {
    let mut entries = Vec::new();
    for line in text.split(['\n', ',']) {
        let line = line.split('#').next().unwrap_or_default().trim();
        if line.is_empty() {
            continue;
        }
        let mut fields = line.split(':');
        let (Some(tag), Some(qualifier), Some(permissions), None) =
            (fields.next(), fields.next(), fields.next(), fields.next())
        else {
            return Err(format!("entry '{}' is not TAG:ID:PERMISSIONS", shown(line)));
        };
        let tag = match (tag, qualifier.is_empty()) {
            ("user" | "u", true) => Tag::UserObj,
            ("user" | "u", false) => Tag::User,
            ("group" | "g", true) => Tag::GroupObj,
            ("group" | "g", false) => Tag::Group,
            ("mask" | "m", true) => Tag::Mask,
            ("other" | "o", true) => Tag::Other,
            _ => {
                return Err(format!("entry '{}' has an unknown tag", shown(line)));
            }
        };
        let id =
            if qualifier.is_empty() {
                NO_ID
            } else {
                qualifier.parse::<u32>().ok().filter(|id| *id != NO_ID).ok_or_else(|| {
                format!(
                    "entry '{}' does not name a numeric id (lifeboat stores ids, not names)",
                    shown(line)
                )
            })?
            };
        let mut bits = 0;
        for c in permissions.chars() {
            bits |= match c {
                'r' => 4,
                'w' => 2,
                'x' => 1,
                '-' => 0,
                _ => {
                    return Err(format!("entry '{}' has unknown permissions", shown(line)));
                }
            };
        }
        entries.push(AclEntry {
            tag,
            id,
            permissions: bits,
        });
    }
    entries.sort();
    if let Some(twice) = entries
        .windows(2)
        .find(|pair| (pair[0].tag, pair[0].id) == (pair[1].tag, pair[1].id))
    {
        let whose = match twice[0].id {
            NO_ID => String::new(),
            id => format!(" for id {id}"),
        };
        return Err(format!(
            "it has two '{}' entries{whose}",
            twice[0].tag.word()
        ));
    }
    Ok(entries)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_count_their_own_length() {
        for value_len in [0, 1, 85, 86, 87, 990, 995, 9_990] {
            let record = Record {
                key: "SCHILY.xattr.user.x".into(),
                value: vec![b'v'; value_len],
            };
            let encoded = encode_records(std::slice::from_ref(&record));
            let (length, _) = std::str::from_utf8(&encoded[..8])
                .unwrap_or_else(|e| std::str::from_utf8(&encoded[..e.valid_up_to()]).unwrap())
                .split_once(' ')
                .unwrap();
            assert_eq!(length.parse::<usize>().unwrap(), encoded.len());
        }
    }

    #[test]
    fn acls_go_from_the_kernel_encoding_to_text_and_back() {
        let text = "user::rw-,user:65534:r--,group::r--,group:1:rw-,mask::rw-,other::r--";
        let entries = parse_acl(text).unwrap();
        let encoded = encode_acl(&entries);
        assert_eq!(encoded.len(), 4 + 6 * 8);
        assert_eq!(acl_text(&decode_acl(&encoded).unwrap()), text);
        // GNU tar's own form, a line each, reads the same.
        assert_eq!(
            encode_acl(&parse_acl(&text.replace(',', "\n")).unwrap()),
            encoded
        );
        // Written in any order, it is stored in the kernel's.
        let shuffled =
            parse_acl("other::r--,group:1:rw-,mask::rw-,user:65534:r--,group::r--,user::rw-")
                .unwrap();
        assert_eq!(encode_acl(&shuffled), encoded);
    }

    #[test]
    fn acl_names_and_bad_entries_are_refused() {
        assert!(
            parse_acl("user:nobody:r--")
                .unwrap_err()
                .contains("numeric")
        );
        assert!(parse_acl("owner::rwx").unwrap_err().contains("unknown tag"));
        assert!(parse_acl("user::rwz").unwrap_err().contains("permissions"));
        assert!(parse_acl("user:1").unwrap_err().contains("TAG:ID"));
        assert!(
            parse_acl("user:5:rw-,user:5:r--")
                .unwrap_err()
                .contains("two")
        );
        assert!(decode_acl(&[1, 0, 0, 0]).is_err());
        assert!(decode_acl(&[2, 0, 0, 0, 0x40, 0, 0, 0, 0, 0, 0, 0]).is_err());
    }

    #[test]
    fn attribute_names_outside_the_kept_namespaces_are_refused() {
        let records = [("SCHILY.xattr.system.posix_acl_access", &b"x"[..])];
        assert!(Attributes::from_records(records).is_err());
        // A record lifeboat never writes: GNU tar would read the time, the tar crate not.
        let records = [
            ("SCHILY.xattr.user.a%3Db%25", &b"v"[..]),
            ("mtime", &b"1"[..]),
        ];
        assert!(Attributes::from_records(records).is_err());
        let records = [("SCHILY.xattr.user.a%3Db%25", &b"v"[..])];
        let attributes = Attributes::from_records(records).unwrap();
        assert_eq!(attributes.xattrs[0].0.to_str().unwrap(), "user.a=b%");
    }

    #[test]
    fn values_and_names_the_tar_crate_cannot_read_raw_go_in_base64() {
        let plain = xattr_record(b"user.a=b%", b"v".to_vec());
        assert_eq!(plain.key, "SCHILY.xattr.user.a%3Db%25");
        // A capability whose bytes hold a newline, and a name with a space.
        for (name, value) in [
            (&b"security.capability"[..], {
                let mut v2 = vec![0u8; 20];
                v2[3] = 2;
                v2[4] = 0x0a;
                v2
            }),
            (&b"user.with space\n"[..], b"v".to_vec()),
        ] {
            let record = xattr_record(name, value.clone());
            assert!(record.key.starts_with(XATTR_BASE64), "{}", record.key);
            assert!(!record.value.contains(&b'\n') && !record.key.contains('\n'));
            let encoded = encode_records(std::slice::from_ref(&record));
            let parsed: Vec<_> = tar::PaxExtensions::new(&encoded)
                .map(|e| e.unwrap())
                .map(|e| (e.key().unwrap().to_string(), e.value_bytes().to_vec()))
                .collect();
            let attributes =
                Attributes::from_records(parsed.iter().map(|(k, v)| (k.as_str(), v.as_slice())))
                    .unwrap();
            assert_eq!(
                attributes.xattrs,
                vec![(CString::new(name).unwrap(), value)]
            );
        }
    }
}
