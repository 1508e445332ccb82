//! The packaged files under `dist/` against the binaries they ship with: the configuration
//! installed as /etc/apexd/apexd.toml must load and say what is in force, and the manual pages
//! must be what the binaries generate now (run `scripts/gen-man` after changing a flag).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

use common::ScratchDir;

fn repo_file(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

/// `apexd ARGS --print-config` with the domain fixed (the default is the host's name).
fn print_config(args: &[&str]) -> toml::Table {
    let out = Command::new(env!("CARGO_BIN_EXE_apexd"))
        .args(args)
        .args(["--domain", "example.com", "--print-config"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "apexd {args:?} --print-config: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    toml::from_str(&String::from_utf8(out.stdout).unwrap()).unwrap()
}

/// Every setting, as `table.key` and its value.
fn settings(table: &toml::Table, prefix: &str, out: &mut BTreeMap<String, toml::Value>) {
    for (key, value) in table {
        let name = format!("{prefix}{key}");
        if let toml::Value::Table(inner) = value {
            settings(inner, &format!("{name}."), out);
        } else {
            out.insert(name, value.clone());
        }
    }
}

fn flat(table: &toml::Table) -> BTreeMap<String, toml::Value> {
    let mut out = BTreeMap::new();
    settings(table, "", &mut out);
    out
}

#[test]
fn packaged_config_loads_and_lists_every_setting_at_its_default() {
    let packaged = repo_file("dist/apexd.toml");
    let loaded = flat(&print_config(&["--config", packaged.to_str().unwrap()]));
    let default = flat(&print_config(&[]));
    assert!(!default.is_empty());
    // Its header says it lists the defaults: what it puts in force is what no file does.
    let differing: Vec<_> = default
        .iter()
        .filter(|(key, value)| loaded.get(*key) != Some(value))
        .map(|(key, value)| format!("{key}: {:?}, default {value}", loaded.get(key)))
        .collect();
    assert!(
        differing.is_empty() && loaded.len() == default.len(),
        "dist/apexd.toml differs from the defaults: {differing:?}"
    );

    // And it writes out every setting there is, so that an operator finds them all in one place.
    let text = std::fs::read_to_string(&packaged).unwrap();
    let listed = flat(&toml::from_str(&text).unwrap());
    let known = flat(&toml::from_str(apexd::config::EMBEDDED_DEFAULT).unwrap());
    let missing: Vec<_> = known
        .keys()
        .filter(|key| !listed.contains_key(*key))
        .collect();
    assert!(
        missing.is_empty(),
        "dist/apexd.toml does not list {missing:?}"
    );
}

/// Generates `bin`'s pages into a fresh directory; returns it and the files' names.
fn generated_pages(bin: &str, what: &str) -> (ScratchDir, BTreeSet<String>) {
    let dir = ScratchDir::new(what);
    let out = Command::new(bin)
        .args(["--generate-man", dir.as_str()])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{bin} --generate-man: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let names = std::fs::read_dir(&dir.path)
        .unwrap()
        .map(|entry| entry.unwrap().file_name().into_string().unwrap())
        .collect();
    (dir, names)
}

#[test]
fn committed_man_pages_are_what_the_binaries_generate() {
    let committed_dir = repo_file("dist/man");
    let mut generated_names = BTreeSet::new();
    for (bin, what, top) in [
        (env!("CARGO_BIN_EXE_apexd"), "man-apexd", "apexd.8"),
        (env!("CARGO_BIN_EXE_apex"), "man-apex", "apex.1"),
    ] {
        let (dir, names) = generated_pages(bin, what);
        assert!(names.contains(top), "{bin} wrote {names:?}");
        for name in &names {
            let generated = std::fs::read_to_string(dir.path.join(name)).unwrap();
            let committed = std::fs::read_to_string(committed_dir.join(name))
                .unwrap_or_else(|_| panic!("dist/man/{name} is missing: run scripts/gen-man"));
            assert!(
                generated == committed,
                "dist/man/{name} is stale: run scripts/gen-man"
            );
        }
        generated_names.extend(names);
    }
    let committed_names: BTreeSet<String> = std::fs::read_dir(&committed_dir)
        .unwrap()
        .map(|entry| entry.unwrap().file_name().into_string().unwrap())
        .collect();
    let leftover: Vec<_> = committed_names.difference(&generated_names).collect();
    assert!(
        leftover.is_empty(),
        "dist/man/ holds pages no binary generates: {leftover:?} (run scripts/gen-man)"
    );
}
