//! A fixed-size, NUL-terminated text buffer for kernel messages.
//!
//! Why not `alloc::format!`: the panic handler and the log paths must work when `malloc(9)` fails
//! or must not be called (with a mutex held the global allocator cannot sleep, and a panic may
//! come from the allocator itself). Formatting into a stack buffer has no such dependency. The
//! text is passed to the kernel as the argument of a `"%s"` format, so a `%` in it is harmless.

use core::ffi::{c_char, CStr};
use core::fmt;

/// Up to `N - 1` bytes of text and a terminating NUL. Longer text is cut and ends in `...`.
pub struct StackCStr<const N: usize> {
    buf: [u8; N],
    len: usize,
    truncated: bool,
}

impl<const N: usize> StackCStr<N> {
    const MIN: () = assert!(N >= 8, "StackCStr needs room for the truncation marker");

    /// An empty string.
    pub const fn new() -> Self {
        #[allow(clippy::let_unit_value)]
        let () = Self::MIN;
        Self { buf: [0; N], len: 0, truncated: false }
    }

    /// Formats `args` into a new buffer, truncating if needed. Never fails, never allocates.
    pub fn format(args: fmt::Arguments<'_>) -> Self {
        let mut s = Self::new();
        // Our `write_str` never returns an error; a `Display` impl that does just stops early.
        let _ = fmt::write(&mut s, args);
        s
    }

    /// The text, without the NUL.
    pub fn as_bytes(&self) -> &[u8] {
        &self.buf[..self.len]
    }

    /// True when the text did not fit.
    pub fn truncated(&self) -> bool {
        self.truncated
    }

    /// The text as a C string (interior NULs were replaced when written).
    pub fn as_cstr(&self) -> &CStr {
        // The byte at `len` is always 0 (`len <= N - 1` and the buffer starts zeroed and is
        // re-terminated on every write), and no byte before it is 0.
        match CStr::from_bytes_until_nul(&self.buf[..=self.len]) {
            Ok(s) => s,
            Err(_) => c"",
        }
    }

    /// Pointer for a `"%s"` argument; valid while `self` is.
    pub fn as_ptr(&self) -> *const c_char {
        self.as_cstr().as_ptr()
    }
}

impl<const N: usize> Default for StackCStr<N> {
    fn default() -> Self {
        Self::new()
    }
}

impl<const N: usize> fmt::Write for StackCStr<N> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        if self.truncated {
            return Ok(());
        }
        let room = N - 1 - self.len;
        let take = s.len().min(room);
        for (dst, &b) in self.buf[self.len..self.len + take].iter_mut().zip(s.as_bytes()) {
            *dst = if b == 0 { b'?' } else { b };
        }
        self.len += take;
        if take < s.len() {
            self.truncated = true;
            self.buf[N - 4..N - 1].copy_from_slice(b"...");
            self.len = N - 1;
        }
        self.buf[self.len] = 0;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::StackCStr;

    #[test]
    fn short_text_is_kept_and_terminated() {
        let s = StackCStr::<16>::format(format_args!("nvme{}", 0));
        assert_eq!(s.as_bytes(), b"nvme0");
        assert_eq!(s.as_cstr().to_bytes(), b"nvme0");
        assert!(!s.truncated());
    }

    #[test]
    fn long_text_is_cut_with_marker() {
        let s = StackCStr::<8>::format(format_args!("{}", "0123456789"));
        assert_eq!(s.as_bytes(), b"0123...");
        assert_eq!(s.as_bytes().len(), 7);
        assert!(s.truncated());
    }

    #[test]
    fn exact_fit_is_not_truncated() {
        let s = StackCStr::<8>::format(format_args!("{}", "0123456"));
        assert_eq!(s.as_bytes(), b"0123456");
        assert!(!s.truncated());
    }

    #[test]
    fn interior_nul_cannot_cut_the_string() {
        let s = StackCStr::<16>::format(format_args!("a{}b", '\0'));
        assert_eq!(s.as_cstr().to_bytes(), b"a?b");
    }

    #[test]
    fn percent_is_plain_text() {
        // The buffer is passed as the argument of "%s", never as a format.
        let s = StackCStr::<16>::format(format_args!("100%s"));
        assert_eq!(s.as_bytes(), b"100%s");
    }
}
