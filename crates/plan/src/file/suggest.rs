//! Suggestions for a key serde did not know: where it is (which task or table) and the
//! known key nearest to it.

/// serde's "unknown field `x`, expected one of `a`, `b`" as a line that says where the key
/// is and suggests the known key nearest to it: `unknown key "destinaton" in task "db";
/// did you mean "destination"?`. The list of known keys is given only when none is near.
pub(super) fn unknown_key(text: &str, offset: Option<usize>, message: &str) -> Option<String> {
    let rest = message.strip_prefix("unknown field ")?;
    let names: Vec<&str> = rest.split('`').skip(1).step_by(2).collect();
    let (key, known) = names.split_first()?;
    let mut place = offset.map(|o| place_of(text, o)).unwrap_or_default();
    // The only nested table: `verify = { source = "…", destination = "…" }`.
    if known == ["source", "destination"] && place.starts_with(" in task") {
        place.push_str(" verify");
    }
    Some(match nearest(key, known) {
        Some(k) => format!("unknown key {key:?}{place}; did you mean {k:?}?"),
        None if known.is_empty() => format!("unknown key {key:?}{place}"),
        None => format!(
            "unknown key {key:?}{place}; the keys here are {}",
            known.join(", ")
        ),
    })
}

/// The table that the byte `offset` of the plan is in: ` in task "db"`, ` in [[pre_final]]
/// number 2` or ` at the top level`. Tables of an array (`[[task]]`) end where the next
/// header starts, and top-level keys come before the first header, so the nearest header
/// before `offset` is the one.
fn place_of(text: &str, offset: usize) -> String {
    let Ok(doc) = toml::de::DeTable::parse(text) else {
        return String::new();
    };
    let mut best: Option<(std::ops::Range<usize>, &str, usize, &toml::de::DeValue)> = None;
    for (section, value) in doc.get_ref().iter() {
        let Some(items) = value.get_ref().as_array() else {
            continue;
        };
        for (i, item) in items.iter().enumerate() {
            let span = item.span();
            if span.start <= offset && best.as_ref().is_none_or(|b| b.0.start < span.start) {
                best = Some((span, section.get_ref(), i, item.get_ref()));
            }
        }
    }
    match best {
        // The key is the header itself (`[[tsk]]`): a key of the top level.
        Some((span, section, i, item)) if offset >= span.end => match section {
            "task" => match item.get("name").and_then(|n| n.get_ref().as_str()) {
                Some(name) => format!(" in task {name:?}"),
                None => format!(" in task number {}", i + 1),
            },
            _ => format!(" in [[{section}]] number {}", i + 1),
        },
        _ => " at the top level".into(),
    }
}

/// The key of `known` that `key` most likely meant (a typo: a few letters off, another
/// case, `-` for `_`), if one is near enough.
fn nearest<'a>(key: &str, known: &[&'a str]) -> Option<&'a str> {
    let norm = |s: &str| s.to_lowercase().replace('-', "_");
    let key = norm(key);
    let limit = (key.chars().count() / 3).max(1);
    known
        .iter()
        .map(|k| (edit_distance(&key, &norm(k)), *k))
        .filter(|(d, _)| *d <= limit)
        .min_by_key(|(d, _)| *d)
        .map(|(_, k)| k)
}

/// Optimal string alignment distance: insertions, deletions, substitutions and swaps of
/// two neighbours each count 1.
fn edit_distance(a: &str, b: &str) -> usize {
    let a: Vec<char> = a.chars().collect();
    let b: Vec<char> = b.chars().collect();
    let w = b.len() + 1;
    let mut d = vec![0usize; (a.len() + 1) * w];
    for i in 0..=a.len() {
        for j in 0..=b.len() {
            d[i * w + j] = if i == 0 || j == 0 {
                i + j
            } else {
                let cost = usize::from(a[i - 1] != b[j - 1]);
                let mut v = (d[(i - 1) * w + j] + 1)
                    .min(d[i * w + j - 1] + 1)
                    .min(d[(i - 1) * w + j - 1] + cost);
                if i > 1 && j > 1 && a[i - 1] == b[j - 2] && a[i - 2] == b[j - 1] {
                    v = v.min(d[(i - 2) * w + j - 2] + 1);
                }
                v
            };
        }
    }
    d[a.len() * w + b.len()]
}
