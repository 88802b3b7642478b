//! Struct member offsets from the running kernel's BTF (`/sys/kernel/btf/vmlinux`), for the
//! probes that read kernel structs aya-ebpf cannot relocate (it has no CO-RE field relocations).
//!
//! A reader of the BTF format (the kernel's `Documentation/bpf/btf.rst`) just large enough for
//! that: type records, struct and union members (through anonymous ones), sizes. aya's own `Btf`
//! (aya-obj) keeps struct members crate-private; the crate that exposes them, btf-rs, is
//! LGPL-2.1, which the statically linked Apache-2.0 agent would have to carry for this much.

use std::path::Path;

pub const VMLINUX: &str = "/sys/kernel/btf/vmlinux";

const MAGIC: u16 = 0xeb9f;
const KIND_INT: u32 = 1;
const KIND_PTR: u32 = 2;
const KIND_ARRAY: u32 = 3;
const KIND_STRUCT: u32 = 4;
const KIND_UNION: u32 = 5;
const KIND_ENUM: u32 = 6;
const KIND_TYPEDEF: u32 = 8;
const KIND_VOLATILE: u32 = 9;
const KIND_CONST: u32 = 10;
const KIND_RESTRICT: u32 = 11;
const KIND_FUNC_PROTO: u32 = 13;
const KIND_VAR: u32 = 14;
const KIND_DATASEC: u32 = 15;
const KIND_DECL_TAG: u32 = 17;
const KIND_TYPE_TAG: u32 = 18;
const KIND_ENUM64: u32 = 19;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BtfError {
    #[error("{path}: {reason}")]
    Read { path: String, reason: String },
    #[error("malformed BTF: {0}")]
    Format(String),
    #[error("no struct {0} in the kernel's BTF")]
    NoStruct(String),
    #[error("struct {ty} has no member {member} in the kernel's BTF")]
    NoMember { ty: String, member: String },
    #[error("{ty}.{member} is a bit field")]
    BitField { ty: String, member: String },
}

/// One type record: where its kind-specific part starts.
#[derive(Clone, Copy)]
struct Record {
    name_off: u32,
    kind: u32,
    vlen: u32,
    kind_flag: bool,
    /// `size` or `type`, by kind.
    size_or_type: u32,
    /// Offset of the data after the 12-byte common part.
    body: usize,
}

/// A parsed BTF blob.
pub struct KernelBtf {
    data: Vec<u8>,
    /// Type id `i + 1` is `records[i]` (id 0 is `void`).
    records: Vec<Record>,
    strings: std::ops::Range<usize>,
}

/// A member found in a struct: its byte offset and type id.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Member {
    pub offset: u32,
    pub type_id: u32,
}

impl KernelBtf {
    /// The running kernel's BTF.
    pub fn vmlinux() -> Result<Self, BtfError> {
        Self::from_file(Path::new(VMLINUX))
    }

    pub fn from_file(path: &Path) -> Result<Self, BtfError> {
        let data = std::fs::read(path).map_err(|e| BtfError::Read {
            path: path.display().to_string(),
            reason: e.to_string(),
        })?;
        Self::parse(data)
    }

    pub fn parse(data: Vec<u8>) -> Result<Self, BtfError> {
        let bad = |what: &str| BtfError::Format(what.to_owned());
        let u32_at = |at: usize| -> Option<u32> {
            Some(u32::from_le_bytes(data.get(at..at + 4)?.try_into().ok()?))
        };
        let magic = data
            .get(0..2)
            .map(|b| u16::from_le_bytes([b[0], b[1]]))
            .ok_or_else(|| bad("shorter than its header"))?;
        if magic != MAGIC {
            return Err(bad("bad magic (not little-endian BTF)"));
        }
        let field = |at| {
            u32_at(at)
                .map(|v| v as usize)
                .ok_or_else(|| bad("short header"))
        };
        let hdr_len = field(4)?;
        let (type_off, type_len) = (field(8)?, field(12)?);
        let (str_off, str_len) = (field(16)?, field(20)?);
        let types = hdr_len + type_off..hdr_len + type_off + type_len;
        let strings = hdr_len + str_off..hdr_len + str_off + str_len;
        if types.end > data.len() || strings.end > data.len() {
            return Err(bad("sections past the end"));
        }
        let mut records = Vec::new();
        let mut at = types.start;
        while at < types.end {
            let (name_off, info, size_or_type) = match (u32_at(at), u32_at(at + 4), u32_at(at + 8))
            {
                (Some(a), Some(b), Some(c)) => (a, b, c),
                _ => return Err(bad("truncated type record")),
            };
            let kind = (info >> 24) & 0x1f;
            let vlen = info & 0xffff;
            let body = at + 12;
            let extra = match kind {
                KIND_INT | KIND_VAR | KIND_DECL_TAG => 4,
                KIND_ARRAY => 12,
                KIND_STRUCT | KIND_UNION | KIND_DATASEC | KIND_ENUM64 => 12 * vlen as usize,
                KIND_ENUM | KIND_FUNC_PROTO => 8 * vlen as usize,
                0..=19 => 0,
                other => return Err(BtfError::Format(format!("unknown type kind {other}"))),
            };
            records.push(Record {
                name_off,
                kind,
                vlen,
                kind_flag: info >> 31 != 0,
                size_or_type,
                body,
            });
            at = body + extra;
        }
        if at != types.end {
            return Err(bad("type section does not end on a record"));
        }
        Ok(Self {
            data,
            records,
            strings,
        })
    }

    fn name(&self, offset: u32) -> &str {
        let start = self.strings.start + offset as usize;
        let bytes = self.data.get(start..self.strings.end).unwrap_or_default();
        let end = bytes.iter().position(|b| *b == 0).unwrap_or(bytes.len());
        std::str::from_utf8(&bytes[..end]).unwrap_or("")
    }

    fn record(&self, id: u32) -> Option<Record> {
        id.checked_sub(1)
            .and_then(|i| self.records.get(i as usize))
            .copied()
    }

    fn u32_at(&self, at: usize) -> u32 {
        self.data
            .get(at..at + 4)
            .and_then(|b| b.try_into().ok())
            .map_or(0, u32::from_le_bytes)
    }

    /// The id of the struct (or union) `name` with members (not a forward declaration).
    pub fn struct_id(&self, name: &str) -> Option<u32> {
        self.records
            .iter()
            .position(|r| {
                (r.kind == KIND_STRUCT || r.kind == KIND_UNION)
                    && r.vlen > 0
                    && self.name(r.name_off) == name
            })
            .map(|i| i as u32 + 1)
    }

    /// Whether a typedef `name` exists (`btf_trace_<tracepoint>` for each tracepoint).
    pub fn has_typedef(&self, name: &str) -> bool {
        self.records
            .iter()
            .any(|r| r.kind == KIND_TYPEDEF && self.name(r.name_off) == name)
    }

    /// `id` with typedefs and qualifiers (const, volatile, restrict, type tags) stripped.
    fn resolve(&self, mut id: u32) -> Option<(u32, Record)> {
        for _ in 0..32 {
            let r = self.record(id)?;
            match r.kind {
                KIND_TYPEDEF | KIND_VOLATILE | KIND_CONST | KIND_RESTRICT | KIND_TYPE_TAG => {
                    id = r.size_or_type
                }
                _ => return Some((id, r)),
            }
        }
        None
    }

    /// Size in bytes of type `id` (ints, pointers, enums, structs, arrays).
    pub fn size_of(&self, id: u32) -> Option<u32> {
        let (_, r) = self.resolve(id)?;
        match r.kind {
            KIND_PTR => Some(8),
            KIND_INT | KIND_ENUM | KIND_ENUM64 | KIND_STRUCT | KIND_UNION => Some(r.size_or_type),
            KIND_ARRAY => {
                let elem = self.u32_at(r.body);
                Some(self.size_of(elem)? * self.u32_at(r.body + 8))
            }
            _ => None,
        }
    }

    /// Whether type `id` is a pointer.
    pub fn is_pointer(&self, id: u32) -> bool {
        self.resolve(id).is_some_and(|(_, r)| r.kind == KIND_PTR)
    }

    /// Member `member` of struct or union `ty`, looked for through anonymous members too.
    pub fn member(&self, ty: &str, member: &str) -> Result<Member, BtfError> {
        let id = self
            .struct_id(ty)
            .ok_or_else(|| BtfError::NoStruct(ty.to_owned()))?;
        match self.find_member(id, member, 0) {
            Some(Ok(m)) => Ok(m),
            Some(Err(())) => Err(BtfError::BitField {
                ty: ty.to_owned(),
                member: member.to_owned(),
            }),
            None => Err(BtfError::NoMember {
                ty: ty.to_owned(),
                member: member.to_owned(),
            }),
        }
    }

    /// The byte offset of `ty.member`, with the reason as text when there is none.
    pub fn offset(&self, ty: &str, member: &str) -> Result<u32, String> {
        self.member(ty, member)
            .map(|m| m.offset)
            .map_err(|e| e.to_string())
    }

    /// `Err(())` for a bit field: no byte offset.
    fn find_member(&self, id: u32, member: &str, depth: u32) -> Option<Result<Member, ()>> {
        let (_, r) = self.resolve(id)?;
        if (r.kind != KIND_STRUCT && r.kind != KIND_UNION) || depth > 8 {
            return None;
        }
        for i in 0..r.vlen as usize {
            let at = r.body + 12 * i;
            let (name_off, type_id, raw) =
                (self.u32_at(at), self.u32_at(at + 4), self.u32_at(at + 8));
            let (bits, bitfield) = if r.kind_flag {
                (raw & 0x00ff_ffff, raw >> 24 != 0)
            } else {
                (raw, false)
            };
            let name = self.name(name_off);
            if name == member {
                if bitfield || bits % 8 != 0 {
                    return Some(Err(()));
                }
                return Some(Ok(Member {
                    offset: bits / 8,
                    type_id,
                }));
            }
            if name.is_empty()
                && let Some(found) = self.find_member(type_id, member, depth + 1)
            {
                return Some(found.map(|m| Member {
                    offset: m.offset + bits / 8,
                    ..m
                }));
            }
        }
        None
    }
}

/// Offsets of kernel structs that programs read, found in the running kernel's BTF and handed
/// to the programs as load-time globals.
pub trait KernelLayout {
    fn from_btf(btf: &KernelBtf) -> Result<Self, String>
    where
        Self: Sized;

    /// Sets the programs' layout globals (`set_layout`).
    fn set_globals<'a>(&'a self, loader: &mut aya::EbpfLoader<'a>);
}

/// Layout `L` of the running kernel, from its BTF (or why that could not be read).
pub(super) fn layout<L: KernelLayout>(btf: &Result<KernelBtf, String>) -> Result<L, String> {
    btf.as_ref().map_err(Clone::clone).and_then(L::from_btf)
}

/// Sets a layout's globals in the programs (`name`, value) and its flag `known` to 1: frozen
/// `.rodata`, which the verifier reads as constants.
pub(super) fn set_layout<'a>(
    loader: &mut aya::EbpfLoader<'a>,
    values: &[(&'static str, &'a u32)],
    known: &'static str,
) {
    static KNOWN: u32 = 1;
    for (name, value) in values {
        loader.override_global(name, *value, true);
    }
    loader.override_global(known, &KNOWN, true);
}

/// `task_struct.exit_code`'s offset, for the signal that killed a process.
pub(super) fn write_task_layout(
    btf: &Result<KernelBtf, String>,
    settings: &mut aya::maps::Array<aya::maps::MapData, u32>,
) {
    let offset = match btf {
        Ok(btf) => btf
            .member("task_struct", "exit_code")
            .map(|m| m.offset + 1)
            .map_err(|e| e.to_string()),
        Err(reason) => Err(reason.clone()),
    };
    let written = offset.and_then(|offset| {
        settings
            .set(runner_monitor_common::setting::TASK_EXIT_CODE, offset, 0)
            .map_err(|e| e.to_string())
    });
    if let Err(reason) = written {
        tracing::warn!(%reason, "the signal that kills a job process will not be known");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A BTF blob built by hand: `struct outer { int a; union { long b; struct inner c; }; }`,
    /// `struct inner { char *p; }`, `typedef struct inner inner_t`.
    fn blob() -> Vec<u8> {
        let strings = b"\0int\0long\0outer\0a\0b\0c\0inner\0p\0char\0inner_t\0";
        let s = |name: &str| -> u32 {
            let needle = format!("\0{name}\0");
            strings
                .windows(needle.len())
                .position(|w| w == needle.as_bytes())
                .unwrap() as u32
                + 1
        };
        let mut types: Vec<u32> = Vec::new();
        let info = |kind: u32, vlen: u32| (kind << 24) | vlen;
        // 1: int (4 bytes)
        types.extend([s("int"), info(KIND_INT, 0), 4, 32]);
        // 2: long (8 bytes)
        types.extend([s("long"), info(KIND_INT, 0), 8, 64]);
        // 3: char
        types.extend([s("char"), info(KIND_INT, 0), 1, 8]);
        // 4: char *
        types.extend([0, info(KIND_PTR, 0), 3]);
        // 5: struct inner { char *p; }
        types.extend([s("inner"), info(KIND_STRUCT, 1), 8, s("p"), 4, 0]);
        // 6: typedef struct inner inner_t
        types.extend([s("inner_t"), info(KIND_TYPEDEF, 0), 5]);
        // 7: union { long b; inner_t c; }
        types.extend([0, info(KIND_UNION, 2), 8, s("b"), 2, 0, s("c"), 6, 0]);
        // 8: struct outer { int a; union (at 8 bytes); }
        types.extend([s("outer"), info(KIND_STRUCT, 2), 16, s("a"), 1, 0, 0, 7, 64]);
        let types: Vec<u8> = types.iter().flat_map(|v| v.to_le_bytes()).collect();
        let mut out = Vec::new();
        out.extend(MAGIC.to_le_bytes());
        out.extend([1u8, 0]);
        for v in [
            24u32,
            0,
            types.len() as u32,
            types.len() as u32,
            strings.len() as u32,
        ] {
            out.extend(v.to_le_bytes());
        }
        out.extend(types);
        out.extend(strings);
        out
    }

    #[test]
    fn members_are_found_through_anonymous_unions_and_typedefs() {
        let btf = KernelBtf::parse(blob()).unwrap();
        assert_eq!(btf.member("outer", "a").unwrap().offset, 0);
        assert_eq!(btf.member("outer", "b").unwrap().offset, 8);
        let c = btf.member("outer", "c").unwrap();
        assert_eq!(c.offset, 8);
        assert_eq!(btf.size_of(c.type_id), Some(8));
        let p = btf.member("inner", "p").unwrap();
        assert!(btf.is_pointer(p.type_id));
        assert_eq!(
            btf.member("outer", "zz"),
            Err(BtfError::NoMember {
                ty: "outer".into(),
                member: "zz".into()
            })
        );
        assert_eq!(
            btf.member("nope", "a"),
            Err(BtfError::NoStruct("nope".into()))
        );
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        assert!(KernelBtf::parse(vec![]).is_err());
        assert!(KernelBtf::parse(vec![0x9f, 0xeb, 1, 0, 24, 0, 0]).is_err());
        let mut cut = blob();
        cut.truncate(40);
        assert!(KernelBtf::parse(cut).is_err());
    }

    /// The running kernel's own BTF, where there is one: `struct filename` starts with its name.
    #[test]
    fn the_running_kernels_filename_struct_starts_with_its_name() {
        let Ok(btf) = KernelBtf::vmlinux() else {
            eprintln!("no {VMLINUX}: skipped");
            return;
        };
        let name = btf.member("filename", "name").unwrap();
        assert_eq!(name.offset, 0);
        assert!(btf.is_pointer(name.type_id));
    }
}
