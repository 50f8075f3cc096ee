//! The crate's modules form layers: each depends only on the ones below it, so no two
//! modules import each other, directly or around a loop. This reads `use crate::…` paths
//! from the sources and fails on the first loop, naming it.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

fn top_module(src: &Path, file: &Path) -> String {
    let rel = file.strip_prefix(src).unwrap();
    let first = rel.components().next().unwrap().as_os_str().to_string_lossy().to_string();
    first.trim_end_matches(".rs").to_string()
}

fn visit(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            visit(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

#[test]
fn no_module_imports_another_that_imports_it_back() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    visit(&src, &mut files);
    let mut edges: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for f in &files {
        let from = top_module(&src, f);
        let text = std::fs::read_to_string(f).unwrap();
        for line in text.lines() {
            let code = line.split("//").next().unwrap_or("");
            for (i, _) in code.match_indices("crate::") {
                let name: String = code[i + 7..].chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect();
                // `crate::multiversion!` is a macro, not a module.
                if !name.is_empty() && name != from && name != "multiversion" {
                    edges.entry(from.clone()).or_default().insert(name);
                }
            }
        }
    }
    for (from, tos) in &edges {
        for to in tos {
            // Is there a path back from `to` to `from`?
            let mut stack = vec![(to.clone(), vec![from.clone(), to.clone()])];
            let mut seen = BTreeSet::new();
            while let Some((at, path)) = stack.pop() {
                for next in edges.get(&at).into_iter().flatten() {
                    let mut p = path.clone();
                    p.push(next.clone());
                    assert!(next != from, "import loop: {}", p.join(" -> "));
                    if seen.insert(next.clone()) {
                        stack.push((next.clone(), p));
                    }
                }
            }
        }
    }
    assert!(edges.len() > 10, "the sources were read");
}
