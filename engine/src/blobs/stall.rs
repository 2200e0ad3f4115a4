//! Blocking reads and writes of a blob stream for the threads that encode and decode it,
//! with a stall timeout: a peer that stops reading, or stops sending, frees the thread,
//! its serving slot or its piece of the blob after [`STALL`].

use std::io::{self, Read, Write};
use std::time::Duration;

use tokio::runtime::Handle;

/// Longest a blob stream may make no progress.
pub const STALL: Duration = Duration::from_secs(30);

fn stalled(what: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::TimedOut,
        format!("the peer {what} for {STALL:?}"),
    )
}

/// The sending half, written from a blocking thread.
#[derive(Debug)]
pub struct StallWrite {
    send: quinn::SendStream,
    rt: Handle,
}

impl StallWrite {
    /// Wraps `send`; call on a runtime thread (it keeps the runtime's handle).
    pub fn new(send: quinn::SendStream) -> Self {
        Self {
            send,
            rt: Handle::current(),
        }
    }

    /// The stream back.
    pub fn into_inner(self) -> quinn::SendStream {
        self.send
    }
}

impl Write for StallWrite {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let send = &mut self.send;
        self.rt.block_on(async {
            match tokio::time::timeout(STALL, send.write(buf)).await {
                Ok(written) => written.map_err(io::Error::other),
                Err(_) => Err(stalled("read nothing")),
            }
        })
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// The receiving half, read from a blocking thread.
#[derive(Debug)]
pub struct StallRead {
    recv: quinn::RecvStream,
    rt: Handle,
}

impl StallRead {
    /// Wraps `recv`; call on a runtime thread.
    pub fn new(recv: quinn::RecvStream) -> Self {
        Self {
            recv,
            rt: Handle::current(),
        }
    }
}

impl Read for StallRead {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let recv = &mut self.recv;
        self.rt.block_on(async {
            match tokio::time::timeout(STALL, recv.read(buf)).await {
                Ok(Ok(n)) => Ok(n.unwrap_or(0)),
                Ok(Err(e)) => Err(io::Error::other(e)),
                Err(_) => Err(stalled("sent nothing")),
            }
        })
    }
}
