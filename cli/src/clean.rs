//! Text from a node or a guest (console output, reasons, labels, names) is cleaned before the
//! CLI prints it: a device must not be able to drive the operator's terminal (move the cursor,
//! set the window title, answer back). C0 controls but newline and tab, DEL, and the C1
//! controls (U+0080-U+009F, whose UTF-8 forms some terminals obey as ESC-sequences) are
//! removed; a carriage return before a newline is kept out of the way the same.

use std::borrow::Cow;

/// Whether `c` may reach the terminal.
fn printable(c: char) -> bool {
    c == '\n' || c == '\t' || !c.is_control()
}

/// `text` without the controls a terminal would act on (see the module's doc).
pub fn clean(text: &str) -> Cow<'_, str> {
    if text.chars().all(printable) {
        Cow::Borrowed(text)
    } else {
        Cow::Owned(text.chars().filter(|&c| printable(c)).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn terminal_controls_are_removed_text_is_kept() {
        assert!(matches!(clean("plain text\twith tab\n"), Cow::Borrowed(_)));
        // A title change (OSC 0), a cursor move (CSI), a bell and a NUL.
        assert_eq!(clean("a\x1b]0;owned\x07b\x1b[2Jc\0d"), "a]0;ownedb[2Jcd");
        // The C1 forms: CSI (U+009B) and OSC (U+009D) as UTF-8.
        assert_eq!(clean("x\u{9b}31my\u{9d}0;t\u{9c}z"), "x31my0;tz");
        assert_eq!(clean("line\r\nnext\x7f"), "line\nnext");
        // Non-ASCII text stays.
        assert_eq!(clean("zürich ✓ 東京"), "zürich ✓ 東京");
    }
}
