//! Stopping a VM on purpose: the console's escape key, or SIGTERM, SIGINT
//! or SIGHUP sent to the monitor.
//!
//! A stop is a request: whoever asks sets the reason in a [`StopHandle`]
//! and kicks the vCPU out of the guest; the run loop sees it at its next
//! boundary and ends the run the clean way (a recording writes its end
//! entry there, so the log is complete and replays to the same digest).
//!
//! Signals are taken by one thread with `sigwait` ([`watch_signals`]):
//! they are blocked in every thread (the mask is inherited, so
//! [`block_stop_signals`] runs first thing in `main`), so no handler ever
//! runs in the middle of the vCPU loop.

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex};

use crate::vcpu::Kicker;

/// Why the VM is asked to stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    /// The console's escape (Ctrl-A x).
    Escape,
    /// SIGTERM.
    Term,
    /// SIGINT (sent by another process; typed Ctrl-C goes to the guest).
    Int,
    /// SIGHUP: the terminal went away.
    Hangup,
}

impl StopReason {
    fn code(self) -> u8 {
        match self {
            StopReason::Escape => 1,
            StopReason::Term => 2,
            StopReason::Int => 3,
            StopReason::Hangup => 4,
        }
    }

    fn from_code(c: u8) -> Option<Self> {
        match c {
            1 => Some(StopReason::Escape),
            2 => Some(StopReason::Term),
            3 => Some(StopReason::Int),
            4 => Some(StopReason::Hangup),
            _ => None,
        }
    }

    /// The reason for a signal number, if it is a stop signal.
    pub fn from_signal(sig: libc::c_int) -> Option<Self> {
        match sig {
            libc::SIGTERM => Some(StopReason::Term),
            libc::SIGINT => Some(StopReason::Int),
            libc::SIGHUP => Some(StopReason::Hangup),
            _ => None,
        }
    }
}

impl std::fmt::Display for StopReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            StopReason::Escape => "the console escape, Ctrl-A x",
            StopReason::Term => "SIGTERM",
            StopReason::Int => "SIGINT",
            StopReason::Hangup => "SIGHUP (the terminal closed)",
        })
    }
}

/// Told of a stop request (a process with no VM of its own: `vmft ft`).
type Listener = Box<dyn Fn(StopReason) + Send>;

#[derive(Default)]
struct Shared {
    reason: AtomicU8,
    kicker: Mutex<Option<Kicker>>,
    listener: Mutex<Option<Listener>>,
}

/// A stop request shared by the run loop and whoever may ask for a stop.
#[derive(Clone, Default)]
pub struct StopHandle {
    shared: Arc<Shared>,
}

impl StopHandle {
    /// A handle with no stop requested.
    pub fn new() -> Self {
        Self::default()
    }

    /// Ask the VM to stop (the first reason given wins). Returns whether a
    /// running VM was there to be told.
    pub fn request(&self, reason: StopReason) -> bool {
        let _ = self.shared.reason.compare_exchange(
            0,
            reason.code(),
            Ordering::AcqRel,
            Ordering::Acquire,
        );
        let kicker = *self.shared.kicker.lock().unwrap_or_else(|e| e.into_inner());
        let listener = self
            .shared
            .listener
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if let Some(f) = listener.as_ref() {
            f(reason);
        }
        if let Some(k) = kicker {
            k.kick();
            true
        } else {
            listener.is_some()
        }
    }

    /// Call `f` on every stop request (for a process that passes stops on
    /// to VMs it started).
    pub fn on_request(&self, f: impl Fn(StopReason) + Send + 'static) {
        *self
            .shared
            .listener
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = Some(Box::new(f));
    }

    /// Kick the VM's vCPU out of the guest without asking for a stop (so
    /// the run loop looks at something new at once, e.g. a failed peer).
    pub fn kick(&self) {
        let kicker = *self.shared.kicker.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(k) = kicker {
            k.kick();
        }
    }

    /// The stop asked for, if any.
    pub fn requested(&self) -> Option<StopReason> {
        StopReason::from_code(self.shared.reason.load(Ordering::Acquire))
    }

    /// The VM's vCPU is running: kick it on a request.
    pub fn attach(&self, kicker: Kicker) {
        *self.shared.kicker.lock().unwrap_or_else(|e| e.into_inner()) = Some(kicker);
    }

    /// The VM is done: nobody to kick any more.
    pub fn detach(&self) {
        *self.shared.kicker.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }
}

fn stop_signal_set() -> libc::sigset_t {
    // SAFETY: sigemptyset initialises the set; sigaddset adds valid signals.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGHUP);
        set
    }
}

/// Block SIGTERM, SIGINT and SIGHUP in the calling thread and in every
/// thread it starts afterwards. Call first thing in `main`.
pub fn block_stop_signals() {
    let set = stop_signal_set();
    // SAFETY: `set` is an initialised signal set; the old mask is not needed.
    unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
}

/// Start the thread that turns stop signals into requests on `stop`. When
/// no VM is attached yet (still preparing), `not_running` is called with
/// the reason instead (the binary exits there).
pub fn watch_signals(stop: StopHandle, not_running: fn(StopReason)) {
    let spawned = std::thread::Builder::new()
        .name("vmft-signals".into())
        .spawn(move || {
            let set = stop_signal_set();
            loop {
                let mut sig: libc::c_int = 0;
                // SAFETY: `set` is initialised and `sig` valid for writes; the
                // signals are blocked in every thread, so sigwait takes them.
                if unsafe { libc::sigwait(&set, &mut sig) } != 0 {
                    continue;
                }
                let Some(reason) = StopReason::from_signal(sig) else {
                    continue;
                };
                tracing::info!(%reason, "stop requested");
                if !stop.request(reason) {
                    not_running(reason);
                }
            }
        });
    if let Err(e) = spawned {
        tracing::warn!("cannot watch for stop signals: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_reason_wins_and_nobody_is_kicked_before_attach() {
        let s = StopHandle::new();
        assert_eq!(s.requested(), None);
        assert!(!s.request(StopReason::Term));
        assert!(!s.request(StopReason::Escape));
        assert_eq!(s.requested(), Some(StopReason::Term));
    }

    #[test]
    fn signals_map_to_reasons() {
        assert_eq!(
            StopReason::from_signal(libc::SIGTERM),
            Some(StopReason::Term)
        );
        assert_eq!(
            StopReason::from_signal(libc::SIGHUP),
            Some(StopReason::Hangup)
        );
        assert_eq!(StopReason::from_signal(libc::SIGUSR1), None);
        for r in [
            StopReason::Escape,
            StopReason::Term,
            StopReason::Int,
            StopReason::Hangup,
        ] {
            assert_eq!(StopReason::from_code(r.code()), Some(r));
        }
    }
}
