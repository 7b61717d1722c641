//! The layering written in `src/lib.rs`, held against every `crate::` path in `src/`: an
//! import of a higher layer, an import circle between modules, or between the files of one
//! module, fails here naming the file and line.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// The layers from `src/lib.rs`'s `text` block under "# Layers", top first.
fn layers(lib_rs: &str) -> Vec<(String, Vec<String>)> {
    let doc: Vec<&str> = lib_rs
        .lines()
        .filter_map(|line| line.strip_prefix("//!"))
        .map(|line| line.strip_prefix(' ').unwrap_or(line))
        .collect();
    let start = doc
        .iter()
        .position(|line| *line == "# Layers")
        .expect("src/lib.rs has a `# Layers` section");
    doc[start..]
        .iter()
        .skip_while(|line| **line != "```text")
        .skip(1)
        .take_while(|line| **line != "```")
        .filter_map(|line| {
            let (name, modules) = line.split_once(':')?;
            Some((
                name.trim().to_string(),
                modules.split_whitespace().map(str::to_string).collect(),
            ))
        })
        .collect()
}

/// `source` with comments, string and character literals blanked (newlines kept, so lines
/// still count), and `#[cfg(test)]` items removed.
fn code_of(source: &str) -> String {
    let bytes = source.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let blank = |b: u8| if b == b'\n' { b'\n' } else { b' ' };
    let mut i = 0;
    while i < bytes.len() {
        let rest = &bytes[i..];
        let after_word = i > 0 && (bytes[i - 1].is_ascii_alphanumeric() || bytes[i - 1] == b'_');
        let end = if rest.starts_with(b"//") {
            rest.iter().position(|&b| b == b'\n').unwrap_or(rest.len())
        } else if rest.starts_with(b"/*") {
            let mut depth = 0;
            let mut j = 0;
            while j < rest.len() {
                if rest[j..].starts_with(b"/*") {
                    depth += 1;
                    j += 2;
                } else if rest[j..].starts_with(b"*/") {
                    depth -= 1;
                    j += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    j += 1;
                }
            }
            j
        } else if rest[0] == b'r' && !after_word && matches!(rest.get(1), Some(b'"' | b'#')) {
            let hashes = rest[1..].iter().take_while(|&&b| b == b'#').count();
            if rest.get(1 + hashes) != Some(&b'"') {
                out.push(rest[0]);
                i += 1;
                continue;
            }
            let close: Vec<u8> = std::iter::once(b'"')
                .chain(std::iter::repeat_n(b'#', hashes))
                .collect();
            let body = 2 + hashes;
            body + rest[body..]
                .windows(close.len())
                .position(|w| w == close.as_slice())
                .map_or(rest.len() - body, |p| p + close.len())
        } else if rest[0] == b'"' {
            let mut j = 1;
            while j < rest.len() && rest[j] != b'"' {
                j += if rest[j] == b'\\' { 2 } else { 1 };
            }
            (j + 1).min(rest.len())
        } else if rest[0] == b'\'' && rest.get(1) == Some(&b'\\') {
            2 + rest[2..]
                .iter()
                .position(|&b| b == b'\'')
                .map_or(0, |p| p + 1)
        } else if rest[0] == b'\'' && rest.get(2) == Some(&b'\'') {
            3
        } else {
            out.push(rest[0]);
            i += 1;
            continue;
        };
        out.extend(rest[..end].iter().map(|&b| blank(b)));
        i += end;
    }
    let mut code = String::from_utf8_lossy(&out).into_owned();
    // A test module or function may import what it likes.
    while let Some(at) = code.find("#[cfg(test)]") {
        let open = code[at..].find(['{', ';']).map(|p| at + p);
        let end = match open {
            Some(open) if code.as_bytes()[open] == b'{' => {
                let mut depth = 0;
                let mut end = code.len();
                for (p, b) in code[open..].bytes().enumerate() {
                    match b {
                        b'{' => depth += 1,
                        b'}' => {
                            depth -= 1;
                            if depth == 0 {
                                end = open + p + 1;
                                break;
                            }
                        }
                        _ => {}
                    }
                }
                end
            }
            Some(semicolon) => semicolon + 1,
            None => code.len(),
        };
        let blanked: String = code[at..end]
            .chars()
            .map(|c| if c == '\n' { '\n' } else { ' ' })
            .collect();
        code.replace_range(at..end, &blanked);
    }
    code
}

/// The module path of a file under `src/`: `src/prune/wal.rs` is `["prune", "wal"]`.
fn module_of(relative: &Path) -> Vec<String> {
    let mut parts: Vec<String> = relative
        .with_extension("")
        .iter()
        .map(|p| p.to_string_lossy().into_owned())
        .collect();
    if parts.last().is_some_and(|p| p == "mod" || p == "lib") {
        parts.pop();
    }
    parts
}

/// One `crate::` (or `super::`) path in a file: the module path it names, and its line.
struct Import {
    line: usize,
    path: Vec<String>,
}

fn words_after(code: &str, at: usize) -> Vec<String> {
    let mut path = Vec::new();
    let mut rest = &code[at..];
    loop {
        let word: String = rest
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        if word.is_empty() {
            break;
        }
        rest = &rest[word.len()..];
        path.push(word);
        match rest.strip_prefix("::") {
            Some(more) => rest = more,
            None => break,
        }
    }
    path
}

/// Every module path a file's code names through `crate::` or `super::`, resolved from the
/// crate root, with the groups of `use crate::{a, b::c}` spread.
fn imports(module: &[String], code: &str) -> Vec<Import> {
    let mut found = Vec::new();
    let line_of = |at: usize| code[..at].matches('\n').count() + 1;
    for (at, _) in code.match_indices("crate::") {
        let before = code[..at].chars().next_back();
        if before.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_' || c == '$') {
            continue;
        }
        let start = at + "crate::".len();
        if code[start..].starts_with('{') {
            let close = code[start..].find('}').map_or(code.len(), |p| start + p);
            for item in code[start + 1..close].split(',') {
                let item = item.trim();
                let path = words_after(item, 0);
                if !path.is_empty() {
                    found.push(Import {
                        line: line_of(at),
                        path,
                    });
                }
            }
        } else {
            found.push(Import {
                line: line_of(at),
                path: words_after(code, start),
            });
        }
    }
    for (at, _) in code.match_indices("super::") {
        let before = code[..at].chars().next_back();
        if before.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':') {
            continue;
        }
        let mut words = words_after(code, at);
        let supers = words.iter().take_while(|w| *w == "super").count();
        if supers > module.len() {
            continue;
        }
        let mut path: Vec<String> = module[..module.len() - supers].to_vec();
        path.extend(words.drain(supers..));
        found.push(Import {
            line: line_of(at),
            path,
        });
    }
    found
}

/// A circle in `edges`, as the modules it passes through, if there is one.
fn circle(edges: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    fn visit(
        node: &str,
        edges: &BTreeMap<String, BTreeSet<String>>,
        path: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) -> Option<Vec<String>> {
        if let Some(at) = path.iter().position(|p| p == node) {
            let mut found = path[at..].to_vec();
            found.push(node.to_string());
            return Some(found);
        }
        if done.contains(node) {
            return None;
        }
        path.push(node.to_string());
        for next in edges.get(node).into_iter().flatten() {
            if let Some(found) = visit(next, edges, path, done) {
                return Some(found);
            }
        }
        path.pop();
        done.insert(node.to_string());
        None
    }
    let mut done = BTreeSet::new();
    edges
        .keys()
        .find_map(|node| visit(node, edges, &mut Vec::new(), &mut done))
}

/// What breaks the layering among `files` (path under `src/`, text), one line each.
fn violations(lib_rs: &str, files: &[(PathBuf, String)]) -> Vec<String> {
    let layers = layers(lib_rs);
    let mut layer_of = BTreeMap::new();
    let mut problems = Vec::new();
    for (rank, (name, modules)) in layers.iter().enumerate() {
        for module in modules {
            if layer_of
                .insert(module.clone(), (rank, name.clone()))
                .is_some()
            {
                problems.push(format!("src/lib.rs: `{module}` is in two layers"));
            }
        }
    }
    let declared: BTreeSet<String> = lib_rs
        .lines()
        .filter_map(|line| line.strip_prefix("pub mod ")?.strip_suffix(';'))
        .map(str::to_string)
        .collect();
    for module in declared.difference(&layer_of.keys().cloned().collect()) {
        problems.push(format!("src/lib.rs: `{module}` is in no layer"));
    }
    for module in layer_of.keys().filter(|m| !declared.contains(*m)) {
        problems.push(format!(
            "src/lib.rs: layer names `{module}`, which is no module"
        ));
    }
    // Between modules of the crate root, and between files of one module (siblings).
    let mut edges: BTreeMap<String, BTreeMap<String, BTreeSet<String>>> = BTreeMap::new();
    let mut seen_at: BTreeMap<(String, String), String> = BTreeMap::new();
    for (relative, source) in files {
        let module = module_of(relative);
        let Some(top) = module.first() else {
            continue;
        };
        let shown = format!("src/{}", relative.display());
        for import in imports(&module, &code_of(source)) {
            let Some(target) = import.path.first() else {
                continue;
            };
            let place = format!("{shown}:{}", import.line);
            if !layer_of.contains_key(target) {
                continue;
            }
            if target != top {
                let (from, to) = (&layer_of[top], &layer_of[target]);
                if to.0 < from.0 {
                    problems.push(format!(
                        "{place}: `{top}` (layer {}) imports `{target}` (layer {}, above it)",
                        from.1, to.1
                    ));
                }
                edges
                    .entry(String::new())
                    .or_default()
                    .entry(top.clone())
                    .or_default()
                    .insert(target.clone());
                seen_at
                    .entry((top.clone(), target.clone()))
                    .or_insert(place.clone());
                continue;
            }
            // Within one module: an import of a sibling file, not of the parent.
            let depth = module.len();
            if depth >= 2
                && import.path.len() >= depth
                && import.path[..depth - 1] == module[..depth - 1]
            {
                let sibling = &import.path[depth - 1];
                let parent = module[..depth - 1].join("::");
                let is_file = files.iter().any(|(p, _)| {
                    module_of(p) == [&module[..depth - 1], &[sibling.clone()][..]].concat()
                });
                if is_file && *sibling != module[depth - 1] {
                    let me = module.join("::");
                    let them = format!("{parent}::{sibling}");
                    edges
                        .entry(parent)
                        .or_default()
                        .entry(me.clone())
                        .or_default()
                        .insert(them.clone());
                    seen_at.entry((me, them)).or_insert(place);
                }
            }
        }
    }
    for graph in edges.values() {
        if let Some(found) = circle(graph) {
            let steps: Vec<String> = found
                .windows(2)
                .map(|pair| {
                    let at = &seen_at[&(pair[0].clone(), pair[1].clone())];
                    format!("`{}` → `{}` ({at})", pair[0], pair[1])
                })
                .collect();
            problems.push(format!("import circle: {}", steps.join(", ")));
        }
    }
    problems
}

/// The library's files, with paths under `src/`; the binary (main.rs, cli/) is left out.
fn library_files() -> Vec<(PathBuf, String)> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    let mut pending = vec![src.clone()];
    while let Some(dir) = pending.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            let relative = path.strip_prefix(&src).unwrap().to_path_buf();
            if relative == Path::new("main.rs") || relative == Path::new("cli") {
                continue;
            }
            if path.is_dir() {
                pending.push(path);
            } else if path.extension().is_some_and(|e| e == "rs") {
                files.push((relative, std::fs::read_to_string(&path).unwrap()));
            }
        }
    }
    files.sort();
    files
}

fn lib_rs() -> String {
    std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("src/lib.rs")).unwrap()
}

#[test]
fn every_import_follows_the_layers_written_in_lib_rs() {
    let files = library_files();
    assert!(
        files.len() > 50,
        "found only {} files under src/",
        files.len()
    );
    let problems = violations(&lib_rs(), &files);
    assert!(problems.is_empty(), "\n{}", problems.join("\n"));
    for (path, source) in &files {
        assert!(
            !code_of(source).contains("lifeboat::"),
            "src/{}: the library names itself `lifeboat::`, as only the binary does",
            path.display()
        );
    }
}

#[test]
fn the_layering_check_fails_on_an_upward_import_and_on_a_circle() {
    let mut files = library_files();
    let (_, storage) = files
        .iter_mut()
        .find(|(p, _)| p == Path::new("storage/mod.rs"))
        .unwrap();
    // An engine reached from the storage layer; and a string or comment naming one is no
    // import.
    storage.push_str(
        "\n// crate::backup::run\nconst _SAID: &str = \"crate::restore\";\nuse crate::backup::BackupOptions;\n",
    );
    let line = storage.lines().count();
    let problems = violations(&lib_rs(), &files);
    assert_eq!(
        problems.first(),
        Some(&format!(
            "src/storage/mod.rs:{line}: `storage` (layer objects) imports `backup` (layer engines, above it)"
        )),
        "{problems:#?}"
    );
    // Through the engine, storage now imports itself.
    assert_eq!(problems.len(), 2, "{problems:#?}");
    assert!(
        problems[1].starts_with("import circle: `backup` → ")
            && problems[1].ends_with(&format!("`storage` → `backup` (src/storage/mod.rs:{line})")),
        "{problems:#?}"
    );

    let files = vec![
        (
            PathBuf::from("lifeboat/a.rs"),
            "use super::b::X;".to_string(),
        ),
        (
            PathBuf::from("lifeboat/b.rs"),
            "fn f() { crate::lifeboat::a::y() }".to_string(),
        ),
        (
            PathBuf::from("lifeboat/mod.rs"),
            "use self::a::Z;".to_string(),
        ),
    ];
    let lib_rs = "//! # Layers\n//! ```text\n//! all: lifeboat\n//! ```\npub mod lifeboat;\n";
    assert_eq!(
        violations(lib_rs, &files),
        vec![
            "import circle: `lifeboat::a` → `lifeboat::b` (src/lifeboat/a.rs:1), `lifeboat::b` → `lifeboat::a` (src/lifeboat/b.rs:1)"
                .to_string()
        ]
    );
}
