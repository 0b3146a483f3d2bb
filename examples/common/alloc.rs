//! The examples' global allocator: mimalloc, a caching allocator, unless the environment sets
//! `MODULA_ALLOCATOR=system` (the platform's malloc, to measure the difference).
//!
//! glibc's malloc serves every buffer above its mmap threshold with a fresh mapping and unmaps
//! it on free, so each forward pass page-faults its multi-megabyte activations in again;
//! mimalloc keeps freed pages for the next buffer. The choice is read once, at the first
//! allocation (with `getenv`, which does not allocate), and never changes, so every buffer is
//! freed by the allocator that made it.

use std::alloc::{GlobalAlloc, Layout, System};
use std::ffi::{CStr, c_char};
use std::sync::atomic::{AtomicU8, Ordering};

/// mimalloc, or the system allocator under `MODULA_ALLOCATOR=system`.
pub struct ExampleAlloc;

#[global_allocator]
static GLOBAL: ExampleAlloc = ExampleAlloc;

/// 0: not read yet, 1: mimalloc, 2: system.
static CHOICE: AtomicU8 = AtomicU8::new(0);

unsafe extern "C" {
    fn getenv(name: *const c_char) -> *const c_char;
}

fn system() -> bool {
    match CHOICE.load(Ordering::Relaxed) {
        1 => false,
        2 => true,
        _ => {
            // SAFETY: a NUL-terminated name; getenv returns NULL or a NUL-terminated value.
            let v = unsafe { getenv(c"MODULA_ALLOCATOR".as_ptr()) };
            let sys = !v.is_null() && unsafe { CStr::from_ptr(v) }.to_bytes() == b"system";
            CHOICE.store(if sys { 2 } else { 1 }, Ordering::Relaxed);
            sys
        }
    }
}

/// The allocator in use: `"mimalloc"` or `"system"`.
#[allow(dead_code)]
pub fn name() -> &'static str {
    if system() { "system" } else { "mimalloc" }
}

// SAFETY: every call goes to one of two allocators, the same one for the whole run.
unsafe impl GlobalAlloc for ExampleAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded.
        unsafe {
            if system() {
                System.alloc(layout)
            } else {
                mimalloc::MiMalloc.alloc(layout)
            }
        }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded.
        unsafe {
            if system() {
                System.alloc_zeroed(layout)
            } else {
                mimalloc::MiMalloc.alloc_zeroed(layout)
            }
        }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: forwarded to the allocator that made `ptr`.
        unsafe {
            if system() {
                System.dealloc(ptr, layout)
            } else {
                mimalloc::MiMalloc.dealloc(ptr, layout)
            }
        }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: forwarded to the allocator that made `ptr`.
        unsafe {
            if system() {
                System.realloc(ptr, layout, new_size)
            } else {
                mimalloc::MiMalloc.realloc(ptr, layout, new_size)
            }
        }
    }
}
