//! Real `tidesync-hub` and `tidesync-edge` processes for tests: built on first use, started
//! with OS-picked ports, found through their readiness line, killed when dropped.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

static BUILT: Mutex<Vec<String>> = Mutex::new(Vec::new());

/// The path of a workspace binary, brought up to date once per test process: `cargo test`
/// builds only the binaries of the packages it tests, and a stale binary would test old
/// code.
pub fn binary(name: &str) -> Result<PathBuf> {
    // Tests run from target/<profile>/deps, benchmarks from target/<profile>; the
    // binaries live in target/<profile>.
    let exe = std::env::current_exe()?;
    let mut dir = exe.parent().context("unexpected binary location")?;
    if dir.file_name().is_some_and(|n| n == "deps") {
        dir = dir.parent().context("unexpected test binary location")?;
    }
    let path = dir.join(name);
    let mut built = BUILT.lock().unwrap_or_else(|e| e.into_inner());
    if !built.iter().any(|b| b == name) {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut cmd = Command::new(cargo);
        cmd.args(["build", "--workspace", "--bin", name]);
        // Cargo gives a test process its package's variables; build scripts (ring's) that
        // watch them would see them change and rebuild half the tree on every run.
        for (key, _) in std::env::vars_os() {
            let key = key.to_string_lossy();
            let per_crate = [
                "CARGO_PKG_",
                "CARGO_MANIFEST_",
                "CARGO_BIN_",
                "CARGO_CRATE_",
            ]
            .iter()
            .any(|p| key.starts_with(p))
                || ["OUT_DIR", "CARGO_PRIMARY_PACKAGE", "CARGO_TARGET_TMPDIR"].contains(&&*key);
            if per_crate {
                cmd.env_remove(&*key);
            }
        }
        if dir.file_name().is_some_and(|n| n == "release") {
            cmd.arg("--release");
        }
        let status = cmd.status().context("running cargo build")?;
        if !status.success() {
            bail!("cargo build --bin {name} failed");
        }
        built.push(name.to_owned());
    }
    Ok(path)
}

/// Runs a binary to completion and returns its stdout; fails with its stderr.
pub fn run(name: &str, args: &[&str]) -> Result<String> {
    let out = Command::new(binary(name)?).args(args).output()?;
    if !out.status.success() {
        bail!(
            "{name} {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A running node process.
#[derive(Debug)]
pub struct Proc {
    child: Child,
    /// Its QUIC address.
    pub quic: SocketAddr,
    /// Its HTTP API address.
    pub api: SocketAddr,
}

impl Proc {
    /// Starts `name args` and waits (up to 20 s) for `tidesync listening quic=… api=…`.
    pub fn start<S: AsRef<std::ffi::OsStr>>(name: &str, args: &[S]) -> Result<Self> {
        let mut cmd = Command::new(binary(name)?);
        cmd.args(args);
        Self::spawn(cmd, name)
    }

    /// Spawns `cmd`, which must print the readiness line first (a node binary, or a shell
    /// that execs one), and waits up to 20 s for it. `what` names it in errors.
    pub fn spawn(mut cmd: Command, what: &str) -> Result<Self> {
        let mut child = cmd.stdout(Stdio::piped()).stderr(Stdio::null()).spawn()?;
        let stdout = child.stdout.take().context("stdout")?;
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut lines = BufReader::new(stdout).lines();
            if let Some(Ok(first)) = lines.next() {
                let _ = tx.send(first);
            }
            // Keep draining so the child never blocks on a full pipe.
            for _ in lines {}
        });
        let line = match rx.recv_timeout(Duration::from_secs(20)) {
            Ok(l) => l,
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                bail!("{what} printed no readiness line");
            }
        };
        let field = |key: &str| -> Result<SocketAddr> {
            line.split_whitespace()
                .find_map(|w| w.strip_prefix(key))
                .with_context(|| format!("no {key} in {line:?}"))?
                .parse()
                .with_context(|| format!("bad address in {line:?}"))
        };
        let (quic, api) = (field("quic=")?, field("api=")?);
        Ok(Self { child, quic, api })
    }

    /// The operating system's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The API base URL.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.api)
    }

    /// Kills the process at once (SIGKILL) and waits for it.
    pub fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Every subcommand of each binary, for tests that go through all their flags.
pub const SUBCOMMANDS: [(&str, &[&str]); 2] = [
    (
        "tidesync-hub",
        &[
            "init", "enroll", "revoke", "token", "run", "status", "doc", "watch", "backup",
            "restore",
        ],
    ),
    (
        "tidesync-edge",
        &["run", "status", "doc", "watch", "backup", "restore"],
    ),
];

/// A deployment made with the real binaries in a temporary directory: `tidesync-hub init`
/// has run in `hub/`, bundles are written as `<name>.pem` and each node's data lives in a
/// directory of its name.
#[derive(Debug)]
pub struct Binaries {
    dir: tempfile::TempDir,
}

impl Binaries {
    /// A new deployment: CA and first hub in `hub/`.
    pub fn init() -> Result<Self> {
        let d = Self {
            dir: tempfile::tempdir()?,
        };
        run("tidesync-hub", &["init", "--data", &d.path("hub")])?;
        Ok(d)
    }

    /// A new deployment with its first hub running and edge `name` (granted everything)
    /// connected to it.
    pub fn hub_and_edge(name: &str) -> Result<(Self, Proc, Proc)> {
        let d = Self::init()?;
        let hub = d.hub(&[])?;
        d.enroll(name, "edge", &["*=rw"])?;
        let edge = d.edge(name, &[&hub], &[])?;
        wait_for("the edge connected", Duration::from_secs(10), || {
            connected(&hub, name)
        });
        Ok((d, hub, edge))
    }

    /// `p` inside the deployment's directory.
    pub fn path(&self, p: &str) -> String {
        self.dir.path().join(p).to_string_lossy().into_owned()
    }

    /// Enrolls node `name` as `role` (`edge` or `hub`) with `grants`; returns its bundle.
    pub fn enroll(&self, name: &str, role: &str, grants: &[&str]) -> Result<String> {
        let (hub, out) = (self.path("hub"), self.path(&format!("{name}.pem")));
        let mut args = vec![
            "enroll", "--data", &hub, "--name", name, "--role", role, "--out", &out,
        ];
        for g in grants {
            args.extend(["--grant", g]);
        }
        run("tidesync-hub", &args)?;
        Ok(out)
    }

    /// Runs the first hub on OS-picked ports, with `extra` flags.
    pub fn hub(&self, extra: &[&str]) -> Result<Proc> {
        self.hub_at("hub", "127.0.0.1:0", extra)
    }

    /// Runs a hub from directory `data`, listening for QUIC on `listen`.
    pub fn hub_at(&self, data: &str, listen: &str, extra: &[&str]) -> Result<Proc> {
        let data = self.path(data);
        let mut args = vec![
            "run",
            "--data",
            &data,
            "--listen",
            listen,
            "--api",
            "127.0.0.1:0",
        ];
        args.extend_from_slice(extra);
        Proc::start("tidesync-hub", &args)
    }

    /// Runs enrolled edge `name` against `hubs`, in that order of failover, with `extra`
    /// flags.
    pub fn edge(&self, name: &str, hubs: &[&Proc], extra: &[&str]) -> Result<Proc> {
        let addrs: Vec<SocketAddr> = hubs.iter().map(|h| h.quic).collect();
        self.edge_at(name, &addrs, extra)
    }

    /// Runs enrolled edge `name` dialing `hubs` (hubs, or proxies in front of them), in
    /// that order of failover, with `extra` flags.
    pub fn edge_at(&self, name: &str, hubs: &[SocketAddr], extra: &[&str]) -> Result<Proc> {
        Proc::start(
            "tidesync-edge",
            &self.edge_args(name, hubs, "127.0.0.1:0", extra),
        )
    }

    /// Runs enrolled edge `name` in the network namespace at the far end of `wire`,
    /// dialing `hubs` across it; its API listens on the wire's management address.
    pub fn edge_across(
        &self,
        wire: &crate::chaos::wire::Wire,
        name: &str,
        hubs: &[SocketAddr],
        extra: &[&str],
    ) -> Result<Proc> {
        let api = format!("{}:0", wire.manage);
        let mut cmd = wire.ns.command(&binary("tidesync-edge")?);
        cmd.args(self.edge_args(name, hubs, &api, extra));
        Proc::spawn(cmd, "tidesync-edge")
    }

    fn edge_args(&self, name: &str, hubs: &[SocketAddr], api: &str, extra: &[&str]) -> Vec<String> {
        let mut args: Vec<String> = vec![
            "run".into(),
            "--data".into(),
            self.path(name),
            "--bundle".into(),
            self.path(&format!("{name}.pem")),
            "--api".into(),
            api.into(),
        ];
        for a in hubs {
            args.extend(["--hub".into(), a.to_string()]);
        }
        args.extend(extra.iter().map(|s| (*s).to_owned()));
        args
    }
}

/// Polls `check` every 10 ms until it holds and returns how long that took; panics after
/// `timeout`, naming `what` was awaited.
pub fn wait_for(what: &str, timeout: Duration, mut check: impl FnMut() -> bool) -> Duration {
    let started = Instant::now();
    while !check() {
        assert!(started.elapsed() < timeout, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
    started.elapsed()
}

/// `GET /v1/status` of a running node; panics if it does not answer with JSON.
pub fn status(p: &Proc) -> serde_json::Value {
    ureq::get(&p.url("/v1/status"))
        .call()
        .expect("the node's status")
        .into_json()
        .expect("status is JSON")
}

/// `p`'s Prometheus metrics, as text.
pub fn metrics(p: &Proc) -> String {
    ureq::get(&p.url("/metrics"))
        .call()
        .expect("the node's metrics")
        .into_string()
        .expect("metrics are text")
}

/// Whether `p`'s status shows a connection to peer `id` up.
pub fn connected(p: &Proc, id: &str) -> bool {
    status(p)["peers"].as_array().is_some_and(|peers| {
        peers
            .iter()
            .any(|s| s["node_id"] == id && s["connected"] == true)
    })
}

/// A runtime of one worker beside a test's own thread, for the async parts (a proxy, a
/// wire) of tests that drive processes synchronously.
pub fn side_runtime() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?)
}
