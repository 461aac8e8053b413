//! A second, TLS-only RabbitMQ node on this machine, for the `amqps://` tests: certificates made
//! at test time with the `openssl` tool (a CA, a server certificate for `localhost` and
//! 127.0.0.1, a client certificate, and a second CA that signed nothing the broker uses), then
//! Debian's `rabbitmq-server` started as its own node (`cftls-PORT@localhost`) on free ports, with
//! its data, logs and config in a folder of its own. It requires a client certificate
//! (`verify_peer` + `fail_if_no_peer_cert`). The machine's main broker (5672) is not touched; the
//! node is stopped and its folder removed when the value is dropped.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

pub struct TlsBroker {
    pub dir: PathBuf,
    pub port: u16,
    pub node: String,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn sh(cmd: &mut Command) {
    let out = cmd.stdin(Stdio::null()).output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `openssl` making a key and a certificate `name` signed by `ca` (self-signed when `None`).
fn cert(dir: &Path, name: &str, cn: &str, ca: Option<&str>, san: Option<&str>) {
    let key = dir.join(format!("{name}.key"));
    let pem = dir.join(format!("{name}.pem"));
    let mut req = Command::new("openssl");
    req.args(["req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-keyout"])
        .arg(&key)
        .args(["-subj", &format!("/CN={cn}"), "-days", "2"]);
    match ca {
        None => {
            req.args(["-x509", "-out"]).arg(&pem).args(["-addext", "basicConstraints=critical,CA:TRUE"]);
            sh(&mut req);
        }
        Some(ca) => {
            let csr = dir.join(format!("{name}.csr"));
            req.arg("-out").arg(&csr);
            sh(&mut req);
            let ext = dir.join(format!("{name}.ext"));
            let mut e = String::from("basicConstraints=CA:FALSE\n");
            if let Some(san) = san {
                e.push_str(&format!("subjectAltName={san}\n"));
            }
            std::fs::write(&ext, e).unwrap();
            sh(Command::new("openssl")
                .args(["x509", "-req", "-days", "2", "-set_serial", &format!("{}", rand_serial()), "-in"])
                .arg(&csr)
                .arg("-CA")
                .arg(dir.join(format!("{ca}.pem")))
                .arg("-CAkey")
                .arg(dir.join(format!("{ca}.key")))
                .arg("-extfile")
                .arg(&ext)
                .arg("-out")
                .arg(&pem));
        }
    }
}

fn rand_serial() -> u64 {
    u64::from_le_bytes(uuid::Uuid::new_v4().as_bytes()[..8].try_into().unwrap()) >> 2
}

fn ctl(node: &str, args: &[&str]) -> std::process::Output {
    Command::new("timeout")
        .args(["60", "rabbitmqctl", "-q", "-n", node])
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("rabbitmqctl")
}

impl TlsBroker {
    /// Make the certificates and start the node; returns once it accepts TLS connections.
    pub fn start() -> TlsBroker {
        let port = free_port();
        let node = format!("cftls-{port}@localhost");
        let dir = std::env::temp_dir().join(format!("cropfleet-tls-{port}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        cert(&dir, "ca", "cropfleet test CA", None, None);
        cert(&dir, "other-ca", "some other CA", None, None);
        cert(&dir, "server", "localhost", Some("ca"), Some("DNS:localhost,IP:127.0.0.1"));
        cert(&dir, "client", "cropfleet-test-client", Some("ca"), None);
        let d = dir.display();
        std::fs::write(
            dir.join("rabbitmq.conf"),
            format!(
                "listeners.tcp = none\n\
                 listeners.ssl.default = 127.0.0.1:{port}\n\
                 ssl_options.cacertfile = {d}/ca.pem\n\
                 ssl_options.certfile = {d}/server.pem\n\
                 ssl_options.keyfile = {d}/server.key\n\
                 ssl_options.verify = verify_peer\n\
                 ssl_options.fail_if_no_peer_cert = true\n\
                 log.console = false\n\
                 log.file.level = info\n"
            ),
        )
        .unwrap();
        std::fs::write(dir.join("enabled_plugins"), "[].\n").unwrap();
        // The node runs as the rabbitmq user (Debian's wrapper switches to it).
        let uid = String::from_utf8(Command::new("id").args(["-u", "rabbitmq"]).output().unwrap().stdout).unwrap();
        let gid = String::from_utf8(Command::new("id").args(["-g", "rabbitmq"]).output().unwrap().stdout).unwrap();
        let (uid, gid): (u32, u32) = (uid.trim().parse().unwrap(), gid.trim().parse().unwrap());
        for e in std::fs::read_dir(&dir).unwrap() {
            std::os::unix::fs::chown(e.unwrap().path(), Some(uid), Some(gid)).unwrap();
        }
        std::os::unix::fs::chown(&dir, Some(uid), Some(gid)).unwrap();
        let b = TlsBroker { dir: dir.clone(), port, node: node.clone() };
        sh(Command::new("rabbitmq-server")
            .arg("-detached")
            .env("RABBITMQ_NODENAME", &node)
            .env("RABBITMQ_CONFIG_FILE", dir.join("rabbitmq.conf"))
            .env("RABBITMQ_ADVANCED_CONFIG_FILE", dir.join("advanced.config"))
            .env("RABBITMQ_ENABLED_PLUGINS_FILE", dir.join("enabled_plugins"))
            .env("RABBITMQ_MNESIA_BASE", dir.join("mnesia"))
            .env("RABBITMQ_LOG_BASE", dir.join("log"))
            .env("RABBITMQ_PID_FILE", dir.join("node.pid"))
            .env("RABBITMQ_DIST_PORT", free_port().to_string())
            .stdout(Stdio::null())
            .stderr(Stdio::null()));
        b.await_ready(Duration::from_secs(120));
        b
    }

    /// Wait until the node has booted and its TLS listener accepts connections.
    pub fn await_ready(&self, limit: Duration) {
        let t = Instant::now();
        loop {
            let up = ctl(&self.node, &["await_startup", "--timeout", "5"]).status.success()
                && std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok();
            if up {
                return;
            }
            if t.elapsed() > limit {
                let log = std::fs::read_dir(self.dir.join("log"))
                    .into_iter()
                    .flatten()
                    .filter_map(Result::ok)
                    .map(|e| std::fs::read_to_string(e.path()).unwrap_or_default())
                    .collect::<String>();
                let tail: Vec<&str> = log.lines().rev().take(30).collect();
                panic!("TLS broker {} not ready after {limit:?}; its log ends:\n{}", self.node, tail.join("\n"));
            }
            std::thread::sleep(Duration::from_millis(500));
        }
    }

    /// `rabbitmqctl -n NODE ARGS…`, asserting success.
    pub fn ctl(&self, args: &[&str]) {
        let out = ctl(&self.node, args);
        assert!(out.status.success(), "rabbitmqctl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    }

    pub fn file(&self, name: &str) -> String {
        self.dir.join(name).display().to_string()
    }

    /// An `amqps://` URI for a fresh queue unique to this test, with the test CA and the client
    /// certificate; `extra` is appended to the query.
    pub fn uri(&self, prefix: &str, extra: &str) -> String {
        format!(
            "amqps://guest:guest@localhost:{}/%2f?queue={prefix}-{}&heartbeat=5&cacertfile={}&certfile={}&keyfile={}{extra}",
            self.port,
            uuid::Uuid::new_v4().simple(),
            self.file("ca.pem"),
            self.file("client.pem"),
            self.file("client.key"),
        )
    }
}

impl Drop for TlsBroker {
    fn drop(&mut self) {
        let _ = ctl(&self.node, &["stop"]);
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.dir);
        } else {
            eprintln!("TLS broker files kept for a look: {}", self.dir.display());
        }
    }
}
