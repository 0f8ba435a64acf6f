//! `NaN`, `Infinity` and `-Infinity` in request JSON. TF Serving parses bodies with
//! RapidJSON's `kParseNanAndInfFlag`, so these bare tokens are numbers to it, and it writes
//! them back the same way (as does [`super::encode_predict`]). serde_json cannot be told to
//! accept them, so a body that has them is rewritten before it is parsed: each such token
//! outside a string becomes a string holding a marker (`"\u0000NaN"`, ...), which the
//! decoders read back as the number. A body without them is parsed as it came, uncopied.

use std::borrow::Cow;

/// The bare tokens, longest first (`-Infinity` before `Infinity`), with their values.
const TOKENS: [(&str, f64); 3] = [
    ("-Infinity", f64::NEG_INFINITY),
    ("Infinity", f64::INFINITY),
    ("NaN", f64::NAN),
];

/// What a marker string starts with: a NUL, which no client string needs in a number's
/// place.
const MARKER: char = '\0';

/// The body with every bare `NaN` / `Infinity` / `-Infinity` value turned into a marker
/// string; the body itself when it has none.
pub fn mark_nonfinite(body: &[u8]) -> Cow<'_, [u8]> {
    if !body.iter().any(|&b| b == b'N' || b == b'I') {
        return Cow::Borrowed(body);
    }
    let mut out: Option<Vec<u8>> = None;
    let mut copied = 0;
    let mut in_string = false;
    let mut escaped = false;
    let mut i = 0;
    while i < body.len() {
        let byte = body[i];
        if in_string {
            match byte {
                _ if escaped => escaped = false,
                b'\\' => escaped = true,
                b'"' => in_string = false,
                _ => {}
            }
            i += 1;
            continue;
        }
        if byte == b'"' {
            in_string = true;
            i += 1;
            continue;
        }
        let token = TOKENS
            .iter()
            .map(|(token, _)| *token)
            .find(|token| is_value_at(body, i, token));
        match token {
            Some(token) => {
                let out = out.get_or_insert_with(|| Vec::with_capacity(body.len() + 64));
                out.extend_from_slice(&body[copied..i]);
                out.extend_from_slice(b"\"\\u0000");
                out.extend_from_slice(token.as_bytes());
                out.push(b'"');
                i += token.len();
                copied = i;
            }
            None => i += 1,
        }
    }
    match out {
        None => Cow::Borrowed(body),
        Some(mut out) => {
            out.extend_from_slice(&body[copied..]);
            Cow::Owned(out)
        }
    }
}

/// Whether `token` stands at `at` as a whole value: after `[`, `,` or `:` (whitespace
/// aside) and followed by a delimiter or the end.
fn is_value_at(body: &[u8], at: usize, token: &str) -> bool {
    if !body[at..].starts_with(token.as_bytes()) {
        return false;
    }
    let before = body[..at].iter().rev().find(|b| !b.is_ascii_whitespace());
    let after = body.get(at + token.len());
    matches!(before, Some(b'[' | b',' | b':'))
        && after.is_none_or(|b| b.is_ascii_whitespace() || matches!(b, b',' | b']' | b'}'))
}

/// The number a marker string stands for; `None` for any other string.
pub fn nonfinite_value(text: &str) -> Option<f64> {
    let token = text.strip_prefix(MARKER)?;
    TOKENS
        .iter()
        .find(|(name, _)| *name == token)
        .map(|&(_, value)| value)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn marked(text: &str) -> String {
        String::from_utf8(mark_nonfinite(text.as_bytes()).into_owned()).unwrap()
    }

    #[test]
    fn bare_tokens_become_markers_and_strings_are_left_alone() {
        assert_eq!(
            marked(r#"{"instances": [NaN, -Infinity,Infinity ]}"#),
            r#"{"instances": ["\u0000NaN", "\u0000-Infinity","\u0000Infinity" ]}"#
        );
        let untouched = r#"{"NaN": "Infinity, NaN", "x": [1, "a \" NaN"], "y": NaNa}"#;
        assert_eq!(marked(untouched), untouched);
        assert!(matches!(mark_nonfinite(b"[1, 2]"), Cow::Borrowed(_)));
    }

    #[test]
    fn markers_read_back_as_the_numbers() {
        let values: Vec<String> =
            serde_json::from_slice(&mark_nonfinite(b"[NaN, Infinity, -Infinity]")).unwrap();
        let numbers: Vec<f64> = values.iter().filter_map(|v| nonfinite_value(v)).collect();
        assert!(numbers[0].is_nan());
        assert_eq!(numbers[1..], [f64::INFINITY, f64::NEG_INFINITY]);
        assert_eq!(nonfinite_value("NaN"), None);
    }
}
