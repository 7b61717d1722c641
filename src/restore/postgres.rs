//! Restoring a logical `postgres` backup into a server: every needed dump is downloaded and
//! verified into staging first; then the globals (roles before the objects they own), then
//! each database is loaded into a new database beside its target, created as its source
//! was, and once all are loaded, counted and given their properties, they are swapped into
//! place in one transaction. Until that swap nothing the server had is touched: a restore
//! that fails or is interrupted drops what it loaded. A database that holds objects is
//! replaced only with `--clean`, and kept beside under another name.
//!
//! By default a dump is staged as stored (compressed) and decoded straight into pg_restore:
//! no room is needed for the uncompressed dump, and loading starts without first writing it
//! out. `--jobs` pg_restore processes load the tables at once, each fed its own decode, and
//! indexes and constraints are built `--jobs` at a time. `--parallel-data` stages the dump
//! decompressed instead, for `pg_restore --jobs` to read: one decode instead of one per job.

use std::path::{Path, PathBuf};
use std::process::Command;

use super::staging::Staging;
use super::{KeptDatabase, PostgresRestoreOptions, RestoreReport, Selected, TableRows};
use crate::error::{Error, ErrorKind, Result};
use crate::keys::Identity;
use crate::layout::GLOBALS_OBJECT;
use crate::manifest::{Manifest, ObjectEntry};
use crate::pipeline;
use crate::repository::Repository;
use crate::sources::postgres::{
    Binaries, ChildAuth, Connection, Target, archive, quote_identifier,
};
use crate::sources::process;
use crate::transfer::StagedObject;

/// What a database of the backup meets on the target server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Existing {
    Absent,
    /// A database of that name holding no table: replaced, and dropped after the swap.
    Empty,
    /// One holding tables: replaced with `--clean` only, and kept under another name.
    Holding,
}

struct Planned<'a> {
    object: &'a ObjectEntry,
    source_database: String,
    target_database: String,
    existing: Existing,
}

/// The comment a database being loaded carries until the swap, so that one a killed
/// restore left behind is recognised (and named) by the next.
const LOADING_MARK: &str = "lifeboat: restore in progress";

/// A database of the backup loaded under a name of its own beside its target, its
/// properties set, its rows counted: ready to swap in.
struct Loaded {
    name: String,
    /// Drops it if the run is interrupted before the swap.
    undo: Option<crate::interrupt::UndoGuard>,
    /// A session on it while it waits for the swap: another restore that takes it for a
    /// leftover (its pid gone here, or reused, or on a host of the same name) cannot drop
    /// a database someone is connected to.
    hold: Option<tokio_postgres::Client>,
}

/// `--clean` replaces databases; on the server the backup was taken from, that is the live
/// primary rolled back to the backup, everything written since gone. That happens only when
/// asked for in so many words, never from a `--target` pasted from the wrong terminal.
async fn refuse_replacing_the_source(
    admin: &Target,
    server: &Connection,
    manifest: &Manifest,
    options: &PostgresRestoreOptions,
) -> Result<()> {
    let Some(source) = &manifest.source.system_identifier else {
        return Ok(());
    };
    if options.yes_this_is_the_source {
        return Ok(());
    }
    // Not knowing is no licence: a role that may not read pg_control_system() on the very
    // source would otherwise roll it back.
    let Some(target) = admin.system_identifier().await else {
        return Err(Error::new(
            ErrorKind::Target,
            format!(
                "refusing --clean on {}: its system identifier cannot be read (pg_control_system() is not allowed to this role), so it cannot be told apart from the server backup {}/{} was taken from",
                server.describe(),
                manifest.job,
                manifest.id
            ),
        )
        .with_hint("connect as a role that may run pg_control_system() (a superuser, or one granted EXECUTE on it), restore beside the live database instead (--database NAME --as NAME_restored), or add --yes-this-is-the-source if this may be the source and replacing it is intended"));
    };
    if &target != source {
        return Ok(());
    }
    Err(Error::new(
        ErrorKind::Target,
        format!(
            "refusing --clean on {}: it is the server backup {}/{} was taken from (system identifier {source}), so its databases would be rolled back to {} and everything written since lost",
            server.describe(),
            manifest.job,
            manifest.id,
            manifest.recovery_point.format("%Y-%m-%d %H:%M:%S UTC")
        ),
    )
    .with_hint("restore beside the live database instead (--database NAME --as NAME_restored) and copy back what is needed (runbooks/bad-change.md); to replace it all the same, add --yes-this-is-the-source"))
}

pub(super) async fn restore(
    selected: Selected,
    options: &PostgresRestoreOptions,
) -> Result<RestoreReport> {
    let manifest = &selected.manifest;
    // Plan, and refuse what must be refused, before anything is downloaded.
    let mut plan = plan(manifest, options).await?;
    let staged = stage(&selected, &plan, options).await?;
    check_roles(
        &plan.admin,
        &plan.server,
        &plan.backup,
        (&plan.databases, &staged.dumps, &staged.entries),
        staged.globals.as_deref(),
        options.no_owner,
    )
    .await?;
    let load_started = std::time::Instant::now();
    let mut loaded = load(&selected, &mut plan, &staged, options).await?;
    let kept = swap_in(&mut plan, &mut loaded, options).await?;

    let mut restored = describe(&plan.databases, &loaded.tables, &kept);
    if staged.globals.is_some() {
        restored.insert(0, "globals".to_string());
    }
    let bytes = plan
        .databases
        .iter()
        .map(|p| p.object.raw_size)
        .sum::<u64>()
        + plan.globals.map_or(0, |g| g.raw_size);
    let stages = vec![
        ("download and verify".to_string(), staged.took),
        ("load (pg_restore)".to_string(), load_started.elapsed()),
    ];
    let created = plan
        .databases
        .iter()
        .filter(|p| p.existing == Existing::Absent)
        .map(|p| p.target_database.clone())
        .collect();
    let (target, warnings) = (plan.server.describe(), std::mem::take(&mut plan.warnings));
    drop(plan);
    let mut report = selected.report(target, restored, bytes, warnings, stages);
    report.created_databases = created;
    report.kept_databases = kept;
    report.tables = loaded.tables;
    Ok(report)
}

/// What a restore will do, decided before anything is downloaded: the server, each
/// database of the backup and what it meets there, the globals, what to warn of.
struct RestorePlan<'a> {
    backup: String,
    server: Connection,
    admin: Target,
    databases: Vec<Planned<'a>>,
    globals: Option<&'a ObjectEntry>,
    binaries: Binaries,
    warnings: Vec<String>,
}

/// Reads the target server and refuses what must be refused: a database that holds data
/// without `--clean`, replacing the source without saying so, too little room.
async fn plan<'a>(
    manifest: &'a Manifest,
    options: &PostgresRestoreOptions,
) -> Result<RestorePlan<'a>> {
    let backup = format!("{}/{}", manifest.job, manifest.id);
    let dsn = options.target.as_deref().ok_or_else(|| {
        Error::usage(format!(
            "restoring the postgres job '{}' needs --target DSN",
            manifest.job
        ))
        .with_hint("for example --target postgresql://postgres@127.0.0.1:5432/postgres")
    })?;
    if options.rename_to.is_some() && options.database.is_none() {
        return Err(Error::usage(
            "--as NAME needs --database NAME: only one database can be renamed",
        ));
    }
    let mut server = Connection::from_dsn(dsn)?;
    let mut admin = Target::open(&server).await?;
    let databases = plan_databases(manifest, &backup, &admin, &server, options).await?;
    if databases.iter().any(|p| p.existing == Existing::Holding) {
        refuse_replacing_the_source(&admin, &server, manifest, options).await?;
    }
    // A database cannot be renamed by a session connected to it.
    if databases
        .iter()
        .any(|p| p.existing != Existing::Absent && p.target_database == server.database())
    {
        let maintenance = if server.database() == "postgres" {
            "template1"
        } else {
            "postgres"
        };
        server = server.with_database(maintenance);
        admin = Target::open(&server).await?;
    }
    let globals = match options.globals {
        false => None,
        true => Some(
            manifest
                .objects
                .iter()
                .find(|o| o.logical_name() == GLOBALS_OBJECT)
                .ok_or_else(|| {
                    Error::new(
                        ErrorKind::NotFound,
                        format!(
                            "unable to restore globals: backup '{backup}' has no '{GLOBALS_OBJECT}'"
                        ),
                    )
                })?,
        ),
    };
    let binaries = Binaries::find(options.bin_dir.as_deref(), admin.server_major().await?)?;
    let mut warnings = leftovers(&admin).await;
    if options.database.is_none() {
        warnings.extend(manifest.source.skipped_databases.iter().map(|skipped| {
            format!(
                "database '{}' is not in this backup: {}",
                skipped.name, skipped.reason
            )
        }));
    }
    warnings.extend(check_server_room(&admin, &server, &databases).await?);
    for planned in databases.iter().filter(|p| p.existing != Existing::Absent) {
        let sessions = admin.sessions_on(&planned.target_database).await?;
        if !sessions.is_empty() && !options.terminate_sessions {
            tracing::warn!(
                database = %planned.target_database,
                "{} session(s) use the database this restore replaces; the swap at the end waits up to {} for them to end: {}",
                sessions.len(),
                humantime::format_duration(options.swap_wait),
                sessions.iter().map(ToString::to_string).collect::<Vec<_>>().join(", ")
            );
        }
    }
    Ok(RestorePlan {
        backup,
        server,
        admin,
        databases,
        globals,
        binaries,
        warnings,
    })
}

/// Each database of the backup asked for, under the name it is restored as, and what that
/// name meets on the server.
async fn plan_databases<'a>(
    manifest: &'a Manifest,
    backup: &str,
    admin: &Target,
    server: &Connection,
    options: &PostgresRestoreOptions,
) -> Result<Vec<Planned<'a>>> {
    let dumps: Vec<&ObjectEntry> = manifest
        .objects
        .iter()
        .filter(|o| o.database.is_some())
        .filter(|o| {
            options
                .database
                .as_ref()
                .is_none_or(|wanted| o.database.as_ref() == Some(wanted))
        })
        .collect();
    if dumps.is_empty() {
        let wanted = options.database.as_deref().unwrap_or("any");
        return Err(Error::new(
            ErrorKind::NotFound,
            format!("unable to find database '{wanted}' in backup '{backup}'"),
        )
        .with_hint(format!(
            "the backup holds: {}",
            manifest.source.databases.join(", ")
        )));
    }
    let mut planned = Vec::new();
    for object in dumps {
        let source_database = object.database.clone().expect("filtered");
        let target_database = options
            .rename_to
            .clone()
            .unwrap_or_else(|| source_database.clone());
        let (existing, contents) = match admin.database_exists(&target_database).await? {
            false => (Existing::Absent, Vec::new()),
            true => {
                let contents = admin.database_contents(&target_database).await?;
                match contents.is_empty() {
                    true => (Existing::Empty, contents),
                    false => (Existing::Holding, contents),
                }
            }
        };
        if existing == Existing::Holding && !options.clean {
            return Err(Error::new(
                ErrorKind::Target,
                format!(
                    "unable to restore into database '{target_database}' on {}: it already holds {}",
                    server.describe(),
                    contents.join(", ")
                ),
            )
            .with_hint("restore under another name with --as NAME, or pass --clean to replace it (the database there now is kept beside the restored one)"));
        }
        planned.push(Planned {
            object,
            source_database,
            target_database,
            existing,
        });
    }
    Ok(planned)
}

/// Every dump (and the globals) fetched and verified into staging, before the server is
/// touched.
struct StagedDumps {
    /// Holds the staging directory until the restore is done with it.
    _staging: Staging,
    globals: Option<PathBuf>,
    dumps: Vec<Staged>,
    entries: Vec<Option<archive::DatabaseEntries>>,
    took: std::time::Duration,
}

/// Fetches and verifies the dumps into staging: as stored, to be decoded into pg_restore as
/// they load; or decompressed, when pg_restore loads the tables in parallel from one file.
async fn stage(
    selected: &Selected,
    plan: &RestorePlan<'_>,
    options: &PostgresRestoreOptions,
) -> Result<StagedDumps> {
    let manifest = &selected.manifest;
    let decompress = options.parallel_data;
    let needed = plan
        .databases
        .iter()
        .map(|p| match decompress {
            true => p.object.raw_size,
            false => p.object.size,
        })
        .sum::<u64>()
        + plan.globals.map_or(0, |g| g.raw_size);
    let staging_started = std::time::Instant::now();
    let staging = Staging::prepare(options.staging_dir.as_deref(), needed)?;
    let fetch = async |object: &ObjectEntry| {
        selected
            .read_from_any(&object.name, async |repository| {
                staging
                    .fetch(repository, manifest, object, &selected.keyring)
                    .await
            })
            .await
    };
    let globals = match plan.globals {
        Some(object) => Some(fetch(object).await?),
        None => None,
    };
    let mut dumps = Vec::new();
    for planned in &plan.databases {
        let started = std::time::Instant::now();
        let object = planned.object;
        let dump = if decompress {
            let path = fetch(object).await?;
            fill_offsets(&path).await;
            Staged::Seekable(path)
        } else {
            let (stored, served_by) = selected
                .read_from_any(&object.name, async |repository| {
                    let path = staging.fetch_stored(repository, manifest, object).await?;
                    Ok((path, repository.clone()))
                })
                .await?;
            let toc = staging.path(&format!("{}.toc", object.name));
            let identities = match object.is_encrypted() {
                true => Some(selected.keyring.identities(&object.name)?),
                false => None,
            };
            let toc = write_toc(
                &stored,
                &toc,
                identities.as_deref().map(Vec::as_slice),
                object.raw_size,
            )
            .then_some(toc);
            Staged::Stored {
                stored,
                toc,
                served_by,
            }
        };
        let elapsed = started.elapsed();
        tracing::debug!(object = %object.name, ?elapsed, "staged");
        dumps.push(dump);
    }
    let took = staging_started.elapsed();
    let entries = dumps.iter().map(Staged::database_entries).collect();
    Ok(StagedDumps {
        _staging: staging,
        globals,
        dumps,
        entries,
        took,
    })
}

/// The databases loaded beside their targets, waiting for the swap.
struct LoadedAll {
    loaded: Vec<Loaded>,
    tables: Vec<TableRows>,
    comments: Vec<String>,
    /// Names this restore gave (or will give) databases, and the stamp in them.
    taken: Vec<String>,
    stamp: String,
}

/// Writes into the server: the globals, then each database into a new one beside its
/// target. Until the swap nothing the server had is touched; a failure drops what was
/// loaded.
async fn load(
    selected: &Selected,
    plan: &mut RestorePlan<'_>,
    staged: &StagedDumps,
    options: &PostgresRestoreOptions,
) -> Result<LoadedAll> {
    let auth = plan.server.child_auth()?;
    if let Some(file) = &staged.globals {
        let present = plan.admin.role_names().await?;
        let can_login = plan.admin.login_role_names().await?;
        let passwordless = selected
            .manifest
            .source
            .without_role_passwords
            .then_some(TargetRoles {
                present: &present,
                can_login: &can_login,
                keep_login: options.keep_login,
            });
        plan.warnings.extend(apply_globals(
            &plan.binaries,
            &plan.server,
            &auth,
            file,
            passwordless,
        )?);
    }
    let mut all = LoadedAll {
        loaded: Vec::new(),
        tables: Vec::new(),
        comments: Vec::new(),
        taken: Vec::new(),
        stamp: chrono::Utc::now().format("%Y%m%d_%H%M%S").to_string(),
    };
    let admin = &plan.admin;
    let loading = plan
        .databases
        .iter()
        .zip(&staged.dumps)
        .zip(&staged.entries);
    for ((planned, dump), entries) in loading {
        let context = LoadContext {
            admin,
            server: &plan.server,
            binaries: &plan.binaries,
            auth: &auth,
            options,
            backup: &plan.backup,
            selected,
        };
        let created = create_copy(
            &context,
            planned,
            entries.as_ref(),
            &all.stamp,
            &mut all.taken,
            &mut plan.warnings,
        )
        .await;
        let (copy, properties) = match created {
            Ok(created) => created,
            Err(err) => {
                let hint = drop_loaded(admin, &all.loaded).await;
                return Err(err.with_hint(hint));
            }
        };
        // From here on it is this restore's to drop if anything fails or stops it.
        all.loaded.push(Loaded {
            undo: drop_on_interrupt(&plan.binaries, &plan.server, &auth, &copy),
            name: copy.clone(),
            hold: plan.server.with_database(&copy).connect().await.ok(),
        });
        let outcome = load_one(
            context,
            planned,
            dump,
            &copy,
            &properties,
            &mut plan.warnings,
        )
        .await;
        match outcome {
            Ok(counted) => all
                .tables
                .extend(counted.into_iter().map(|(table, rows)| TableRows {
                    database: planned.target_database.clone(),
                    table,
                    rows,
                })),
            Err(err) => {
                let hint = drop_loaded(admin, &all.loaded).await;
                return Err(role_hint(err.with_hint(hint)));
            }
        }
        all.comments.extend(properties.comment);
    }
    Ok(all)
}

/// A load that failed on a missing role: say how to have it.
fn role_hint(err: Error) -> Error {
    let said = err.chain().join("\n");
    if err.kind() != ErrorKind::Verification
        && said.contains("role")
        && said.contains("does not exist")
    {
        err.with_hint("restore the roles first with --globals, or ignore ownership with --no-owner")
    } else {
        err
    }
}

/// The swap: every replaced database renamed aside and every copy renamed into place, in
/// one transaction, so that the server has all of this restore or none of it. Then the
/// replaced databases are dropped (empty ones, or all with `--drop-previous`) or kept.
async fn swap_in(
    plan: &mut RestorePlan<'_>,
    all: &mut LoadedAll,
    options: &PostgresRestoreOptions,
) -> Result<Vec<KeptDatabase>> {
    let admin = &plan.admin;
    let mut renames = Vec::new();
    let mut previous = Vec::new();
    for planned in &plan.databases {
        if planned.existing != Existing::Absent {
            let named = free_name(
                admin,
                &planned.target_database,
                "before",
                &all.stamp,
                &all.taken,
            )
            .await;
            let before = match named {
                Ok(before) => before,
                Err(err) => {
                    let hint = drop_loaded(admin, &all.loaded).await;
                    return Err(err.with_hint(hint));
                }
            };
            all.taken.push(before.clone());
            renames.push((planned.target_database.clone(), before.clone()));
            previous.push((planned, before));
        }
    }
    for (planned, copy) in plan.databases.iter().zip(&all.loaded) {
        renames.push((copy.name.clone(), planned.target_database.clone()));
    }
    let replaced: Vec<String> = previous
        .iter()
        .map(|(p, _)| p.target_database.clone())
        .collect();
    let swap_plan = SwapPlan {
        comments: &all.comments,
        renames: &renames,
        replaced: &replaced,
    };
    if let Err(err) = swap(admin, &plan.server, swap_plan, &mut all.loaded, options).await {
        let hint = drop_loaded(admin, &all.loaded).await;
        return Err(err.with_hint(hint));
    }
    let mut kept = Vec::new();
    for (planned, before) in previous {
        if planned.existing == Existing::Empty || options.drop_previous {
            if let Err(e) = admin.drop_database(&before).await {
                plan.warnings.push(format!(
                    "unable to drop the replaced database, kept as '{before}': {}",
                    e.chain().join(": ")
                ));
                kept.push(KeptDatabase {
                    database: planned.target_database.clone(),
                    kept_as: before,
                });
            }
        } else {
            kept.push(KeptDatabase {
                database: planned.target_database.clone(),
                kept_as: before,
            });
        }
    }
    Ok(kept)
}

/// One line per restored database: under which name, how many tables and rows, what became
/// of the database it replaced.
fn describe(databases: &[Planned<'_>], tables: &[TableRows], kept: &[KeptDatabase]) -> Vec<String> {
    databases
        .iter()
        .map(|planned| {
            let name = if planned.source_database == planned.target_database {
                format!("database '{}'", planned.target_database)
            } else {
                format!(
                    "database '{}' as '{}'",
                    planned.source_database, planned.target_database
                )
            };
            let in_it = tables
                .iter()
                .filter(|t| t.database == planned.target_database);
            let (count, rows) = in_it.fold((0, 0i64), |(n, rows), t| (n + 1, rows + t.rows));
            let replaced = match kept.iter().find(|k| k.database == planned.target_database) {
                Some(k) => format!("; the database it replaced is kept as '{}'", k.kept_as),
                None if planned.existing == Existing::Holding => {
                    "; the database it replaced was dropped".to_string()
                }
                None => String::new(),
            };
            format!("{name} ({count} tables, {rows} rows{replaced})")
        })
        .collect()
}

/// What loading one database needs from the restore around it.
struct LoadContext<'a> {
    admin: &'a Target,
    server: &'a Connection,
    binaries: &'a Binaries,
    auth: &'a ChildAuth,
    options: &'a PostgresRestoreOptions,
    backup: &'a str,
    selected: &'a Selected,
}

/// Creates the database this restore loads `planned` into, beside its target, as the
/// source was created (encoding, locale, collation), under a name no database has, and
/// marks it as being loaded; returns its name and the properties still to set.
async fn create_copy(
    context: &LoadContext<'_>,
    planned: &Planned<'_>,
    entries: Option<&archive::DatabaseEntries>,
    stamp: &str,
    taken: &mut Vec<String>,
    warnings: &mut Vec<String>,
) -> Result<(String, DatabaseProperties)> {
    let admin = context.admin;
    let source = &planned.source_database;
    if entries.is_none() {
        warnings.push(format!(
            "database '{source}': its dump does not say how the database was created; it was created with the server's defaults"
        ));
    }
    loop {
        let copy = free_name(admin, &planned.target_database, "restoring", stamp, taken).await?;
        taken.push(copy.clone());
        let properties = DatabaseProperties::of(entries, source, &copy, context.options.no_owner);
        // Another restore may take the same name between the look and the create.
        if create_as_source(admin, &properties, &copy, source, warnings).await? {
            warnings.extend(properties.skipped.iter().map(|statement| {
                format!("database '{source}': not restored, as it does not name the database: `{statement}`")
            }));
            if let Some(comment) = &properties.mark_like_comment {
                warnings.push(format!(
                    "database '{source}': its comment was not restored, as it reads like the mark lifeboat gives a database it is loading: `{comment}`"
                ));
            }
            let oid = admin.database_oid(&copy).await?;
            let mark = format!(
                "{LOADING_MARK}: backup {} into '{}' by pid {} on host {} since {} (database oid {oid})",
                context.backup,
                planned.target_database,
                std::process::id(),
                crate::host::name(),
                chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
            );
            admin
                .execute(&format!(
                    "comment on database {} is {}",
                    quote_identifier(&copy),
                    quote_literal(&mark)
                ))
                .await
                .map_err(|e| {
                    Error::new(
                        ErrorKind::Target,
                        format!("unable to mark the database '{copy}' as being loaded"),
                    )
                    .with_source(e)
                })?;
            return Ok((copy, properties));
        }
    }
}

/// Loads the dump into `copy` with pg_restore, gives it the source's owner, settings and
/// privileges, and counts its rows. What cannot be reproduced is a warning naming it (and
/// the database as the operator knows it, not the name it is loaded under).
async fn load_one(
    context: LoadContext<'_>,
    planned: &Planned<'_>,
    dump: &Staged,
    copy: &str,
    properties: &DatabaseProperties,
    warnings: &mut Vec<String>,
) -> Result<Vec<(String, i64)>> {
    let LoadContext {
        admin,
        server,
        binaries,
        auth,
        options,
        selected,
        ..
    } = context;
    let source = &planned.source_database;
    let target = server.with_database(copy);
    let action = format!(
        "restore database '{source}' into '{}' with pg_restore",
        planned.target_database
    );
    let restore = PgRestore {
        binaries,
        target: &target,
        auth,
        options,
        action: &action,
    };
    let started = std::time::Instant::now();
    match dump {
        Staged::Seekable(file) => restore.seekable(file)?,
        Staged::Stored {
            stored,
            toc,
            served_by,
        } => {
            if toc.is_none() {
                warnings.push(format!(
                    "database '{source}': its dump's table of contents was not understood, so pg_restore built its indexes one at a time"
                ));
            }
            let dump = StagedObject {
                path: stored,
                repository: served_by,
                manifest: &selected.manifest,
                object: planned.object,
                keyring: &selected.keyring,
            };
            restore.streamed(&dump, toc.as_deref())?;
        }
    }
    let elapsed = started.elapsed();
    tracing::debug!(database = %copy, ?elapsed, "pg_restore finished");

    let counted = admin.table_rows(copy).await?;
    let named_as_known = |text: &str| {
        text.replace(
            &quote_identifier(copy),
            &quote_identifier(&planned.target_database),
        )
    };
    for statement in &properties.after_load {
        if let Err(e) = admin.execute(statement).await {
            warnings.push(format!(
                "database '{}': not restored: `{}`: {}",
                planned.target_database,
                named_as_known(statement),
                named_as_known(
                    &e.as_db_error()
                        .map_or(e.to_string(), |d| d.message().to_string())
                )
            ));
        }
    }
    if properties.privileges_left_out {
        warnings.push(format!(
            "database '{}': its privileges were not restored (--no-owner): the source's (for one, who may connect) are replaced by the server's defaults, where every role may connect",
            planned.target_database
        ));
    }
    Ok(counted)
}

/// The statements that give a database being loaded the properties its source had, from
/// the dump's own entries for it, renamed to the name it is loaded under.
struct DatabaseProperties {
    create: Option<String>,
    /// Owner, settings, privileges: set once the data is in (a connection limit or revoked
    /// CONNECT must not stop pg_restore).
    after_load: Vec<String>,
    /// The comment, set in the swap's transaction: until then the database carries the
    /// mark that it is being loaded.
    comment: Option<String>,
    /// Statements among the entries that do not name the database: never run.
    skipped: Vec<String>,
    /// A comment that reads like lifeboat's own mark for a database being loaded.
    mark_like_comment: Option<String>,
    /// The source restricted who may use the database, and `--no-owner` leaves that out.
    privileges_left_out: bool,
}

impl DatabaseProperties {
    fn of(
        entries: Option<&archive::DatabaseEntries>,
        source: &str,
        copy: &str,
        no_owner: bool,
    ) -> DatabaseProperties {
        let null_comment = format!("comment on database {} is null", quote_identifier(copy));
        let mut properties = DatabaseProperties {
            create: None,
            after_load: Vec::new(),
            comment: None,
            skipped: Vec::new(),
            mark_like_comment: None,
            privileges_left_out: false,
        };
        let Some(entries) = entries else {
            properties.comment = Some(null_comment);
            return properties;
        };
        let mut take = |sql: &str, into: &mut Vec<String>| {
            for statement in archive::database_statements(sql, source, copy) {
                match statement {
                    Ok(statement) => into.push(statement),
                    Err(other) => properties.skipped.push(other),
                }
            }
        };
        let mut create = Vec::new();
        if let Some(sql) = &entries.create {
            take(sql, &mut create);
        }
        let mut after_load = Vec::new();
        if let (Some(owner), false) = (&entries.owner, no_owner) {
            after_load.push(format!(
                "alter database {} owner to {}",
                quote_identifier(copy),
                quote_identifier(owner)
            ));
        }
        for sql in &entries.properties {
            take(sql, &mut after_load);
        }
        if !no_owner {
            for sql in &entries.privileges {
                take(sql, &mut after_load);
            }
        }
        properties.privileges_left_out = no_owner && !entries.privileges.is_empty();
        properties.create = create
            .into_iter()
            .find(|s| s.trim_start().to_ascii_uppercase().starts_with("CREATE"));
        let is_comment = |s: &String| s.trim_start().to_ascii_uppercase().starts_with("COMMENT");
        let (comments, rest): (Vec<String>, Vec<String>) =
            after_load.into_iter().partition(is_comment);
        for comment in comments {
            // Only lifeboat marks a database it is loading: a comment copied from a source
            // must not make a live database look like a leftover to drop.
            if comment.contains(LOADING_MARK) {
                properties.mark_like_comment = Some(comment);
            } else {
                properties.comment = Some(comment);
            }
        }
        properties.after_load = rest;
        properties.comment.get_or_insert(null_comment);
        properties
    }
}

/// Creates the database `copy` with the source's `CREATE DATABASE`; when the server cannot
/// (a locale or tablespace it lacks), with its defaults and a warning naming what was asked.
/// False when a database of that name appeared meanwhile (nothing was created).
async fn create_as_source(
    admin: &Target,
    properties: &DatabaseProperties,
    copy: &str,
    source: &str,
    warnings: &mut Vec<String>,
) -> Result<bool> {
    // Two restores creating the same name at once: one sees the other's row.
    let taken = |e: &tokio_postgres::Error| {
        matches!(
            e.code(),
            Some(&tokio_postgres::error::SqlState::DUPLICATE_DATABASE)
                | Some(&tokio_postgres::error::SqlState::UNIQUE_VIOLATION)
        )
    };
    if let Some(create) = &properties.create {
        match admin.execute(create).await {
            Ok(()) => return Ok(true),
            Err(e) if taken(&e) => return Ok(false),
            Err(e) => warnings.push(format!(
                "database '{source}' could not be created as its source was ({}): `{create}`; it was created with the server's defaults (encoding, locale) instead",
                e.as_db_error().map_or(e.to_string(), |d| d.message().to_string())
            )),
        }
    }
    let sql = format!(
        "create database {} template template0",
        quote_identifier(copy)
    );
    match admin.execute(&sql).await {
        Ok(()) => Ok(true),
        Err(e) if taken(&e) => Ok(false),
        Err(e) => Err(Error::new(
            ErrorKind::Target,
            format!("unable to create database '{copy}' to restore '{source}' into"),
        )
        .with_source(e)),
    }
}

/// `quote_literal` for a string pg_dump did not write.
fn quote_literal(text: &str) -> String {
    format!("'{}'", text.replace('\'', "''"))
}

/// A name for `database` with `what` and `stamp` added that no database on the server has
/// and this restore has not taken, within PostgreSQL's 63 bytes.
async fn free_name(
    admin: &Target,
    database: &str,
    what: &str,
    stamp: &str,
    taken: &[String],
) -> Result<String> {
    for attempt in 1u32.. {
        let suffix = match attempt {
            1 => format!("_{what}_{stamp}"),
            n => format!("_{what}_{stamp}_{n}"),
        };
        let mut base = database.to_string();
        while base.len() + suffix.len() > 63 {
            base.pop();
        }
        let name = format!("{base}{suffix}");
        if !taken.contains(&name) && !admin.database_exists(&name).await? {
            return Ok(name);
        }
    }
    unreachable!("the loop returns")
}

/// Has the database `name` dropped if the run is interrupted: by psql, since the interrupt
/// cannot wait on this run's own connection. None (and a warning) if that cannot be set up.
fn drop_on_interrupt(
    binaries: &Binaries,
    server: &Connection,
    auth: &ChildAuth,
    name: &str,
) -> Option<crate::interrupt::UndoGuard> {
    let auth = match auth.try_clone() {
        Ok(auth) => auth,
        Err(e) => {
            tracing::warn!(error = %e, "an interrupted restore will not drop the database it was loading");
            return None;
        }
    };
    let mut command = binaries.command("psql");
    command
        .args(["--no-psqlrc", "--quiet", "--no-password"])
        .arg(format!("--dbname={}", server.conninfo()))
        .arg("--command")
        .arg(format!(
            "drop database if exists {} with (force)",
            quote_identifier(name)
        ));
    auth.apply(&mut command);
    let name = name.to_string();
    Some(crate::interrupt::undo_on_interrupt(move || {
        let _passfile = &auth;
        match process::output(&mut command) {
            Ok(output) if output.status.success() => tracing::error!(
                "dropped '{name}', the database the interrupted restore was loading; the databases it was to replace are as they were"
            ),
            _ => tracing::error!(
                "unable to drop '{name}', the database the interrupted restore was loading: drop it with DROP DATABASE; the databases it was to replace are as they were"
            ),
        }
    }))
}

/// Drops the databases this restore loaded, for a restore that fails before its swap;
/// says what became of them and of the server.
async fn drop_loaded(admin: &Target, loaded: &[Loaded]) -> String {
    let mut left = Vec::new();
    for copy in loaded {
        if admin.drop_database(&copy.name).await.is_err() {
            left.push(format!("'{}'", copy.name));
        }
    }
    match left.is_empty() {
        true => {
            "nothing on the server was changed: the databases this restore was loading were dropped"
                .to_string()
        }
        false => format!(
            "the databases on the server are as they were, but {} (loaded by this restore) could not be dropped: drop them with DROP DATABASE",
            left.join(", ")
        ),
    }
}

/// What the swap does, in one transaction: set the loaded databases' comments (replacing
/// the mark that they are being loaded), then the renames, in order.
#[derive(Clone, Copy)]
struct SwapPlan<'a> {
    comments: &'a [String],
    renames: &'a [(String, String)],
    /// The databases being replaced, whose sessions the swap waits for.
    replaced: &'a [String],
}

/// Runs the swap once no session uses the databases being replaced, waiting up to
/// `--swap-wait` for them to end (or ending them with `--terminate-sessions`). Each try is
/// short (a lock waited for 1 s at most, the whole statement 3 s) and dies with a client that
/// went away, so that a lifeboat killed while it waits does not swap after its death. Once
/// it committed, an interrupt no longer drops what was loaded.
#[expect(
    clippy::await_holding_lock,
    reason = "the interrupt's cleanup waits on the hold from a blocking thread of its own; the swap's one round trip finishes on the runtime's other threads"
)]
async fn swap(
    admin: &Target,
    server: &Connection,
    plan: SwapPlan<'_>,
    loaded: &mut [Loaded],
    options: &PostgresRestoreOptions,
) -> Result<()> {
    let wait = match options.swap_wait.is_zero() {
        true => std::time::Duration::from_secs(30),
        false => options.swap_wait,
    };
    let deadline = std::time::Instant::now() + wait;
    let mut last_error = None;
    loop {
        if options.terminate_sessions {
            for database in plan.replaced {
                admin.terminate_sessions(database).await?;
            }
        }
        let mut in_use = false;
        for database in plan.replaced {
            in_use |= !admin.sessions_on(database).await?.is_empty();
        }
        if !in_use {
            // Renaming a database needs it to have no session, this restore's own included.
            for copy in loaded.iter_mut() {
                copy.hold = None;
            }
            let swapped = {
                // An interrupt waits for the transaction to end: all of it or none.
                let _hold = crate::interrupt::hold_off();
                let swapped = admin.swap(plan.comments, plan.renames).await;
                if swapped.is_ok() {
                    for copy in loaded.iter_mut() {
                        copy.undo = None;
                    }
                }
                swapped
            };
            match swapped {
                Ok(()) => return Ok(()),
                Err(e) => {
                    let busy = matches!(
                        e.code(),
                        Some(&tokio_postgres::error::SqlState::OBJECT_IN_USE)
                            | Some(&tokio_postgres::error::SqlState::LOCK_NOT_AVAILABLE)
                            | Some(&tokio_postgres::error::SqlState::QUERY_CANCELED)
                    );
                    if !busy {
                        return Err(Error::new(
                            ErrorKind::Target,
                            format!(
                                "unable to swap the restored databases into place on {}",
                                server.describe()
                            ),
                        )
                        .with_source(e));
                    }
                    last_error = Some(e);
                    for copy in loaded.iter_mut() {
                        copy.hold = server.with_database(&copy.name).connect().await.ok();
                    }
                }
            }
        }
        if std::time::Instant::now() >= deadline {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    let mut sessions = Vec::new();
    for database in plan.replaced {
        for session in admin.sessions_on(database).await.unwrap_or_default() {
            sessions.push(format!("'{database}': {session}"));
        }
    }
    let what = plan
        .replaced
        .iter()
        .map(|d| format!("'{d}'"))
        .collect::<Vec<_>>()
        .join(", ");
    let mut err = Error::new(
        ErrorKind::Target,
        match sessions.is_empty() {
            false => format!(
                "unable to replace {what} on {}: still in use after waiting {}: {}",
                server.describe(),
                humantime::format_duration(wait),
                sessions.join(", ")
            ),
            true => format!(
                "unable to replace {what} on {}: the swap kept waiting for locks for {}",
                server.describe(),
                humantime::format_duration(wait)
            ),
        },
    );
    if let Some(e) = last_error {
        err = err.with_source(e);
    }
    Err(err.with_hint("end those sessions (stop the application), or pass --terminate-sessions to end them when the swap comes; --swap-wait sets how long to wait"))
}

/// Databases that restores which were killed left on the server: dropped when the restore
/// that loaded them ran on this host and its process is gone, else named for the operator.
/// Only a database named as lifeboat names a copy, carrying the mark lifeboat writes, with
/// the database's own oid in it (a comment copied from elsewhere names another oid), is
/// taken for one; and it is dropped only if nobody is connected to it.
async fn leftovers(admin: &Target) -> Vec<String> {
    let found = match admin.databases_commented(LOADING_MARK).await {
        Ok(found) => found,
        Err(e) => {
            tracing::debug!(error = %e, "unable to look for databases left by interrupted restores");
            return Vec::new();
        }
    };
    let mut warnings = Vec::new();
    for (name, comment, oid) in found {
        let ours =
            name.contains("_restoring_") && comment.ends_with(&format!("(database oid {oid})"));
        if !ours {
            continue;
        }
        if loader_is_gone(&comment, &crate::host::name()) {
            match admin
                .execute(&format!("drop database {}", quote_identifier(&name)))
                .await
            {
                Ok(()) => {
                    warnings.push(format!(
                        "dropped database '{name}', left on the server by a restore on this host that was killed ({comment})"
                    ));
                    continue;
                }
                Err(e) => {
                    tracing::debug!(error = %e, database = %name, "unable to drop a leftover")
                }
            }
        }
        warnings.push(format!(
            "database '{name}' on the server was left by a restore that did not finish ({comment}); drop it with DROP DATABASE once no restore is loading it"
        ));
    }
    warnings
}

/// Whether the restore a loading mark names ran on `host` and its process no longer runs.
fn loader_is_gone(mark: &str, host: &str) -> bool {
    let Some(rest) = mark.split(" by pid ").nth(1) else {
        return false;
    };
    let mut words = rest.split(' ');
    let (Some(pid), Some("on"), Some("host"), Some(marked_host)) =
        (words.next(), words.next(), words.next(), words.next())
    else {
        return false;
    };
    let Ok(pid) = pid.parse::<libc::pid_t>() else {
        return false;
    };
    if marked_host != host || pid <= 0 {
        return false;
    }
    // SAFETY: signal 0 only asks whether the process exists.
    let alive = unsafe { libc::kill(pid, 0) } == 0
        || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM);
    !alive
}

/// Refuses a restore that replaces databases when the server has no room for the copy it
/// loads beside each one (about the size of the database there now), when the server is
/// on this machine and its data directory can be looked at; a warning when it cannot.
async fn check_server_room(
    admin: &Target,
    server: &Connection,
    plan: &[Planned<'_>],
) -> Result<Vec<String>> {
    let mut needed = 0u64;
    let mut sizes = Vec::new();
    for planned in plan {
        let size = match planned.existing {
            Existing::Holding => admin
                .database_size(&planned.target_database)
                .await?
                .max(planned.object.raw_size),
            _ => planned.object.raw_size,
        };
        needed += size;
        sizes.push(format!(
            "'{}' {}",
            planned.target_database,
            crate::human::human_size(size)
        ));
    }
    let replacing = plan.iter().any(|p| p.existing == Existing::Holding);
    let data_directory = match server.is_local() {
        true => admin.data_directory().await,
        false => None,
    };
    let free = data_directory.as_ref().and_then(|dir| {
        rustix::fs::statvfs(dir.as_str())
            .ok()
            .map(|s| s.f_bavail.saturating_mul(s.f_frsize))
    });
    let (Some(dir), Some(free)) = (data_directory, free) else {
        if !replacing {
            return Ok(Vec::new());
        }
        return Ok(vec![format!(
            "the databases being replaced stay until the restored ones are in place: the server needs room for both, about {} more ({}); lifeboat could not check it from here",
            crate::human::human_size(needed),
            sizes.join(", ")
        )]);
    };
    if free < needed {
        return Err(Error::new(
            ErrorKind::Target,
            format!(
                "unable to restore into {}: the restored databases need about {} ({}) beside what the server holds, and its data directory '{dir}' has {} free",
                server.describe(),
                crate::human::human_size(needed),
                sizes.join(", "),
                crate::human::human_size(free)
            ),
        )
        .with_hint("free space on the server, or restore under another name with --as NAME and drop the old database yourself")
        .with_hint("nothing on the server was changed"));
    }
    Ok(Vec::new())
}

/// Refuses, before anything is created, a restore whose dumps name roles (owners, grantees,
/// the roles of policies and user mappings) that the target lacks and the globals being
/// restored do not create: pg_restore would fail on the first of them halfway through.
/// With `no_owner` (pg_restore `--no-owner --no-acl`) owners and grantees are not needed. A
/// dump whose table of contents is not understood is not checked.
async fn check_roles(
    admin: &Target,
    server: &Connection,
    backup: &str,
    (plan, staged, entries): (
        &[Planned<'_>],
        &[Staged],
        &[Option<archive::DatabaseEntries>],
    ),
    globals: Option<&Path>,
    no_owner: bool,
) -> Result<()> {
    let mut needed: std::collections::BTreeMap<String, Vec<&str>> = Default::default();
    // The database's own owner and grantees, when they are restored.
    for (planned, entries) in plan.iter().zip(entries) {
        let Some(entries) = entries.as_ref().filter(|_| !no_owner) else {
            continue;
        };
        let grantees = entries
            .privileges
            .iter()
            .flat_map(|sql| archive::roles_of_sql(sql));
        for role in entries.owner.iter().cloned().chain(grantees) {
            needed
                .entry(role)
                .or_default()
                .push(&planned.source_database);
        }
    }
    for (planned, dump) in plan.iter().zip(staged) {
        let toc = match dump {
            Staged::Seekable(path) => Some(path),
            Staged::Stored { toc, .. } => toc.as_ref(),
        };
        let Some(toc) = toc else { continue };
        let roles = std::fs::File::open(toc).and_then(archive::roles_named);
        match roles {
            Ok(Some(named)) => {
                let roles: Vec<String> = match no_owner {
                    true => named.others.into_iter().collect(),
                    false => named
                        .owners
                        .into_iter()
                        .chain(named.grantees)
                        .chain(named.others)
                        .collect(),
                };
                for role in roles {
                    needed
                        .entry(role)
                        .or_default()
                        .push(&planned.source_database);
                }
            }
            Ok(None) => {}
            Err(e) => {
                tracing::warn!(dump = %toc.display(), error = %e, "unable to read the roles the dump needs; pg_restore will find out")
            }
        }
    }
    if needed.is_empty() {
        return Ok(());
    }
    let mut present = admin.role_names().await?;
    if let Some(globals) = globals {
        let text = std::fs::read_to_string(globals).unwrap_or_default();
        present.extend(archive::roles_created(&text));
    }
    let missing: Vec<String> = needed
        .iter()
        .filter(|(role, _)| !present.contains(*role))
        .map(|(role, databases)| {
            let mut databases = databases.clone();
            databases.dedup();
            format!("'{role}' (database {})", databases.join(", "))
        })
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    Err(Error::new(
        ErrorKind::Target,
        format!(
            "unable to restore backup '{backup}' into {}: its objects belong or are granted to roles the server lacks: {}",
            server.describe(),
            missing.join(", ")
        ),
    )
    .with_hint(if no_owner {
        "create them (row security policies and user mappings need them even with --no-owner), or restore the roles first with --globals"
    } else {
        "restore the roles first with --globals, create them, or restore without owners and privileges with --no-owner"
    })
    .with_hint("nothing was created on the server"))
}

/// A dump in staging, verified.
enum Staged {
    /// Decompressed, with its data offsets filled in.
    Seekable(PathBuf),
    /// As stored, with its table of contents alone beside it (None: not understood), and
    /// the repository it came from.
    Stored {
        stored: PathBuf,
        toc: Option<PathBuf>,
        served_by: Repository,
    },
}

impl Staged {
    /// The database's own entries, from the dump's table of contents; None when it cannot
    /// be read (then the database is created with the server's defaults, and said so).
    fn database_entries(&self) -> Option<archive::DatabaseEntries> {
        let toc = match self {
            Staged::Seekable(path) => path,
            Staged::Stored { toc, .. } => toc.as_ref()?,
        };
        match std::fs::File::open(toc).and_then(archive::database_entries) {
            Ok(entries) => entries,
            Err(e) => {
                tracing::warn!(dump = %toc.display(), error = %e, "unable to read the database's own entries from the dump");
                None
            }
        }
    }
}

/// pg_restore runs for one database.
struct PgRestore<'a> {
    binaries: &'a Binaries,
    target: &'a Connection,
    auth: &'a ChildAuth,
    options: &'a PostgresRestoreOptions,
    action: &'a str,
}

impl PgRestore<'_> {
    fn command(&self) -> Command {
        let mut command = self.binaries.command_with_workers("pg_restore");
        command
            .arg("--exit-on-error")
            .arg("--no-password")
            .arg(format!("--dbname={}", self.target.conninfo()));
        if self.options.no_owner {
            command.args(["--no-owner", "--no-acl"]);
        }
        self.auth.apply(&mut command);
        command
    }

    fn jobs(&self) -> String {
        format!("--jobs={}", self.options.jobs.max(1))
    }

    /// The whole archive from a seekable file, `--jobs` at a time.
    fn seekable(&self, file: &Path) -> Result<()> {
        let mut command = self.command();
        command.arg(self.jobs());
        command.arg(file);
        process::run(command, self.action).map(|_| ())
    }

    /// Schema, data, then indexes and constraints, with the data decoded from the stored
    /// copy straight into pg_restore's stdin. With the table of contents alone beside it,
    /// the schema and the post-data steps come from that, and `--jobs` pg_restore processes
    /// load the tables at once, each fed its own decode of the stored copy. Without one,
    /// everything comes through one stdin.
    fn streamed(&self, dump: &StagedObject<'_>, toc: Option<&Path>) -> Result<()> {
        let Some(toc) = toc else {
            return self.feed(self.command(), dump, true, |raw, stdin| {
                process::copy_all(raw, stdin).map(|_| ())
            });
        };
        let mut pre_data = self.command();
        pre_data.arg("--section=pre-data").arg(toc);
        process::run(pre_data, self.action)?;
        self.load_data(dump)?;
        let mut post_data = self.command();
        post_data
            .arg("--section=post-data")
            .arg(self.jobs())
            .arg(toc);
        process::run(post_data, self.action).map(|_| ())
    }

    /// `--jobs` pg_restore processes loading the data section side by side; each table
    /// goes to the first that reaches it (see `archive::share_data`). Only the first decode
    /// checks the checksums: the stored copy was checked when it was staged, and every
    /// decode of it is the same.
    fn load_data(&self, dump: &StagedObject<'_>) -> Result<()> {
        let shared = archive::SharedData::default();
        let failure = std::sync::Mutex::new(None);
        std::thread::scope(|scope| {
            for loader in 0..self.options.jobs.max(1) {
                let (shared, failure) = (&shared, &failure);
                scope.spawn(move || {
                    let mut command = self.command();
                    command.arg("--section=data");
                    let loaded = self.feed(command, dump, loader == 0, |raw, stdin| {
                        archive::share_data(raw, stdin, shared)
                    });
                    if let Err(e) = loaded
                        && shared.abandon()
                    {
                        *failure.lock().expect("failure lock") = Some(e);
                    }
                });
            }
        });
        match failure.into_inner().expect("failure lock") {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// Runs `command` with `copy` writing a decode of the stored dump into its stdin.
    fn feed(
        &self,
        command: Command,
        dump: &StagedObject<'_>,
        checked: bool,
        copy: impl FnOnce(&mut dyn std::io::Read, &mut dyn std::io::Write) -> std::io::Result<()>,
    ) -> Result<()> {
        process::run_with_stdin(command, self.action, |stdin| match checked {
            true => dump.decode(|raw| copy(raw, stdin)),
            false => dump.decode_unchecked(|raw| copy(raw, stdin)),
        })?
    }
}

/// Writes the table of contents of the staged dump `stored` alone to `toc`; false (and a
/// log line) when that cannot be done, leaving pg_restore to read it all from stdin.
/// The table of contents is read from a stream whose checksum is checked only later: it
/// may not run past the manifest's raw size, nor past this.
const MAX_TOC: u64 = 1 << 30;

fn write_toc(stored: &Path, toc: &Path, identities: Option<&[Identity]>, raw_size: u64) -> bool {
    let written = (|| {
        use std::io::Read;
        let input = pipeline::decode_unchecked(std::fs::File::open(stored)?, identities)?
            .take(raw_size.min(MAX_TOC));
        archive::toc_only(input, std::fs::File::create(toc)?)
    })();
    match written {
        Ok(true) => true,
        Ok(false) => {
            tracing::warn!(dump = %stored.display(), "not a pg_dump archive format lifeboat knows; pg_restore will read it whole from stdin");
            false
        }
        Err(e) => {
            tracing::warn!(dump = %stored.display(), error = %e, "unable to read the dump's table of contents; pg_restore will read it whole from stdin");
            false
        }
    }
}

/// Lets `pg_restore --jobs` seek straight to each table's data; see `archive`.
async fn fill_offsets(path: &Path) {
    let owned = path.to_path_buf();
    let started = std::time::Instant::now();
    match tokio::task::spawn_blocking(move || archive::fill_data_offsets(&owned)).await {
        Ok(Ok(filled)) => {
            let elapsed = started.elapsed();
            tracing::debug!(path = %path.display(), filled, ?elapsed, "filled in archive data offsets")
        }
        Ok(Err(e)) => {
            tracing::warn!(path = %path.display(), error = %e, "unable to fill in archive data offsets; pg_restore will scan instead")
        }
        Err(e) => tracing::warn!(error = %e, "unable to fill in archive data offsets"),
    }
}

/// The roles the target has, for globals restored without passwords.
struct TargetRoles<'a> {
    present: &'a std::collections::BTreeSet<String>,
    can_login: &'a std::collections::BTreeSet<String>,
    /// `--keep-login`: create the new login roles LOGIN anyway.
    keep_login: bool,
}

/// Runs the globals script with psql. Roles that already exist (the restoring superuser,
/// at least) make harmless errors, so the script goes on past errors; the other errors come
/// back as warnings. The role this restore connects as keeps its own password and
/// attributes: the source's `ALTER ROLE` for it would lock the running restore out.
///
/// Globals dumped without passwords (by a backup role that is not a superuser) would make
/// login roles nobody can log in as: the roles the server did not have before are created
/// NOLOGIN instead (or, with `keep_login`, LOGIN and a warning), and said so.
fn apply_globals(
    binaries: &Binaries,
    server: &Connection,
    auth: &ChildAuth,
    file: &Path,
    passwordless: Option<TargetRoles<'_>>,
) -> Result<Vec<String>> {
    let mut warnings = Vec::new();
    let script = std::fs::read_to_string(file).map_err(|e| {
        Error::new(
            ErrorKind::Target,
            format!("unable to read staged globals '{}'", file.display()),
        )
        .with_source(e)
    })?;
    let (mut kept, skipped) = without_role_changes(&script, server.user());
    if skipped > 0 {
        warnings.push(format!(
            "globals: kept the password and attributes of role '{}', which this restore connects as",
            server.user()
        ));
    }
    if let Some(roles) = passwordless {
        let created = archive::roles_created(&kept);
        let new_roles: std::collections::BTreeSet<String> = created
            .iter()
            .filter(|role| !roles.present.contains(*role))
            .cloned()
            .collect();
        // A role the server has that may not log in stays so: the source's LOGIN would
        // bring back whatever password it had here.
        let shut: std::collections::BTreeSet<String> = created
            .iter()
            .filter(|role| roles.present.contains(*role) && !roles.can_login.contains(*role))
            .cloned()
            .collect();
        let (without, changed) = archive::without_login(&kept, &new_roles);
        let (without, _) = archive::without_login(&without, &shut);
        let listed = changed
            .iter()
            .map(|r| format!("'{r}'"))
            .collect::<Vec<_>>()
            .join(", ");
        if roles.keep_login {
            let (kept_shut, _) = archive::without_login(&kept, &shut);
            kept = kept_shut;
            if !changed.is_empty() {
                warnings.push(format!(
                    "globals: the backup holds no role passwords, and these roles can now log in without one being set: {listed}; set each with ALTER ROLE name PASSWORD '...' before anyone relies on them"
                ));
            }
        } else {
            kept = without;
            if !changed.is_empty() {
                warnings.push(format!(
                    "globals: the backup holds no role passwords, so these roles were created NOLOGIN: {listed}; give each a password and LOGIN (ALTER ROLE name LOGIN PASSWORD '...'), or restore with --keep-login"
                ));
            }
        }
    }
    let filtered = file.with_extension("restore.sql");
    std::fs::write(&filtered, kept).map_err(|e| {
        Error::new(
            ErrorKind::Target,
            format!("unable to write '{}'", filtered.display()),
        )
        .with_source(e)
    })?;

    let mut command: Command = binaries.command("psql");
    command
        .args(["--no-psqlrc", "--quiet", "--no-password"])
        .arg(format!("--dbname={}", server.conninfo()))
        .arg("--file")
        .arg(&filtered);
    auth.apply(&mut command);
    // Through the runner that an interrupt kills, as every other child.
    let output = process::output(&mut command).map_err(|e| {
        Error::new(
            ErrorKind::Source,
            "unable to restore globals: cannot start psql",
        )
        .with_source(e)
    })?;
    if !output.status.success() {
        return Err(
            Error::new(ErrorKind::Target, "unable to restore globals with psql").with_source(
                process::ChildFailure {
                    status: format!("psql failed ({})", output.status),
                    stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
                },
            ),
        );
    }
    warnings.extend(
        String::from_utf8_lossy(&output.stderr)
            .lines()
            .filter(|line| line.contains("ERROR:") && !line.contains("already exists"))
            .map(|line| format!("globals: {line}")),
    );
    Ok(warnings)
}

/// The globals script without `ALTER ROLE` lines for `role` (as pg_dumpall writes them,
/// quoted or not); and how many were left out.
fn without_role_changes(script: &str, role: &str) -> (String, usize) {
    let plain = format!("ALTER ROLE {role} ");
    let quoted = format!("ALTER ROLE {} ", quote_identifier(role));
    let mut skipped = 0;
    let kept: String = script
        .split_inclusive('\n')
        .filter(|line| {
            let skip = line.starts_with(&plain) || line.starts_with(&quoted);
            skipped += skip as usize;
            !skip
        })
        .collect();
    (kept, skipped)
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_leftover_is_dropped_only_when_its_restore_ran_here_and_is_gone() {
        let mark = |pid: i64, host: &str| {
            format!(
                "lifeboat: restore in progress: backup db/1 into 'app' by pid {pid} on host {host} since 2026-01-01T00:00:00Z"
            )
        };
        let me = std::process::id() as i64;
        assert!(!super::loader_is_gone(&mark(me, "here"), "here"));
        assert!(!super::loader_is_gone(
            &mark(i32::MAX as i64, "there"),
            "here"
        ));
        assert!(super::loader_is_gone(
            &mark(i32::MAX as i64, "here"),
            "here"
        ));
        assert!(!super::loader_is_gone(
            "lifeboat: restore in progress: garbled",
            "here"
        ));
    }

    #[test]
    fn the_restoring_role_keeps_its_password() {
        let script = "CREATE ROLE app;\nALTER ROLE app WITH LOGIN PASSWORD 'x';\nCREATE ROLE postgres;\nALTER ROLE postgres WITH SUPERUSER PASSWORD 'old';\nALTER ROLE \"Admin\" WITH LOGIN;\n";
        let (kept, skipped) = super::without_role_changes(script, "postgres");
        assert_eq!(skipped, 1);
        assert!(kept.contains("ALTER ROLE app WITH LOGIN"));
        assert!(!kept.contains("PASSWORD 'old'"));
        let (kept, skipped) = super::without_role_changes(script, "Admin");
        assert_eq!(skipped, 1);
        assert!(!kept.contains("\"Admin\""));
    }
}
