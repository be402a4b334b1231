//! Cache prefetch hints, for memory a thread knows it will touch soon: the events the memory
//! provider evicts next (stored long ago and cold by then), and the spent events a publisher
//! builds its next events in (last held by a worker on another core).
//!
//! Only hints: a prefetch reads nothing the program sees and never faults, whatever the address.
//! On targets other than x86-64 they compile to nothing.

const LINE: usize = 64;

/// Hints the CPU to bring the `len` bytes from `start` into cache, to be read.
#[inline]
pub(crate) fn range(start: *const u8, len: usize) {
    each_line(start, len, read);
}

/// Hints the CPU to bring the `len` bytes from `start` into cache, to be written: each line is
/// fetched owned, so that another core's copy is invalidated now rather than by the first store.
/// That matters where another core last wrote the lines (a spent event's reference counts, its
/// fields): a store to such a line waits for the transfer, and a locked instruction after it waits
/// for the store. Falls back to [`range`]'s read hint on a CPU without `prefetchw`.
#[inline]
pub(crate) fn range_for_write(start: *const u8, len: usize) {
    if has_prefetchw() {
        each_line(start, len, write);
    } else {
        range(start, len);
    }
}

#[inline]
fn each_line(start: *const u8, len: usize, hint: impl Fn(*const u8)) {
    let mut line = start.wrapping_sub(start as usize % LINE);
    let end = start.wrapping_add(len);
    while line < end {
        hint(line);
        line = line.wrapping_add(LINE);
    }
}

/// One line, with `prefetcht0` on x86-64. The intrinsic is `unsafe` only for its target feature,
/// SSE, which x86-64 always has.
#[inline]
fn read(address: *const u8) {
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

/// One line, with `prefetchw`; only where [`has_prefetchw`]. Written as assembly because the
/// intrinsic's write hint lowers to `prefetcht0` unless the whole crate is built for `prfchw`.
#[inline]
fn write(address: *const u8) {
    #[cfg(target_arch = "x86_64")]
    {
        // SAFETY: `prefetchw` never faults and changes nothing observable, whatever the address;
        // it reads no register but its operand's, writes none, and leaves the flags alone. The
        // caller has checked that the CPU has the instruction.
        unsafe {
            std::arch::asm!("prefetchw [{}]", in(reg) address, options(nostack, readonly, preserves_flags));
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = address;
}

/// Whether this CPU has `prefetchw` (CPUID leaf `8000_0001h`, ECX bit 8: every AMD x86-64 CPU,
/// Intel's from Broadwell on), asked once per process.
#[inline]
fn has_prefetchw() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        static HAS: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *HAS.get_or_init(|| {
            use std::arch::x86_64::__cpuid;
            #[allow(unused_unsafe, reason = "`__cpuid` is an unsafe fn before Rust 1.87")]
            // SAFETY: `cpuid` exists on every x86-64 CPU; the extended leaf is read only when the
            // CPU reports it. (The intrinsic is safe from Rust 1.87 on, `unsafe` before.)
            let (highest, features) = unsafe {
                let highest = __cpuid(0x8000_0000).eax;
                (highest, if highest >= 0x8000_0001 { __cpuid(0x8000_0001).ecx } else { 0 })
            };
            highest >= 0x8000_0001 && features & (1 << 8) != 0
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Hints over any memory, unaligned, empty or not the program's, change nothing.
    #[test]
    fn hints_change_nothing() {
        let bytes: Vec<u8> = (0..=255).collect();
        for (start, len) in [(0, 256), (3, 70), (63, 2), (100, 0)] {
            range(bytes[start..].as_ptr(), len);
            range_for_write(bytes[start..].as_ptr(), len);
        }
        range_for_write(std::ptr::null(), 64);
        range(std::ptr::dangling::<u8>(), 1 << 20);
        assert!(bytes.iter().copied().eq(0..=255));
    }
}
