//! The source files of the product import each other one way: no file reaches itself
//! through the paths it names (`crate::...`, `super::...`). The shared vocabulary is a crate
//! of its own (crates/model), so that edge is kept by the compiler; this test keeps the rest.
//!
//! A file and its own parent module (the `mod.rs` or `lib.rs` that declares it) are not
//! counted as a cycle: Rust puts a type's definition in the parent and its `impl` blocks in
//! the children (`impl super::Kms`), and the parent names what its children export. Every
//! other pair is: two siblings, or files in different modules.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Module path (`crate::kms::access`) -> file, for every .rs file under `src`.
fn modules(src: &Path) -> BTreeMap<String, PathBuf> {
    let mut out = BTreeMap::new();
    let mut stack = vec![src.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).expect("read src") {
            let path = entry.expect("entry").path();
            if path.is_dir() {
                stack.push(path);
                continue;
            }
            if path.extension().is_none_or(|e| e != "rs") {
                continue;
            }
            let rel = path.strip_prefix(src).unwrap().with_extension("");
            let mut parts: Vec<String> = rel
                .components()
                .map(|c| c.as_os_str().to_string_lossy().into_owned())
                .collect();
            if matches!(parts.last().map(String::as_str), Some("mod" | "lib")) {
                parts.pop();
            }
            if parts == ["main"] {
                continue; // the binary: a crate of its own that uses the library by name
            }
            let module = std::iter::once("crate".to_string())
                .chain(parts)
                .collect::<Vec<_>>()
                .join("::");
            out.insert(module, path);
        }
    }
    out
}

/// The paths a source text names from `crate::` or `super::`, with `{a, b::c}` groups
/// expanded; relative to `module` (the module the text belongs to).
fn named_paths(text: &str, module: &str) -> Vec<String> {
    let code: String = text
        .lines()
        .filter(|l| !l.trim_start().starts_with("//"))
        .collect::<Vec<_>>()
        .join("\n");
    let mut out = Vec::new();
    for start in ["crate::", "super::"] {
        let mut at = 0;
        while let Some(i) = code[at..].find(start) {
            let begin = at + i;
            at = begin + start.len();
            let before = code[..begin].chars().next_back();
            if before.is_some_and(|c| c.is_alphanumeric() || c == '_' || c == ':') {
                continue; // part of a longer path: `model::crate::`, `super::super::`
            }
            let base = if start == "crate::" {
                vec!["crate".to_string()]
            } else {
                parent(module)
            };
            expand(&code[begin + start.len()..], base, &mut out);
        }
    }
    out
}

fn parent(module: &str) -> Vec<String> {
    let mut parts: Vec<String> = module.split("::").map(str::to_string).collect();
    parts.pop();
    parts
}

/// Reads one path from the start of `rest` onto `base` (following `super::` and groups).
fn expand(rest: &str, mut base: Vec<String>, out: &mut Vec<String>) {
    let mut rest = rest;
    loop {
        if let Some(r) = rest.strip_prefix("super::") {
            base.pop();
            rest = r;
            continue;
        }
        if let Some(r) = rest.strip_prefix('{') {
            let mut depth = 1;
            let mut item = 0;
            for (i, c) in r.char_indices() {
                match c {
                    '{' => depth += 1,
                    '}' | ',' if depth == 1 => {
                        expand(r[item..i].trim_start(), base.clone(), out);
                        item = i + 1;
                        if c == '}' {
                            return;
                        }
                    }
                    '}' => depth -= 1,
                    _ => {}
                }
            }
            return;
        }
        let end = rest
            .find(|c: char| !(c.is_alphanumeric() || c == '_'))
            .unwrap_or(rest.len());
        if end == 0 {
            break;
        }
        base.push(rest[..end].to_string());
        rest = &rest[end..];
        match rest.strip_prefix("::") {
            Some(r) => rest = r,
            None => break,
        }
    }
    out.push(base.join("::"));
}

/// Edges between modules: `from` names something of `to` (the longest module prefix).
fn graph(sources: &BTreeMap<String, String>) -> BTreeMap<String, BTreeSet<String>> {
    let mut edges: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (module, text) in sources {
        let targets = edges.entry(module.clone()).or_default();
        for path in named_paths(text, module) {
            let mut parts: Vec<&str> = path.split("::").collect();
            while !parts.is_empty() && !sources.contains_key(&parts.join("::")) {
                parts.pop();
            }
            let to = parts.join("::");
            let family = to == *module
                || parent(module).join("::") == to
                || parent(&to).join("::") == *module;
            if !to.is_empty() && !family {
                targets.insert(to);
            }
        }
    }
    edges
}

/// The strongly connected components of more than one module (Tarjan's algorithm).
fn cycles(edges: &BTreeMap<String, BTreeSet<String>>) -> Vec<Vec<String>> {
    struct Walk<'a> {
        edges: &'a BTreeMap<String, BTreeSet<String>>,
        index: BTreeMap<&'a str, usize>,
        low: BTreeMap<&'a str, usize>,
        stack: Vec<&'a str>,
        on_stack: BTreeSet<&'a str>,
        found: Vec<Vec<String>>,
    }
    impl<'a> Walk<'a> {
        fn visit(&mut self, v: &'a str) {
            let n = self.index.len();
            self.index.insert(v, n);
            self.low.insert(v, n);
            self.stack.push(v);
            self.on_stack.insert(v);
            for w in self.edges.get(v).into_iter().flatten() {
                if !self.index.contains_key(w.as_str()) {
                    self.visit(w);
                    let lw = self.low[w.as_str()];
                    let lv = self.low.get_mut(v).unwrap();
                    *lv = (*lv).min(lw);
                } else if self.on_stack.contains(w.as_str()) {
                    let iw = self.index[w.as_str()];
                    let lv = self.low.get_mut(v).unwrap();
                    *lv = (*lv).min(iw);
                }
            }
            if self.low[v] == self.index[v] {
                let mut component = Vec::new();
                while let Some(w) = self.stack.pop() {
                    self.on_stack.remove(w);
                    component.push(w.to_string());
                    if w == v {
                        break;
                    }
                }
                if component.len() > 1 {
                    component.sort();
                    self.found.push(component);
                }
            }
        }
    }
    let mut walk = Walk {
        edges,
        index: BTreeMap::new(),
        low: BTreeMap::new(),
        stack: Vec::new(),
        on_stack: BTreeSet::new(),
        found: Vec::new(),
    };
    for v in edges.keys() {
        if !walk.index.contains_key(v.as_str()) {
            walk.visit(v);
        }
    }
    walk.found
}

/// Every crate of the workspace: its source files and their imports.
fn workspace() -> Vec<(PathBuf, BTreeMap<String, String>)> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut crates = vec![root.join("src")];
    for entry in std::fs::read_dir(root.join("crates")).expect("read crates") {
        crates.push(entry.expect("entry").path().join("src"));
    }
    crates
        .into_iter()
        .map(|src| {
            let sources = modules(&src)
                .into_iter()
                .map(|(m, p)| (m, std::fs::read_to_string(p).expect("read source")))
                .collect();
            (src, sources)
        })
        .collect()
}

#[test]
fn the_source_files_import_each_other_without_a_cycle() {
    let crates = workspace();
    assert!(crates.len() >= 2, "read {} crates only", crates.len());
    let mut product = None;
    for (src, sources) in &crates {
        let edges = graph(sources);
        let found = cycles(&edges);
        assert!(
            found.is_empty(),
            "import cycles in {}: {found:#?}",
            src.display()
        );
        if sources.contains_key("crate::kms") {
            product = Some(edges);
        }
    }
    let edges = product.expect("the product crate was read");
    let count: usize = edges.values().map(BTreeSet::len).sum();
    assert!(
        count > 100,
        "found {count} imports only: the reader is broken"
    );
    // The edges the old cycle was made of are gone, and one that must stay is seen.
    assert!(edges["crate::kms::keys"].contains("crate::hsm"));
    assert!(!edges["crate::config"]
        .iter()
        .any(|t| t.starts_with("crate::kms")));
}

/// The reader finds the cycles it is there to find: grouped, nested and relative paths.
#[test]
fn cycles_are_found_through_groups_and_relative_paths() {
    let sources: BTreeMap<String, String> = [
        ("crate", "pub mod a; pub mod b; pub mod c;"),
        ("crate::a", "use crate::{b::{self, Thing}, x};"),
        ("crate::b", "// use crate::a;\nfn f() { super::c::g() }"),
        (
            "crate::c",
            "use crate::b as _; pub fn g() { crate::a::h() }",
        ),
        ("crate::d", "use crate::a::{Parent as P};"),
    ]
    .into_iter()
    .map(|(m, t)| (m.to_string(), t.to_string()))
    .collect();
    let found = cycles(&graph(&sources));
    assert_eq!(
        found,
        vec![vec![
            "crate::a".to_string(),
            "crate::b".into(),
            "crate::c".into()
        ]]
    );
    // A child naming its parent, and the parent naming it back, is no cycle.
    let family: BTreeMap<String, String> = [
        (
            "crate::k",
            "use self::x::X; pub struct K; use crate::k::x::Y;",
        ),
        (
            "crate::k::x",
            "impl super::K {} pub struct X; pub struct Y;",
        ),
    ]
    .into_iter()
    .map(|(m, t)| (m.to_string(), t.to_string()))
    .collect();
    assert!(cycles(&graph(&family)).is_empty());
}
