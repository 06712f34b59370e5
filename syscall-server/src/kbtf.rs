//! The kernel's BTF as a BTF object loaders can walk to.
//!
//! bpftrace 0.17 finds the kernel's types by walking BTF objects (`BPF_BTF_GET_NEXT_ID`,
//! `BPF_BTF_GET_FD_BY_ID`, `BPF_OBJ_GET_INFO_BY_FD` with a name buffer) until it meets the one
//! named `vmlinux` with `kernel_btf` set, then reads its data through `OBJ_GET_INFO_BY_FD`
//! (`btf__load_from_kernel_by_id`). Without it, tracepoint formats naming kernel types
//! (`umode_t`, `s64`) do not compile. We announce one such object, [`VMLINUX_BTF_ID`], after
//! the store's BTF objects: its fd is a real read-only fd of `/sys/kernel/btf/vmlinux` (world
//! readable), recognised by its (device, inode); its info is that file's size and bytes.

use crate::Errno;
use crate::sys::{self, read_user, write_user};
use crate::uapi::bpf_btf_info;
use std::io::Read as _;
use std::os::fd::{IntoRawFd as _, RawFd};
use zerocopy::{FromBytes as _, IntoBytes as _};

/// The id of the kernel's BTF object: above every store object id.
pub const VMLINUX_BTF_ID: u32 = bpftime_maps::store::OBJECT_SLOTS + 1;
const VMLINUX: &str = "/sys/kernel/btf/vmlinux";

/// `BPF_BTF_GET_NEXT_ID` after the store had none above `start_id`: the kernel's BTF if it is
/// above `start_id` and readable.
pub fn next_id(start_id: u32) -> Option<u32> {
    (start_id < VMLINUX_BTF_ID && std::path::Path::new(VMLINUX).exists()).then_some(VMLINUX_BTF_ID)
}

/// `BPF_BTF_GET_FD_BY_ID(VMLINUX_BTF_ID)`: a read-only fd of the kernel's BTF file.
pub fn open_fd() -> Result<i64, Errno> {
    let fd = sys::open_rdonly(VMLINUX)?;
    Ok(i64::from(fd.into_raw_fd()))
}

fn vmlinux_identity() -> Option<(u64, u64)> {
    let m = std::fs::metadata(VMLINUX).ok()?;
    Some((
        std::os::unix::fs::MetadataExt::dev(&m),
        std::os::unix::fs::MetadataExt::ino(&m),
    ))
}

/// Whether `fd` is an fd of the kernel's BTF file.
pub fn is_vmlinux_fd(fd: RawFd) -> bool {
    fd >= 0 && sys::fd_identity(fd).is_some_and(|id| Some(id) == vmlinux_identity())
}

/// `BPF_OBJ_GET_INFO_BY_FD` on such an fd: `bpf_btf_info` with the data (up to `btf_size`),
/// the name `vmlinux` (up to `name_len`) and `kernel_btf` = 1; the info length written.
pub fn info(uinfo: u64, info_len: u32) -> Result<u32, Errno> {
    let known = size_of::<bpf_btf_info>();
    let len = (info_len as usize).min(known);
    let raw = read_user(uinfo, len)?;
    let mut buf = vec![0u8; known];
    buf[..len].copy_from_slice(&raw);
    let mut info = bpf_btf_info::read_from_bytes(&buf).map_err(|_| Errno(libc::EINVAL))?;
    let mut data = Vec::new();
    let mut f =
        std::fs::File::open(VMLINUX).map_err(|e| Errno(e.raw_os_error().unwrap_or(libc::EIO)))?;
    f.read_to_end(&mut data)
        .map_err(|e| Errno(e.raw_os_error().unwrap_or(libc::EIO)))?;
    let copy = (info.btf_size as usize).min(data.len());
    if copy > 0 {
        write_user(info.btf, &data[..copy])?;
    }
    info.btf_size = data.len() as u32;
    info.id = VMLINUX_BTF_ID;
    info.kernel_btf = 1;
    if (info.name == 0) != (info.name_len == 0) {
        return Err(Errno(libc::EINVAL));
    }
    if info.name != 0 {
        // bpf_btf_get_info_by_fd(): the name, cut to name_len - 1 and NUL-terminated, ENOSPC
        // when cut.
        let name = b"vmlinux\0";
        let n = (info.name_len as usize).min(name.len());
        let mut out = name[..n].to_vec();
        if let Some(last) = out.last_mut() {
            *last = 0;
        }
        write_user(info.name, &out)?;
        if n < name.len() {
            return Err(Errno(libc::ENOSPC));
        }
    }
    info.name_len = 7;
    write_user(uinfo, &info.as_bytes()[..len])?;
    Ok(len as u32)
}
