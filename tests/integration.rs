//! The one integration test binary. Every test starts the real servers it needs.

mod common;

mod architecture;
mod bad_inputs;
mod clocks;
mod config_errors;
mod conformance;
mod damaged;
mod drill_edges;
mod drills;
mod encryption;
mod failed_backup;
mod faults;
mod files_round_trip;
mod garage;
mod hostile_restore;
mod locks;
mod logical_properties;
mod logical_swap;
mod metrics;
mod policies;
mod postgres_logical;
mod postgres_physical;
mod prune;
mod redis;
mod regions;
mod repositories;
mod runbooks;
mod schedule;
mod secrets;
mod shared_writers;
mod signals;
mod signing;
mod status;
mod tls;
mod wal_archive;
