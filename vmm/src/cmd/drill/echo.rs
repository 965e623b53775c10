//! The check of the drill's TCP conversation with the guest's echo
//! server: what was sent, what came back, and whether it came back
//! exactly (every byte once, in order) and in time.
//!
//! The client sends numbered lines ([`line`]); the echo server returns
//! each byte as it got it. [`EchoCheck`] keeps the bytes sent and not yet
//! echoed and compares every byte received against them: the first
//! difference breaks the stream and is named (the line, and whether the
//! guest sent a line again, skipped lines, or something else). Time with
//! bytes outstanding and none coming back is a stall: each one is kept
//! ([`Stall`]), so the drill can tell which round it belongs to.
//!
//! Times are durations since the drill's start; nothing here reads a
//! clock or a socket.

use std::collections::VecDeque;
use std::time::Duration;

/// Digits of a line's number.
const NUMBER_DIGITS: usize = 6;

/// Stalls shorter than this are the normal round trip, not kept.
pub const STALL_KEPT: Duration = Duration::from_millis(200);

/// Line `n` of the conversation (from 1): its number, then a pattern that
/// depends on it, 46 bytes with the newline, so a line of another number
/// (repeated, skipped, reordered) differs in its first bytes.
pub fn line(n: u64) -> Vec<u8> {
    let mut x = n.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    x ^= x >> 29;
    format!(
        "{n:0width$} vmft drill tcp stream {x:016x}\n",
        width = NUMBER_DIGITS
    )
    .into_bytes()
}

/// A time with bytes outstanding and nothing echoed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stall {
    /// When the wait began (the last echo, or the send of the oldest
    /// outstanding line if later).
    pub start: Duration,
    /// How long it lasted.
    pub length: Duration,
}

/// Bytes sent and not yet echoed: one line.
#[derive(Debug)]
struct Pending {
    n: u64,
    bytes: Vec<u8>,
}

/// The state of one conversation.
#[derive(Debug, Default)]
pub struct EchoCheck {
    /// Lines sent and not (completely) echoed, oldest first.
    pending: VecDeque<Pending>,
    /// Bytes of the oldest pending line already echoed.
    offset: usize,
    /// Lines and bytes sent, and echoed exactly.
    pub lines_sent: u64,
    pub bytes_sent: u64,
    pub lines_echoed: u64,
    pub bytes_echoed: u64,
    /// Since when the stream waits for an echo (bytes outstanding).
    waiting_since: Option<Duration>,
    /// Stalls of at least [`STALL_KEPT`], in order.
    pub stalls: Vec<Stall>,
    /// Why the stream is broken, once it is.
    broken: Option<String>,
}

impl EchoCheck {
    pub fn new() -> Self {
        EchoCheck::default()
    }

    /// The next line to send, at `at`: recorded as outstanding.
    pub fn send(&mut self, at: Duration) -> Vec<u8> {
        self.lines_sent += 1;
        let bytes = line(self.lines_sent);
        self.bytes_sent += bytes.len() as u64;
        self.pending.push_back(Pending {
            n: self.lines_sent,
            bytes: bytes.clone(),
        });
        self.waiting_since.get_or_insert(at);
        bytes
    }

    /// `data` came back at `at`: compare it with what is outstanding.
    pub fn received(&mut self, data: &[u8], at: Duration) {
        if self.broken.is_some() || data.is_empty() {
            return;
        }
        self.progress(at);
        let mut rest = data;
        while !rest.is_empty() {
            let Some(front) = self.pending.front() else {
                self.break_with(format!(
                    "the guest sent {} bytes more than it was sent (after line {}): {}",
                    rest.len(),
                    self.lines_echoed,
                    show(rest)
                ));
                return;
            };
            let want = &front.bytes[self.offset..];
            let k = want.len().min(rest.len());
            if let Some(i) = (0..k).find(|&i| want[i] != rest[i]) {
                let mut got = front.bytes[..self.offset + i].to_vec();
                let tail = &rest[i..];
                let end = tail
                    .iter()
                    .position(|&b| b == b'\n')
                    .map_or(tail.len(), |p| p + 1);
                got.extend_from_slice(&tail[..end]);
                let why = mismatch(front.n, &front.bytes, &got);
                self.break_with(why);
                return;
            }
            self.offset += k;
            self.bytes_echoed += k as u64;
            rest = &rest[k..];
            if self.offset == front.bytes.len() {
                self.pending.pop_front();
                self.offset = 0;
                self.lines_echoed += 1;
            }
        }
        if self.pending.is_empty() {
            self.waiting_since = None;
        }
    }

    /// Bytes came back at `at`: a wait in progress ends (kept if long),
    /// and one begins again if bytes are still outstanding.
    fn progress(&mut self, at: Duration) {
        if let Some(since) = self.waiting_since {
            let length = at.saturating_sub(since);
            if length >= STALL_KEPT {
                self.stalls.push(Stall {
                    start: since,
                    length,
                });
            }
            self.waiting_since = Some(at);
        }
    }

    /// The guest's end closed (`None`) or failed (`Some(error)`) at `at`;
    /// `expected`: the client had finished and half-closed its end.
    pub fn closed(&mut self, error: Option<&std::io::Error>, expected: bool) {
        if self.broken.is_some() {
            return;
        }
        let after = format!(
            "after {} of {} lines echoed",
            self.lines_echoed, self.lines_sent
        );
        match error {
            Some(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {
                self.break_with(format!("the connection was reset {after}"))
            }
            Some(e) => self.break_with(format!("the connection failed ({e}) {after}")),
            None if !expected => {
                self.break_with(format!("the guest closed the connection {after}"))
            }
            None if !self.pending.is_empty() => self.break_with(format!(
                "the guest closed the connection with {} lines never echoed {after}",
                self.pending.len()
            )),
            None => {}
        }
    }

    /// Sending failed.
    pub fn send_failed(&mut self, e: &std::io::Error) {
        if self.broken.is_none() {
            self.break_with(format!(
                "sending line {} failed: {e} (after {} lines echoed)",
                self.lines_sent, self.lines_echoed
            ));
        }
    }

    /// The stream is broken for `why` (the first reason wins).
    pub fn break_with(&mut self, why: String) {
        self.broken.get_or_insert(why);
    }

    /// Why it is broken, if it is.
    pub fn broken(&self) -> Option<&str> {
        self.broken.as_deref()
    }

    /// Lines sent and not yet echoed.
    pub fn outstanding(&self) -> usize {
        self.pending.len()
    }

    /// The stall in progress at `now` (bytes outstanding since then), if
    /// any.
    pub fn current_stall(&self, now: Duration) -> Option<Stall> {
        self.waiting_since.map(|start| Stall {
            start,
            length: now.saturating_sub(start),
        })
    }
}

/// What differs when line `n` (`want`) came back as `got`: another line
/// number (repeated or skipped lines: bytes out of order) or other bytes.
fn mismatch(n: u64, want: &[u8], got: &[u8]) -> String {
    let number = std::str::from_utf8(got.get(..NUMBER_DIGITS).unwrap_or(b""))
        .ok()
        .and_then(|s| s.parse::<u64>().ok());
    let what = match number {
        Some(m) if m < n => format!("line {m} again (repeated bytes)"),
        Some(m) if m > n && got.starts_with(&line(m)[..got.len().min(want.len())]) => {
            format!("line {m}: lines {n}..{} missing (lost bytes)", m - 1)
        }
        _ => "other bytes".to_string(),
    };
    format!(
        "line {n} came back as {}, expected {}: {what}",
        show(got),
        show(want)
    )
}

/// `bytes` quoted, at most 64 of them.
fn show(bytes: &[u8]) -> String {
    let cut = &bytes[..bytes.len().min(64)];
    let more = if bytes.len() > 64 { "..." } else { "" };
    format!("{:?}{more}", String::from_utf8_lossy(cut))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn lines_are_numbered_distinct_and_of_one_length() {
        assert!(line(1).starts_with(b"000001 vmft drill tcp stream "));
        assert_eq!(line(1).len(), 46);
        assert_eq!(line(123_456).len(), 46);
        assert!(line(7).ends_with(b"\n"));
        assert_ne!(line(7)[7..], line(8)[7..]);
    }

    #[test]
    fn echoes_in_pieces_are_counted_and_the_longest_wait_is_kept() {
        let mut c = EchoCheck::new();
        let l1 = c.send(ms(0));
        // Split across reads.
        c.received(&l1[..10], ms(5));
        c.received(&l1[10..], ms(6));
        assert_eq!(
            (c.lines_echoed, c.bytes_echoed, c.outstanding()),
            (1, 46, 0)
        );
        assert_eq!(c.current_stall(ms(50)), None);
        // An outage: three lines go out, nothing comes back for 3 s.
        let mut back = Vec::new();
        for t in [100, 200, 300] {
            back.extend(c.send(ms(t)));
        }
        assert_eq!(c.current_stall(ms(1100)).unwrap().length, ms(1000));
        c.received(&back, ms(3100));
        assert_eq!((c.lines_sent, c.lines_echoed, c.bytes_sent), (4, 4, 184));
        assert_eq!(
            c.stalls,
            vec![Stall {
                start: ms(100),
                length: ms(3000)
            }]
        );
        assert!(c.broken().is_none());
        c.closed(None, true);
        assert!(c.broken().is_none(), "{:?}", c.broken());
    }

    #[test]
    fn a_repeated_line_is_named() {
        let mut c = EchoCheck::new();
        let l1 = c.send(ms(0));
        c.send(ms(100));
        c.received(&l1, ms(10));
        c.received(&l1, ms(110));
        let why = c.broken().unwrap();
        assert!(
            why.contains("line 2 came back as") && why.contains("line 1 again"),
            "{why}"
        );
        // Nothing after the break changes the verdict.
        c.received(&line(2), ms(200));
        assert_eq!(c.lines_echoed, 1);
    }

    #[test]
    fn missing_lines_are_named() {
        let mut c = EchoCheck::new();
        for t in 0..4 {
            c.send(ms(t * 100));
        }
        c.received(&line(1), ms(10));
        c.received(&line(4), ms(400));
        let why = c.broken().unwrap();
        assert!(why.contains("lines 2..3 missing"), "{why}");
    }

    #[test]
    fn other_bytes_extra_bytes_and_a_broken_close_are_named() {
        let mut c = EchoCheck::new();
        c.send(ms(0));
        let mut bad = line(1);
        bad[20] ^= 0x20;
        c.received(&bad, ms(5));
        assert!(
            c.broken().unwrap().contains("other bytes"),
            "{:?}",
            c.broken()
        );

        let mut c = EchoCheck::new();
        let l1 = c.send(ms(0));
        c.received(&l1, ms(5));
        c.received(b"x\n", ms(6));
        assert!(
            c.broken().unwrap().contains("2 bytes more"),
            "{:?}",
            c.broken()
        );

        let mut c = EchoCheck::new();
        c.send(ms(0));
        let reset = std::io::Error::from(std::io::ErrorKind::ConnectionReset);
        c.closed(Some(&reset), false);
        assert!(c.broken().unwrap().contains("reset after 0 of 1"));

        let mut c = EchoCheck::new();
        c.send(ms(0));
        c.closed(None, false);
        assert!(c.broken().unwrap().contains("the guest closed"));

        // Closed after the client finished, but a line never came back.
        let mut c = EchoCheck::new();
        c.send(ms(0));
        c.closed(None, true);
        assert!(c.broken().unwrap().contains("1 lines never echoed"));
    }
}
