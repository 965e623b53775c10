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

/// Audit `text`, a console transcript of the ticker workload. `expected`:
/// the number of lines of a complete run (`Some` when the run ended and
/// must have printed them all, with its end line once).
pub fn audit_ticker(text: &str, expected: Option<u64>) -> Audit {
    let mut a = Audit::default();
    let mut sum = 7u64;
    for raw in text.lines() {
        let line = raw.trim_end_matches('\r');
        if let Some(rest) = line.strip_prefix("ticker done ") {
            a.done += 1;
            let want = format!("lines={} sum={}", a.last, sum);
            if rest != want {
                a.problem(format!(
                    "the end line is {line:?}, expected \"ticker done {want}\""
                ));
                a.wrong += 1;
            }
            continue;
        }
        if let Some(rest) = line.strip_prefix("ticker ") {
            let parsed = rest
                .split_once(" sum=")
                .and_then(|(i, s)| Some((i.parse::<u64>().ok()?, s.parse::<u64>().ok()?)));
            let Some((i, s)) = parsed else {
                a.foreign += 1;
                a.problem(format!("a garbled ticker line: {line:?}"));
                continue;
            };
            a.lines += 1;
            if i <= a.last {
                a.repeated += 1;
                a.problem(format!(
                    "ticker line {i} again after line {} (repeated output)",
                    a.last
                ));
                continue;
            }
            if i > a.last + 1 {
                a.lost += i - a.last - 1;
                a.problem(format!(
                    "ticker lines {}..{} missing before line {i} (lost output)",
                    a.last + 1,
                    i - 1
                ));
                for k in a.last + 1..i {
                    sum = (sum * 31 + k * 7919) % MODULUS;
                }
            }
            sum = (sum * 31 + i * 7919) % MODULUS;
            a.last = i;
            if s != sum {
                a.wrong += 1;
                a.problem(format!(
                    "ticker line {i} has sum={s}, the chain gives {sum}"
                ));
            }
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

#[cfg(test)]
mod tests {
    use super::*;

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
