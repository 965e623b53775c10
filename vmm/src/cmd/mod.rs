//! The `vmft` subcommands, one module each, and what they share: the boot
//! options, the console on the terminal, how a run's end is reported.

pub mod console;
pub mod drill;
pub mod ft;
pub mod log;
pub mod pair;
pub mod record;
pub mod replay;
pub mod run;
pub mod status;

use std::io;
use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;

use vmm::boot::BootConfig;
use vmm::image::{self, DEFAULT_MEM_MIB, DEFAULT_WORKLOAD};
use vmm::nondet::{InputSource, ReadInput};
use vmm::stop::{StopHandle, StopReason};
use vmm::terminal::{EscapeReader, RawTerminal, ESCAPE_HELP};
use vmm::vm::VmExit;

#[derive(Args, Clone)]
pub struct BootArgs {
    /// Kernel: uncompressed vmlinux ELF (default) or bzImage.
    #[arg(long)]
    pub kernel: Option<PathBuf>,
    /// Initramfs (cpio). Defaults to the default image's when --kernel is not given.
    #[arg(long)]
    pub initrd: Option<PathBuf>,
    /// Guest memory in MiB.
    #[arg(long, default_value_t = DEFAULT_MEM_MIB)]
    pub mem: u64,
    /// Extra kernel command line, appended to the defaults.
    #[arg(long)]
    pub append: Option<String>,
    /// Workload the default guest runs: compute, concurrent, counter, disk, echo, net-all,
    /// net-echo, net-sink, net-source, shell, sleep or ticker
    /// (the default initramfs's; any name with --initrd).
    #[arg(long, default_value = DEFAULT_WORKLOAD)]
    pub workload: String,
    /// A disk for the guest: a raw image, PATH, PATH,ro or PATH,shared
    /// (repeat for more; the first is /dev/vda). Under FT each side has its
    /// own identical copy, or, shared, both reach one image: only the live
    /// side writes it, writes wait for the backup's ack, reads are logged.
    #[arg(long = "disk", value_name = "PATH[,ro|,shared]")]
    pub disks: Vec<vmm::boot::DiskSpec>,
    /// A network card on the host tap device NAME (it must exist, on a
    /// bridge; vmft brings it up), with the guest's MAC (default
    /// 02:76:6d:66:74:00). Under FT each side has its own tap, same MAC.
    #[arg(long = "net", value_name = "tap=NAME[,mac=MAC]")]
    pub nets: Vec<vmm::boot::NetSpec>,
}

pub fn boot_config(args: BootArgs) -> Result<BootConfig> {
    if args.initrd.is_none() {
        image::check_workload(&args.workload)?;
    }
    let (kernel, initrd) = match args.kernel {
        Some(k) => (k, args.initrd),
        None => {
            let img = image::default_image().context("cannot prepare the default guest image")?;
            (img.kernel, Some(args.initrd.unwrap_or(img.initrd)))
        }
    };
    let mut cmdline = format!("{} vmft.workload={}", image::base_cmdline(), args.workload);
    if let Some(extra) = &args.append {
        cmdline.push(' ');
        cmdline.push_str(extra);
    }
    Ok(BootConfig {
        kernel,
        initrd,
        mem_mib: args.mem,
        cmdline,
        disks: args.disks,
        nets: args.nets,
    })
}

/// The console on stdin and stdout: when stdin is a terminal, raw mode
/// (every key to the guest) and the escape (Ctrl-A x stops the VM cleanly
/// through `stop`); otherwise stdin as it is. Enter it right before the VM
/// starts: until then Ctrl-C still interrupts vmft itself.
pub fn console_input(
    no_stdin: bool,
    stop: &StopHandle,
) -> (Option<Box<dyn InputSource>>, Option<RawTerminal>) {
    if no_stdin {
        return (None, None);
    }
    match RawTerminal::enter() {
        Some(raw) => {
            eprintln!("vmft: {ESCAPE_HELP}");
            let stop = stop.clone();
            let on_leave = Box::new(move || {
                stop.request(StopReason::Escape);
            });
            (
                Some(Box::new(ReadInput(EscapeReader::new(
                    io::stdin(),
                    on_leave,
                )))),
                Some(raw),
            )
        }
        None => (Some(Box::new(ReadInput(io::stdin()))), None),
    }
}

/// Open the tap of the VM's network card, if it has one (one card for
/// now), and bring it up.
pub fn open_tap(
    nets: &[vmm::boot::NetSpec],
) -> Result<Option<std::sync::Arc<vmm::devices::virtio::Tap>>> {
    match nets {
        [] => Ok(None),
        [n] => {
            // Opening a tap by a new name would create one attached to
            // nothing: the guest would be on no network. Ask for one that
            // exists (on a bridge).
            if !std::path::Path::new("/sys/class/net").join(&n.tap).exists() {
                anyhow::bail!(
                    "tap {} does not exist in this network namespace: create it and put it on a \
                     bridge first (ip tuntap add dev {} mode tap vnet_hdr; ip link set {} master BRIDGE up; \
                     see docs/NETWORK.md)",
                    n.tap,
                    n.tap,
                    n.tap
                );
            }
            let tap = vmm::devices::virtio::Tap::open(&n.tap)?;
            tap.set_up()?;
            Ok(Some(std::sync::Arc::new(tap)))
        }
        _ => anyhow::bail!("one --net for now ({} given)", nets.len()),
    }
}

/// The host side of the network card of a VM that is live from the start
/// (`vmft run`, `vmft record`): frames go straight to the tap.
pub fn live_net(nets: &[vmm::boot::NetSpec]) -> Result<Option<vmm::vm::NetIo>> {
    Ok(open_tap(nets)?.map(|tap| vmm::vm::NetIo {
        out: Box::new(vmm::netio::TapSink::new(tap.clone())),
        tap: Some(tap),
        live_out: None,
    }))
}

/// How a run ended, for the user.
pub fn report_exit(exit: VmExit, stop: &StopHandle) {
    match (exit, stop.requested()) {
        (VmExit::Stopped, Some(reason)) => eprintln!("vmft: {exit} ({reason})"),
        _ => eprintln!("vmft: {exit}"),
    }
}
