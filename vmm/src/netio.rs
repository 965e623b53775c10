//! The host side of the guest's network card: the tap reader that turns
//! received frames into door input, the framed transmit stream, and the
//! announcement a backup sends when it goes live.
//!
//! Transmitted frames travel as one byte stream so that the output rule's
//! machinery for console output ([`crate::ft::output`]: held until the
//! backup acknowledged the log, offsets, a backup's tail re-sent at
//! takeover) carries them unchanged. Each frame is a record: its length
//! as 4 little-endian bytes, then the frame. [`TapSink`] turns the stream
//! back into frames and writes them to the tap, whatever pieces the
//! stream arrives in.

use std::io::{self, Write};
use std::os::fd::AsRawFd;
use std::sync::mpsc::Sender;
use std::sync::Arc;
use std::time::Duration;

use tracing::{debug, warn};

use crate::devices::virtio::net::{gratuitous_arp, MAX_FRAME_BYTES};
use crate::devices::virtio::Tap;
use crate::ft::output::Release;
use crate::nondet::Incoming;
use crate::vcpu::Kicker;

/// The record of one frame in the transmit stream.
pub fn frame_record(frame: &[u8]) -> Vec<u8> {
    let mut r = Vec::with_capacity(4 + frame.len());
    r.extend_from_slice(&(frame.len() as u32).to_le_bytes());
    r.extend_from_slice(frame);
    r
}

/// Reassembles frames from pieces of the transmit stream.
#[derive(Debug, Default)]
pub struct FrameDecoder {
    buf: Vec<u8>,
}

impl FrameDecoder {
    /// Take `bytes`; return the frames now complete.
    pub fn push(&mut self, bytes: &[u8]) -> Vec<Vec<u8>> {
        self.buf.extend_from_slice(bytes);
        let mut out = Vec::new();
        let mut at = 0;
        while self.buf.len() - at >= 4 {
            let len =
                u32::from_le_bytes(self.buf[at..at + 4].try_into().expect("4 bytes")) as usize;
            if len > MAX_FRAME_BYTES {
                // Not a record boundary (a stream cut in the middle): drop
                // what is buffered rather than wait for a length that is
                // not one. The guest's TCP resends what is lost.
                warn!(
                    len,
                    "transmit stream out of step: dropping its buffered bytes"
                );
                self.buf.clear();
                return out;
            }
            if self.buf.len() - at - 4 < len {
                break;
            }
            out.push(self.buf[at + 4..at + 4 + len].to_vec());
            at += 4 + len;
        }
        self.buf.drain(..at);
        out
    }
}

/// Writes the transmit stream's frames to a tap.
pub struct TapSink {
    tap: Arc<Tap>,
    frames: FrameDecoder,
    sent: u64,
}

impl TapSink {
    /// Frames go to `tap`.
    pub fn new(tap: Arc<Tap>) -> Self {
        TapSink {
            tap,
            frames: FrameDecoder::default(),
            sent: 0,
        }
    }

    fn send(&mut self, bytes: &[u8]) {
        for f in self.frames.push(bytes) {
            // A full host queue or a tap without a link drops the frame, as
            // a congested wire would; the guest's TCP retransmits.
            if let Err(e) = self.tap.write_frame(&f) {
                debug!(tap = %self.tap.name(), "frame not sent: {e}");
            } else {
                self.sent += 1;
            }
        }
    }
}

impl Write for TapSink {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.send(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Release for TapSink {
    fn release(&mut self, _offset: u64, bytes: &[u8]) -> io::Result<()> {
        self.send(bytes);
        Ok(())
    }
}

/// Read frames from `tap` on a helper thread into the live door (`tx`),
/// kicking the vCPU after each. Ends when the door is gone.
pub fn spawn_reader(tap: Arc<Tap>, tx: Sender<Incoming>, kicker: Kicker) -> io::Result<()> {
    std::thread::Builder::new()
        .name("vmft-tap-rx".into())
        .spawn(move || {
            let mut buf = vec![0u8; MAX_FRAME_BYTES + 1];
            loop {
                let mut pfd = libc::pollfd {
                    fd: tap.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                };
                // SAFETY: one valid pollfd for the duration of the call.
                let r = unsafe { libc::poll(&mut pfd, 1, 200) };
                if r < 0 {
                    let e = io::Error::last_os_error();
                    if e.kind() != io::ErrorKind::Interrupted {
                        warn!(tap = %tap.name(), "polling the tap failed: {e}");
                        return;
                    }
                    continue;
                }
                loop {
                    match tap.read_frame(&mut buf) {
                        Ok(Some(n)) => {
                            if tx.send(Incoming::Frame(buf[..n].to_vec())).is_err() {
                                return;
                            }
                            kicker.kick();
                        }
                        Ok(None) => break,
                        Err(e) => {
                            warn!(tap = %tap.name(), "reading the tap failed: {e}");
                            std::thread::sleep(Duration::from_millis(100));
                            break;
                        }
                    }
                }
                // The door went away (the VM ended): stop.
                if tx.send(Incoming::Frame(Vec::new())).is_err() {
                    return;
                }
            }
        })
        .map(|_| ())
}

/// Throw away what the tap queued while nobody read it (a backup's tap
/// during the replay: broadcasts and floods from before the takeover, which
/// the guest must not get late, ahead of what comes now). Returns how many.
pub fn discard_queued(tap: &Tap) -> usize {
    let mut buf = vec![0u8; MAX_FRAME_BYTES + 1];
    let mut n = 0;
    while let Ok(Some(_)) = tap.read_frame(&mut buf) {
        n += 1;
    }
    n
}

/// Announce the guest's MAC from this host (a backup that just went live):
/// a bridge moves the MAC to this port at once instead of waiting for the
/// guest to send. Sent three times, as QEMU does.
pub fn announce(tap: &Tap, mac: [u8; 6]) {
    let frame = gratuitous_arp(mac, None);
    for i in 0..3 {
        if let Err(e) = tap.write_frame(&frame) {
            warn!(tap = %tap.name(), "announcing the guest's MAC failed: {e}");
            return;
        }
        if i < 2 {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_come_back_whole_from_any_pieces_of_the_stream() {
        let a = vec![1u8; 60];
        let b = vec![2u8; 1514];
        let mut stream = frame_record(&a);
        stream.extend(frame_record(&b));
        for cut in [
            0,
            1,
            3,
            4,
            5,
            63,
            64,
            65,
            100,
            stream.len() - 1,
            stream.len(),
        ] {
            let mut d = FrameDecoder::default();
            let mut got = d.push(&stream[..cut]);
            got.extend(d.push(&stream[cut..]));
            assert_eq!(got, vec![a.clone(), b.clone()], "cut at {cut}");
        }
        let mut d = FrameDecoder::default();
        assert!(d.push(&[0xff; 8]).is_empty(), "a length no frame has");
        assert_eq!(d.push(&frame_record(&a)), vec![a.clone()], "in step again");
        let mut d = FrameDecoder::default();
        let mut got = Vec::new();
        for byte in &stream {
            got.extend(d.push(std::slice::from_ref(byte)));
        }
        assert_eq!(got.len(), 2, "byte by byte");
    }
}
