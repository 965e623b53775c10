//! What a user saw, checked end to end: the audit of a console transcript
//! of the `ticker` workload (the drill's and the failover tests' witness).
//!
//! The workload prints `ticker I sum=S` for I = 1, 2, ... where S chains
//! every line before it (`S_I = (S_{I-1} * 31 + I * 7919) mod 1e9+7`,
//! `S_0 = 7`), then `ticker done lines=N sum=S_N`, then init's
//! `VMFT-DONE status=0`. A transcript that crossed failovers must still be
//! exactly that: every line once, in order, with the right sum. The audit
//! counts what is not (lines lost, repeated, out of order, wrong, and
//! lines the guest never printed), so a drill can report each kind, and
//! names the first problem.

/// The chain's modulus.
const MODULUS: u64 = 1_000_000_007;

/// The sum printed on ticker line `i` (from 1).
pub fn ticker_sum(i: u64) -> u64 {
    (1..=i).fold(7, |s, k| (s * 31 + k * 7919) % MODULUS)
}

/// The audit of one transcript.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Audit {
    /// Ticker lines seen.
    pub lines: u64,
    /// The highest line number seen in order.
    pub last: u64,
    /// Lines never seen (gaps before `last`, and, for a complete run, the
    /// missing end).
    pub lost: u64,
    /// Lines seen again after a later one (repeated output).
    pub repeated: u64,
    /// Lines whose sum is not the chain's.
    pub wrong: u64,
    /// Lines that are not the workload's, the kernel's or init's
    /// (garbled or invented output).
    pub foreign: u64,
    /// `ticker done` lines seen.
    pub done: u64,
    /// The `drill` workload's network lines (`net: ...`: eth0 up, the
    /// echo server listening, or why not), which are not chained: the
    /// drill's TCP stream checks the network.
    pub net: u64,
    /// The first problem, in words.
    pub first_problem: Option<String>,
}

impl Audit {
    /// Nothing lost, repeated, wrong or foreign.
    pub fn clean(&self) -> bool {
        self.first_problem.is_none()
    }

    fn problem(&mut self, what: String) {
        self.first_problem.get_or_insert(what);
    }
}

/// A workload whose transcript [`walk`] audits: its lines `NAME I ...`
/// numbered from 1, each once and in order, and its own check of each
/// line's contents against the lines before it.
trait Chained {
    /// The first word of the numbered lines (`ticker`, `drill`).
    const NAME: &'static str;
    /// What a numbered line says besides its number.
    type Fields;

    /// Count `line` in `a` if it is one of the workload's lines other than
    /// the numbered ones (its end line, ...); false if it is not.
    fn other_line(&mut self, a: &mut Audit, line: &str) -> bool;

    /// The number and fields of a numbered line (`rest`: after `NAME `);
    /// `None`: garbled.
    fn parse(rest: &str) -> Option<(u64, Self::Fields)>;

    /// Check line `i`, the next after line `a.last` (not yet updated) in
    /// the transcript, with `missing` lines lost between them (already
    /// counted), and go on from it.
    fn follow(&mut self, a: &mut Audit, i: u64, fields: Self::Fields, missing: u64);
}

/// Walk `text` line by line: the numbered lines of `w` counted (lost,
/// repeated, garbled) and checked by `w`, its other lines handed to it,
/// the kernel's and init's lines left alone, any other line foreign.
fn walk<W: Chained>(w: &mut W, text: &str) -> Audit {
    let mut a = Audit::default();
    for raw in text.lines() {
        let line = raw.trim_end_matches('\r');
        if w.other_line(&mut a, line) {
            continue;
        }
        if let Some(rest) = line.strip_prefix(W::NAME).and_then(|r| r.strip_prefix(' ')) {
            let Some((i, fields)) = W::parse(rest) else {
                a.foreign += 1;
                a.problem(format!("a garbled {} line: {line:?}", W::NAME));
                continue;
            };
            a.lines += 1;
            if i <= a.last {
                a.repeated += 1;
                a.problem(format!(
                    "{} line {i} again after line {} (repeated output)",
                    W::NAME,
                    a.last
                ));
                continue;
            }
            let missing = i - a.last - 1;
            if missing > 0 {
                a.lost += missing;
                a.problem(format!(
                    "{} lines {}..{} missing before line {i} (lost output)",
                    W::NAME,
                    a.last + 1,
                    i - 1
                ));
            }
            w.follow(&mut a, i, fields, missing);
            a.last = i;
            continue;
        }
        let ours = line.is_empty()
            || line.starts_with('[')
            || line.starts_with("VMFT-")
            || line.starts_with("vmft");
        if !ours {
            a.foreign += 1;
            a.problem(format!("a line the guest did not print: {line:?}"));
        }
    }
    a
}

/// The `ticker` workload: each sum the chain's, the lost lines' included;
/// its end line `ticker done lines=N sum=S_N`.
struct Ticker {
    /// The chain's value at the last line seen (or lost).
    sum: u64,
}

impl Chained for Ticker {
    const NAME: &'static str = "ticker";
    /// The line's sum.
    type Fields = u64;

    fn other_line(&mut self, a: &mut Audit, line: &str) -> bool {
        let Some(rest) = line.strip_prefix("ticker done ") else {
            return false;
        };
        a.done += 1;
        let want = format!("lines={} sum={}", a.last, self.sum);
        if rest != want {
            a.problem(format!(
                "the end line is {line:?}, expected \"ticker done {want}\""
            ));
            a.wrong += 1;
        }
        true
    }

    fn parse(rest: &str) -> Option<(u64, u64)> {
        let (i, s) = rest.split_once(" sum=")?;
        Some((i.parse().ok()?, s.parse().ok()?))
    }

    fn follow(&mut self, a: &mut Audit, i: u64, s: u64, _missing: u64) {
        for k in a.last + 1..=i {
            self.sum = (self.sum * 31 + k * 7919) % MODULUS;
        }
        if s != self.sum {
            a.wrong += 1;
            a.problem(format!(
                "ticker line {i} has sum={s}, the chain gives {}",
                self.sum
            ));
        }
    }
}

/// Audit `text`, a console transcript of the ticker workload. `expected`:
/// the number of lines of a complete run (`Some` when the run ended and
/// must have printed them all, with its end line once).
pub fn audit_ticker(text: &str, expected: Option<u64>) -> Audit {
    let mut a = walk(&mut Ticker { sum: 7 }, text);
    if let Some(n) = expected {
        if a.last < n {
            a.lost += n - a.last;
            a.problem(format!(
                "{} of {n} ticker lines, the rest never came (lost output)",
                a.last
            ));
        }
        if a.done != 1 {
            a.problem(format!("the end line printed {} times, not once", a.done));
        }
    }
    a
}

/// The next value of the drill workload's chain (`guest-images/initramfs/
/// workloads/drill`): line `i` with clock value `t` after value `h`.
pub fn drill_next(h: u64, i: u64, t: u64) -> u64 {
    (h * 31 + i * 7919 + t) % MODULUS
}

/// The `drill` workload: each line chained to the one before it in the
/// transcript; its end line and its network lines counted.
struct Drill {
    /// The value of the last line seen.
    h: u64,
}

impl Chained for Drill {
    const NAME: &'static str = "drill";
    /// The line's clock value and chain value.
    type Fields = (u64, u64);

    fn other_line(&mut self, a: &mut Audit, line: &str) -> bool {
        if line.starts_with("drill done ") {
            a.done += 1;
        } else if line.starts_with("net: ") {
            a.net += 1;
        } else {
            return false;
        }
        true
    }

    fn parse(rest: &str) -> Option<(u64, (u64, u64))> {
        let (i, rest) = rest.split_once(" t=")?;
        let (t, v) = rest.split_once(" h=")?;
        Some((i.parse().ok()?, (t.parse().ok()?, v.parse().ok()?)))
    }

    fn follow(&mut self, a: &mut Audit, i: u64, (t, v): (u64, u64), missing: u64) {
        // After a gap the lost lines are the problem, counted once.
        if missing == 0 && drill_next(self.h, i, t) != v {
            a.wrong += 1;
            a.problem(format!(
                "drill line {i} does not follow line {} (h={v}, the chain gives {}): \
                 output of two executions",
                a.last,
                drill_next(self.h, i, t)
            ));
        }
        // Go on from what the line says, so one seam counts once.
        self.h = v;
    }
}

/// Audit a transcript of the `drill` workload (lines `drill I t=T h=H`,
/// H chained through every line before it): each line once, in order,
/// none missing, and each H the chain's value from the line before, so a
/// line from another execution (output that escaped the output rule, then
/// re-executed differently by the backup) shows as `wrong`. A workload run
/// until stopped has no end line: the transcript is checked as a prefix.
/// Lines `net: ...` (a guest with a network card sets it up and starts its
/// echo server before the first drill line) are counted in [`Audit::net`]
/// and otherwise left alone.
pub fn audit_drill(text: &str) -> Audit {
    // A run stopped in the middle of a line leaves that line cut short:
    // it is not a line of the workload's yet.
    let whole = match text.rfind('\n') {
        Some(i) => &text[..=i],
        None => "",
    };
    walk(&mut Drill { h: 7 }, whole)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A drill transcript: lines `from..=to` of one execution whose clock
    /// reads `t0 + 10 * i`, continuing the chain from `h`.
    fn drill_lines(from: u64, to: u64, t0: u64, mut h: u64) -> (String, u64) {
        let mut s = String::new();
        for i in from..=to {
            let t = t0 + 10 * i;
            h = drill_next(h, i, t);
            s.push_str(&format!("drill {i} t={t} h={h}\r\n"));
        }
        (s, h)
    }

    #[test]
    fn a_drill_transcript_of_one_execution_is_clean() {
        let (t, _) = drill_lines(1, 40, 500, 7);
        let a = audit_drill(&format!("VMFT-READY workload=drill\r\n{t}"));
        assert!(a.clean(), "{a:?}");
        assert_eq!((a.lines, a.last), (40, 40));
    }

    #[test]
    fn a_seam_between_two_executions_lost_and_repeated_lines_are_caught() {
        let (head, h) = drill_lines(1, 10, 500, 7);
        // The backup re-executed line 10 with another clock and went on.
        let (_, h9) = drill_lines(1, 9, 500, 7);
        let (other, _) = drill_lines(10, 12, 900, h9);
        let seam = format!("{head}{}", other.split_once('\n').unwrap().1);
        let a = audit_drill(&seam);
        assert_eq!(a.wrong, 1, "{a:?}");
        assert!(a.first_problem.unwrap().contains("two executions"));
        let (tail, _) = drill_lines(12, 13, 500, h);
        let lost = audit_drill(&format!("{head}{tail}"));
        assert_eq!(lost.lost, 1, "{lost:?}");
        let (again, _) = drill_lines(10, 10, 500, drill_lines(1, 9, 500, 7).1);
        let rep = audit_drill(&format!("{head}{again}"));
        assert_eq!(rep.repeated, 1, "{rep:?}");
        let garbled = audit_drill(&format!("{head}drill 11 t=5 h\r\n"));
        assert_eq!(garbled.foreign, 1, "{garbled:?}");
        // A last line cut short by the stop is not audited.
        let cut = audit_drill(&format!("{head}drill 11 t=5 h=5"));
        assert!(cut.clean() && cut.last == 10, "{cut:?}");
    }

    #[test]
    fn the_network_lines_of_a_drill_guest_are_counted_not_chained() {
        let (t, _) = drill_lines(1, 20, 500, 7);
        let text = format!(
            "VMFT-READY workload=drill\r\nnet: eth0 up at 10.77.0.50/24\r\n\
             net: echo server on 7000\r\n{t}"
        );
        let a = audit_drill(&text);
        assert!(a.clean(), "{a:?}");
        assert_eq!((a.lines, a.last, a.net), (20, 20, 2));
        // Only the workload's own prefix: "network:" or "net:x" are not it.
        for stray in ["network: up\r\n", "net:eth0\r\n"] {
            let a = audit_drill(&format!("{stray}{t}"));
            assert_eq!((a.foreign, a.net), (1, 0), "{stray:?}: {a:?}");
        }
        // A ticker transcript has no network lines: one is foreign there.
        let a = audit_ticker("net: eth0 up at 10.77.0.50/24\r\n", None);
        assert_eq!(a.foreign, 1, "{a:?}");
    }

    /// What each workload does its own way on the shared walk: the end
    /// line, a line after a gap, a last line without its newline, and the
    /// workload's name in each problem.
    #[test]
    fn each_workload_checks_its_own_lines_on_the_shared_walk() {
        // The drill's end line is counted; a line after a gap is lost
        // output only (not also a seam), named as the drill's.
        let (head, h) = drill_lines(1, 10, 500, 7);
        let (tail, _) = drill_lines(12, 12, 500, drill_next(h, 11, 610));
        let a = audit_drill(&format!("{head}{tail}drill done lines=12\r\n"));
        assert_eq!((a.lost, a.wrong, a.done, a.last), (1, 0, 1, 12), "{a:?}");
        assert_eq!(
            a.first_problem.as_deref(),
            Some("drill lines 11..11 missing before line 12 (lost output)")
        );
        let (again, _) = drill_lines(10, 10, 500, drill_lines(1, 9, 500, 7).1);
        let a = audit_drill(&format!("{head}{again}drill x\r\n"));
        assert_eq!((a.repeated, a.foreign, a.lines), (1, 1, 11), "{a:?}");
        assert_eq!(
            a.first_problem.as_deref(),
            Some("drill line 10 again after line 10 (repeated output)")
        );
        let a = audit_drill("drill 1 t=5\r\n");
        assert_eq!(
            a.first_problem.as_deref(),
            Some("a garbled drill line: \"drill 1 t=5\"")
        );
        // The ticker's chain goes through the lost lines: a line after a
        // gap with a wrong sum is lost output and wrong.
        let mut t = transcript(&[1, 2], false);
        t.push_str("ticker 5 sum=1\r\n");
        let a = audit_ticker(&t, None);
        assert_eq!((a.lost, a.wrong, a.last), (2, 1, 5), "{a:?}");
        assert_eq!(
            a.first_problem.as_deref(),
            Some("ticker lines 3..4 missing before line 5 (lost output)")
        );
        // A wrong end line is wrong, and still the end line.
        let mut t = transcript(&[1, 2, 3], false);
        t.push_str("ticker done lines=3 sum=1\r\n");
        let a = audit_ticker(&t, Some(3));
        assert_eq!((a.done, a.wrong, a.lost), (1, 1, 0), "{a:?}");
        assert!(
            a.first_problem
                .as_deref()
                .unwrap()
                .starts_with("the end line is \"ticker done lines=3 sum=1\""),
            "{a:?}"
        );
        // The ticker audits a last line without its newline; the drill
        // leaves it (a stop may have cut it short).
        let a = audit_ticker(&format!("ticker 1 sum={}", ticker_sum(1)), None);
        assert!(a.clean() && a.lines == 1, "{a:?}");
        let a = audit_ticker("ticker 1 sum=1", None);
        assert_eq!(a.wrong, 1, "{a:?}");
        let a = audit_drill("drill 1 t=5 h=5");
        assert!(a.clean() && a.lines == 0, "{a:?}");
    }

    fn transcript(lines: &[u64], done: bool) -> String {
        let mut t = String::from("VMFT-READY workload=ticker\r\n");
        for &i in lines {
            t.push_str(&format!("ticker {i} sum={}\r\n", ticker_sum(i)));
        }
        if done {
            let n = lines.iter().copied().max().unwrap_or(0);
            t.push_str(&format!("ticker done lines={n} sum={}\r\n", ticker_sum(n)));
            t.push_str("VMFT-DONE status=0\r\n");
        }
        t
    }

    #[test]
    fn the_chain_matches_the_workload() {
        // From the workload's own arithmetic: 7*31 + 7919 = 8136.
        assert_eq!(ticker_sum(1), 8136);
        assert_eq!(ticker_sum(2), (8136 * 31 + 2 * 7919) % MODULUS);
    }

    #[test]
    fn a_whole_transcript_is_clean() {
        let t = transcript(&(1..=50).collect::<Vec<_>>(), true);
        let a = audit_ticker(&t, Some(50));
        assert!(a.clean(), "{a:?}");
        assert_eq!((a.lines, a.last, a.done), (50, 50, 1));
        // A run still going: a prefix is clean.
        let t = transcript(&(1..=20).collect::<Vec<_>>(), false);
        assert!(audit_ticker(&t, None).clean());
    }

    #[test]
    fn lost_repeated_wrong_and_foreign_lines_are_counted() {
        let mut lines: Vec<u64> = (1..=10).collect();
        lines.extend([9, 10]); // repeated after a failover
        lines.extend(13..=20); // 11 and 12 lost
        let mut t = transcript(&lines, true);
        t.push_str("ticker 21 sum=5\r\n"); // wrong sum
        t.push_str("tickr 2\r\n"); // garbled
        let a = audit_ticker(&t, Some(21));
        assert_eq!(a.repeated, 2, "{a:?}");
        assert_eq!(a.lost, 2, "{a:?}");
        assert_eq!(a.wrong, 1, "{a:?}");
        assert_eq!(a.foreign, 1, "{a:?}");
        assert!(
            a.first_problem.as_deref().unwrap().contains("line 9 again"),
            "{a:?}"
        );
    }

    #[test]
    fn a_complete_run_must_end_once_with_every_line() {
        let t = transcript(&(1..=5).collect::<Vec<_>>(), false);
        let a = audit_ticker(&t, Some(8));
        assert_eq!(a.lost, 3);
        assert!(!a.clean());
        let mut t = transcript(&(1..=3).collect::<Vec<_>>(), true);
        t.push_str(&format!("ticker done lines=3 sum={}\r\n", ticker_sum(3)));
        let a = audit_ticker(&t, Some(3));
        assert!(a.first_problem.unwrap().contains("2 times"));
    }
}
