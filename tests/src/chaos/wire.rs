//! A network link into a namespace of its own, with the impairments of a poor one.
//!
//! A node started in a [`Wire`]'s network namespace reaches the rest of the machine only
//! through the wire: a TUN device on each side (two addresses of one /30), and
//! every IP packet one side sends is read here and written into the other side's device
//! after the link's current [`Impairment`] (delay, jitter, loss, a rate with a tail-drop
//! queue, a partition). The nodes address each other directly, as across a real network,
//! with their kernels' own UDP, routing and MTU (1500) in between. It is what
//! `tc qdisc … netem delay … loss … rate …` on a veth pair does, for kernels built without
//! netem (the machines these tests run on have none); the packets' fate is decided in this
//! process, the rest is the kernel's.
//!
//! [`Shaping::Netem`] puts the kernel's netem itself in the middle instead: the two devices
//! are TAP devices of a small guest ([`netem::Guest`]) that bridges them and shapes each
//! direction with a netem qdisc. The same test or benchmark then runs across either.
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

use super::netem;
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

/// Which way packets go through a [`Wire`]'s devices, and what shapes them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Shaping {
    /// This process reads each packet from one TUN device and writes it to the other after
    /// [`Shaper`] decides its fate.
    Here,
    /// The kernel's netem, in a guest bridging two TAP devices ([`netem::Guest`]).
    Netem,
}

impl std::fmt::Display for Shaping {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Here => "tun",
            Self::Netem => "netem",
        })
    }
}

impl std::str::FromStr for Shaping {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> Result<Self> {
        match s {
            "tun" => Ok(Self::Here),
            "netem" => Ok(Self::Netem),
            _ => bail!("unknown link {s:?}: tun or netem"),
        }
    }
}

/// What one direction of a wire has carried and dropped so far.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Carried {
    /// Packets delivered.
    pub packets: u64,
    /// Their bytes.
    pub bytes: u64,
    /// Packets dropped, at random or for want of room in the queue.
    pub dropped: u64,
}

impl Carried {
    fn of(tally: &Tally) -> Self {
        let get = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
        Self {
            packets: get(&tally.forwarded),
            bytes: get(&tally.bytes),
            dropped: get(&tally.lost) + get(&tally.overflowed),
        }
    }
}

/// A running wire's shaper.
enum Carrier {
    Here {
        shaper: Arc<Shaper>,
        up: Arc<Tally>,
        down: Arc<Tally>,
        tasks: Vec<tokio::task::JoinHandle<()>>,
    },
    Netem(netem::Guest),
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
    carrier: Carrier,
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
        Self::start_with(Shaping::Here, rt, seed)
    }

    /// As [`Wire::start`], with the packets shaped as `shaping` says (`seed` and `rt`
    /// serve [`Shaping::Here`] only).
    pub fn start_with(shaping: Shaping, rt: &tokio::runtime::Handle, seed: u64) -> Result<Self> {
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
        let carrier = match shaping {
            Shaping::Here => {
                let _guard = rt.enter();
                let near_tun = open_tun(&near_dev)?;
                let far_tun = open_tun(&far_dev)?;
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
                Carrier::Here {
                    shaper,
                    up,
                    down,
                    tasks,
                }
            }
            // qemu makes both TAP devices, and removes them when it exits.
            Shaping::Netem => Carrier::Netem(netem::Guest::start(&near_dev, &far_dev)?),
        };
        // The far device moves into the namespace; this side keeps its end. Both ends
        // share one /30: across TUN devices the kernel routes it to the device, across the
        // guest's bridge it is one Ethernet segment.
        ip(&["link", "set", &far_dev, "netns", &ns.name])?;
        ip(&["addr", "add", &format!("{near}/30"), "dev", &near_dev])?;
        ip(&[
            "-n",
            &ns.name,
            "addr",
            "add",
            &format!("{far}/30"),
            "dev",
            &far_dev,
        ])?;
        ip(&["link", "set", &near_dev, "up"])?;
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
        Ok(Self {
            ns,
            near,
            far,
            manage,
            carrier,
            veth,
        })
    }

    /// Sets the link's impairment from now on.
    pub fn set(&self, imp: Impairment) -> Result<()> {
        match &self.carrier {
            Carrier::Here { shaper, .. } => {
                shaper.set(imp);
                Ok(())
            }
            Carrier::Netem(guest) => {
                guest.shape(netem::Card::Near, &imp)?;
                guest.shape(netem::Card::Far, &imp)
            }
        }
    }

    /// What the wire has carried out of the namespace (`up`) and into it (`down`).
    pub fn carried(&self) -> Result<(Carried, Carried)> {
        match &self.carrier {
            Carrier::Here { up, down, .. } => Ok((Carried::of(up), Carried::of(down))),
            Carrier::Netem(guest) => {
                let of = |card| -> Result<Carried> {
                    let c = guest.count(card)?;
                    Ok(Carried {
                        packets: c.packets,
                        bytes: c.bytes,
                        dropped: c.dropped,
                    })
                };
                Ok((of(netem::Card::Near)?, of(netem::Card::Far)?))
            }
        }
    }
}

impl Drop for Wire {
    fn drop(&mut self) {
        if let Carrier::Here { tasks, .. } = &self.carrier {
            for t in tasks {
                t.abort();
            }
        }
        // The TUN devices go with their descriptors (held by the tasks), the TAP devices
        // with qemu, the namespace's end of the veth with the namespace; this end is
        // removed here.
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
