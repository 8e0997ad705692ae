//! The one parser of `key=value,...` options (the `ext-vmm` command line and `--restore`), in
//! Cloud Hypervisor's grammar: options separated by commas, a value may be a list in brackets
//! whose commas do not split (`queue_sizes=[256,256]`), a bare word is a key with an empty
//! value. Keys are checked against the option's known set, so a typo is an error, not a
//! silently ignored setting.

use super::error::{Error, Result};

/// The parsed options of one command-line argument, in order.
#[derive(Debug)]
pub struct Options<'a> {
    option: &'a str,
    text: &'a str,
    pairs: Vec<(&'a str, &'a str)>,
}

impl<'a> Options<'a> {
    /// Splits `text` (the value of `--<option>`) and checks every key is in `known`.
    pub fn parse(option: &'a str, text: &'a str, known: &[&str]) -> Result<Self> {
        let mut pairs = Vec::new();
        let mut depth = 0usize;
        let mut start = 0;
        let mut items = Vec::new();
        for (i, c) in text.char_indices() {
            match c {
                '[' => depth += 1,
                ']' => {
                    depth = depth.checked_sub(1).ok_or_else(|| {
                        Error::InvalidOption(format!("--{option} {text}: unbalanced ']'"))
                    })?
                }
                ',' if depth == 0 => {
                    items.push(&text[start..i]);
                    start = i + 1;
                }
                _ => {}
            }
        }
        if depth != 0 {
            return Err(Error::InvalidOption(format!(
                "--{option} {text}: unbalanced '['"
            )));
        }
        items.push(&text[start..]);
        for item in items.into_iter().filter(|s| !s.is_empty()) {
            let (key, value) = item.split_once('=').unwrap_or((item, ""));
            if !known.contains(&key) {
                return Err(Error::InvalidOption(format!(
                    "--{option} {text}: unknown option {key:?} (expected {})",
                    known.join(", ")
                )));
            }
            if pairs.iter().any(|(k, _)| *k == key) {
                return Err(Error::InvalidOption(format!(
                    "--{option} {text}: {key} given twice"
                )));
            }
            pairs.push((key, value));
        }
        Ok(Options {
            option,
            text,
            pairs,
        })
    }

    /// The value of `key`, if given.
    pub fn get(&self, key: &str) -> Option<&'a str> {
        self.pairs.iter().find(|(k, _)| *k == key).map(|(_, v)| *v)
    }

    /// The non-empty value of `key`, or the "is required" error.
    pub fn required(&self, key: &str) -> Result<&'a str> {
        self.get(key)
            .filter(|v| !v.is_empty())
            .ok_or_else(|| self.invalid(key, "is required"))
    }

    /// Whether the bare word or key `key` was given.
    pub fn has(&self, key: &str) -> bool {
        self.get(key).is_some()
    }

    /// The error for an invalid value of `key`.
    pub fn invalid(&self, key: &str, why: &str) -> Error {
        Error::InvalidOption(format!("--{} {}: {key} {why}", self.option, self.text))
    }

    /// `on`/`off` (or `true`/`false`) of `key`; `default` when absent.
    pub fn on_off(&self, key: &str, default: bool) -> Result<bool> {
        match self.get(key) {
            None => Ok(default),
            Some("on" | "true") => Ok(true),
            Some("off" | "false") => Ok(false),
            Some(_) => Err(self.invalid(key, "must be on or off")),
        }
    }

    /// A list value `[a,b]` (or a single bare value) of `key`.
    pub fn list(&self, key: &str) -> Option<Vec<&'a str>> {
        self.get(key).map(|value| {
            let inner = value
                .strip_prefix('[')
                .and_then(|v| v.strip_suffix(']'))
                .unwrap_or(value);
            inner.split(',').filter(|s| !s.is_empty()).collect()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cloud_hypervisor_grammar() {
        let o = Options::parse("x", "a=1,b,c=[2,3],d=[]", &["a", "b", "c", "d"]).unwrap();
        assert_eq!(o.get("a"), Some("1"));
        assert!(o.has("b"));
        assert_eq!(o.list("c"), Some(vec!["2", "3"]));
        assert_eq!(o.list("d"), Some(vec![]));
        assert_eq!(o.get("e"), None);
        assert!(Options::parse("x", "a=1,zz=2", &["a"]).is_err());
        assert!(Options::parse("x", "a=1,a=2", &["a"]).is_err());
        assert!(Options::parse("x", "a=[1,2", &["a"]).is_err());
        assert!(Options::parse("x", "a=1]", &["a"]).is_err());
        assert!(Options::parse("x", "a=maybe", &["a"])
            .unwrap()
            .on_off("a", false)
            .is_err());
    }
}
