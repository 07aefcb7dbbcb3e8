//! The nginx-compatible ring against a real nginx: the same `server` list with the same
//! weights must send the same key to the same backend as `hash $arg_key consistent`.
//!
//! Needs the `nginx` binary; `scripts/test` installs it. Without it the test fails (it does
//! not skip), so that CI cannot silently stop checking compatibility.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tower::{Layer, Service, ServiceExt};
use tower_lb::{
    discover,
    key::key_fn,
    strategy::ConsistentHash,
    weight::{Weight, Weighted},
    BalanceLayer,
};

const KEYS: usize = 4_000;
const CONNECTIONS: usize = 8;

/// A backend that answers every HTTP request with its own address, then closes.
async fn backend() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let mut stream = BufReader::new(stream);
                let mut line = String::new();
                // The request head ends with an empty line; nginx sends no body for a GET.
                loop {
                    line.clear();
                    if stream.read_line(&mut line).await.unwrap_or(0) == 0 || line == "\r\n" {
                        break;
                    }
                }
                let body = address.to_string();
                let response = format!(
                    "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = stream.get_mut().write_all(response.as_bytes()).await;
            });
        }
    });
    address
}

/// nginx in single-process mode, in its own directory; killed and cleaned up on drop.
struct Nginx {
    child: Child,
    dir: PathBuf,
    address: SocketAddr,
}

/// The nginx binary: on the `PATH`, or where packages put it (`/usr/sbin` is often not on a
/// non-root user's `PATH`).
fn nginx_binary() -> PathBuf {
    [
        "nginx",
        "/usr/sbin/nginx",
        "/usr/local/sbin/nginx",
        "/usr/local/nginx/sbin/nginx",
    ]
    .into_iter()
    .map(PathBuf::from)
    .find(|binary| {
        Command::new(binary)
            .arg("-v")
            .stderr(Stdio::null())
            .status()
            .is_ok()
    })
    .unwrap_or_else(|| {
        panic!(
            "nginx is needed to check nginx compatibility and was not found; \
                 run the tests through scripts/test, which installs it"
        )
    })
}

impl Nginx {
    fn start(upstream: &str) -> Self {
        let binary = nginx_binary();
        let dir = std::env::temp_dir().join(format!("tower-lb-nginx-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let address = {
            // A free port: taken from the OS, released for nginx to bind.
            let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            probe.local_addr().unwrap()
        };
        let d = dir.display();
        let config = format!(
            "worker_processes 1;
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{ worker_connections 256; }}
http {{
    access_log off;
    client_body_temp_path {d}/client_body;
    proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;
    upstream backends {{
        hash $arg_key consistent;
{upstream}    }}
    server {{
        listen {address};
        location / {{
            proxy_pass http://backends;
            proxy_next_upstream off;
        }}
    }}
}}
"
        );
        std::fs::write(dir.join("nginx.conf"), config).unwrap();
        // `-e` (nginx 1.19.5+) keeps even the earliest log lines out of /var/log.
        let child = Command::new(binary)
            .arg("-p")
            .arg(&dir)
            .arg("-e")
            .arg(dir.join("error.log"))
            .args(["-c", "nginx.conf", "-g", "daemon off; master_process off;"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("nginx starts");
        Self {
            child,
            dir,
            address,
        }
    }

    /// Waits (bounded) until nginx accepts connections. nginx is another process, so this
    /// polls on the real clock.
    async fn ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                let log = std::fs::read_to_string(self.dir.join("error.log")).unwrap_or_default();
                panic!("nginx exited ({status}):\n{log}");
            }
            if TcpStream::connect(self.address).await.is_ok() {
                return;
            }
            assert!(Instant::now() < deadline, "nginx did not start listening");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Sends `GET /?key=K` for each key over one keep-alive connection; returns the bodies.
async fn ask(nginx: SocketAddr, keys: Vec<String>) -> Vec<(String, String)> {
    let mut stream = BufReader::new(TcpStream::connect(nginx).await.unwrap());
    let mut answers = Vec::with_capacity(keys.len());
    for key in keys {
        let request = format!("GET /?key={key} HTTP/1.1\r\nHost: test\r\n\r\n");
        stream
            .get_mut()
            .write_all(request.as_bytes())
            .await
            .unwrap();
        let mut head = String::new();
        let mut length = None;
        loop {
            let mut line = String::new();
            assert!(
                stream.read_line(&mut line).await.unwrap() > 0,
                "nginx closed"
            );
            if line == "\r\n" {
                break;
            }
            if let Some((name, value)) = line.split_once(':') {
                if name.eq_ignore_ascii_case("content-length") {
                    length = Some(value.trim().parse::<usize>().unwrap());
                }
            }
            head.push_str(&line);
        }
        assert!(head.starts_with("HTTP/1.1 200"), "nginx answered:\n{head}");
        let length = length.unwrap_or_else(|| panic!("no Content-Length in:\n{head}"));
        let mut body = vec![0; length];
        stream.read_exact(&mut body).await.unwrap();
        answers.push((key, String::from_utf8(body).unwrap()));
    }
    answers
}

/// Answers its own address.
#[derive(Clone, Debug)]
struct Backend(SocketAddr);

impl Service<String> for Backend {
    type Response = SocketAddr;
    type Error = std::convert::Infallible;
    type Future = std::future::Ready<Result<SocketAddr, Self::Error>>;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: String) -> Self::Future {
        std::future::ready(Ok(self.0))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_go_where_nginx_sends_them() {
    let mut backends = Vec::new();
    for weight in [1, 2, 3, 1] {
        backends.push((backend().await, weight));
    }
    let upstream: String = backends
        .iter()
        .map(|(address, weight)| format!("        server {address} weight={weight};\n"))
        .collect();
    let mut nginx = Nginx::start(&upstream);
    nginx.ready().await;

    let keys: Vec<String> = (0..KEYS).map(|i| format!("k{i}")).collect();
    let mut askers = Vec::new();
    for chunk in keys.chunks(KEYS / CONNECTIONS) {
        askers.push(tokio::spawn(ask(nginx.address, chunk.to_vec())));
    }
    let mut from_nginx = Vec::new();
    for asker in askers {
        from_nginx.extend(asker.await.unwrap());
    }
    drop(nginx);

    // The crate's choice: the same servers (identities "127.0.0.1:PORT") and weights.
    let mut balance = BalanceLayer::new(ConsistentHash::ring_nginx())
        .weighted()
        .key(key_fn(|key: &String| Some(key.clone())))
        .layer(discover::fixed(backends.iter().map(
            |&(address, weight)| {
                (
                    address,
                    Weighted::new(Backend(address), Weight::new(weight).unwrap()),
                )
            },
        )));
    let mut agree = 0;
    let mut used = std::collections::HashSet::new();
    for (key, nginx_choice) in &from_nginx {
        let ours = balance
            .ready()
            .await
            .unwrap()
            .call(key.clone())
            .await
            .unwrap();
        used.insert(ours);
        if ours.to_string() == *nginx_choice {
            agree += 1;
        }
    }
    assert_eq!(from_nginx.len(), KEYS);
    assert_eq!(used.len(), backends.len(), "every backend gets keys");
    let agreement = agree as f64 / KEYS as f64;
    println!("agreement with nginx: {agree}/{KEYS}");
    assert!(
        agreement >= 0.999,
        "only {agree} of {KEYS} keys went where nginx sent them"
    );
}
