//! `[[repository]]`: where backups are stored, and how each store is reached.

use std::collections::HashSet;
use std::path::PathBuf;
use std::time::Duration;

use super::values::{duration_field, human_bytes, parse_size};
use super::{Problem, raw, validate_name};

const MIN_PART_SIZE: u64 = 5 * 1024 * 1024;
const MAX_PART_SIZE: u64 = 5 * 1024 * 1024 * 1024;
const DEFAULT_PART_SIZE: u64 = 8 * 1024 * 1024;
const DEFAULT_PARTS_IN_FLIGHT: usize = 4;
/// Ranged GETs of one object in flight: one S3 stream gets 50-200 MB/s, so a terabyte read
/// through one takes the whole RTO budget.
const DEFAULT_DOWNLOAD_CONCURRENCY: usize = 8;
/// The most a backup's uploads hold in memory at once: `part_size × parts_in_flight`,
/// summed over the S3 repositories it writes to at the same time.
const MAX_UPLOAD_MEMORY: u64 = 8 * 1024 * 1024 * 1024;
const DEFAULT_MAX_ATTEMPTS: u32 = 5;
#[derive(Debug, Clone)]
pub struct RepositoryConfig {
    pub name: String,
    pub location: Location,
}

#[derive(Debug, Clone)]
pub enum Location {
    Local { path: PathBuf },
    S3(Box<S3Settings>),
}

impl Location {
    /// Whether two locations are one storage: the same bucket and prefix at the same
    /// endpoint, or the same directory however it is spelled (and, where both exist, after
    /// symlinks).
    pub fn same_storage(&self, other: &Location) -> bool {
        match (self, other) {
            (Location::Local { path: a }, Location::Local { path: b }) => {
                a.components().eq(b.components())
                    || matches!(
                        (std::fs::canonicalize(a), std::fs::canonicalize(b)),
                        (Ok(a), Ok(b)) if a == b
                    )
            }
            (Location::S3(a), Location::S3(b)) => {
                let endpoint = |s: &S3Settings| {
                    s.endpoint
                        .as_deref()
                        .map(|e| e.trim_end_matches('/').to_ascii_lowercase())
                };
                let prefix = |s: &S3Settings| {
                    s.prefix
                        .split('/')
                        .filter(|part| !part.is_empty())
                        .map(str::to_string)
                        .collect::<Vec<_>>()
                };
                a.bucket == b.bucket
                    && prefix(a) == prefix(b)
                    && endpoint(a) == endpoint(b)
                    && (a.endpoint.is_some() || a.region == b.region)
            }
            _ => false,
        }
    }

    /// Where it is, for messages: a path, or `s3://bucket/prefix`.
    pub fn describe(&self) -> String {
        match self {
            Location::Local { path } => format!("'{}'", path.display()),
            Location::S3(s3) => format!("s3://{}/{}", s3.bucket, s3.prefix),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestChecksums {
    /// Only the checksums lifeboat computes itself (sha256 per part) are sent.
    WhenRequired,
    /// Also the SDK's default checksum trailers; some S3-compatible servers reject these.
    WhenSupported,
}

#[derive(Debug, Clone)]
pub struct S3Settings {
    pub bucket: String,
    /// Empty, or ends without a slash: keys are `PREFIX/...`.
    pub prefix: String,
    pub region: String,
    pub endpoint: Option<String>,
    pub path_style: bool,
    pub profile: Option<String>,
    pub part_size: u64,
    pub parts_in_flight: usize,
    /// A large object is read as this many ranged GETs of `part_size` in flight, and
    /// reassembled in order: a download holds at most `part_size × download_concurrency`.
    pub download_concurrency: usize,
    pub max_attempts: u32,
    /// How long one attempt of a request may take, its body included, before it is retried.
    pub attempt_timeout: Duration,
    /// How long a download may receive nothing before it is abandoned as stalled.
    pub stall_timeout: Duration,
    pub request_checksums: RequestChecksums,
    /// Backups and WAL written with a retain-until date, so that a stolen credential cannot
    /// delete or overwrite them before it passes.
    pub object_lock: Option<ObjectLock>,
    /// Server-side encryption asked of S3 for every object written.
    pub sse: Option<ServerSideEncryption>,
}

/// S3 server-side encryption, passed through as `x-amz-server-side-encryption` (and the
/// KMS key id): the bucket's keys at rest, on top of (or instead of) lifeboat's own age.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerSideEncryption {
    /// "AES256", "aws:kms" or "aws:kms:dsse".
    pub algorithm: String,
    pub kms_key_id: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ObjectLockMode {
    /// Users with `s3:BypassGovernanceRetention` can still remove objects.
    Governance,
    /// Nobody, not even the account root, can remove objects before the date.
    Compliance,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ObjectLock {
    pub mode: ObjectLockMode,
    pub days: u32,
}

/// Every `[[repository]]`: each valid, named once, storing somewhere of its own, and
/// together within the memory a backup may hold for its uploads.
pub(super) fn validate_all(raw: Vec<raw::RawRepository>) -> Result<Vec<RepositoryConfig>, Problem> {
    if raw.is_empty() {
        return Err("repository: at least one [[repository]] is required".into());
    }
    let mut names = HashSet::new();
    let mut repositories = Vec::new();
    for (index, repo) in raw.into_iter().enumerate() {
        let repository = validate_repository(index, repo)?;
        if !names.insert(repository.name.clone()) {
            return Err(format!(
                "repository[{index}].name: duplicate repository name \"{}\"",
                repository.name
            ));
        }
        repositories.push(repository);
    }

    // One storage under two names would count one copy as two, and every backup would
    // report the second as missing.
    for (index, repository) in repositories.iter().enumerate() {
        for earlier in &repositories[..index] {
            if earlier.location.same_storage(&repository.location) {
                return Err(format!(
                    "repository[{index}] ({}): stores where repository '{}' stores ({}); one storage listed twice would count one copy as two: keep one",
                    repository.name,
                    earlier.name,
                    repository.location.describe()
                ));
            }
        }
    }
    let held: Vec<(String, u64, usize)> = repositories
        .iter()
        .filter_map(|r| match &r.location {
            Location::S3(s3) => Some((r.name.clone(), s3.part_size, s3.parts_in_flight)),
            Location::Local { .. } => None,
        })
        .collect();
    let total: u64 = held
        .iter()
        .map(|(_, size, count)| size.saturating_mul(*count as u64))
        .sum();
    if total > MAX_UPLOAD_MEMORY {
        let terms: Vec<String> = held
            .iter()
            .map(|(name, size, count)| format!("{} × {count} ('{name}')", human_bytes(*size)))
            .collect();
        return Err(format!(
            "repository: part_size × parts_in_flight over the S3 repositories is {} = {}, more than the {} a backup may hold in memory for its uploads; lower part_size or parts_in_flight",
            terms.join(" + "),
            human_bytes(total),
            human_bytes(MAX_UPLOAD_MEMORY)
        ));
    }

    Ok(repositories)
}

fn validate_repository(
    index: usize,
    repo: raw::RawRepository,
) -> Result<RepositoryConfig, Problem> {
    let label = repo.name.clone();
    let at = move |field: &str| match &label {
        Some(name) => format!("repository[{index}] ({name}).{field}"),
        None => format!("repository[{index}].{field}"),
    };
    let name = repo
        .name
        .clone()
        .ok_or_else(|| format!("{}: is required", at("name")))?;
    validate_name(&at("name"), &name)?;
    let kind = repo
        .r#type
        .clone()
        .ok_or_else(|| format!("{}: is required (\"s3\" or \"local\")", at("type")))?;

    let s3_only = [
        ("bucket", repo.bucket.is_some()),
        ("prefix", repo.prefix.is_some()),
        ("region", repo.region.is_some()),
        ("endpoint", repo.endpoint.is_some()),
        ("path_style", repo.path_style.is_some()),
        ("profile", repo.profile.is_some()),
        ("part_size", repo.part_size.is_some()),
        ("parts_in_flight", repo.parts_in_flight.is_some()),
        ("download_concurrency", repo.download_concurrency.is_some()),
        ("max_attempts", repo.max_attempts.is_some()),
        ("attempt_timeout", repo.attempt_timeout.is_some()),
        ("stall_timeout", repo.stall_timeout.is_some()),
        ("request_checksums", repo.request_checksums.is_some()),
        ("object_lock", repo.object_lock.is_some()),
        ("sse", repo.sse.is_some()),
        ("sse_kms_key_id", repo.sse_kms_key_id.is_some()),
    ];
    let location = match kind.as_str() {
        "local" => {
            if let Some((field, _)) = s3_only.iter().find(|(_, set)| *set) {
                return Err(format!("{}: only valid for type = \"s3\"", at(field)));
            }
            let path = repo
                .path
                .ok_or_else(|| format!("{}: is required for type = \"local\"", at("path")))?;
            if !path.is_absolute() {
                return Err(format!(
                    "{}: must be an absolute path (got \"{}\")",
                    at("path"),
                    path.display()
                ));
            }
            // A file where the repository should be: every write would fail deep in a run.
            if std::fs::metadata(&path).is_ok_and(|meta| meta.is_file()) {
                return Err(format!(
                    "{}: '{}' is a file, not a directory",
                    at("path"),
                    path.display()
                ));
            }
            Location::Local { path }
        }
        "s3" => s3_location(repo, &at)?,
        other => {
            return Err(format!(
                "{}: must be \"s3\" or \"local\" (got \"{other}\")",
                at("type")
            ));
        }
    };
    Ok(RepositoryConfig { name, location })
}

/// An S3 repository's settings, each within what S3 and a backup's memory allow.
fn s3_location(repo: raw::RawRepository, at: &dyn Fn(&str) -> String) -> Result<Location, Problem> {
    if repo.path.is_some() {
        return Err(format!("{}: only valid for type = \"local\"", at("path")));
    }
    let bucket = repo
        .bucket
        .ok_or_else(|| format!("{}: is required for type = \"s3\"", at("bucket")))?;
    if bucket.trim().is_empty() {
        return Err(format!("{}: must not be empty", at("bucket")));
    }
    let region = repo
        .region
        .ok_or_else(|| format!("{}: is required for type = \"s3\"", at("region")))?;
    if region.trim().is_empty() {
        return Err(format!("{}: must not be empty", at("region")));
    }
    let prefix = repo
        .prefix
        .unwrap_or_default()
        .trim_matches('/')
        .to_string();
    if prefix.split('/').any(|part| part == ".." || part == ".") {
        return Err(format!(
            "{}: must not contain '.' or '..' segments (got \"{prefix}\")",
            at("prefix")
        ));
    }
    if let Some(endpoint) = &repo.endpoint {
        validate_endpoint(&at("endpoint"), endpoint)?;
    }
    let part_size = match repo.part_size.as_deref() {
        None => DEFAULT_PART_SIZE,
        Some(text) => parse_size(&at("part_size"), text)?,
    };
    if part_size < MIN_PART_SIZE {
        return Err(format!(
            "{}: must be at least 5 MiB (got {part_size})",
            at("part_size")
        ));
    }
    if part_size > MAX_PART_SIZE {
        return Err(format!(
            "{}: must be at most 5 GiB (got {part_size})",
            at("part_size")
        ));
    }
    let parts_in_flight = repo.parts_in_flight.unwrap_or(DEFAULT_PARTS_IN_FLIGHT);
    if !(1..=64).contains(&parts_in_flight) {
        return Err(format!(
            "{}: must be between 1 and 64 (got {parts_in_flight})",
            at("parts_in_flight")
        ));
    }
    let download_concurrency = repo
        .download_concurrency
        .unwrap_or(DEFAULT_DOWNLOAD_CONCURRENCY);
    if !(1..=64).contains(&download_concurrency) {
        return Err(format!(
            "{}: must be between 1 and 64 (got {download_concurrency})",
            at("download_concurrency")
        ));
    }
    let max_attempts = repo.max_attempts.unwrap_or(DEFAULT_MAX_ATTEMPTS);
    if !(1..=20).contains(&max_attempts) {
        return Err(format!(
            "{}: must be between 1 and 20 (got {max_attempts})",
            at("max_attempts")
        ));
    }
    // A part of 5 GiB at 20 MiB/s takes over four minutes.
    let attempt_timeout = duration_field(
        &at("attempt_timeout"),
        repo.attempt_timeout.as_deref(),
        "5min",
    )?;
    let stall_timeout =
        duration_field(&at("stall_timeout"), repo.stall_timeout.as_deref(), "2min")?;
    let request_checksums = match repo.request_checksums.as_deref() {
        None | Some("when_required") => RequestChecksums::WhenRequired,
        Some("when_supported") => RequestChecksums::WhenSupported,
        Some(other) => {
            return Err(format!(
                "{}: must be \"when_required\" or \"when_supported\" (got \"{other}\")",
                at("request_checksums")
            ));
        }
    };
    let object_lock = repo
        .object_lock
        .map(|lock| validate_object_lock(&at("object_lock"), lock))
        .transpose()?;
    let sse = server_side_encryption(repo.sse, repo.sse_kms_key_id, at)?;
    Ok(Location::S3(Box::new(S3Settings {
        bucket,
        prefix,
        region,
        endpoint: repo.endpoint,
        path_style: repo.path_style.unwrap_or(false),
        profile: repo.profile,
        part_size,
        parts_in_flight,
        download_concurrency,
        max_attempts,
        attempt_timeout,
        stall_timeout,
        request_checksums,
        object_lock,
        sse,
    })))
}

/// `sse` and `sse_kms_key_id`: the server-side encryption S3 applies to what is stored.
fn server_side_encryption(
    sse: Option<String>,
    kms_key_id: Option<String>,
    at: &dyn Fn(&str) -> String,
) -> Result<Option<ServerSideEncryption>, Problem> {
    Ok(match (sse, kms_key_id) {
        (None, None) => None,
        (None, Some(_)) => {
            return Err(format!(
                "{}: only valid with sse = \"aws:kms\" or \"aws:kms:dsse\"",
                at("sse_kms_key_id")
            ));
        }
        (Some(algorithm), kms_key_id) => {
            if !["AES256", "aws:kms", "aws:kms:dsse"].contains(&algorithm.as_str()) {
                return Err(format!(
                    "{}: must be \"AES256\", \"aws:kms\" or \"aws:kms:dsse\" (got \"{algorithm}\")",
                    at("sse")
                ));
            }
            if kms_key_id.is_some() && algorithm == "AES256" {
                return Err(format!(
                    "{}: only valid with sse = \"aws:kms\" or \"aws:kms:dsse\"",
                    at("sse_kms_key_id")
                ));
            }
            Some(ServerSideEncryption {
                algorithm,
                kms_key_id,
            })
        }
    })
}

fn validate_object_lock(field: &str, lock: raw::RawObjectLock) -> Result<ObjectLock, Problem> {
    let mode = match lock.mode.as_deref() {
        Some("governance") => ObjectLockMode::Governance,
        Some("compliance") => ObjectLockMode::Compliance,
        Some(other) => {
            return Err(format!(
                "{field}.mode: must be \"governance\" or \"compliance\" (got \"{other}\")"
            ));
        }
        None => {
            return Err(format!(
                "{field}.mode: is required (\"governance\" or \"compliance\")"
            ));
        }
    };
    let days = lock
        .days
        .ok_or_else(|| format!("{field}.days: is required (days each backup stays locked)"))?;
    if !(1..=36_500).contains(&days) {
        return Err(format!(
            "{field}.days: must be between 1 and 36500 (got {days})"
        ));
    }
    Ok(ObjectLock {
        mode,
        days: days as u32,
    })
}

/// TLS is not optional off this machine: plain http is accepted for loopback endpoints only,
/// which is where S3-compatible test servers and local gateways live. The endpoint is read
/// with a URL parser, as the HTTP client reads it, so that the host judged is the host
/// connected to: `http://127.0.0.1:9000@192.0.2.2` names 192.0.2.2, with a user and password
/// before it. Credentials never go in the endpoint (the AWS chain supplies them).
fn validate_endpoint(field: &str, endpoint: &str) -> Result<(), Problem> {
    // Echoed in errors only when nothing in it can be a password.
    let shown = match endpoint.contains(['@', '?', '#']) {
        true => "an endpoint with '@', '?' or '#' in it, not repeated here: it may hold a secret"
            .to_string(),
        false => format!("\"{endpoint}\""),
    };
    let url = url::Url::parse(endpoint).map_err(|e| {
        format!("{field}: must be a URL such as \"https://s3.example.com\" (got {shown}: {e})")
    })?;
    if !url.username().is_empty() || url.password().is_some() {
        // Named without what stands before '@': it may be a secret.
        let mut shown = url.clone();
        let _ = shown.set_username("");
        let _ = shown.set_password(None);
        return Err(format!(
            "{field}: must not hold a user or password (it holds something before '@', and would reach \"{shown}\", whose host is \"{}\"); the AWS credential chain supplies credentials",
            url.host_str().unwrap_or_default()
        ));
    }
    if url.query().is_some() || url.fragment().is_some() {
        return Err(format!(
            "{field}: must not have a query or fragment (got {shown})"
        ));
    }
    let Some(host) = url.host() else {
        return Err(format!("{field}: has no host (got \"{endpoint}\")"));
    };
    let loopback = match host {
        url::Host::Domain(name) => name == "localhost",
        url::Host::Ipv4(ip) => ip.is_loopback(),
        url::Host::Ipv6(ip) => ip.is_loopback(),
    };
    match url.scheme() {
        "https" => Ok(()),
        "http" if loopback => Ok(()),
        "http" => Err(format!(
            "{field}: plain http is only allowed for loopback endpoints; use https (got \"{endpoint}\")"
        )),
        _ => Err(format!(
            "{field}: scheme must be https (got \"{endpoint}\")"
        )),
    }
}
