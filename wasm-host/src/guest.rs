//! Guest memory: every pointer and length a guest passes is checked here before the host
//! touches it. Guest pointers are 32-bit offsets into the guest's linear memory (a byte
//! slice); an access is allowed only if `[ptr, ptr + len)` lies inside the slice, so a
//! guest can at worst make its own call fail with `EFAULT`.

use crate::error::{HostError, Result};

/// A guest pointer as the host sees it (wasm32 pointers are unsigned).
pub fn addr(ptr: i32) -> usize {
    ptr as u32 as usize
}

/// `len` bytes at `ptr`.
pub fn bytes<'m>(mem: &'m [u8], ptr: i32, len: usize, what: &'static str) -> Result<&'m [u8]> {
    let start = addr(ptr);
    let end = start.checked_add(len).ok_or(HostError::Fault { what })?;
    mem.get(start..end).ok_or(HostError::Fault { what })
}

/// `len` writable bytes at `ptr`.
pub fn bytes_mut<'m>(
    mem: &'m mut [u8],
    ptr: i32,
    len: usize,
    what: &'static str,
) -> Result<&'m mut [u8]> {
    let start = addr(ptr);
    let end = start.checked_add(len).ok_or(HostError::Fault { what })?;
    mem.get_mut(start..end).ok_or(HostError::Fault { what })
}

/// A non-negative length argument.
pub fn len(len: i32, what: &'static str) -> Result<usize> {
    usize::try_from(len).map_err(|_| HostError::invalid(format!("negative {what} ({len})")))
}

/// The NUL-terminated UTF-8 string at `ptr`, at most `max` bytes before the NUL. A null
/// pointer, or a string running off the end of memory, is `EFAULT`; a longer string, or one
/// that is not UTF-8, `EINVAL`.
pub fn cstr<'m>(mem: &'m [u8], ptr: i32, max: usize, what: &'static str) -> Result<&'m str> {
    if ptr == 0 {
        return Err(HostError::Fault { what });
    }
    let start = addr(ptr);
    let rest = mem.get(start..).ok_or(HostError::Fault { what })?;
    let window = &rest[..rest.len().min(max + 1)];
    let n = window.iter().position(|&b| b == 0).ok_or_else(|| {
        if window.len() > max {
            HostError::invalid(format!("{what} longer than {max} bytes"))
        } else {
            HostError::Fault { what }
        }
    })?;
    std::str::from_utf8(&window[..n])
        .map_err(|_| HostError::invalid(format!("{what} is not UTF-8")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounds() {
        let mem = [1u8, 2, 3, 4];
        assert_eq!(bytes(&mem, 1, 3, "x").unwrap(), &[2, 3, 4]);
        assert_eq!(bytes(&mem, 4, 0, "x").unwrap(), &[] as &[u8]);
        assert!(bytes(&mem, 2, 3, "x").is_err());
        assert!(bytes(&mem, 5, 0, "x").is_err());
        assert!(bytes(&mem, -1, 1, "x").is_err());
        assert!(bytes(&mem, 1, usize::MAX, "x").is_err());
        let mut m = mem;
        assert!(bytes_mut(&mut m, 3, 2, "x").is_err());
        assert!(len(-1, "x").is_err());
    }

    #[test]
    fn strings() {
        let mem = b"\0abc\0xyz";
        assert_eq!(cstr(mem, 1, 16, "s").unwrap(), "abc");
        assert_eq!(cstr(mem, 4, 16, "s").unwrap(), "");
        assert_eq!(cstr(mem, 0, 16, "s").unwrap_err().errno(), libc::EFAULT);
        // Runs off the end without a NUL.
        assert_eq!(cstr(mem, 5, 16, "s").unwrap_err().errno(), libc::EFAULT);
        assert_eq!(cstr(mem, 100, 16, "s").unwrap_err().errno(), libc::EFAULT);
        // Too long.
        assert_eq!(cstr(mem, 1, 2, "s").unwrap_err().errno(), libc::EINVAL);
        assert_eq!(
            cstr(b"\0\xff\0", 1, 8, "s").unwrap_err().errno(),
            libc::EINVAL
        );
    }
}
