//! The kernel's own netem, for machines whose kernel has none: a small Linux guest under
//! qemu bridges two TAP devices and shapes each card's outgoing packets with
//! `tc qdisc … netem delay … loss … rate … limit …`.
//!
//! `scripts/netem-vm` builds the guest (Debian's kernel, busybox, iproute2's `ip` and
//! `tc`); [`Guest::start`] runs that script first, so the guest is built once per checkout.
//! The guest boots in a few seconds under qemu's emulator (no KVM needed: the links it
//! shapes run at megabits, not gigabits), then runs the shell commands written to its
//! console, answering each with `done <status>`. qemu makes the TAP devices and removes
//! them when it exits.

use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use super::proxy::Impairment;

/// How long the guest may take to boot; under the emulator on a busy machine, several
/// times its idle boot of about five seconds.
const BOOT_TIMEOUT: Duration = Duration::from_secs(120);
/// How long one command in the guest may take.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(30);
/// The guest's whole memory.
const MEMORY_MIB: u32 = 160;
/// Bytes a packet is counted as when a byte queue becomes netem's packet limit.
const PACKET_BYTES: u64 = 1_200;
/// netem's limit when nothing is to be dropped for want of room.
const UNLIMITED_PACKETS: u64 = 100_000;

/// One of the guest's two cards, named by the direction of what leaves it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Card {
    /// The card on the near TAP device: what leaves it goes out of the namespace.
    Near,
    /// The card on the far TAP device: what leaves it goes into the namespace.
    Far,
}

impl Card {
    /// The guest shell's variable naming the card's interface.
    fn var(self) -> &'static str {
        match self {
            Self::Near => "$near",
            Self::Far => "$far",
        }
    }
}

/// What one card's netem qdisc has sent and dropped.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct QdiscCount {
    /// Packets sent on.
    pub packets: u64,
    /// Bytes sent on.
    pub bytes: u64,
    /// Packets dropped: at random (`loss`) or for want of room (`limit`).
    pub dropped: u64,
}

/// The guest: a qemu process, its console, and the two TAP devices it made.
pub struct Guest {
    child: Child,
    console: Mutex<Console>,
}

struct Console {
    input: ChildStdin,
    lines: Receiver<String>,
}

impl std::fmt::Debug for Guest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Guest")
            .field("pid", &self.child.id())
            .finish()
    }
}

/// The guest's kernel and initial filesystem, built by `scripts/netem-vm` if they are not
/// yet (or `TIDESYNC_NETEM_VM`, a directory holding both, built beforehand).
fn image() -> Result<PathBuf> {
    if let Some(dir) = std::env::var_os("TIDESYNC_NETEM_VM") {
        return Ok(PathBuf::from(dir));
    }
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .context("the workspace root")?
        .to_path_buf();
    let dir = root.join("target").join("netem-vm");
    let out = Command::new(root.join("scripts").join("netem-vm"))
        .arg(&dir)
        .output()
        .context("running scripts/netem-vm")?;
    if !out.status.success() {
        bail!(
            "scripts/netem-vm failed (scripts/test installs what it needs): {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(dir)
}

/// `tc qdisc change` arguments for a card shaping one direction of `imp`.
pub fn netem_args(imp: &Impairment, card: Card) -> String {
    let blocked = match card {
        Card::Near => imp.block_up,
        Card::Far => imp.block_down,
    };
    let loss = if blocked { 100.0 } else { imp.loss * 100.0 };
    // netem's jitter is uniform over delay ± jitter; the wire's is over delay + [0, jitter].
    let delay = imp.delay + imp.jitter / 2;
    let mut args = format!("delay {}us", delay.as_micros());
    if !imp.jitter.is_zero() {
        args += &format!(" {}us", (imp.jitter / 2).as_micros());
    }
    args += &format!(" loss {loss}%");
    // netem keeps a rate it is not told of again: 0 turns it off.
    let rate = imp.rate.unwrap_or(0);
    args += &format!(" rate {}bit", rate.saturating_mul(8));
    // netem's limit counts every packet it holds, those waiting out the delay too.
    let limit = match imp.rate {
        Some(rate) if imp.queue != usize::MAX => {
            let in_flight = rate as u128 * (imp.delay + imp.jitter).as_micros() / 1_000_000;
            let bytes = imp.queue as u128 + in_flight;
            (bytes / u128::from(PACKET_BYTES)).clamp(16, u128::from(UNLIMITED_PACKETS)) as u64
        }
        _ => UNLIMITED_PACKETS,
    };
    format!("limit {limit} {args}")
}

/// Reads `Sent B bytes P pkt (dropped D, …` from `tc -s qdisc show`.
fn parse_count(text: &str) -> Result<QdiscCount> {
    let words: Vec<&str> = text.split_whitespace().collect();
    // The number one word away from `word`, before it (-1) or after it (1).
    let near = |word: &str, step: isize| -> Result<u64> {
        let value = words
            .iter()
            .position(|w| *w == word)
            .and_then(|at| at.checked_add_signed(step))
            .and_then(|at| words.get(at))
            .with_context(|| format!("no number by {word:?} in tc's answer {text:?}"))?;
        value
            .trim_end_matches(',')
            .parse()
            .with_context(|| format!("{word} {value:?} in {text:?}"))
    };
    Ok(QdiscCount {
        bytes: near("Sent", 1)?,
        packets: near("pkt", -1)?,
        dropped: near("(dropped", 1)?,
    })
}

impl Guest {
    /// Boots the guest with its cards on two new TAP devices, `near` and `far`, in this
    /// process's network namespace, and waits until it forwards. Both cards start
    /// unimpaired.
    pub fn start(near: &str, far: &str) -> Result<Self> {
        let dir = image()?;
        let program = "qemu-system-x86_64";
        let card = |name: &str, id: &str, mac: &str| {
            [
                "-netdev".to_owned(),
                format!("tap,id={id},ifname={name},script=no,downscript=no"),
                "-device".to_owned(),
                // No boot ROM: the kernel is loaded directly.
                format!("virtio-net-pci,netdev={id},mac={mac},romfile="),
            ]
        };
        let mut child = Command::new(program)
            .args(["-accel", "tcg", "-smp", "1", "-m", &MEMORY_MIB.to_string()])
            .args([
                "-nographic",
                "-nodefaults",
                "-no-reboot",
                "-serial",
                "stdio",
            ])
            .arg("-kernel")
            .arg(dir.join("vmlinuz"))
            .arg("-initrd")
            .arg(dir.join("initrd.img"))
            .args(["-append", "console=ttyS0 quiet panic=-1"])
            // The guest tells its cards apart by the last byte of their addresses.
            .args(card(near, "near", "52:54:00:7d:00:01"))
            .args(card(far, "far", "52:54:00:7d:00:02"))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .context("starting qemu-system-x86_64 (scripts/test installs qemu-system-x86)")?;
        let input = child.stdin.take().context("qemu's stdin")?;
        let output = child.stdout.take().context("qemu's stdout")?;
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(output).lines() {
                let Ok(line) = line else { return };
                if tx.send(line.trim_end_matches('\r').to_owned()).is_err() {
                    return;
                }
            }
        });
        let mut guest = Self {
            child,
            console: Mutex::new(Console { input, lines }),
        };
        guest.wait_ready()?;
        Ok(guest)
    }

    fn wait_ready(&mut self) -> Result<()> {
        let console = self
            .console
            .get_mut()
            .map_err(|_| anyhow::anyhow!("console poisoned"))?;
        let deadline = Instant::now() + BOOT_TIMEOUT;
        let mut said = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match console.lines.recv_timeout(left) {
                // The firmware's last words share the line.
                Ok(line) if line.contains("ready near=") => {
                    anyhow::ensure!(
                        line.contains("near=eth") && line.contains("far=eth"),
                        "the netem guest found no network cards: {said:?} {line:?}"
                    );
                    return Ok(());
                }
                Ok(line) => {
                    said.push(line);
                    if said.len() > 50 {
                        said.remove(0);
                    }
                }
                Err(RecvTimeoutError::Timeout) => {
                    bail!("the netem guest did not boot in {BOOT_TIMEOUT:?}: {said:?}")
                }
                Err(RecvTimeoutError::Disconnected) => {
                    bail!("qemu exited before the netem guest was ready: {said:?}")
                }
            }
        }
    }

    /// Runs one shell command line in the guest, returning what it printed; fails if it
    /// exits non-zero.
    pub fn run(&self, line: &str) -> Result<String> {
        anyhow::ensure!(!line.contains('\n'), "one line at a time");
        let mut console = self
            .console
            .lock()
            .map_err(|_| anyhow::anyhow!("console poisoned"))?;
        writeln!(console.input, "{line}").context("writing to the netem guest")?;
        console.input.flush()?;
        let deadline = Instant::now() + COMMAND_TIMEOUT;
        let mut printed = String::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let got = console
                .lines
                .recv_timeout(left)
                .with_context(|| format!("no answer from the netem guest to {line:?}"))?;
            if let Some(status) = got.strip_prefix("done ") {
                if status.trim() != "0" {
                    bail!("{line:?} in the netem guest: exit {status}: {printed}");
                }
                return Ok(printed);
            }
            printed.push_str(&got);
            printed.push('\n');
        }
    }

    /// Shapes what leaves `card` as `imp` says, from now on; packets already held keep
    /// the fate they were given.
    pub fn shape(&self, card: Card, imp: &Impairment) -> Result<()> {
        self.run(&format!(
            "tc qdisc change dev {} root netem {}",
            card.var(),
            netem_args(imp, card)
        ))
        .map(drop)
    }

    /// What `card`'s qdisc has sent and dropped so far.
    pub fn count(&self, card: Card) -> Result<QdiscCount> {
        parse_count(&self.run(&format!("tc -s qdisc show dev {}", card.var()))?)
    }
}

impl Drop for Guest {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn a_thin_link_becomes_netem_arguments() {
        let thin = Impairment::thin(Duration::from_millis(300), 0.1, 1_000_000);
        // 150 ms each way, 10 %, 125,000 B/s; a queue of 64 KiB plus 150 ms at the rate.
        assert_eq!(
            netem_args(&thin, Card::Near),
            "limit 70 delay 150000us loss 10% rate 1000000bit"
        );
        let blocked = Impairment {
            block_down: true,
            jitter: Duration::from_millis(10),
            ..Impairment::CLEAR
        };
        assert_eq!(
            netem_args(&blocked, Card::Far),
            "limit 100000 delay 5000us 5000us loss 100% rate 0bit"
        );
        assert_eq!(
            netem_args(&blocked, Card::Near),
            "limit 100000 delay 5000us 5000us loss 0% rate 0bit"
        );
    }

    #[test]
    fn tc_statistics_are_read() {
        let shown = "qdisc netem 8001: root refcnt 2 limit 100 delay 50ms loss 10% rate 1Mbit\n \
                     Sent 2120 bytes 24 pkt (dropped 2, overlimits 0 requeues 0) \n \
                     backlog 0b 0p requeues 0\n";
        assert_eq!(
            parse_count(shown).unwrap(),
            QdiscCount {
                packets: 24,
                bytes: 2120,
                dropped: 2
            }
        );
        assert!(parse_count("qdisc noqueue 0: root").is_err());
    }
}
