//! Restoring a logical `postgres` backup into a server: every needed dump is downloaded and
//! verified into staging first; then the globals (roles before the objects they own), then
//! each database with pg_restore. A database that holds objects is refused unless `--clean`;
//! a database lifeboat created is dropped again if its restore fails.
//!
//! By default a dump is staged as stored (compressed) and decoded straight into pg_restore:
//! no room is needed for the uncompressed dump, and loading starts without first writing it
//! out. `--jobs` pg_restore processes load the tables at once, each fed its own decode, and
//! indexes and constraints are built `--jobs` at a time. `--parallel-data` (and `--clean`,
//! whose drops pg_restore plans over the whole archive) stage the dump decompressed
//! instead, for `pg_restore --jobs` to read: one decode instead of one per job.

use std::path::{Path, PathBuf};
use std::process::Command;

use super::staging::Staging;
use super::{PostgresRestoreOptions, RestoreReport, Selected};
use crate::commands::backup::GLOBALS_OBJECT;
use crate::error::{Error, ErrorKind, Result};
use crate::keys::Identity;
use crate::manifest::ObjectEntry;
use crate::pipeline;
use crate::repository::Repository;
use crate::sources::postgres::{
    Binaries, ChildAuth, Connection, Target, archive, quote_identifier,
};
use crate::sources::process;
use crate::transfer::StagedObject;

struct Planned<'a> {
    object: &'a ObjectEntry,
    source_database: String,
    target_database: String,
    exists: bool,
}

pub(super) async fn restore(
    selected: Selected,
    options: &PostgresRestoreOptions,
) -> Result<RestoreReport> {
    let manifest = &selected.manifest;
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
    let server = Connection::from_dsn(dsn)?;
    let admin = Target::open(&server).await?;

    // Plan, and refuse what must be refused, before anything is downloaded.
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
    let mut plan = Vec::new();
    for object in dumps {
        let source_database = object.database.clone().expect("filtered");
        let target_database = options
            .rename_to
            .clone()
            .unwrap_or_else(|| source_database.clone());
        let exists = admin.database_exists(&target_database).await?;
        if exists && !options.clean && !admin.database_is_empty(&target_database).await? {
            return Err(Error::new(
                ErrorKind::Target,
                format!("unable to restore into database '{target_database}' on {}: it already holds tables", server.describe()),
            )
            .with_hint("restore under another name with --as NAME, or pass --clean to replace what is there"));
        }
        plan.push(Planned {
            object,
            source_database,
            target_database,
            exists,
        });
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

    // Fetch and verify everything into staging before the server is touched: the dumps as
    // stored, to be decoded into pg_restore as they load; or decompressed, when pg_restore
    // must seek (loading tables in parallel, or dropping objects first with --clean).
    let decompress = options.clean || options.parallel_data;
    let needed = plan
        .iter()
        .map(|p| match decompress {
            true => p.object.raw_size,
            false => p.object.size,
        })
        .sum::<u64>()
        + globals.map_or(0, |g| g.raw_size);
    let staging_started = std::time::Instant::now();
    let staging = Staging::prepare(options.staging_dir.as_deref(), needed)?;
    let globals_file = match globals {
        Some(object) => Some(
            selected
                .read_from_any(&object.name, async |repository| {
                    staging
                        .fetch(repository, manifest, object, &selected.keyring)
                        .await
                })
                .await?,
        ),
        None => None,
    };
    let mut staged = Vec::new();
    for planned in &plan {
        let started = std::time::Instant::now();
        let object = planned.object;
        let dump = if decompress {
            let path = selected
                .read_from_any(&object.name, async |repository| {
                    staging
                        .fetch(repository, manifest, object, &selected.keyring)
                        .await
                })
                .await?;
            fill_offsets(&path).await;
            Staged::Seekable(path)
        } else {
            let (stored, served_by) = selected
                .read_from_any(&object.name, async |repository| {
                    let path = staging.fetch_stored(repository, manifest, object).await?;
                    Ok((path, repository.clone()))
                })
                .await?;
            let toc = staging.path(&format!("{}.toc", planned.object.name));
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
        tracing::debug!(object = %planned.object.name, ?elapsed, "staged");
        staged.push(dump);
    }

    let staged_in = staging_started.elapsed();
    check_roles(
        &admin,
        &server,
        &backup,
        (&plan, &staged),
        globals_file.as_deref(),
        options.no_owner,
    )
    .await?;
    let load_started = std::time::Instant::now();

    // Write into the server.
    let auth = server.child_auth()?;
    let mut warnings = Vec::new();
    if let Some(file) = &globals_file {
        warnings.extend(apply_globals(&binaries, &server, &auth, file)?);
    }
    let mut restored = Vec::new();
    for (planned, dump) in plan.iter().zip(&staged) {
        let target = server.with_database(&planned.target_database);
        if !planned.exists {
            admin.create_database(&planned.target_database).await?;
        }
        let action = format!(
            "restore database '{}' into '{}' with pg_restore",
            planned.source_database, planned.target_database
        );
        let restore = PgRestore {
            binaries: &binaries,
            target: &target,
            auth: &auth,
            options,
            action: &action,
        };
        let started = std::time::Instant::now();
        let outcome = match dump {
            Staged::Seekable(file) => restore.seekable(file),
            Staged::Stored {
                stored,
                toc,
                served_by,
            } => {
                if toc.is_none() {
                    warnings.push(format!(
                        "database '{}': its dump's table of contents was not understood, so pg_restore built its indexes one at a time",
                        planned.source_database
                    ));
                }
                let dump = StagedObject {
                    path: stored,
                    repository: served_by,
                    manifest,
                    object: planned.object,
                    keyring: &selected.keyring,
                };
                restore.streamed(&dump, toc.as_deref())
            }
        };
        let elapsed = started.elapsed();
        tracing::debug!(database = %planned.target_database, ?elapsed, "pg_restore finished");
        if let Err(err) = outcome {
            if planned.exists {
                return Err(err.with_hint(format!(
                    "database '{}' existed before and may now be partly restored",
                    planned.target_database
                )));
            }
            let cleanup = admin.drop_database(&planned.target_database).await;
            let hint = match cleanup {
                Ok(()) => format!(
                    "the database '{}' that lifeboat created for it was dropped again",
                    planned.target_database
                ),
                Err(_) => format!(
                    "drop the partly restored database '{}' before trying again",
                    planned.target_database
                ),
            };
            let err = err.with_hint(hint);
            return Err(match err.kind() {
                ErrorKind::Verification => err,
                _ => err.with_hint(
                    "restore the roles first with --globals, or ignore ownership with --no-owner",
                ),
            });
        }
        restored.push(if planned.source_database == planned.target_database {
            format!("database '{}'", planned.target_database)
        } else {
            format!(
                "database '{}' as '{}'",
                planned.source_database, planned.target_database
            )
        });
    }
    if globals_file.is_some() {
        restored.insert(0, "globals".to_string());
    }
    let bytes =
        plan.iter().map(|p| p.object.raw_size).sum::<u64>() + globals.map_or(0, |g| g.raw_size);
    let stages = vec![
        ("download and verify".to_string(), staged_in),
        ("load (pg_restore)".to_string(), load_started.elapsed()),
    ];
    let created = plan
        .iter()
        .filter(|p| !p.exists)
        .map(|p| p.target_database.clone())
        .collect();
    drop(plan);
    let mut report = selected.report(server.describe(), restored, bytes, warnings, stages);
    report.created_databases = created;
    Ok(report)
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
    (plan, staged): (&[Planned<'_>], &[Staged]),
    globals: Option<&Path>,
    no_owner: bool,
) -> Result<()> {
    let mut needed: std::collections::BTreeMap<String, Vec<&str>> = Default::default();
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
        let mut command = self.binaries.command("pg_restore");
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
        if self.options.clean {
            command.args(["--clean", "--if-exists"]);
        }
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

/// Runs the globals script with psql. Roles that already exist (the restoring superuser,
/// at least) make harmless errors, so the script goes on past errors; the other errors come
/// back as warnings. The role this restore connects as keeps its own password and
/// attributes: the source's `ALTER ROLE` for it would lock the running restore out.
fn apply_globals(
    binaries: &Binaries,
    server: &Connection,
    auth: &ChildAuth,
    file: &Path,
) -> Result<Vec<String>> {
    let mut warnings = Vec::new();
    let script = std::fs::read_to_string(file).map_err(|e| {
        Error::new(
            ErrorKind::Target,
            format!("unable to read staged globals '{}'", file.display()),
        )
        .with_source(e)
    })?;
    let (kept, skipped) = without_role_changes(&script, server.user());
    if skipped > 0 {
        warnings.push(format!(
            "globals: kept the password and attributes of role '{}', which this restore connects as",
            server.user()
        ));
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
    let output = command
        .stdin(std::process::Stdio::null())
        .output()
        .map_err(|e| {
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
