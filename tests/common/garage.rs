//! A second S3-compatible server for tests: Garage, single node on loopback ports, with its
//! own directory, started per test and stopped (by its pid) when dropped. Garage differs
//! from SeaweedFS where lifeboat must not trip: it implements no Object Lock (501
//! NotImplemented) and ignores conditional writes.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::postgres::free_port;

/// Garage's key ids are "GK" and 24 hex digits, its secrets 64 hex digits.
pub const ACCESS_KEY: &str = "GK0123456789abcdef01234567";
pub const SECRET_KEY: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
pub const REGION: &str = "garage";

pub struct Garage {
    child: Option<Child>,
    pub dir: tempfile::TempDir,
    pub endpoint: String,
}

fn garage_binary() -> PathBuf {
    if let Ok(path) = std::env::var("LIFEBOAT_TEST_GARAGE") {
        return PathBuf::from(path);
    }
    let bundled = Path::new(env!("CARGO_MANIFEST_DIR")).join(".tools/garage/bin/garage");
    assert!(
        bundled.exists(),
        "the Garage binary is needed for the S3 cross-check and was not found at '{}'; run `bash .ci/setup` (it builds Garage from its crate once)",
        bundled.display()
    );
    bundled
}

impl Garage {
    /// Starts a node, gives it a layout, imports the test key and makes `bucket`, which the
    /// key may read, write and own.
    pub fn start(bucket: &str) -> Garage {
        let dir = tempfile::tempdir().unwrap();
        let (s3, rpc, admin) = (free_port(), free_port(), free_port());
        let config = dir.path().join("garage.toml");
        std::fs::write(
            &config,
            format!(
                "metadata_dir = \"{0}/meta\"\ndata_dir = \"{0}/data\"\ndb_engine = \"sqlite\"\nreplication_factor = 1\n\
                 rpc_bind_addr = \"127.0.0.1:{rpc}\"\nrpc_public_addr = \"127.0.0.1:{rpc}\"\n\
                 rpc_secret = \"{SECRET_KEY}\"\n\n[s3_api]\ns3_region = \"{REGION}\"\n\
                 api_bind_addr = \"127.0.0.1:{s3}\"\nroot_domain = \".s3.garage.localhost\"\n\n\
                 [admin]\napi_bind_addr = \"127.0.0.1:{admin}\"\n",
                dir.path().display()
            ),
        )
        .unwrap();
        let log = std::fs::File::create(dir.path().join("garage.log")).unwrap();
        let child = Command::new(garage_binary())
            .arg("-c")
            .arg(&config)
            .arg("server")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        let mut garage = Garage {
            child: Some(child),
            dir,
            endpoint: format!("http://127.0.0.1:{s3}"),
        };
        let admin = |args: &[&str]| -> String {
            let deadline = Instant::now() + Duration::from_secs(30);
            loop {
                let output = Command::new(garage_binary())
                    .arg("-c")
                    .arg(&config)
                    .args(args)
                    .output()
                    .unwrap();
                if output.status.success() {
                    return String::from_utf8_lossy(&output.stdout).into_owned();
                }
                assert!(
                    Instant::now() < deadline,
                    "garage {args:?}: {}",
                    String::from_utf8_lossy(&output.stderr)
                );
                std::thread::sleep(Duration::from_millis(200));
            }
        };
        let node = admin(&["node", "id", "-q"]);
        let node = node.trim().split('@').next().unwrap().to_string();
        admin(&["layout", "assign", "-z", "dc1", "-c", "1G", &node]);
        admin(&["layout", "apply", "--version", "1"]);
        admin(&[
            "key", "import", "--yes", "-n", "test", ACCESS_KEY, SECRET_KEY,
        ]);
        admin(&["bucket", "create", bucket]);
        admin(&[
            "bucket", "allow", "--read", "--write", "--owner", bucket, "--key", "test",
        ]);
        garage.wait_ready();
        garage
    }

    fn wait_ready(&mut self) {
        let address = self.endpoint.trim_start_matches("http://").to_string();
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect(&address).is_err() {
            assert!(Instant::now() < deadline, "Garage's S3 port never opened");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// A `[[repository]]` block for this server; `extra` lines go at its end.
    pub fn repository(&self, name: &str, bucket: &str, extra: &str) -> String {
        format!(
            "[[repository]]\nname = \"{name}\"\ntype = \"s3\"\nbucket = \"{bucket}\"\nprefix = \"lifeboat\"\nregion = \"{REGION}\"\nendpoint = \"{}\"\npath_style = true\npart_size = \"5MiB\"\nmax_attempts = 2\n{extra}\n\n",
            self.endpoint
        )
    }
}

impl Drop for Garage {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // SAFETY: a pid this test started.
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if child.try_wait().unwrap().is_some() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
