//! Kernel ABI, with the kernel's names: the parts of `union bpf_attr`, the `bpf_*_info`
//! structures and `struct perf_event_attr` that the emulation reads or writes.
//!
//! Sources: `include/uapi/linux/bpf.h` and `include/uapi/linux/perf_event.h` of Linux 6.18.
//! Each anonymous struct of `union bpf_attr` is its own `#[repr(C)]` type starting at offset 0
//! of the union; explicit `_pad` fields stand where C inserts padding, so every type is
//! `IntoBytes` without hidden bytes. Sizes are asserted below; the `*_LAST_END` constants are
//! `offsetofend(union bpf_attr, <CMD>_LAST_FIELD)`, the start of the bytes `CHECK_ATTR(CMD)`
//! requires to be zero.
#![allow(non_camel_case_types, missing_docs)]

use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

/// `sizeof(union bpf_attr)` in Linux 6.18 (ends with `BPF_PROG_LOAD`'s `keyring_id`).
pub const BPF_ATTR_SIZE: usize = 168;
/// `BPF_OBJ_NAME_LEN`.
pub const BPF_OBJ_NAME_LEN: usize = 16;
/// `BPF_TAG_SIZE`.
pub const BPF_TAG_SIZE: usize = 8;
/// The kernel's `ENOTSUPP` (524), which leaks to user space from some bpf paths.
pub const ENOTSUPP: i32 = 524;

// enum bpf_cmd
pub const BPF_MAP_CREATE: i32 = 0;
pub const BPF_MAP_LOOKUP_ELEM: i32 = 1;
pub const BPF_MAP_UPDATE_ELEM: i32 = 2;
pub const BPF_MAP_DELETE_ELEM: i32 = 3;
pub const BPF_MAP_GET_NEXT_KEY: i32 = 4;
pub const BPF_PROG_LOAD: i32 = 5;
pub const BPF_OBJ_PIN: i32 = 6;
pub const BPF_OBJ_GET: i32 = 7;
pub const BPF_PROG_ATTACH: i32 = 8;
pub const BPF_PROG_DETACH: i32 = 9;
pub const BPF_PROG_TEST_RUN: i32 = 10;
pub const BPF_PROG_GET_NEXT_ID: i32 = 11;
pub const BPF_MAP_GET_NEXT_ID: i32 = 12;
pub const BPF_PROG_GET_FD_BY_ID: i32 = 13;
pub const BPF_MAP_GET_FD_BY_ID: i32 = 14;
pub const BPF_OBJ_GET_INFO_BY_FD: i32 = 15;
pub const BPF_PROG_QUERY: i32 = 16;
pub const BPF_RAW_TRACEPOINT_OPEN: i32 = 17;
pub const BPF_BTF_LOAD: i32 = 18;
pub const BPF_BTF_GET_FD_BY_ID: i32 = 19;
pub const BPF_TASK_FD_QUERY: i32 = 20;
pub const BPF_MAP_LOOKUP_AND_DELETE_ELEM: i32 = 21;
pub const BPF_MAP_FREEZE: i32 = 22;
pub const BPF_BTF_GET_NEXT_ID: i32 = 23;
pub const BPF_MAP_LOOKUP_BATCH: i32 = 24;
pub const BPF_MAP_LOOKUP_AND_DELETE_BATCH: i32 = 25;
pub const BPF_MAP_UPDATE_BATCH: i32 = 26;
pub const BPF_MAP_DELETE_BATCH: i32 = 27;
pub const BPF_LINK_CREATE: i32 = 28;
pub const BPF_LINK_UPDATE: i32 = 29;
pub const BPF_LINK_GET_FD_BY_ID: i32 = 30;
pub const BPF_LINK_GET_NEXT_ID: i32 = 31;
pub const BPF_ENABLE_STATS: i32 = 32;
pub const BPF_ITER_CREATE: i32 = 33;
pub const BPF_LINK_DETACH: i32 = 34;
pub const BPF_PROG_BIND_MAP: i32 = 35;
pub const BPF_TOKEN_CREATE: i32 = 36;
pub const BPF_PROG_STREAM_READ_BY_FD: i32 = 37;

/// The kernel's name of a `bpf()` command, for logs.
pub fn cmd_name(cmd: i32) -> &'static str {
    const NAMES: [&str; 38] = [
        "BPF_MAP_CREATE",
        "BPF_MAP_LOOKUP_ELEM",
        "BPF_MAP_UPDATE_ELEM",
        "BPF_MAP_DELETE_ELEM",
        "BPF_MAP_GET_NEXT_KEY",
        "BPF_PROG_LOAD",
        "BPF_OBJ_PIN",
        "BPF_OBJ_GET",
        "BPF_PROG_ATTACH",
        "BPF_PROG_DETACH",
        "BPF_PROG_TEST_RUN",
        "BPF_PROG_GET_NEXT_ID",
        "BPF_MAP_GET_NEXT_ID",
        "BPF_PROG_GET_FD_BY_ID",
        "BPF_MAP_GET_FD_BY_ID",
        "BPF_OBJ_GET_INFO_BY_FD",
        "BPF_PROG_QUERY",
        "BPF_RAW_TRACEPOINT_OPEN",
        "BPF_BTF_LOAD",
        "BPF_BTF_GET_FD_BY_ID",
        "BPF_TASK_FD_QUERY",
        "BPF_MAP_LOOKUP_AND_DELETE_ELEM",
        "BPF_MAP_FREEZE",
        "BPF_BTF_GET_NEXT_ID",
        "BPF_MAP_LOOKUP_BATCH",
        "BPF_MAP_LOOKUP_AND_DELETE_BATCH",
        "BPF_MAP_UPDATE_BATCH",
        "BPF_MAP_DELETE_BATCH",
        "BPF_LINK_CREATE",
        "BPF_LINK_UPDATE",
        "BPF_LINK_GET_FD_BY_ID",
        "BPF_LINK_GET_NEXT_ID",
        "BPF_ENABLE_STATS",
        "BPF_ITER_CREATE",
        "BPF_LINK_DETACH",
        "BPF_PROG_BIND_MAP",
        "BPF_TOKEN_CREATE",
        "BPF_PROG_STREAM_READ_BY_FD",
    ];
    usize::try_from(cmd)
        .ok()
        .and_then(|i| NAMES.get(i))
        .copied()
        .unwrap_or("BPF_UNKNOWN")
}

// enum bpf_map_type (the ones named in logs and checks)
pub const BPF_MAP_TYPE_HASH: u32 = 1;
pub const BPF_MAP_TYPE_ARRAY: u32 = 2;

// enum bpf_prog_type
pub const BPF_PROG_TYPE_UNSPEC: u32 = 0;
pub const BPF_PROG_TYPE_SOCKET_FILTER: u32 = 1;
pub const BPF_PROG_TYPE_KPROBE: u32 = 2;
pub const BPF_PROG_TYPE_TRACEPOINT: u32 = 5;
pub const BPF_PROG_TYPE_PERF_EVENT: u32 = 7;
/// `__MAX_BPF_PROG_TYPE` (one past `BPF_PROG_TYPE_NETFILTER`).
pub const __MAX_BPF_PROG_TYPE: u32 = 33;

// enum bpf_attach_type
pub const BPF_PERF_EVENT: u32 = 41;
pub const BPF_TRACE_KPROBE_MULTI: u32 = 42;
pub const BPF_TRACE_UPROBE_MULTI: u32 = 48;

// enum bpf_link_type
pub const BPF_LINK_TYPE_PERF_EVENT: u32 = 7;

// enum bpf_perf_event_type
pub const BPF_PERF_EVENT_UPROBE: u32 = 1;
pub const BPF_PERF_EVENT_URETPROBE: u32 = 2;

// BPF_MAP_CREATE flags
pub const BPF_F_NO_PREALLOC: u32 = 1 << 0;
pub const BPF_F_NO_COMMON_LRU: u32 = 1 << 1;
pub const BPF_F_NUMA_NODE: u32 = 1 << 2;
pub const BPF_F_RDONLY: u32 = 1 << 3;
pub const BPF_F_WRONLY: u32 = 1 << 4;
pub const BPF_F_ZERO_SEED: u32 = 1 << 6;
pub const BPF_F_RDONLY_PROG: u32 = 1 << 7;
pub const BPF_F_WRONLY_PROG: u32 = 1 << 8;
pub const BPF_F_MMAPABLE: u32 = 1 << 10;
pub const BPF_F_PRESERVE_ELEMS: u32 = 1 << 11;
pub const BPF_F_INNER_MAP: u32 = 1 << 12;
pub const BPF_F_TOKEN_FD: u32 = 1 << 16;
/// `BPF_F_ACCESS_MASK`.
pub const BPF_F_ACCESS_MASK: u32 =
    BPF_F_RDONLY | BPF_F_RDONLY_PROG | BPF_F_WRONLY | BPF_F_WRONLY_PROG;

// BPF_MAP_*_ELEM flags
pub const BPF_F_LOCK: u64 = 4;

// BPF_PROG_LOAD prog_flags
pub const BPF_F_STRICT_ALIGNMENT: u32 = 1 << 0;
pub const BPF_F_ANY_ALIGNMENT: u32 = 1 << 1;
pub const BPF_F_TEST_RND_HI32: u32 = 1 << 2;
pub const BPF_F_TEST_STATE_FREQ: u32 = 1 << 3;
pub const BPF_F_SLEEPABLE: u32 = 1 << 4;
pub const BPF_F_XDP_HAS_FRAGS: u32 = 1 << 5;
pub const BPF_F_XDP_DEV_BOUND_ONLY: u32 = 1 << 6;
pub const BPF_F_TEST_REG_INVARIANTS: u32 = 1 << 7;

// Verifier log levels (`BPF_LOG_MASK`).
pub const BPF_LOG_LEVEL1: u32 = 1;
pub const BPF_LOG_LEVEL2: u32 = 2;
pub const BPF_LOG_STATS: u32 = 4;
pub const BPF_LOG_FIXED: u32 = 8;
pub const BPF_LOG_MASK: u32 = BPF_LOG_LEVEL1 | BPF_LOG_LEVEL2 | BPF_LOG_STATS | BPF_LOG_FIXED;

/// `BTF_MAGIC`.
pub const BTF_MAGIC: u16 = 0xEB9F;
/// `BTF_MAX_SIZE` (16 MiB).
pub const BTF_MAX_SIZE: u32 = 16 * 1024 * 1024;

/// `BPF_MAP_CREATE`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct bpf_attr_map_create {
    pub map_type: u32,
    pub key_size: u32,
    pub value_size: u32,
    pub max_entries: u32,
    pub map_flags: u32,
    pub inner_map_fd: u32,
    pub numa_node: u32,
    pub map_name: [u8; BPF_OBJ_NAME_LEN],
    pub map_ifindex: u32,
    pub btf_fd: u32,
    pub btf_key_type_id: u32,
    pub btf_value_type_id: u32,
    pub btf_vmlinux_value_type_id: u32,
    pub map_extra: u64,
    pub value_type_btf_obj_fd: i32,
    pub map_token_fd: i32,
    pub excl_prog_hash: u64,
    pub excl_prog_hash_size: u32,
    pub _pad: u32,
}
pub const BPF_MAP_CREATE_LAST_END: usize = 92;

/// `BPF_MAP_*_ELEM`, `BPF_MAP_GET_NEXT_KEY`, `BPF_MAP_FREEZE`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct bpf_attr_map_elem {
    pub map_fd: u32,
    pub _pad: u32,
    pub key: u64,
    /// `value` or `next_key`.
    pub value: u64,
    pub flags: u64,
}
pub const BPF_MAP_ELEM_LAST_END: usize = 32;
pub const BPF_MAP_GET_NEXT_KEY_LAST_END: usize = 24;
/// `BPF_MAP_DELETE_ELEM_LAST_FIELD` is `key`: a value or flags is `EINVAL`.
pub const BPF_MAP_DELETE_ELEM_LAST_END: usize = 16;
pub const BPF_MAP_FREEZE_LAST_END: usize = 4;

/// `BPF_MAP_*_BATCH`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct bpf_attr_map_batch {
    /// Start cursor (NULL: from the beginning).
    pub in_batch: u64,
    /// Out: the next cursor.
    pub out_batch: u64,
    pub keys: u64,
    pub values: u64,
    /// In: elements room; out: elements done.
    pub count: u32,
    pub map_fd: u32,
    pub elem_flags: u64,
    pub flags: u64,
}
/// `offsetofend(union bpf_attr, batch.flags)`.
pub const BPF_MAP_BATCH_LAST_END: usize = 56;
/// `offsetof(union bpf_attr, batch.count)`.
pub const BPF_MAP_BATCH_COUNT_OFF: usize = 32;

/// `BPF_PROG_LOAD`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct bpf_attr_prog_load {
    pub prog_type: u32,
    pub insn_cnt: u32,
    pub insns: u64,
    pub license: u64,
    pub log_level: u32,
    pub log_size: u32,
    pub log_buf: u64,
    pub kern_version: u32,
    pub prog_flags: u32,
    pub prog_name: [u8; BPF_OBJ_NAME_LEN],
    pub prog_ifindex: u32,
    pub expected_attach_type: u32,
    pub prog_btf_fd: u32,
    pub func_info_rec_size: u32,
    pub func_info: u64,
    pub func_info_cnt: u32,
    pub line_info_rec_size: u32,
    pub line_info: u64,
    pub line_info_cnt: u32,
    pub attach_btf_id: u32,
    /// `attach_prog_fd` or `attach_btf_obj_fd`.
    pub attach_prog_fd: u32,
    pub core_relo_cnt: u32,
    pub fd_array: u64,
    pub core_relos: u64,
    pub core_relo_rec_size: u32,
    pub log_true_size: u32,
    pub prog_token_fd: i32,
    pub fd_array_cnt: u32,
    pub signature: u64,
    pub signature_size: u32,
    pub keyring_id: i32,
}
pub const BPF_PROG_LOAD_LAST_END: usize = 168;
/// `offsetof(union bpf_attr, log_true_size)` for `BPF_PROG_LOAD`.
pub const PROG_LOAD_LOG_TRUE_SIZE_OFF: usize = 140;

/// `BPF_OBJ_GET_INFO_BY_FD` (`attr.info`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct bpf_attr_info {
    pub bpf_fd: u32,
    pub info_len: u32,
    pub info: u64,
}
pub const BPF_OBJ_GET_INFO_BY_FD_LAST_END: usize = 16;

/// `BPF_*_GET_NEXT_ID` and `BPF_*_GET_FD_BY_ID`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct bpf_attr_get_id {
    /// `start_id`, `prog_id`, `map_id`, `btf_id` or `link_id`.
    pub start_id: u32,
    pub next_id: u32,
    pub open_flags: u32,
    pub fd_by_id_token_fd: i32,
}
pub const BPF_GET_NEXT_ID_LAST_END: usize = 8;
pub const BPF_GET_FD_BY_ID_LAST_END: usize = 16;

/// `BPF_BTF_LOAD`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct bpf_attr_btf_load {
    pub btf: u64,
    pub btf_log_buf: u64,
    pub btf_size: u32,
    pub btf_log_size: u32,
    pub btf_log_level: u32,
    pub btf_log_true_size: u32,
    pub btf_flags: u32,
    pub btf_token_fd: i32,
}
pub const BPF_BTF_LOAD_LAST_END: usize = 40;
/// `offsetof(union bpf_attr, btf_log_true_size)`.
pub const BTF_LOAD_LOG_TRUE_SIZE_OFF: usize = 28;

/// `BPF_LINK_CREATE` (`attr.link_create`), with the `perf_event` and `kprobe_multi` members
/// of its union spelled out; the union's remaining bytes are kept in `_rest`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct bpf_attr_link_create {
    pub prog_fd: u32,
    /// `target_fd` or `target_ifindex`.
    pub target_fd: u32,
    pub attach_type: u32,
    pub flags: u32,
    /// `perf_event.bpf_cookie` (and the first 8 bytes of the other union members).
    pub bpf_cookie: u64,
    pub _rest: [u64; 5],
}
/// `offsetofend(union bpf_attr, link_create.uprobe_multi.pid)`.
pub const BPF_LINK_CREATE_LAST_END: usize = 60;

/// `BPF_PROG_BIND_MAP`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct bpf_attr_prog_bind_map {
    pub prog_fd: u32,
    pub map_fd: u32,
    pub flags: u32,
}
pub const BPF_PROG_BIND_MAP_LAST_END: usize = 12;

/// `struct bpf_map_info` (the field the 6.1 uapi calls a pad is `btf_vmlinux_id`; the 6.18
/// `hash`/`hash_size` tail is not emulated, so a caller that sets it gets `E2BIG`, as from an
/// older kernel).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct bpf_map_info {
    pub type_: u32,
    pub id: u32,
    pub key_size: u32,
    pub value_size: u32,
    pub max_entries: u32,
    pub map_flags: u32,
    pub name: [u8; BPF_OBJ_NAME_LEN],
    pub ifindex: u32,
    pub btf_vmlinux_value_type_id: u32,
    pub netns_dev: u64,
    pub netns_ino: u64,
    pub btf_id: u32,
    pub btf_key_type_id: u32,
    pub btf_value_type_id: u32,
    pub btf_vmlinux_id: u32,
    pub map_extra: u64,
}

/// `struct bpf_prog_info`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct bpf_prog_info {
    pub type_: u32,
    pub id: u32,
    pub tag: [u8; BPF_TAG_SIZE],
    pub jited_prog_len: u32,
    pub xlated_prog_len: u32,
    pub jited_prog_insns: u64,
    pub xlated_prog_insns: u64,
    pub load_time: u64,
    pub created_by_uid: u32,
    pub nr_map_ids: u32,
    pub map_ids: u64,
    pub name: [u8; BPF_OBJ_NAME_LEN],
    pub ifindex: u32,
    /// Bit 0: `gpl_compatible`.
    pub gpl_compatible: u32,
    pub netns_dev: u64,
    pub netns_ino: u64,
    pub nr_jited_ksyms: u32,
    pub nr_jited_func_lens: u32,
    pub jited_ksyms: u64,
    pub jited_func_lens: u64,
    pub btf_id: u32,
    pub func_info_rec_size: u32,
    pub func_info: u64,
    pub nr_func_info: u32,
    pub nr_line_info: u32,
    pub line_info: u64,
    pub jited_line_info: u64,
    pub nr_jited_line_info: u32,
    pub line_info_rec_size: u32,
    pub jited_line_info_rec_size: u32,
    pub nr_prog_tags: u32,
    pub prog_tags: u64,
    pub run_time_ns: u64,
    pub run_cnt: u64,
    pub recursion_misses: u64,
    pub verified_insns: u32,
    pub attach_btf_obj_id: u32,
    pub attach_btf_id: u32,
    pub _pad: u32,
}

/// `struct bpf_btf_info`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct bpf_btf_info {
    pub btf: u64,
    pub btf_size: u32,
    pub id: u32,
    pub name: u64,
    pub name_len: u32,
    pub kernel_btf: u32,
}

/// `struct bpf_link_info` with its union's `perf_event.uprobe` member spelled out.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct bpf_link_info {
    pub type_: u32,
    pub id: u32,
    pub prog_id: u32,
    pub _pad: u32,
    /// `perf_event.type` (`enum bpf_perf_event_type`).
    pub perf_event_type: u32,
    pub _pad2: u32,
    /// `perf_event.uprobe.file_name` (in/out buffer pointer).
    pub file_name: u64,
    /// `perf_event.uprobe.name_len`.
    pub name_len: u32,
    /// `perf_event.uprobe.offset`.
    pub offset: u32,
    /// `perf_event.uprobe.cookie`.
    pub cookie: u64,
    /// `perf_event.uprobe.ref_ctr_offset`.
    pub ref_ctr_offset: u64,
    pub _rest: u64,
}

/// `struct perf_event_attr` (`PERF_ATTR_SIZE_VER8`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct perf_event_attr {
    pub type_: u32,
    pub size: u32,
    pub config: u64,
    pub sample_period: u64,
    pub sample_type: u64,
    pub read_format: u64,
    /// The bit field word: bit 0 `disabled`, bit 1 `inherit`, …
    pub flags: u64,
    pub wakeup_events: u32,
    pub bp_type: u32,
    /// `config1` / `bp_addr` / `kprobe_func` / `uprobe_path`.
    pub config1: u64,
    /// `config2` / `bp_len` / `kprobe_addr` / `probe_offset`.
    pub config2: u64,
    pub branch_sample_type: u64,
    pub sample_regs_user: u64,
    pub sample_stack_user: u32,
    pub clockid: i32,
    pub sample_regs_intr: u64,
    pub aux_watermark: u32,
    pub sample_max_stack: u16,
    pub __reserved_2: u16,
    pub aux_sample_size: u32,
    pub aux_action: u32,
    pub sig_data: u64,
    pub config3: u64,
}
/// `PERF_ATTR_SIZE_VER0`.
pub const PERF_ATTR_SIZE_VER0: u32 = 64;
/// `perf_event_attr.flags` bit `disabled`.
pub const PERF_ATTR_FLAG_DISABLED: u64 = 1;

// perf_event_open
pub const PERF_TYPE_HARDWARE: u32 = 0;
pub const PERF_TYPE_SOFTWARE: u32 = 1;
pub const PERF_TYPE_TRACEPOINT: u32 = 2;
pub const PERF_TYPE_HW_CACHE: u32 = 3;
pub const PERF_TYPE_RAW: u32 = 4;
pub const PERF_FLAG_FD_NO_GROUP: u64 = 1 << 0;
pub const PERF_FLAG_FD_OUTPUT: u64 = 1 << 1;
pub const PERF_FLAG_PID_CGROUP: u64 = 1 << 2;
pub const PERF_FLAG_FD_CLOEXEC: u64 = 1 << 3;

// perf ioctls (`_IO('$', n)` and friends)
pub const PERF_EVENT_IOC_ENABLE: u64 = 0x2400;
pub const PERF_EVENT_IOC_DISABLE: u64 = 0x2401;
pub const PERF_EVENT_IOC_REFRESH: u64 = 0x2402;
pub const PERF_EVENT_IOC_RESET: u64 = 0x2403;
pub const PERF_EVENT_IOC_PERIOD: u64 = 0x4008_2404;
pub const PERF_EVENT_IOC_SET_OUTPUT: u64 = 0x2405;
pub const PERF_EVENT_IOC_SET_FILTER: u64 = 0x4008_2406;
pub const PERF_EVENT_IOC_ID: u64 = 0x8008_2407;
pub const PERF_EVENT_IOC_SET_BPF: u64 = 0x4004_2408;
pub const PERF_EVENT_IOC_PAUSE_OUTPUT: u64 = 0x4004_2409;
pub const PERF_EVENT_IOC_QUERY_BPF: u64 = 0xc008_240a;
pub const PERF_EVENT_IOC_MODIFY_ATTRIBUTES: u64 = 0x4008_240b;

const _: () = {
    use core::mem::size_of;
    assert!(size_of::<bpf_attr_map_create>() == 96);
    assert!(size_of::<bpf_attr_map_elem>() == 32);
    assert!(size_of::<bpf_attr_map_batch>() == BPF_MAP_BATCH_LAST_END);
    assert!(std::mem::offset_of!(bpf_attr_map_batch, count) == BPF_MAP_BATCH_COUNT_OFF);
    assert!(size_of::<bpf_attr_prog_load>() == BPF_ATTR_SIZE);
    assert!(size_of::<bpf_attr_info>() == 16);
    assert!(size_of::<bpf_attr_get_id>() == 16);
    assert!(size_of::<bpf_attr_btf_load>() == 40);
    assert!(size_of::<bpf_attr_link_create>() == 64);
    assert!(size_of::<bpf_attr_prog_bind_map>() == 12);
    assert!(size_of::<bpf_map_info>() == 88);
    assert!(size_of::<bpf_prog_info>() == 232);
    assert!(size_of::<bpf_btf_info>() == 32);
    assert!(size_of::<bpf_link_info>() == 64);
    assert!(size_of::<perf_event_attr>() == 136);
    assert!(
        core::mem::offset_of!(bpf_attr_prog_load, log_true_size) == PROG_LOAD_LOG_TRUE_SIZE_OFF
    );
    assert!(core::mem::offset_of!(bpf_attr_prog_load, fd_array) == 120);
    assert!(core::mem::offset_of!(bpf_attr_prog_load, prog_name) == 48);
    assert!(core::mem::offset_of!(bpf_attr_map_create, map_extra) == 64);
    assert!(
        core::mem::offset_of!(bpf_attr_map_create, excl_prog_hash_size) + 4
            == BPF_MAP_CREATE_LAST_END
    );
    assert!(
        core::mem::offset_of!(bpf_attr_btf_load, btf_log_true_size) == BTF_LOAD_LOG_TRUE_SIZE_OFF
    );
    assert!(core::mem::offset_of!(perf_event_attr, config1) == 56);
    assert!(core::mem::offset_of!(perf_event_attr, config2) == 64);
    assert!(core::mem::offset_of!(bpf_prog_info, map_ids) == 56);
    assert!(core::mem::offset_of!(bpf_prog_info, name) == 64);
    assert!(core::mem::offset_of!(bpf_prog_info, verified_insns) == 216);
};
