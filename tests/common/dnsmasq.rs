//! A real DNS server for the tests: dnsmasq on a free loopback port, configured by flags alone,
//! with a hosts directory whose files can be replaced while it runs; killed on drop.
//!
//! Needs the `dnsmasq` binary (Debian's `dnsmasq-base`); `scripts/test` installs it. Without
//! it the tests fail rather than skip, so CI cannot silently stop testing against real DNS.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The longest wait for dnsmasq to start.
const START: Duration = Duration::from_secs(10);

/// A running dnsmasq.
pub struct Dnsmasq {
    child: Child,
    addr: SocketAddr,
    dir: PathBuf,
    log: Arc<Mutex<Vec<String>>>,
    flags: Vec<String>,
}

fn binary() -> PathBuf {
    ["dnsmasq", "/usr/sbin/dnsmasq", "/usr/local/sbin/dnsmasq"]
        .into_iter()
        .map(PathBuf::from)
        .find(|binary| {
            Command::new(binary)
                .arg("--version")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok()
        })
        .unwrap_or_else(|| {
            panic!(
                "dnsmasq is needed for the DNS tests and was not found; run the tests through \
                 scripts/test, which installs it (Debian package dnsmasq-base)"
            )
        })
}

/// A port free for both UDP and TCP on 127.0.0.1 (taken from the OS, then released).
fn free_port() -> u16 {
    for _ in 0..100 {
        let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let port = udp.local_addr().unwrap().port();
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no port free for both UDP and TCP in 100 tries");
}

impl Dnsmasq {
    /// Starts dnsmasq answering for `*.test` only (other names in `.test` are NXDOMAIN), with
    /// `ttl` seconds on its local records and the extra `flags` (`--host-record=…`,
    /// `--srv-host=…`); `hosts` is the first content of the hosts directory's one file.
    pub fn start(ttl: u32, hosts: &str, flags: &[String]) -> Self {
        static STARTED: AtomicUsize = AtomicUsize::new(0);
        let n = STARTED.fetch_add(1, Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("tower-lb-dnsmasq-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("hosts")).unwrap();
        std::fs::write(dir.join("hosts").join("names"), hosts).unwrap();
        let mut flags = flags.to_vec();
        flags.extend([
            format!("--local-ttl={ttl}"),
            "--local=/test/".to_owned(),
            format!("--hostsdir={}", dir.join("hosts").display()),
        ]);
        let port = free_port();
        let (child, log) = Self::spawn(port, &flags);
        Self {
            child,
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            dir,
            log,
            flags,
        }
    }

    /// Starts dnsmasq on `port` and waits until it serves.
    fn spawn(port: u16, flags: &[String]) -> (Child, Arc<Mutex<Vec<String>>>) {
        let mut child = Command::new(binary())
            .args([
                "--keep-in-foreground",
                &format!("--port={port}"),
                "--listen-address=127.0.0.1",
                "--bind-interfaces",
                "--no-resolv",
                "--no-hosts",
                "--pid-file=",
                "--log-queries",
                "--log-facility=-",
            ])
            .args(flags)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("dnsmasq starts");
        let log = Arc::new(Mutex::new(Vec::<String>::new()));
        let stderr = child.stderr.take().unwrap();
        let lines = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { return };
                lines.lock().unwrap().push(line);
            }
        });
        let deadline = Instant::now() + START;
        while !log
            .lock()
            .unwrap()
            .iter()
            .any(|l| l.contains("started, version"))
        {
            if let Ok(Some(status)) = child.try_wait() {
                panic!("dnsmasq exited ({status}): {:#?}", log.lock().unwrap());
            }
            assert!(
                Instant::now() < deadline,
                "dnsmasq did not start in {START:?}"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        (child, log)
    }

    /// Where it listens.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Replaces the hosts file and waits until dnsmasq has read it.
    pub fn set_hosts(&self, hosts: &str) {
        let before = self.count(|l| l.contains("read ") && l.contains("/hosts/names"));
        self.write_hosts(hosts);
        let deadline = Instant::now() + START;
        while self.count(|l| l.contains("read ") && l.contains("/hosts/names")) == before {
            assert!(
                Instant::now() < deadline,
                "dnsmasq did not reread its hosts"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Replaces the hosts file atomically, by a rename into the watched directory (a stopped
    /// server reads it when it starts again).
    pub fn write_hosts(&self, hosts: &str) {
        let staged = self.dir.join("names.new");
        std::fs::write(&staged, hosts).unwrap();
        std::fs::rename(&staged, self.dir.join("hosts").join("names")).unwrap();
    }

    fn count(&self, matches: impl Fn(&str) -> bool) -> usize {
        self.log
            .lock()
            .unwrap()
            .iter()
            .filter(|l| matches(l))
            .count()
    }

    /// How many queries of `kind` (`A`, `AAAA`, `SRV`) for `name` it has answered.
    pub fn queries(&self, kind: &str, name: &str) -> usize {
        let wanted = format!("query[{kind}] {name} from");
        self.count(|l| l.contains(&wanted))
    }

    /// Kills it (the hosts directory stays, for [`restart`](Self::restart)).
    pub fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Starts it again on the same port with the same flags and the hosts file as it is now.
    pub fn restart(&mut self) {
        self.stop();
        let (child, log) = Self::spawn(self.addr.port(), &self.flags);
        self.child = child;
        self.log = log;
    }
}

impl Drop for Dnsmasq {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
