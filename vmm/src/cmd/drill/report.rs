//! The drill's report: one row per round, a table per fault kind, the
//! TCP stream's figures, the verdict line, and the picture (an SVG
//! timeline of rounds, faults, failover times, the stream's stalls and the
//! backup's lag).

use std::collections::BTreeMap;
use std::fmt::Write;
use std::time::{Duration, Instant};

use vmm::lab::audit::Audit;

use super::echo::Stall;
use super::stream::StreamFigures;
use super::Fault;

/// A stall of the TCP stream belongs to the round whose fault came last
/// before it began, or at most this long after (the last echo before a
/// fault can come just before it).
const STALL_LEAD: Duration = Duration::from_millis(500);

/// What the drill knows of its TCP stream.
#[derive(Debug, Clone)]
pub enum Tcp {
    /// No stream ran, for this reason.
    NotChecked(String),
    /// The stream could not start (no connection to the guest).
    NoConnection(String),
    /// The stream ran: its figures (broken or not).
    Checked(StreamFigures),
}

impl Tcp {
    /// The stream ran and broke, or could not start.
    fn failed(&self) -> bool {
        match self {
            Tcp::NotChecked(_) => false,
            Tcp::NoConnection(_) => true,
            Tcp::Checked(f) => f.broken.is_some(),
        }
    }

    /// Its word in the verdict.
    fn word(&self) -> &'static str {
        match self {
            Tcp::NotChecked(_) => "not-checked",
            _ if self.failed() => "broken",
            _ => "ok",
        }
    }
}

/// One round.
#[derive(Debug, Clone)]
pub struct Round {
    pub n: u32,
    pub fault: Fault,
    /// When the fault was injected, from the drill's start.
    pub at: Duration,
    /// From the fault to the survivor's claim won.
    pub go_live: Option<Duration>,
    pub survivor: String,
    /// From the claim won to protected again.
    pub reprotect: Option<Duration>,
    /// The guest's pause for the state transfer, ms.
    pub pause: Option<f64>,
    pub transfer_bytes: u64,
    /// Copy rounds of the state transfer, the pause's included.
    pub copy_rounds: Option<u32>,
    /// Sides that went on after losing the VM.
    pub double_live: u64,
    /// The live side's lag (time from the start, exits) during the round.
    pub lag: Vec<(f64, u64)>,
    /// The output delay the rule added just before the fault (p50, p99 ms).
    pub out_delay: Option<(f64, f64)>,
}

impl Round {
    pub fn new(n: u32, fault: Fault, at: Duration) -> Self {
        Round {
            n,
            fault,
            at,
            go_live: None,
            survivor: String::new(),
            reprotect: None,
            pause: None,
            transfer_bytes: 0,
            copy_rounds: None,
            double_live: 0,
            lag: Vec::new(),
            out_delay: None,
        }
    }

    /// The round on one line, for progress.
    pub fn line(&self) -> String {
        format!(
            "round {} {}: live again after {} on {}, protected again after {} (pause {}, {} MB in {} rounds)",
            self.n,
            self.fault.name(),
            opt_s(self.go_live),
            if self.survivor.is_empty() {
                "-"
            } else {
                &self.survivor
            },
            opt_s(self.reprotect),
            self.pause
                .map(|p| format!("{p:.0} ms"))
                .unwrap_or_else(|| "-".into()),
            self.transfer_bytes >> 20,
            self.copy_rounds
                .map(|n| n.to_string())
                .unwrap_or_else(|| "-".into())
        )
    }
}

fn opt_s(d: Option<Duration>) -> String {
    d.map(|d| format!("{:.3} s", d.as_secs_f64()))
        .unwrap_or_else(|| "-".into())
}

/// The whole drill.
pub struct Report {
    pub seed: u64,
    pub rounds: Vec<Round>,
    pub audit: Option<Audit>,
    /// The first broken invariant or failed step.
    pub problem: Option<String>,
    pub elapsed: Duration,
    /// The channel's added delay and jitter, each way (the relays).
    pub channel: (Duration, Duration),
    /// Where the sides ran.
    pub hosts: &'static str,
    /// The TCP stream to the guest.
    pub tcp: Tcp,
    _started: Instant,
}

/// min / median / p99 / max of `v` (seconds or ms as given), "-" if empty.
fn spread(mut v: Vec<f64>, unit: &str) -> String {
    if v.is_empty() {
        return "-".into();
    }
    v.sort_by(f64::total_cmp);
    let q = |p: f64| v[((v.len() - 1) as f64 * p).round() as usize];
    format!(
        "{:.2}/{:.2}/{:.2}/{:.2} {unit}",
        v[0],
        q(0.5),
        q(0.99),
        v[v.len() - 1]
    )
}

impl Report {
    pub fn new(seed: u64, started: Instant) -> Self {
        Report {
            seed,
            rounds: Vec::new(),
            audit: None,
            problem: None,
            elapsed: Duration::ZERO,
            channel: (Duration::ZERO, Duration::ZERO),
            hosts: "local",
            tcp: Tcp::NotChecked("not started".into()),
            _started: started,
        }
    }

    fn lost(&self) -> u64 {
        self.audit.as_ref().map_or(0, |a| a.lost)
    }

    fn repeated(&self) -> u64 {
        self.audit.as_ref().map_or(0, |a| a.repeated)
    }

    /// Rounds where two sides released output after the seam: a side that
    /// went on after losing the VM, or output of two executions in the
    /// transcript.
    fn double_live(&self) -> u64 {
        self.rounds.iter().map(|r| r.double_live).sum::<u64>()
            + self.audit.as_ref().map_or(0, |a| a.wrong)
    }

    pub fn passed(&self) -> bool {
        self.problem.is_none()
            && self.lost() == 0
            && self.repeated() == 0
            && self.double_live() == 0
            && !self.tcp.failed()
    }

    /// The round (index) a stall of the stream belongs to: the last whose
    /// fault came before the stall began (within [`STALL_LEAD`]); `None`
    /// before the first fault.
    fn round_of(&self, s: &Stall) -> Option<usize> {
        self.rounds
            .iter()
            .rposition(|r| r.at <= s.start + STALL_LEAD)
    }

    /// The stream's stall in each round: the longest time without an echo
    /// inside the round, which runs from its fault to the next round's
    /// (each less [`STALL_LEAD`]). A stall that spans rounds counts in
    /// each for its part there: a stop that comes while the stream still
    /// waits out an earlier round shows as a stall of its own. `None` for
    /// every round when no stream ran; zero for a round without a kept
    /// stall.
    pub fn round_stalls(&self) -> Vec<Option<Duration>> {
        let Tcp::Checked(f) = &self.tcp else {
            return vec![None; self.rounds.len()];
        };
        let starts: Vec<Duration> = self
            .rounds
            .iter()
            .map(|r| r.at.saturating_sub(STALL_LEAD))
            .collect();
        (0..starts.len())
            .map(|i| {
                let (from, to) = (starts[i], starts.get(i + 1).copied());
                let part = |s: &Stall| {
                    let end = s.start + s.length;
                    let end = to.map_or(end, |to| end.min(to));
                    end.saturating_sub(s.start.max(from))
                };
                Some(f.stalls.iter().map(part).max().unwrap_or_default())
            })
            .collect()
    }

    /// "round 3 (stop)", or "before the first round".
    fn round_name(&self, s: &Stall) -> String {
        match self.round_of(s) {
            Some(i) => format!(
                "round {} ({})",
                self.rounds[i].n,
                self.rounds[i].fault.name()
            ),
            None => "before the first round".into(),
        }
    }

    /// The stream's lines in the table.
    fn tcp_line(&self) -> String {
        match &self.tcp {
            Tcp::NotChecked(why) => format!("tcp stream: not checked ({why})"),
            Tcp::NoConnection(why) => format!("tcp stream: FAILED, no connection: {why}"),
            Tcp::Checked(f) => {
                let longest = match f.longest() {
                    Some(s) => format!(
                        "longest stall {:.2} s at {:.1} s, {}",
                        s.length.as_secs_f64(),
                        s.start.as_secs_f64(),
                        self.round_name(&s)
                    ),
                    None => format!(
                        "no stall of {} ms or more",
                        super::echo::STALL_KEPT.as_millis()
                    ),
                };
                let head = format!(
                    "tcp stream: one connection from host {} to the guest's echo server {} for {:.0} s",
                    f.from,
                    f.target,
                    f.duration.as_secs_f64()
                );
                let counts = format!(
                    "{} lines ({} bytes) sent, {} lines ({} bytes) echoed",
                    f.lines_sent, f.bytes_sent, f.lines_echoed, f.bytes_echoed
                );
                match &f.broken {
                    None => format!(
                        "{head}: {counts}, every byte once and in order; {longest} (limit {} s)",
                        f.limit.as_secs()
                    ),
                    Some(why) => format!(
                        "{head}: BROKEN: {why}\n  {counts} before; {longest} (limit {} s)",
                        f.limit.as_secs()
                    ),
                }
            }
        }
    }

    /// The per-fault table and the totals.
    pub fn table(&self) -> String {
        let mut by: BTreeMap<Fault, Vec<&Round>> = BTreeMap::new();
        for r in &self.rounds {
            by.entry(r.fault).or_default().push(r);
        }
        let mut rows = vec![[
            "fault".to_string(),
            "rounds".into(),
            "failovers".into(),
            "go live min/med/p99/max".into(),
            "re-protect pause min/med/p99/max".into(),
            "state moved, rounds".into(),
            "output delay p50/p99".into(),
            "tcp stall max".into(),
            "double-live".into(),
        ]];
        let stalls = self.round_stalls();
        for (f, rs) in &by {
            rows.push([
                f.name().into(),
                rs.len().to_string(),
                rs.iter()
                    .filter(|r| r.go_live.is_some())
                    .count()
                    .to_string(),
                spread(
                    rs.iter()
                        .filter_map(|r| r.go_live)
                        .map(|d| d.as_secs_f64())
                        .collect(),
                    "s",
                ),
                spread(rs.iter().filter_map(|r| r.pause).collect(), "ms"),
                {
                    let rounds: Vec<u32> = rs.iter().filter_map(|r| r.copy_rounds).collect();
                    let mb = rs.iter().map(|r| r.transfer_bytes).sum::<u64>() >> 20;
                    match (rounds.iter().min(), rounds.iter().max()) {
                        (Some(lo), Some(hi)) if lo == hi => format!("{mb} MB, {lo}"),
                        (Some(lo), Some(hi)) => format!("{mb} MB, {lo}-{hi}"),
                        _ => format!("{mb} MB, -"),
                    }
                },
                {
                    let d: Vec<(f64, f64)> = rs.iter().filter_map(|r| r.out_delay).collect();
                    if d.is_empty() {
                        "-".into()
                    } else {
                        let n = d.len() as f64;
                        format!(
                            "{:.1}/{:.1} ms",
                            d.iter().map(|x| x.0).sum::<f64>() / n,
                            d.iter().map(|x| x.1).sum::<f64>() / n
                        )
                    }
                },
                {
                    let max = self
                        .rounds
                        .iter()
                        .zip(&stalls)
                        .filter(|(r, _)| r.fault == *f)
                        .filter_map(|(_, s)| *s)
                        .max();
                    max.map(|d| format!("{:.2} s", d.as_secs_f64()))
                        .unwrap_or_else(|| "-".into())
                },
                rs.iter().map(|r| r.double_live).sum::<u64>().to_string(),
            ]);
        }
        let widths: Vec<usize> = (0..9)
            .map(|c| rows.iter().map(|r| r[c].len()).max().unwrap_or(0))
            .collect();
        let mut out = String::new();
        for r in &rows {
            let cells: Vec<String> = r
                .iter()
                .zip(&widths)
                .map(|(c, w)| format!("{c:<w$}"))
                .collect();
            let _ = writeln!(out, "{}", cells.join("  ").trim_end());
        }
        let a = self.audit.clone().unwrap_or_default();
        let _ = writeln!(
            out,
            "transcript: {} lines, last {}; lost {}, repeated {}, from two executions {}, foreign {}",
            a.lines, a.last, a.lost, a.repeated, a.wrong, a.foreign
        );
        let _ = writeln!(out, "{}", self.tcp_line());
        let _ = writeln!(
            out,
            "seed {} ({} rounds in {:.0} s); hosts {}; channel delay {} ms + up to {} ms jitter each way (round trip at least {} ms)",
            self.seed,
            self.rounds.len(),
            self.elapsed.as_secs_f64(),
            self.hosts,
            self.channel.0.as_millis(),
            self.channel.1.as_millis(),
            2 * self.channel.0.as_millis()
        );
        if let Some(p) = &self.problem {
            let _ = writeln!(out, "first problem: {p}");
        }
        out
    }

    /// The last line: `verdict: PASS rounds=N lost=0 repeated=0
    /// double-live=0` or `verdict: FAIL <first broken invariant>`.
    pub fn verdict(&self) -> String {
        if self.passed() {
            let all = match self.tcp {
                Tcp::NotChecked(_) => "all invariants held; the TCP stream was not checked",
                _ => "all invariants held",
            };
            format!(
                "verdict: PASS rounds={} lost=0 repeated=0 double-live=0 tcp={} ({all})",
                self.rounds.len(),
                self.tcp.word()
            )
        } else {
            let tcp_why = match &self.tcp {
                Tcp::NoConnection(why) => Some(format!("tcp stream: no connection: {why}")),
                Tcp::Checked(f) => f.broken.as_ref().map(|w| format!("tcp stream: {w}")),
                Tcp::NotChecked(_) => None,
            };
            let why = self.problem.clone().or(tcp_why).unwrap_or_else(|| {
                format!(
                    "lost={} repeated={} double-live={}",
                    self.lost(),
                    self.repeated(),
                    self.double_live()
                )
            });
            format!(
                "verdict: FAIL {why} (rounds={} lost={} repeated={} double-live={} tcp={})",
                self.rounds.len(),
                self.lost(),
                self.repeated(),
                self.double_live(),
                self.tcp.word()
            )
        }
    }

    /// One row per round, tab-separated.
    pub fn tsv(&self) -> String {
        let mut s = String::from(
            "round\tfault\tat_s\tgo_live_s\tsurvivor\treprotect_s\tpause_ms\tstate_bytes\tdouble_live\ttcp_stall_s\tcopy_rounds\n",
        );
        for (r, stall) in self.rounds.iter().zip(self.round_stalls()) {
            let _ = writeln!(
                s,
                "{}\t{}\t{:.3}\t{}\t{}\t{}\t{}\t{}\t{}\t{}\t{}",
                r.n,
                r.fault.name(),
                r.at.as_secs_f64(),
                r.go_live
                    .map(|d| format!("{:.3}", d.as_secs_f64()))
                    .unwrap_or_default(),
                r.survivor,
                r.reprotect
                    .map(|d| format!("{:.3}", d.as_secs_f64()))
                    .unwrap_or_default(),
                r.pause.map(|p| format!("{p:.1}")).unwrap_or_default(),
                r.transfer_bytes,
                r.double_live,
                stall
                    .map(|d| format!("{:.3}", d.as_secs_f64()))
                    .unwrap_or_default(),
                r.copy_rounds.map(|n| n.to_string()).unwrap_or_default()
            );
        }
        s
    }

    /// The picture: time left to right; per round, the fault (a red
    /// line), the time to go live (an orange bar) and the re-protection
    /// (a green bar); below, the backup's lag in exits.
    pub fn svg(&self) -> String {
        let end = self
            .rounds
            .iter()
            .map(|r| r.at + r.go_live.unwrap_or_default() + r.reprotect.unwrap_or_default())
            .max()
            .unwrap_or_default()
            .max(self.elapsed)
            .as_secs_f64()
            .max(1.0);
        let (w, h, left, top) = (960.0, 360.0, 60.0, 30.0);
        let plot_w = w - left - 20.0;
        let x = |t: f64| left + t / end * plot_w;
        let mut s = String::new();
        let _ = writeln!(
            s,
            r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="11">"#
        );
        let _ = writeln!(
            s,
            r#"<text x="{left}" y="16" font-size="13">vmft drill, seed {}: {}</text>"#,
            self.seed,
            xml(&self.verdict())
        );
        // Rounds.
        for (i, r) in self.rounds.iter().enumerate() {
            let y = top + 10.0 + (i % 8) as f64 * 16.0;
            let t = r.at.as_secs_f64();
            let live = r.go_live.unwrap_or_default().as_secs_f64();
            let rep = r.reprotect.unwrap_or_default().as_secs_f64();
            let _ = writeln!(
                s,
                r##"<line x1="{0:.1}" y1="{1}" x2="{0:.1}" y2="{2}" stroke="#c00"/>"##,
                x(t),
                top,
                h - 110.0
            );
            let _ = writeln!(
                s,
                r##"<rect x="{:.1}" y="{y}" width="{:.1}" height="10" fill="#e80"><title>round {} {}: live after {live:.3} s</title></rect>"##,
                x(t),
                (x(t + live) - x(t)).max(1.0),
                r.n,
                r.fault.name()
            );
            let _ = writeln!(
                s,
                r##"<rect x="{:.1}" y="{y}" width="{:.1}" height="10" fill="#3a3"><title>round {}: protected again after {rep:.3} s, pause {}</title></rect>"##,
                x(t + live),
                (x(t + live + rep) - x(t + live)).max(1.0),
                r.n,
                r.pause
                    .map(|p| format!("{p:.0} ms"))
                    .unwrap_or_else(|| "-".into())
            );
            let _ = writeln!(
                s,
                r#"<text x="{:.1}" y="{}">{} {}</text>"#,
                x(t) + 2.0,
                y - 1.0,
                r.n,
                r.fault.name()
            );
        }
        // The TCP stream's stalls, on a row of their own.
        if let Tcp::Checked(f) = &self.tcp {
            let sy = h - 106.0;
            let _ = writeln!(s, r#"<text x="4" y="{}">tcp</text>"#, sy + 8.0);
            for st in &f.stalls {
                let (a, l) = (st.start.as_secs_f64(), st.length.as_secs_f64());
                let _ = writeln!(
                    s,
                    r##"<rect x="{:.1}" y="{sy}" width="{:.1}" height="8" fill="#93c"><title>tcp stream stalled {l:.2} s, {}</title></rect>"##,
                    x(a),
                    (x(a + l) - x(a)).max(1.0),
                    xml(&self.round_name(st))
                );
            }
        }
        // Lag.
        let lag: Vec<(f64, u64)> = self.rounds.iter().flat_map(|r| r.lag.clone()).collect();
        let max_lag = lag.iter().map(|l| l.1).max().unwrap_or(1).max(1) as f64;
        let (ly, lh) = (h - 90.0, 60.0);
        let _ = writeln!(
            s,
            r##"<text x="4" y="{}">lag</text><text x="4" y="{}">{max_lag:.0}</text><line x1="{left}" y1="{}" x2="{}" y2="{}" stroke="#888"/>"##,
            ly + lh / 2.0,
            ly + 8.0,
            ly + lh,
            w - 20.0,
            ly + lh
        );
        if !lag.is_empty() {
            let pts: Vec<String> = lag
                .iter()
                .map(|(t, l)| format!("{:.1},{:.1}", x(*t), ly + lh - *l as f64 / max_lag * lh))
                .collect();
            let _ = writeln!(
                s,
                r##"<polyline fill="none" stroke="#36c" points="{}"/>"##,
                pts.join(" ")
            );
        }
        let _ = writeln!(
            s,
            r##"<text x="{left}" y="{}">0 s</text><text x="{}" y="{}" text-anchor="end">{end:.0} s</text>"##,
            h - 12.0,
            w - 20.0,
            h - 12.0
        );
        let _ = writeln!(
            s,
            r##"<text x="{}" y="{}">red: fault, orange: until live again, green: until protected again, purple: TCP stream stalled, blue: backup lag (exits)</text>"##,
            left + 60.0,
            h - 12.0
        );
        s.push_str("</svg>\n");
        s
    }
}

fn xml(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round(n: u32, fault: Fault, live_ms: u64) -> Round {
        Round {
            go_live: Some(Duration::from_millis(live_ms)),
            reprotect: Some(Duration::from_millis(900)),
            pause: Some(100.0),
            transfer_bytes: 20 << 20,
            copy_rounds: Some(2 + n % 2),
            lag: vec![(n as f64, 10 * n as u64)],
            ..Round::new(n, fault, Duration::from_secs(n as u64 * 5))
        }
    }

    fn report(rounds: Vec<Round>, audit: Audit) -> Report {
        Report {
            rounds,
            audit: Some(audit),
            ..Report::new(42, Instant::now())
        }
    }

    fn clean(lines: u64) -> Audit {
        Audit {
            lines,
            last: lines,
            ..Audit::default()
        }
    }

    #[test]
    fn a_clean_drill_passes_and_says_so_on_its_last_line() {
        let r = report(
            vec![round(1, Fault::Kill, 20), round(2, Fault::Backup, 30)],
            clean(50),
        );
        assert!(r.passed());
        // Without a stream (the default: hosts local), the verdict says so.
        assert_eq!(
            r.verdict(),
            "verdict: PASS rounds=2 lost=0 repeated=0 double-live=0 tcp=not-checked \
             (all invariants held; the TCP stream was not checked)"
        );
        assert!(
            r.table().contains("tcp stream: not checked (not started)"),
            "{}",
            r.table()
        );
        let t = r.table();
        assert!(t.contains("kill") && t.contains("backup"), "{t}");
        assert!(r.tsv().lines().count() == 3);
        let svg = r.svg();
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
        assert!(svg.contains("polyline"));
    }

    #[test]
    fn any_broken_invariant_fails_the_verdict() {
        let lost = report(
            vec![round(1, Fault::Kill, 20)],
            Audit {
                lost: 2,
                ..clean(9)
            },
        );
        assert!(!lost.passed());
        assert!(
            lost.verdict().starts_with("verdict: FAIL"),
            "{}",
            lost.verdict()
        );
        let seam = report(
            vec![round(1, Fault::Kill, 20)],
            Audit {
                wrong: 1,
                ..clean(9)
            },
        );
        assert!(
            seam.verdict().contains("double-live=1"),
            "{}",
            seam.verdict()
        );
        let mut twice = round(1, Fault::Stop, 20);
        twice.double_live = 1;
        assert!(!report(vec![twice], clean(9)).passed());
        let mut failed = report(vec![round(1, Fault::Kill, 20)], clean(9));
        failed.problem = Some("round 1 (kill): no side went live".into());
        assert!(failed.verdict().contains("no side went live"));
    }

    fn figures(stalls: &[(u64, u64)], broken: Option<&str>) -> StreamFigures {
        StreamFigures {
            target: "10.77.0.50:7000".parse().unwrap(),
            from: "console".into(),
            lines_sent: 300,
            bytes_sent: 300 * 48,
            lines_echoed: 300,
            bytes_echoed: 300 * 48,
            stalls: stalls
                .iter()
                .map(|&(start, length)| Stall {
                    start: Duration::from_millis(start),
                    length: Duration::from_millis(length),
                })
                .collect(),
            duration: Duration::from_secs(30),
            limit: Duration::from_secs(30),
            broken: broken.map(str::to_string),
        }
    }

    #[test]
    fn the_streams_stalls_go_to_their_rounds_and_a_broken_stream_fails() {
        // Faults at 5 s (kill) and 10 s (stop), see `round`.
        let rounds = vec![round(1, Fault::Kill, 20), round(2, Fault::Stop, 30)];
        let mut r = report(rounds.clone(), clean(50));
        // One stall before the first fault, one that began just before the
        // kill (its last echo), two in the stop round.
        r.tcp = Tcp::Checked(figures(
            &[(1_000, 300), (4_900, 1_500), (10_050, 3_200), (11_000, 400)],
            None,
        ));
        assert_eq!(
            r.round_stalls(),
            vec![
                Some(Duration::from_millis(1_500)),
                Some(Duration::from_millis(3_200))
            ]
        );
        assert!(r.passed());
        assert!(
            r.verdict().contains("tcp=ok (all invariants held)"),
            "{}",
            r.verdict()
        );
        let t = r.table();
        assert!(
            t.contains("300 lines (14400 bytes) sent, 300 lines (14400 bytes) echoed, every byte once and in order")
                && t.contains("longest stall 3.20 s at 10.1 s, round 2 (stop)"),
            "{t}"
        );
        assert!(t.contains("1.50 s") && t.contains("3.20 s"), "{t}");
        let tsv = r.tsv();
        assert!(
            tsv.lines()
                .next()
                .unwrap()
                .ends_with("\ttcp_stall_s\tcopy_rounds"),
            "{tsv}"
        );
        assert!(tsv.lines().nth(2).unwrap().ends_with("\t3.200\t2"), "{tsv}");
        assert!(r
            .svg()
            .contains("tcp stream stalled 3.20 s, round 2 (stop)"));

        // A stall that spans both rounds counts in each for its part
        // there: 4.4 s in the kill round, 3.6 s in the stop round.
        r.tcp = Tcp::Checked(figures(&[(5_100, 8_000), (11_000, 400)], None));
        assert_eq!(
            r.round_stalls(),
            vec![
                Some(Duration::from_millis(4_400)),
                Some(Duration::from_millis(3_600))
            ]
        );
        assert!(r
            .table()
            .contains("longest stall 8.00 s at 5.1 s, round 1 (kill)"));

        // A round without a kept stall shows zero, not a dash.
        r.tcp = Tcp::Checked(figures(&[], None));
        assert_eq!(r.round_stalls(), vec![Some(Duration::ZERO); 2]);
        assert!(r.table().contains("no stall of 200 ms or more"));

        // Broken: the verdict fails and names why, with the counts.
        r.tcp = Tcp::Checked(figures(&[(4_900, 1_500)], Some("the connection was reset")));
        assert!(!r.passed());
        let v = r.verdict();
        assert!(
            v.starts_with("verdict: FAIL tcp stream: the connection was reset")
                && v.ends_with("tcp=broken)"),
            "{v}"
        );
        assert!(r.table().contains("BROKEN: the connection was reset"));
        // No connection at all fails too.
        r.tcp = Tcp::NoConnection("connection refused".into());
        assert!(!r.passed() && r.verdict().contains("no connection: connection refused"));
        // Not checked never passes for checked: the word says so.
        let mut n = report(rounds, clean(50));
        n.tcp = Tcp::NotChecked("needs --hosts netns".into());
        assert!(n.passed() && n.verdict().contains("tcp=not-checked"));
        let tsv = n.tsv();
        let row: Vec<&str> = tsv.lines().nth(1).unwrap().split('\t').collect();
        assert_eq!(row[9], "", "no stall figure without a stream: {tsv}");
    }
}
