//! Claims: how a run makes a backup id its own before it writes anything under it, so that two
//! runs of one job (two hosts, two config files, no shared lock) never write into one backup.
//!
//! A claim is a small record at `jobs/JOB/claims/ID.json`, created only if absent. The run that
//! creates it owns the id in that repository; the other one moves on to the next second. A
//! store that does not honour conditional create (Garage ignores `If-None-Match`) is found out
//! by the claim itself: creating it a second time succeeds. There a run cannot own an id, so
//! its objects go under names no other run uses (`app.dump.zst.runTAG`) and its claim and
//! manifest are read back before it counts the backup as committed; the other run's objects
//! are never touched either way. Claims are removed once the backup is committed or has
//! failed; one left by a killed run is removed by `prune` after its grace period.
//!
//! None of this depends on a lock or a clock: the per-host lock and `lock = "redis://…"` only
//! keep runs from waiting on each other.

use bytes::Bytes;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::error::{Error, ErrorKind, Result};
use crate::layout;
use crate::repository::Repository;
use crate::storage::{self, StoreError};

/// The most a claim record may be.
const CLAIM_LIMIT: u64 = 16 * 1024;

/// What a claim says: which run holds the id.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claim {
    pub id: String,
    pub host: String,
    /// Random and unique to the run: what tells two runs of one host apart.
    pub run: String,
    pub claimed_at: DateTime<Utc>,
    /// The claiming process, so that `prune` on the same host can tell a run that was killed
    /// from one still writing (0 when unknown).
    #[serde(default)]
    pub pid: u32,
}

/// How a claim in one repository went.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Claimed {
    /// The id is this run's there. `exclusive` is false where the store let the claim be
    /// created twice: another run may believe the same.
    Won { exclusive: bool },
    /// Another run holds it (`by`, when its claim reads), or a backup or an interrupted
    /// attempt is already stored under it.
    Taken { by: Option<Claim> },
}

impl Claim {
    pub fn new(id: &str, host: &str, run: &str, at: DateTime<Utc>) -> Claim {
        Claim {
            id: id.to_string(),
            host: host.to_string(),
            run: run.to_string(),
            claimed_at: at,
            pid: std::process::id(),
        }
    }

    /// Whether the claiming run is known to be gone: it ran on `this_host` and its process
    /// no longer exists. A run on another host is never known to be gone.
    pub fn run_is_gone(&self, this_host: &str) -> bool {
        if self.host != this_host || self.pid == 0 {
            return false;
        }
        // SAFETY: kill(2) with signal 0 sends nothing; it only asks whether the pid exists.
        let alive = unsafe { libc::kill(self.pid as libc::pid_t, 0) } == 0
            || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM);
        !alive
    }

    fn to_bytes(&self) -> Bytes {
        Bytes::from(serde_json::to_vec_pretty(self).expect("claims serialize"))
    }
}

impl Repository {
    /// Claims `claim.id` for `job` in this repository (see the module comment).
    pub async fn claim(&self, job: &str, claim: &Claim) -> Result<Claimed> {
        let key = layout::claim_key(job, &claim.id);
        match self.store.create_if_absent(&key, claim.to_bytes()).await {
            Ok(()) => {}
            Err(StoreError::AlreadyExists { .. }) => {
                return Ok(Claimed::Taken {
                    by: self.read_claim(job, &claim.id).await,
                });
            }
            Err(e) => return Err(self.error(&format!("claim backup id '{key}'"), e)),
        }
        let exclusive = match self.store.create_if_absent(&key, claim.to_bytes()).await {
            Err(StoreError::AlreadyExists { .. }) => true,
            Ok(()) => false,
            Err(e) => {
                // The claim is there (a full disk fails the second write): not left behind.
                self.release_claim(job, claim).await;
                return Err(self.error(&format!("claim backup id '{key}'"), e));
            }
        };
        if !exclusive {
            let held = self.read_claim(job, &claim.id).await;
            if held.as_ref() != Some(claim) {
                return Ok(Claimed::Taken { by: held });
            }
        }
        // A backup, or an attempt, stored under the id before claims, or before its run
        // released the claim: the id is not free.
        let prefix = layout::backup_prefix(job, &claim.id);
        let stored = self
            .store
            .list_page(&prefix, None, 1)
            .await
            .map_err(|e| self.error(&format!("list '{prefix}'"), e))?;
        if !stored.is_empty() {
            self.release_claim(job, claim).await;
            return Ok(Claimed::Taken { by: None });
        }
        Ok(Claimed::Won { exclusive })
    }

    /// The claim this repository holds for `job/id`, if one reads.
    pub async fn read_claim(&self, job: &str, id: &str) -> Option<Claim> {
        let key = layout::claim_key(job, id);
        let bytes = storage::get_range_bytes(self.store.as_ref(), &key, Some(0..CLAIM_LIMIT))
            .await
            .ok()?;
        serde_json::from_slice::<Claim>(&bytes)
            .ok()
            .filter(|held| held.id == id)
    }

    /// Whether the claim of `claim.id` is still `claim`: on a store that does not honour
    /// conditional create, another run may have replaced it.
    pub async fn still_claimed(&self, job: &str, claim: &Claim) -> bool {
        self.read_claim(job, &claim.id).await.as_ref() == Some(claim)
    }

    /// Removes the claim if it is still this run's. Best effort: a claim left behind only
    /// keeps its id from being used again, and `prune` removes it.
    pub async fn release_claim(&self, job: &str, claim: &Claim) {
        if !self.still_claimed(job, claim).await {
            return;
        }
        let key = layout::claim_key(job, &claim.id);
        // Every version of it, where the bucket keeps versions: a claim is no history.
        if let Err(e) = self.store.delete_unless_retained(&key).await {
            tracing::warn!(repository = %self.name, key = %key, error = %e, "unable to remove the claim of a backup id; prune removes it");
        }
    }

    /// The claims this repository holds for `job`: key and when it was written.
    pub async fn claims(&self, job: &str) -> Result<Vec<(String, Option<DateTime<Utc>>)>> {
        let prefix = layout::claims_prefix(job);
        let listed = self
            .store
            .list(&prefix)
            .await
            .map_err(|e| self.error(&format!("list the claims '{prefix}'"), e))?;
        Ok(listed
            .into_iter()
            .map(|object| (object.key, object.last_modified))
            .collect())
    }
}

/// The error for a backup id another run took in `repository` while this run wrote under it.
pub fn conflict(job: &str, id: &str, repository: &str, by: Option<&Claim>) -> Error {
    let who = by.map_or_else(
        || "another run".to_string(),
        |claim| format!("a run on host '{}' ({})", claim.host, claim.run),
    );
    Error::new(
        ErrorKind::Storage,
        format!(
            "backup '{job}/{id}' was claimed by {who} in repository '{repository}' at the same time; this run's backup is not committed there"
        ),
    )
    .with_hint(
        "this repository does not honour conditional create, so two runs of one job must not start in the same second: take `lock = \"redis://…\"`, or run again",
    )
}
