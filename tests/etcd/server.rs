//! A real etcd (Debian's `etcd-server`, which `scripts/install-tools` installs) on loopback
//! ports, with a temporary data directory; killed and removed on drop. Also used by the gRPC
//! example's tests (`#[path]`).

use std::net::{Ipv4Addr, TcpListener};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use tower_lb::discover::etcd::etcd_client::Client;

/// How long etcd may take to start answering.
const STARTUP: Duration = Duration::from_secs(20);

/// An etcd server for one test.
pub(crate) struct EtcdServer {
    child: Option<Child>,
    dir: PathBuf,
    client_port: u16,
    peer_port: u16,
}

impl EtcdServer {
    /// Starts etcd on free loopback ports and waits until it answers. Another process may
    /// take a port between its choice and etcd's start: then it tries other ports.
    pub(crate) async fn start() -> Self {
        let mut attempt = 1;
        loop {
            let mut server = Self::reserve();
            match server.try_run().await {
                Ok(()) => return server,
                Err(problem) if attempt < 3 => {
                    eprintln!("etcd attempt {attempt}: {problem}; trying other ports");
                    attempt += 1;
                }
                Err(problem) => panic!("{problem}"),
            }
        }
    }

    /// Picks the ports and the data directory without starting etcd: its clients see a
    /// server that is down until [`run`](Self::run).
    pub(crate) fn reserve() -> Self {
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "tower-lb-etcd-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("a temporary directory");
        Self {
            child: None,
            dir,
            client_port: free_port(),
            peer_port: free_port(),
        }
    }

    /// `http://127.0.0.1:<port>`.
    pub(crate) fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.client_port)
    }

    /// A client for this server (etcd-client connects lazily: this works while it is down).
    pub(crate) async fn client(&self) -> Client {
        Client::connect([self.endpoint()], None)
            .await
            .expect("an etcd client")
    }

    /// Starts (or restarts) etcd with the same ports and data, and waits until it answers.
    pub(crate) async fn run(&mut self) {
        if let Err(problem) = self.try_run().await {
            panic!("{problem}");
        }
    }

    async fn try_run(&mut self) -> Result<(), String> {
        assert!(self.child.is_none(), "etcd is already running");
        let url = |port: u16| format!("http://127.0.0.1:{port}");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.with_extension("log"))
            .expect("a log file");
        let child = Command::new(etcd_binary())
            .arg("--name=test")
            .arg(format!("--data-dir={}", self.dir.join("data").display()))
            .arg(format!("--listen-client-urls={}", url(self.client_port)))
            .arg(format!("--advertise-client-urls={}", url(self.client_port)))
            .arg(format!("--listen-peer-urls={}", url(self.peer_port)))
            .arg(format!(
                "--initial-advertise-peer-urls={}",
                url(self.peer_port)
            ))
            .arg(format!("--initial-cluster=test={}", url(self.peer_port)))
            // A single member elects itself; short timings make that (and a restart) quick.
            .arg("--heartbeat-interval=20")
            .arg("--election-timeout=200")
            .arg("--logger=zap")
            .arg("--log-outputs=stderr")
            .arg("--log-level=warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("etcd starts (is etcd-server installed? scripts/install-tools installs it)");
        self.child = Some(child);

        let started = Instant::now();
        let mut client = self.client().await;
        loop {
            let answered =
                tokio::time::timeout(Duration::from_secs(1), client.get("probe", None)).await;
            if let Ok(Ok(_)) = answered {
                return Ok(());
            }
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                self.child = None;
                let log =
                    std::fs::read_to_string(self.dir.with_extension("log")).unwrap_or_default();
                return Err(format!("etcd exited at start ({status}): {log}"));
            }
            if started.elapsed() > STARTUP {
                self.kill();
                return Err(format!("etcd did not answer within {STARTUP:?}"));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Kills etcd at once (SIGKILL), as a crash would; the data stays for [`run`](Self::run).
    pub(crate) fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for EtcdServer {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
        let _ = std::fs::remove_file(self.dir.with_extension("log"));
    }
}

fn etcd_binary() -> &'static str {
    if std::path::Path::new("/usr/bin/etcd").exists() {
        "/usr/bin/etcd"
    } else {
        "etcd"
    }
}

/// A loopback port nothing listens on now.
fn free_port() -> u16 {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("a loopback port");
    listener.local_addr().unwrap().port()
}
