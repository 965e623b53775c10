//! Bad input to `vmft run` gives a clear one-line error and a non-zero
//! exit: a missing kernel, a file that is not a kernel, too little memory,
//! and a guest that triple-faults.

mod common;

use common::*;

fn one_line_error(args: &[&str]) -> String {
    let out = vmft().args(args).output().unwrap();
    let (_, stderr) = texts(&out);
    assert!(!out.status.success(), "expected failure for {args:?}");
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(
        lines.len(),
        1,
        "expected one line for {args:?}, got:\n{stderr}"
    );
    assert!(lines[0].starts_with("vmft: error: "), "{}", lines[0]);
    lines[0].to_string()
}

#[test]
fn missing_kernel() {
    let line = one_line_error(&["run", "--kernel", "/nonexistent/vmlinux"]);
    assert!(line.contains("/nonexistent/vmlinux"), "{line}");
    assert!(line.contains("No such file"), "{line}");
}

#[test]
fn non_elf_kernel() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("readme.txt");
    std::fs::write(&p, "just text, not a kernel\n".repeat(100)).unwrap();
    let line = one_line_error(&["run", "--kernel", p.to_str().unwrap()]);
    assert!(line.contains("not a Linux kernel"), "{line}");
    assert!(line.contains("readme.txt"), "{line}");
}

#[test]
fn memory_too_small_for_the_kernel() {
    let (kernel, initrd) = image();
    let line = one_line_error(&[
        "run",
        "--kernel",
        kernel.to_str().unwrap(),
        "--initrd",
        initrd.to_str().unwrap(),
        "--mem",
        "32",
    ]);
    assert!(line.contains("memory size 32 MiB is too small"), "{line}");
    assert!(line.contains("use --mem"), "{line}");
    let line = one_line_error(&["run", "--kernel", kernel.to_str().unwrap(), "--mem", "8"]);
    assert!(line.contains("too small"), "{line}");
}

/// A minimal ELF64 "kernel" whose entry executes `ud2` with no IDT: #UD
/// cannot be delivered, nor the #DF after it, so the CPU shuts down.
fn triple_fault_elf() -> Vec<u8> {
    let code: &[u8] = &[0x0f, 0x0b]; // ud2
    let load: u64 = 0x100_0000;
    let mut f = vec![0u8; 64 + 56];
    f[0..4].copy_from_slice(b"\x7fELF");
    f[4] = 2; // 64-bit
    f[5] = 1; // little endian
    f[6] = 1; // version
    f[16..18].copy_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    f[18..20].copy_from_slice(&62u16.to_le_bytes()); // EM_X86_64
    f[20..24].copy_from_slice(&1u32.to_le_bytes());
    f[24..32].copy_from_slice(&load.to_le_bytes()); // entry
    f[32..40].copy_from_slice(&64u64.to_le_bytes()); // phoff
    f[52..54].copy_from_slice(&64u16.to_le_bytes()); // ehsize
    f[54..56].copy_from_slice(&56u16.to_le_bytes()); // phentsize
    f[56..58].copy_from_slice(&1u16.to_le_bytes()); // phnum
    let ph = &mut f[64..120];
    ph[0..4].copy_from_slice(&1u32.to_le_bytes()); // PT_LOAD
    ph[4..8].copy_from_slice(&5u32.to_le_bytes()); // R+X
    ph[8..16].copy_from_slice(&120u64.to_le_bytes()); // offset
    ph[16..24].copy_from_slice(&load.to_le_bytes()); // vaddr
    ph[24..32].copy_from_slice(&load.to_le_bytes()); // paddr
    ph[32..40].copy_from_slice(&(code.len() as u64).to_le_bytes());
    ph[40..48].copy_from_slice(&(code.len() as u64).to_le_bytes());
    ph[48..56].copy_from_slice(&0x1000u64.to_le_bytes());
    f.extend_from_slice(code);
    f
}

#[test]
fn triple_fault_is_a_clear_error() {
    if !require_kvm() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("ud2.elf");
    std::fs::write(&p, triple_fault_elf()).unwrap();
    let line = one_line_error(&["run", "--kernel", p.to_str().unwrap(), "--no-stdin"]);
    assert!(line.contains("triple fault"), "{line}");
    assert!(line.contains("RIP 0x1000000"), "{line}");
}

/// Each cause appears once in the line (an error that prints its source
/// must not have it appended again).
fn assert_once(line: &str, needle: &str) {
    assert_eq!(
        line.matches(needle).count(),
        1,
        "{needle:?} not exactly once in: {line}"
    );
}

#[test]
fn a_directory_as_kernel_names_the_cause_once() {
    let line = one_line_error(&["run", "--kernel", "/tmp"]);
    assert!(line.contains("kernel /tmp"), "{line}");
    assert_once(&line, "Is a directory");
}

#[test]
fn an_empty_log_names_the_cause_once() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("empty.log");
    std::fs::write(&p, b"").unwrap();
    let line = one_line_error(&["replay", "--log", p.to_str().unwrap()]);
    assert!(line.contains("empty.log"), "{line}");
    assert_once(&line, "the log is empty");
}

#[test]
fn a_log_from_another_vmft_version_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("old.log");
    let header = ft_log::LogHeader {
        kernel: "/nonexistent/vmlinux".into(),
        initrd: None,
        mem_mib: 64,
        cmdline: String::new(),
        config_hash: "0".repeat(64),
        recorder: "vmft 0.0.1".into(),
        snapshot: None,
    };
    let w = ft_log::LogWriter::new(std::fs::File::create(&p).unwrap(), &header).unwrap();
    drop(w);
    let line = one_line_error(&["replay", "--log", p.to_str().unwrap()]);
    assert!(line.contains("vmft 0.0.1"), "{line}");
    assert!(
        line.contains(&format!("vmft {}", env!("CARGO_PKG_VERSION"))),
        "{line}"
    );
}

#[test]
fn an_unknown_workload_is_refused_before_booting() {
    let out = vmft().args(["run", "--workload", "nope"]).output().unwrap();
    let (stdout, stderr) = texts(&out);
    assert!(!out.status.success());
    assert!(stdout.is_empty(), "the guest booted:\n{stdout}");
    assert!(stderr.contains("unknown workload \"nope\""), "{stderr}");
    assert!(stderr.contains("compute"), "{stderr}");
    let help = vmft().args(["run", "--help"]).output().unwrap();
    let help = String::from_utf8_lossy(&help.stdout);
    assert!(help.contains("compute"), "{help}");
}

#[test]
fn kvm_tests_fail_unless_skipped_by_name() {
    assert_eq!(kvm_gate(true, None), Ok(true));
    assert_eq!(kvm_gate(true, Some("1")), Ok(true));
    assert_eq!(kvm_gate(false, Some("1")), Ok(false));
    assert!(kvm_gate(false, None).is_err());
    assert!(kvm_gate(false, Some("0")).is_err());
    assert!(kvm_gate(false, Some("")).is_err());
}

#[test]
fn a_guest_spinning_silently_on_a_device_is_named_on_stderr() {
    if !require_kvm() {
        return;
    }
    use std::io::{BufRead, BufReader};
    // Test guest 10 prints READY and then reads PIT counter 0 forever: a
    // hang like Linux's KASLR loop on an unprogrammed 8254.
    let mut child = vmft()
        .args(["run", "--mem", "64", "--no-stdin", "--kernel"])
        .arg(test_guest(10))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let err = BufReader::new(child.stderr.take().unwrap());
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in err.lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    let mut seen = Vec::new();
    let warning = loop {
        match rx.recv_timeout(std::time::Duration::from_millis(200)) {
            Ok(l) if l.contains("warning: no console output") => break Some(l),
            Ok(l) => seen.push(l),
            Err(_) if std::time::Instant::now() > deadline => break None,
            Err(_) => {}
        }
    };
    let _ = child.kill();
    let _ = child.wait();
    let w = warning.unwrap_or_else(|| panic!("no watchdog warning; stderr:\n{}", seen.join("\n")));
    assert!(w.contains("port 0x40"), "{w}");
    assert!(w.contains("PIT"), "{w}");
}
