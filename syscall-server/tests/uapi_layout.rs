//! Our kernel structures against the system's `<linux/bpf.h>` and `<linux/perf_event.h>`:
//! every field the installed headers know must sit at the same offset (the headers may be
//! older than the 6.18 layouts we define; fields they lack are checked by the size asserts in
//! `uapi.rs`).
//!
//! Needs `cc` and the Linux uapi headers; skipped without them unless `CI=true`.

use bpftime_syscall_server::uapi::*;
use std::mem::{offset_of, size_of};
use std::process::Command;

fn ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true")
}

#[test]
fn layouts_match_the_installed_uapi_headers() {
    let have_cc = Command::new("sh")
        .args(["-c", "command -v cc"])
        .output()
        .is_ok_and(|o| o.status.success());
    let have_hdr = std::path::Path::new("/usr/include/linux/bpf.h").exists();
    if !have_cc || !have_hdr {
        assert!(
            !ci(),
            "cc and /usr/include/linux/bpf.h are required under CI=true"
        );
        eprintln!("skipped: no cc or uapi headers");
        return;
    }
    let checks: Vec<(&str, usize)> = vec![
        (
            "offsetof(union bpf_attr, map_type)",
            offset_of!(bpf_attr_map_create, map_type),
        ),
        (
            "offsetof(union bpf_attr, key_size)",
            offset_of!(bpf_attr_map_create, key_size),
        ),
        (
            "offsetof(union bpf_attr, value_size)",
            offset_of!(bpf_attr_map_create, value_size),
        ),
        (
            "offsetof(union bpf_attr, max_entries)",
            offset_of!(bpf_attr_map_create, max_entries),
        ),
        (
            "offsetof(union bpf_attr, map_flags)",
            offset_of!(bpf_attr_map_create, map_flags),
        ),
        (
            "offsetof(union bpf_attr, inner_map_fd)",
            offset_of!(bpf_attr_map_create, inner_map_fd),
        ),
        (
            "offsetof(union bpf_attr, numa_node)",
            offset_of!(bpf_attr_map_create, numa_node),
        ),
        (
            "offsetof(union bpf_attr, map_name)",
            offset_of!(bpf_attr_map_create, map_name),
        ),
        (
            "offsetof(union bpf_attr, map_ifindex)",
            offset_of!(bpf_attr_map_create, map_ifindex),
        ),
        (
            "offsetof(union bpf_attr, btf_fd)",
            offset_of!(bpf_attr_map_create, btf_fd),
        ),
        (
            "offsetof(union bpf_attr, btf_key_type_id)",
            offset_of!(bpf_attr_map_create, btf_key_type_id),
        ),
        (
            "offsetof(union bpf_attr, btf_value_type_id)",
            offset_of!(bpf_attr_map_create, btf_value_type_id),
        ),
        (
            "offsetof(union bpf_attr, btf_vmlinux_value_type_id)",
            offset_of!(bpf_attr_map_create, btf_vmlinux_value_type_id),
        ),
        (
            "offsetof(union bpf_attr, map_extra)",
            offset_of!(bpf_attr_map_create, map_extra),
        ),
        (
            "offsetof(union bpf_attr, map_fd)",
            offset_of!(bpf_attr_map_elem, map_fd),
        ),
        (
            "offsetof(union bpf_attr, key)",
            offset_of!(bpf_attr_map_elem, key),
        ),
        (
            "offsetof(union bpf_attr, value)",
            offset_of!(bpf_attr_map_elem, value),
        ),
        (
            "offsetof(union bpf_attr, next_key)",
            offset_of!(bpf_attr_map_elem, value),
        ),
        (
            "offsetof(union bpf_attr, flags)",
            offset_of!(bpf_attr_map_elem, flags),
        ),
        (
            "offsetof(union bpf_attr, prog_type)",
            offset_of!(bpf_attr_prog_load, prog_type),
        ),
        (
            "offsetof(union bpf_attr, insn_cnt)",
            offset_of!(bpf_attr_prog_load, insn_cnt),
        ),
        (
            "offsetof(union bpf_attr, insns)",
            offset_of!(bpf_attr_prog_load, insns),
        ),
        (
            "offsetof(union bpf_attr, license)",
            offset_of!(bpf_attr_prog_load, license),
        ),
        (
            "offsetof(union bpf_attr, log_level)",
            offset_of!(bpf_attr_prog_load, log_level),
        ),
        (
            "offsetof(union bpf_attr, log_size)",
            offset_of!(bpf_attr_prog_load, log_size),
        ),
        (
            "offsetof(union bpf_attr, log_buf)",
            offset_of!(bpf_attr_prog_load, log_buf),
        ),
        (
            "offsetof(union bpf_attr, kern_version)",
            offset_of!(bpf_attr_prog_load, kern_version),
        ),
        (
            "offsetof(union bpf_attr, prog_flags)",
            offset_of!(bpf_attr_prog_load, prog_flags),
        ),
        (
            "offsetof(union bpf_attr, prog_name)",
            offset_of!(bpf_attr_prog_load, prog_name),
        ),
        (
            "offsetof(union bpf_attr, prog_ifindex)",
            offset_of!(bpf_attr_prog_load, prog_ifindex),
        ),
        (
            "offsetof(union bpf_attr, expected_attach_type)",
            offset_of!(bpf_attr_prog_load, expected_attach_type),
        ),
        (
            "offsetof(union bpf_attr, prog_btf_fd)",
            offset_of!(bpf_attr_prog_load, prog_btf_fd),
        ),
        (
            "offsetof(union bpf_attr, func_info_rec_size)",
            offset_of!(bpf_attr_prog_load, func_info_rec_size),
        ),
        (
            "offsetof(union bpf_attr, func_info)",
            offset_of!(bpf_attr_prog_load, func_info),
        ),
        (
            "offsetof(union bpf_attr, func_info_cnt)",
            offset_of!(bpf_attr_prog_load, func_info_cnt),
        ),
        (
            "offsetof(union bpf_attr, line_info_rec_size)",
            offset_of!(bpf_attr_prog_load, line_info_rec_size),
        ),
        (
            "offsetof(union bpf_attr, line_info)",
            offset_of!(bpf_attr_prog_load, line_info),
        ),
        (
            "offsetof(union bpf_attr, line_info_cnt)",
            offset_of!(bpf_attr_prog_load, line_info_cnt),
        ),
        (
            "offsetof(union bpf_attr, attach_btf_id)",
            offset_of!(bpf_attr_prog_load, attach_btf_id),
        ),
        (
            "offsetof(union bpf_attr, attach_prog_fd)",
            offset_of!(bpf_attr_prog_load, attach_prog_fd),
        ),
        (
            "offsetof(union bpf_attr, core_relo_cnt)",
            offset_of!(bpf_attr_prog_load, core_relo_cnt),
        ),
        (
            "offsetof(union bpf_attr, fd_array)",
            offset_of!(bpf_attr_prog_load, fd_array),
        ),
        (
            "offsetof(union bpf_attr, core_relos)",
            offset_of!(bpf_attr_prog_load, core_relos),
        ),
        (
            "offsetof(union bpf_attr, core_relo_rec_size)",
            offset_of!(bpf_attr_prog_load, core_relo_rec_size),
        ),
        (
            "offsetof(union bpf_attr, info.bpf_fd)",
            offset_of!(bpf_attr_info, bpf_fd),
        ),
        (
            "offsetof(union bpf_attr, info.info_len)",
            offset_of!(bpf_attr_info, info_len),
        ),
        (
            "offsetof(union bpf_attr, info.info)",
            offset_of!(bpf_attr_info, info),
        ),
        (
            "offsetof(union bpf_attr, start_id)",
            offset_of!(bpf_attr_get_id, start_id),
        ),
        (
            "offsetof(union bpf_attr, next_id)",
            offset_of!(bpf_attr_get_id, next_id),
        ),
        (
            "offsetof(union bpf_attr, open_flags)",
            offset_of!(bpf_attr_get_id, open_flags),
        ),
        (
            "offsetof(union bpf_attr, btf)",
            offset_of!(bpf_attr_btf_load, btf),
        ),
        (
            "offsetof(union bpf_attr, btf_log_buf)",
            offset_of!(bpf_attr_btf_load, btf_log_buf),
        ),
        (
            "offsetof(union bpf_attr, btf_size)",
            offset_of!(bpf_attr_btf_load, btf_size),
        ),
        (
            "offsetof(union bpf_attr, btf_log_size)",
            offset_of!(bpf_attr_btf_load, btf_log_size),
        ),
        (
            "offsetof(union bpf_attr, btf_log_level)",
            offset_of!(bpf_attr_btf_load, btf_log_level),
        ),
        (
            "offsetof(union bpf_attr, link_create.prog_fd)",
            offset_of!(bpf_attr_link_create, prog_fd),
        ),
        (
            "offsetof(union bpf_attr, link_create.target_fd)",
            offset_of!(bpf_attr_link_create, target_fd),
        ),
        (
            "offsetof(union bpf_attr, link_create.attach_type)",
            offset_of!(bpf_attr_link_create, attach_type),
        ),
        (
            "offsetof(union bpf_attr, link_create.flags)",
            offset_of!(bpf_attr_link_create, flags),
        ),
        (
            "offsetof(union bpf_attr, link_create.perf_event.bpf_cookie)",
            offset_of!(bpf_attr_link_create, bpf_cookie),
        ),
        (
            "offsetof(union bpf_attr, prog_bind_map.prog_fd)",
            offset_of!(bpf_attr_prog_bind_map, prog_fd),
        ),
        (
            "offsetof(union bpf_attr, prog_bind_map.map_fd)",
            offset_of!(bpf_attr_prog_bind_map, map_fd),
        ),
        (
            "offsetof(union bpf_attr, prog_bind_map.flags)",
            offset_of!(bpf_attr_prog_bind_map, flags),
        ),
        ("sizeof(struct bpf_map_info)", size_of::<bpf_map_info>()),
        (
            "offsetof(struct bpf_map_info, map_flags)",
            offset_of!(bpf_map_info, map_flags),
        ),
        (
            "offsetof(struct bpf_map_info, name)",
            offset_of!(bpf_map_info, name),
        ),
        (
            "offsetof(struct bpf_map_info, netns_dev)",
            offset_of!(bpf_map_info, netns_dev),
        ),
        (
            "offsetof(struct bpf_map_info, btf_id)",
            offset_of!(bpf_map_info, btf_id),
        ),
        (
            "offsetof(struct bpf_map_info, btf_value_type_id)",
            offset_of!(bpf_map_info, btf_value_type_id),
        ),
        (
            "offsetof(struct bpf_map_info, map_extra)",
            offset_of!(bpf_map_info, map_extra),
        ),
        ("sizeof(struct bpf_prog_info)", size_of::<bpf_prog_info>()),
        (
            "offsetof(struct bpf_prog_info, tag)",
            offset_of!(bpf_prog_info, tag),
        ),
        (
            "offsetof(struct bpf_prog_info, xlated_prog_len)",
            offset_of!(bpf_prog_info, xlated_prog_len),
        ),
        (
            "offsetof(struct bpf_prog_info, xlated_prog_insns)",
            offset_of!(bpf_prog_info, xlated_prog_insns),
        ),
        (
            "offsetof(struct bpf_prog_info, load_time)",
            offset_of!(bpf_prog_info, load_time),
        ),
        (
            "offsetof(struct bpf_prog_info, nr_map_ids)",
            offset_of!(bpf_prog_info, nr_map_ids),
        ),
        (
            "offsetof(struct bpf_prog_info, map_ids)",
            offset_of!(bpf_prog_info, map_ids),
        ),
        (
            "offsetof(struct bpf_prog_info, name)",
            offset_of!(bpf_prog_info, name),
        ),
        (
            "offsetof(struct bpf_prog_info, ifindex)",
            offset_of!(bpf_prog_info, ifindex),
        ),
        (
            "offsetof(struct bpf_prog_info, netns_dev)",
            offset_of!(bpf_prog_info, netns_dev),
        ),
        (
            "offsetof(struct bpf_prog_info, btf_id)",
            offset_of!(bpf_prog_info, btf_id),
        ),
        (
            "offsetof(struct bpf_prog_info, func_info)",
            offset_of!(bpf_prog_info, func_info),
        ),
        (
            "offsetof(struct bpf_prog_info, line_info)",
            offset_of!(bpf_prog_info, line_info),
        ),
        (
            "offsetof(struct bpf_prog_info, prog_tags)",
            offset_of!(bpf_prog_info, prog_tags),
        ),
        (
            "offsetof(struct bpf_prog_info, run_time_ns)",
            offset_of!(bpf_prog_info, run_time_ns),
        ),
        (
            "offsetof(struct bpf_prog_info, verified_insns)",
            offset_of!(bpf_prog_info, verified_insns),
        ),
        (
            "offsetof(struct bpf_prog_info, attach_btf_id)",
            offset_of!(bpf_prog_info, attach_btf_id),
        ),
        ("sizeof(struct bpf_btf_info)", size_of::<bpf_btf_info>()),
        (
            "offsetof(struct bpf_btf_info, btf_size)",
            offset_of!(bpf_btf_info, btf_size),
        ),
        (
            "offsetof(struct bpf_btf_info, id)",
            offset_of!(bpf_btf_info, id),
        ),
        (
            "offsetof(struct bpf_btf_info, name)",
            offset_of!(bpf_btf_info, name),
        ),
        (
            "offsetof(struct bpf_btf_info, kernel_btf)",
            offset_of!(bpf_btf_info, kernel_btf),
        ),
        (
            "offsetof(struct bpf_link_info, prog_id)",
            offset_of!(bpf_link_info, prog_id),
        ),
        (
            "offsetof(struct perf_event_attr, config)",
            offset_of!(perf_event_attr, config),
        ),
        (
            "offsetof(struct perf_event_attr, read_format)",
            offset_of!(perf_event_attr, read_format),
        ),
        (
            "offsetof(struct perf_event_attr, wakeup_events)",
            offset_of!(perf_event_attr, wakeup_events),
        ),
        (
            "offsetof(struct perf_event_attr, config1)",
            offset_of!(perf_event_attr, config1),
        ),
        (
            "offsetof(struct perf_event_attr, config2)",
            offset_of!(perf_event_attr, config2),
        ),
        (
            "offsetof(struct perf_event_attr, sample_regs_user)",
            offset_of!(perf_event_attr, sample_regs_user),
        ),
        (
            "offsetof(struct perf_event_attr, clockid)",
            offset_of!(perf_event_attr, clockid),
        ),
        (
            "offsetof(struct perf_event_attr, sample_max_stack)",
            offset_of!(perf_event_attr, sample_max_stack),
        ),
        (
            "offsetof(struct perf_event_attr, aux_sample_size)",
            offset_of!(perf_event_attr, aux_sample_size),
        ),
        (
            "offsetof(struct perf_event_attr, sig_data)",
            offset_of!(perf_event_attr, sig_data),
        ),
        ("PERF_EVENT_IOC_SET_BPF", PERF_EVENT_IOC_SET_BPF as usize),
        ("PERF_EVENT_IOC_ID", PERF_EVENT_IOC_ID as usize),
        (
            "PERF_EVENT_IOC_QUERY_BPF",
            PERF_EVENT_IOC_QUERY_BPF as usize,
        ),
        (
            "PERF_EVENT_IOC_MODIFY_ATTRIBUTES",
            PERF_EVENT_IOC_MODIFY_ATTRIBUTES as usize,
        ),
        ("BPF_PERF_EVENT", BPF_PERF_EVENT as usize),
        ("BPF_TRACE_KPROBE_MULTI", BPF_TRACE_KPROBE_MULTI as usize),
        ("BPF_PROG_BIND_MAP", BPF_PROG_BIND_MAP as usize),
        (
            "BPF_LINK_TYPE_PERF_EVENT",
            BPF_LINK_TYPE_PERF_EVENT as usize,
        ),
        ("BPF_F_MMAPABLE", BPF_F_MMAPABLE as usize),
    ];
    let mut c = String::from(
        "#include <stddef.h>\n#include <stdio.h>\n#include <linux/bpf.h>\n\
         #include <linux/perf_event.h>\nint main(void) {\n",
    );
    for (expr, _) in &checks {
        c.push_str(&format!("  printf(\"%zu\\n\", (size_t)({expr}));\n"));
    }
    c.push_str("  return 0;\n}\n");
    let dir = std::env::temp_dir().join(format!("bpftime-sst-uapi-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let src = dir.join("layout.c");
    let bin = dir.join("layout");
    std::fs::write(&src, c).unwrap();
    let out = Command::new("cc")
        .arg("-o")
        .arg(&bin)
        .arg(&src)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let run = Command::new(&bin).output().unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    let got: Vec<usize> = String::from_utf8_lossy(&run.stdout)
        .lines()
        .map(|l| l.parse().unwrap())
        .collect();
    assert_eq!(got.len(), checks.len());
    let bad: Vec<String> = checks
        .iter()
        .zip(&got)
        .filter(|((_, ours), c)| ours != *c)
        .map(|((e, ours), c)| format!("{e}: C {c}, ours {ours}"))
        .collect();
    assert!(bad.is_empty(), "layout mismatches:\n{}", bad.join("\n"));
}
