//! A network link into a namespace of its own, with the impairments of a poor one.
//!
//! A node started in a [`Wire`]'s network namespace reaches the rest of the machine only
//! through the wire: a TUN device on each side (a point-to-point pair of addresses), and
//! every IP packet one side sends is read here and written into the other side's device
//! after the link's current [`Impairment`] (delay, jitter, loss, a rate with a tail-drop
//! queue, a partition). The nodes address each other directly, as across a real network,
//! with their kernels' own UDP, routing and MTU (1500) in between. It is what
//! `tc qdisc … netem delay … loss … rate …` on a veth pair does, for kernels built without
//! netem (the machines these tests run on have none); the packets' fate is decided in this
//! process, the rest is the kernel's.
//!
//! A second, unimpaired pair (a veth) carries the node's HTTP API, so a test can write
//! and read while the wire is down. Needs root (network namespaces, TUN devices);
//! everything made is removed on drop.

use std::net::Ipv4Addr;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use tokio_tun::Tun;

use super::proxy::{send_after, Impairment, Shaper, Tally};

/// Largest packet a TUN device of MTU 1500 hands over, with room to spare.
const MAX_PACKET: usize = 65_536;

/// Wires made by this process, for unique names and addresses.
static MADE: AtomicU32 = AtomicU32::new(0);

/// Runs `ip args…`, failing with what it printed.
fn ip(args: &[&str]) -> Result<()> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .context("running ip (iproute2)")?;
    if !out.status.success() {
        bail!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// A network namespace, deleted on drop.
#[derive(Debug)]
pub struct Netns {
    /// Its name (`ip netns exec NAME …`).
    pub name: String,
}

impl Netns {
    /// Makes a namespace called `name`, with its loopback up.
    pub fn new(name: &str) -> Result<Self> {
        // A namespace left by an earlier run killed before it cleaned up.
        let _ = ip(&["netns", "del", name]);
        ip(&["netns", "add", name]).context("making a network namespace (needs root)")?;
        let ns = Self { name: name.into() };
        ip(&["-n", name, "link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// A command that runs `program` inside the namespace.
    pub fn command(&self, program: &std::path::Path) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name]).arg(program);
        cmd
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = ip(&["netns", "del", &self.name]);
    }
}

/// Opens a TUN device called `name` (IP packets, no header); needs a runtime's context.
fn open_tun(name: &str) -> Result<Arc<Tun>> {
    let tun = Tun::builder()
        .name(name)
        .build()
        .with_context(|| format!("making TUN device {name} (needs root)"))?
        .into_iter()
        .next()
        .context("no TUN device")?;
    Ok(Arc::new(tun))
}

/// A link from this machine's namespace into a namespace of its own (see the module).
pub struct Wire {
    /// The namespace at the far end.
    pub ns: Netns,
    /// This side's address on the wire: what a node in the namespace dials.
    pub near: Ipv4Addr,
    /// The namespace's address on the wire.
    pub far: Ipv4Addr,
    /// The namespace's address on the unimpaired management link: bind its HTTP API here.
    pub manage: Ipv4Addr,
    /// What crossed from the namespace to this side.
    pub up: Arc<Tally>,
    /// What crossed into the namespace.
    pub down: Arc<Tally>,
    shaper: Arc<Shaper>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    veth: String,
}

impl std::fmt::Debug for Wire {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Wire")
            .field("ns", &self.ns.name)
            .field("near", &self.near)
            .field("far", &self.far)
            .finish()
    }
}

impl Wire {
    /// Makes the namespace, the wire (unimpaired until [`Wire::set`]) and the management
    /// link, forwarding on the runtime `rt`.
    pub fn start(rt: &tokio::runtime::Handle, seed: u64) -> Result<Self> {
        let k = MADE.fetch_add(1, Ordering::Relaxed);
        anyhow::ensure!(k < 32, "at most 32 wires per process");
        let pid = std::process::id();
        // 10.a.b.c: the process id picks a.b, the wire's number c (two /30s each).
        let (a, b) = (((pid >> 8) & 0xff) as u8, (pid & 0xff) as u8);
        let base = (k * 8) as u8;
        let addr = |host: u8| Ipv4Addr::new(10, a, b, base + host);
        let (near, far) = (addr(1), addr(2));
        let (manage_near, manage) = (addr(5), addr(6));
        let tag = format!("{pid:x}{k:02x}");
        let ns = Netns::new(&format!("tsw-{tag}"))?;
        let (near_dev, far_dev, veth) = (
            format!("tsn{tag}"),
            format!("tsf{tag}"),
            format!("tsm{tag}"),
        );
        let _guard = rt.enter();
        let near_tun = open_tun(&near_dev)?;
        let far_tun = open_tun(&far_dev)?;
        // The far device moves into the namespace; this process keeps its end.
        ip(&["link", "set", &far_dev, "netns", &ns.name])?;
        let (near_s, far_s) = (near.to_string(), far.to_string());
        ip(&["addr", "add", &near_s, "peer", &far_s, "dev", &near_dev])?;
        ip(&["link", "set", &near_dev, "up"])?;
        ip(&[
            "-n", &ns.name, "addr", "add", &far_s, "peer", &near_s, "dev", &far_dev,
        ])?;
        ip(&["-n", &ns.name, "link", "set", &far_dev, "up"])?;
        let veth_far = format!("{veth}f");
        ip(&[
            "link", "add", &veth, "type", "veth", "peer", "name", &veth_far,
        ])?;
        ip(&["link", "set", &veth_far, "netns", &ns.name])?;
        ip(&["addr", "add", &format!("{manage_near}/30"), "dev", &veth])?;
        ip(&["link", "set", &veth, "up"])?;
        ip(&[
            "-n",
            &ns.name,
            "addr",
            "add",
            &format!("{manage}/30"),
            "dev",
            &veth_far,
        ])?;
        ip(&["-n", &ns.name, "link", "set", &veth_far, "up"])?;

        let (up, down) = (Arc::new(Tally::default()), Arc::new(Tally::default()));
        let shaper = Arc::new(Shaper::new(seed, [up.clone(), down.clone()]));
        let tasks = vec![
            rt.spawn(carry(
                far_tun.clone(),
                near_tun.clone(),
                true,
                shaper.clone(),
            )),
            rt.spawn(carry(near_tun, far_tun, false, shaper.clone())),
        ];
        Ok(Self {
            ns,
            near,
            far,
            manage,
            up,
            down,
            shaper,
            tasks,
            veth,
        })
    }

    /// Sets the link's impairment from now on.
    pub fn set(&self, imp: Impairment) {
        self.shaper.set(imp);
    }
}

impl Drop for Wire {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
        // The TUN devices go with their descriptors (held by the tasks), the namespace's
        // end of the veth with the namespace; this end is removed here.
        let _ = ip(&["link", "del", &self.veth]);
    }
}

/// Carries packets from one device to the other, each after its fate: `up` is the
/// direction out of the namespace. A packet the other device does not take is dropped, as
/// a full queue on a real link drops it.
async fn carry(from: Arc<Tun>, to: Arc<Tun>, up: bool, shaper: Arc<Shaper>) {
    let mut buf = vec![0u8; MAX_PACKET];
    loop {
        let Ok(n) = from.recv(&mut buf).await else {
            return;
        };
        let Some(hold) = shaper.fate(up, n) else {
            continue;
        };
        let (packet, to) = (buf[..n].to_vec(), to.clone());
        send_after(hold, async move {
            let _ = to.try_send(&packet);
        })
        .await;
    }
}
