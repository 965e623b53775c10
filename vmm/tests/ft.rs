//! `vmft ft`, the README's first command: the default guest run fault
//! tolerant on this machine (built-in arbiter, backup and primary as child
//! processes, console in the foreground) prints the workload's transcript
//! once and ends with the guest's status.

mod common;

use common::*;

#[test]
fn vmft_ft_runs_the_default_guest_to_its_end_with_every_line_once() {
    if !require_kvm() {
        return;
    }
    let (kernel, initrd) = image();
    let mut cmd = vmft();
    cmd.args(["ft", "--no-stdin", "--kernel"])
        .arg(kernel)
        .arg("--initrd")
        .arg(initrd);
    let out = output_within(cmd, 900);
    let (stdout, stderr) = texts(&out);
    assert!(out.status.success(), "vmft ft failed:\n{stderr}");
    let lines: Vec<String> = stdout
        .lines()
        .map(|l| l.trim_end_matches('\r').to_string())
        .filter(|l| l.starts_with("counter "))
        .collect();
    let expected = expected_counter(20);
    assert_eq!(lines, expected, "stdout:\n{stdout}\nstderr:\n{stderr}");
    assert!(stdout.contains("VMFT-DONE status=0"), "{stdout}");
    assert!(
        stderr.contains("[primary] vmft: connected to the backup"),
        "{stderr}"
    );
    assert!(
        stderr.contains("[backup] vmft: the primary connected"),
        "{stderr}"
    );
    // Both sides ended in the same state.
    let digests: Vec<&str> = stderr
        .lines()
        .filter_map(|l| l.split("final state digest ").nth(1))
        .collect();
    assert_eq!(digests.len(), 2, "{stderr}");
    assert_eq!(digests[0], digests[1], "{stderr}");
}
