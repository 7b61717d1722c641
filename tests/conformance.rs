//! One conformance suite every store must pass: the local directory and S3 (on a real
//! SeaweedFS) alike.

use std::sync::Arc;

use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use lifeboat::storage::local::LocalStore;
use lifeboat::storage::s3::S3Store;
use lifeboat::storage::{self, PartStream, Store, StoreError};

use crate::common::{SeaweedFs, tree::noise};

const MIB: usize = 1024 * 1024;

async fn read_all(store: &dyn Store, key: &str, range: Option<std::ops::Range<u64>>) -> Vec<u8> {
    let chunks: Vec<Bytes> = store
        .get(key, range)
        .await
        .unwrap()
        .try_collect()
        .await
        .unwrap();
    chunks.concat()
}

/// Sends `body` in uneven chunks, as the pipeline does, then finishes.
async fn put_chunked(store: &dyn Store, key: &str, body: &[u8]) -> Result<u64, StoreError> {
    let (sender, stream) = PartStream::channel(4);
    let chunks: Vec<Bytes> = body
        .chunks(MIB + 12_345)
        .map(Bytes::copy_from_slice)
        .collect();
    let feeder = tokio::spawn(async move {
        for chunk in chunks {
            if sender.send(chunk).await.is_err() {
                return;
            }
        }
        let _ = sender.finish().await;
    });
    let receipt = store.put(key, stream).await;
    feeder.await.unwrap();
    receipt.map(|r| r.size)
}

async fn small_objects_round_trip(store: &dyn Store) {
    let receipt = storage::put_bytes(store, "a/b/one.txt", Bytes::from_static(b"hello"))
        .await
        .unwrap();
    assert_eq!(receipt.size, 5);
    assert_eq!(read_all(store, "a/b/one.txt", None).await, b"hello");
    let meta = store.head("a/b/one.txt").await.unwrap();
    assert_eq!(meta.size, 5);
    assert!(meta.last_modified.is_some());

    // put replaces.
    storage::put_bytes(store, "a/b/one.txt", Bytes::from_static(b"replaced"))
        .await
        .unwrap();
    assert_eq!(read_all(store, "a/b/one.txt", None).await, b"replaced");

    // An empty object is an object.
    storage::put_bytes(store, "a/empty", Bytes::new())
        .await
        .unwrap();
    assert_eq!(store.head("a/empty").await.unwrap().size, 0);
    assert!(read_all(store, "a/empty", None).await.is_empty());
}

async fn missing_objects(store: &dyn Store) {
    assert!(matches!(
        store.get("no/such/key", None).await.err(),
        Some(StoreError::NotFound { .. })
    ));
    assert!(matches!(
        store.head("no/such/key").await,
        Err(StoreError::NotFound { .. })
    ));
    store
        .delete("no/such/key")
        .await
        .expect("deleting a missing object succeeds");
    storage::put_bytes(store, "gone/soon", Bytes::from_static(b"x"))
        .await
        .unwrap();
    store.delete("gone/soon").await.unwrap();
    store
        .delete("gone/soon")
        .await
        .expect("delete is idempotent");
    assert!(matches!(
        store.head("gone/soon").await,
        Err(StoreError::NotFound { .. })
    ));
}

async fn invalid_keys(store: &dyn Store) {
    for key in ["", "/abs", "a/../b", "a//b", "./a"] {
        let result = storage::put_bytes(store, key, Bytes::from_static(b"x")).await;
        assert!(
            matches!(result, Err(StoreError::InvalidKey { .. })),
            "key {key:?}: {result:?}"
        );
    }
}

async fn ranged_get(store: &dyn Store) {
    let body = noise(3 * MIB, 1);
    put_chunked(store, "range/object", &body).await.unwrap();
    assert_eq!(
        read_all(store, "range/object", Some(10..20)).await,
        &body[10..20]
    );
    let start = MIB as u64 - 3;
    assert_eq!(
        read_all(store, "range/object", Some(start..start + MIB as u64)).await,
        &body[start as usize..start as usize + MIB]
    );
    let len = body.len() as u64;
    assert_eq!(
        read_all(store, "range/object", Some(len - 5..len + 100)).await,
        &body[body.len() - 5..]
    );
}

async fn list_with_pagination(store: Arc<dyn Store>) {
    // More than one ListObjectsV2 page (1000 keys).
    let count = 1_050;
    futures::stream::iter(0..count)
        .map(|i| {
            let store = store.clone();
            async move {
                storage::put_bytes(
                    store.as_ref(),
                    &format!("many/k{i:05}"),
                    Bytes::from(format!("{i}")),
                )
                .await
                .unwrap();
            }
        })
        .buffer_unordered(32)
        .collect::<Vec<()>>()
        .await;
    storage::put_bytes(store.as_ref(), "manyother/x", Bytes::from_static(b"x"))
        .await
        .unwrap();
    let listed = store.list("many/").await.unwrap();
    assert_eq!(listed.len(), count);
    let keys: Vec<&str> = listed.iter().map(|o| o.key.as_str()).collect();
    let mut sorted = keys.clone();
    sorted.sort();
    assert_eq!(keys, sorted, "list is sorted by key");
    assert_eq!(keys[0], "many/k00000");
    assert_eq!(listed[7].size, 1);
    // A prefix is a string prefix, not only a directory.
    assert_eq!(store.list("many/k0104").await.unwrap().len(), 10);
    assert_eq!(store.list("many").await.unwrap().len(), count + 1);

    // Page by page, the same keys in the same order, each once.
    let mut paged = Vec::new();
    let mut after: Option<String> = None;
    loop {
        let page = store
            .list_page("many/", after.as_deref(), 400)
            .await
            .unwrap();
        assert!(page.len() <= 400);
        let Some(last) = page.last() else { break };
        after = Some(last.key.clone());
        paged.extend(page.into_iter().map(|o| o.key));
    }
    assert_eq!(paged, keys);
}

async fn multipart(store: &dyn Store) {
    // At least three parts of 5 MiB.
    let body = noise(16 * MIB + 777, 2);
    let size = put_chunked(store, "big/object", &body).await.unwrap();
    assert_eq!(size, body.len() as u64);
    assert_eq!(
        store.head("big/object").await.unwrap().size,
        body.len() as u64
    );
    assert!(
        read_all(store, "big/object", None).await == body,
        "multipart object reads back byte for byte"
    );
    assert!(store.list_incomplete("big/").await.unwrap().is_empty());
}

async fn create_if_absent(store: &dyn Store) {
    store
        .create_if_absent("cond/manifest.json", Bytes::from_static(b"first"))
        .await
        .unwrap();
    let second = store
        .create_if_absent("cond/manifest.json", Bytes::from_static(b"second"))
        .await;
    assert!(
        matches!(second, Err(StoreError::AlreadyExists { .. })),
        "{second:?}"
    );
    assert_eq!(read_all(store, "cond/manifest.json", None).await, b"first");
}

/// The producer stops after several parts without finishing: nothing is stored and no
/// incomplete upload remains.
async fn abandoned_upload_leaves_nothing(store: &dyn Store) {
    let (sender, stream) = PartStream::channel(4);
    let feeder = tokio::spawn(async move {
        for seed in 0..12 {
            if sender.send(Bytes::from(noise(MIB, seed))).await.is_err() {
                return;
            }
        }
        drop(sender);
    });
    let result = store.put("abandoned/object", stream).await;
    feeder.await.unwrap();
    assert!(
        matches!(result, Err(StoreError::Abandoned { .. })),
        "{result:?}"
    );
    assert!(matches!(
        store.head("abandoned/object").await,
        Err(StoreError::NotFound { .. })
    ));
    assert!(store.list("abandoned/").await.unwrap().is_empty());
    assert!(
        store.list_incomplete("").await.unwrap().is_empty(),
        "no incomplete upload is left behind"
    );
}

/// An upload a killed run left open under `open/object` (made by the caller, as each backend
/// leaves one) is listed under its prefix only, is no object, and is gone once aborted;
/// aborting it again is no error.
async fn interrupted_upload_is_listed_and_aborted(store: &dyn Store) {
    assert!(store.list("open/").await.unwrap().is_empty(), "no object");
    assert!(store.list_incomplete("other/").await.unwrap().is_empty());
    let open = store.list_incomplete("open/").await.unwrap();
    assert_eq!(
        open.iter().map(|u| u.key.as_str()).collect::<Vec<_>>(),
        ["open/object"],
        "{open:?}"
    );
    assert!(open[0].initiated.is_some(), "{open:?}");
    store.abort_incomplete(&open[0]).await.unwrap();
    assert!(store.list_incomplete("").await.unwrap().is_empty());
    store.abort_incomplete(&open[0]).await.unwrap();
    assert!(matches!(
        store.head("open/object").await,
        Err(StoreError::NotFound { .. })
    ));
}

async fn suite(store: Arc<dyn Store>) {
    small_objects_round_trip(store.as_ref()).await;
    missing_objects(store.as_ref()).await;
    invalid_keys(store.as_ref()).await;
    ranged_get(store.as_ref()).await;
    multipart(store.as_ref()).await;
    create_if_absent(store.as_ref()).await;
    abandoned_upload_leaves_nothing(store.as_ref()).await;
    list_with_pagination(store).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn local_store_conformance() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(LocalStore::new(dir.path().join("repo")));
    suite(store.clone()).await;
    // What a killed run leaves: its temp file beside where the object would go.
    std::fs::create_dir_all(dir.path().join("repo/open")).unwrap();
    std::fs::write(
        dir.path().join("repo/open/.object.lifeboat-tmp-k1ll3d"),
        noise(MIB, 3),
    )
    .unwrap();
    interrupted_upload_is_listed_and_aborted(store.as_ref()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn s3_store_conformance() {
    let server = SeaweedFs::start().await;
    server.create_bucket("conformance").await;
    let store = S3Store::connect_with_key(
        &server.settings("conformance", "some/prefix"),
        crate::common::seaweedfs::ACCESS_KEY,
        crate::common::seaweedfs::SECRET_KEY,
    )
    .await;
    suite(Arc::new(store.clone())).await;
    // What a killed run leaves: a multipart upload with a part and no end.
    let client = server.client();
    let upload = client
        .create_multipart_upload()
        .bucket("conformance")
        .key("some/prefix/open/object")
        .send()
        .await
        .unwrap();
    client
        .upload_part()
        .bucket("conformance")
        .key("some/prefix/open/object")
        .upload_id(upload.upload_id().unwrap())
        .part_number(1)
        .body(noise(5 * MIB, 3).into())
        .send()
        .await
        .unwrap();
    interrupted_upload_is_listed_and_aborted(&store).await;
    // The prefix is honoured: nothing was written outside it.
    let outside: Vec<String> = server
        .keys("conformance", "")
        .await
        .into_iter()
        .filter(|k| !k.starts_with("some/prefix/"))
        .collect();
    assert!(outside.is_empty(), "keys outside the prefix: {outside:?}");
    assert!(server.open_uploads("conformance").await.is_empty());
}

/// An object past a thousand parts of `part_size` grows its parts rather than run into S3's
/// 10,000 only hours later: on a real SeaweedFS, with 5 MiB parts, an object of
/// `LIFEBOAT_LARGE_OBJECT_MIB` (default 5,200: the second thousand starts) is stored with the
/// part count and the largest part the schedule gives, and reads back right across the
/// boundary where the parts double. (`LIFEBOAT_LARGE_OBJECT_MIB=30720` is the 30 GiB run.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_parts_grow_past_a_thousand() {
    let mib: u64 = std::env::var("LIFEBOAT_LARGE_OBJECT_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5_200);
    let server = SeaweedFs::start().await;
    server.create_bucket("large").await;
    let store = S3Store::connect_with_key(
        &server.settings("large", ""),
        crate::common::seaweedfs::ACCESS_KEY,
        crate::common::seaweedfs::SECRET_KEY,
    )
    .await;
    // A MiB of noise, each copy stamped with its index: byte for byte, every MiB differs.
    let block = Arc::new(noise(MIB, 9));
    let stamp = {
        let block = block.clone();
        move |index: u64| {
            let mut chunk = block.as_ref().clone();
            chunk[..8].copy_from_slice(&index.to_le_bytes());
            Bytes::from(chunk)
        }
    };
    let stamped = stamp.clone();
    let (sender, stream) = PartStream::channel(4);
    let feeder = tokio::spawn(async move {
        for index in 0..mib {
            if sender.send(stamped(index)).await.is_err() {
                return;
            }
        }
        let _ = sender.finish().await;
    });
    let receipt = store.put("large/object", stream).await.unwrap();
    feeder.await.unwrap();
    let total = mib * MIB as u64;
    let base = 5 * MIB as u64;
    let (mut parts, mut left, mut largest) = (0, total, 0);
    while left > 0 {
        parts += 1;
        let size = lifeboat::storage::s3::part_size_of(base, parts).min(left);
        largest = largest.max(size);
        left -= size;
    }
    println!(
        "{mib} MiB stored in {} parts, the largest {} MiB",
        receipt.parts,
        receipt.largest_part / MIB as u64
    );
    assert_eq!(
        (receipt.size, receipt.parts, receipt.largest_part),
        (total, parts as u32, largest)
    );
    assert!(largest > base, "the parts did not grow");
    assert_eq!(store.head("large/object").await.unwrap().size, total);
    // Across the first doubling, and at the very end.
    for at in [1_000 * base - 8, total - 16] {
        let read = read_all(&store, "large/object", Some(at..at + 16)).await;
        let expected: Vec<u8> = (at..at + 16)
            .map(|offset| {
                let (index, within) = (offset / MIB as u64, (offset % MIB as u64) as usize);
                stamp(index)[within]
            })
            .collect();
        assert_eq!(read, expected, "bytes at {at}");
    }
    store.delete("large/object").await.unwrap();
}
