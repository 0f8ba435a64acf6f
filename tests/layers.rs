//! The layers of `src/`, as the README's source map draws them, checked: every `crate::`
//! path in a module names its own module or one in a lower layer, so imports point one way
//! and form no circle. A new top-level module must be given a layer here (and in the
//! README) before it builds green.

use std::path::Path;

/// Top to bottom; modules on one line share a layer and do not import each other.
const LAYERS: &[&[&str]] = &[
    &["app"],
    &["api"],
    &["inference"],
    &["registry"],
    &["batching"],
    &["runtime", "storage"],
    &["request_log"],
    &["telemetry"],
    &["config"],
    &["signature"],
    &["proto"],
    &["tensor", "tfrecord", "http_client"],
    &["error"],
];

fn layer(module: &str) -> Option<usize> {
    LAYERS.iter().position(|layer| layer.contains(&module))
}

/// The top-level modules a source text names through `crate::`, comments left out.
fn referenced(source: &str) -> Vec<String> {
    let mut names = Vec::new();
    for line in source.lines() {
        let code = line.split("//").next().unwrap_or_default();
        let mut rest = code;
        while let Some(at) = rest.find("crate::") {
            let after = &rest[at + "crate::".len()..];
            // `crate::{a, b::C}` names several modules at once.
            let group = after
                .strip_prefix('{')
                .map(|inner| inner.split('}').next().unwrap_or_default());
            let heads: Vec<&str> = match group {
                Some(inner) => inner.split(',').collect(),
                None => vec![after],
            };
            for head in heads {
                let name: String = head
                    .trim_start()
                    .chars()
                    .take_while(|c| c.is_alphanumeric() || *c == '_')
                    .collect();
                if !name.is_empty() && name != "self" {
                    names.push(name);
                }
            }
            rest = after;
        }
    }
    names
}

fn rust_files(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

#[test]
fn imports_point_down_the_layers() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let mut wrong = Vec::new();
    for file in files {
        let relative = file.strip_prefix(&src).unwrap();
        let top = relative
            .components()
            .next()
            .unwrap()
            .as_os_str()
            .to_string_lossy()
            .trim_end_matches(".rs")
            .to_string();
        if top == "main" || top == "lib" {
            continue;
        }
        let Some(from) = layer(&top) else {
            wrong.push(format!(
                "{}: module '{top}' has no layer",
                relative.display()
            ));
            continue;
        };
        let source = std::fs::read_to_string(&file).unwrap();
        for name in referenced(&source) {
            if name == top {
                continue;
            }
            match layer(&name) {
                Some(to) if to > from => {}
                Some(_) => wrong.push(format!(
                    "{}: '{top}' imports '{name}', which is not below it",
                    relative.display()
                )),
                None => wrong.push(format!("{}: '{name}' has no layer", relative.display())),
            }
        }
    }
    assert!(
        wrong.is_empty(),
        "imports against the layers:\n{}",
        wrong.join("\n")
    );
}

#[test]
fn the_check_sees_paths_and_skips_comments() {
    let found = referenced(
        "use crate::tensor::Tensor; // crate::api\nlet x = crate::error::Error::Internal;\n\
         use crate::{proto, limits::DecodeBudget};",
    );
    assert_eq!(found, vec!["tensor", "error", "proto", "limits"]);
}
