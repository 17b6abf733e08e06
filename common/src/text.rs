//! Making untrusted text safe to print. Process names (any local user sets
//! their own `/proc/PID/comm`) and lines a server sends can carry terminal
//! escape sequences that rewrite what an operator sees, or the window
//! title, or worse on some terminals. Everything such text reaches the
//! terminal through goes through [`printable`].

/// `s` with every control character (C0, DEL and C1) written as a Rust
/// escape (`\u{1b}`), and everything else unchanged.
pub fn printable(s: &str) -> String {
    if !s.chars().any(char::is_control) {
        return s.to_owned();
    }
    s.chars().map(|c| if c.is_control() { c.escape_unicode().to_string() } else { c.to_string() }).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_control_characters_only() {
        assert_eq!(printable("apache2"), "apache2");
        assert_eq!(printable("naïve ünïcode"), "naïve ünïcode");
        assert_eq!(printable("\u{1b}]0;pwned\u{7}x"), "\\u{1b}]0;pwned\\u{7}x");
        assert_eq!(printable("a\nb\rc\td"), "a\\u{a}b\\u{d}c\\u{9}d");
        assert_eq!(printable("\u{7f}\u{9b}31m"), "\\u{7f}\\u{9b}31m");
    }
}
