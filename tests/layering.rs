//! The crate's modules form layers, each using only those below it: a newcomer can read the
//! crate bottom-up, and a change cannot quietly tie a low layer to a high one.
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

/// Bottom to top. `report` takes plain data and uses nothing of the crate but `util`.
const LAYERS: [&str; 11] =
    ["util", "report", "model", "lora", "data", "sample", "train", "eval", "demo", "cli", "fuzz"];

fn rank(module: &str) -> Option<usize> {
    LAYERS.iter().position(|&m| m == module)
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// A file's code without its unit tests: test files (`*_tests.rs`, `tests.rs`) count as empty,
/// and a file's `#[cfg(test)]` tail is cut off.
fn code_of(path: &Path) -> String {
    let name = path.file_name().unwrap().to_string_lossy();
    if name.ends_with("_tests.rs") || name == "tests.rs" {
        return String::new();
    }
    let text = std::fs::read_to_string(path).unwrap();
    match text.find("#[cfg(test)]") {
        Some(i) => text[..i].to_string(),
        None => text,
    }
}

/// The crate's top-level modules that `code` names through `crate::` paths, grouped imports
/// (`use crate::{a::x, b::{y, z}}`) included. Comments are skipped.
fn used_modules(code: &str) -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    for line in code.lines() {
        let line = line.split("//").next().unwrap_or("");
        let mut rest = line;
        while let Some(i) = rest.find("crate::") {
            rest = &rest[i + "crate::".len()..];
            if let Some(group) = rest.strip_prefix('{') {
                // the first path segment of each top-level item of the group
                let (mut depth, mut start) = (0, true);
                for (j, c) in group.char_indices() {
                    match c {
                        '{' => depth += 1,
                        '}' if depth == 0 => break,
                        '}' => depth -= 1,
                        ',' if depth == 0 => start = true,
                        c if start && (c.is_alphanumeric() || c == '_') => {
                            let word: String =
                                group[j..].chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect();
                            found.insert(word);
                            start = false;
                        }
                        _ => {}
                    }
                }
            } else {
                let word: String = rest.chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect();
                found.insert(word);
            }
        }
    }
    found
}

#[test]
fn modules_use_only_the_layers_below_them() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = vec![];
    rust_files(&src, &mut files);
    let mut upward = vec![];
    for f in &files {
        let rel = f.strip_prefix(&src).unwrap();
        let top = rel.iter().next().unwrap().to_string_lossy().trim_end_matches(".rs").to_string();
        if top == "lib" || top == "main" {
            continue;
        }
        let Some(own) = rank(&top) else {
            panic!("src/{}: module `{top}` has no place in LAYERS — add it where it belongs", rel.display());
        };
        for used in used_modules(&code_of(f)) {
            if let Some(r) = rank(&used) {
                if r > own {
                    upward.push(format!("src/{} ({top}) uses crate::{used}", rel.display()));
                }
            }
        }
    }
    assert!(upward.is_empty(), "upward dependencies:\n{}", upward.join("\n"));
}

#[test]
fn the_import_scanner_sees_every_form() {
    let code = "use crate::model::x;\nuse crate::{lora::a, train::{b, c}};\nlet y = crate::eval::f(); // crate::demo::g\n";
    let found: Vec<String> = used_modules(code).into_iter().collect();
    assert_eq!(found, ["eval", "lora", "model", "train"]);
    // and an upward use is seen as one
    assert!(rank("eval") > rank("train") && rank("report") < rank("model"));
}
