//! Guest memory helpers: the whole memory as bytes, digests, and the
//! sparse encoding snapshots use.

use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

use crate::snapshot::{Decoder, Encoder, SnapshotError};

/// Page size.
pub const PAGE: usize = 4096;

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
