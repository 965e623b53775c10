//! Guest memory helpers: the whole memory as bytes, digests, and the
//! sparse encoding snapshots use.

use vm_memory::bitmap::AtomicBitmap;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use crate::snapshot::{Decoder, Encoder, SnapshotError};

/// Page size.
pub const PAGE: usize = 4096;

/// Guest memory. Every write the monitor makes through it (a device's
/// DMA, a virtio ring, a restored page) sets the page's bit in the
/// region's bitmap: KVM's dirty log sees only what the guest writes, and a
/// state transfer that copies memory while the guest runs needs both
/// ([`take_host_writes`]).
pub type GuestMemoryMmap = vm_memory::GuestMemoryMmap<AtomicBitmap>;

/// The pages the monitor wrote into guest memory since the last call (the
/// first call: since the memory was made), as a bitmap in KVM's dirty-log
/// layout (bit `i % 64` of word `i / 64` is page `i` of the region at 0),
/// and clear them.
pub fn take_host_writes(mem: &GuestMemoryMmap) -> Vec<u64> {
    match mem.find_region(GuestAddress(0)) {
        // The mapping's own bitmap (the region's trait method gives a
        // slice view that cannot be reset).
        Some(region) => std::ops::Deref::deref(region).bitmap().get_and_reset(),
        None => Vec::new(),
    }
}

/// Set in `into` every bit set in `from` (KVM's dirty-log layout); `into`
/// grows to `from`'s length if shorter.
pub fn merge_bitmap(into: &mut Vec<u64>, from: &[u64]) {
    if into.len() < from.len() {
        into.resize(from.len(), 0);
    }
    for (w, f) in into.iter_mut().zip(from) {
        *w |= f;
    }
}

/// The page numbers set in `bitmap` (KVM's dirty-log layout), in order.
pub fn pages_of(bitmap: &[u64]) -> Vec<u64> {
    let mut pages = Vec::new();
    for (w, word) in bitmap.iter().enumerate() {
        let mut bits = *word;
        while bits != 0 {
            let b = bits.trailing_zeros() as u64;
            bits &= bits - 1;
            pages.push(w as u64 * 64 + b);
        }
    }
    pages
}

/// All guest memory as one byte slice: the region that starts at guest
/// address 0 (the VM has a single region; empty if there is none). The
/// length is the region's own, so the slice cannot reach past the mapping.
pub fn mem_bytes(mem: &GuestMemoryMmap) -> &[u8] {
    let Some(region) = mem.find_region(GuestAddress(0)) else {
        return &[];
    };
    let len = region.len() as usize;
    let Ok(host) = region.get_host_address(vm_memory::MemoryRegionAddress(0)) else {
        return &[];
    };
    // SAFETY: `host` is the start of `region`'s mapping, which is `len`
    // bytes long and owned by `mem`, which outlives the slice. It is read
    // only while the vCPU is outside KVM_RUN (on the vCPU thread), so the
    // guest does not write it meanwhile.
    unsafe { std::slice::from_raw_parts(host, len) }
}

/// CRC32C-based digest of guest memory (fast enough to take periodically).
pub fn memory_digest(mem: &GuestMemoryMmap) -> u64 {
    let bytes = mem_bytes(mem);
    let mut hi = 0u32;
    let mut lo = 0u32;
    for (i, chunk) in bytes.chunks(1 << 20).enumerate() {
        if i % 2 == 0 {
            lo = crc32c::crc32c_append(lo, chunk);
        } else {
            hi = crc32c::crc32c_append(hi, chunk);
        }
    }
    ((hi as u64) << 32) | lo as u64
}

/// Memory as a bitmap of non-zero pages followed by those pages.
pub fn encode_memory(e: &mut Encoder, mem: &[u8]) {
    let pages = mem.len() / PAGE;
    let mut bitmap = vec![0u8; pages.div_ceil(8)];
    let mut nonzero = Vec::new();
    for (i, page) in mem.chunks(PAGE).enumerate() {
        if page.iter().any(|&b| b != 0) {
            bitmap[i / 8] |= 1 << (i % 8);
            nonzero.push(i);
        }
    }
    e.u64(pages as u64);
    e.bytes(&bitmap);
    for i in nonzero {
        e.raw(&mem[i * PAGE..(i + 1) * PAGE]);
    }
}

pub fn decode_memory(
    d: &mut Decoder,
    mem: &GuestMemoryMmap,
    len: usize,
) -> Result<(), SnapshotError> {
    let pages = d.u64()?;
    if pages.checked_mul(PAGE as u64) != Some(len as u64) {
        return Err(SnapshotError::Invalid(format!(
            "memory section has {pages} pages, the VM has {}",
            len / PAGE
        )));
    }
    let pages = pages as usize;
    let bitmap = d.bytes()?;
    if bitmap.len() != pages.div_ceil(8) {
        return Err(SnapshotError::Invalid("memory bitmap size".into()));
    }
    for i in 0..pages {
        if bitmap[i / 8] & (1 << (i % 8)) != 0 {
            mem.write_slice(d.bytes_exact(PAGE)?, GuestAddress((i * PAGE) as u64))
                .map_err(|e| SnapshotError::Invalid(format!("memory page {i}: {e}")))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_writes_are_tracked_and_taken_once() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 256 * PAGE)]).unwrap();
        take_host_writes(&mem);
        mem.write_slice(&[1u8; 10], GuestAddress(3 * PAGE as u64 + 5))
            .unwrap();
        // A write across a page boundary dirties both pages.
        mem.write_slice(&[2u8; 8], GuestAddress(200 * PAGE as u64 - 4))
            .unwrap();
        assert_eq!(pages_of(&take_host_writes(&mem)), vec![3, 199, 200]);
        assert!(pages_of(&take_host_writes(&mem)).is_empty());
    }

    #[test]
    fn merged_bitmaps_keep_every_bit() {
        let mut into = vec![0b1];
        merge_bitmap(&mut into, &[0b10, 1 << 5]);
        assert_eq!(into, vec![0b11, 1 << 5]);
        merge_bitmap(&mut into, &[]);
        assert_eq!(into, vec![0b11, 1 << 5]);
    }

    #[test]
    fn pages_of_reads_every_word() {
        assert_eq!(pages_of(&[0b101, 0, 1 << 63]), vec![0, 2, 191]);
        assert!(pages_of(&[]).is_empty());
    }

    #[test]
    fn sparse_memory_round_trip() {
        let mut mem = vec![0u8; 16 * PAGE];
        mem[3 * PAGE + 7] = 1;
        mem[15 * PAGE] = 0xaa;
        let mut e = Encoder::new();
        encode_memory(&mut e, &mem);
        let bytes = e.into_bytes();
        assert!(bytes.len() < 3 * PAGE + 64, "zero pages are not stored");
        let guest = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 16 * PAGE)]).unwrap();
        decode_memory(&mut Decoder::new(&bytes), &guest, 16 * PAGE).unwrap();
        assert_eq!(mem_bytes(&guest), &mem[..]);
    }

    #[test]
    fn memory_bytes_are_exactly_the_region() {
        let guest = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 3 * PAGE)]).unwrap();
        assert_eq!(mem_bytes(&guest).len(), 3 * PAGE);
        let elsewhere = GuestMemoryMmap::from_ranges(&[(GuestAddress(0x10000), PAGE)]).unwrap();
        assert!(mem_bytes(&elsewhere).is_empty());
    }

    #[test]
    fn a_page_count_that_overflows_is_refused() {
        let mut e = Encoder::new();
        e.u64(u64::MAX / 2);
        let bytes = e.into_bytes();
        let guest = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), PAGE)]).unwrap();
        assert!(decode_memory(&mut Decoder::new(&bytes), &guest, PAGE).is_err());
    }
}
