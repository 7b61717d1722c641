//! What a drill check expects of a value or a restored file, and whether it holds.

use std::path::Path;

use sha2::{Digest, Sha256};

#[derive(Debug, Clone)]
pub enum Expectation {
    NonEmpty,
    Compare(Operator, String),
    Matches(regex::Regex),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Operator {
    Eq,
    Ne,
    Ge,
    Gt,
    Le,
    Lt,
}

impl Operator {
    fn symbol(self) -> &'static str {
        match self {
            Operator::Eq => "=",
            Operator::Ne => "!=",
            Operator::Ge => ">=",
            Operator::Gt => ">",
            Operator::Le => "<=",
            Operator::Lt => "<",
        }
    }
}

impl Expectation {
    /// `= 42`, `>= 1000`, `!= 0`, `non-empty`, or `~ REGEX`.
    pub fn parse(text: &str) -> Result<Expectation, String> {
        let text = text.trim();
        if text == "non-empty" {
            return Ok(Expectation::NonEmpty);
        }
        if let Some(pattern) = text.strip_prefix('~') {
            return regex::Regex::new(pattern.trim())
                .map(Expectation::Matches)
                .map_err(|e| format!("invalid regex: {e}"));
        }
        for (symbol, operator) in [
            (">=", Operator::Ge),
            ("<=", Operator::Le),
            ("!=", Operator::Ne),
            ("=", Operator::Eq),
            (">", Operator::Gt),
            ("<", Operator::Lt),
        ] {
            if let Some(value) = text.strip_prefix(symbol) {
                let value = value.trim();
                if value.is_empty() {
                    return Err(format!("\"{text}\" has no value to compare with"));
                }
                // "== 1" or "=> 5" is a typo, not a comparison with "= 1" (use "~ REGEX"
                // for a value that truly starts so).
                if value.starts_with(['=', '<', '>', '!']) {
                    return Err(format!(
                        "\"{text}\" is not an expectation: the value starts with an operator; write \"= 42\", \">= 1000\" or \"!= 0\""
                    ));
                }
                if !matches!(operator, Operator::Eq | Operator::Ne) && value.parse::<f64>().is_err()
                {
                    return Err(format!("\"{text}\": {symbol} compares numbers"));
                }
                return Ok(Expectation::Compare(operator, value.to_string()));
            }
        }
        Err(format!(
            "\"{text}\" is not an expectation; write \"= 42\", \">= 1000\", \"!= 0\", \"non-empty\" or \"~ REGEX\""
        ))
    }

    /// Whether `value` (None for no row or NULL) meets the expectation.
    pub fn holds(&self, value: Option<&str>) -> bool {
        let Some(value) = value else {
            return false;
        };
        match self {
            Expectation::NonEmpty => !value.is_empty(),
            Expectation::Matches(regex) => regex.is_match(value),
            Expectation::Compare(operator, wanted) => {
                match (value.trim().parse::<f64>(), wanted.parse::<f64>()) {
                    (Ok(got), Ok(wanted)) => match operator {
                        Operator::Eq => got == wanted,
                        Operator::Ne => got != wanted,
                        Operator::Ge => got >= wanted,
                        Operator::Gt => got > wanted,
                        Operator::Le => got <= wanted,
                        Operator::Lt => got < wanted,
                    },
                    _ => match operator {
                        Operator::Eq => value == wanted,
                        Operator::Ne => value != wanted,
                        _ => false,
                    },
                }
            }
        }
    }
}

impl std::fmt::Display for Expectation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Expectation::NonEmpty => write!(f, "non-empty"),
            Expectation::Matches(regex) => write!(f, "~ {}", regex.as_str()),
            Expectation::Compare(operator, value) => write!(f, "{} {value}", operator.symbol()),
        }
    }
}

#[derive(Debug, Clone)]
pub enum PathExpectation {
    Exists(bool),
    Sha256(String),
    Contains(String),
}

impl std::fmt::Display for PathExpectation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PathExpectation::Exists(true) => write!(f, "exists"),
            PathExpectation::Exists(false) => write!(f, "does not exist"),
            PathExpectation::Sha256(sha) => write!(f, "sha256 {sha}"),
            PathExpectation::Contains(text) => write!(f, "contains \"{text}\""),
        }
    }
}

/// `path` (as written in a drill file: `/etc/app.conf`) inside the restored tree at `root`,
/// resolved as if `root` were `/`: `..` stops at it, and a symlink (absolute or relative) is
/// followed within it, so a check never reads this host's files through a restored link.
/// The last component is followed only when `follow_last`. None past 40 links.
pub fn resolve_in_root(root: &Path, path: &Path, follow_last: bool) -> Option<std::path::PathBuf> {
    use std::collections::VecDeque;
    use std::path::Component;
    let mut pending: VecDeque<std::ffi::OsString> = path
        .components()
        .filter_map(|c| match c {
            Component::Normal(name) => Some(name.to_os_string()),
            Component::ParentDir => Some("..".into()),
            _ => None,
        })
        .collect();
    let mut resolved: Vec<std::ffi::OsString> = Vec::new();
    let mut links = 0;
    while let Some(name) = pending.pop_front() {
        if name == ".." {
            resolved.pop();
            continue;
        }
        let candidate: std::path::PathBuf = std::iter::once(root.as_os_str())
            .chain(resolved.iter().map(|c| c.as_os_str()))
            .chain([name.as_os_str()])
            .collect();
        let is_link =
            std::fs::symlink_metadata(&candidate).is_ok_and(|meta| meta.file_type().is_symlink());
        if !is_link || (pending.is_empty() && !follow_last) {
            resolved.push(name);
            continue;
        }
        links += 1;
        if links > 40 {
            return None;
        }
        let target = std::fs::read_link(&candidate).ok()?;
        if target.is_absolute() {
            resolved.clear();
        }
        for component in target.components().rev() {
            match component {
                Component::Normal(part) => pending.push_front(part.to_os_string()),
                Component::ParentDir => pending.push_front("..".into()),
                _ => {}
            }
        }
    }
    Some(
        std::iter::once(root.as_os_str())
            .chain(resolved.iter().map(|c| c.as_os_str()))
            .collect(),
    )
}

impl PathExpectation {
    /// Checks `path` (as a drill file writes it) in the tree restored at `root`; returns
    /// whether it holds and what was found.
    pub fn check(&self, root: &Path, path: &Path) -> (bool, String) {
        let follow_last = !matches!(self, PathExpectation::Exists(_));
        let Some(path) = resolve_in_root(root, path, follow_last) else {
            return (
                false,
                "unreadable: too many levels of symbolic links".to_string(),
            );
        };
        let path = path.as_path();
        match self {
            PathExpectation::Exists(wanted) => {
                let exists = std::fs::symlink_metadata(path).is_ok();
                (
                    exists == *wanted,
                    if exists { "exists" } else { "missing" }.to_string(),
                )
            }
            PathExpectation::Sha256(wanted) => match std::fs::read(path) {
                Ok(bytes) => {
                    let got = hex::encode(Sha256::digest(&bytes));
                    (got == *wanted, format!("sha256 {got}"))
                }
                Err(e) => (false, format!("unreadable: {e}")),
            },
            PathExpectation::Contains(text) => match std::fs::read(path) {
                Ok(bytes) => {
                    let found = String::from_utf8_lossy(&bytes).contains(text.as_str());
                    (found, if found { "found" } else { "not found" }.to_string())
                }
                Err(e) => (false, format!("unreadable: {e}")),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn check_paths_resolve_inside_the_restored_tree() {
        let root = tempfile::tempdir().unwrap();
        let r = root.path();
        std::fs::create_dir_all(r.join("etc")).unwrap();
        std::fs::write(r.join("etc/hostname"), "restored\n").unwrap();
        std::os::unix::fs::symlink("/etc/hostname", r.join("etc/absolute")).unwrap();
        std::os::unix::fs::symlink("../etc/hostname", r.join("etc/relative")).unwrap();
        std::os::unix::fs::symlink("/etc", r.join("etcdir")).unwrap();
        std::os::unix::fs::symlink("loop", r.join("loop")).unwrap();
        let contains = PathExpectation::Contains("restored".into());
        for path in [
            "/etc/hostname",
            "/etc/absolute",
            "/etc/relative",
            "/etcdir/hostname",
            "/../../../../etc/hostname",
        ] {
            assert_eq!(
                contains.check(r, Path::new(path)),
                (true, "found".to_string()),
                "{path}"
            );
        }
        // Nothing of this host's is read: its /etc/passwd is not in the tree.
        let passwd = PathExpectation::Exists(true);
        assert!(!passwd.check(r, Path::new("/../../etc/passwd")).0);
        assert!(!contains.check(r, Path::new("/etcdir/passwd")).0);
        assert!(!contains.check(r, Path::new("/loop")).0);
        // A link itself exists, wherever it points.
        assert!(passwd.check(r, Path::new("/etc/absolute")).0);
    }

    #[test]
    fn expectations_parse_and_hold() {
        let at_least = Expectation::parse(">= 1000").unwrap();
        assert!(at_least.holds(Some("1000")));
        assert!(at_least.holds(Some("1000000")));
        assert!(!at_least.holds(Some("999")));
        assert!(!at_least.holds(None));
        assert!(Expectation::parse("= 42").unwrap().holds(Some("42")));
        assert!(Expectation::parse("= paid").unwrap().holds(Some("paid")));
        assert!(!Expectation::parse("!= 0").unwrap().holds(Some("0")));
        assert!(Expectation::parse("non-empty").unwrap().holds(Some("x")));
        assert!(!Expectation::parse("non-empty").unwrap().holds(Some("")));
        assert!(
            Expectation::parse("~ ^2026-")
                .unwrap()
                .holds(Some("2026-11-26"))
        );
        assert!(Expectation::parse("about 3").is_err());
        assert!(Expectation::parse("> many").is_err());
        assert!(Expectation::parse("~ (").is_err());
        for typo in ["== 1", "=> 5", "=< 5", "<> 0", "= != 2"] {
            let err = Expectation::parse(typo).unwrap_err();
            assert!(err.contains("starts with an operator"), "{typo}: {err}");
        }
    }
}
