//! The default guest: where its image comes from and the command line that
//! keeps the guest away from what the monitor cannot intercept or log.
//! The reasons for every option are in `guest-images/README.md`.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use thiserror::Error;

/// Default memory size in MiB.
pub const DEFAULT_MEM_MIB: u64 = 128;
/// Default workload run by the guest's init.
pub const DEFAULT_WORKLOAD: &str = "counter";
/// The workloads of the default initramfs (`guest-images/initramfs/workloads/`;
/// a unit test keeps the two in step).
pub const WORKLOADS: &[&str] = &[
    "compute",
    "concurrent",
    "counter",
    "disk",
    "drill",
    "echo",
    "net-all",
    "net-echo",
    "net-sink",
    "net-source",
    "shell",
    "sleep",
    "ticker",
];

/// Refuse a workload the default initramfs does not have, before anything
/// boots (a guest takes tens of seconds to find out by itself).
pub fn check_workload(name: &str) -> Result<(), ImageError> {
    if WORKLOADS.contains(&name) {
        Ok(())
    } else {
        Err(ImageError::UnknownWorkload {
            name: name.to_string(),
            known: WORKLOADS.join(", "),
        })
    }
}

/// CPU features the guest kernel must not use: instructions the monitor
/// cannot intercept (tsc, rdrand, rdseed) and ones the KVM emulator here
/// rejects or that the kernel would patch into emulated code paths.
/// Linux 6.1 reads at most 127 characters of `clearcpuid=`: the list is
/// ordered by importance and kept under that limit (a unit test checks).
pub const CLEARED_CPU_FEATURES: &str =
    "tsc,rdrand,rdseed,xsave,avx,avx2,avx512f,smap,smep,umip,pku,\
fsgsbase,rdpid,popcnt,cx16,movbe,bmi1,bmi2,erms,fsrm,abm";

/// glibc features (names of `glibc.cpu.hwcaps`) that guest user programs
/// must not use: every vector extension beyond SSE.
///
/// Guest user code runs natively here with the host's XCR0 loaded, so
/// CPUID and XGETBV show it AVX and AVX-512 whatever the monitor or the
/// guest kernel says (measured: XGETBV in a guest process gives 0xe7, also
/// after the monitor set CR4.OSXSAVE and XCR0 = x87|SSE in the vCPU), and
/// glibc picks AVX2/EVEX versions of `memcpy`,
/// `strlen`, `strcmp` and the like. The guest kernel, which must not use
/// XSAVE (`clearcpuid=xsave`), saves only the FXSAVE state at a context
/// switch: x87 and the low 128 bits of XMM0-15. The upper halves of the
/// YMM/ZMM registers, ZMM16-31 and the opmask registers are shared by all
/// guest processes, so one process preempted in a vector loop resumes with
/// another's values (busybox crashed reading a thread pointer its
/// start-up `memcpy` had copied as zeros). The kernel passes
/// `GLIBC_TUNABLES=...` on the command line to init as an environment
/// variable, which every process inherits; glibc then uses its SSE
/// versions. The names are glibc's (2.36 and later); unknown ones are
/// ignored. Programs that issue AVX instructions themselves are not
/// covered.
pub const GLIBC_HWCAPS_OFF: &[&str] = &[
    "AVX",
    "AVX2",
    "AVX512F",
    "AVX512VL",
    "AVX512BW",
    "AVX512DQ",
    "AVX512CD",
    "AVX512ER",
    "AVX512PF",
    "FMA",
    "FMA4",
    "AVX_Fast_Unaligned_Load",
];

/// The `GLIBC_TUNABLES=` entry of the command line (see [`GLIBC_HWCAPS_OFF`]).
pub fn glibc_tunables() -> String {
    let off: Vec<String> = GLIBC_HWCAPS_OFF.iter().map(|f| format!("-{f}")).collect();
    format!("GLIBC_TUNABLES=glibc.cpu.hwcaps={}", off.join(","))
}

/// The base kernel command line of every vmft guest.
pub fn base_cmdline() -> String {
    [
        "console=ttyS0",
        "8250.nr_uarts=1",
        "reboot=k",
        "nolapic",
        "noapic",
        "nox2apic",
        "nopv",
        "no-kvmclock",
        "nosmap",
        "nosmep",
        &format!("clearcpuid={CLEARED_CPU_FEATURES}"),
        "tsc=unstable",
        "clocksource=jiffies",
        "lpj=1000000",
        "mitigations=off",
        "no_timer_check",
        &glibc_tunables(),
    ]
    .join(" ")
}

/// Errors preparing the default guest image.
#[derive(Debug, Error)]
pub enum ImageError {
    /// The build script is missing.
    #[error(
        "guest image build script {0} not found (set VMFT_GUEST_IMAGES to the guest-images folder)"
    )]
    ScriptMissing(PathBuf),
    /// The build script could not be started.
    #[error("running {path}: {source}")]
    Spawn {
        /// Script path.
        path: PathBuf,
        /// Underlying error.
        source: std::io::Error,
    },
    /// The build failed.
    #[error("guest image build failed ({path} exited with {status}); its messages are above")]
    Failed {
        /// Script path.
        path: PathBuf,
        /// Exit status.
        status: std::process::ExitStatus,
    },
    /// The default initramfs has no such workload.
    #[error("unknown workload {name:?}: the default guest has {known}")]
    UnknownWorkload {
        /// What was asked for.
        name: String,
        /// What exists.
        known: String,
    },
    /// The script did not print both paths.
    #[error("guest image build printed no {0}= line")]
    Output(&'static str),
}

/// Paths of the default guest image.
#[derive(Debug, Clone)]
pub struct GuestImage {
    /// Uncompressed vmlinux.
    pub kernel: PathBuf,
    /// Initramfs (cpio).
    pub initrd: PathBuf,
}

/// The `guest-images` folder: `$VMFT_GUEST_IMAGES`, or the one in the source tree.
pub fn guest_images_dir() -> PathBuf {
    std::env::var_os("VMFT_GUEST_IMAGES")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../guest-images"))
}

/// Build (first use) or look up (cached) the default guest image. The
/// script's progress goes to our stderr.
pub fn default_image() -> Result<GuestImage, ImageError> {
    let script = guest_images_dir().join("build.sh");
    if !script.exists() {
        return Err(ImageError::ScriptMissing(script));
    }
    let out = Command::new("bash")
        .arg(&script)
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .output()
        .map_err(|source| ImageError::Spawn {
            path: script.clone(),
            source,
        })?;
    if !out.status.success() {
        return Err(ImageError::Failed {
            path: script,
            status: out.status,
        });
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let find = |key: &'static str| {
        text.lines()
            .find_map(|l| l.strip_prefix(&format!("{key}=")).map(PathBuf::from))
            .ok_or(ImageError::Output(key))
    };
    Ok(GuestImage {
        kernel: find("kernel")?,
        initrd: find("initrd")?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cmdline_keeps_guest_off_unloggable_features() {
        let c = base_cmdline();
        for needle in [
            "nolapic",
            "noapic",
            "nox2apic",
            "nopv",
            "no-kvmclock",
            "clocksource=jiffies",
            "lpj=",
            "reboot=k",
        ] {
            assert!(c.contains(needle), "{needle} missing from {c}");
        }
        let cleared: Vec<&str> = CLEARED_CPU_FEATURES.split(',').collect();
        for f in ["tsc", "rdrand", "rdseed", "cx16", "smap", "popcnt", "xsave"] {
            assert!(cleared.contains(&f), "{f} not cleared");
        }
        // Guest user space keeps off vector state its kernel does not save.
        let tunables = c
            .split(' ')
            .find_map(|a| a.strip_prefix("GLIBC_TUNABLES=glibc.cpu.hwcaps="))
            .expect("GLIBC_TUNABLES on the command line");
        let off: Vec<&str> = tunables.split(',').collect();
        for f in [
            "-AVX",
            "-AVX2",
            "-AVX512F",
            "-AVX512VL",
            "-AVX_Fast_Unaligned_Load",
        ] {
            assert!(off.contains(&f), "{f} missing from {tunables}");
        }
        assert!(c.len() < crate::boot::CMDLINE_MAX);
        // The kernel parses clearcpuid= into a 128-byte buffer.
        assert!(
            CLEARED_CPU_FEATURES.len() < 128,
            "{}",
            CLEARED_CPU_FEATURES.len()
        );
    }

    #[test]
    fn workload_list_matches_the_initramfs() {
        let dir = guest_images_dir().join("initramfs/workloads");
        let mut found: Vec<String> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap())
            .filter(|e| e.file_type().unwrap().is_file()) // not lib/: sourced helpers
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        found.sort();
        assert_eq!(found, WORKLOADS, "update image::WORKLOADS");
        assert!(check_workload("compute").is_ok());
        let e = check_workload("nope").unwrap_err().to_string();
        assert!(e.contains("nope") && e.contains("compute"), "{e}");
    }
}
