//! lifeboat: disaster-recovery backups that prove they restore.
//!
//! The library is the product: each command is an engine here that takes the config and
//! resolved options and returns a report (or a plan, then a report of applying it). The
//! binary (`src/main.rs`, `src/cli/`) parses arguments into those options, calls one engine,
//! and renders what it returns; nothing in the library imports it or writes to stdout.
//!
//! # Layers
//!
//! One line per layer, the highest first. A module imports from its own layer and the ones
//! below it, never above, and imports never go round in a circle, between modules or
//! between the files of one module. `tests/architecture.rs` holds every `crate::` path in
//! `src/` to this list.
//!
//! ```text
//! engines:    metrics check status rekey prune schedule drill restore backup verify replicate list show init heartbeat wal_relay wal_archive
//! repository: window repository claim clock continuity inventory lock transfer sources
//! objects:    manifest pipeline storage
//! config:     config retention keys signing
//! base:       error human host progress calendar wal pax archive layout interrupt rto_model
//! ```
//!
//! # Modules
//!
//! Engines, one per command (`wal_archive` is `wal-push`, `wal-fetch` and the `wal-prefetch`
//! it starts):
//! - [`backup`], [`restore`], [`drill`], [`prune`], [`replicate`], [`rekey`], [`verify`]:
//!   the commands that read or change what repositories hold.
//! - [`status`], [`list`], [`show`], [`check`]: what the repositories and sources say.
//! - [`schedule`]: systemd units and cron lines; [`init`]: the example config;
//!   [`heartbeat`]: the heartbeat row a physical job's RPO is measured by.
//! - [`wal_archive`], [`wal_relay`]: the WAL archive, and a drill's relay to it.
//! - [`metrics`]: Prometheus textfile metrics for alerting, from the reports it is given.
//!
//! What engines share:
//! - [`repository`]: a named store plus markers, manifests and backup ids.
//! - [`transfer`]: one object through the pipeline into every repository, or back out.
//! - [`sources`]: what produces and takes raw bytes: PostgreSQL (connections, pg_dump,
//!   base backups, scratch clusters), Redis, file trees, child processes.
//! - [`claim`]: how a run makes a backup id its own before writing under it.
//! - [`clock`]: each repository's clock against this host's, and the time a run records.
//! - [`continuity`]: how far the WAL archive carries a backup (timeline path, gaps).
//! - [`inventory`]: the backups a repository holds, complete or not.
//! - [`window`]: what each repository restores a job to, and the gaps between; what
//!   `verify --archive` last proved of its WAL.
//! - [`lock`]: per-job run locks that a killed run never leaves behind.
//!
//! Objects and where they go:
//! - [`manifest`]: the commit record of a backup.
//! - [`pipeline`]: sha256 → zstd → (age) → sha256 in both directions, on blocking threads.
//! - [`storage`]: the store trait and its backends; aws-sdk-s3 appears only in
//!   `storage::s3`.
//!
//! Configuration and keys:
//! - [`config`]: the config file, validated; [`retention`]: which backups a policy keeps,
//!   and why (pure).
//! - [`keys`]: age identities and recipients; [`signing`]: minisign signatures of manifests
//!   and history files, and whose are trusted.
//!
//! Base:
//! - [`error`]: the one public error with its exit code; [`human`]: sizes and durations for
//!   reports; [`host`]: this host's name; [`progress`]: how transfers report progress.
//! - [`layout`]: where things live in a repository, and the names of objects and ids.
//! - [`wal`]: LSNs, timelines and WAL file names; [`calendar`]: systemd calendar
//!   expressions (the longest gap, the cron line).
//! - [`archive`]: the rules a tar archive's entries meet before a restore writes them;
//!   [`pax`]: extended attributes and ACLs as PAX records.
//! - [`interrupt`]: what SIGINT, SIGTERM and SIGHUP stop and remove before lifeboat exits;
//!   modules that start processes register their part with it.
//! - [`rto_model`]: a drill's restore split into fixed time and per-byte rates, scaled to a
//!   larger backup (pure).

pub mod archive;
pub mod backup;
pub mod calendar;
pub mod check;
pub mod claim;
pub mod clock;
pub mod config;
pub mod continuity;
pub mod drill;
pub mod error;
pub mod heartbeat;
pub mod host;
pub mod human;
pub mod init;
pub mod interrupt;
pub mod inventory;
pub mod keys;
pub mod layout;
pub mod list;
pub mod lock;
pub mod manifest;
pub mod metrics;
pub mod pax;
pub mod pipeline;
pub mod progress;
pub mod prune;
pub mod rekey;
pub mod replicate;
pub mod repository;
pub mod restore;
pub mod retention;
pub mod rto_model;
pub mod schedule;
pub mod show;
pub mod signing;
pub mod sources;
pub mod status;
pub mod storage;
pub mod transfer;
pub mod verify;
pub mod wal;
pub mod wal_archive;
pub mod wal_relay;
pub mod window;

pub use error::{Error, ErrorKind, Result};
