//! Pointing at the file: a path into the TOML document (`Seg`) and the line it is on, and
//! the errors that name the file, the line and the key.

use super::*;

/// Byte offset to 1-based line number.
pub(super) fn line_of(text: &str, offset: usize) -> usize {
    text.get(..offset.min(text.len()))
        .map(|t| t.matches('\n').count() + 1)
        .unwrap_or(1)
}

/// One step of a path into the TOML document.
pub enum Seg<'a> {
    Key(&'a str),
    Index(usize),
}

/// The line where `path` is in the document (the deepest part of it that exists).
pub(super) fn locate(text: &str, path: &[Seg]) -> Option<usize> {
    let doc = toml::de::DeTable::parse(text).ok()?;
    let mut best = None;
    let mut table = Some(doc.get_ref());
    let mut value: Option<&toml::Spanned<toml::de::DeValue>> = None;
    for seg in path {
        let next = match (seg, table, value) {
            (Seg::Key(k), Some(t), _) => t.get(*k),
            (Seg::Key(k), None, Some(v)) => v.get_ref().get(*k),
            (Seg::Index(i), _, Some(v)) => v.get_ref().get(*i),
            _ => None,
        };
        let Some(next) = next else { break };
        best = Some(next.span().start);
        value = Some(next);
        table = None;
    }
    best.map(|o| line_of(text, o))
}

impl Plan {
    /// An error at `path` in the file.
    pub fn at(&self, path: &[Seg], message: String) -> PlanError {
        PlanError::At {
            path: self.path.clone(),
            line: locate(&self.text, path).unwrap_or(1),
            message,
        }
    }

    /// An error about `key` of task number `index` (a problem found by the caller, such as
    /// an endpoint the CLI cannot parse).
    pub fn error_at_task_key(&self, index: usize, e: KeyError) -> PlanError {
        let name = self
            .tasks
            .get(index)
            .map(|t| t.name.as_str())
            .unwrap_or("?");
        self.at(
            &[Seg::Key("task"), Seg::Index(index), Seg::Key(e.key)],
            format!("task {name:?}: {}: {}", e.key, e.message),
        )
    }

    pub(crate) fn task_key(&self, i: usize, key: &'static str, message: String) -> PlanError {
        self.error_at_task_key(i, KeyError { key, message })
    }
}
