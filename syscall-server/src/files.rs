//! Files of the kernel that loaders read to find the uprobe PMU, served from memory.
//!
//! libbpf 1.1 and bcc read `/sys/bus/event_source/devices/uprobe/type` (the PMU's dynamic type
//! number for `perf_event_open`) and `.../format/retprobe` (which `config` bit marks a
//! uretprobe). We answer with the numbers this machine's kernel uses, and recognise that type
//! number in `perf_event_open`.

/// The uprobe PMU type we announce and recognise (this machine's kernel uses 8 too).
pub const UPROBE_PMU_TYPE: u32 = 8;

const FILES: &[(&str, &str)] = &[
    ("/sys/bus/event_source/devices/uprobe/type", "8\n"),
    (
        "/sys/bus/event_source/devices/uprobe/format/retprobe",
        "config:0\n",
    ),
    (
        "/sys/bus/event_source/devices/uprobe/format/ref_ctr_offset",
        "config:32-63\n",
    ),
];

/// The content we serve for `path`, if it is one of ours.
pub fn virtual_file(path: &[u8]) -> Option<&'static [u8]> {
    FILES
        .iter()
        .find(|(p, _)| p.as_bytes() == path)
        .map(|(_, c)| c.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn type_file_announces_the_pmu_number() {
        let c = virtual_file(b"/sys/bus/event_source/devices/uprobe/type").unwrap();
        assert_eq!(c, format!("{UPROBE_PMU_TYPE}\n").as_bytes());
        assert!(virtual_file(b"/etc/passwd").is_none());
    }
}
