//! A repository in an S3 bucket (AWS or an S3-compatible server). The only module that
//! knows aws-sdk-s3.
//!
//! Integrity does not depend on the server's defaults: the SDK's own checksum trailers are
//! off unless configured (some S3-compatible servers reject aws-chunked trailers, others store
//! them as data), and lifeboat sends the SHA-256 of every PutObject body and every part as an
//! `x-amz-checksum-sha256` value, which the server must verify before it accepts the bytes.
//! Transient errors are retried by the SDK's standard retry strategy, which classifies by
//! status and error code, with bounded attempts and backoff.

use std::ops::Range;
use std::time::Duration;

use async_trait::async_trait;
use aws_sdk_s3::Client;
use aws_sdk_s3::config::http::HttpResponse;
use aws_sdk_s3::config::interceptors::BeforeDeserializationInterceptorContextRef;
use aws_sdk_s3::config::retry::RetryConfig;
use aws_sdk_s3::config::timeout::TimeoutConfig;
use aws_sdk_s3::config::{ConfigBag, Intercept, RuntimeComponents};
use aws_sdk_s3::config::{
    Credentials, Region, RequestChecksumCalculation, ResponseChecksumValidation,
};
use aws_sdk_s3::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_s3::primitives::ByteStream as SdkByteStream;
use aws_sdk_s3::types::{
    ChecksumAlgorithm, CompletedMultipartUpload, CompletedPart, ObjectLockLegalHoldStatus,
    ObjectLockMode as SdkLockMode,
};
use base64::Engine;
use bytes::Bytes;
use chrono::{DateTime, Utc};
use futures::StreamExt;
use futures::stream::FuturesUnordered;
use sha2::{Digest, Sha256};

mod download;
mod part;

use super::{
    ByteStream, ClockReading, Deletion, IncompleteUpload, LockSupport, ObjectMeta, PartStream,
    PieceStream, PutReceipt, Store, StoreError, Versioning, validate_key,
};
use crate::config::{
    ObjectLock, ObjectLockMode, RequestChecksums, S3Settings, ServerSideEncryption,
};
use download::Download;
use part::{Part, Parts};

/// How long `probe_lock` locks its probe object: it waits this long to remove it.
const PROBE_LOCK_SECONDS: i64 = 2;

/// S3 refuses multipart uploads with more parts than this.
const MAX_PARTS: i32 = 10_000;

/// Parts of the configured size for this many, then twice as large for as many again, and
/// so on: an object of any size S3 stores (5 TiB) fits 10,000 parts from 5 MiB on, while one
/// below a thousand parts never grows them.
const PARTS_PER_SIZE: i32 = 1_000;

/// S3's largest part.
const LARGEST_PART: u64 = 5 * 1024 * 1024 * 1024;

/// The size of part `number` (from 1) of an upload whose parts start at `base` bytes.
pub fn part_size_of(base: u64, number: i32) -> u64 {
    let doublings = ((number.max(1) - 1) / PARTS_PER_SIZE).min(30) as u32;
    base.saturating_mul(1 << doublings).min(LARGEST_PART)
}

/// The largest object 10,000 parts starting at `base` bytes hold.
pub fn largest_object(base: u64) -> u64 {
    (1..=MAX_PARTS).map(|n| part_size_of(base, n)).sum()
}

#[derive(Debug, Clone)]
pub struct S3Store {
    client: Client,
    bucket: String,
    /// "" or "some/prefix/".
    prefix: String,
    part_size: usize,
    parts_in_flight: usize,
    download_concurrency: usize,
    max_attempts: u32,
    stall_timeout: Duration,
    attempt_timeout: Duration,
    object_lock: Option<ObjectLock>,
    sse: Option<ServerSideEncryption>,
    /// Which keys are written locked: the repository decides, the store only applies it.
    locked_keys: fn(&str) -> bool,
    /// Whether the bucket keeps versions, asked once.
    versioned: std::sync::Arc<tokio::sync::OnceCell<bool>>,
}

/// A retain-until date to write with an object.
struct Retention {
    mode: SdkLockMode,
    until: aws_sdk_s3::primitives::DateTime,
}

impl S3Store {
    /// Connects with credentials from the standard AWS chain (environment, profile,
    /// instance role).
    pub async fn connect(settings: &S3Settings) -> S3Store {
        S3Store::connect_with(settings, None).await
    }

    /// Connects with the given key pair instead of the AWS chain, for programs that embed
    /// lifeboat and hold credentials of their own.
    pub async fn connect_with_key(
        settings: &S3Settings,
        access_key_id: &str,
        secret_access_key: &str,
    ) -> S3Store {
        let credentials = Credentials::new(
            access_key_id,
            secret_access_key,
            None,
            None,
            "lifeboat-embedded",
        );
        S3Store::connect_with(settings, Some(credentials)).await
    }

    async fn connect_with(settings: &S3Settings, credentials: Option<Credentials>) -> S3Store {
        let mut loader = aws_config::defaults(aws_config::BehaviorVersion::latest())
            .region(Region::new(settings.region.clone()));
        if let Some(profile) = &settings.profile {
            loader = loader.profile_name(profile);
        }
        if let Some(credentials) = credentials {
            loader = loader.credentials_provider(credentials);
        }
        let shared = loader.load().await;
        let checksums = match settings.request_checksums {
            RequestChecksums::WhenRequired => RequestChecksumCalculation::WhenRequired,
            RequestChecksums::WhenSupported => RequestChecksumCalculation::WhenSupported,
        };
        let mut builder = aws_sdk_s3::config::Builder::from(&shared)
            .force_path_style(settings.path_style)
            .request_checksum_calculation(checksums)
            .response_checksum_validation(ResponseChecksumValidation::WhenRequired)
            .retry_config(
                RetryConfig::standard()
                    .with_max_attempts(settings.max_attempts)
                    .with_initial_backoff(Duration::from_millis(200))
                    .with_max_backoff(Duration::from_secs(20)),
            )
            .timeout_config(
                TimeoutConfig::builder()
                    .connect_timeout(Duration::from_secs(10))
                    .operation_attempt_timeout(settings.attempt_timeout)
                    .build(),
            );
        if let Some(endpoint) = &settings.endpoint {
            builder = builder.endpoint_url(endpoint);
        }
        let prefix = if settings.prefix.is_empty() {
            String::new()
        } else {
            format!("{}/", settings.prefix)
        };
        S3Store {
            client: Client::from_conf(builder.build()),
            bucket: settings.bucket.clone(),
            prefix,
            part_size: settings.part_size as usize,
            parts_in_flight: settings.parts_in_flight,
            download_concurrency: settings.download_concurrency,
            max_attempts: settings.max_attempts,
            stall_timeout: settings.stall_timeout,
            attempt_timeout: settings.attempt_timeout,
            object_lock: settings.object_lock,
            sse: settings.sse.clone(),
            locked_keys: |_| false,
            versioned: Default::default(),
        }
    }

    /// Writes the keys `locked` selects with the repository's Object Lock retention, if it
    /// has one configured.
    pub fn lock_keys(mut self, locked: fn(&str) -> bool) -> S3Store {
        self.locked_keys = locked;
        self
    }

    /// Whether the bucket keeps versions (enabled, or suspended with versions kept from
    /// before): asked once. A bucket with Object Lock always does.
    async fn is_versioned(&self) -> bool {
        if self.object_lock.is_some() {
            return true;
        }
        *self
            .versioned
            .get_or_init(|| async {
                self.client
                    .get_bucket_versioning()
                    .bucket(&self.bucket)
                    .send()
                    .await
                    .is_ok_and(|answer| answer.status().is_some())
            })
            .await
    }

    /// The version ids of every version and delete marker stored under exactly `full`;
    /// `None` from a server that does not implement version listing.
    async fn versions_of(
        &self,
        key: &str,
        full: &str,
    ) -> Result<Option<Vec<Option<String>>>, StoreError> {
        let mut versions = Vec::new();
        let mut key_marker: Option<String> = None;
        let mut version_marker: Option<String> = None;
        loop {
            let page = self
                .client
                .list_object_versions()
                .bucket(&self.bucket)
                .prefix(full)
                .set_key_marker(key_marker.clone())
                .set_version_id_marker(version_marker.clone())
                .send()
                .await;
            let page = match page {
                Ok(page) => page,
                Err(e) if not_implemented(&e) => return Ok(None),
                Err(e) => return Err(sdk_error("list the versions of", key, e)),
            };
            versions.extend(
                page.versions()
                    .iter()
                    .filter(|v| v.key() == Some(full))
                    .map(|v| v.version_id().map(str::to_string)),
            );
            versions.extend(
                page.delete_markers()
                    .iter()
                    .filter(|m| m.key() == Some(full))
                    .map(|m| m.version_id().map(str::to_string)),
            );
            if page.is_truncated() != Some(true) {
                return Ok(Some(versions));
            }
            key_marker = page.next_key_marker().map(str::to_string);
            version_marker = page.next_version_id_marker().map(str::to_string);
            if key_marker.is_none() && version_marker.is_none() {
                return Ok(Some(versions));
            }
        }
    }

    fn retention_for(&self, key: &str) -> Option<Retention> {
        let lock = self.object_lock?;
        if !(self.locked_keys)(key) {
            return None;
        }
        let until = Utc::now() + chrono::Duration::days(i64::from(lock.days));
        Some(Retention {
            mode: match lock.mode {
                ObjectLockMode::Governance => SdkLockMode::Governance,
                ObjectLockMode::Compliance => SdkLockMode::Compliance,
            },
            until: aws_sdk_s3::primitives::DateTime::from_secs(until.timestamp()),
        })
    }

    fn sse_algorithm(&self) -> Option<aws_sdk_s3::types::ServerSideEncryption> {
        self.sse
            .as_ref()
            .map(|sse| aws_sdk_s3::types::ServerSideEncryption::from(sse.algorithm.as_str()))
    }

    fn sse_kms_key_id(&self) -> Option<String> {
        self.sse.as_ref().and_then(|sse| sse.kms_key_id.clone())
    }

    fn full_key(&self, key: &str) -> Result<String, StoreError> {
        validate_key(key)?;
        Ok(format!("{}{key}", self.prefix))
    }

    fn relative_key<'k>(&self, full: &'k str) -> Option<&'k str> {
        full.strip_prefix(self.prefix.as_str())
    }

    /// A download of the bytes of `key` from `start` to `end` (None: its end), not yet sent.
    fn download(&self, key: &str, start: u64, end: Option<u64>) -> Result<Download, StoreError> {
        Ok(Download {
            client: self.client.clone(),
            bucket: self.bucket.clone(),
            full_key: self.full_key(key)?,
            key: key.to_string(),
            next: start,
            end,
            etag: None,
            total: None,
            whole: false,
            body: None,
            resumes_left: self.max_attempts.saturating_sub(1),
            stall_timeout: self.stall_timeout,
            attempt_timeout: None,
            attempt_started: std::time::Instant::now(),
        })
    }

    async fn put_single(
        &self,
        key: &str,
        full: &str,
        body: Part,
    ) -> Result<PutReceipt, StoreError> {
        let size = body.len() as u64;
        let retention = self.retention_for(key);
        self.client
            .put_object()
            .bucket(&self.bucket)
            .key(full)
            .set_object_lock_mode(retention.as_ref().map(|r| r.mode.clone()))
            .set_object_lock_retain_until_date(retention.map(|r| r.until))
            .set_server_side_encryption(self.sse_algorithm())
            .set_ssekms_key_id(self.sse_kms_key_id())
            .checksum_sha256(body.sha256_base64())
            .content_length(size as i64)
            .body(body.body())
            .send()
            .await
            .map_err(|e| sdk_error("upload", key, e))?;
        Ok(PutReceipt {
            size,
            parts: 1,
            largest_part: size,
        })
    }

    async fn upload_part(
        &self,
        key: &str,
        full: &str,
        upload_id: &str,
        number: i32,
        body: Part,
    ) -> Result<CompletedPart, StoreError> {
        let checksum = body.sha256_base64();
        let length = body.len() as i64;
        let output = self
            .client
            .upload_part()
            .bucket(&self.bucket)
            .key(full)
            .upload_id(upload_id)
            .part_number(number)
            .checksum_sha256(&checksum)
            .content_length(length)
            .body(body.body())
            .send()
            .await
            .map_err(|e| sdk_error("upload part of", key, e))?;
        Ok(CompletedPart::builder()
            .part_number(number)
            .set_e_tag(output.e_tag)
            .checksum_sha256(checksum)
            .build())
    }

    /// Uploads the parts of a multipart upload that is already created; the caller aborts
    /// on error.
    async fn upload_parts(
        &self,
        key: &str,
        full: &str,
        upload_id: &str,
        read_ahead: Vec<Part>,
        body: &mut Parts,
    ) -> Result<(Vec<CompletedPart>, PutReceipt), StoreError> {
        let mut in_flight = FuturesUnordered::new();
        let mut completed = Vec::new();
        let mut receipt = PutReceipt {
            size: 0,
            parts: 0,
            largest_part: 0,
        };
        let mut number = 0i32;
        let mut read_ahead = read_ahead.into_iter();
        // The bytes of parts in flight stay within what the settings hold at the configured
        // size: as parts grow, fewer go at once (one at least).
        let budget = self.part_size as u64 * self.parts_in_flight as u64;
        loop {
            let part_size = part_size_of(self.part_size as u64, number + 1);
            let part = match read_ahead.next() {
                Some(part) => Some(part),
                None => body.next(key, part_size as usize).await?,
            };
            let Some(part) = part else { break };
            if number == MAX_PARTS {
                return Err(StoreError::backend(
                    "upload",
                    key,
                    format!(
                        "the object is larger than the {} that {MAX_PARTS} parts starting at part_size ({} bytes) hold (S3 stores at most 5 TiB in one object)",
                        largest_object(self.part_size as u64),
                        self.part_size
                    ),
                ));
            }
            number += 1;
            receipt.size += part.len() as u64;
            receipt.largest_part = receipt.largest_part.max(part.len() as u64);
            in_flight.push(self.upload_part(key, full, upload_id, number, part));
            let at_once = (budget / part_size).max(1) as usize;
            while in_flight.len() >= at_once {
                let done = in_flight.next().await.expect("not empty")?;
                completed.push(done);
            }
        }
        while let Some(done) = in_flight.next().await {
            completed.push(done?);
        }
        completed.sort_by_key(|part| part.part_number);
        receipt.parts = number as u32;
        Ok((completed, receipt))
    }

    async fn abort(&self, key: &str, full: &str, upload_id: &str) {
        // The SDK retries transient failures; if the abort still fails, `list_incomplete`
        // finds the upload and prune removes it.
        if let Err(e) = self
            .client
            .abort_multipart_upload()
            .bucket(&self.bucket)
            .key(full)
            .upload_id(upload_id)
            .send()
            .await
        {
            tracing::warn!(key, upload_id, error = %describe(&e), "unable to abort multipart upload; prune will remove it");
        }
    }
}

fn sha256_base64(data: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(Sha256::digest(data))
}

fn status<E>(err: &SdkError<E, HttpResponse>) -> Option<u16> {
    err.raw_response().map(|r| r.status().as_u16())
}

/// The server does not implement the call (HTTP 501, as Garage answers for Object Lock and
/// version listing).
fn not_implemented<E>(err: &SdkError<E, HttpResponse>) -> bool
where
    E: ProvideErrorMetadata,
{
    status(err) == Some(501)
        || err.as_service_error().and_then(|s| s.code()) == Some("NotImplemented")
}

/// What the SDK's output does not say about the one answer it is attached to: its HTTP
/// status (a GET's 200 or 206) and its `Date` header.
#[derive(Debug, Clone, Default)]
struct ResponseSeen(std::sync::Arc<std::sync::Mutex<(u16, Option<String>)>>);

impl ResponseSeen {
    fn status(&self) -> u16 {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).0
    }

    fn take_date(&self) -> Option<String> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).1.take()
    }
}

impl Intercept for ResponseSeen {
    fn name(&self) -> &'static str {
        "lifeboat-response-seen"
    }

    fn read_before_deserialization(
        &self,
        context: &BeforeDeserializationInterceptorContextRef<'_>,
        _components: &RuntimeComponents,
        _cfg: &mut ConfigBag,
    ) -> Result<(), aws_sdk_s3::error::BoxError> {
        let response = context.response();
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = (
            response.status().as_u16(),
            response.headers().get("date").map(str::to_string),
        );
        Ok(())
    }
}

fn sdk_error<E>(operation: &'static str, key: &str, err: SdkError<E, HttpResponse>) -> StoreError
where
    E: std::error::Error + ProvideErrorMetadata + Send + Sync + 'static,
{
    if status(&err) == Some(404) {
        return StoreError::NotFound {
            key: key.to_string(),
        };
    }
    StoreError::Backend {
        operation,
        key: key.to_string(),
        message: describe(&err),
        source: None,
    }
}

/// What S3 answered, in one line: `SlowDown: Please reduce your request rate (HTTP 503)`,
/// not the SDK's whole response dump; transport failures keep their cause chain.
fn describe<E>(err: &SdkError<E, HttpResponse>) -> String
where
    E: std::error::Error + ProvideErrorMetadata + Send + Sync + 'static,
{
    match err {
        SdkError::ServiceError(service) => {
            let status = service.raw().status().as_u16();
            let answer = service.err();
            match (answer.code(), answer.message()) {
                (Some(code), Some(message)) => format!("{code}: {message} (HTTP {status})"),
                (Some(code), None) => format!("{code} (HTTP {status})"),
                _ => format!("HTTP {status}"),
            }
        }
        other => cause_chain(other),
    }
}

/// An error and its sources in one line (`dispatch failure: io error: Connection refused`),
/// without the debug dump the SDK's own rendering ends with.
fn cause_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let line = cause.to_string();
        if !text.ends_with(&line) {
            text.push_str(": ");
            text.push_str(&line);
        }
        source = cause.source();
    }
    text
}

fn to_utc(time: Option<&aws_sdk_s3::primitives::DateTime>) -> Option<DateTime<Utc>> {
    time.and_then(|t| DateTime::<Utc>::from_timestamp(t.secs(), t.subsec_nanos()))
}

#[async_trait]
impl Store for S3Store {
    fn location(&self) -> String {
        format!("s3://{}/{}", self.bucket, self.prefix.trim_end_matches('/'))
    }

    fn read_ahead(&self) -> super::ReadAhead {
        super::ReadAhead {
            streams: u32::try_from(self.download_concurrency).unwrap_or(u32::MAX),
            range_bytes: self.part_size as u64,
        }
    }

    async fn put(&self, key: &str, body: PartStream) -> Result<PutReceipt, StoreError> {
        let full = self.full_key(key)?;
        let mut body = Parts::new(body);
        let Some(first) = body.next(key, self.part_size).await? else {
            return self.put_single(key, &full, Part::default()).await;
        };
        if first.len() < self.part_size {
            // The whole body fits one part: one request, nothing to abort.
            return self.put_single(key, &full, first).await;
        }
        // Peek: if the body ends right at one part, a single PutObject still suffices.
        let second = body.next(key, self.part_size).await?;
        let Some(second) = second else {
            return self.put_single(key, &full, first).await;
        };

        let retention = self.retention_for(key);
        // Held until the abort is registered: a signal while the upload is being opened
        // makes the cleanup wait for it, so that it is aborted too, not left open.
        let Some(opening) = crate::interrupt::creating() else {
            return Err(StoreError::backend(
                "start upload of",
                key,
                "the run is being stopped",
            ));
        };
        let created = self
            .client
            .create_multipart_upload()
            .bucket(&self.bucket)
            .key(&full)
            .set_object_lock_mode(retention.as_ref().map(|r| r.mode.clone()))
            .set_object_lock_retain_until_date(retention.map(|r| r.until))
            .set_server_side_encryption(self.sse_algorithm())
            .set_ssekms_key_id(self.sse_kms_key_id())
            .checksum_algorithm(ChecksumAlgorithm::Sha256)
            .send()
            .await
            .map_err(|e| sdk_error("start upload of", key, e))?;
        let upload_id = created.upload_id.ok_or_else(|| {
            StoreError::backend("start upload of", key, "the server returned no upload id")
        })?;
        // A run stopped by a signal aborts the upload on its way out.
        let _abort_on_interrupt = {
            let (client, bucket) = (self.client.clone(), self.bucket.clone());
            let (full, upload_id) = (full.clone(), upload_id.clone());
            crate::interrupt::undo_async_on_interrupt("upload(s) aborted", move || {
                Box::pin(async move {
                    let _ = client
                        .abort_multipart_upload()
                        .bucket(bucket)
                        .key(full)
                        .upload_id(upload_id)
                        .send()
                        .await;
                })
            })
        };
        drop(opening);

        let result = async {
            let (parts, receipt) = self
                .upload_parts(key, &full, &upload_id, vec![first, second], &mut body)
                .await?;
            self.client
                .complete_multipart_upload()
                .bucket(&self.bucket)
                .key(&full)
                .upload_id(&upload_id)
                .multipart_upload(
                    CompletedMultipartUpload::builder()
                        .set_parts(Some(parts))
                        .build(),
                )
                .send()
                .await
                .map_err(|e| sdk_error("complete upload of", key, e))?;
            if receipt.largest_part > self.part_size as u64 {
                tracing::info!(
                    key,
                    parts = receipt.parts,
                    largest_part = receipt.largest_part,
                    "parts grew past part_size to keep the object within 10,000 parts"
                );
            }
            Ok(receipt)
        }
        .await;
        if result.is_err() {
            self.abort(key, &full, &upload_id).await;
        }
        result
    }

    async fn create_if_absent(&self, key: &str, body: Bytes) -> Result<(), StoreError> {
        let full = self.full_key(key)?;
        let retention = self.retention_for(key);
        let result = self
            .client
            .put_object()
            .bucket(&self.bucket)
            .key(&full)
            .if_none_match("*")
            .set_object_lock_mode(retention.as_ref().map(|r| r.mode.clone()))
            .set_object_lock_retain_until_date(retention.map(|r| r.until))
            .set_server_side_encryption(self.sse_algorithm())
            .set_ssekms_key_id(self.sse_kms_key_id())
            .checksum_sha256(sha256_base64(&body))
            .body(SdkByteStream::from(body))
            .send()
            .await;
        match result {
            Ok(_) => Ok(()),
            Err(e) if status(&e) == Some(412) => Err(StoreError::AlreadyExists {
                key: key.to_string(),
            }),
            Err(e) => Err(sdk_error("create", key, e)),
        }
    }

    async fn get(&self, key: &str, range: Option<Range<u64>>) -> Result<ByteStream, StoreError> {
        let (start, end) = match &range {
            Some(range) if range.end <= range.start => return Ok(futures::stream::empty().boxed()),
            Some(range) => (range.start, Some(range.end)),
            None => (0, None),
        };
        download::get(
            self.download(key, start, end)?,
            self.part_size as u64,
            self.download_concurrency,
            self.attempt_timeout,
        )
        .await
    }

    async fn get_pieces(&self, key: &str, size: u64) -> Result<PieceStream, StoreError> {
        download::get_pieces(
            self.download(key, 0, None)?,
            size,
            self.part_size as u64,
            self.download_concurrency,
            self.attempt_timeout,
        )
        .await
    }

    async fn head(&self, key: &str) -> Result<ObjectMeta, StoreError> {
        let full = self.full_key(key)?;
        let output = self
            .client
            .head_object()
            .bucket(&self.bucket)
            .key(&full)
            .send()
            .await
            .map_err(|e| sdk_error("stat", key, e))?;
        Ok(ObjectMeta {
            key: key.to_string(),
            size: output.content_length.unwrap_or_default().max(0) as u64,
            last_modified: to_utc(output.last_modified.as_ref()),
        })
    }

    /// The server's `Date` header on a HEAD of `probe_key`, found or not. It has whole
    /// seconds, so the server's time is taken as the middle of the second it names.
    async fn clock(&self, probe_key: &str) -> Result<Option<ClockReading>, StoreError> {
        let full = self.full_key(probe_key)?;
        let seen = ResponseSeen::default();
        let before = Utc::now();
        let answer = self
            .client
            .head_object()
            .bucket(&self.bucket)
            .key(&full)
            .customize()
            .interceptor(seen.clone())
            .send()
            .await;
        let after = Utc::now();
        // Any answer has the server's time, a refusal too: a host whose clock is far off has
        // its first request refused as signed at the wrong time (RequestTimeTooSkewed).
        let date = seen.take_date();
        let reading = date
            .and_then(|date| DateTime::parse_from_rfc2822(&date).ok())
            .map(|date| ClockReading {
                local: before + (after - before) / 2,
                remote: date.to_utc() + chrono::Duration::milliseconds(500),
                uncertainty: (after - before) / 2 + chrono::Duration::milliseconds(500),
            });
        match answer {
            Err(e) if reading.is_none() => {
                let e = sdk_error("read the clock with", probe_key, e);
                match e.is_not_found() {
                    true => Ok(None),
                    false => Err(e),
                }
            }
            _ => Ok(reading),
        }
    }

    async fn list(&self, prefix: &str) -> Result<Vec<ObjectMeta>, StoreError> {
        let full_prefix = format!("{}{prefix}", self.prefix);
        let mut pages = self
            .client
            .list_objects_v2()
            .bucket(&self.bucket)
            .prefix(&full_prefix)
            .into_paginator()
            .send();
        let mut found = Vec::new();
        while let Some(page) = pages.next().await {
            let page = page.map_err(|e| sdk_error("list", prefix, e))?;
            for object in page.contents.unwrap_or_default() {
                let Some(key) = object.key.as_deref().and_then(|k| self.relative_key(k)) else {
                    continue;
                };
                found.push(ObjectMeta {
                    key: key.to_string(),
                    size: object.size.unwrap_or_default().max(0) as u64,
                    last_modified: to_utc(object.last_modified.as_ref()),
                });
            }
        }
        found.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(found)
    }

    async fn list_page(
        &self,
        prefix: &str,
        start_after: Option<&str>,
        max: usize,
    ) -> Result<Vec<ObjectMeta>, StoreError> {
        let page = self
            .client
            .list_objects_v2()
            .bucket(&self.bucket)
            .prefix(format!("{}{prefix}", self.prefix))
            .set_start_after(start_after.map(|key| format!("{}{key}", self.prefix)))
            .max_keys(i32::try_from(max).unwrap_or(i32::MAX))
            .send()
            .await
            .map_err(|e| sdk_error("list", prefix, e))?;
        let mut found: Vec<ObjectMeta> = page
            .contents
            .unwrap_or_default()
            .into_iter()
            .filter_map(|object| {
                let key = object.key.as_deref().and_then(|k| self.relative_key(k))?;
                Some(ObjectMeta {
                    key: key.to_string(),
                    size: object.size.unwrap_or_default().max(0) as u64,
                    last_modified: to_utc(object.last_modified.as_ref()),
                })
            })
            .collect();
        found.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(found)
    }

    async fn delete(&self, key: &str) -> Result<(), StoreError> {
        let full = self.full_key(key)?;
        match self
            .client
            .delete_object()
            .bucket(&self.bucket)
            .key(&full)
            .send()
            .await
        {
            Ok(_) => Ok(()),
            Err(e) if status(&e) == Some(404) => Ok(()),
            Err(e) => Err(sdk_error("delete", key, e)),
        }
    }

    async fn delete_unless_retained(&self, key: &str) -> Result<Deletion, StoreError> {
        if self.object_lock.is_none() && !self.is_versioned().await {
            return self
                .delete(key)
                .await
                .map(|()| Deletion::Deleted { versions: 0 });
        }
        let full = self.full_key(key)?;
        let head = match self
            .client
            .head_object()
            .bucket(&self.bucket)
            .key(&full)
            .send()
            .await
        {
            Ok(head) => Some(head),
            // No current version; older ones may still be stored behind a delete marker.
            Err(e) if status(&e) == Some(404) => None,
            Err(e) => return Err(sdk_error("stat", key, e)),
        };
        let until = head
            .as_ref()
            .and_then(|head| to_utc(head.object_lock_retain_until_date()));
        let held = head.as_ref().is_some_and(|head| {
            head.object_lock_legal_hold_status() == Some(&ObjectLockLegalHoldStatus::On)
        });
        if held || until.is_some_and(|until| until > Utc::now()) {
            return Ok(Deletion::Retained { until });
        }
        // Every version of the key, the current one with the rest: a delete without a
        // version id only stacks a delete marker on them, and the data stays (and is billed).
        let Some(mut versions) = self.versions_of(key, &full).await? else {
            // A server that keeps no versions (Garage says it has no version listing).
            return self
                .delete(key)
                .await
                .map(|()| Deletion::Deleted { versions: 0 });
        };
        if let Some(head) = head.as_ref().filter(|_| versions.is_empty()) {
            versions.push(head.version_id().map(str::to_string));
        }
        let mut removed = 0;
        for version in versions {
            match self
                .client
                .delete_object()
                .bucket(&self.bucket)
                .key(&full)
                .set_version_id(version)
                .send()
                .await
            {
                Ok(_) => removed += 1,
                Err(e) if status(&e) == Some(404) => {}
                // A lock that HEAD did not show (a bucket default, a clock ahead of the
                // server's), or an older version still locked.
                Err(e) if status(&e) == Some(403) => return Ok(Deletion::Retained { until }),
                Err(e) => return Err(sdk_error("delete", key, e)),
            }
        }
        Ok(Deletion::Deleted { versions: removed })
    }

    async fn versioning(&self) -> Result<Option<Versioning>, StoreError> {
        let answer = self
            .client
            .get_bucket_versioning()
            .bucket(&self.bucket)
            .send()
            .await;
        let answer = match answer {
            Ok(answer) => answer,
            Err(e) if not_implemented(&e) => return Ok(None),
            Err(e) => return Err(sdk_error("read the versioning of bucket", &self.bucket, e)),
        };
        let Some(state) = answer.status().map(|s| s.as_str().to_string()) else {
            return Ok(None);
        };
        let noncurrent_expire = match self
            .client
            .get_bucket_lifecycle_configuration()
            .bucket(&self.bucket)
            .send()
            .await
        {
            Ok(lifecycle) => Some(lifecycle.rules().iter().any(|rule| {
                rule.status().as_str() == "Enabled"
                    && rule.noncurrent_version_expiration().is_some()
            })),
            Err(e) if status(&e) == Some(404) => Some(false),
            Err(_) => None,
        };
        Ok(Some(Versioning {
            status: state,
            noncurrent_expire,
        }))
    }

    async fn probe_lock(&self, probe_key: &str) -> Result<LockSupport, StoreError> {
        match self
            .client
            .get_object_lock_configuration()
            .bucket(&self.bucket)
            .send()
            .await
        {
            Ok(output) => {
                let enabled = output
                    .object_lock_configuration()
                    .and_then(|c| c.object_lock_enabled())
                    .is_some_and(|e| e.as_str() == "Enabled");
                if !enabled {
                    return Ok(LockSupport::NotEnabled);
                }
            }
            Err(e) if matches!(status(&e), Some(404) | Some(400)) => {
                return Ok(LockSupport::NotEnabled);
            }
            Err(e) if not_implemented(&e) => {
                return Ok(LockSupport::NotImplemented);
            }
            Err(e) => {
                return Err(sdk_error(
                    "read the Object Lock configuration of bucket",
                    &self.bucket,
                    e,
                ));
            }
        }
        // The configuration can say Enabled on a server that ignores lock headers: write a
        // probe locked for a few seconds and try to delete that very version.
        let full = self.full_key(probe_key)?;
        let until = Utc::now() + chrono::Duration::seconds(PROBE_LOCK_SECONDS);
        let body = Bytes::from_static(b"lifeboat object lock probe");
        let put = self
            .client
            .put_object()
            .bucket(&self.bucket)
            .key(&full)
            .object_lock_mode(SdkLockMode::Governance)
            .object_lock_retain_until_date(aws_sdk_s3::primitives::DateTime::from_secs(
                until.timestamp(),
            ))
            .set_server_side_encryption(self.sse_algorithm())
            .set_ssekms_key_id(self.sse_kms_key_id())
            .checksum_sha256(sha256_base64(&body))
            .body(SdkByteStream::from(body))
            .send()
            .await
            .map_err(|e| sdk_error("write a locked probe", probe_key, e))?;
        let version = put.version_id().map(str::to_string);
        let early = self
            .client
            .delete_object()
            .bucket(&self.bucket)
            .key(&full)
            .set_version_id(version.clone())
            .send()
            .await;
        if early.is_ok() {
            return Ok(LockSupport::NotEnforced);
        }
        let wait = (until - Utc::now()).to_std().unwrap_or_default() + Duration::from_secs(1);
        tokio::time::sleep(wait).await;
        self.client
            .delete_object()
            .bucket(&self.bucket)
            .key(&full)
            .set_version_id(version)
            .send()
            .await
            .map_err(|e| sdk_error("remove the probe", probe_key, e))?;
        Ok(LockSupport::Enforced)
    }

    async fn list_incomplete(&self, prefix: &str) -> Result<Vec<IncompleteUpload>, StoreError> {
        let full_prefix = format!("{}{prefix}", self.prefix);
        let mut found = Vec::new();
        let mut key_marker: Option<String> = None;
        let mut upload_marker: Option<String> = None;
        loop {
            let page = self
                .client
                .list_multipart_uploads()
                .bucket(&self.bucket)
                .prefix(&full_prefix)
                .set_key_marker(key_marker.take())
                .set_upload_id_marker(upload_marker.take())
                .send()
                .await
                .map_err(|e| sdk_error("list uploads under", prefix, e))?;
            for upload in page.uploads.unwrap_or_default() {
                let (Some(full), Some(id)) = (upload.key, upload.upload_id) else {
                    continue;
                };
                let Some(key) = self.relative_key(&full) else {
                    continue;
                };
                found.push(IncompleteUpload {
                    key: key.to_string(),
                    id,
                    initiated: to_utc(upload.initiated.as_ref()),
                });
            }
            if page.is_truncated != Some(true) {
                break;
            }
            key_marker = page.next_key_marker;
            upload_marker = page.next_upload_id_marker;
            if key_marker.is_none() && upload_marker.is_none() {
                break;
            }
        }
        Ok(found)
    }

    async fn abort_incomplete(&self, upload: &IncompleteUpload) -> Result<(), StoreError> {
        let full = self.full_key(&upload.key)?;
        match self
            .client
            .abort_multipart_upload()
            .bucket(&self.bucket)
            .key(&full)
            .upload_id(&upload.id)
            .send()
            .await
        {
            Ok(_) => Ok(()),
            Err(e) if status(&e) == Some(404) => Ok(()),
            Err(e) => Err(sdk_error("abort upload of", &upload.key, e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1024 * 1024;

    #[test]
    fn parts_double_every_thousand_and_never_pass_five_gib() {
        assert_eq!(part_size_of(5 * MIB, 1), 5 * MIB);
        assert_eq!(part_size_of(5 * MIB, 1_000), 5 * MIB);
        assert_eq!(part_size_of(5 * MIB, 1_001), 10 * MIB);
        assert_eq!(part_size_of(5 * MIB, 10_000), 512 * 5 * MIB);
        assert_eq!(part_size_of(4 * 1024 * MIB, 2_001), LARGEST_PART);
        // From the smallest part S3 takes, 10,000 parts hold about what S3 stores at most.
        let smallest = largest_object(5 * MIB);
        assert!(
            smallest > 4_900_000 * MIB && smallest < 5 * 1024 * 1024 * MIB,
            "{smallest}"
        );
        // 30 GiB at 5 MiB parts: a thousand of 5 MiB, a thousand of 10, then 20 MiB ones.
        let mut left = 30 * 1024 * MIB;
        let mut parts = 0;
        while left > 0 {
            parts += 1;
            left = left.saturating_sub(part_size_of(5 * MIB, parts));
        }
        assert_eq!(parts, 2_000 + (30 * 1024 - 15_000) / 20);
    }
}
