//! One part of an upload, made of the chunks the pipeline sent. The chunks are shared with
//! every other repository the same backup goes to and are never copied: a part costs its
//! memory once however many regions it is uploaded to, and a slow region holds only the
//! chunks it still needs.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::pin::Pin;
use std::task::{Context, Poll};

use aws_sdk_s3::primitives::{ByteStream as SdkByteStream, SdkBody};
use base64::Engine;
use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use sha2::{Digest, Sha256};

use crate::storage::{PartStream, StoreError};

#[derive(Debug, Clone, Default)]
pub(super) struct Part {
    chunks: Vec<Bytes>,
    len: usize,
}

impl Part {
    pub(super) fn len(&self) -> usize {
        self.len
    }

    fn push(&mut self, chunk: Bytes) {
        self.len += chunk.len();
        self.chunks.push(chunk);
    }

    pub(super) fn sha256_base64(&self) -> String {
        let mut hasher = Sha256::new();
        for chunk in &self.chunks {
            hasher.update(chunk);
        }
        base64::engine::general_purpose::STANDARD.encode(hasher.finalize())
    }

    /// The request body: streamed from the shared chunks, and rebuilt from them when the SDK
    /// retries. A streamed body is signed as UNSIGNED-PAYLOAD, so the SDK does not hash the
    /// part a second time; the part's own `x-amz-checksum-sha256`, which is signed, is what
    /// the server checks the bytes against.
    pub(super) fn body(&self) -> SdkByteStream {
        let chunks = self.chunks.clone();
        let len = self.len as u64;
        SdkByteStream::new(SdkBody::retryable(move || {
            SdkBody::from_body_1_x(ChunkBody {
                chunks: chunks.iter().cloned().collect(),
                remaining: len,
            })
        }))
    }
}

/// Cuts a part stream into parts; the chunk that straddles a part's end is split without a
/// copy and its rest starts the next part.
pub(super) struct Parts {
    body: PartStream,
    carry: Option<Bytes>,
}

impl Parts {
    pub(super) fn new(body: PartStream) -> Parts {
        Parts { body, carry: None }
    }

    /// The next part of `size` bytes; a shorter one only at the end, `None` after it.
    pub(super) async fn next(
        &mut self,
        key: &str,
        size: usize,
    ) -> Result<Option<Part>, StoreError> {
        let mut part = Part::default();
        while part.len < size {
            let mut chunk = match self.carry.take() {
                Some(chunk) => chunk,
                None => match self.body.next(key).await? {
                    Some(chunk) => chunk,
                    None => break,
                },
            };
            let room = size - part.len;
            if chunk.len() > room {
                self.carry = Some(chunk.split_off(room));
            }
            if !chunk.is_empty() {
                part.push(chunk);
            }
        }
        Ok((part.len > 0).then_some(part))
    }
}

/// An http-body over a list of chunks, with its exact length known up front.
struct ChunkBody {
    chunks: VecDeque<Bytes>,
    remaining: u64,
}

impl Body for ChunkBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        let next = self.chunks.pop_front();
        if let Some(chunk) = &next {
            self.remaining -= chunk.len() as u64;
        }
        Poll::Ready(next.map(|chunk| Ok(Frame::data(chunk))))
    }

    fn is_end_stream(&self) -> bool {
        self.chunks.is_empty()
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.remaining)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stream_of(chunks: &[&[u8]]) -> PartStream {
        let (sender, stream) = PartStream::channel(chunks.len() + 1);
        let chunks: Vec<Bytes> = chunks.iter().map(|c| Bytes::copy_from_slice(c)).collect();
        tokio::spawn(async move {
            for chunk in chunks {
                sender.send(chunk).await.unwrap();
            }
            sender.finish().await.unwrap();
        });
        stream
    }

    async fn collect(body: SdkByteStream) -> Vec<u8> {
        body.collect().await.unwrap().into_bytes().to_vec()
    }

    #[tokio::test]
    async fn parts_are_cut_at_their_size_across_chunks_and_keep_every_byte_in_order() {
        let mut parts = Parts::new(stream_of(&[b"abc", b"defgh", b"", b"ij"]));
        let mut seen = Vec::new();
        while let Some(part) = parts.next("k", 4).await.unwrap() {
            assert!(part.len() <= 4);
            let bytes = collect(part.body()).await;
            assert_eq!(bytes.len(), part.len());
            seen.push(String::from_utf8(bytes).unwrap());
        }
        assert_eq!(seen, ["abcd", "efgh", "ij"]);
    }

    #[tokio::test]
    async fn a_part_body_is_the_same_bytes_every_time_it_is_rebuilt_for_a_retry() {
        let mut parts = Parts::new(stream_of(&[b"hello ", b"wor", b"ld"]));
        let part = parts.next("k", 64).await.unwrap().unwrap();
        let body = part.body().into_inner();
        let again = body.try_clone().expect("a part body can be rebuilt");
        assert_eq!(collect(SdkByteStream::new(body)).await, b"hello world");
        assert_eq!(collect(SdkByteStream::new(again)).await, b"hello world");
        assert_eq!(
            part.sha256_base64(),
            base64::engine::general_purpose::STANDARD.encode(Sha256::digest(b"hello world"))
        );
    }

    #[tokio::test]
    async fn a_sender_that_goes_away_unfinished_is_an_abandoned_upload_not_a_short_part() {
        let (sender, stream) = PartStream::channel(4);
        sender.send(Bytes::from_static(b"abc")).await.unwrap();
        drop(sender);
        let mut parts = Parts::new(stream);
        assert!(matches!(
            parts.next("k", 8).await,
            Err(StoreError::Abandoned { .. })
        ));
    }
}
