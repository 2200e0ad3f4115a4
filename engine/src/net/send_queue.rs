//! Frames for the peer on one stream, written as the stream takes them (flow control and
//! the link's budgets permitting): each frame is a 4-byte big-endian length and the
//! payload, as two chunks.
//!
//! A connection has one queue per stream: the sync stream (hello, acknowledgements,
//! audits and `normal` documents) and, on connections of protocol 7, one stream each for
//! `critical` and `bulk` documents. QUIC sends the higher stream priority first, so a
//! critical frame overtakes megabytes of bulk ones already queued on the link.

use std::collections::VecDeque;

use bytes::Bytes;
use futures_util::FutureExt;

use super::driver::DriverError;
use super::exec::ExecError;
use super::pacing::{LinkPacing, PACED_SLICE};
use crate::model::{ClassId, Priority};

/// Bytes queued past which the session is told there is no room.
const SEND_ROOM_BYTES: usize = 4 << 20;
/// Frames queued past which the session is told there is no room.
const SEND_ROOM_FRAMES: usize = 1024;

/// Frames for one stream.
#[derive(Debug)]
pub struct SendQueue {
    stream: quinn::SendStream,
    priority: Priority,
    chunks: VecDeque<Bytes>,
    /// Each frame not fully written: its class and the bytes of it left to write.
    frames: VecDeque<(ClassId, usize)>,
    /// Bytes queued.
    pub bytes: usize,
    max_frame: usize,
    /// Chunks at the front that an urgent frame may not overtake nor a discard drop: the
    /// first frame (the hello) until it is written, since the peer requires it first.
    floor: usize,
    pushed_any: bool,
}

impl SendQueue {
    /// A queue writing to `stream`, at the stream priority QUIC gives `priority`.
    pub fn new(stream: quinn::SendStream, priority: Priority, max_frame: usize) -> Self {
        // Higher goes first; blob streams are at -1, under every document.
        let _ = stream.set_priority(match priority {
            Priority::Critical => 2,
            Priority::Normal => 0,
            Priority::Bulk => -1,
        });
        Self {
            stream,
            priority,
            chunks: VecDeque::new(),
            frames: VecDeque::new(),
            bytes: 0,
            max_frame,
            floor: 0,
            pushed_any: false,
        }
    }

    /// The priority of what this queue carries.
    pub fn priority(&self) -> Priority {
        self.priority
    }

    /// Queues a frame of `class`.
    pub fn push(&mut self, payload: Bytes, class: ClassId) -> Result<(), ExecError> {
        let [len, payload] = self.frame(payload)?;
        let size = len.len() + payload.len();
        self.bytes += size;
        self.chunks.push_back(len);
        self.chunks.push_back(payload);
        self.frames.push_back((class, size));
        if !self.pushed_any {
            self.pushed_any = true;
            self.floor = 2;
        }
        Ok(())
    }

    /// Queues a frame ahead of every frame not yet begun (a frame partly written is
    /// finished first, so the stream stays framed): a revocation list must not wait behind
    /// megabytes of documents.
    pub fn push_urgent(&mut self, payload: Bytes) -> Result<(), ExecError> {
        let [len, payload] = self.frame(payload)?;
        let at = self.in_progress();
        let size = len.len() + payload.len();
        self.bytes += size;
        self.chunks.insert(at, payload);
        self.chunks.insert(at, len);
        self.frames.insert(at.div_ceil(2), (ClassId::Default, size));
        Ok(())
    }

    /// Drops every frame not yet begun: a peer being cut off gets nothing more than the
    /// frame on the wire and what is queued after this.
    pub fn discard_unsent(&mut self) {
        let at = self.in_progress();
        self.chunks.truncate(at);
        self.frames.truncate(at.div_ceil(2));
        self.bytes = self.chunks.iter().map(Bytes::len).sum();
    }

    /// How many chunks at the front belong to a frame partly written. Frames are queued as
    /// two chunks (length, payload) and chunks leave the queue one by one as written, so an
    /// odd count means the front payload's length is already out, and a front length
    /// chunk shorter than 4 bytes is partly out.
    fn in_progress(&self) -> usize {
        let begun = if self.chunks.len() % 2 == 1 {
            1
        } else if self.chunks.front().is_some_and(|c| c.len() < 4) {
            2
        } else {
            0
        };
        begun.max(self.floor).min(self.chunks.len())
    }

    /// The two chunks of one frame: its 4-byte big-endian length, then the payload.
    fn frame(&self, payload: Bytes) -> Result<[Bytes; 2], ExecError> {
        let len = u32::try_from(payload.len())
            .ok()
            .filter(|&len| len as usize <= self.max_frame)
            .ok_or_else(|| {
                ExecError::Stream(format!(
                    "a frame of {} bytes is over the limit of {}",
                    payload.len(),
                    self.max_frame
                ))
            })?;
        Ok([Bytes::copy_from_slice(&len.to_be_bytes()), payload])
    }

    /// Whether nothing is queued.
    pub fn is_empty(&self) -> bool {
        self.chunks.is_empty()
    }

    /// Whether the session may queue more.
    pub fn has_room(&self) -> bool {
        self.bytes < SEND_ROOM_BYTES && self.chunks.len() < 2 * SEND_ROOM_FRAMES
    }

    /// Writes what the stream takes now, waiting until it takes something, and, on a
    /// capped link, until the budgets allow the next slice. Cancel-safe (quinn's writes
    /// are, and a slice is paid for only once written), so it can race the reader in a
    /// `select!`.
    pub async fn write_some(&mut self, pacing: &LinkPacing) -> Result<(), DriverError> {
        let written = if pacing.is_paced() {
            self.let_uncapped_pass(pacing);
            // A frame already begun finishes at the link's pace: its class's cap applies
            // to frames not yet begun (and is paid for all the same), so a large frame
            // never holds the stream for its class's sake.
            let class = match self.frames.front() {
                Some(&(class, _)) if self.in_progress() == 0 => class,
                _ => ClassId::Default,
            };
            while let Some(wait) = pacing.wait(self.priority, class) {
                tokio::time::sleep(wait).await;
            }
            let Some(front) = self.chunks.front() else {
                return Ok(());
            };
            let slice = front.slice(..front.len().min(PACED_SLICE));
            let n = self
                .stream
                .write(&slice)
                .await
                .map_err(|e| DriverError::Stream(e.to_string()))?;
            if let Some(front) = self.chunks.front_mut() {
                let _ = front.split_to(n);
            }
            n
        } else {
            self.stream
                .write_chunks(self.chunks.make_contiguous())
                .await
                .map_err(|e| DriverError::Stream(e.to_string()))?
                .bytes
        };
        self.bytes -= written;
        self.account(written, pacing);
        // Fully written chunks were emptied; a partly written one keeps its suffix.
        while self.chunks.front().is_some_and(Bytes::is_empty) {
            self.chunks.pop_front();
            self.floor = self.floor.saturating_sub(1);
        }
        Ok(())
    }

    /// When the frame at the front has not begun and its class waits for its own cap,
    /// brings the first frame whose class may go now to the front: a capped class holds
    /// back its own frames only, never the acknowledgements and other classes queued
    /// behind it on the same stream. Frames of one class keep their order, and the
    /// hello stays first.
    fn let_uncapped_pass(&mut self, pacing: &LinkPacing) {
        if self.in_progress() > 0 {
            return;
        }
        let Some(&(front, _)) = self.frames.front() else {
            return;
        };
        if !pacing.class_waits(self.priority, front) {
            return;
        }
        let Some(j) = self
            .frames
            .iter()
            .position(|(c, _)| !pacing.class_waits(self.priority, *c))
        else {
            return;
        };
        let (Some(meta), Some(payload)) = (self.frames.remove(j), self.chunks.remove(2 * j + 1))
        else {
            return;
        };
        if let Some(len) = self.chunks.remove(2 * j) {
            self.chunks.push_front(payload);
            self.chunks.push_front(len);
            self.frames.push_front(meta);
        }
    }

    /// Pays for `written` bytes, frame by frame, to their classes' budgets.
    fn account(&mut self, mut written: usize, pacing: &LinkPacing) {
        while written > 0 {
            let Some((class, left)) = self.frames.front_mut() else {
                break;
            };
            let n = written.min(*left);
            pacing.debit(*class, n);
            *left -= n;
            written -= n;
            if *left == 0 {
                self.frames.pop_front();
            }
        }
    }

    /// Writes what the stream takes without waiting.
    pub fn write_ready(&mut self, pacing: &LinkPacing) -> Result<(), DriverError> {
        match self.write_some(pacing).now_or_never() {
            Some(result) => result,
            None => Ok(()),
        }
    }

    /// Writes everything queued, ends the stream, and waits until the peer has
    /// acknowledged all of it.
    pub async fn deliver(&mut self) -> Result<(), DriverError> {
        self.finish().await?;
        let _ = self.stream.stopped().await;
        Ok(())
    }

    /// Writes everything queued (the link's last words, unpaced), then ends the stream.
    pub async fn finish(&mut self) -> Result<(), DriverError> {
        let unpaced = LinkPacing::default();
        while !self.is_empty() {
            self.write_some(&unpaced).await?;
        }
        self.stream
            .finish()
            .map_err(|e| DriverError::Stream(e.to_string()))
    }
}
