//! Diagnostics of configuration and policy files: errors (and warnings) that name the file,
//! the line, the column and the field. A leaf: config and policy both report through it.

use std::fmt;
use std::ops::Range;
use std::path::{Path, PathBuf};

/// One problem in a configuration or policy file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub file: PathBuf,
    /// 1-based; 0 when the problem is not tied to a place in the file.
    pub line: usize,
    pub column: usize,
    /// Dotted path of the field, e.g. `routes[2].upstream`.
    pub field: String,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.line > 0 {
            write!(
                f,
                "{}:{}:{}: {}: {}",
                self.file.display(),
                self.line,
                self.column,
                self.field,
                self.message
            )
        } else {
            write!(
                f,
                "{}: {}: {}",
                self.file.display(),
                self.field,
                self.message
            )
        }
    }
}

impl std::error::Error for ConfigError {}

/// All the problems found in one pass, in file order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

/// A located remark that does not make the configuration invalid.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigWarning {
    pub file: PathBuf,
    pub line: usize,
    pub column: usize,
    pub message: String,
}

impl fmt::Display for ConfigWarning {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:{}:{}: warning: {}",
            self.file.display(),
            self.line,
            self.column,
            self.message
        )
    }
}

/// Collects errors against one source file.
pub struct Reporter<'a> {
    pub file: &'a Path,
    pub source: &'a str,
    pub errors: Vec<ConfigError>,
}

impl<'a> Reporter<'a> {
    pub fn new(file: &'a Path, source: &'a str) -> Self {
        Self {
            file,
            source,
            errors: Vec::new(),
        }
    }

    /// Records a problem at `span` (byte offsets into the source).
    pub fn at(&mut self, span: Range<usize>, field: impl Into<String>, message: impl Into<String>) {
        let (line, column) = line_col(self.source, span.start);
        self.errors.push(ConfigError {
            file: self.file.to_path_buf(),
            line,
            column,
            field: field.into(),
            message: message.into(),
        });
    }

    /// Records a problem with no place in the file (a missing field, say).
    pub fn whole(&mut self, field: impl Into<String>, message: impl Into<String>) {
        self.errors.push(ConfigError {
            file: self.file.to_path_buf(),
            line: 0,
            column: 0,
            field: field.into(),
            message: message.into(),
        });
    }

    /// Turns a TOML parse or shape error into a located error, guessing the field from the text.
    pub fn toml(&mut self, err: &toml::de::Error) {
        let start = err.span().map_or(0, |s| s.start);
        let field = field_at(self.source, start);
        match err.span() {
            Some(span) => self.at(span, field, err.message().trim()),
            None => self.whole(field, err.message().trim()),
        }
    }

    pub fn finish<T>(self, value: T) -> Result<T, ConfigErrors> {
        if self.errors.is_empty() {
            Ok(value)
        } else {
            Err(ConfigErrors(self.errors))
        }
    }
}

/// Reads a configuration or policy file, or says in one located error why it cannot.
pub fn read_source(path: &Path) -> Result<String, ConfigErrors> {
    std::fs::read_to_string(path).map_err(|e| {
        let mut r = Reporter::new(path, "");
        r.whole("(file)", format!("cannot read: {e}"));
        ConfigErrors(r.errors)
    })
}

/// Parses a TOML document into its file shape, or the located parse error.
pub fn parse_toml<T: serde::de::DeserializeOwned>(
    path: &Path,
    source: &str,
) -> Result<T, ConfigErrors> {
    toml::from_str(source).map_err(|e| {
        let mut r = Reporter::new(path, source);
        r.toml(&e);
        ConfigErrors(r.errors)
    })
}

/// 1-based line and column of a byte offset.
pub fn line_col(source: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(source.len());
    let before = source.get(..offset).unwrap_or(source);
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, column)
}

/// Best-effort dotted name of the field written at `offset`: the enclosing `[table]` header
/// plus the key on that line.
fn field_at(source: &str, offset: usize) -> String {
    let (line_no, _) = line_col(source, offset);
    let mut table = String::new();
    let mut key = String::new();
    for (i, line) in source.lines().enumerate() {
        if i + 1 > line_no {
            break;
        }
        let t = line.trim();
        if t.starts_with('[') {
            table = t.trim_matches(|c| c == '[' || c == ']').trim().to_string();
            key.clear();
        }
        if i + 1 == line_no && !t.starts_with('[') {
            key = t.split('=').next().unwrap_or("").trim().to_string();
        }
    }
    match (table.is_empty(), key.is_empty()) {
        (true, true) => "(top level)".to_string(),
        (true, false) => key,
        (false, true) => table,
        (false, false) => format!("{table}.{key}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_and_column_are_one_based() {
        let src = "a = 1\nbb = 2\n";
        assert_eq!(line_col(src, 0), (1, 1));
        assert_eq!(line_col(src, 6), (2, 1));
        assert_eq!(line_col(src, 9), (2, 4));
    }

    #[test]
    fn field_names_come_from_table_and_key() {
        let src = "[server]\nlisten = 1\n[[routes]]\nprefix = 2\n";
        assert_eq!(field_at(src, 10), "server.listen");
        assert_eq!(field_at(src, src.find("prefix").unwrap()), "routes.prefix");
    }
}
