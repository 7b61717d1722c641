//! The config file exactly as users write it. Every table denies unknown keys so that a typo
//! is an error, not a silently ignored setting.

use std::path::PathBuf;

use serde::Deserialize;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    pub targets: Option<RawTargets>,
    pub min_repositories: Option<i64>,
    pub lock_dir: Option<PathBuf>,
    /// How far this host's clock may be from a repository's: "2min".
    pub max_clock_skew: Option<String>,
    /// `redis://host:port`: a lock shared by every host that runs the same jobs.
    pub lock: Option<String>,
    pub lock_username: Option<String>,
    pub lock_password_file: Option<PathBuf>,
    pub metrics_dir: Option<PathBuf>,
    pub schedule: Option<RawSchedule>,
    pub compression: Option<RawCompression>,
    pub encryption: Option<RawEncryption>,
    pub signing: Option<RawSigning>,
    #[serde(default)]
    pub repository: Vec<RawRepository>,
    #[serde(default)]
    pub job: Vec<RawJob>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTargets {
    pub rto: Option<String>,
    pub rpo: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawEncryption {
    #[serde(default)]
    pub recipients: Vec<String>,
    pub recipients_file: Option<PathBuf>,
    pub identity_file: Option<PathBuf>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawSigning {
    pub key_file: Option<PathBuf>,
    #[serde(default)]
    pub trusted_signers: Vec<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawCompression {
    pub level: Option<i32>,
    pub threads: Option<u32>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRepository {
    pub name: Option<String>,
    pub r#type: Option<String>,
    pub path: Option<PathBuf>,
    pub bucket: Option<String>,
    pub prefix: Option<String>,
    pub region: Option<String>,
    pub endpoint: Option<String>,
    pub path_style: Option<bool>,
    pub profile: Option<String>,
    pub part_size: Option<String>,
    pub parts_in_flight: Option<usize>,
    pub download_concurrency: Option<usize>,
    pub max_attempts: Option<u32>,
    pub attempt_timeout: Option<String>,
    pub stall_timeout: Option<String>,
    pub request_checksums: Option<String>,
    pub object_lock: Option<RawObjectLock>,
    pub sse: Option<String>,
    pub sse_kms_key_id: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawObjectLock {
    pub mode: Option<String>,
    pub days: Option<i64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawJob {
    pub name: Option<String>,
    pub kind: Option<String>,
    pub schedule: Option<String>,
    pub retention: Option<RawRetention>,
    pub heartbeat: Option<bool>,
    // files
    #[serde(default)]
    pub paths: Vec<PathBuf>,
    #[serde(default)]
    pub include: Vec<String>,
    #[serde(default)]
    pub exclude: Vec<String>,
    pub follow: Option<bool>,
    // postgres
    pub mode: Option<String>,
    pub dsn: Option<String>,
    pub host: Option<String>,
    pub port: Option<u16>,
    pub user: Option<String>,
    pub dbname: Option<String>,
    pub password_file: Option<PathBuf>,
    pub databases: Option<Vec<String>>,
    pub bin_dir: Option<PathBuf>,
    pub wal_prefetch: Option<u32>,
    // redis
    pub url: Option<String>,
    pub primary_url: Option<String>,
    pub username: Option<String>,
    pub rdb_path: Option<PathBuf>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRetention {
    pub keep_last: Option<u32>,
    pub keep_hourly: Option<u32>,
    pub keep_daily: Option<u32>,
    pub keep_weekly: Option<u32>,
    pub keep_monthly: Option<u32>,
    pub keep_yearly: Option<u32>,
    pub keep_within: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawSchedule {
    pub prune: Option<String>,
    pub replicate: Option<String>,
    #[serde(default)]
    pub drills: Vec<PathBuf>,
    pub verify: Option<String>,
    pub status: Option<String>,
    pub user: Option<String>,
    pub environment_file: Option<PathBuf>,
    pub on_failure: Option<String>,
}
