//! Direct 64-bit Linux boot: guest memory, kernel (uncompressed `vmlinux`
//! ELF or bzImage) and initramfs loading with linux-loader, the zero page
//! (boot_params) with its E820 map and command line, and the GDT and
//! identity page tables the 64-bit entry point expects.
//!
//! Guest physical layout:
//!
//! | address | what |
//! | --- | --- |
//! | 0x500 | GDT (null, null, code 0x10, data 0x18, TSS 0x20) |
//! | 0x520 | IDT (empty; the kernel installs its own) |
//! | 0x7000 | zero page (`boot_params`) |
//! | 0x8ff0 | initial stack pointer |
//! | 0x9000 | PML4; 0xa000 PDPT; 0xb000-0xefff four PDs (identity map of 4 GiB, 2 MiB pages) |
//! | 0x20000 | kernel command line |
//! | 1 MiB.. | kernel (a `vmlinux` is linked at 16 MiB) |
//! | top of RAM | initramfs |

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use kvm_bindings::{kvm_fpu, kvm_regs, kvm_segment, kvm_sregs};
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params};
use linux_loader::loader::{self, BzImage, Elf, KernelLoader};
use thiserror::Error;
use vm_memory::{Bytes, GuestAddress};

use crate::memory::GuestMemoryMmap;

/// Where the GDT lives.
pub const GDT_ADDR: u64 = 0x500;
/// Where the (empty) IDT lives.
pub const IDT_ADDR: u64 = 0x520;
/// The zero page.
pub const ZERO_PAGE_ADDR: u64 = 0x7000;
/// Initial stack pointer.
pub const BOOT_STACK: u64 = 0x8ff0;
/// Top-level page table.
pub const PML4_ADDR: u64 = 0x9000;
const PDPT_ADDR: u64 = 0xa000;
const PD_ADDR: u64 = 0xb000;
/// Kernel command line.
pub const CMDLINE_ADDR: u64 = 0x20000;
/// Longest command line the x86 kernel accepts (COMMAND_LINE_SIZE).
pub const CMDLINE_MAX: usize = 2048;
/// Start of the extended-memory region (and of any bzImage).
pub const HIMEM_START: u64 = 0x100000;
/// End of conventional memory (start of the EBDA).
const EBDA_START: u64 = 0x9fc00;
/// Highest memory size supported (stays below the 32-bit MMIO hole).
pub const MAX_MEM_MIB: u64 = 3072;
/// Smallest memory size accepted at all.
pub const MIN_MEM_MIB: u64 = 32;
/// Room the kernel needs beyond its image and the initramfs.
const KERNEL_HEADROOM: u64 = 16 << 20;

const E820_RAM: u32 = 1;
const E820_RESERVED: u32 = 2;

/// Boot code segment selector expected by the 64-bit boot protocol.
pub const BOOT_CS: u16 = 0x10;
/// Boot data segment selector.
pub const BOOT_DS: u16 = 0x18;
const BOOT_TSS: u16 = 0x20;

/// Errors while preparing the guest for boot.
#[derive(Debug, Error)]
pub enum BootError {
    /// The kernel image could not be opened or read.
    #[error("kernel {path}: {source}")]
    KernelIo {
        /// Path given.
        path: PathBuf,
        /// Underlying error.
        source: std::io::Error,
    },
    /// The kernel image is neither an ELF vmlinux nor a bzImage.
    #[error("kernel {0}: not a Linux kernel (neither an x86-64 ELF vmlinux nor a bzImage)")]
    KernelFormat(PathBuf),
    /// linux-loader refused the kernel.
    #[error("kernel {path}: cannot load: {source}")]
    KernelLoad {
        /// Path given.
        path: PathBuf,
        /// Loader error.
        source: loader::Error,
    },
    /// The initramfs could not be read.
    #[error("initramfs {path}: {source}")]
    InitrdIo {
        /// Path given.
        path: PathBuf,
        /// Underlying error.
        source: std::io::Error,
    },
    /// Memory size out of range or too small for the images.
    #[error("memory size {mem_mib} MiB is too small: {what}; use --mem {need_mib} or more")]
    MemoryTooSmall {
        /// Memory requested.
        mem_mib: u64,
        /// What does not fit.
        what: String,
        /// Smallest size that would fit.
        need_mib: u64,
    },
    /// Memory size above what the layout supports.
    #[error("memory size {0} MiB is too large: at most {MAX_MEM_MIB} MiB is supported")]
    MemoryTooLarge(u64),
    /// The command line is too long or malformed.
    #[error("kernel command line: {0}")]
    Cmdline(String),
    /// Writing guest memory failed.
    #[error("writing {what} into guest memory: {source}")]
    GuestMemory {
        /// What was being written.
        what: &'static str,
        /// Underlying error.
        source: vm_memory::GuestMemoryError,
    },
}

/// The kernel image formats `vmft` boots.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KernelFormat {
    /// Uncompressed ELF `vmlinux` (default: no decompressor under emulation).
    Elf,
    /// Compressed bzImage.
    BzImage,
}

/// What is needed to boot.
#[derive(Debug, Clone)]
pub struct BootConfig {
    /// Kernel image path.
    pub kernel: PathBuf,
    /// Initramfs path.
    pub initrd: Option<PathBuf>,
    /// Memory size in MiB.
    pub mem_mib: u64,
    /// Kernel command line (without the arguments announcing the MMIO
    /// devices, which [`BootConfig::kernel_cmdline`] adds).
    pub cmdline: String,
    /// Disks, in order (device 0 is `/dev/vda`).
    pub disks: Vec<DiskSpec>,
    /// Network cards, after the disks on the MMIO bus (the first is eth0).
    pub nets: Vec<NetSpec>,
}

impl BootConfig {
    /// The command line the kernel gets: `cmdline` and, for each disk,
    /// the argument that announces its virtio-mmio window.
    pub fn kernel_cmdline(&self) -> String {
        let mut c = self.cmdline.clone();
        for i in 0..self.disks.len() + self.nets.len() {
            if let Some(arg) = crate::devices::mmio::cmdline_arg(i) {
                c.push(' ');
                c.push_str(&arg);
            }
        }
        c
    }
}

/// A network card: the guest's MAC and the host tap device it is
/// connected to (each side of a pair has its own tap, same MAC).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetSpec {
    /// The host tap device's name.
    pub tap: String,
    /// The guest's MAC address.
    pub mac: [u8; 6],
}

impl std::str::FromStr for NetSpec {
    type Err = String;

    /// `tap=NAME` or `tap=NAME,mac=MAC`.
    fn from_str(s: &str) -> Result<Self, String> {
        let mut tap = None;
        let mut mac = crate::devices::virtio::net::DEFAULT_MAC;
        for part in s.split(',') {
            match part.split_once('=') {
                Some(("tap", name)) if !name.is_empty() => tap = Some(name.to_string()),
                Some(("mac", m)) => {
                    mac = crate::devices::virtio::net::parse_mac(m).map_err(|e| e.to_string())?
                }
                _ => {
                    return Err(format!(
                        "cannot read {part:?} in {s:?} (tap=NAME or tap=NAME,mac=MAC)"
                    ))
                }
            }
        }
        let tap = tap.ok_or_else(|| format!("no tap=NAME in {s:?}"))?;
        Ok(NetSpec { tap, mac })
    }
}

/// A disk: a raw image file, read-write unless `read_only`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskSpec {
    /// The image.
    pub path: PathBuf,
    /// The guest may not write it.
    pub read_only: bool,
    /// Both sides of a pair reach this one image (see
    /// [`crate::shared_disk`]); otherwise each side has its own copy.
    pub shared: bool,
}

impl std::str::FromStr for DiskSpec {
    type Err = String;

    /// `PATH`, `PATH,ro`, `PATH,rw` or `PATH,shared`.
    fn from_str(s: &str) -> Result<Self, String> {
        let (path, opts) = match s.rsplit_once(',') {
            Some((p, o)) if ["ro", "rw", "shared"].contains(&o) => (p, Some(o)),
            // An existing file whose name has a comma is that file.
            Some(_) if Path::new(s).is_file() => (s, None),
            Some((_, o)) if !o.contains('/') => {
                return Err(format!(
                    "unknown disk option {o:?} in {s:?} (PATH, PATH,ro, PATH,rw or PATH,shared; \
                     no file {s:?} exists either)"
                ))
            }
            _ => (s, None),
        };
        if path.is_empty() {
            return Err(format!("no image path in {s:?}"));
        }
        Ok(DiskSpec {
            path: PathBuf::from(path),
            read_only: opts == Some("ro"),
            shared: opts == Some("shared"),
        })
    }
}

/// Result of loading: where to start the vCPU.
#[derive(Debug, Clone, Copy)]
pub struct BootInfo {
    /// 64-bit entry point.
    pub entry: u64,
    /// Format of the kernel.
    pub format: KernelFormat,
}

/// Identify a kernel image by its magic bytes.
pub fn detect_format(path: &Path) -> Result<KernelFormat, BootError> {
    let io = |source| BootError::KernelIo {
        path: path.to_path_buf(),
        source,
    };
    let mut f = File::open(path).map_err(io)?;
    let mut head = [0u8; 0x206];
    let n = f.read(&mut head).map_err(io)?;
    if n >= 5 && &head[..4] == b"\x7fELF" {
        // ELFCLASS64 and EM_X86_64.
        if head[4] == 2 && n >= 20 && u16::from_le_bytes([head[18], head[19]]) == 62 {
            return Ok(KernelFormat::Elf);
        }
        return Err(BootError::KernelFormat(path.to_path_buf()));
    }
    if n >= 0x206 && &head[0x202..0x206] == b"HdrS" {
        return Ok(KernelFormat::BzImage);
    }
    Err(BootError::KernelFormat(path.to_path_buf()))
}

/// Allocate guest memory of `mem_mib` MiB.
pub fn create_memory(mem_mib: u64) -> Result<GuestMemoryMmap, BootError> {
    if mem_mib > MAX_MEM_MIB {
        return Err(BootError::MemoryTooLarge(mem_mib));
    }
    if mem_mib < MIN_MEM_MIB {
        return Err(BootError::MemoryTooSmall {
            mem_mib,
            what: format!("the smallest supported guest has {MIN_MEM_MIB} MiB"),
            need_mib: MIN_MEM_MIB,
        });
    }
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), (mem_mib << 20) as usize)]).map_err(|e| {
        BootError::Cmdline(format!(
            "cannot allocate {mem_mib} MiB of guest memory: {e}"
        ))
    })
}

fn mib_up(bytes: u64) -> u64 {
    bytes.div_ceil(1 << 20)
}

/// Load kernel, initramfs, command line and zero page; build GDT and page tables.
pub fn load(mem: &GuestMemoryMmap, cfg: &BootConfig) -> Result<BootInfo, BootError> {
    let mem_size = cfg.mem_mib << 20;
    let format = detect_format(&cfg.kernel)?;
    let io = |source| BootError::KernelIo {
        path: cfg.kernel.clone(),
        source,
    };
    let mut kernel = File::open(&cfg.kernel).map_err(io)?;

    // Check the image fits before linux-loader reports it as a bare
    // address error.
    let kernel_len = kernel.seek(SeekFrom::End(0)).map_err(io)?;
    kernel.rewind().map_err(io)?;
    let initrd_len = match &cfg.initrd {
        Some(p) => std::fs::metadata(p)
            .map_err(|source| BootError::InitrdIo {
                path: p.clone(),
                source,
            })?
            .len(),
        None => 0,
    };
    let kernel_end_estimate = match format {
        KernelFormat::Elf => elf_end(&mut kernel).map_err(io)?,
        KernelFormat::BzImage => HIMEM_START + kernel_len * 4,
    };
    let need = kernel_end_estimate + initrd_len.next_multiple_of(4096) + KERNEL_HEADROOM;
    if need > mem_size {
        return Err(BootError::MemoryTooSmall {
            mem_mib: cfg.mem_mib,
            what: format!(
                "the kernel ends at {} MiB and the initramfs needs {} MiB, plus {} MiB for the kernel to run",
                mib_up(kernel_end_estimate),
                mib_up(initrd_len),
                KERNEL_HEADROOM >> 20
            ),
            need_mib: mib_up(need),
        });
    }

    let mut params = boot_params::default();
    let entry = match format {
        KernelFormat::Elf => {
            let r = Elf::load(mem, None, &mut kernel, Some(GuestAddress(HIMEM_START))).map_err(
                |source| BootError::KernelLoad {
                    path: cfg.kernel.clone(),
                    source,
                },
            )?;
            r.kernel_load.0
        }
        KernelFormat::BzImage => {
            let r = BzImage::load(mem, None, &mut kernel, Some(GuestAddress(HIMEM_START)))
                .map_err(|source| BootError::KernelLoad {
                    path: cfg.kernel.clone(),
                    source,
                })?;
            if let Some(hdr) = r.setup_header {
                params.hdr = hdr;
            }
            // The 64-bit entry is 0x200 bytes into the protected-mode code.
            r.kernel_load.0 + 0x200
        }
    };

    // Command line.
    let full = cfg.kernel_cmdline();
    if full.len() >= CMDLINE_MAX {
        return Err(BootError::Cmdline(format!(
            "{} bytes, the kernel accepts at most {}",
            full.len(),
            CMDLINE_MAX - 1
        )));
    }
    let mut cmdline =
        loader::Cmdline::new(CMDLINE_MAX).map_err(|e| BootError::Cmdline(e.to_string()))?;
    cmdline
        .insert_str(&full)
        .map_err(|e| BootError::Cmdline(format!("{e}: {full:?}")))?;
    loader::load_cmdline(mem, GuestAddress(CMDLINE_ADDR), &cmdline)
        .map_err(|e| BootError::Cmdline(e.to_string()))?;

    // Initramfs at the top of RAM, page aligned.
    if let Some(path) = &cfg.initrd {
        let data = std::fs::read(path).map_err(|source| BootError::InitrdIo {
            path: path.clone(),
            source,
        })?;
        let addr = (mem_size - data.len() as u64) & !0xfff;
        mem.write_slice(&data, GuestAddress(addr))
            .map_err(|source| BootError::GuestMemory {
                what: "initramfs",
                source,
            })?;
        params.hdr.ramdisk_image = addr as u32;
        params.hdr.ramdisk_size = data.len() as u32;
    }

    params.hdr.type_of_loader = 0xff;
    params.hdr.boot_flag = 0xaa55;
    params.hdr.header = 0x5372_6448; // "HdrS"
    params.hdr.cmd_line_ptr = CMDLINE_ADDR as u32;
    params.hdr.cmdline_size = full.len() as u32;
    params.hdr.kernel_alignment = 0x100_0000;
    let e820 = [
        (0, EBDA_START, E820_RAM),
        (EBDA_START, 0x100000 - EBDA_START, E820_RESERVED),
        (HIMEM_START, mem_size - HIMEM_START, E820_RAM),
    ];
    for (i, (addr, size, type_)) in e820.iter().enumerate() {
        params.e820_table[i] = boot_e820_entry {
            addr: *addr,
            size: *size,
            r#type: *type_,
        };
    }
    params.e820_entries = e820.len() as u8;
    mem.write_obj(params, GuestAddress(ZERO_PAGE_ADDR))
        .map_err(|source| BootError::GuestMemory {
            what: "zero page",
            source,
        })?;

    write_gdt(mem)?;
    write_page_tables(mem)?;
    Ok(BootInfo { entry, format })
}

/// Highest physical address any PT_LOAD segment of an ELF64 image reaches.
fn elf_end(f: &mut File) -> std::io::Result<u64> {
    let mut ehdr = [0u8; 64];
    f.rewind()?;
    f.read_exact(&mut ehdr)?;
    let phoff = u64::from_le_bytes(ehdr[32..40].try_into().unwrap());
    let phentsize = u16::from_le_bytes([ehdr[54], ehdr[55]]) as u64;
    let phnum = u16::from_le_bytes([ehdr[56], ehdr[57]]) as u64;
    let mut end = 0;
    for i in 0..phnum {
        let mut ph = [0u8; 56];
        f.seek(SeekFrom::Start(phoff + i * phentsize))?;
        f.read_exact(&mut ph)?;
        if u32::from_le_bytes(ph[0..4].try_into().unwrap()) == 1 {
            let paddr = u64::from_le_bytes(ph[24..32].try_into().unwrap());
            let memsz = u64::from_le_bytes(ph[40..48].try_into().unwrap());
            end = end.max(paddr + memsz);
        }
    }
    f.rewind()?;
    Ok(end)
}

#[cfg(test)]
/// A GDT descriptor from flags (type/S/DPL/P in bits 0-7, AVL/L/DB/G in 12-15), base, limit.
fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    ((base as u64 & 0xff00_0000) << 32)
        | ((base as u64 & 0x00ff_ffff) << 16)
        | (limit as u64 & 0xffff)
        | ((limit as u64 & 0xf_0000) << 32)
        | ((flags as u64 & 0xf0ff) << 40)
}

const GDT: [u64; 5] = [
    0,
    0,
    // 0x10: 64-bit code, present, DPL0, execute/read, accessed, L=1, G=1.
    0x00af_9b00_0000_ffff,
    // 0x18: data, present, DPL0, read/write, accessed, D/B=1, G=1.
    0x00cf_9300_0000_ffff,
    // 0x20: 64-bit TSS (busy).
    0x0080_8b00_0000_ffff,
];

fn write_gdt(mem: &GuestMemoryMmap) -> Result<(), BootError> {
    for (i, entry) in GDT.iter().enumerate() {
        mem.write_obj(*entry, GuestAddress(GDT_ADDR + i as u64 * 8))
            .map_err(|source| BootError::GuestMemory {
                what: "GDT",
                source,
            })?;
    }
    mem.write_obj(0u64, GuestAddress(IDT_ADDR))
        .map_err(|source| BootError::GuestMemory {
            what: "IDT",
            source,
        })
}

fn write_page_tables(mem: &GuestMemoryMmap) -> Result<(), BootError> {
    let w = |v: u64, a: u64| {
        mem.write_obj(v, GuestAddress(a))
            .map_err(|source| BootError::GuestMemory {
                what: "page tables",
                source,
            })
    };
    // PML4[0] -> PDPT; PDPT[0..4] -> four PDs; each PD maps 1 GiB in 2 MiB pages.
    w(PDPT_ADDR | 0x03, PML4_ADDR)?;
    for g in 0..4u64 {
        let pd = PD_ADDR + g * 0x1000;
        w(pd | 0x03, PDPT_ADDR + g * 8)?;
        for i in 0..512u64 {
            w(((g << 30) | (i << 21)) | 0x83, pd + i * 8)?;
        }
    }
    Ok(())
}

fn segment_from_gdt(entry: u64, index: u16) -> kvm_segment {
    let base = ((entry >> 16) & 0xff_ffff) | ((entry >> 32) & 0xff00_0000);
    let mut limit = ((entry & 0xffff) | ((entry >> 32) & 0xf_0000)) as u32;
    let g = ((entry >> 55) & 1) as u8;
    if g == 1 {
        limit = (limit << 12) | 0xfff;
    }
    kvm_segment {
        base,
        limit,
        selector: index * 8,
        type_: ((entry >> 40) & 0xf) as u8,
        present: ((entry >> 47) & 1) as u8,
        dpl: ((entry >> 45) & 3) as u8,
        db: ((entry >> 54) & 1) as u8,
        s: ((entry >> 44) & 1) as u8,
        l: ((entry >> 53) & 1) as u8,
        g,
        avl: ((entry >> 52) & 1) as u8,
        unusable: 0,
        padding: 0,
    }
}

/// Special registers for the 64-bit entry: long mode, paging, boot GDT.
pub fn boot_sregs(mut sregs: kvm_sregs) -> kvm_sregs {
    let code = segment_from_gdt(GDT[(BOOT_CS / 8) as usize], BOOT_CS / 8);
    let data = segment_from_gdt(GDT[(BOOT_DS / 8) as usize], BOOT_DS / 8);
    let tss = segment_from_gdt(GDT[(BOOT_TSS / 8) as usize], BOOT_TSS / 8);
    sregs.gdt.base = GDT_ADDR;
    sregs.gdt.limit = (GDT.len() * 8 - 1) as u16;
    sregs.idt.base = IDT_ADDR;
    sregs.idt.limit = 7;
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = tss;
    const CR0_PE: u64 = 1;
    const CR0_ET: u64 = 1 << 4;
    const CR0_PG: u64 = 1 << 31;
    const CR4_PAE: u64 = 1 << 5;
    const EFER_LME: u64 = 1 << 8;
    const EFER_LMA: u64 = 1 << 10;
    sregs.cr0 = CR0_PE | CR0_ET | CR0_PG;
    sregs.cr3 = PML4_ADDR;
    sregs.cr4 = CR4_PAE;
    sregs.efer = EFER_LME | EFER_LMA;
    sregs
}

/// General registers for the 64-bit entry: RIP at the kernel entry, RSI at the zero page.
pub fn boot_regs(info: &BootInfo) -> kvm_regs {
    kvm_regs {
        rflags: 0x2,
        rip: info.entry,
        rsp: BOOT_STACK,
        rbp: BOOT_STACK,
        rsi: ZERO_PAGE_ADDR,
        ..Default::default()
    }
}

/// FPU in its FNINIT state with the default MXCSR.
pub fn boot_fpu() -> kvm_fpu {
    kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::Bytes;

    #[test]
    fn disks_parse_with_their_options_and_are_announced_in_order() {
        let d: DiskSpec = "/x/a.img".parse().unwrap();
        assert_eq!((d.path.to_str(), d.read_only), (Some("/x/a.img"), false));
        let d: DiskSpec = "b,c.img,ro".parse().unwrap();
        assert_eq!((d.path.to_str(), d.read_only), (Some("b,c.img"), true));
        assert!("a.img,shared-ish".parse::<DiskSpec>().is_err());
        let dir = tempfile::tempdir().unwrap();
        let comma = dir.path().join("a,b.img");
        std::fs::write(&comma, b"").unwrap();
        let d: DiskSpec = comma.to_str().unwrap().parse().unwrap();
        assert_eq!(
            (d.path, d.read_only, d.shared),
            (comma.clone(), false, false)
        );
        let e = format!("{}x", comma.display())
            .parse::<DiskSpec>()
            .unwrap_err();
        assert!(e.contains("no file"), "{e}");
        let d: DiskSpec = "a.img,shared".parse().unwrap();
        assert!(d.shared && !d.read_only);
        assert!(!"a.img".parse::<DiskSpec>().unwrap().shared);
        assert!(",ro".parse::<DiskSpec>().is_err());
        let cfg = BootConfig {
            kernel: PathBuf::from("k"),
            initrd: None,
            mem_mib: 64,
            cmdline: "console=ttyS0".into(),
            disks: vec!["a".parse().unwrap(), "b,ro".parse().unwrap()],
            nets: vec!["tap=t0".parse().unwrap()],
        };
        assert_eq!(
            cfg.kernel_cmdline(),
            "console=ttyS0 virtio_mmio.device=4K@0xd0000000:5 virtio_mmio.device=4K@0xd0001000:6 \
             virtio_mmio.device=4K@0xd0002000:7"
        );
        let n: NetSpec = "tap=vm0,mac=02:00:00:00:00:07".parse().unwrap();
        assert_eq!((n.tap.as_str(), n.mac), ("vm0", [2, 0, 0, 0, 0, 7]));
        let n: NetSpec = "tap=vm1".parse().unwrap();
        assert_eq!(n.mac, crate::devices::virtio::net::DEFAULT_MAC);
        assert!(
            "mac=02:00:00:00:00:07".parse::<NetSpec>().is_err(),
            "no tap"
        );
        assert!("tap=a,speed=10".parse::<NetSpec>().is_err());
    }

    #[test]
    fn gdt_entries_decode_to_long_mode_segments() {
        assert_eq!(gdt_entry(0xa09b, 0, 0xfffff), GDT[2]);
        assert_eq!(gdt_entry(0xc093, 0, 0xfffff), GDT[3]);
        let cs = segment_from_gdt(GDT[2], 2);
        assert_eq!(
            (cs.l, cs.db, cs.present, cs.type_, cs.selector),
            (1, 0, 1, 0xb, BOOT_CS)
        );
        assert_eq!(cs.limit, 0xffff_ffff);
        let ds = segment_from_gdt(GDT[3], 3);
        assert_eq!((ds.l, ds.db, ds.type_, ds.selector), (0, 1, 3, BOOT_DS));
    }

    #[test]
    fn page_tables_identity_map_4gib() {
        let mem = create_memory(64).unwrap();
        write_page_tables(&mem).unwrap();
        let pml4: u64 = mem.read_obj(GuestAddress(PML4_ADDR)).unwrap();
        assert_eq!(pml4 & !0xfff, PDPT_ADDR);
        let pdpt3: u64 = mem.read_obj(GuestAddress(PDPT_ADDR + 24)).unwrap();
        let pd3 = pdpt3 & !0xfff;
        let last: u64 = mem.read_obj(GuestAddress(pd3 + 511 * 8)).unwrap();
        assert_eq!(last & !0xfff, (3 << 30) | (511 << 21));
        assert_eq!(last & 0x83, 0x83, "present, writable, 2 MiB page");
    }

    #[test]
    fn format_detection_rejects_non_kernels() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("notakernel");
        std::fs::write(&p, b"#!/bin/sh\necho hi\n").unwrap();
        assert!(matches!(detect_format(&p), Err(BootError::KernelFormat(_))));
        let missing = dir.path().join("missing");
        assert!(matches!(
            detect_format(&missing),
            Err(BootError::KernelIo { .. })
        ));
    }

    #[test]
    fn memory_bounds() {
        assert!(matches!(
            create_memory(8),
            Err(BootError::MemoryTooSmall { .. })
        ));
        assert!(matches!(
            create_memory(1 << 20),
            Err(BootError::MemoryTooLarge(_))
        ));
    }
}
