//! Reading an object: one GET stream, or, for an object larger than a part, ranged GETs of a
//! part each with several in flight, handed on in order. One S3 stream gets 50-200 MB/s; a
//! terabyte read through one takes the whole RTO budget before WAL replay starts.
//!
//! Every range is a task of its own that resumes its own cut or stalled body, pinned by
//! `If-Match` to the ETag the first response carried, so that no range comes from another
//! version of the object. The ranges ahead of the one being handed on keep what they received
//! until its turn comes: a download holds at most `part_size × download_concurrency` bytes.

use std::collections::VecDeque;
use std::time::Duration;

use aws_sdk_s3::Client;
use aws_sdk_s3::primitives::ByteStream as SdkByteStream;
use bytes::{Bytes, BytesMut};
use futures::StreamExt;
use tokio::sync::mpsc;

use super::{ResponseSeen, cause_chain, sdk_error, status};
use crate::storage::{ByteStream, PieceStream, StoreError, in_order};

/// One object (or one range of it) being downloaded. The SDK retries a request until its
/// response headers arrive; a body cut or stalled after that is resumed here, with a ranged
/// GET from the first byte not yet received, pinned to the same object version by its ETag.
pub(super) struct Download {
    pub(super) client: Client,
    pub(super) bucket: String,
    pub(super) full_key: String,
    pub(super) key: String,
    /// The offset of the next byte to hand on.
    pub(super) next: u64,
    /// The end of the range asked for (exclusive); None: the end of the object.
    pub(super) end: Option<u64>,
    pub(super) etag: Option<String>,
    /// The object's size, from the first ranged response's Content-Range.
    pub(super) total: Option<u64>,
    /// The last answer had no Content-Range: the server sent the whole object.
    pub(super) whole: bool,
    pub(super) body: Option<SdkByteStream>,
    pub(super) resumes_left: u32,
    pub(super) stall_timeout: Duration,
    /// How long one try of a range may take, its body included (`attempt_timeout`, which
    /// bounds a part's upload the same way); None for a single stream of a whole object.
    /// Without it a server trickling a byte every `stall_timeout` holds a restore forever.
    pub(super) attempt_timeout: Option<Duration>,
    /// When the current try was sent.
    pub(super) attempt_started: std::time::Instant,
}

impl Download {
    /// The same object's bytes `range`, pinned to the ETag this download was answered with.
    fn range(&self, start: u64, end: u64) -> Download {
        Download {
            client: self.client.clone(),
            bucket: self.bucket.clone(),
            full_key: self.full_key.clone(),
            key: self.key.clone(),
            next: start,
            end: Some(end),
            etag: self.etag.clone(),
            total: self.total,
            whole: false,
            body: None,
            resumes_left: self.resumes_left,
            stall_timeout: self.stall_timeout,
            attempt_timeout: self.attempt_timeout,
            attempt_started: std::time::Instant::now(),
        }
    }

    /// Sends the GET for the bytes from `next`; false when the range is past the end.
    ///
    /// The answer must be what was asked: the bytes from `next` (a 206 whose Content-Range
    /// starts there), or, for a read from the first byte, the whole object (a 200, from a
    /// server that ignores Range); of the same object version and size as the first answer.
    /// Anything else is refused before a byte of it is handed on.
    async fn open(&mut self) -> Result<bool, StoreError> {
        let range = match self.end {
            Some(end) => Some(format!("bytes={}-{}", self.next, end - 1)),
            None if self.next > 0 => Some(format!("bytes={}-", self.next)),
            None => None,
        };
        let seen = ResponseSeen::default();
        self.attempt_started = std::time::Instant::now();
        let result = self
            .client
            .get_object()
            .bucket(&self.bucket)
            .key(&self.full_key)
            .set_range(range)
            .set_if_match(self.etag.clone())
            .customize()
            .interceptor(seen.clone())
            .send()
            .await;
        let output = match result {
            Ok(output) => output,
            Err(e) if status(&e) == Some(416) => return Ok(false),
            Err(e) if status(&e) == Some(412) => return Err(self.replaced()),
            Err(e) => return Err(sdk_error("download", &self.key, e)),
        };
        let refuse = |what: String| Err(StoreError::backend("download", &self.key, what));
        let answered = match seen.status() {
            206 => match output.content_range().and_then(parse_content_range) {
                Some((from, Some(total))) if from == self.next => total,
                _ => {
                    return refuse(format!(
                        "asked for the bytes from {}, the server answered {:?} (Content-Range)",
                        self.next,
                        output.content_range().unwrap_or("nothing")
                    ));
                }
            },
            200 if self.next == 0 => match output.content_length() {
                Some(length) if length >= 0 => length as u64,
                _ => return refuse("the server did not say the object's size".to_string()),
            },
            code => {
                return refuse(format!(
                    "asked for the bytes from {}, the server answered HTTP {code}",
                    self.next
                ));
            }
        };
        if self.total.is_some_and(|total| total != answered) {
            return refuse(format!(
                "the object's size changed while it was read ({} bytes, then {answered})",
                self.total.unwrap_or_default()
            ));
        }
        let etag = output.e_tag().map(str::to_string);
        if self.etag.is_some() && etag != self.etag {
            // A server that ignores If-Match would hand on another version's bytes.
            return Err(self.replaced());
        }
        self.whole = seen.status() == 200;
        self.total = Some(answered);
        self.etag = etag;
        self.body = Some(output.body);
        Ok(true)
    }

    fn replaced(&self) -> StoreError {
        StoreError::backend(
            "download",
            &self.key,
            "the object was replaced while it was being downloaded; run the command again",
        )
    }

    /// Where the bytes this download hands on end: the end asked for, or the object's.
    fn expected_end(&self) -> Option<u64> {
        match (self.end, self.total) {
            (Some(end), Some(total)) => Some(end.min(total)),
            (end, total) => end.or(total),
        }
    }

    /// The error of a range that ended before its end: the object is not the size its first
    /// response said, and the bytes after this point would land at the wrong offsets.
    fn short(&self) -> StoreError {
        StoreError::backend(
            "download",
            &self.key,
            format!(
                "the read that was to end at byte {} ended at byte {} of an object of {} bytes; the object changed while it was read, run the command again",
                self.expected_end().unwrap_or_default(),
                self.next,
                self.total
                    .map_or_else(|| "unknown".to_string(), |t| t.to_string())
            ),
        )
    }

    /// Whether the bytes handed on stopped before the end of what was asked.
    fn ended_short(&self) -> bool {
        self.expected_end().is_some_and(|end| self.next < end)
    }

    /// The next piece of the body; None at its end (or after an error was handed on).
    async fn next_chunk(&mut self) -> Option<Result<Bytes, StoreError>> {
        loop {
            let body = self.body.as_mut()?;
            let attempt_left = self
                .attempt_timeout
                .map(|limit| limit.saturating_sub(self.attempt_started.elapsed()));
            let wait = attempt_left.map_or(self.stall_timeout, |left| left.min(self.stall_timeout));
            let failure = match tokio::time::timeout(wait, body.next()).await {
                Ok(Some(Ok(mut bytes))) => {
                    if let Some(end) = self.expected_end() {
                        let room = end.saturating_sub(self.next);
                        if bytes.len() as u64 > room {
                            // More than was asked for: the rest is not this range's.
                            bytes.truncate(room as usize);
                            self.body = None;
                            if bytes.is_empty() {
                                return None;
                            }
                        }
                    }
                    self.next += bytes.len() as u64;
                    return Some(Ok(bytes));
                }
                Ok(None) => {
                    self.body = None;
                    return self.ended_short().then(|| Err(self.short()));
                }
                Ok(Some(Err(e))) => cause_chain(&e),
                // The SDK's timeouts end when the response headers arrive; a body that stops
                // flowing would otherwise hang a restore forever.
                Err(_) if wait < self.stall_timeout => format!(
                    "the range was not received within {} (attempt_timeout)",
                    humantime::format_duration(self.attempt_timeout.unwrap_or_default())
                ),
                Err(_) => format!(
                    "no data for {}; the connection stalled (stall_timeout)",
                    humantime::format_duration(self.stall_timeout)
                ),
            };
            self.body = None;
            if self.end.is_some_and(|end| self.next >= end) {
                // Every byte asked for arrived before the connection failed.
                return None;
            }
            if self.resumes_left == 0 {
                return Some(Err(StoreError::backend("download", &self.key, failure)));
            }
            self.resumes_left -= 1;
            tracing::warn!(
                key = %self.key,
                offset = self.next,
                "download interrupted ({failure}); resuming from there"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
            match self.open().await {
                Ok(true) => {}
                Ok(false) => return self.ended_short().then(|| Err(self.short())),
                Err(e) => return Some(Err(e)),
            }
        }
    }

    /// The body as a stream, to its end.
    fn into_stream(self) -> ByteStream {
        futures::stream::unfold(self, |mut download| async move {
            let item = download.next_chunk().await?;
            Some((item, download))
        })
        .boxed()
    }
}

/// The first byte and the object's size (None: `*`, unknown) of a Content-Range such as
/// `bytes 0-8388607/134217728`; None when it is not one.
fn parse_content_range(header: &str) -> Option<(u64, Option<u64>)> {
    let (range, total) = header.trim().strip_prefix("bytes ")?.split_once('/')?;
    let (first, last) = range.split_once('-')?;
    let (first, last): (u64, u64) = (first.parse().ok()?, last.parse().ok()?);
    let total = match total {
        "*" => None,
        total => Some(total.parse::<u64>().ok()?),
    };
    (first <= last && total.is_none_or(|total| last < total)).then_some((first, total))
}

/// Reads what `download` asks for (its `next` and `end`, not yet opened), in ranges of
/// `part_size` with `concurrency` of them in flight; one plain stream when that is 1.
pub(super) async fn get(
    mut download: Download,
    part_size: u64,
    concurrency: usize,
    attempt_timeout: Duration,
) -> Result<ByteStream, StoreError> {
    let empty = || Ok(futures::stream::empty().boxed());
    if concurrency <= 1 {
        if !download.open().await? {
            // A range past the end of the object is empty, as it is for the local store.
            return empty();
        }
        return Ok(download.into_stream());
    }
    let asked_end = download.end;
    let start = download.next;
    let first_end = start.saturating_add(part_size);
    download.end = Some(asked_end.map_or(first_end, |end| end.min(first_end)));
    if !download.open().await? {
        return empty();
    }
    if download.whole {
        // The server sent the whole object for the range (it ignores Range): read it as
        // one stream, up to the end asked for.
        download.end = asked_end;
        return Ok(download.into_stream());
    }
    let total = download.total.unwrap_or_default();
    let stop = asked_end.map_or(total, |end| end.min(total));
    let first_end = download.end.unwrap_or(stop).min(stop);
    download.end = Some(first_end);
    if first_end >= stop {
        return Ok(download.into_stream());
    }
    download.attempt_timeout = Some(attempt_timeout);
    let mut ranges = Ranges {
        template: download.range(first_end, first_end),
        next_start: first_end,
        stop,
        part_size,
        concurrency,
        in_flight: VecDeque::new(),
        spare: Vec::new(),
    };
    ranges
        .in_flight
        .push_back(RangeTask::spawn(download, BytesMut::new()));
    ranges.fill();
    let stream = futures::stream::unfold(ranges, |mut ranges| async move {
        let item = ranges.next_chunk().await?;
        Some((item, ranges))
    });
    Ok(stream.boxed())
}

/// Reads the whole object `download` names, which should be `size` bytes, as ranges of
/// `part_size` with `concurrency` of them in flight, each piece handed on as it arrives with
/// its offset. Unlike [`get`], no range waits for the one before it: a slow range holds up
/// nothing but itself, and nothing is held back in memory.
pub(super) async fn get_pieces(
    mut download: Download,
    size: u64,
    part_size: u64,
    concurrency: usize,
    attempt_timeout: Duration,
) -> Result<PieceStream, StoreError> {
    if concurrency <= 1 || size <= part_size {
        return Ok(in_order(
            get(download, part_size, 1, attempt_timeout).await?,
        ));
    }
    download.end = Some(part_size);
    if !download.open().await? {
        return Err(download.short());
    }
    if download.total != Some(size) {
        // Ranges of an object of another size would be written where its bytes do not
        // belong, or past the end of what the manifest says there is.
        return Err(StoreError::backend(
            "download",
            &download.key,
            format!(
                "the object is {} bytes, its manifest says {size}; it is not the object that was stored",
                download.total.unwrap_or_default()
            ),
        ));
    }
    if download.whole {
        // The server ignores Range and sent the whole object: read it as one stream.
        download.end = None;
        return Ok(in_order(download.into_stream()));
    }
    download.attempt_timeout = Some(attempt_timeout);
    let ranges = OutOfOrder {
        template: download.range(0, 0),
        first: Some(download),
        size,
        part_size,
        concurrency,
    };
    let (sender, receiver) = mpsc::channel(concurrency);
    let task = tokio::spawn(ranges.run(sender));
    let forwarding = Forwarding { receiver, task };
    Ok(
        futures::stream::unfold(forwarding, |mut forwarding| async move {
            let piece = forwarding.receiver.recv().await?;
            Some((piece, forwarding))
        })
        .boxed(),
    )
}

/// The ranges of one object read out of order, by a task of their own that hands each piece
/// on through a channel: the connections keep flowing while the reader writes what it was
/// handed (each body is read only when polled).
struct OutOfOrder {
    template: Download,
    /// The first range, already open.
    first: Option<Download>,
    size: u64,
    part_size: u64,
    concurrency: usize,
}

/// A range's piece, or the end of range number N.
enum RangeItem {
    Piece(Result<(u64, Bytes), StoreError>),
    Done(usize),
}

impl OutOfOrder {
    /// How far past the oldest unfinished range a new one may start, in ranges: a finished
    /// range's connection moves on without waiting for a slow one before it, but no further
    /// than this, so the part of the object that has arrived from its first byte (what can
    /// be checked and unpacked) never lags far behind the download.
    fn window(&self) -> usize {
        2 * self.concurrency
    }

    async fn run(mut self, sender: mpsc::Sender<Result<(u64, Bytes), StoreError>>) {
        let count = usize::try_from(self.size.div_ceil(self.part_size)).unwrap_or(usize::MAX);
        let mut finished = vec![false; count];
        let mut active = futures::stream::SelectAll::new();
        let (mut started, mut running, mut oldest) = (0usize, 0usize, 0usize);
        loop {
            while running < self.concurrency && started < count && started < oldest + self.window()
            {
                let download = match self.first.take() {
                    Some(first) => first,
                    None => {
                        let start = started as u64 * self.part_size;
                        let end = start.saturating_add(self.part_size).min(self.size);
                        self.template.range(start, end)
                    }
                };
                let number = started;
                active.push(
                    range_pieces(download)
                        .map(RangeItem::Piece)
                        .chain(futures::stream::once(
                            async move { RangeItem::Done(number) },
                        ))
                        .boxed(),
                );
                started += 1;
                running += 1;
            }
            match active.next().await {
                Some(RangeItem::Piece(piece)) => {
                    let failed = piece.is_err();
                    if sender.send(piece).await.is_err() || failed {
                        return;
                    }
                }
                Some(RangeItem::Done(number)) => {
                    finished[number] = true;
                    running -= 1;
                    while oldest < count && finished[oldest] {
                        oldest += 1;
                    }
                }
                None => return,
            }
        }
    }
}

/// The receiving end of [`OutOfOrder::run`]; the task reading the pieces ends with it.
struct Forwarding {
    receiver: mpsc::Receiver<Result<(u64, Bytes), StoreError>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Forwarding {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// How much of a range is gathered into one piece: a write, and a wake-up of the reader,
/// per piece instead of per frame of the server's answer.
const PIECE_BYTES: usize = 1 << 20;

/// One range's pieces with their offsets, opening it first unless it is open.
fn range_pieces(download: Download) -> PieceStream {
    let opened = download.body.is_some();
    futures::stream::unfold(Some((download, opened)), |state| async move {
        let (mut download, opened) = state?;
        if !opened {
            let opened = match download.open().await {
                Ok(true) => Ok(()),
                Ok(false) => Err(download.short()),
                Err(e) => Err(e),
            };
            if let Err(e) = opened {
                return Some((Err(e), None));
            }
        }
        let at = download.next;
        let mut piece = BytesMut::new();
        while piece.len() < PIECE_BYTES {
            match download.next_chunk().await {
                Some(Ok(bytes)) => piece.extend_from_slice(&bytes),
                Some(Err(e)) => return Some((Err(e), None)),
                None if piece.is_empty() => return None,
                None => return Some((Ok((at, piece.freeze())), None)),
            }
        }
        Some((Ok((at, piece.freeze())), Some((download, true))))
    })
    .boxed()
}

/// The ranges of one object still to hand on, in order.
struct Ranges {
    /// The object, its ETag and its retry settings; each range is made from it.
    template: Download,
    next_start: u64,
    stop: u64,
    part_size: u64,
    concurrency: usize,
    in_flight: VecDeque<RangeTask>,
    /// Buffers of ranges handed on, for the next ones: a new 8 MiB buffer per range would
    /// leave glibc's arenas holding freed ones (it stops returning blocks of that size to the
    /// system once one was freed), far above the bound.
    spare: Vec<BytesMut>,
}

impl Ranges {
    /// Starts ranges until `concurrency` are in flight or none is left.
    fn fill(&mut self) {
        while self.in_flight.len() < self.concurrency && self.next_start < self.stop {
            let end = self
                .next_start
                .saturating_add(self.part_size)
                .min(self.stop);
            let range = self.template.range(self.next_start, end);
            let buffer = self.spare.pop().unwrap_or_default();
            self.in_flight.push_back(RangeTask::spawn(range, buffer));
            self.next_start = end;
        }
    }

    async fn next_chunk(&mut self) -> Option<Result<Bytes, StoreError>> {
        loop {
            let front = self.in_flight.front_mut()?;
            match front.received.recv().await {
                Some(Ok(bytes)) => return Some(Ok(bytes)),
                Some(Err(e)) => {
                    // The download ends with its first error; the other ranges stop.
                    self.in_flight.clear();
                    self.next_start = self.stop;
                    return Some(Err(e));
                }
                None => {
                    match (&mut front.task).await {
                        Ok(buffer) => self.spare.push(buffer),
                        // A range whose task died ended without its bytes: the stream must
                        // not go on past the gap.
                        Err(e) => {
                            let failed = StoreError::backend(
                                "download",
                                &self.template.key,
                                format!("a range of the object was lost: {e}"),
                            );
                            self.in_flight.clear();
                            self.next_start = self.stop;
                            return Some(Err(failed));
                        }
                    }
                    self.in_flight.pop_front();
                    self.fill();
                }
            }
        }
    }
}

/// A range being downloaded by a task of its own into a channel that holds what it received
/// until the range's turn comes; the task ends when this is dropped.
struct RangeTask {
    received: mpsc::UnboundedReceiver<Result<Bytes, StoreError>>,
    /// Ends with the range's buffer, to be used again.
    task: tokio::task::JoinHandle<BytesMut>,
}

impl RangeTask {
    /// Downloads `download` into `buffer` (taken back, once no slice of it is held any
    /// more, instead of a new one).
    fn spawn(mut download: Download, mut buffer: BytesMut) -> RangeTask {
        let (sender, received) = mpsc::unbounded_channel();
        let task = tokio::spawn(async move {
            let started = std::time::Instant::now();
            let from = download.next;
            if download.body.is_none() {
                let opened = match download.open().await {
                    Ok(true) => Ok(()),
                    Ok(false) => Err(download.short()),
                    Err(e) => Err(e),
                };
                if let Err(e) = opened {
                    let _ = sender.send(Err(e));
                    return buffer;
                }
            }
            // What arrives is copied into one buffer the size of the range, handed on in
            // slices of it: the body's own buffers are freed at once, and the range holds
            // exactly its length however the server's answer was cut into frames.
            let length = download.end.unwrap_or(download.next) - download.next;
            buffer.clear();
            buffer.reserve(length as usize);
            while let Some(item) = download.next_chunk().await {
                let item = item.map(|bytes| {
                    buffer.extend_from_slice(&bytes);
                    buffer.split().freeze()
                });
                let failed = item.is_err();
                if sender.send(item).is_err() || failed {
                    return buffer;
                }
            }
            tracing::debug!(key = %download.key, from, to = download.next, took = ?started.elapsed(), "range downloaded");
            buffer
        });
        RangeTask { received, task }
    }
}

impl Drop for RangeTask {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::parse_content_range;

    #[test]
    fn a_content_range_gives_the_first_byte_and_the_size() {
        assert_eq!(
            parse_content_range("bytes 0-8388607/134217728"),
            Some((0, Some(134_217_728)))
        );
        assert_eq!(
            parse_content_range("bytes 8388608-16777215/*"),
            Some((8_388_608, None))
        );
        for nonsense in [
            "bytes */42",
            "bytes 9-0/42",
            "bytes 0-42/42",
            "bytes -1-3/9",
            "items 0-9/10",
            "garbage",
            "bytes 0-9/ten",
        ] {
            assert_eq!(parse_content_range(nonsense), None, "{nonsense}");
        }
    }
}
