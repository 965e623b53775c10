//! The interactive console on the user's terminal: raw mode while a VM
//! runs, the escape sequence that leaves, and restoring the terminal on
//! every way out.
//!
//! While a console is attached to a terminal, every key goes to the guest,
//! `Ctrl-C`, `Ctrl-Z` and `Ctrl-\` included (the terminal's own signal
//! keys are off: `ISIG` cleared), as with QEMU's `-serial mon:stdio`. One
//! escape leaves: **Ctrl-A then x**. `Ctrl-A Ctrl-A` sends one `Ctrl-A` to
//! the guest, `Ctrl-A h` prints the keys, and `Ctrl-A` followed by any
//! other key sends both keys on.
//!
//! The terminal's settings are restored when [`RawTerminal`] is dropped
//! (normal end, an error, the escape, a stop by signal) and by a panic
//! hook (a panic that aborts would skip the drop).

use std::io::{self, IsTerminal, Read};
use std::sync::Mutex;

/// The escape key: Ctrl-A.
pub const ESCAPE: u8 = 0x01;

/// One line describing the escape, printed when a console starts and in
/// `--help`.
pub const ESCAPE_HELP: &str =
    "console: every key goes to the guest; Ctrl-A x leaves, Ctrl-A Ctrl-A sends Ctrl-A, Ctrl-A h shows this";

/// Settings saved by the active [`RawTerminal`], for the panic hook.
static SAVED: Mutex<Option<libc::termios>> = Mutex::new(None);

fn restore_saved() {
    let saved = SAVED.lock().unwrap_or_else(|e| e.into_inner()).take();
    if let Some(t) = saved {
        // SAFETY: `t` was read from fd 0 by tcgetattr; tcsetattr only
        // reads it.
        unsafe { libc::tcsetattr(0, libc::TCSANOW, &t) };
    }
}

/// The terminal on stdin in raw mode while alive; the previous settings
/// come back on drop and on a panic.
pub struct RawTerminal {
    _private: (),
}

impl RawTerminal {
    /// Put the terminal on stdin in raw mode; `None` if stdin is not a
    /// terminal (then nothing changes and no escape applies).
    pub fn enter() -> Option<RawTerminal> {
        if !io::stdin().is_terminal() {
            return None;
        }
        // SAFETY: termios is a plain C struct; tcgetattr fills it for fd 0.
        let mut saved: libc::termios = unsafe { std::mem::zeroed() };
        // SAFETY: fd 0 is open (it is a terminal) and `saved` is valid for writes.
        if unsafe { libc::tcgetattr(0, &mut saved) } != 0 {
            return None;
        }
        *SAVED.lock().unwrap_or_else(|e| e.into_inner()) = Some(saved);
        install_panic_hook();
        let raw = raw_mode(saved);
        // SAFETY: `raw` is a valid termios derived from the current one.
        unsafe { libc::tcsetattr(0, libc::TCSANOW, &raw) };
        Some(RawTerminal { _private: () })
    }
}

impl Drop for RawTerminal {
    fn drop(&mut self) {
        restore_saved();
    }
}

/// The raw settings: no line editing, no echo, no signal keys, no flow
/// control or CR/NL translation of input, one byte at a time. Output
/// post-processing stays on, so vmft's own messages keep their line ends.
pub fn raw_mode(mut t: libc::termios) -> libc::termios {
    t.c_lflag &= !(libc::ICANON | libc::ECHO | libc::ECHONL | libc::ISIG | libc::IEXTEN);
    t.c_iflag &= !(libc::IXON
        | libc::IXOFF
        | libc::ICRNL
        | libc::INLCR
        | libc::IGNCR
        | libc::ISTRIP
        | libc::BRKINT
        | libc::PARMRK);
    t.c_cflag |= libc::CS8;
    t.c_cc[libc::VMIN] = 1;
    t.c_cc[libc::VTIME] = 0;
    t
}

fn install_panic_hook() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            restore_saved();
            previous(info);
        }));
    });
}

/// What the escape filter found in the keys.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EscapeAction {
    /// Ctrl-A x: leave.
    Leave,
    /// Ctrl-A h: show the keys.
    Help,
}

/// Turns typed bytes into bytes for the guest and escape actions.
#[derive(Debug, Default, Clone)]
pub struct EscapeFilter {
    after_escape: bool,
}

impl EscapeFilter {
    /// Filter `input` into `out` (bytes for the guest); returns the first
    /// action, after which the rest of `input` is not looked at (leaving
    /// drops what was typed after the escape).
    pub fn feed(&mut self, input: &[u8], out: &mut Vec<u8>) -> Option<EscapeAction> {
        for &b in input {
            if self.after_escape {
                self.after_escape = false;
                match b {
                    b'x' | b'X' => return Some(EscapeAction::Leave),
                    b'h' | b'H' | b'?' => return Some(EscapeAction::Help),
                    ESCAPE => out.push(ESCAPE),
                    other => out.extend_from_slice(&[ESCAPE, other]),
                }
            } else if b == ESCAPE {
                self.after_escape = true;
            } else {
                out.push(b);
            }
        }
        None
    }
}

/// Console input from a terminal with the escape applied: reads like the
/// terminal, without the escape keys; on Ctrl-A x it calls `on_leave` and
/// ends (end of input).
pub struct EscapeReader<R> {
    inner: R,
    filter: EscapeFilter,
    pending: Vec<u8>,
    on_leave: Option<Box<dyn FnOnce() + Send>>,
}

impl<R: Read> EscapeReader<R> {
    /// Filter `inner`; `on_leave` runs once, when the user leaves.
    pub fn new(inner: R, on_leave: Box<dyn FnOnce() + Send>) -> Self {
        EscapeReader {
            inner,
            filter: EscapeFilter::default(),
            pending: Vec::new(),
            on_leave: Some(on_leave),
        }
    }
}

impl<R: Read> Read for EscapeReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            if !self.pending.is_empty() {
                let n = buf.len().min(self.pending.len());
                buf[..n].copy_from_slice(&self.pending[..n]);
                self.pending.drain(..n);
                return Ok(n);
            }
            if self.on_leave.is_none() {
                return Ok(0);
            }
            let mut raw = [0u8; 256];
            let n = self.inner.read(&mut raw)?;
            if n == 0 {
                return Ok(0);
            }
            match self.filter.feed(&raw[..n], &mut self.pending) {
                Some(EscapeAction::Leave) => {
                    if let Some(f) = self.on_leave.take() {
                        f();
                    }
                    // Bytes typed before the escape in the same read still go.
                }
                Some(EscapeAction::Help) => eprint!("\r\nvmft: {ESCAPE_HELP}\r\n"),
                None => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn feed(input: &[u8]) -> (Vec<u8>, Option<EscapeAction>) {
        let mut f = EscapeFilter::default();
        let mut out = Vec::new();
        let a = f.feed(input, &mut out);
        (out, a)
    }

    #[test]
    fn control_keys_pass_to_the_guest() {
        assert_eq!(
            feed(b"ls\x03\x1a\x1c\x04\r"),
            (b"ls\x03\x1a\x1c\x04\r".to_vec(), None)
        );
    }

    #[test]
    fn ctrl_a_x_leaves_and_drops_what_follows() {
        assert_eq!(
            feed(b"ab\x01xcd"),
            (b"ab".to_vec(), Some(EscapeAction::Leave))
        );
    }

    #[test]
    fn ctrl_a_twice_sends_one_ctrl_a() {
        assert_eq!(feed(b"\x01\x01z"), (b"\x01z".to_vec(), None));
    }

    #[test]
    fn ctrl_a_then_another_key_sends_both() {
        assert_eq!(feed(b"\x01q"), (b"\x01q".to_vec(), None));
    }

    #[test]
    fn the_escape_spans_reads() {
        let mut f = EscapeFilter::default();
        let mut out = Vec::new();
        assert_eq!(f.feed(b"a\x01", &mut out), None);
        assert_eq!(f.feed(b"x", &mut out), Some(EscapeAction::Leave));
        assert_eq!(out, b"a");
    }

    #[test]
    fn help_is_an_action() {
        assert_eq!(feed(b"\x01h"), (Vec::new(), Some(EscapeAction::Help)));
    }

    #[test]
    fn reader_ends_input_on_leave_and_calls_back_once() {
        use std::sync::atomic::{AtomicU32, Ordering};
        use std::sync::Arc;
        let calls = Arc::new(AtomicU32::new(0));
        let c = calls.clone();
        let mut r = EscapeReader::new(
            &b"echo hi\r\x01xmore"[..],
            Box::new(move || {
                c.fetch_add(1, Ordering::SeqCst);
            }),
        );
        let mut all = Vec::new();
        r.read_to_end(&mut all).unwrap();
        assert_eq!(all, b"echo hi\r");
        assert_eq!(calls.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn raw_mode_turns_off_signal_keys_and_line_editing() {
        // SAFETY: an all-zero termios is a valid value of the plain struct.
        let mut t: libc::termios = unsafe { std::mem::zeroed() };
        t.c_lflag = libc::ICANON | libc::ECHO | libc::ISIG | libc::IEXTEN;
        t.c_iflag = libc::IXON | libc::ICRNL;
        t.c_oflag = libc::OPOST;
        let r = raw_mode(t);
        assert_eq!(
            r.c_lflag & (libc::ICANON | libc::ECHO | libc::ISIG | libc::IEXTEN),
            0
        );
        assert_eq!(r.c_iflag & (libc::IXON | libc::ICRNL), 0);
        assert_eq!(r.c_oflag & libc::OPOST, libc::OPOST);
        assert_eq!(r.c_cc[libc::VMIN], 1);
    }
}
