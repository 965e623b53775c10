//! When to kick the vCPU out of the guest: the policy behind
//! [`crate::vcpu::DeadlineKicker`], as a pure function so it can be tested
//! without KVM.
//!
//! A kick costs an exit (about 7 µs here) and, while recording, achieves
//! nothing unless it can deliver something:
//!
//! - **live**: every stop is a boundary where a due timer tick is raised and
//!   a waiting interrupt is injected (or an interrupt window requested), so
//!   kick when the next tick is due;
//! - **recording**: events are delivered only at guest-caused exits or by
//!   an epoch, and an epoch is cut only once the guest has run
//!   `epoch_bound` without an exit. A kick before that is wasted, so kick
//!   when an event is waiting *and* the bound has run out, whichever of the
//!   two comes later. (Kicking at a tick that is already due, while it
//!   cannot be delivered yet, would kick continuously: the regression of
//!   commit a74457e, 2.2 million kicks in one Linux boot.)
//! - **replay**: the log decides; never kick.

use std::time::Duration;

/// What the kick decision depends on, at one stop of the vCPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KickInputs {
    /// The VM is recording (events wait for an exit or an epoch).
    pub recording: bool,
    /// Host-side estimate of the guest clock now, in ns.
    pub now_ns: u64,
    /// Guest clock at which the next timer tick is due, if the timer runs.
    pub next_tick_ns: Option<u64>,
    /// Something is waiting to be delivered already (the PIC has an
    /// interrupt, or console input is queued).
    pub waiting: bool,
    /// Time since the last guest-caused exit (or epoch).
    pub since_exit: Duration,
    /// Longest exit-free stretch before an epoch.
    pub epoch_bound: Duration,
}

/// How long from now until the vCPU should be kicked (`None`: never).
pub fn kick_after(k: KickInputs) -> Option<Duration> {
    let tick = k
        .next_tick_ns
        .map(|t| Duration::from_nanos(t.saturating_sub(k.now_ns)));
    if !k.recording {
        return tick;
    }
    // When the first event will be waiting: now, or when the tick is due.
    let event = if k.waiting {
        Some(Duration::ZERO)
    } else {
        tick
    };
    let bound = k.epoch_bound.saturating_sub(k.since_exit);
    event.map(|e| e.max(bound))
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    fn rec(now_ms: u64, tick_ms: Option<u64>, waiting: bool, since_ms: u64) -> KickInputs {
        KickInputs {
            recording: true,
            now_ns: now_ms * 1_000_000,
            next_tick_ns: tick_ms.map(|t| t * 1_000_000),
            waiting,
            since_exit: Duration::from_millis(since_ms),
            epoch_bound: 10 * MS,
        }
    }

    #[test]
    fn live_kicks_at_the_next_tick_even_if_overdue() {
        let k = KickInputs {
            recording: false,
            ..rec(100, Some(103), false, 50)
        };
        assert_eq!(kick_after(k), Some(3 * MS));
        let overdue = KickInputs {
            recording: false,
            ..rec(100, Some(90), true, 50)
        };
        assert_eq!(kick_after(overdue), Some(Duration::ZERO));
        let no_timer = KickInputs {
            recording: false,
            ..rec(100, None, true, 0)
        };
        assert_eq!(kick_after(no_timer), None);
    }

    #[test]
    fn recording_with_an_overdue_tick_waits_for_the_epoch_bound() {
        // The tick was due 5 ms ago but cannot be delivered before an exit
        // or an epoch: kick when the bound runs out, not now (again and
        // again, which is what the regression did).
        assert_eq!(kick_after(rec(100, Some(95), false, 1)), Some(9 * MS));
        assert_eq!(kick_after(rec(100, Some(95), true, 4)), Some(6 * MS));
    }

    #[test]
    fn recording_kicks_at_the_later_of_tick_and_bound() {
        // Tick in 30 ms, bound runs out in 8 ms: nothing to deliver before
        // the tick, so kick at the tick (an epoch is due by then).
        assert_eq!(kick_after(rec(100, Some(130), false, 2)), Some(30 * MS));
        // Tick in 3 ms, bound runs out in 8 ms: kick at the bound.
        assert_eq!(kick_after(rec(100, Some(103), false, 2)), Some(8 * MS));
    }

    #[test]
    fn recording_past_the_bound_with_an_event_kicks_at_once() {
        assert_eq!(
            kick_after(rec(100, Some(95), false, 12)),
            Some(Duration::ZERO)
        );
        assert_eq!(kick_after(rec(100, None, true, 10)), Some(Duration::ZERO));
    }

    #[test]
    fn recording_with_nothing_to_deliver_never_kicks() {
        assert_eq!(kick_after(rec(100, None, false, 50)), None);
    }
}
