//! Buffers that end where an unmapped page begins, for the tests that reads and writes (and
//! prefetch hints) stay inside their slices. Unix only: `#[cfg(unix)] mod unmapped;`.

/// `len` values that end where an unmapped page begins: a read or write past them faults.
pub struct BeforeUnmappedPage<T> {
    mapping: *mut libc::c_void,
    mapping_len: usize,
    values: *mut T,
    len: usize,
}

impl<T: Copy> BeforeUnmappedPage<T> {
    pub fn new(len: usize, fill: T) -> Self {
        // SAFETY: sysconf has no preconditions.
        let page = usize::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).expect("page size");
        let bytes = len * std::mem::size_of::<T>();
        let readable = bytes.div_ceil(page) * page;
        let mapping_len = readable + page;
        // SAFETY: a fresh anonymous mapping; the last page is then made inaccessible, and the
        // values are placed to end where it begins (page-aligned, so aligned for T).
        unsafe {
            let prot = libc::PROT_READ | libc::PROT_WRITE;
            let flags = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS;
            let mapping = libc::mmap(std::ptr::null_mut(), mapping_len, prot, flags, -1, 0);
            assert_ne!(mapping, libc::MAP_FAILED, "mmap");
            let guard = mapping.cast::<u8>().add(readable);
            assert_eq!(libc::mprotect(guard.cast(), page, libc::PROT_NONE), 0, "mprotect");
            let values = guard.sub(bytes).cast::<T>();
            for i in 0..len {
                values.add(i).write(fill);
            }
            Self { mapping, mapping_len, values, len }
        }
    }

    pub fn slice(&mut self) -> &mut [T] {
        // SAFETY: `len` initialised values, borrowed through `self`.
        unsafe { std::slice::from_raw_parts_mut(self.values, self.len) }
    }
}

impl<T> Drop for BeforeUnmappedPage<T> {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `new`, no slice of it outlives `self`.
        unsafe { libc::munmap(self.mapping, self.mapping_len) };
    }
}
