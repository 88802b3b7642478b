//! JSON lines for people's terminals and for log pipelines: the alert stream, the event trace and
//! the control socket's answers.
//!
//! serde_json escapes only what JSON requires (`"`, `\` and U+0000..U+001F). Strings from the
//! kernel and from jobs (paths, comm, arguments, job names) may also hold DEL, the C1 controls
//! U+0080..U+009F (U+009B is CSI, which terminals act on like `ESC [`) and the line separators
//! U+2028/U+2029 (line breaks to JavaScript and some log viewers). Those are escaped here too, so
//! `tail -f alerts.jsonl` can neither be steered nor made to show forged lines, and the line
//! still reads back as the same value.

use std::io::{self, Write};

use serde::Serialize;

/// Compact JSON, with every control character escaped (not only those JSON requires).
#[derive(Clone, Copy, Debug, Default)]
struct EscapeControls;

fn needs_escape(c: char) -> bool {
    matches!(c, '\u{7f}'..='\u{9f}' | '\u{2028}' | '\u{2029}')
}

impl serde_json::ser::Formatter for EscapeControls {
    fn write_string_fragment<W: ?Sized + Write>(
        &mut self,
        writer: &mut W,
        fragment: &str,
    ) -> io::Result<()> {
        let mut start = 0;
        for (i, c) in fragment.char_indices() {
            if needs_escape(c) {
                writer.write_all(&fragment.as_bytes()[start..i])?;
                write!(writer, "\\u{:04x}", u32::from(c))?;
                start = i + c.len_utf8();
            }
        }
        writer.write_all(&fragment.as_bytes()[start..])
    }
}

/// `value` as one JSON line (without the newline) in which no character is a control character.
pub fn line<T: ?Sized + Serialize>(value: &T) -> serde_json::Result<Vec<u8>> {
    let mut out = Vec::with_capacity(256);
    value.serialize(&mut serde_json::Serializer::with_formatter(
        &mut out,
        EscapeControls,
    ))?;
    Ok(out)
}

/// `line` as a `String`.
pub fn line_string<T: ?Sized + Serialize>(value: &T) -> serde_json::Result<String> {
    // The formatter writes only whole UTF-8 characters and ASCII escapes.
    Ok(String::from_utf8(line(value)?).expect("serde_json writes UTF-8"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn del_c1_and_line_separators_are_escaped_and_read_back() {
        let hostile = "a\u{7f}b\u{9b}2Jc\u{1b}]0;pwn\u{7}\n\u{2028}d\u{85}é€";
        let s = line_string(&serde_json::json!({ "path": hostile, hostile: 1 })).unwrap();
        assert!(
            !s.contains(|c: char| c.is_control() || needs_escape(c)),
            "{s}"
        );
        assert!(s.contains("\\u007f") && s.contains("\\u009b") && s.contains("\\u2028"));
        assert!(s.contains("é€"), "printable non-ASCII stays as it is: {s}");
        let back: serde_json::Value = serde_json::from_str(&s).unwrap();
        assert_eq!(back["path"], hostile);
        assert_eq!(back[hostile], 1);
    }

    #[test]
    fn plain_values_are_serde_jsons_compact_form() {
        let v = serde_json::json!({"a": [1, "x\"y\\"], "b": null});
        assert_eq!(line_string(&v).unwrap(), serde_json::to_string(&v).unwrap());
    }
}
