//! Restricted XML reading for documents received from peers (RFC 3080 §6.4, BEEP-13).
//!
//! Parses a small document into an element tree while enforcing the `application/beep+xml`
//! rules: no XML declaration, no DOCTYPE, only the five predefined entities and numeric
//! character references, and the depth/attribute bounds of [`Limits`](crate::Limits).
//! Comments and processing instructions are skipped (they are legal XML 1.0 constructs).
//! Used for channel-0 documents, which are small and rare; not on the data path.

use quick_xml::events::{BytesStart, Event};
use quick_xml::Reader;
use thiserror::Error;

/// Why a document was rejected. Every case is answered with reply code 500 or 501.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum XmlError {
    /// Not well-formed XML.
    #[error("poorly-formed XML: {0}")]
    Syntax(String),
    /// An XML declaration (forbidden by RFC 3080 §6.4).
    #[error("XML declaration is not allowed")]
    Declaration,
    /// A DOCTYPE (forbidden by RFC 3080 §6.4).
    #[error("DOCTYPE is not allowed")]
    Doctype,
    /// Nesting deeper than the limit.
    #[error("elements nested deeper than {0}")]
    TooDeep(usize),
    /// More attributes on one element than the limit.
    #[error("more than {0} attributes on one element")]
    TooManyAttributes(usize),
    /// Not exactly one root element, or text outside it.
    #[error("document must be exactly one element")]
    NotOneRoot,
    /// Not UTF-8.
    #[error("document is not UTF-8")]
    NotUtf8,
}

/// One element: name, attributes in document order, concatenated character data, children.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Element {
    /// Qualified name as written.
    pub name: String,
    /// Attributes, unescaped.
    pub attributes: Vec<(String, String)>,
    /// Character data and CDATA directly inside this element, unescaped.
    pub text: String,
    /// Child elements.
    pub children: Vec<Element>,
}

impl Element {
    /// The value of attribute `name`.
    pub fn attr(&self, name: &str) -> Option<&str> {
        self.attributes
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// Parses `doc` into its root element.
pub fn parse(doc: &[u8], max_depth: usize, max_attributes: usize) -> Result<Element, XmlError> {
    let text = std::str::from_utf8(doc).map_err(|_| XmlError::NotUtf8)?;
    let mut reader = Reader::from_str(text);
    reader.config_mut().check_comments = true;
    let mut stack: Vec<Element> = Vec::new();
    let mut root: Option<Element> = None;
    loop {
        let event = reader
            .read_event()
            .map_err(|e| XmlError::Syntax(e.to_string()))?;
        match event {
            Event::Decl(_) => return Err(XmlError::Declaration),
            Event::DocType(_) => return Err(XmlError::Doctype),
            Event::PI(_) | Event::Comment(_) => {}
            Event::Start(start) | Event::Empty(start) if root.is_some() => {
                let _ = start;
                return Err(XmlError::NotOneRoot);
            }
            Event::Start(start) => {
                if stack.len() >= max_depth {
                    return Err(XmlError::TooDeep(max_depth));
                }
                stack.push(element(&start, max_attributes)?);
            }
            Event::Empty(start) => {
                if stack.len() >= max_depth {
                    return Err(XmlError::TooDeep(max_depth));
                }
                let el = element(&start, max_attributes)?;
                attach(&mut stack, &mut root, el);
            }
            Event::End(_) => {
                // quick-xml checks that end names match their start tags.
                let el = stack.pop().ok_or(XmlError::NotOneRoot)?;
                attach(&mut stack, &mut root, el);
            }
            Event::Text(t) => {
                let value = t.unescape().map_err(|e| XmlError::Syntax(e.to_string()))?;
                match stack.last_mut() {
                    Some(el) => el.text.push_str(&value),
                    None if value.trim().is_empty() => {}
                    None => return Err(XmlError::NotOneRoot),
                }
            }
            Event::CData(c) => {
                let value = std::str::from_utf8(&c).map_err(|_| XmlError::NotUtf8)?;
                match stack.last_mut() {
                    Some(el) => el.text.push_str(value),
                    None => return Err(XmlError::NotOneRoot),
                }
            }
            Event::Eof => break,
        }
    }
    if !stack.is_empty() {
        return Err(XmlError::Syntax("unclosed element".into()));
    }
    root.ok_or(XmlError::NotOneRoot)
}

fn element(start: &BytesStart<'_>, max_attributes: usize) -> Result<Element, XmlError> {
    let name = std::str::from_utf8(start.name().as_ref())
        .map_err(|_| XmlError::NotUtf8)?
        .to_owned();
    let mut attributes = Vec::new();
    for attr in start.attributes() {
        let attr = attr.map_err(|e| XmlError::Syntax(e.to_string()))?;
        if attributes.len() == max_attributes {
            return Err(XmlError::TooManyAttributes(max_attributes));
        }
        let key = std::str::from_utf8(attr.key.as_ref())
            .map_err(|_| XmlError::NotUtf8)?
            .to_owned();
        let value = attr
            .unescape_value()
            .map_err(|e| XmlError::Syntax(e.to_string()))?
            .into_owned();
        attributes.push((key, value));
    }
    Ok(Element {
        name,
        attributes,
        ..Element::default()
    })
}

fn attach(stack: &mut [Element], root: &mut Option<Element>, el: Element) {
    match stack.last_mut() {
        Some(parent) => parent.children.push(el),
        None => *root = Some(el),
    }
}

/// Escapes text for an attribute value quoted with `'` or for character data.
pub fn escape(text: &str) -> std::borrow::Cow<'_, str> {
    quick_xml::escape::escape(text)
}

/// Whether `c` is a `Char` of XML 1.0 §2.2: tab, line feed, carriage return, and every
/// character from U+0020 up except the surrogates, U+FFFE and U+FFFF. Every other character
/// is forbidden in a document, written literally or as a character reference.
pub fn is_xml_char(c: char) -> bool {
    matches!(c, '\t' | '\n' | '\r' | '\u{20}'..='\u{D7FF}' | '\u{E000}'..='\u{FFFD}' | '\u{10000}'..)
}

/// Where the first character XML 1.0 §2.2 forbids (see [`is_xml_char`]) starts in the UTF-8
/// `text`, if any: a C0 control other than tab, line feed and carriage return, or U+FFFE or
/// U+FFFF (`EF BF BE`, `EF BF BF`); surrogates cannot occur in UTF-8.
///
/// Runs over every control document on the data path, so it tests eight octets at a time and
/// looks at single octets only in words holding an octet below 0x20 or an 0xEF (line ends
/// and a few scripts' characters): the classic "has less than" word test is exact about
/// whether a word holds such an octet.
pub fn forbidden_char(text: &[u8]) -> Option<usize> {
    const LOW: u64 = 0x0101_0101_0101_0101;
    const HIGH: u64 = 0x8080_8080_8080_8080;
    let has_below_space = |v: u64| v.wrapping_sub(LOW * 0x20) & !v & HIGH;
    let has_zero = |v: u64| v.wrapping_sub(LOW) & !v & HIGH;
    let forbidden_at = |i: usize| match text[i] {
        b'\t' | b'\n' | b'\r' => false,
        b if b < 0x20 => true,
        0xEF => text.get(i + 1) == Some(&0xBF) && matches!(text.get(i + 2), Some(0xBE | 0xBF)),
        _ => false,
    };
    let mut chunks = text.chunks_exact(8);
    let mut offset = 0;
    for chunk in &mut chunks {
        let mut word = [0u8; 8];
        word.copy_from_slice(chunk);
        let word = u64::from_le_bytes(word);
        if has_below_space(word) | has_zero(word ^ (LOW * 0xEF)) != 0 {
            if let Some(i) = (offset..offset + 8).find(|&i| forbidden_at(i)) {
                return Some(i);
            }
        }
        offset += 8;
    }
    (offset..offset + chunks.remainder().len()).find(|&i| forbidden_at(i))
}

/// Checks the character references (`&#N;`, `&#xH;`) in `raw`, the text or attribute value of
/// a document as written: each must name a character XML 1.0 §2.2 allows (§4.1 "Well-formedness
/// constraint: Legal Character"). References that do not parse are left to the XML reader.
pub fn references_are_chars(raw: &[u8]) -> bool {
    let mut rest = raw;
    while let Some(amp) = memchr::memchr(b'&', rest) {
        rest = &rest[amp + 1..];
        let Some(number) = rest.strip_prefix(b"#") else {
            continue;
        };
        let Some(end) = memchr::memchr(b';', number) else {
            return true;
        };
        let digits = &number[..end];
        let value = match digits.strip_prefix(b"x") {
            Some(hex) => std::str::from_utf8(hex)
                .ok()
                .and_then(|h| u32::from_str_radix(h, 16).ok()),
            None => std::str::from_utf8(digits)
                .ok()
                .and_then(|d| d.parse::<u32>().ok()),
        };
        // An unparsable or overlong number names no character at all.
        if !value.and_then(char::from_u32).is_some_and(is_xml_char) {
            return false;
        }
        rest = &number[end..];
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(doc: &str) -> Result<Element, XmlError> {
        parse(doc.as_bytes(), 8, 8)
    }

    #[test]
    fn parses_greeting_shape() {
        let el = p("<greeting features='x-a'>\r\n   <profile uri='http://iana.org/beep/APEX' />\r\n</greeting>\r\n").unwrap();
        assert_eq!(el.name, "greeting");
        assert_eq!(el.attr("features"), Some("x-a"));
        assert_eq!(
            el.children[0].attr("uri"),
            Some("http://iana.org/beep/APEX")
        );
    }

    #[test]
    fn beep_13_rejects_declaration_doctype_and_unknown_entities() {
        assert_eq!(p("<?xml version='1.0'?><ok />"), Err(XmlError::Declaration));
        assert_eq!(p("<!DOCTYPE ok><ok />"), Err(XmlError::Doctype));
        assert!(matches!(
            p("<error code='500'>&foo;</error>"),
            Err(XmlError::Syntax(_))
        ));
        let el = p("<error code='500'>a &amp; b &#65;&#x42;</error>").unwrap();
        assert_eq!(el.text, "a & b AB");
    }

    /// XML 1.0 §2.2: the characters a document may hold, literally or by reference.
    #[test]
    fn xml_chars_of_xml_1_0_section_2_2() {
        for c in [
            '\t',
            '\n',
            '\r',
            ' ',
            'a',
            '\u{D7FF}',
            '\u{E000}',
            '\u{FFFD}',
            '\u{10000}',
        ] {
            assert!(is_xml_char(c), "{c:?} is allowed");
        }
        for c in [
            '\0', '\u{1}', '\u{8}', '\u{B}', '\u{C}', '\u{1F}', '\u{FFFE}', '\u{FFFF}',
        ] {
            assert!(!is_xml_char(c), "{c:?} is forbidden");
        }
        assert_eq!(forbidden_char(b"plain text\r\n\twith line ends"), None);
        assert_eq!(
            forbidden_char("fullwidth \u{FF0C} and \u{FFFD}".as_bytes()),
            None
        );
        // At every position of a long text, in a word or in the tail.
        for at in 0..20 {
            for bad in ["\0", "\u{1}", "\u{1F}", "\u{B}", "\u{FFFE}", "\u{FFFF}"] {
                let text = format!("{}{bad}{}", "x".repeat(at), "y".repeat(at % 7));
                assert_eq!(forbidden_char(text.as_bytes()), Some(at), "{bad:?} at {at}");
            }
        }
        assert!(references_are_chars(
            b"a &amp; &#65;&#x42; &#9;&#xD;&#10; &#x10FFFF;"
        ));
        for bad in [
            "&#0;",
            "&#x0;",
            "&#1;",
            "&#x1F;",
            "&#xFFFE;",
            "&#65535;",
            "&#xD800;",
            "&#x110000;",
            "&#99999999999;",
        ] {
            assert!(!references_are_chars(bad.as_bytes()), "{bad}");
        }
    }

    #[test]
    fn cdata_and_pi_are_allowed() {
        let el = p("<?pi x?><profile uri='u'><![CDATA[<ready />]]></profile>").unwrap();
        assert_eq!(el.text, "<ready />");
    }

    #[test]
    fn bounds_are_enforced() {
        assert_eq!(
            parse(b"<a><b><c/></b></a>", 2, 8),
            Err(XmlError::TooDeep(2))
        );
        assert_eq!(
            parse(b"<a x='1' y='2' z='3'/>", 4, 2),
            Err(XmlError::TooManyAttributes(2))
        );
        assert_eq!(p("<a/><b/>"), Err(XmlError::NotOneRoot));
        assert_eq!(p("text<a/>"), Err(XmlError::NotOneRoot));
        assert!(p("<a>").is_err());
        assert!(p("<a></b>").is_err());
    }
}
