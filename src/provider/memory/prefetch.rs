//! Cache prefetch hints, for memory the provider knows it will touch soon: the events it evicts
//! next, stored long ago and cold by then.

/// Hints the CPU to bring the `len` bytes from `start` into cache. Only a hint: it reads nothing
/// the program sees, and any address is allowed.
#[inline]
pub(super) fn range(start: *const u8, len: usize) {
    let mut line = start.wrapping_sub(start as usize % LINE);
    let end = start.wrapping_add(len);
    while line < end {
        one(line);
        line = line.wrapping_add(LINE);
    }
}

const LINE: usize = 64;

/// One line, with `prefetcht0` on x86-64 (nothing elsewhere). The intrinsic is `unsafe` only for
/// its target feature, SSE, which x86-64 always has.
#[inline]
fn one(address: *const u8) {
    #[cfg(target_arch = "x86_64")]
    {
        // SAFETY: a prefetch never faults and changes nothing observable, whatever the address.
        unsafe {
            std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(address.cast());
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = address;
}
