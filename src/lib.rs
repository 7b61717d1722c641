//! lifeboat: disaster-recovery backups that prove they restore.
//!
//! # Layout
//!
//! Arrows point one way: `commands` → (`transfer`, `sources`, `repository`) →
//! (`pipeline`, `storage`, `manifest`, `layout`) → (`config`, `error`).
//!
//! - [`commands`]: one module per user command; each takes resolved options and returns a
//!   report. Nothing here writes to stdout: the binary renders reports.
//! - [`transfer`]: one object through the pipeline into every repository, or back out.
//! - [`sources`]: what produces raw bytes (the `files` job's tar stream).
//! - [`repository`]: a named store plus markers, manifests and backup ids.
//! - [`claim`]: how a run makes a backup id its own before writing under it.
//! - [`signing`]: minisign signatures of manifests and history files, and whose are trusted.
//! - [`clock`]: each repository's clock against this host's, and the time a run records.
//! - [`pipeline`]: sha256 → zstd → sha256 in both directions, on blocking threads.
//! - [`storage`]: the store trait and its backends; aws-sdk-s3 appears only in `storage::s3`.
//! - [`manifest`], [`layout`]: the commit record and where things live.
//! - [`wal`]: LSNs, timelines and WAL file names, for physical backups and the WAL archive.
//! - [`continuity`]: how far the WAL archive carries a backup (timeline path, gaps).
//! - [`keys`]: age identities and recipients.
//! - [`archive`]: the rules a tar archive's entries meet before a restore writes them.
//! - [`pax`]: extended attributes and ACLs as the PAX records of a tar entry.
//! - [`lock`]: per-job run locks that a killed run never leaves behind.
//! - [`host`]: this host's name, as the records lifeboat leaves carry it.
//! - [`interrupt`]: what SIGINT, SIGTERM and SIGHUP stop and remove before lifeboat exits.
//! - [`metrics`]: Prometheus textfile metrics for alerting.
//! - [`retention`]: which backups a retention policy keeps, and why (pure).
//! - [`config`], [`error`]: the config file and the one public error with its exit code.
//! - [`progress`]: how long transfers report progress to whoever renders it.

pub mod archive;
pub mod claim;
pub mod clock;
pub mod commands;
pub mod config;
pub mod continuity;
pub mod error;
pub mod host;
pub mod interrupt;
pub mod inventory;
pub mod keys;
pub mod layout;
pub mod lock;
pub mod manifest;
pub mod metrics;
pub mod pax;
pub mod pipeline;
pub mod progress;
pub mod repository;
pub mod retention;
pub mod signing;
pub mod sources;
pub mod storage;
pub mod transfer;
pub mod wal;

pub use error::{Error, ErrorKind, Result};
