//! A repository: a named store plus what lifeboat keeps in it (marker, manifests, objects).
//! Turns store errors into lifeboat errors that name the repository and the object.

use std::collections::BTreeMap;
use std::sync::Arc;

use bytes::Bytes;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::config::{Config, Location, RepositoryConfig};
use crate::error::{Error, ErrorKind, Result};
use crate::layout;
use crate::manifest::Manifest;
use crate::storage::local::LocalStore;
use crate::storage::s3::S3Store;
use crate::storage::{self, ByteStream, Store, StoreError};
use crate::wal::ClusterRecord;

const MARKER_FORMAT: u32 = 1;
/// The most a cluster record may be.
const CLUSTER_RECORD_LIMIT: u64 = 64 * 1024;

#[derive(Debug, Clone)]
pub struct Repository {
    pub name: String,
    pub store: Arc<dyn Store>,
    /// Whose signatures a manifest read from here must carry (see `signing`).
    pub trust: Arc<crate::signing::Trust>,
}

/// The error for a repository that lacks its marker while others of the config hold theirs:
/// it was wiped (a bucket deleted and made again, a volume replaced), or it is new, or the
/// config points it at the wrong place. Writing into it would hide that.
pub fn unmarked(repository: &Repository, marked: &[&str]) -> Error {
    Error::new(
        ErrorKind::Storage,
        format!(
            "repository '{}' ({}) holds no marker '{}' while {} do(es): it was wiped, is new, or is not where the config points",
            repository.name,
            repository.store.location(),
            layout::MARKER_KEY,
            marked
                .iter()
                .map(|name| format!("'{name}'"))
                .collect::<Vec<_>>()
                .join(", ")
        ),
    )
    .with_hint(format!(
        "if it is the right place, `lifeboat replicate --reseed` copies every backup into '{}' and writes its marker",
        repository.name
    ))
}

/// Which of a config's repositories hold their marker.
pub struct Markers {
    /// Per repository, in order: whether it holds its marker, or why that is not known.
    pub held: Vec<Result<bool>>,
    /// The repositories that hold their marker and something under `jobs/`.
    holding_data: Vec<String>,
    /// The repositories that hold something under `jobs/` and no marker.
    unmarked_data: Vec<String>,
}

/// Reads every repository's marker; where some lack theirs, also whether the others hold
/// any data (one short listing each).
pub async fn read_markers(repositories: &[Repository]) -> Markers {
    let held = futures::future::join_all(repositories.iter().map(|r| r.has_marker())).await;
    let mut holding_data = Vec::new();
    let mut unmarked_data = Vec::new();
    if held.iter().any(|h| matches!(h, Ok(false))) {
        for (repository, held) in repositories.iter().zip(&held) {
            let holds_data = || async {
                repository
                    .store
                    .list_page("jobs/", None, 1)
                    .await
                    .is_ok_and(|page| !page.is_empty())
            };
            match held {
                Ok(true) if holds_data().await => holding_data.push(repository.name.clone()),
                Ok(false) if holds_data().await => unmarked_data.push(repository.name.clone()),
                _ => {}
            }
        }
    }
    Markers {
        held,
        holding_data,
        unmarked_data,
    }
}

impl Markers {
    /// The error for repository `index` of those read when it lacks its marker while
    /// another holds its own and data: it was wiped, or is new, or misconfigured. A
    /// repository lacking its marker where no other holds any data has lost nothing.
    /// One holding data without its marker had the marker removed: it is not marked again
    /// either. So is one whose marker is not lifeboat's: it was overwritten, or the config
    /// points at something else.
    pub fn wiped(&self, repositories: &[Repository], index: usize) -> Option<Error> {
        match self.held.get(index) {
            Some(Ok(false)) => {}
            Some(Err(e)) if e.kind() == ErrorKind::Verification => {
                return Some(
                    Error::new(ErrorKind::Storage, e.to_string())
                        .with_hint("the repository location holds something that is not a lifeboat repository: check its path (bucket, prefix) in the config"),
                );
            }
            _ => return None,
        }
        let repository = &repositories[index];
        let others: Vec<&str> = self.holding_data.iter().map(String::as_str).collect();
        if !others.is_empty() {
            return Some(unmarked(repository, &others));
        }
        self.unmarked_data.contains(&repository.name).then(|| {
            Error::new(
                ErrorKind::Storage,
                format!(
                    "repository '{}' ({}) holds data under 'jobs/' but no marker '{}': the marker was removed, or the config points at another repository's data",
                    repository.name,
                    repository.store.location(),
                    layout::MARKER_KEY
                ),
            )
            .with_hint(format!(
                "if it is the right place, `lifeboat replicate --reseed` completes '{}' from the others and writes its marker",
                repository.name
            ))
        })
    }
}

/// Makes each repository ready to be written: one lacking its marker gets one, unless it
/// was wiped (see [`Markers::wiped`]): that is refused, not quietly marked again. One result
/// per repository, in order.
pub async fn prepare_markers(repositories: &[Repository]) -> Vec<Result<()>> {
    let markers = read_markers(repositories).await;
    let wiped: Vec<Option<Error>> = (0..repositories.len())
        .map(|index| markers.wiped(repositories, index))
        .collect();
    let mut prepared = Vec::with_capacity(repositories.len());
    for ((repository, held), wiped) in repositories.iter().zip(markers.held).zip(wiped) {
        prepared.push(match (held, wiped) {
            (_, Some(wiped)) => Err(wiped),
            (Ok(true), None) => Ok(()),
            (Ok(false), None) => repository.write_marker().await,
            (Err(e), None) => Err(e),
        });
    }
    prepared
}

/// What prune left behind when it removed a backup: the record `replicate` honours.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tombstone {
    pub id: String,
    pub removed_at: DateTime<Utc>,
    pub host: String,
    /// The repositories it was removed from in that run.
    pub removed_from: Vec<String>,
}

/// The most a removal record may be.
const TOMBSTONE_LIMIT: u64 = 16 * 1024;
/// The longest manifest read: one names every object of a backup, and an object's block
/// digests take at most about 68 KB, so a manifest of two hundred dumps of terabytes fits.
pub const MANIFEST_LIMIT: u64 = 16 << 20;

#[derive(Debug, Serialize, Deserialize)]
struct Marker {
    format: u32,
    created_at: DateTime<Utc>,
    created_by: String,
}

impl Repository {
    pub async fn open(config: &RepositoryConfig) -> Repository {
        let store: Arc<dyn Store> = match &config.location {
            Location::Local { path } => Arc::new(LocalStore::new(path)),
            Location::S3(settings) => Arc::new(
                S3Store::connect(settings)
                    .await
                    .lock_keys(layout::is_backup_data),
            ),
        };
        Repository {
            name: config.name.clone(),
            store,
            trust: Arc::default(),
        }
    }

    /// Every configured repository, in config order (which is restore preference), each
    /// requiring the signatures the config trusts.
    pub async fn open_all(config: &Config) -> Vec<Repository> {
        let trust = Arc::new(config.signing.trust.clone());
        let mut repositories = Vec::with_capacity(config.repositories.len());
        for repository in &config.repositories {
            let mut opened = Repository::open(repository).await;
            opened.trust = trust.clone();
            repositories.push(opened);
        }
        repositories
    }

    /// The repository to read from: the one named, else the first in config order.
    pub async fn choose(config: &Config, from: Option<&str>) -> Result<Repository> {
        let chosen = match from {
            Some(name) => config.repository(name)?,
            None => &config.repositories[0],
        };
        let mut opened = Repository::open(chosen).await;
        opened.trust = Arc::new(config.signing.trust.clone());
        Ok(opened)
    }

    /// The repositories a restore may read, in config order: the one `from` names, else all,
    /// less those `exclude` names (each must be configured).
    pub async fn readable(
        config: &Config,
        from: Option<&str>,
        exclude: &[String],
    ) -> Result<Vec<Repository>> {
        for name in exclude {
            config.repository(name)?;
        }
        let repositories = match from {
            Some(_) => vec![Repository::choose(config, from).await?],
            None => Repository::open_all(config).await,
        };
        Ok(repositories
            .into_iter()
            .filter(|r| !exclude.contains(&r.name))
            .collect())
    }

    /// "unable to <action> in repository 'NAME' (LOCATION)", with the store's cause.
    pub fn error(&self, action: &str, err: StoreError) -> Error {
        let kind = if err.is_not_found() {
            ErrorKind::NotFound
        } else {
            ErrorKind::Storage
        };
        Error::new(
            kind,
            format!(
                "unable to {action} in repository '{}' ({})",
                self.name,
                self.store.location()
            ),
        )
        .with_source(err)
    }

    /// Proves the repository is there to answer: its marker can be read. A store lacking a
    /// key says the key is missing only when it holds its marker: an unmounted path, a
    /// bucket emptied or a prefix mistyped lack everything, and must not read as "not there".
    pub async fn check_present(&self) -> Result<()> {
        match storage::get_bytes(self.store.as_ref(), layout::MARKER_KEY).await {
            Ok(_) => Ok(()),
            Err(e) if e.is_not_found() => Err(Error::new(
                ErrorKind::Storage,
                format!(
                    "repository '{}' ({}) holds no marker '{}': it is not mounted, not made yet, or not this repository",
                    self.name,
                    self.store.location(),
                    layout::MARKER_KEY
                ),
            )
            .with_hint(
                "mount it, or check its path (bucket, prefix) in the config; the first backup into a config's repositories writes their markers",
            )
            .with_hint(
                "if another repository of the config holds its marker, this one was wiped: `lifeboat replicate --reseed` fills it",
            )),
            Err(e) => Err(self.error(&format!("read marker '{}'", layout::MARKER_KEY), e)),
        }
    }

    /// Whether the repository holds its marker (checked: lifeboat's, of a format this
    /// lifeboat reads).
    pub async fn has_marker(&self) -> Result<bool> {
        match storage::get_bytes(self.store.as_ref(), layout::MARKER_KEY).await {
            Ok(bytes) => self.check_marker(&bytes).map(|()| true),
            Err(e) if e.is_not_found() => Ok(false),
            Err(e) => Err(self.error(&format!("read marker '{}'", layout::MARKER_KEY), e)),
        }
    }

    /// Writes a new marker where there is none (another run may have made it meanwhile).
    pub async fn write_marker(&self) -> Result<()> {
        let marker = Marker {
            format: MARKER_FORMAT,
            created_at: Utc::now(),
            created_by: format!("lifeboat {}", env!("CARGO_PKG_VERSION")),
        };
        let body = Bytes::from(serde_json::to_vec_pretty(&marker).expect("marker serializes"));
        match self.store.create_if_absent(layout::MARKER_KEY, body).await {
            Ok(()) => Ok(()),
            Err(StoreError::AlreadyExists { .. }) => match self.has_marker().await? {
                true => Ok(()),
                false => Err(self.error(
                    &format!("write marker '{}'", layout::MARKER_KEY),
                    StoreError::NotFound {
                        key: layout::MARKER_KEY.to_string(),
                    },
                )),
            },
            Err(e) => Err(self.error(&format!("write marker '{}'", layout::MARKER_KEY), e)),
        }
    }

    /// Refuses a marker that is not lifeboat's, or of a newer format than this lifeboat's.
    fn check_marker(&self, bytes: &[u8]) -> Result<()> {
        let existing: Marker = serde_json::from_slice(bytes).map_err(|e| {
            Error::new(
                ErrorKind::Verification,
                format!(
                    "unable to read marker '{}' in repository '{}': {e}",
                    layout::MARKER_KEY,
                    self.name
                ),
            )
            .with_hint("the repository location holds something that is not a lifeboat repository")
        })?;
        if existing.format > MARKER_FORMAT {
            return Err(Error::new(
                ErrorKind::Storage,
                format!(
                    "unable to use repository '{}': it has format {} and lifeboat {} supports {MARKER_FORMAT}",
                    self.name,
                    existing.format,
                    env!("CARGO_PKG_VERSION")
                ),
            )
            .with_hint("upgrade lifeboat on this host"));
        }
        Ok(())
    }

    /// The record of the cluster whose WAL `job` archives here, if one was made.
    pub async fn cluster_record(&self, job: &str) -> Result<Option<ClusterRecord>> {
        let key = layout::cluster_record_key(job);
        // A record is a few hundred bytes; a larger object is no record, and is not read whole.
        let bytes = match storage::get_range_bytes(
            self.store.as_ref(),
            &key,
            Some(0..CLUSTER_RECORD_LIMIT + 1),
        )
        .await
        {
            Ok(bytes) => bytes,
            Err(e) if e.is_not_found() => return Ok(None),
            Err(e) => return Err(self.error(&format!("read the cluster record '{key}'"), e)),
        };
        let parsed = match bytes.len() as u64 > CLUSTER_RECORD_LIMIT {
            true => Err(format!("it is over {CLUSTER_RECORD_LIMIT} bytes")),
            false => serde_json::from_slice(&bytes).map_err(|e| e.to_string()),
        };
        parsed.map(Some).map_err(|e| {
            Error::new(
                ErrorKind::Verification,
                format!(
                    "unable to read the cluster record '{key}' in repository '{}': {e}",
                    self.name
                ),
            )
            .with_hint(format!(
                "it names the cluster job '{job}' archives; remove it and the next backup or wal-push of the job records it again"
            ))
        })
    }

    /// Records `record` as the cluster `job` archives unless a record is there already, and
    /// returns the one the repository holds: two hosts writing at once keep the first.
    pub async fn keep_cluster_record(
        &self,
        job: &str,
        record: &ClusterRecord,
    ) -> Result<ClusterRecord> {
        if let Some(held) = self.cluster_record(job).await? {
            return Ok(held);
        }
        let key = layout::cluster_record_key(job);
        let body = Bytes::from(serde_json::to_vec_pretty(record).expect("record serializes"));
        match self.store.create_if_absent(&key, body).await {
            Ok(()) => Ok(record.clone()),
            Err(StoreError::AlreadyExists { .. }) => Ok(self
                .cluster_record(job)
                .await?
                .unwrap_or_else(|| record.clone())),
            Err(e) => Err(self.error(&format!("write the cluster record '{key}'"), e)),
        }
    }

    /// Records that prune removed a backup of `job`. Replaces an earlier record of it.
    pub async fn write_tombstone(&self, job: &str, tombstone: &Tombstone) -> Result<()> {
        let key = layout::removed_key(job, &tombstone.id);
        let body = Bytes::from(serde_json::to_vec_pretty(tombstone).expect("tombstone serializes"));
        storage::put_bytes(self.store.as_ref(), &key, body)
            .await
            .map(|_| ())
            .map_err(|e| self.error(&format!("write the removal record '{key}'"), e))
    }

    /// The removal record of `job/id`, if it reads as one: a record that does not (empty,
    /// garbage, naming another backup) is no record.
    pub async fn read_tombstone(&self, job: &str, id: &str) -> Option<Tombstone> {
        let key = layout::removed_key(job, id);
        let bytes = storage::get_range_bytes(self.store.as_ref(), &key, Some(0..TOMBSTONE_LIMIT))
            .await
            .ok()?;
        serde_json::from_slice::<Tombstone>(&bytes)
            .ok()
            .filter(|tombstone| tombstone.id == id)
    }

    /// The backups of `job` prune removed, by id, with when the record was written: from
    /// one listing, since a key names its backup (what a record says is detail for people).
    pub async fn tombstones(&self, job: &str) -> Result<BTreeMap<String, Option<DateTime<Utc>>>> {
        let prefix = layout::removed_prefix(job);
        let listed = self
            .store
            .list(&prefix)
            .await
            .map_err(|e| self.error(&format!("list the removal records '{prefix}'"), e))?;
        Ok(listed
            .into_iter()
            .filter_map(|object| {
                let id = object
                    .key
                    .strip_prefix(&prefix)?
                    .strip_suffix(".json")
                    .filter(|id| layout::parse_backup_id(id).is_some())?
                    .to_string();
                Some((id, object.last_modified))
            })
            .collect())
    }

    /// Ids of the committed backups of `job`, newest first. Directories without a
    /// manifest are interrupted attempts and are not backups.
    pub async fn backup_ids(&self, job: &str) -> Result<Vec<String>> {
        let prefix = layout::backups_prefix(job);
        let objects = self
            .store
            .list(&prefix)
            .await
            .map_err(|e| self.error(&format!("list backups of job '{job}'"), e))?;
        let mut ids: Vec<String> = objects
            .iter()
            .filter_map(|o| layout::manifest_backup_id(job, &o.key).map(str::to_string))
            .collect();
        ids.sort_unstable_by(|a, b| b.cmp(a));
        Ok(ids)
    }

    /// The signature beside `key`, if there is one.
    pub async fn signature_of(&self, key: &str) -> Result<Option<Bytes>> {
        let signature = crate::signing::signature_key(key);
        match storage::get_range_bytes(
            self.store.as_ref(),
            &signature,
            Some(0..crate::signing::SIGNATURE_LIMIT),
        )
        .await
        {
            Ok(bytes) => Ok(Some(bytes)),
            Err(e) if e.is_not_found() => Ok(None),
            Err(e) => Err(self.error(&format!("read signature '{signature}'"), e)),
        }
    }

    /// `bytes`, read as the manifest of `job/id`, once its signature is checked (where
    /// `trusted_signers` asks for one) and it names that backup: a manifest copied under
    /// another id or job (a replay) is not that backup. The error says why not.
    pub async fn trusted_manifest(
        &self,
        job: &str,
        id: &str,
        bytes: &[u8],
    ) -> std::result::Result<Manifest, String> {
        let key = layout::manifest_key(job, id);
        if bytes.len() as u64 > MANIFEST_LIMIT {
            return Err(format!(
                "it is over {} (no manifest lifeboat writes is)",
                crate::human::human_size(MANIFEST_LIMIT)
            ));
        }
        if self.trust.required() {
            let signature = self.signature_of(&key).await.map_err(|e| e.to_string())?;
            self.trust
                .check(bytes, signature.as_deref(), &key)
                .map_err(|untrusted| untrusted.to_string())?;
        }
        let manifest = Manifest::from_json(bytes)?;
        if manifest.job != job || manifest.id != id {
            return Err(format!(
                "it describes backup '{}/{}', not the one its key names",
                manifest.job, manifest.id
            ));
        }
        Ok(manifest)
    }

    /// The bytes of the manifest of `job/id`, read no further than any manifest lifeboat
    /// writes can be long: a larger object (planted, or damaged) is read only that far, and
    /// `trusted_manifest` refuses it.
    pub async fn manifest_bytes(
        &self,
        job: &str,
        id: &str,
    ) -> std::result::Result<Bytes, storage::StoreError> {
        let key = layout::manifest_key(job, id);
        storage::get_range_bytes(self.store.as_ref(), &key, Some(0..MANIFEST_LIMIT + 1)).await
    }

    pub async fn read_manifest(&self, job: &str, id: &str) -> Result<Manifest> {
        let key = layout::manifest_key(job, id);
        let bytes = self
            .manifest_bytes(job, id)
            .await
            .map_err(|e| self.error(&format!("read manifest '{key}'"), e))?;
        self.trusted_manifest(job, id, &bytes)
            .await
            .map_err(|problem| {
                Error::new(
                    ErrorKind::Verification,
                    format!(
                        "unable to read manifest '{key}' in repository '{}': {problem}",
                        self.name
                    ),
                )
                .with_hint(format!(
                    "run `lifeboat verify {job} --from {}` to list damaged backups",
                    self.name
                ))
            })
    }

    /// Writes the manifest: the commit point. Never replaces a committed manifest. Signed by
    /// `signer` when given: the signature is written first, so a committed manifest always
    /// has it.
    pub async fn commit_manifest(
        &self,
        manifest: &Manifest,
        signer: Option<&crate::signing::Signer>,
    ) -> Result<()> {
        let key = layout::manifest_key(&manifest.job, &manifest.id);
        let bytes = Bytes::from(manifest.to_json());
        self.write_signature(&key, &bytes, signer, false).await?;
        self.store
            .create_if_absent(&key, bytes)
            .await
            .map_err(|e| self.error(&format!("write manifest '{key}'"), e))
    }

    /// Replaces the committed manifest of a backup: `rekey` only, once every object the
    /// new one names is stored and checked. A reader sees the old manifest or the new one,
    /// and both point to objects that are there. Without `signer`, a signature of the old
    /// manifest is removed: it no longer matches.
    pub async fn replace_manifest(
        &self,
        manifest: &Manifest,
        signer: Option<&crate::signing::Signer>,
    ) -> Result<()> {
        let key = layout::manifest_key(&manifest.job, &manifest.id);
        let bytes = Bytes::from(manifest.to_json());
        self.write_signature(&key, &bytes, signer, true).await?;
        storage::put_bytes(self.store.as_ref(), &key, bytes)
            .await
            .map_err(|e| self.error(&format!("replace manifest '{key}'"), e))?;
        if signer.is_none() {
            let signature = crate::signing::signature_key(&key);
            self.store
                .delete_unless_retained(&signature)
                .await
                .map_err(|e| self.error(&format!("remove the stale signature '{signature}'"), e))?;
        }
        Ok(())
    }

    /// Writes `signer`'s signature of `bytes`, the object at `key`, beside it: replacing one
    /// there only when `replace` (a rekeyed manifest), so that a run which lost its claim
    /// cannot overwrite a committed backup's signature.
    async fn write_signature(
        &self,
        key: &str,
        bytes: &[u8],
        signer: Option<&crate::signing::Signer>,
        replace: bool,
    ) -> Result<()> {
        let Some(signer) = signer else {
            return Ok(());
        };
        let signature = crate::signing::signature_key(key);
        let signed = Bytes::from(signer.sign(bytes, key)?);
        let written = match replace {
            true => storage::put_bytes(self.store.as_ref(), &signature, signed)
                .await
                .map(|_| ()),
            false => self.store.create_if_absent(&signature, signed).await,
        };
        written.map_err(|e| self.error(&format!("write signature '{signature}'"), e))
    }

    /// Copies the signature of the object at `key` from `source`, if it has one.
    pub async fn copy_signature_from(&self, source: &Repository, key: &str) -> Result<()> {
        let Some(signed) = source.signature_of(key).await? else {
            return Ok(());
        };
        let signature = crate::signing::signature_key(key);
        storage::put_bytes(self.store.as_ref(), &signature, signed)
            .await
            .map(|_| ())
            .map_err(|e| self.error(&format!("write signature '{signature}'"), e))
    }

    pub async fn open_object(&self, job: &str, id: &str, object: &str) -> Result<ByteStream> {
        let key = layout::object_key(job, id, object);
        self.store
            .get(&key, None)
            .await
            .map_err(|e| self.error(&format!("read object '{key}'"), e))
    }

    /// Resolves "latest" or an id to the id of a committed backup of `job`.
    pub async fn resolve_backup(&self, job: &str, wanted: &str) -> Result<String> {
        let ids = self.backup_ids(job).await?;
        let found = if wanted == "latest" {
            ids.first().cloned()
        } else {
            ids.iter().find(|id| *id == wanted).cloned()
        };
        found.ok_or_else(|| {
            Error::new(
                ErrorKind::NotFound,
                format!(
                    "unable to find backup '{wanted}' of job '{job}' in repository '{}'",
                    self.name
                ),
            )
            .with_hint(format!(
                "run `lifeboat list {job}` to see the backups each repository holds"
            ))
        })
    }
}
