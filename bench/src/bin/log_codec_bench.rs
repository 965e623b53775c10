//! Payload encoding of log entries: postcard (maintained) against bincode
//! 2.0.1 (last working release, unmaintained), on the entries of a real log.
//!
//! `cargo run --release -p bench --bin log_codec_bench -- LOG`

use std::time::Instant;

use ft_log::Entry;

fn main() {
    let path = std::env::args().nth(1).expect("usage: log_codec_bench LOG");
    let bytes = std::fs::read(&path).expect("read log");
    let (_, frames) = ft_log::decode_all(&bytes).expect("decode log");
    let entries: Vec<Entry> = frames.into_iter().map(|f| f.entry).collect();
    let small: Vec<&Entry> = entries
        .iter()
        .filter(|e| !matches!(e, Entry::Epoch(_)))
        .collect();
    let epochs: Vec<&Entry> = entries
        .iter()
        .filter(|e| matches!(e, Entry::Epoch(_)))
        .collect();
    let cfg = bincode::config::standard();
    println!("| entries | codec | bytes | encode MB/s | decode MB/s | encode ns/entry | decode ns/entry |");
    println!("| --- | --- | --- | --- | --- | --- | --- |");
    for (label, set) in [("all but epochs", &small), ("epochs", &epochs)] {
        if set.is_empty() {
            continue;
        }
        let reps = if label == "epochs" { 3 } else { 50 };
        // postcard
        let t = Instant::now();
        let mut enc = Vec::new();
        for _ in 0..reps {
            enc = set
                .iter()
                .map(|e| postcard::to_stdvec(e).unwrap())
                .collect::<Vec<_>>();
        }
        let pe = t.elapsed().as_secs_f64() / reps as f64;
        let size: usize = enc.iter().map(Vec::len).sum();
        let t = Instant::now();
        for _ in 0..reps {
            for b in &enc {
                let _: Entry = postcard::from_bytes(b).unwrap();
            }
        }
        let pd = t.elapsed().as_secs_f64() / reps as f64;
        let n = set.len() as f64;
        println!(
            "| {label} ({}) | postcard 1 | {size} | {:.0} | {:.0} | {:.0} | {:.0} |",
            set.len(),
            size as f64 / pe / 1e6,
            size as f64 / pd / 1e6,
            pe / n * 1e9,
            pd / n * 1e9
        );
        // bincode
        let t = Instant::now();
        let mut enc = Vec::new();
        for _ in 0..reps {
            enc = set
                .iter()
                .map(|e| bincode::serde::encode_to_vec(e, cfg).unwrap())
                .collect::<Vec<_>>();
        }
        let be = t.elapsed().as_secs_f64() / reps as f64;
        let bsize: usize = enc.iter().map(Vec::len).sum();
        let t = Instant::now();
        for _ in 0..reps {
            for b in &enc {
                let _: (Entry, usize) = bincode::serde::decode_from_slice(b, cfg).unwrap();
            }
        }
        let bd = t.elapsed().as_secs_f64() / reps as f64;
        println!(
            "| {label} ({}) | bincode 2.0.1 | {bsize} | {:.0} | {:.0} | {:.0} | {:.0} |",
            set.len(),
            bsize as f64 / be / 1e6,
            bsize as f64 / bd / 1e6,
            be / n * 1e9,
            bd / n * 1e9
        );
    }
}
