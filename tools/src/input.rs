//! Program and memory input: hex text, conformance assembly, and telling them apart from ELF.

use anyhow::{Context as _, Result, bail};
use bpftime_vm::asm;
use bpftime_vm::isa::{Insn, insns_from_bytes};
use std::fmt;
use std::io::Read as _;
use std::path::Path;

/// The four bytes every ELF file starts with.
pub const ELF_MAGIC: &[u8; 4] = b"\x7fELF";

/// How a program file is encoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// An ELF object (`clang -O2 -target bpf -c`).
    Elf,
    /// bpf_conformance assembly text (`mov %r0, 1` / `exit`).
    Asm,
    /// Bytecode as hex text, 8 bytes per instruction, whitespace ignored.
    Hex,
}

impl fmt::Display for Format {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Format::Elf => "elf",
            Format::Asm => "asm",
            Format::Hex => "hex",
        })
    }
}

/// Guesses the format: ELF by its magic; assembly by a `.s`/`.asm` extension; hex when the text
/// is nothing but hex digits and whitespace; assembly otherwise.
pub fn detect_format(path: Option<&Path>, bytes: &[u8]) -> Format {
    if bytes.starts_with(ELF_MAGIC) {
        return Format::Elf;
    }
    let ext = path
        .and_then(Path::extension)
        .and_then(|e| e.to_str())
        .map(str::to_ascii_lowercase);
    match ext.as_deref() {
        Some("s" | "asm") => Format::Asm,
        Some("hex") => Format::Hex,
        _ if looks_like_hex(bytes) => Format::Hex,
        _ => Format::Asm,
    }
}

fn looks_like_hex(bytes: &[u8]) -> bool {
    bytes.iter().any(u8::is_ascii_hexdigit)
        && bytes
            .iter()
            .all(|b| b.is_ascii_hexdigit() || b.is_ascii_whitespace())
}

/// Decodes hex text into bytes. Whitespace anywhere is ignored; anything else must be a hex
/// digit, and the digits must pair up.
pub fn decode_hex(text: &str) -> Result<Vec<u8>> {
    let mut out = Vec::with_capacity(text.len() / 2);
    let mut high: Option<u8> = None;
    for (pos, c) in text.char_indices() {
        if c.is_whitespace() {
            continue;
        }
        let Some(nibble) = c.to_digit(16) else {
            bail!("invalid hex digit {c:?} at offset {pos}");
        };
        let nibble = nibble as u8;
        match high.take() {
            Some(h) => out.push(h << 4 | nibble),
            None => high = Some(nibble),
        }
    }
    if high.is_some() {
        bail!("odd number of hex digits");
    }
    Ok(out)
}

/// Bytecode given as hex text.
pub fn insns_from_hex(text: &str) -> Result<Vec<Insn>> {
    let bytes = decode_hex(text).context("invalid hex bytecode")?;
    insns_from_bytes(&bytes).context("invalid hex bytecode")
}

/// Bytecode given as conformance assembly.
pub fn insns_from_asm(text: &str) -> Result<Vec<Insn>> {
    asm::assemble(text).context("assembly failed")
}

/// Reads `path`, or standard input when it is `-`.
pub fn read_source(path: &Path) -> Result<Vec<u8>> {
    if path == Path::new("-") {
        let mut buf = Vec::new();
        std::io::stdin()
            .read_to_end(&mut buf)
            .context("cannot read standard input")?;
        return Ok(buf);
    }
    std::fs::read(path).with_context(|| format!("cannot read `{}`", path.display()))
}

/// `bytes` as UTF-8 text, for the text formats.
pub fn as_text<'a>(bytes: &'a [u8], what: &str) -> Result<&'a str> {
    std::str::from_utf8(bytes).with_context(|| format!("{what} is not UTF-8 text"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_ignores_whitespace_and_rejects_junk() {
        assert_eq!(decode_hex("aa bb\n1 1").unwrap(), [0xaa, 0xbb, 0x11]);
        assert_eq!(decode_hex("").unwrap(), Vec::<u8>::new());
        assert!(decode_hex("abc").is_err());
        assert!(decode_hex("0xab").is_err());
        assert!(decode_hex("zz").is_err());
    }

    #[test]
    fn format_detection_prefers_magic_then_extension_then_content() {
        let p = |s: &str| Some(Path::new(s).to_owned());
        assert_eq!(detect_format(None, b"\x7fELF\x02"), Format::Elf);
        assert_eq!(detect_format(p("x.s").as_deref(), b"aa"), Format::Asm);
        assert_eq!(
            detect_format(p("x.bin").as_deref(), b"b7 00 00 00"),
            Format::Hex
        );
        assert_eq!(
            detect_format(None, b"b700000001000000\n9500000000000000\n"),
            Format::Hex
        );
        assert_eq!(detect_format(None, b"mov %r0, 1\nexit\n"), Format::Asm);
        assert_eq!(detect_format(None, b""), Format::Asm);
    }
}
