//! The manifest: the commit record of a backup. It names every object with sizes and both
//! checksums, and never holds a secret. A backup exists once its manifest is written.
//!
//! Its last field, `manifest_sha256`, seals it: the sha256 of the manifest's own bytes with
//! that value written as 64 zeros. A manifest changed after lifeboat wrote it (edited by
//! hand, or damaged in a way that still parses) is refused, whatever was changed.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::pipeline::Digests;

pub const FORMAT: u32 = 1;

const SEAL_FIELD: &str = "manifest_sha256";
const UNSEALED: &str = "0000000000000000000000000000000000000000000000000000000000000000";

pub use crate::layout::BackupKind;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub format: u32,
    pub id: String,
    pub job: String,
    pub kind: String,
    pub started_at: DateTime<Utc>,
    pub finished_at: DateTime<Utc>,
    /// The newest moment whose data the backup holds; RPO is measured from it.
    pub recovery_point: DateTime<Utc>,
    pub tool_version: String,
    pub host: String,
    pub source: SourceInfo,
    pub objects: Vec<ObjectEntry>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SourceInfo {
    pub server_version: Option<String>,
    pub system_identifier: Option<String>,
    #[serde(default)]
    pub databases: Vec<String>,
    pub start_lsn: Option<String>,
    pub stop_lsn: Option<String>,
    pub timeline: Option<u32>,
    /// Physical backups: the WAL segments replay needs, first and last, and their size.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub first_wal: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_wal: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wal_segment_size: Option<u64>,
    /// Files jobs: the configured paths, and how many entries the archive holds.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub paths: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub entries: Option<u64>,
    /// Files jobs: how many sockets, FIFOs and device nodes were found under the paths and
    /// not stored, and the first [`MAX_NOT_STORED`] of them. Absent when there were none, so
    /// that such a manifest reads as it did before lifeboat recorded them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_stored: Option<u64>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_stored_entries: Vec<NotStored>,
    /// Logical postgres jobs: the databases of the server that were not dumped, and why.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub skipped_databases: Vec<SkippedDatabase>,
    /// Logical postgres jobs: the globals were dumped without role passwords (the backup
    /// role is not a superuser), so the roles they create cannot log in as they could.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub without_role_passwords: bool,
    /// Redis jobs: keys in every database when the backup started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keys: Option<u64>,
}

/// A database a logical backup did not dump.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SkippedDatabase {
    pub name: String,
    pub reason: String,
}

impl Manifest {
    /// The kind of backup, where this lifeboat knows it.
    pub fn backup_kind(&self) -> Option<BackupKind> {
        BackupKind::parse(&self.kind)
    }

    /// Whether `other` describes the same backup: the same run, holding the same data. Two
    /// repositories' copies can name different stored objects (`rekey` re-encrypts each on
    /// its own) yet hold the same raw bytes; two runs that took one id do not.
    pub fn same_backup(&self, other: &Manifest) -> bool {
        let contents = |m: &Manifest| {
            let mut contents: Vec<(String, u64, String)> = m
                .objects
                .iter()
                .map(|o| {
                    (
                        o.logical_name().to_string(),
                        o.raw_size,
                        o.raw_sha256.clone(),
                    )
                })
                .collect();
            contents.sort();
            contents
        };
        self.job == other.job
            && self.id == other.id
            && self.kind == other.kind
            && self.started_at == other.started_at
            && self.host == other.host
            && contents(self) == contents(other)
    }
}

/// What a backup's manifest says is missing from it by design, one line each: for the
/// backup's report, `show` and restores.
pub fn source_notes(source: &SourceInfo) -> Vec<String> {
    let mut notes: Vec<String> = source
        .skipped_databases
        .iter()
        .map(|skipped| {
            format!(
                "database '{}' was not backed up: {}",
                skipped.name, skipped.reason
            )
        })
        .collect();
    if source.without_role_passwords {
        notes.push(
            "no role passwords: the backup role is not a superuser, so the globals hold the roles without their passwords".to_string(),
        );
    }
    notes
}

/// How many entries a manifest lists by name of those not stored.
pub const MAX_NOT_STORED: usize = 1000;

/// An entry of a files job's paths that the backup does not hold: lifeboat stores no
/// sockets, FIFOs or device nodes (they are made by the programs and the system that use
/// them), nor what a restore could not make, and says which it passed over.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NotStored {
    pub path: String,
    /// `socket`, `fifo`, `block device`, `character device`, or why no restore could make
    /// it (`deeper than 128 directories`, `file larger than 16 TiB`).
    pub kind: String,
}

/// One line on the entries a files backup passed over: `count` of them, `listed` by name.
pub fn describe_not_stored(count: u64, listed: &[NotStored]) -> String {
    const SHOWN: usize = 10;
    let mut names: Vec<String> = listed
        .iter()
        .take(SHOWN)
        .map(|e| format!("'{}' ({})", e.path.escape_debug(), e.kind))
        .collect();
    let rest = count.saturating_sub(names.len() as u64);
    if rest > 0 {
        names.push(format!("and {rest} more"));
    }
    format!(
        "{count} entr{} not in the backup (lifeboat stores no sockets, FIFOs or device nodes, nor what no restore could make): {}",
        if count == 1 { "y is" } else { "ies are" },
        names.join(", ")
    )
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ObjectEntry {
    pub name: String,
    pub size: u64,
    pub sha256: String,
    pub raw_size: u64,
    pub raw_sha256: String,
    pub compression: String,
    /// "age" when the stored bytes are an age file wrapping the zstd frame.
    pub encryption: Option<String>,
    /// Encrypted objects: the public keys (`age1…`) of every recipient that can decrypt
    /// them. Never a secret.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub recipients: Vec<String>,
    /// Postgres logical backups: the database this object is the dump of.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub database: Option<String>,
    /// Objects of more than one block: digests of the stored bytes block by block, which a
    /// restore checks as it downloads (see `pipeline::BlockDigests`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub block_digests: Option<crate::pipeline::BlockDigests>,
}

impl ObjectEntry {
    pub fn zstd(name: &str, digests: &Digests) -> ObjectEntry {
        ObjectEntry {
            name: name.to_string(),
            size: digests.size,
            sha256: digests.sha256.clone(),
            raw_size: digests.raw_size,
            raw_sha256: digests.raw_sha256.clone(),
            compression: "zstd".to_string(),
            encryption: None,
            recipients: Vec::new(),
            database: None,
            block_digests: digests.block_digests.clone(),
        }
    }

    /// The entry of the object `logical` (e.g. `app.dump.zst`) stored with `digests`,
    /// encrypted to `recipients` when given: then it is stored as `app.dump.zst.age`.
    pub fn stored(
        logical: &str,
        digests: &Digests,
        recipients: Option<&crate::keys::Recipients>,
    ) -> ObjectEntry {
        ObjectEntry::stored_as(logical, None, digests, recipients)
    }

    /// Like `stored`, under a name unique to the run `tag` when given (see `claim`):
    /// `app.dump.zst.runTAG`, `app.dump.zst.runTAG.age`.
    pub fn stored_as(
        logical: &str,
        tag: Option<&str>,
        digests: &Digests,
        recipients: Option<&crate::keys::Recipients>,
    ) -> ObjectEntry {
        let mut entry = ObjectEntry::zstd(logical, digests);
        if let Some(tag) = tag {
            entry.name = format!("{logical}.{tag}");
        }
        if let Some(recipients) = recipients {
            entry.name = encrypted_name(logical, tag);
            entry.encryption = Some(crate::keys::AGE.to_string());
            entry.recipients = recipients.texts().to_vec();
        }
        entry
    }

    /// What the object is, whatever its stored name: `app.dump.zst` for `app.dump.zst`,
    /// `app.dump.zst.age`, `app.dump.zst.20261126T030000Z.age` (re-encrypted by `rekey`) and
    /// `app.dump.zst.runTAG[.age]` (stored under a name unique to its run).
    pub fn logical_name(&self) -> &str {
        let encrypted = self.name.strip_suffix(".age");
        let sealed = encrypted.unwrap_or(&self.name);
        match sealed.rsplit_once('.') {
            Some((logical, stamp))
                if crate::layout::is_run_tag(stamp)
                    || (encrypted.is_some() && crate::layout::parse_backup_id(stamp).is_some()) =>
            {
                logical
            }
            _ => sealed,
        }
    }

    pub fn is_encrypted(&self) -> bool {
        self.encryption.is_some()
    }

    pub fn digests(&self) -> Digests {
        Digests {
            size: self.size,
            sha256: self.sha256.clone(),
            raw_size: self.raw_size,
            raw_sha256: self.raw_sha256.clone(),
            block_digests: self.block_digests.clone(),
        }
    }
}

/// The stored name of the encrypted object `logical`; `generation` (a backup-id-like time
/// stamp) tells a re-encrypted copy from the one it replaces.
pub fn encrypted_name(logical: &str, generation: Option<&str>) -> String {
    match generation {
        None => format!("{logical}.age"),
        Some(stamp) => format!("{logical}.{stamp}.age"),
    }
}

impl Manifest {
    /// The manifest as stored: pretty JSON, sealed by its last field.
    pub fn to_json(&self) -> Vec<u8> {
        let body = serde_json::to_string_pretty(self).expect("manifests always serialize");
        let open = body
            .strip_suffix("\n}")
            .expect("a pretty-printed object ends with its brace");
        let unsealed = format!("{open},\n  \"{SEAL_FIELD}\": \"{UNSEALED}\"\n}}\n");
        let digest = hex::encode(Sha256::digest(unsealed.as_bytes()));
        let at = unsealed.rfind(UNSEALED).expect("the seal was just written");
        format!(
            "{}{digest}{}",
            &unsealed[..at],
            &unsealed[at + UNSEALED.len()..]
        )
        .into_bytes()
    }

    /// Parses and checks a manifest read from `key`; the error names what is wrong.
    pub fn from_json(bytes: &[u8]) -> Result<Manifest, String> {
        let text = std::str::from_utf8(bytes).map_err(|_| "it is not UTF-8 text".to_string())?;
        let mut fields = match serde_json::from_str(text).map_err(|e| e.to_string())? {
            serde_json::Value::Object(fields) => fields,
            _ => return Err("it is not a JSON object".to_string()),
        };
        let seal = match fields.remove(SEAL_FIELD) {
            Some(serde_json::Value::String(seal)) => seal,
            _ => {
                return Err(format!(
                    "it has no {SEAL_FIELD}, so it cannot be shown to be the one lifeboat wrote"
                ));
            }
        };
        let written = format!("\"{SEAL_FIELD}\": \"{seal}\"");
        let at = text
            .rfind(&written)
            .filter(|_| seal.len() == UNSEALED.len())
            .ok_or_else(|| format!("its {SEAL_FIELD} is not where or what lifeboat writes"))?;
        let unsealed = format!(
            "{}\"{SEAL_FIELD}\": \"{UNSEALED}\"{}",
            &text[..at],
            &text[at + written.len()..]
        );
        if hex::encode(Sha256::digest(unsealed.as_bytes())) != seal {
            return Err(format!(
                "its content does not match its {SEAL_FIELD}: it was changed after lifeboat wrote it (edited by hand, or damaged)"
            ));
        }
        let manifest: Manifest =
            serde_json::from_value(serde_json::Value::Object(fields)).map_err(|e| e.to_string())?;
        if let Some(size) = manifest.source.wal_segment_size
            && !crate::wal::is_segment_size(size)
        {
            return Err(format!(
                "wal_segment_size {size} is not a PostgreSQL WAL segment size (a power of two from 1 MiB to 1 GiB)"
            ));
        }
        if manifest.format != FORMAT {
            return Err(format!(
                "manifest format {} is not supported by lifeboat {} (supports {FORMAT})",
                manifest.format,
                env!("CARGO_PKG_VERSION")
            ));
        }
        for object in &manifest.objects {
            let valid_name = !object.name.is_empty()
                && !object.name.contains('/')
                && object.name != "."
                && object.name != ".."
                && object.name != crate::layout::MANIFEST_NAME;
            if !valid_name {
                return Err(format!("object name '{}' is not allowed", object.name));
            }
            if let Some(blocks) = &object.block_digests {
                blocks
                    .check_shape(object.size)
                    .map_err(|e| format!("object '{}': {e}", object.name))?;
            }
        }
        Ok(manifest)
    }

    /// The source server's major version (`15` of "15.18 (Debian …)"), if it has one.
    pub fn server_major(&self) -> Option<u32> {
        self.source
            .server_version
            .as_deref()?
            .split(|c: char| !c.is_ascii_digit())
            .next()?
            .parse()
            .ok()
    }

    pub fn stored_size(&self) -> u64 {
        self.objects.iter().map(|o| o.size).sum()
    }

    pub fn raw_size(&self) -> u64 {
        self.objects.iter().map(|o| o.raw_size).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Manifest {
        Manifest {
            format: FORMAT,
            id: "20261126T030000Z".into(),
            job: "maindb".into(),
            kind: "postgres-logical".into(),
            started_at: "2026-11-26T03:00:00Z".parse().unwrap(),
            finished_at: "2026-11-26T03:04:00Z".parse().unwrap(),
            recovery_point: "2026-11-26T03:00:01Z".parse().unwrap(),
            tool_version: "0.1.0".into(),
            host: "db1".into(),
            source: SourceInfo {
                databases: vec!["app".into()],
                ..SourceInfo::default()
            },
            objects: vec![
                ObjectEntry::zstd("globals.sql.zst", &Digests::default()),
                ObjectEntry::zstd("app.dump.zst", &Digests::default()),
            ],
        }
    }

    #[test]
    fn a_sealed_manifest_reads_back_and_any_byte_changed_is_refused() {
        let manifest = sample();
        let json = manifest.to_json();
        assert_eq!(Manifest::from_json(&json).unwrap(), manifest);
        for at in 0..json.len() {
            let mut changed = json.clone();
            changed[at] ^= 0x01;
            assert!(
                Manifest::from_json(&changed).is_err(),
                "byte {at} ('{}') changed and the manifest was still accepted",
                json[at] as char
            );
        }
    }

    #[test]
    fn a_hand_edit_is_named_as_one() {
        let json = String::from_utf8(sample().to_json()).unwrap();
        let edited = json.replacen(
            "\"name\": \"app.dump.zst\"",
            "\"name\": \"globals.sql.zst\"",
            1,
        );
        assert_ne!(edited, json);
        let problem = Manifest::from_json(edited.as_bytes()).unwrap_err();
        assert!(
            problem.contains("changed after lifeboat wrote it"),
            "{problem}"
        );
        let unsealed = json.replace(SEAL_FIELD, "note");
        assert!(Manifest::from_json(unsealed.as_bytes()).is_err());
    }

    #[test]
    fn an_encrypted_object_is_found_by_what_it_holds_whatever_its_stored_name() {
        let mut entry = ObjectEntry::zstd("app.dump.zst", &Digests::default());
        assert_eq!(entry.logical_name(), "app.dump.zst");
        entry.name = encrypted_name("app.dump.zst", None);
        assert_eq!(entry.name, "app.dump.zst.age");
        assert_eq!(entry.logical_name(), "app.dump.zst");
        entry.name = encrypted_name("app.dump.zst", Some("20261126T030000Z"));
        assert_eq!(entry.name, "app.dump.zst.20261126T030000Z.age");
        assert_eq!(entry.logical_name(), "app.dump.zst");
        // A dot in a database's name is not a generation.
        entry.name = "my.db.dump.zst.age".to_string();
        assert_eq!(entry.logical_name(), "my.db.dump.zst");
        let tag = crate::layout::run_tag();
        let tagged = ObjectEntry::stored_as("app.dump.zst", Some(&tag), &Digests::default(), None);
        assert_eq!(tagged.name, format!("app.dump.zst.{tag}"));
        assert_eq!(tagged.logical_name(), "app.dump.zst");
        entry.name = encrypted_name("app.dump.zst", Some(&tag));
        assert_eq!(entry.logical_name(), "app.dump.zst");
    }
}
