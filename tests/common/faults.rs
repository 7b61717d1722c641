//! A TCP proxy between lifeboat and an S3 server that breaks chosen requests: answers them
//! with an error, delays them, cuts the connection after some bytes, or never answers.
//! Every request gets a connection of its own (`Connection: close` both ways), so a fault
//! hits exactly the request it was meant for.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

#[derive(Debug, Clone, Copy)]
pub enum Fault {
    /// Answer with this HTTP status and S3 error code; the server never sees the request.
    Respond(u16, &'static str),
    /// Forward the request after this long.
    Delay(Duration),
    /// Forward the request head and this many bytes of its body, then cut both connections.
    CutRequestAfter(u64),
    /// Forward the request, relay this many bytes of the response body, then cut.
    CutResponseAfter(u64),
    /// Forward the request, relay this many bytes of the response body, then send nothing
    /// more while keeping the connection open.
    StallResponseAfter(u64),
    /// Take the request and never answer.
    Stall,
    /// Forward the request and answer its 206 as a 200 without a Content-Range, as a server
    /// or middlebox that ignores Range would (the body is still the range's).
    RangeIgnored,
    /// Forward the request and relay the response body 1 KiB at a time, this long apart:
    /// never quiet long enough to count as a stall.
    Trickle(Duration),
}

/// Which requests a fault hits: the method, a piece of the target (path and query), how many
/// matching requests to let through first, and how many to break (None: every one after).
#[derive(Debug, Clone)]
pub struct Rule {
    pub method: &'static str,
    pub target_contains: String,
    pub skip: usize,
    pub times: Option<usize>,
    pub fault: Fault,
}

impl Rule {
    /// Breaks the first matching request only.
    pub fn once(method: &'static str, target_contains: &str, fault: Fault) -> Rule {
        Rule {
            method,
            target_contains: target_contains.to_string(),
            skip: 0,
            times: Some(1),
            fault,
        }
    }

    /// Breaks every matching request.
    pub fn always(method: &'static str, target_contains: &str, fault: Fault) -> Rule {
        Rule {
            times: None,
            ..Rule::once(method, target_contains, fault)
        }
    }

    /// Lets `count` matching requests through first.
    pub fn after(mut self, count: usize) -> Rule {
        self.skip = count;
        self
    }

    fn matches(&self, method: &str, target: &str) -> bool {
        (self.method == "*" || self.method == method) && target.contains(&self.target_contains)
    }
}

#[derive(Default)]
struct State {
    rules: Vec<Rule>,
    /// Every request seen, as "METHOD target", with the fault applied to it if any.
    seen: Vec<(String, Option<Fault>)>,
}

pub struct FaultProxy {
    /// `http://127.0.0.1:PORT`: put it in the repository's `endpoint`.
    pub endpoint: String,
    state: Arc<Mutex<State>>,
    /// Dropped with the proxy, which ends its thread (and every connection it holds).
    _stop: tokio::sync::oneshot::Sender<()>,
}

impl FaultProxy {
    /// A proxy on a free loopback port in front of `upstream` (`http://127.0.0.1:PORT`).
    pub fn start(upstream: &str) -> FaultProxy {
        let upstream: SocketAddr = upstream
            .trim_start_matches("http://")
            .trim_end_matches('/')
            .parse()
            .expect("the upstream is http://IP:PORT");
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind the proxy");
        listener.set_nonblocking(true).unwrap();
        let endpoint = format!("http://{}", listener.local_addr().unwrap());
        let state = Arc::new(Mutex::new(State::default()));
        let shared = state.clone();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        // A thread and runtime of its own: the tests that use it may be async or not.
        std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async move {
                let listener = TcpListener::from_std(listener).unwrap();
                let accept = async {
                    while let Ok((client, _)) = listener.accept().await {
                        let shared = shared.clone();
                        tokio::spawn(async move {
                            let _ = serve(client, upstream, shared).await;
                        });
                    }
                };
                tokio::select! {
                    _ = accept => {}
                    _ = stopped => {}
                }
            });
            runtime.shutdown_background();
        });
        FaultProxy {
            endpoint,
            state,
            _stop: stop,
        }
    }

    pub fn set(&self, rules: Vec<Rule>) {
        self.state.lock().unwrap().rules = rules;
    }

    /// No more faults; the requests seen are kept.
    pub fn clear(&self) {
        self.set(Vec::new());
    }

    /// The requests that were broken, as "METHOD target".
    pub fn faulted(&self) -> Vec<String> {
        let state = self.state.lock().unwrap();
        state
            .seen
            .iter()
            .filter(|(_, fault)| fault.is_some())
            .map(|(request, _)| request.clone())
            .collect()
    }

    /// How many requests matched `method` and `target_contains`.
    pub fn count(&self, method: &str, target_contains: &str) -> usize {
        let wanted = format!("{method} ");
        let state = self.state.lock().unwrap();
        state
            .seen
            .iter()
            .filter(|(r, _)| r.starts_with(&wanted) && r.contains(target_contains))
            .count()
    }
}

/// The fault for this request, if a rule wants one; counts it against the rule.
fn choose(state: &Mutex<State>, method: &str, target: &str) -> Option<Fault> {
    let mut state = state.lock().unwrap();
    let mut chosen = None;
    for rule in state.rules.iter_mut() {
        if !rule.matches(method, target) {
            continue;
        }
        if rule.skip > 0 {
            rule.skip -= 1;
            continue;
        }
        match &mut rule.times {
            Some(0) => continue,
            Some(left) => *left -= 1,
            None => {}
        }
        chosen = Some(rule.fault);
        break;
    }
    state.seen.push((format!("{method} {target}"), chosen));
    chosen
}

/// Reads up to the end of an HTTP head; returns the head and whatever body bytes came with it.
async fn read_head(
    stream: &mut (impl AsyncRead + Unpin),
) -> std::io::Result<Option<(String, Vec<u8>)>> {
    let mut buffer = Vec::new();
    let mut chunk = [0u8; 8192];
    loop {
        if let Some(end) = buffer.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buffer[..end + 4]).into_owned();
            return Ok(Some((head, buffer[end + 4..].to_vec())));
        }
        let read = stream.read(&mut chunk).await?;
        if read == 0 {
            return Ok(None);
        }
        buffer.extend_from_slice(&chunk[..read]);
    }
}

/// The head with any `Connection` header replaced by `Connection: close`.
fn closing(head: &str) -> String {
    let mut lines: Vec<&str> = head
        .trim_end_matches("\r\n")
        .split("\r\n")
        .filter(|l| !l.to_ascii_lowercase().starts_with("connection:"))
        .collect();
    lines.push("Connection: close");
    format!("{}\r\n\r\n", lines.join("\r\n"))
}

fn content_length(head: &str) -> u64 {
    head.split("\r\n")
        .find_map(|l| {
            let (name, value) = l.split_once(':')?;
            name.trim()
                .eq_ignore_ascii_case("content-length")
                .then(|| value.trim().parse().ok())?
        })
        .unwrap_or(0)
}

async fn serve(
    mut client: TcpStream,
    upstream: SocketAddr,
    state: Arc<Mutex<State>>,
) -> std::io::Result<()> {
    let Some((head, early_body)) = read_head(&mut client).await? else {
        return Ok(());
    };
    let mut request_line = head.split_whitespace();
    let method = request_line.next().unwrap_or_default().to_string();
    let target = request_line.next().unwrap_or_default().to_string();
    let fault = choose(&state, &method, &target);

    if let Some(Fault::Respond(status, code)) = fault {
        // The whole body first, so that the client reads the answer rather than a reset.
        let mut left = content_length(&head).saturating_sub(early_body.len() as u64);
        let mut sink = [0u8; 65536];
        while left > 0 {
            let read = client.read(&mut sink).await?;
            if read == 0 {
                break;
            }
            left = left.saturating_sub(read as u64);
        }
        let body = format!(
            "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Error><Code>{code}</Code><Message>injected by the test proxy</Message><RequestId>fault</RequestId></Error>"
        );
        let response = format!(
            "HTTP/1.1 {status} {code}\r\nContent-Type: application/xml\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        client.write_all(response.as_bytes()).await?;
        client.shutdown().await?;
        return Ok(());
    }
    if let Some(Fault::Delay(delay)) = fault {
        tokio::time::sleep(delay).await;
    }
    if let Some(Fault::Stall) = fault {
        // Hold both ends until the client gives up.
        let mut sink = [0u8; 65536];
        while client.read(&mut sink).await? > 0 {}
        return Ok(());
    }

    let mut server = TcpStream::connect(upstream).await?;
    server.write_all(closing(&head).as_bytes()).await?;
    let (client_read, mut client_write) = client.into_split();
    let (mut server_read, server_write) = server.into_split();

    let request_limit = match fault {
        Some(Fault::CutRequestAfter(bytes)) => Some(bytes),
        _ => None,
    };
    let to_server = relay(client_read, server_write, early_body, request_limit);

    let response_limit = match fault {
        Some(Fault::CutResponseAfter(bytes)) | Some(Fault::StallResponseAfter(bytes)) => {
            Some(bytes)
        }
        _ => None,
    };
    let stall = matches!(fault, Some(Fault::StallResponseAfter(_)));
    let to_client = async move {
        let Some((response_head, pending)) = read_head(&mut server_read).await? else {
            return Ok::<(), std::io::Error>(());
        };
        let response_head = match fault {
            Some(Fault::RangeIgnored) => response_head
                .replacen("206 Partial Content", "200 OK", 1)
                .split("\r\n")
                .filter(|l| !l.to_ascii_lowercase().starts_with("content-range:"))
                .collect::<Vec<_>>()
                .join("\r\n"),
            _ => response_head,
        };
        client_write
            .write_all(closing(&response_head).as_bytes())
            .await?;
        if let Some(Fault::Trickle(pause)) = fault {
            client_write.write_all(&pending).await?;
            let mut piece = [0u8; 1024];
            loop {
                let read = server_read.read(&mut piece).await?;
                if read == 0 {
                    return Ok(());
                }
                client_write.write_all(&piece[..read]).await?;
                tokio::time::sleep(pause).await;
            }
        }
        let cut = relay(&mut server_read, &mut client_write, pending, response_limit).await?;
        match (cut, stall) {
            (true, true) => std::future::pending::<()>().await,
            (true, false) => {}
            (false, _) => client_write.shutdown().await?,
        }
        Ok(())
    };

    tokio::pin!(to_client);
    tokio::select! {
        cut = to_server => {
            // A cut request ends both connections at once; a client that only closed its
            // sending side still gets its answer.
            if let Ok(false) = cut {
                let _ = (&mut to_client).await;
            }
        }
        _ = &mut to_client => {}
    }
    Ok(())
}

/// Copies `pending`, then everything `from` sends, to `to`, up to `limit` bytes in all;
/// true when the limit cut it short, false at the end of `from`.
async fn relay(
    mut from: impl AsyncRead + Unpin,
    mut to: impl AsyncWrite + Unpin,
    mut pending: Vec<u8>,
    limit: Option<u64>,
) -> std::io::Result<bool> {
    let mut passed = 0u64;
    let mut chunk = vec![0u8; 65536];
    loop {
        if !pending.is_empty() {
            let allowed = match limit {
                Some(limit) => (limit.saturating_sub(passed) as usize).min(pending.len()),
                None => pending.len(),
            };
            to.write_all(&pending[..allowed]).await?;
            passed += allowed as u64;
            if allowed < pending.len() {
                return Ok(true);
            }
            pending.clear();
        }
        let read = from.read(&mut chunk).await?;
        if read == 0 {
            return Ok(false);
        }
        pending.extend_from_slice(&chunk[..read]);
    }
}
