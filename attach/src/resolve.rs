//! From a uprobe target as the kernel receives it — (binary path, file offset) in
//! `perf_event_attr.config1`/`config2` — to an address in this process, and from an ELF symbol
//! to that file offset.
//!
//! The symbol → offset rule is libbpf's `elf_sym_offset` (`tools/lib/bpf/elf.c`):
//! `st_value - p_vaddr + p_offset` of the `PT_LOAD` segment containing the symbol, so an offset
//! computed here matches the one a libbpf loader passes to `perf_event_open`.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use goblin::elf::{Elf, program_header::PT_LOAD, section_header::SHN_UNDEF};

use crate::AttachError;
use crate::procmaps::{MapEntry, read_self_maps};

/// The address in this process of `offset` in the file at `path`.
///
/// Looks for a mapping of that file — same device and inode as `stat(path)`, or the same
/// canonical path (overlay filesystems report the lower file's device in `/proc/self/maps`) —
/// whose file range contains `offset`; executable mappings win when several do.
pub fn resolve_file_offset(path: impl AsRef<Path>, offset: u64) -> Result<usize, AttachError> {
    let path = path.as_ref();
    let meta = std::fs::metadata(path).map_err(|source| AttachError::Io {
        path: path.into(),
        source,
    })?;
    let canonical = std::fs::canonicalize(path).ok();
    let maps = read_self_maps()?;
    resolve_in(&maps, FileId::of(&meta), canonical.as_deref(), offset).ok_or_else(|| {
        AttachError::OffsetNotMapped {
            path: path.into(),
            offset,
        }
    })
}

/// The address in this process of `offset` in the file at `path`, in a *writable* mapping —
/// where a USDT semaphore (the `ref_ctr_offset` of a uprobe) lives: `.probes` in the data
/// segment, whose file page may also be mapped read-only next to the text.
pub fn resolve_file_offset_writable(
    path: impl AsRef<Path>,
    offset: u64,
) -> Result<usize, AttachError> {
    let path = path.as_ref();
    let meta = std::fs::metadata(path).map_err(|source| AttachError::Io {
        path: path.into(),
        source,
    })?;
    let canonical = std::fs::canonicalize(path).ok();
    let maps: Vec<MapEntry> = read_self_maps()?.into_iter().filter(|m| m.write).collect();
    resolve_in(&maps, FileId::of(&meta), canonical.as_deref(), offset).ok_or_else(|| {
        AttachError::OffsetNotMapped {
            path: path.into(),
            offset,
        }
    })
}

/// The file-offset ranges `[start, end)` of the functions defined in the ELF file at `path`
/// (`STT_FUNC` and `STT_GNU_IFUNC` symbols with a size, from `.symtab` and `.dynsym`), sorted
/// by start. For telling whether a probe offset is a function's entry or inside one.
pub fn function_ranges(path: impl AsRef<Path>) -> Result<Vec<(u64, u64)>, AttachError> {
    let path = path.as_ref();
    let bytes = std::fs::read(path).map_err(|source| AttachError::Io {
        path: path.into(),
        source,
    })?;
    let elf = Elf::parse(&bytes).map_err(|source| AttachError::Elf {
        path: path.into(),
        source,
    })?;
    let mut out: Vec<(u64, u64)> = elf
        .syms
        .iter()
        .chain(elf.dynsyms.iter())
        .filter(|s| {
            matches!(
                s.st_type(),
                goblin::elf::sym::STT_FUNC | goblin::elf::sym::STT_GNU_IFUNC
            ) && s.st_shndx != SHN_UNDEF as usize
                && s.st_value != 0
                && s.st_size != 0
        })
        .filter_map(|s| {
            let start = vaddr_to_offset(&elf, s.st_value)?;
            Some((start, start + s.st_size))
        })
        .collect();
    out.sort_unstable();
    out.dedup();
    Ok(out)
}

/// The range in `ranges` (from [`function_ranges`]) containing `offset`: the innermost
/// (latest-starting) one when ranges nest.
pub fn function_containing(ranges: &[(u64, u64)], offset: u64) -> Option<(u64, u64)> {
    let end = ranges.partition_point(|&(s, _)| s <= offset);
    ranges[..end]
        .iter()
        .rev()
        .find(|&&(s, e)| s <= offset && offset < e)
        .copied()
}

/// The file offset of `symbol` in the ELF file at `path` (its `.symtab`, else `.dynsym`).
pub fn symbol_file_offset(path: impl AsRef<Path>, symbol: &str) -> Result<u64, AttachError> {
    let path = path.as_ref();
    let bytes = std::fs::read(path).map_err(|source| AttachError::Io {
        path: path.into(),
        source,
    })?;
    let elf = Elf::parse(&bytes).map_err(|source| AttachError::Elf {
        path: path.into(),
        source,
    })?;
    let vaddr = symbol_value(&elf, symbol).ok_or_else(|| AttachError::SymbolNotFound {
        path: path.into(),
        symbol: symbol.into(),
    })?;
    vaddr_to_offset(&elf, vaddr).ok_or_else(|| AttachError::SymbolNotLoaded {
        path: path.into(),
        symbol: symbol.into(),
        vaddr,
    })
}

/// The address of `symbol` in the first file mapped executable in this process that defines
/// it (the main program first, then libraries in address order).
pub fn find_symbol_in_process(symbol: &str) -> Result<usize, AttachError> {
    let maps = read_self_maps()?;
    let mut seen: Vec<&str> = Vec::new();
    for m in maps.iter().filter(|m| m.exec && m.path.starts_with('/')) {
        if seen.contains(&m.path.as_str()) {
            continue;
        }
        seen.push(&m.path);
        match symbol_file_offset(&m.path, symbol) {
            Ok(offset) => return resolve_file_offset(&m.path, offset),
            Err(
                AttachError::SymbolNotFound { .. }
                | AttachError::Elf { .. }
                | AttachError::Io { .. },
            ) => {}
            Err(e) => return Err(e),
        }
    }
    Err(AttachError::SymbolNotFound {
        path: PathBuf::from("/proc/self/maps"),
        symbol: symbol.into(),
    })
}

/// Device and inode of a file, in the split form `/proc/*/maps` prints.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FileId {
    major: u32,
    minor: u32,
    inode: u64,
}

impl FileId {
    fn of(meta: &std::fs::Metadata) -> Self {
        let dev = meta.dev();
        Self {
            major: libc::major(dev),
            minor: libc::minor(dev),
            inode: meta.ino(),
        }
    }

    fn matches(&self, m: &MapEntry) -> bool {
        m.inode == self.inode && m.dev_major == self.major && m.dev_minor == self.minor
    }
}

fn resolve_in(
    maps: &[MapEntry],
    id: FileId,
    canonical: Option<&Path>,
    offset: u64,
) -> Option<usize> {
    let same_file = |m: &MapEntry| {
        (m.inode != 0 && id.matches(m))
            || canonical.is_some_and(|c| !m.path.is_empty() && Path::new(&m.path) == c)
    };
    let covering = |m: &&MapEntry| {
        let len = (m.end - m.start) as u64;
        same_file(m) && m.offset <= offset && offset - m.offset < len
    };
    let best = maps.iter().filter(covering).max_by_key(|m| m.exec)?;
    best.start
        .checked_add(usize::try_from(offset - best.offset).ok()?)
}

fn symbol_value(elf: &Elf<'_>, symbol: &str) -> Option<u64> {
    let tables = [(&elf.syms, &elf.strtab), (&elf.dynsyms, &elf.dynstrtab)];
    tables.into_iter().find_map(|(syms, strtab)| {
        syms.iter().find_map(|sym| {
            let name = strtab.get_at(sym.st_name)?;
            let base = name.split_once('@').map_or(name, |(b, _)| b);
            let defined = sym.st_shndx != SHN_UNDEF as usize && sym.st_value != 0;
            (defined && (name == symbol || base == symbol)).then_some(sym.st_value)
        })
    })
}

fn vaddr_to_offset(elf: &Elf<'_>, vaddr: u64) -> Option<u64> {
    elf.program_headers.iter().find_map(|ph| {
        let inside =
            ph.p_type == PT_LOAD && ph.p_vaddr <= vaddr && vaddr - ph.p_vaddr < ph.p_filesz;
        inside.then(|| vaddr - ph.p_vaddr + ph.p_offset)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::procmaps::parse_maps;

    const MAPS: &str = "\
1000-3000 r--p 00000000 fe:01 42 /bin/x
3000-5000 r-xp 00002000 fe:01 42 /bin/x
5000-6000 r-xp 00000000 fe:01 43 /bin/y
";

    #[test]
    fn offset_resolves_in_the_covering_mapping_of_the_same_inode() {
        let maps = parse_maps(MAPS).unwrap();
        let id = FileId {
            major: 0xfe,
            minor: 1,
            inode: 42,
        };
        assert_eq!(resolve_in(&maps, id, None, 0x10), Some(0x1010));
        assert_eq!(resolve_in(&maps, id, None, 0x2010), Some(0x3010));
        assert_eq!(resolve_in(&maps, id, None, 0x4000), None);
        let other_dev = FileId {
            major: 0xfe,
            minor: 2,
            inode: 42,
        };
        assert_eq!(resolve_in(&maps, other_dev, None, 0x10), None);
        // Overlayfs: the device differs but the path is the same.
        assert_eq!(
            resolve_in(&maps, other_dev, Some(Path::new("/bin/y")), 0x20),
            Some(0x5020)
        );
    }

    #[test]
    fn functions_are_found_by_offset() {
        let r = [
            (0x100, 0x180),
            (0x180, 0x200),
            (0x300, 0x400),
            (0x310, 0x320),
        ];
        assert_eq!(function_containing(&r, 0x100), Some((0x100, 0x180)));
        assert_eq!(function_containing(&r, 0x17f), Some((0x100, 0x180)));
        assert_eq!(function_containing(&r, 0x180), Some((0x180, 0x200)));
        assert_eq!(function_containing(&r, 0x250), None);
        assert_eq!(function_containing(&r, 0x315), Some((0x310, 0x320)));
        assert_eq!(function_containing(&r, 0x350), Some((0x300, 0x400)));
        assert_eq!(function_containing(&r, 0x50), None);
        let own = function_ranges("/proc/self/exe").unwrap();
        let main = symbol_file_offset("/proc/self/exe", "main").unwrap();
        assert_eq!(function_containing(&own, main).map(|f| f.0), Some(main));
    }

    #[test]
    fn missing_file_and_symbol_are_errors() {
        assert!(matches!(
            symbol_file_offset("/nonexistent/x", "main"),
            Err(AttachError::Io { .. })
        ));
        assert!(matches!(
            symbol_file_offset("/proc/self/exe", "no_such_symbol_anywhere_4711"),
            Err(AttachError::SymbolNotFound { .. })
        ));
        assert!(matches!(
            symbol_file_offset("/proc/self/maps", "x"),
            Err(AttachError::Elf { .. })
        ));
    }

    #[test]
    fn libc_symbol_resolves_to_the_linked_function() {
        // Rust calls libc through the GOT, so the function pointer is libc's own address.
        let want = libc::getpid as *const () as usize;
        assert_eq!(find_symbol_in_process("getpid").unwrap(), want);
    }
}
