//! ELF objects built by `clang -target bpf`: pick one program, link its bpf-to-bpf calls, and
//! hand back plain instructions.
//!
//! Parsing and call linking are aya-obj's (`Object::parse`, `Object::relocate_calls`); section
//! names come from the `object` crate. What is refused, with an error naming it:
//! - maps and global data (`.data`, `.rodata`, `.bss` are maps too): a program whose `lddw`
//!   refers to one would otherwise run with a null pointer;
//! - CO-RE (BTF) relocations, for the same reason;
//! - section names aya-obj does not know (it only accepts libbpf's names: `socket`, `xdp`, …).
//!
//! An object with no program section (only `.text`, as bpf_conformance's ELF writer produces)
//! offers its `.text` functions as programs.

use anyhow::{Context as _, Result, anyhow, bail};
use aya_obj::generated::bpf_insn;
use aya_obj::{Map, Object, ParseError, ProgramSection};
use bpftime_vm::isa::Insn;
use bpftime_vm::opcode::{BPF_PSEUDO_MAP_FD, BPF_PSEUDO_MAP_VALUE, LDDW};
use object::{Architecture, Object as _, ObjectSection as _, SectionIndex};
use std::collections::HashSet;
use std::os::fd::RawFd;
use std::panic::{self, AssertUnwindSafe};

/// Which program of an object to run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Select {
    /// The only program; an error listing the choices when there are several.
    Only,
    /// The program in the section with this name (`socket`, `xdp`, `.text`).
    Section(String),
    /// The program whose function has this name.
    Function(String),
}

/// A program found in an object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProgramInfo {
    /// Function (symbol) name.
    pub name: String,
    /// ELF section name.
    pub section: String,
    section_index: usize,
    address: u64,
    /// A `.text` function offered because the object has no program section.
    from_text: bool,
}

/// A selected program with its calls linked.
#[derive(Debug, Clone)]
pub struct LoadedProgram {
    /// Where it came from.
    pub info: ProgramInfo,
    /// Its instructions, entry first, callees appended.
    pub insns: Vec<Insn>,
}

/// Parses `bytes`, selects a program and links it.
pub fn load(bytes: &[u8], select: &Select) -> Result<LoadedProgram> {
    let elf = object::read::File::parse(bytes).context("not a valid ELF object")?;
    if elf.architecture() != Architecture::Bpf {
        bail!(
            "ELF object is for {:?}, not BPF (build it with `clang -target bpf`)",
            elf.architecture()
        );
    }
    let section_name = |index: usize| -> String {
        elf.section_by_index(SectionIndex(index))
            .ok()
            .and_then(|s| s.name().ok().map(str::to_owned))
            .unwrap_or_else(|| format!("#{index}"))
    };

    let mut obj = catch_panics("parsing the object", || Object::parse(bytes))?
        .map_err(|e| parse_error(&e))?;

    let programs = list(&obj, section_name);
    let info = choose(&programs, select)?.clone();
    if info.from_text {
        obj.programs.insert(
            info.name.clone(),
            aya_obj::Program {
                license: obj.license.clone(),
                kernel_version: obj.kernel_version,
                section: ProgramSection::SocketFilter,
                section_index: info.section_index,
                address: info.address,
            },
        );
    }
    if obj.has_btf_relocations() {
        bail!("the object has CO-RE (BTF) relocations, which `bpftime run` does not apply yet");
    }

    // Give every map (and global data section) a fake fd: its index in `maps`. aya-obj then
    // marks each `lddw` that refers to one, which is how a program using maps is recognised.
    let maps: Vec<(String, Map)> = obj
        .maps
        .iter()
        .map(|(name, map)| (name.clone(), map.clone()))
        .collect();
    let text_sections: HashSet<usize> = obj.functions.keys().map(|&(section, _)| section).collect();
    catch_panics("relocating map references", || {
        obj.relocate_maps(
            maps.iter()
                .enumerate()
                .map(|(fd, (name, map))| (name.as_str(), fd as RawFd, map)),
            &text_sections,
        )
    })?
    .map_err(|e| {
        anyhow!(e).context(
            "cannot resolve a data reference (maps and global data are not supported by \
             `bpftime run` yet)",
        )
    })?;
    catch_panics("linking bpf-to-bpf calls", || {
        obj.relocate_calls(&text_sections)
    })?
    .context("cannot link bpf-to-bpf calls")?;

    let key = (info.section_index, info.address);
    let function = obj
        .functions
        .get(&key)
        .ok_or_else(|| anyhow!("program `{}` has no code", info.name))?;
    let insns: Vec<Insn> = function.instructions.iter().map(to_insn).collect();
    if let Some(map) = first_map_reference(&insns, &maps) {
        bail!(
            "program `{}` uses {map}: maps are not supported by `bpftime run` yet",
            info.name
        );
    }
    Ok(LoadedProgram { info, insns })
}

/// The programs of a parsed object, sorted by section then name.
fn list(obj: &Object, section_name: impl Fn(usize) -> String) -> Vec<ProgramInfo> {
    let mut out: Vec<ProgramInfo> = obj
        .programs
        .iter()
        .map(|(name, p)| ProgramInfo {
            name: name.clone(),
            section: section_name(p.section_index),
            section_index: p.section_index,
            address: p.address,
            from_text: false,
        })
        .collect();
    if out.is_empty() {
        out = obj
            .functions
            .iter()
            .map(|(&(section_index, address), f)| ProgramInfo {
                name: f.name.clone(),
                section: section_name(section_index),
                section_index,
                address,
                from_text: true,
            })
            .filter(|p| p.section.starts_with(".text"))
            .collect();
    }
    out.sort_by(|a, b| (&a.section, &a.name).cmp(&(&b.section, &b.name)));
    out
}

fn choose<'a>(programs: &'a [ProgramInfo], select: &Select) -> Result<&'a ProgramInfo> {
    let choices = || {
        programs
            .iter()
            .map(|p| format!("  --program {} (section {})", p.name, p.section))
            .collect::<Vec<_>>()
            .join("\n")
    };
    if programs.is_empty() {
        bail!("the object contains no programs");
    }
    let matching: Vec<&ProgramInfo> = match select {
        Select::Only => programs.iter().collect(),
        Select::Section(s) => programs.iter().filter(|p| &p.section == s).collect(),
        Select::Function(f) => programs.iter().filter(|p| &p.name == f).collect(),
    };
    match (matching.as_slice(), select) {
        ([one], _) => Ok(one),
        ([], Select::Section(s)) => {
            bail!("no program in section `{s}`; choose one of:\n{}", choices())
        }
        ([], Select::Function(f)) => bail!("no program named `{f}`; choose one of:\n{}", choices()),
        (_, Select::Section(s)) => bail!(
            "section `{s}` holds several programs; choose one with --program:\n{}",
            choices()
        ),
        _ => bail!(
            "the object contains {} programs; choose one with --program or --section:\n{}",
            matching.len(),
            choices()
        ),
    }
}

fn to_insn(i: &bpf_insn) -> Insn {
    Insn::new(i.code, i.dst_reg(), i.src_reg(), i.off, i.imm)
}

/// The map the first map-referencing `lddw` names, described for an error message.
fn first_map_reference(insns: &[Insn], maps: &[(String, Map)]) -> Option<String> {
    let mut pc = 0;
    while let Some(insn) = insns.get(pc) {
        if insn.code == LDDW {
            if insn.src == BPF_PSEUDO_MAP_FD || insn.src == BPF_PSEUDO_MAP_VALUE {
                let name = usize::try_from(insn.imm)
                    .ok()
                    .and_then(|fd| maps.get(fd))
                    .map_or("?", |(name, _)| name.as_str());
                return Some(if name.starts_with('.') {
                    format!("global data in `{name}` (pc {pc}; global variables are maps)")
                } else {
                    format!("map `{name}` (pc {pc})")
                });
            }
            pc += 2;
        } else {
            pc += 1;
        }
    }
    None
}

fn parse_error(e: &ParseError) -> anyhow::Error {
    match e {
        ParseError::InvalidProgramSection { section } => anyhow!(
            "cannot parse the object: unknown program section `{section}`; use a libbpf section \
             name such as SEC(\"socket\") or SEC(\"xdp\")"
        ),
        e => anyhow!("cannot parse the object: {e}"),
    }
}

/// Runs `f`, turning a panic inside it (aya-obj indexes into ELF data it has not checked in a
/// few places) into an error, without the panic message on stderr.
fn catch_panics<T>(what: &str, f: impl FnOnce() -> T) -> Result<T> {
    let previous = panic::take_hook();
    panic::set_hook(Box::new(|_| {}));
    let result = panic::catch_unwind(AssertUnwindSafe(f));
    panic::set_hook(previous);
    result.map_err(|payload| {
        let msg = payload
            .downcast_ref::<&str>()
            .map(|s| (*s).to_owned())
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_default();
        anyhow!("malformed ELF object: {what} failed ({msg})")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(name: &str, section: &str) -> ProgramInfo {
        ProgramInfo {
            name: name.into(),
            section: section.into(),
            section_index: 0,
            address: 0,
            from_text: false,
        }
    }

    #[test]
    fn non_elf_and_truncated_input_is_an_error_not_a_panic() {
        assert!(load(b"", &Select::Only).is_err());
        assert!(load(b"\x7fELF", &Select::Only).is_err());
        assert!(load(b"\x7fELF\x02\x01\x01\0\0\0\0\0\0\0\0\0", &Select::Only).is_err());
    }

    #[test]
    fn selection_by_section_or_name_and_ambiguity() {
        let progs = [info("a", "socket"), info("b", "xdp"), info("c", "xdp")];
        assert_eq!(
            choose(&progs, &Select::Function("b".into())).unwrap().name,
            "b"
        );
        assert_eq!(
            choose(&progs, &Select::Section("socket".into()))
                .unwrap()
                .name,
            "a"
        );
        let e = choose(&progs, &Select::Only).unwrap_err().to_string();
        assert!(
            e.contains("3 programs") && e.contains("--program c (section xdp)"),
            "{e}"
        );
        let e = choose(&progs, &Select::Section("xdp".into()))
            .unwrap_err()
            .to_string();
        assert!(e.contains("several"), "{e}");
        assert!(choose(&progs, &Select::Function("zz".into())).is_err());
        assert_eq!(choose(&progs[..1], &Select::Only).unwrap().name, "a");
    }

    #[test]
    fn map_references_are_found_and_named() {
        let maps = Vec::new();
        let plain = [Insn::new(LDDW, 1, 0, 0, 7), Insn::new(0, 0, 0, 0, 0)];
        assert_eq!(first_map_reference(&plain, &maps), None);
        let pseudo = [
            Insn::new(LDDW, 1, BPF_PSEUDO_MAP_FD, 0, 0),
            Insn::new(0, 0, 0, 0, 0),
        ];
        assert_eq!(
            first_map_reference(&pseudo, &maps).unwrap(),
            "map `?` (pc 0)"
        );
    }
}
