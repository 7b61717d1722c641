//! A real redis-server for tests: on a free loopback port, with a password, persistence off,
//! in its own temp dir; stopped by its pid when dropped.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const PASSWORD: &str = "redis:pw\\1";

pub struct Redis {
    child: Option<Child>,
    pub dir: tempfile::TempDir,
    pub port: u16,
}

impl Redis {
    /// `extra`: more `--name value` arguments.
    pub fn start(extra: &[&str]) -> Redis {
        for _ in 0..5 {
            let dir = tempfile::tempdir().unwrap();
            let port = super::postgres::free_port();
            let child = Command::new("redis-server")
                .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
                .arg("--dir")
                .arg(dir.path())
                .args([
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                    "--requirepass",
                    PASSWORD,
                ])
                .arg("--logfile")
                .arg(dir.path().join("redis.log"))
                .args(extra)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("redis-server is needed for the Redis tests; run `bash .ci/setup`");
            let mut redis = Redis {
                child: Some(child),
                dir,
                port,
            };
            if redis.wait_ready() {
                return redis;
            }
            // Another process may have taken the port between the probe and the start.
            redis.stop();
        }
        panic!("redis-server did not start");
    }

    fn wait_ready(&mut self) -> bool {
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if self.child.as_mut().unwrap().try_wait().unwrap().is_some() {
                return false;
            }
            if let Ok(mut connection) = self.connection()
                && redis::cmd("PING").query::<String>(&mut connection).is_ok()
            {
                return true;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        false
    }

    pub fn connection(&self) -> redis::RedisResult<redis::Connection> {
        redis::Client::open(format!(
            "redis://:{}@127.0.0.1:{}/",
            urlencoding(PASSWORD),
            self.port
        ))?
        .get_connection()
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
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

impl Drop for Redis {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A connection to a redis-server on loopback `port` that uses [`PASSWORD`] and was
/// started by someone else (a runbook).
pub fn connect(port: u16) -> redis::Connection {
    redis::Client::open(format!(
        "redis://:{}@127.0.0.1:{port}/",
        urlencoding(PASSWORD)
    ))
    .unwrap()
    .get_connection()
    .unwrap()
}

fn urlencoding(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// Every key of `connection`'s database 0 with its type, its value rendered comparably
/// (members sorted where order is not part of the value) and its absolute expiry in ms.
pub fn snapshot(connection: &mut redis::Connection) -> Vec<(Vec<u8>, String, String, i64)> {
    let mut keys: Vec<Vec<u8>> = redis::cmd("KEYS").arg("*").query(connection).unwrap();
    keys.sort();
    let mut out = Vec::with_capacity(keys.len());
    for batch in keys.chunks(5000) {
        let mut types = redis::pipe();
        for key in batch {
            types.cmd("TYPE").arg(key).cmd("PEXPIRETIME").arg(key);
        }
        let meta: Vec<redis::Value> = types.query(connection).unwrap();
        let mut values = redis::pipe();
        let mut kinds = Vec::new();
        for (index, key) in batch.iter().enumerate() {
            let kind = match &meta[2 * index] {
                redis::Value::SimpleString(kind) => kind.clone(),
                other => format!("{other:?}"),
            };
            match kind.as_str() {
                "string" => values.cmd("GET").arg(key),
                "hash" => values.cmd("HGETALL").arg(key),
                "list" => values.cmd("LRANGE").arg(key).arg(0).arg(-1),
                "set" => values.cmd("SMEMBERS").arg(key),
                "zset" => values
                    .cmd("ZRANGE")
                    .arg(key)
                    .arg(0)
                    .arg(-1)
                    .arg("WITHSCORES"),
                "stream" => values.cmd("XRANGE").arg(key).arg("-").arg("+"),
                other => panic!("unexpected type {other}"),
            };
            kinds.push(kind);
        }
        let rendered: Vec<redis::Value> = values.query(connection).unwrap();
        for (index, key) in batch.iter().enumerate() {
            let mut text = format!("{:?}", rendered[index]);
            if kinds[index] == "set" || kinds[index] == "hash" {
                // Members come back in hash-table order, which a reload may change.
                let mut parts: Vec<String> = match &rendered[index] {
                    redis::Value::Array(items) => items.iter().map(|i| format!("{i:?}")).collect(),
                    other => vec![format!("{other:?}")],
                };
                if kinds[index] == "hash" {
                    let mut pairs: Vec<String> =
                        parts.chunks(2).map(|pair| pair.join("=")).collect();
                    pairs.sort();
                    parts = pairs;
                } else {
                    parts.sort();
                }
                text = parts.join(",");
            }
            let expires = match &meta[2 * index + 1] {
                redis::Value::Int(ms) => *ms,
                other => panic!("PEXPIRETIME gave {other:?}"),
            };
            out.push((key.clone(), kinds[index].clone(), text, expires));
        }
    }
    out
}
