//! The manifest: the commit record of a backup. It names every object with sizes and both
//! checksums, and never holds a secret. A backup exists once its manifest is written.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::pipeline::Digests;

pub const FORMAT: u32 = 1;

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
    /// Redis jobs: keys in every database when the backup started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keys: Option<u64>,
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
    pub encryption: Option<String>,
    /// Postgres logical backups: the database this object is the dump of.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub database: Option<String>,
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
            database: None,
        }
    }

    pub fn digests(&self) -> Digests {
        Digests {
            size: self.size,
            sha256: self.sha256.clone(),
            raw_size: self.raw_size,
            raw_sha256: self.raw_sha256.clone(),
        }
    }
}

impl Manifest {
    pub fn to_json(&self) -> Vec<u8> {
        let mut json = serde_json::to_vec_pretty(self).expect("manifests always serialize");
        json.push(b'\n');
        json
    }

    /// Parses and checks a manifest read from `key`; the error names what is wrong.
    pub fn from_json(bytes: &[u8]) -> Result<Manifest, String> {
        let manifest: Manifest = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
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
