//! Real message brokers for the bridge's tests and benchmark: `nats-server -js` and
//! `rabbitmq-server`, each on ports the OS picked, keeping their data in a directory of
//! the caller's, stopped (SIGKILL) when dropped. `scripts/test` installs both; a broker
//! that is not installed or does not start is an error that says so.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context, Result};

/// The first of `candidates` that runs with `arg`.
fn installed(candidates: &[&str], arg: &str) -> Option<PathBuf> {
    candidates
        .iter()
        .find(|c| {
            Command::new(c)
                .arg(arg)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok()
        })
        .map(PathBuf::from)
}

/// A port on 127.0.0.1 the OS picked and that was free a moment ago.
fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// SIGKILL to every process whose environment holds `marker` (a `NAME=value` the broker
/// was started with, which its children inherit, daemons included), then reaps `child`.
fn kill_marked(child: &mut Child, marker: &str) {
    let _ = child.kill();
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return;
    };
    for entry in procs.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|p| p.parse::<i32>().ok())
        else {
            continue;
        };
        let environ = std::fs::read(entry.path().join("environ")).unwrap_or_default();
        if environ.split(|b| *b == 0).any(|v| v == marker.as_bytes()) {
            let _ = Command::new("kill")
                .args(["-9", &pid.to_string()])
                .stderr(Stdio::null())
                .status();
        }
    }
    let _ = child.wait();
}

/// A `nats-server -js` keeping its streams in a directory.
#[derive(Debug)]
pub struct Nats {
    child: Child,
    port: u16,
    dir: PathBuf,
}

impl Nats {
    /// Starts on a port the OS picks and waits until it listens.
    pub fn start(dir: &Path) -> Result<Self> {
        Self::start_on(dir, 0)
    }

    fn start_on(dir: &Path, port: u16) -> Result<Self> {
        let program = installed(
            &[
                "nats-server",
                "/usr/sbin/nats-server",
                "/usr/bin/nats-server",
            ],
            "--version",
        )
        .context(
            "nats-server is not installed: run scripts/test, which installs Debian's nats-server",
        )?;
        let port_arg = if port == 0 {
            "-1".to_owned()
        } else {
            port.to_string()
        };
        let mut child = Command::new(program)
            .args(["-js", "-a", "127.0.0.1", "-p", &port_arg, "-sd"])
            .arg(dir)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()?;
        let stderr = child.stderr.take().context("stderr")?;
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(rest) = line.split("Listening for client connections on ").nth(1) {
                    let _ = tx.send(rest.rsplit(':').next().unwrap_or("").trim().to_owned());
                }
            }
        });
        let Ok(port) = rx.recv_timeout(Duration::from_secs(20)) else {
            let _ = child.kill();
            let _ = child.wait();
            bail!("nats-server did not start listening within 20 s");
        };
        Ok(Self {
            child,
            port: port.parse()?,
            dir: dir.to_owned(),
        })
    }

    /// Where clients connect.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// Stops the server (SIGKILL).
    pub fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Starts it again on the same port with the same streams.
    pub fn start_again(mut self) -> Result<Self> {
        self.stop();
        Self::start_on(&self.dir, self.port)
    }
}

impl Drop for Nats {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The environment variable that marks a RabbitMQ node's processes, with its port.
const MARKER: &str = "TIDESYNC_TEST_RABBITMQ";

/// A `rabbitmq-server` node of its own (its own name, ports, Erlang port mapper and
/// database), run as the current user, keeping its queues in a directory.
#[derive(Debug)]
pub struct Rabbit {
    /// `None` once stopped.
    server: Option<Child>,
    port: u16,
    dist_port: u16,
    epmd_port: u16,
    dir: PathBuf,
}

impl Rabbit {
    /// Starts a node on ports the OS picks and waits (up to 60 s) until it serves AMQP.
    pub fn start(dir: &Path) -> Result<Self> {
        Self::start_on(dir, free_port()?, free_port()?, free_port()?)
    }

    fn start_on(dir: &Path, port: u16, dist_port: u16, epmd_port: u16) -> Result<Self> {
        // Debian's /usr/sbin/rabbitmq-server switches to the rabbitmq user; the script it
        // wraps runs the node as the caller.
        let server_program = ["/usr/lib/rabbitmq/bin/rabbitmq-server"]
            .into_iter()
            .map(PathBuf::from)
            .find(|p| p.is_file())
            .context("rabbitmq-server is not installed: run scripts/test, which installs Debian's rabbitmq-server")?;
        let path = |p: &str| dir.join(p).to_string_lossy().into_owned();
        std::fs::write(dir.join("plugins"), "[].\n")?;
        let mut server = Command::new(server_program)
            // Mnesia writes its core files (`MnesiaCore.*`) in the working directory.
            .current_dir(dir)
            .env("HOME", dir)
            .env("ERL_EPMD_PORT", epmd_port.to_string())
            .env("RABBITMQ_NODENAME", format!("tidesync{port}@localhost"))
            .env("RABBITMQ_NODE_IP_ADDRESS", "127.0.0.1")
            .env("RABBITMQ_NODE_PORT", port.to_string())
            .env("RABBITMQ_DIST_PORT", dist_port.to_string())
            .env("RABBITMQ_MNESIA_BASE", path("mnesia"))
            .env("RABBITMQ_LOG_BASE", path("log"))
            .env("RABBITMQ_CONFIG_FILE", path("rabbitmq"))
            .env("RABBITMQ_ENABLED_PLUGINS_FILE", path("plugins"))
            .env("RABBITMQ_PID_FILE", path("pid"))
            .env("RABBITMQ_LOGS", "-")
            // A node killed mid-start writes its crash dump here, not in the working
            // directory.
            .env("ERL_CRASH_DUMP", path("erl_crash.dump"))
            // What the node's processes (its port mapper, on a port of its own, among
            // them) are found and stopped by; the start script detaches some of them.
            .env(MARKER, port.to_string())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()?;
        let stdout = server.stdout.take().context("stdout")?;
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if line.contains("Server startup complete") {
                    let _ = tx.send(());
                }
            }
        });
        let mut rabbit = Self {
            server: Some(server),
            port,
            dist_port,
            epmd_port,
            dir: dir.to_owned(),
        };
        if rx.recv_timeout(Duration::from_secs(60)).is_err() {
            rabbit.stop();
            bail!("rabbitmq-server did not finish starting within 60 s");
        }
        Ok(rabbit)
    }

    /// Where clients connect (the default user, which RabbitMQ allows from loopback).
    pub fn url(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/%2f", self.port)
    }

    /// Stops the node (SIGKILL to all its processes).
    pub fn stop(&mut self) {
        if let Some(mut server) = self.server.take() {
            kill_marked(&mut server, &format!("{MARKER}={}", self.port));
        }
    }

    /// Starts it again on the same ports with the same queues.
    pub fn start_again(mut self) -> Result<Self> {
        self.stop();
        Self::start_on(&self.dir, self.port, self.dist_port, self.epmd_port)
    }
}

impl Drop for Rabbit {
    fn drop(&mut self) {
        self.stop();
    }
}
