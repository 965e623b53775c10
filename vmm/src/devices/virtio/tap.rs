//! A tap device: the host's end of the guest's network card.
//!
//! [`Tap::open`] attaches to (or creates) the tap interface `name` through
//! `/dev/net/tun` with `IFF_TAP | IFF_NO_PI | IFF_VNET_HDR`, sets the
//! virtio-net header size to 12 bytes (`virtio_net_hdr_v1`), turns every
//! offload off (`TUNSETOFFLOAD 0`, so the kernel hands over only complete,
//! checksummed frames) and makes the descriptor non-blocking.
//!
//! The tap is the monitor's, not the device's (see [`super::net`]): a
//! reader thread calls [`Tap::read_frame`] when the descriptor is readable
//! (`poll` on [`Tap::as_raw_fd`]) and hands plain Ethernet frames to the
//! vCPU thread, which logs and delivers them; frames the guest sent are
//! written with [`Tap::write_frame`] once the output rule allows. Both
//! strip or add the 12-byte header, so callers only see plain frames.
//!
//! Opening a new tap needs `CAP_NET_ADMIN` in the current network
//! namespace; a persistent tap made for a user beforehand
//! (`ip tuntap add dev NAME mode tap vnet_hdr user USER`) can be opened by
//! that user without it. A tap created here (not persistent) disappears
//! when the `Tap` is dropped. It lives in the network namespace of the
//! thread that opened it.

use std::fmt;
use std::fs::{File, OpenOptions};
use std::io::{self, IoSlice, IoSliceMut, Read, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;

use thiserror::Error;
use tracing::{debug, warn};
use vmm_sys_util::ioctl::{ioctl_with_mut_ref, ioctl_with_ref, ioctl_with_val};

use super::net::{MAX_FRAME_BYTES, NET_HDR_BYTES};

/// The clone device every tap is opened through.
pub const TUN_PATH: &str = "/dev/net/tun";
/// Longest interface name (`IFNAMSIZ` less the terminating NUL).
pub const MAX_NAME_BYTES: usize = libc::IFNAMSIZ - 1;

/// `virtio_net_hdr` flag: the checksum is left to the receiver.
const HDR_F_NEEDS_CSUM: u8 = virtio_bindings::virtio_net::VIRTIO_NET_HDR_F_NEEDS_CSUM as u8;
/// `virtio_net_hdr` GSO type of a plain frame.
const HDR_GSO_NONE: u8 = virtio_bindings::virtio_net::VIRTIO_NET_HDR_GSO_NONE as u8;

/// The step of opening or configuring a tap that failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TapStep {
    /// Opening `/dev/net/tun`.
    OpenTun,
    /// `TUNSETIFF`: attaching to or creating the interface.
    SetIff,
    /// `TUNSETVNETHDRSZ`.
    SetVnetHdrSize,
    /// `TUNSETOFFLOAD`.
    SetOffload,
    /// Opening the socket interface ioctls go through.
    Socket,
    /// `SIOCGIFFLAGS`.
    GetFlags,
    /// `SIOCSIFFLAGS`.
    SetFlags,
}

impl fmt::Display for TapStep {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            TapStep::OpenTun => "opening /dev/net/tun",
            TapStep::SetIff => "TUNSETIFF (IFF_TAP | IFF_NO_PI | IFF_VNET_HDR)",
            TapStep::SetVnetHdrSize => "TUNSETVNETHDRSZ 12",
            TapStep::SetOffload => "TUNSETOFFLOAD 0 (no offloads)",
            TapStep::Socket => "opening a socket for interface ioctls",
            TapStep::GetFlags => "SIOCGIFFLAGS",
            TapStep::SetFlags => "SIOCSIFFLAGS (setting IFF_UP)",
        })
    }
}

/// Errors opening or configuring a tap.
#[derive(Debug, Error)]
pub enum TapError {
    /// The name cannot be an interface name.
    #[error("tap name {name:?}: {why}")]
    Name {
        /// The name given.
        name: String,
        /// What is wrong with it.
        why: &'static str,
    },
    /// A system call failed.
    #[error("tap {name}: {step}: {source}{}", hint(*.step, .source))]
    Io {
        /// The tap's name (as asked for, or as the kernel chose it).
        name: String,
        /// What was being done.
        step: TapStep,
        /// The error.
        source: io::Error,
    },
}

/// A suggestion for the errors people meet first.
fn hint(step: TapStep, e: &io::Error) -> &'static str {
    match (step, e.raw_os_error()) {
        (TapStep::OpenTun, Some(libc::ENOENT)) => {
            " (no tun/tap support: load the tun module, or create the device node)"
        }
        (TapStep::OpenTun | TapStep::SetIff, Some(libc::EPERM | libc::EACCES)) => {
            " (needs CAP_NET_ADMIN, or a persistent tap made for this user: \
             ip tuntap add dev NAME mode tap vnet_hdr user USER)"
        }
        (TapStep::SetIff, Some(libc::EINVAL)) => {
            " (an interface of that name exists and is not a tap, or was made with other flags)"
        }
        (TapStep::SetIff, Some(libc::EBUSY)) => " (the tap is in use by another process)",
        _ => "",
    }
}

/// An interface name's rules (the kernel's `dev_valid_name`); empty lets
/// the kernel choose (`tapN`).
fn check_name(name: &str) -> Result<(), TapError> {
    let bad = |why| {
        Err(TapError::Name {
            name: name.to_string(),
            why,
        })
    };
    if name.len() > MAX_NAME_BYTES {
        return bad("longer than 15 bytes");
    }
    if name == "." || name == ".." {
        return bad("not an interface name");
    }
    if name
        .bytes()
        .any(|b| b == 0 || b == b'/' || b == b':' || b.is_ascii_whitespace())
    {
        return bad("contains NUL, '/', ':' or white space");
    }
    Ok(())
}

/// An `ifreq` naming `name` (checked: at most 15 bytes), all else zero.
fn ifreq(name: &str) -> libc::ifreq {
    // SAFETY: `ifreq` is plain data (a byte array and a union of integers,
    // socket addresses and a pointer); all zeroes is a valid value of it.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, &src) in req.ifr_name.iter_mut().zip(name.as_bytes()) {
        *dst = src as libc::c_char;
    }
    req
}

/// The name in `req` (as the kernel wrote it back).
fn ifreq_name(req: &libc::ifreq) -> String {
    let bytes: Vec<u8> = req
        .ifr_name
        .iter()
        .take_while(|&&c| c != 0)
        .map(|&c| c as u8)
        .collect();
    String::from_utf8_lossy(&bytes).into_owned()
}

/// An open tap interface.
#[derive(Debug)]
pub struct Tap {
    file: File,
    name: String,
}

impl Tap {
    /// Attach to the tap `name`, creating it if it does not exist (an
    /// empty name lets the kernel choose one; [`Tap::name`] tells which).
    /// The link is not brought up: see [`Tap::set_up`].
    pub fn open(name: &str) -> Result<Tap, TapError> {
        check_name(name)?;
        let failed = |name: &str, step| {
            let name = name.to_string();
            move |source| TapError::Io { name, step, source }
        };
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open(TUN_PATH)
            .map_err(failed(name, TapStep::OpenTun))?;
        let mut req = ifreq(name);
        req.ifr_ifru.ifru_flags = (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as i16;
        // SAFETY: `file` is an open /dev/net/tun; TUNSETIFF reads one
        // `ifreq` from the pointer and writes the chosen name back into it,
        // and `req` is a live, writable `ifreq` for the whole call.
        let ret = unsafe { ioctl_with_mut_ref(&file, libc::TUNSETIFF, &mut req) };
        if ret < 0 {
            return Err(failed(name, TapStep::SetIff)(io::Error::last_os_error()));
        }
        let name = ifreq_name(&req);
        let size = NET_HDR_BYTES as libc::c_int;
        // SAFETY: TUNSETVNETHDRSZ reads one `int` from the pointer, which
        // points to `size`, alive for the call.
        let ret = unsafe { ioctl_with_ref(&file, libc::TUNSETVNETHDRSZ, &size) };
        if ret < 0 {
            return Err(failed(&name, TapStep::SetVnetHdrSize)(
                io::Error::last_os_error(),
            ));
        }
        // SAFETY: TUNSETOFFLOAD takes its argument (the offload flags) by
        // value; no memory is involved.
        let ret = unsafe { ioctl_with_val(&file, libc::TUNSETOFFLOAD, 0) };
        if ret < 0 {
            return Err(failed(&name, TapStep::SetOffload)(
                io::Error::last_os_error(),
            ));
        }
        debug!(tap = name, "tap open");
        Ok(Tap { file, name })
    }

    /// The interface's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Bring the link up (`IFF_UP`, as `ip link set NAME up`), with
    /// `SIOCGIFFLAGS` and `SIOCSIFFLAGS` on a socket of the calling
    /// thread's network namespace, which must be the tap's. Needs
    /// `CAP_NET_ADMIN`.
    pub fn set_up(&self) -> Result<(), TapError> {
        let failed = |step| {
            let name = self.name.clone();
            move |source| TapError::Io { name, step, source }
        };
        // SAFETY: socket() takes no pointers; the result is checked below.
        let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
        if fd < 0 {
            return Err(failed(TapStep::Socket)(io::Error::last_os_error()));
        }
        // SAFETY: `fd` was just opened and is owned by nothing else.
        let sock = unsafe { OwnedFd::from_raw_fd(fd) };
        let mut req = ifreq(&self.name);
        // SAFETY: SIOCGIFFLAGS reads the name from and writes the flags into
        // one `ifreq` at the pointer; `req` is live and writable.
        let ret = unsafe { ioctl_with_mut_ref(&sock, libc::SIOCGIFFLAGS, &mut req) };
        if ret < 0 {
            return Err(failed(TapStep::GetFlags)(io::Error::last_os_error()));
        }
        // SAFETY: SIOCGIFFLAGS succeeded, so the kernel wrote `ifru_flags`.
        let flags = unsafe { req.ifr_ifru.ifru_flags };
        req.ifr_ifru.ifru_flags = flags | libc::IFF_UP as i16;
        // SAFETY: SIOCSIFFLAGS reads one `ifreq` at the pointer; `req` is
        // live.
        let ret = unsafe { ioctl_with_mut_ref(&sock, libc::SIOCSIFFLAGS, &mut req) };
        if ret < 0 {
            return Err(failed(TapStep::SetFlags)(io::Error::last_os_error()));
        }
        Ok(())
    }

    /// Read one frame into `buf`, without the virtio-net header; `None`
    /// if none is waiting. Only whole frames are returned: the kernel cuts
    /// a frame longer than `buf` (and drops the rest), so such a frame is
    /// skipped with a warning, as is a frame handed over with an offload
    /// pending (impossible with offloads off, as [`Tap::open`] leaves
    /// them). A `buf` of [`MAX_FRAME_BYTES`] holds any frame the device
    /// can deliver.
    pub fn read_frame(&self, buf: &mut [u8]) -> io::Result<Option<usize>> {
        let mut hdr = [0u8; NET_HDR_BYTES];
        // One byte more than `buf` tells a frame that did not fit.
        let mut spare = [0u8; 1];
        loop {
            let mut iov = [
                IoSliceMut::new(&mut hdr),
                IoSliceMut::new(buf),
                IoSliceMut::new(&mut spare),
            ];
            let n = match (&self.file).read_vectored(&mut iov) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(None),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            if n < NET_HDR_BYTES {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!(
                        "tap {}: read {n} bytes, less than the {NET_HDR_BYTES}-byte virtio-net header",
                        self.name
                    ),
                ));
            }
            if hdr[1] != HDR_GSO_NONE || hdr[0] & HDR_F_NEEDS_CSUM != 0 {
                warn!(
                    tap = self.name,
                    flags = hdr[0],
                    gso_type = hdr[1],
                    "tap: frame with an offload pending skipped (offloads were turned on behind vmft's back?)"
                );
                continue;
            }
            let len = n - NET_HDR_BYTES;
            if len > buf.len() {
                warn!(
                    tap = self.name,
                    room = buf.len(),
                    "tap: frame longer than the read buffer skipped"
                );
                continue;
            }
            return Ok(Some(len));
        }
    }

    /// Write one frame (an Ethernet frame without FCS), behind a zeroed
    /// virtio-net header. The tap takes it whole or not at all; a frame
    /// longer than [`MAX_FRAME_BYTES`] is refused here.
    pub fn write_frame(&self, frame: &[u8]) -> io::Result<()> {
        if frame.len() > MAX_FRAME_BYTES {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "tap {}: frame of {} bytes, more than {MAX_FRAME_BYTES}",
                    self.name,
                    frame.len()
                ),
            ));
        }
        let hdr = [0u8; NET_HDR_BYTES];
        loop {
            let iov = [IoSlice::new(&hdr), IoSlice::new(frame)];
            match (&self.file).write_vectored(&iov) {
                Ok(n) if n == NET_HDR_BYTES + frame.len() => return Ok(()),
                Ok(n) => {
                    return Err(io::Error::new(
                        io::ErrorKind::WriteZero,
                        format!(
                            "tap {}: wrote {n} of {} bytes",
                            self.name,
                            NET_HDR_BYTES + frame.len()
                        ),
                    ))
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        }
    }

    /// A tap over `file`, for tests: any descriptor that keeps message
    /// boundaries.
    #[cfg(test)]
    fn from_file(file: File, name: &str) -> Tap {
        Tap {
            file,
            name: name.to_string(),
        }
    }
}

impl AsRawFd for Tap {
    fn as_raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}

impl AsFd for Tap {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two connected non-blocking SOCK_SEQPACKET sockets: a tap-like
    /// descriptor (one message per frame) and its far end.
    fn pair() -> (Tap, File) {
        let mut fds = [0 as libc::c_int; 2];
        // SAFETY: socketpair writes two descriptors into `fds`, which has
        // room for them.
        let ret = unsafe {
            libc::socketpair(
                libc::AF_UNIX,
                libc::SOCK_SEQPACKET | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                0,
                fds.as_mut_ptr(),
            )
        };
        assert_eq!(ret, 0, "{}", io::Error::last_os_error());
        // SAFETY: both descriptors were just opened and belong to nobody else.
        let (a, b) = unsafe { (File::from_raw_fd(fds[0]), File::from_raw_fd(fds[1])) };
        (Tap::from_file(a, "test0"), b)
    }

    #[test]
    fn names_follow_the_kernels_rules() {
        for ok in ["", "tap0", "vmft-primary", &"a234567890123456"[..15]] {
            assert!(check_name(ok).is_ok(), "{ok:?}");
        }
        for bad in ["a2345678901234567", ".", "..", "a/b", "a:b", "a b", "a\0b"] {
            let err = check_name(bad).unwrap_err();
            assert!(matches!(err, TapError::Name { .. }), "{bad:?}");
            assert!(err.to_string().contains(&format!("{bad:?}")), "{err}");
        }
    }

    #[test]
    fn errors_name_the_tap_and_the_step() {
        let err = TapError::Io {
            name: "tap7".into(),
            step: TapStep::SetIff,
            source: io::Error::from_raw_os_error(libc::EPERM),
        };
        let text = err.to_string();
        assert!(text.starts_with("tap tap7: TUNSETIFF"), "{text}");
        assert!(text.contains("CAP_NET_ADMIN"), "{text}");
        let err = TapError::Io {
            name: "tap7".into(),
            step: TapStep::SetFlags,
            source: io::Error::from_raw_os_error(libc::ENODEV),
        };
        assert!(err.to_string().contains("SIOCSIFFLAGS"), "{err}");
    }

    #[test]
    fn write_frame_prepends_a_zero_header() {
        let (tap, mut far) = pair();
        let frame: Vec<u8> = (0..60u8).collect();
        tap.write_frame(&frame).unwrap();
        let mut got = vec![0u8; 200];
        let n = far.read(&mut got).unwrap();
        assert_eq!(n, 72);
        assert_eq!(&got[..12], &[0u8; 12]);
        assert_eq!(&got[12..72], &frame[..]);
        let too_big = vec![0u8; MAX_FRAME_BYTES + 1];
        let err = tap.write_frame(&too_big).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
    }

    #[test]
    fn read_frame_strips_the_header() {
        let (tap, mut far) = pair();
        let mut buf = vec![0u8; MAX_FRAME_BYTES];
        assert_eq!(tap.read_frame(&mut buf).unwrap(), None, "nothing waiting");
        let mut msg = vec![0u8; 12];
        msg[0] = 2; // DATA_VALID: harmless
        msg.extend(100..164u8);
        far.write_all(&msg).unwrap();
        assert_eq!(tap.read_frame(&mut buf).unwrap(), Some(64));
        assert_eq!(&buf[..64], &msg[12..]);
        // A frame with an offload pending is skipped; the next one is read.
        let mut gso = vec![0u8; 12];
        gso[1] = 1; // GSO TCPv4
        gso.extend([7u8; 100]);
        far.write_all(&gso).unwrap();
        let mut csum = vec![0u8; 12];
        csum[0] = 1; // NEEDS_CSUM
        csum.extend([8u8; 100]);
        far.write_all(&csum).unwrap();
        far.write_all(&msg).unwrap();
        assert_eq!(tap.read_frame(&mut buf).unwrap(), Some(64));
        assert_eq!(tap.read_frame(&mut buf).unwrap(), None);
        // Longer than the buffer: skipped, not cut.
        let mut small = [0u8; 64];
        let mut long = vec![0u8; 12];
        long.extend([9u8; 65]);
        far.write_all(&long).unwrap();
        far.write_all(&msg).unwrap();
        assert_eq!(
            tap.read_frame(&mut small).unwrap(),
            Some(64),
            "exactly full"
        );
        assert_eq!(&small[..], &msg[12..]);
        assert_eq!(tap.read_frame(&mut small).unwrap(), None);
        // Shorter than a header.
        far.write_all(&[0u8; 5]).unwrap();
        let err = tap.read_frame(&mut buf).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        assert!(err.to_string().contains("test0"), "{err}");
    }
}
