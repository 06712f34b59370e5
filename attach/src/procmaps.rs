//! `/proc/self/maps`, parsed (`proc(5)`).

use crate::AttachError;

/// One line of `/proc/<pid>/maps`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MapEntry {
    /// First address of the mapping.
    pub start: usize,
    /// One past the last address.
    pub end: usize,
    pub read: bool,
    pub write: bool,
    pub exec: bool,
    /// `s` (shared) rather than `p` (private).
    pub shared: bool,
    /// File offset of `start`.
    pub offset: u64,
    /// Device of the backing file, as `proc(5)` prints it (`major:minor`).
    pub dev_major: u32,
    pub dev_minor: u32,
    /// Inode of the backing file, 0 for anonymous mappings.
    pub inode: u64,
    /// The path or pseudo-path (`[stack]`, `[vdso]`), empty for anonymous mappings. Deleted files
    /// keep the kernel's ` (deleted)` suffix.
    pub path: String,
}

impl MapEntry {
    /// Whether `addr` lies in this mapping.
    pub fn contains(&self, addr: usize) -> bool {
        self.start <= addr && addr < self.end
    }

    /// The `mmap`/`mprotect` protection bits of this mapping.
    pub fn prot(&self) -> i32 {
        let mut prot = 0;
        if self.read {
            prot |= libc::PROT_READ;
        }
        if self.write {
            prot |= libc::PROT_WRITE;
        }
        if self.exec {
            prot |= libc::PROT_EXEC;
        }
        prot
    }
}

/// Reads and parses `/proc/self/maps`; entries are in ascending address order.
pub fn read_self_maps() -> Result<Vec<MapEntry>, AttachError> {
    const PATH: &str = "/proc/self/maps";
    let text = std::fs::read_to_string(PATH).map_err(|source| AttachError::Io {
        path: PATH.into(),
        source,
    })?;
    parse_maps(&text)
}

/// Parses the text of a `maps` file.
pub fn parse_maps(text: &str) -> Result<Vec<MapEntry>, AttachError> {
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(parse_line)
        .collect()
}

/// The mapping containing `addr`, if any.
pub fn find(maps: &[MapEntry], addr: usize) -> Option<&MapEntry> {
    maps.iter().find(|m| m.contains(addr))
}

fn parse_line(line: &str) -> Result<MapEntry, AttachError> {
    let bad = || AttachError::MapsParse {
        line: line.to_owned(),
    };
    let mut rest = line;
    let mut field = || -> Option<&str> {
        let trimmed = rest.trim_start();
        let end = trimmed.find(' ').unwrap_or(trimmed.len());
        let (f, r) = trimmed.split_at(end);
        rest = r;
        (!f.is_empty()).then_some(f)
    };
    let range = field().ok_or_else(bad)?;
    let perms = field().ok_or_else(bad)?.as_bytes();
    let offset = field().ok_or_else(bad)?;
    let dev = field().ok_or_else(bad)?;
    let inode = field().ok_or_else(bad)?;
    let path = rest.trim_start().to_owned();

    let (start, end) = range.split_once('-').ok_or_else(bad)?;
    let (major, minor) = dev.split_once(':').ok_or_else(bad)?;
    if perms.len() < 4 {
        return Err(bad());
    }
    let hex = |s: &str| u64::from_str_radix(s, 16).map_err(|_| bad());
    let start = usize::try_from(hex(start)?).map_err(|_| bad())?;
    let end = usize::try_from(hex(end)?).map_err(|_| bad())?;
    if end < start {
        return Err(bad());
    }
    Ok(MapEntry {
        start,
        end,
        read: perms[0] == b'r',
        write: perms[1] == b'w',
        exec: perms[2] == b'x',
        shared: perms[3] == b's',
        offset: hex(offset)?,
        dev_major: u32::try_from(hex(major)?).map_err(|_| bad())?,
        dev_minor: u32::try_from(hex(minor)?).map_err(|_| bad())?,
        inode: inode.parse().map_err(|_| bad())?,
        path,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = "\
55d0c8a00000-55d0c8a28000 r--p 00000000 fe:01 1835087                    /usr/bin/my prog
55d0c8a28000-55d0c8b2d000 r-xp 00028000 fe:01 1835087                    /usr/bin/my prog
7f3a1c000000-7f3a1c021000 rw-p 00000000 00:00 0 
7ffd6b5e1000-7ffd6b602000 rw-p 00000000 00:00 0                          [stack]
ffffffffff600000-ffffffffff601000 --xp 00000000 00:00 0                  [vsyscall]
";

    #[test]
    fn parses_paths_with_spaces_anonymous_and_pseudo_mappings() {
        let maps = parse_maps(SAMPLE).unwrap();
        assert_eq!(maps.len(), 5);
        assert_eq!(maps[1].start, 0x55d0c8a28000);
        assert_eq!(maps[1].offset, 0x28000);
        assert!(maps[1].exec && maps[1].read && !maps[1].write && !maps[1].shared);
        assert_eq!(
            (maps[1].dev_major, maps[1].dev_minor, maps[1].inode),
            (0xfe, 1, 1835087)
        );
        assert_eq!(maps[1].path, "/usr/bin/my prog");
        assert_eq!(maps[2].path, "");
        assert_eq!(maps[3].path, "[stack]");
        assert_eq!(maps[4].prot(), libc::PROT_EXEC);
        assert_eq!(find(&maps, 0x55d0c8a28000).map(|m| m.offset), Some(0x28000));
        assert!(find(&maps, 0x1000).is_none());
    }

    #[test]
    fn malformed_lines_are_errors_not_panics() {
        for line in [
            "",
            "zz-10 r-xp 0 0:0 0",
            "10-20 r-xp 0 00:00",
            "20-10 r-xp 0 0:0 0",
            "10-20 r 0 0:0 0",
        ] {
            if line.is_empty() {
                assert!(parse_maps(line).unwrap().is_empty());
            } else {
                assert!(
                    matches!(parse_line(line), Err(AttachError::MapsParse { .. })),
                    "{line}"
                );
            }
        }
    }

    #[test]
    fn reads_own_maps() {
        let maps = read_self_maps().unwrap();
        let here = reads_own_maps as *const () as usize;
        let m = find(&maps, here).expect("own code is mapped");
        assert!(m.exec);
    }
}
