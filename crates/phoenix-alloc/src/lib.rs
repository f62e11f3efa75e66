//! The global allocator of the `phoenix` binary: mimalloc, asked through `mi_malloc` whenever the
//! layout allows it.
//!
//! # Why this crate exists, and why it holds `unsafe` code
//!
//! The `mimalloc` crate's allocator passes every layout to `mi_malloc_aligned`. In mimalloc v3 that
//! is only fast for blocks up to 1 KiB: a larger block with any alignment, even the 8 or 16 bytes
//! that every block has anyway, goes to its generic aligned path, which over-allocates by the
//! alignment and marks the page as holding interior pointers. The proxy boxes the futures of each
//! request (one to a few KB each), so a few allocations per request and hop took that path: about
//! 800 instructions per request and hop (`docs/BENCHMARKS.md`, change 31).
//!
//! mimalloc aligns every block of 16 bytes or more to 16 bytes (`MI_MAX_ALIGN_SIZE`; its `alloc.c`
//! asserts it) and a smaller one to 8, which is what glibc's malloc promises and what Rust's own
//! `System` allocator relies on for the same shortcut. So a layout whose alignment is at most 16
//! and at most its size is served by `mi_malloc`; any other by `mi_malloc_aligned`.
//!
//! A `GlobalAlloc` implementation is `unsafe` by definition: this is the workspace's one crate
//! without `forbid(unsafe_code)`, and it holds nothing else. Each `unsafe` block says why it holds.

use std::alloc::{GlobalAlloc, Layout};
use std::ffi::c_void;

use libmimalloc_sys as mi;

/// The alignment mimalloc gives every block of at least this size (`MI_MAX_ALIGN_SIZE`).
const MIN_ALIGN: usize = 16;

/// mimalloc, through its plain entry points where the layout allows (see the crate's docs).
pub struct Mimalloc;

/// Whether a block of `size` bytes from the plain entry points is aligned enough for `align`.
fn plain_fits(align: usize, size: usize) -> bool {
    align <= MIN_ALIGN && align <= size
}

/// A block for `layout` from `plain` (`mi_malloc`, `mi_zalloc`) when it is aligned enough, from
/// `aligned` (their `_aligned` forms) otherwise.
///
/// # Safety
///
/// `plain` and `aligned` are mimalloc allocation functions of that shape.
#[inline]
unsafe fn allocate(
    layout: Layout,
    plain: unsafe extern "C" fn(usize) -> *mut c_void,
    aligned: unsafe extern "C" fn(usize, usize) -> *mut c_void,
) -> *mut u8 {
    let (size, align) = (layout.size(), layout.align());
    // SAFETY: mimalloc's allocation functions take any size; `align` is a power of two (a
    // `Layout` guarantees it), which the aligned ones require.
    unsafe {
        if plain_fits(align, size) {
            plain(size).cast()
        } else {
            aligned(size, align).cast()
        }
    }
}

// SAFETY: every method hands mimalloc a layout the `GlobalAlloc` contract made valid, and returns
// what mimalloc returned: null on failure, otherwise a block of at least the size asked for, aligned
// as the layout asks (by `plain_fits` for the plain entry points, by mimalloc for the aligned ones).
unsafe impl GlobalAlloc for Mimalloc {
    #[inline]
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: both are mimalloc's allocation functions.
        unsafe { allocate(layout, mi::mi_malloc, mi::mi_malloc_aligned) }
    }

    #[inline]
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: both are mimalloc's allocation functions.
        unsafe { allocate(layout, mi::mi_zalloc, mi::mi_zalloc_aligned) }
    }

    #[inline]
    unsafe fn dealloc(&self, ptr: *mut u8, _layout: Layout) {
        // SAFETY: the caller passes a block this allocator returned, which mimalloc allocated by
        // one of its entry points; `mi_free` frees a block from any of them.
        unsafe { mi::mi_free(ptr.cast::<c_void>()) }
    }

    #[inline]
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let align = layout.align();
        // SAFETY: `ptr` is a block of this allocator (the caller's contract), which mimalloc's
        // reallocation functions take whichever entry point allocated it; the new block is aligned
        // as `plain_fits` or `mi_realloc_aligned` guarantees for the new size.
        unsafe {
            if plain_fits(align, new_size) {
                mi::mi_realloc(ptr.cast::<c_void>(), new_size).cast()
            } else {
                mi::mi_realloc_aligned(ptr.cast::<c_void>(), new_size, align).cast()
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Sizes around mimalloc's class boundaries and its 1 KiB small-block limit, with every
    /// alignment up to a page: each block is aligned as asked, holds what is written to it, and
    /// keeps it through a reallocation that grows it past the limit and one that shrinks it.
    #[test]
    fn every_block_is_aligned_as_asked_and_keeps_its_bytes() {
        let sizes = [
            1, 7, 8, 12, 16, 24, 40, 48, 72, 100, 1000, 1024, 1040, 3000, 4096, 9000,
        ];
        let aligns = [1, 2, 4, 8, 16, 32, 64, 128, 4096];
        for &align in &aligns {
            for &size in &sizes {
                let Ok(layout) = Layout::from_size_align(size, align) else {
                    continue;
                };
                let layout = layout.pad_to_align();
                // SAFETY: a non-zero layout; each block is written within its size, checked and
                // freed with the layout it was allocated or reallocated with.
                unsafe {
                    let p = Mimalloc.alloc(layout);
                    assert!(!p.is_null(), "{layout:?}");
                    assert_eq!(p as usize % align, 0, "{layout:?}");
                    for i in 0..layout.size() {
                        p.add(i).write(i as u8);
                    }
                    let grown = 2 * layout.size() + 2048;
                    let q = Mimalloc.realloc(p, layout, grown);
                    assert_eq!(q as usize % align, 0, "grown {layout:?}");
                    assert!((0..layout.size()).all(|i| q.add(i).read() == i as u8));
                    let grown = Layout::from_size_align(grown, align).unwrap();
                    let r = Mimalloc.realloc(q, grown, layout.size());
                    assert_eq!(r as usize % align, 0, "shrunk {layout:?}");
                    assert!((0..layout.size()).all(|i| r.add(i).read() == i as u8));
                    Mimalloc.dealloc(r, layout);

                    let z = Mimalloc.alloc_zeroed(layout);
                    assert_eq!(z as usize % align, 0, "zeroed {layout:?}");
                    assert!((0..layout.size()).all(|i| z.add(i).read() == 0));
                    Mimalloc.dealloc(z, layout);
                }
            }
        }
    }

    #[test]
    fn the_plain_entry_points_serve_only_what_they_align() {
        assert!(plain_fits(16, 3000));
        assert!(plain_fits(8, 8));
        assert!(!plain_fits(16, 8), "an 8-byte block is only 8-aligned");
        assert!(!plain_fits(32, 3000), "above 16, mimalloc must be asked");
    }
}
