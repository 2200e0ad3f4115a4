//! A UDP impairment proxy: one per link between two real node processes. A node dials the
//! proxy's address instead of its peer's; every datagram is forwarded (from a socket of
//! its own per client, so the peer sees one address per client) after the link's current
//! impairments: delay with jitter (which also reorders), random loss, a rate limit with a
//! tail-drop queue in front of it (a modem's), and a partition in either direction: what
//! `tc qdisc … netem delay … loss … rate …` does, in user space (not every kernel has
//! netem). The faults change while the link carries traffic.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Result;
use tokio::net::UdpSocket;

use crate::Rng;

/// What a link does to datagrams right now.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Impairment {
    /// Added to every datagram.
    pub delay: Duration,
    /// Up to this much more, at random per datagram (datagrams then overtake each other).
    pub jitter: Duration,
    /// Share of datagrams dropped, 0.0 to 1.0.
    pub loss: f64,
    /// Drop everything from the dialing node to its peer.
    pub block_up: bool,
    /// Drop everything from the peer to the dialing node.
    pub block_down: bool,
    /// Bytes per second in each direction; `None` for no limit.
    pub rate: Option<u64>,
    /// Bytes waiting for the rate limit past which datagrams are dropped.
    pub queue: usize,
}

impl Impairment {
    /// No impairment.
    pub const CLEAR: Self = Self {
        delay: Duration::ZERO,
        jitter: Duration::ZERO,
        loss: 0.0,
        block_up: false,
        block_down: false,
        rate: None,
        queue: usize::MAX,
    };

    /// A long thin link: `rtt` (half each way), `loss` each way, `bits_per_s` each way with
    /// a queue of a quarter second at that rate (at least 64 KiB).
    pub fn thin(rtt: Duration, loss: f64, bits_per_s: u64) -> Self {
        let rate = bits_per_s / 8;
        Self {
            delay: rtt / 2,
            loss,
            rate: Some(rate),
            queue: ((rate / 4) as usize).max(64 * 1024),
            ..Self::CLEAR
        }
    }
}

/// Datagrams that crossed, or were dropped, in one direction.
#[derive(Debug, Default)]
pub struct Tally {
    /// Datagrams forwarded.
    pub forwarded: AtomicU64,
    /// Bytes forwarded.
    pub bytes: AtomicU64,
    /// Datagrams dropped at random.
    pub lost: AtomicU64,
    /// Datagrams dropped because the queue was full.
    pub overflowed: AtomicU64,
}

/// A link's impairment, deciding each datagram's fate: shared by the proxy and the
/// namespaced wire (`chaos::wire`).
#[derive(Debug)]
pub struct Shaper {
    now: Mutex<Impairment>,
    rng: Mutex<Rng>,
    /// Per direction (up, down): when the rate limit is done with what it holds.
    busy_until: Mutex<[Instant; 2]>,
    tally: [Arc<Tally>; 2],
}

impl Shaper {
    /// An unimpaired link counting into `tally` (up, down), its randomness from `seed`.
    pub fn new(seed: u64, tally: [Arc<Tally>; 2]) -> Self {
        Self {
            now: Mutex::new(Impairment::CLEAR),
            rng: Mutex::new(Rng::new(seed)),
            busy_until: Mutex::new([Instant::now(); 2]),
            tally,
        }
    }

    /// Sets the impairment from now on.
    pub fn set(&self, imp: Impairment) {
        if let Ok(mut now) = self.now.lock() {
            *now = imp;
        }
    }

    /// How long to hold a datagram of `len` bytes going up (`true`) or down, or `None` to
    /// drop it.
    pub fn fate(&self, up: bool, len: usize) -> Option<Duration> {
        let imp = self.now.lock().map(|i| *i).unwrap_or(Impairment::CLEAR);
        if (up && imp.block_up) || (!up && imp.block_down) {
            return None;
        }
        let tally = &self.tally[usize::from(!up)];
        let mut rng = self.rng.lock().ok()?;
        if imp.loss > 0.0 && (rng.next_u64() % 10_000) as f64 / 10_000.0 < imp.loss {
            tally.lost.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        let jitter = imp.jitter.as_micros() as u64;
        let mut hold = imp.delay + Duration::from_micros(rng.range(0, jitter + 1));
        if let Some(rate) = imp.rate {
            let now = Instant::now();
            let mut busy = self.busy_until.lock().ok()?;
            let start = busy[usize::from(!up)].max(now);
            let waiting = start.duration_since(now).as_secs_f64() * rate as f64;
            if waiting + len as f64 > imp.queue as f64 {
                tally.overflowed.fetch_add(1, Ordering::Relaxed);
                return None;
            }
            let done = start + Duration::from_secs_f64(len as f64 / rate.max(1) as f64);
            busy[usize::from(!up)] = done;
            hold += done.duration_since(now);
        }
        tally.forwarded.fetch_add(1, Ordering::Relaxed);
        tally.bytes.fetch_add(len as u64, Ordering::Relaxed);
        Some(hold)
    }
}

/// A running proxy in front of one node's QUIC address.
pub struct Link {
    /// Where the dialing node sends its datagrams.
    pub listen: SocketAddr,
    /// What crossed from the dialing node to its peer.
    pub up: Arc<Tally>,
    /// What crossed back.
    pub down: Arc<Tally>,
    shared: Arc<Shaper>,
    task: tokio::task::JoinHandle<()>,
}

impl std::fmt::Debug for Link {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Link")
            .field("listen", &self.listen)
            .finish()
    }
}

impl Link {
    /// Starts a proxy on 127.0.0.1 (an OS-picked port) forwarding to `target`, on the
    /// runtime `rt`.
    pub fn start(rt: &tokio::runtime::Handle, target: SocketAddr, seed: u64) -> Result<Self> {
        let std_front = std::net::UdpSocket::bind("127.0.0.1:0")?;
        std_front.set_nonblocking(true)?;
        let listen = std_front.local_addr()?;
        let (up, down) = (Arc::new(Tally::default()), Arc::new(Tally::default()));
        let shared = Arc::new(Shaper::new(seed, [up.clone(), down.clone()]));
        let s = shared.clone();
        let task = rt.spawn(async move {
            if let Ok(front) = UdpSocket::from_std(std_front) {
                forward(Arc::new(front), target, s).await;
            }
        });
        Ok(Self {
            listen,
            up,
            down,
            shared,
            task,
        })
    }

    /// Sets the link's impairment from now on.
    pub fn set(&self, imp: Impairment) {
        self.shared.set(imp);
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Runs `send` once `hold` has passed: at once if there is no delay, else from a task of
/// its own, so the packets after it are not held behind it (a link delays each packet;
/// it does not stop).
pub async fn send_after<F>(hold: Duration, send: F)
where
    F: std::future::Future<Output = ()> + Send + 'static,
{
    if hold.is_zero() {
        send.await;
    } else {
        tokio::spawn(async move {
            tokio::time::sleep(hold).await;
            send.await;
        });
    }
}

/// Datagrams larger than any QUIC packet a node sends.
const MAX_DATAGRAM: usize = 65_536;

async fn forward(front: Arc<UdpSocket>, target: SocketAddr, shared: Arc<Shaper>) {
    let mut clients: HashMap<SocketAddr, Arc<UdpSocket>> = HashMap::new();
    let mut buf = vec![0u8; MAX_DATAGRAM];
    let mut downs = tokio::task::JoinSet::new();
    loop {
        let Ok((n, from)) = front.recv_from(&mut buf).await else {
            continue;
        };
        let up = match clients.get(&from) {
            Some(s) => s.clone(),
            None => {
                let Ok(sock) = UdpSocket::bind("127.0.0.1:0").await else {
                    continue;
                };
                if sock.connect(target).await.is_err() {
                    continue;
                }
                let sock = Arc::new(sock);
                clients.insert(from, sock.clone());
                downs.spawn(back(sock.clone(), front.clone(), from, shared.clone()));
                sock
            }
        };
        let Some(hold) = shared.fate(true, n) else {
            continue;
        };
        let (packet, up) = (buf[..n].to_vec(), up.clone());
        send_after(hold, async move {
            let _ = up.send(&packet).await;
        })
        .await;
    }
}

/// The peer's datagrams back to one client.
async fn back(up: Arc<UdpSocket>, front: Arc<UdpSocket>, client: SocketAddr, shared: Arc<Shaper>) {
    let mut buf = vec![0u8; MAX_DATAGRAM];
    loop {
        // A refused send (the peer's port closed while it restarts) is not the end.
        let n = match up.recv(&mut buf).await {
            Ok(n) => n,
            Err(_) => {
                tokio::time::sleep(Duration::from_millis(5)).await;
                continue;
            }
        };
        let Some(hold) = shared.fate(false, n) else {
            continue;
        };
        let (packet, front) = (buf[..n].to_vec(), front.clone());
        send_after(hold, async move {
            let _ = front.send_to(&packet, client).await;
        })
        .await;
    }
}
