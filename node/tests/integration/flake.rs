//! `flake.nix` cannot be evaluated here (Nix is not installed and could not fetch its inputs):
//! what can be checked offline is checked instead. Its brackets, braces, parentheses and
//! strings balance; every local path it names exists; it builds the crate that has the
//! `aspen` binary from Cargo.lock (which has no git sources, so no output hashes are
//! needed); and its toolchain is the one the workspace declares.

use std::path::{Path, PathBuf};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Checks that the delimiters of Nix source balance, skipping comments and string contents
/// (but not the code inside `${...}` in strings). Returns the first problem.
fn nix_delimiters_balance(src: &str) -> Result<(), String> {
    #[derive(PartialEq, Debug)]
    enum Open {
        Brace,
        Bracket,
        Paren,
        Str,
        IndentedStr,
        Interpolation,
    }
    let b = src.as_bytes();
    let mut stack: Vec<Open> = Vec::new();
    let mut i = 0;
    let line = |i: usize| src[..i].matches('\n').count() + 1;
    while i < b.len() {
        let in_string = matches!(stack.last(), Some(Open::Str | Open::IndentedStr));
        let c = b[i];
        let next = b.get(i + 1).copied();
        if in_string {
            let indented = stack.last() == Some(&Open::IndentedStr);
            match (c, next) {
                (b'\\', _) if !indented => i += 2,
                (b'$', Some(b'{')) => {
                    stack.push(Open::Interpolation);
                    i += 2;
                }
                (b'"', _) if !indented => {
                    stack.pop();
                    i += 1;
                }
                (b'\'', Some(b'\'')) if indented => {
                    // '' followed by $, ' or \ is an escape inside an indented string.
                    if matches!(b.get(i + 2), Some(b'$' | b'\'' | b'\\')) {
                        i += 3;
                    } else {
                        stack.pop();
                        i += 2;
                    }
                }
                _ => i += 1,
            }
            continue;
        }
        match (c, next) {
            (b'#', _) => {
                while i < b.len() && b[i] != b'\n' {
                    i += 1;
                }
            }
            (b'/', Some(b'*')) => {
                let end = src[i + 2..]
                    .find("*/")
                    .ok_or_else(|| format!("unclosed comment at line {}", line(i)))?;
                i += 2 + end + 2;
            }
            (b'"', _) => {
                stack.push(Open::Str);
                i += 1;
            }
            (b'\'', Some(b'\'')) => {
                stack.push(Open::IndentedStr);
                i += 2;
            }
            (b'$', Some(b'{')) => {
                stack.push(Open::Interpolation);
                i += 2;
            }
            (b'{', _) | (b'[', _) | (b'(', _) => {
                stack.push(match c {
                    b'{' => Open::Brace,
                    b'[' => Open::Bracket,
                    _ => Open::Paren,
                });
                i += 1;
            }
            (b'}', _) | (b']', _) | (b')', _) => {
                let open = stack
                    .pop()
                    .ok_or_else(|| format!("unmatched {:?} at line {}", c as char, line(i)))?;
                let fits = matches!(
                    (&open, c),
                    (Open::Brace | Open::Interpolation, b'}')
                        | (Open::Bracket, b']')
                        | (Open::Paren, b')')
                );
                if !fits {
                    return Err(format!(
                        "{:?} closed by {:?} at line {}",
                        open,
                        c as char,
                        line(i)
                    ));
                }
                i += 1;
            }
            _ => i += 1,
        }
    }
    match stack.last() {
        None => Ok(()),
        Some(open) => Err(format!("{open:?} never closed")),
    }
}

#[test]
fn the_flake_balances_and_matches_the_workspace() {
    let flake = std::fs::read_to_string(repo().join("flake.nix")).unwrap();
    nix_delimiters_balance(&flake).unwrap();
    // The checker itself catches what it is for.
    for bad in [
        "{ a = [ 1 2 ; }",
        "{ a = \"x; }",
        "{ a = ''x; }",
        "{ a = \"${b\"; }",
        "}",
    ] {
        assert!(nix_delimiters_balance(bad).is_err(), "{bad}");
    }
    assert!(nix_delimiters_balance("{ a = \"}\\\"${ { b = 1; }.b }\"; c = ''x''${y}''; }").is_ok());

    // Every local path it names exists.
    for (at, _) in flake.match_indices("./") {
        let path: String = flake[at..]
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || "./_-".contains(*c))
            .collect();
        let path = path.trim_end_matches(';');
        assert!(
            repo().join(path).exists(),
            "flake.nix names {path}, which does not exist"
        );
    }

    // It builds the crate with the `aspen` binary, from Cargo.lock, which needs no git hashes.
    assert!(flake.contains("cargoLock.lockFile = ./Cargo.lock;"));
    assert!(flake.contains(r#"cargoBuildFlags = [ "-p" "aspen-node" ];"#));
    assert!(flake.contains(r#"pname = "aspen";"#));
    let node: toml::Table = std::fs::read_to_string(repo().join("node/Cargo.toml"))
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(node["package"]["name"].as_str(), Some("aspen-node"));
    assert!(node["bin"]
        .as_array()
        .unwrap()
        .iter()
        .any(|b| b["name"].as_str() == Some("aspen")));
    let lock = std::fs::read_to_string(repo().join("Cargo.lock")).unwrap();
    assert!(
        !lock.contains("source = \"git+"),
        "a git dependency needs cargoLock.outputHashes in flake.nix"
    );

    // The toolchain is the declared one, read from Cargo.toml by the flake itself.
    assert!(flake.contains("cargoToml.workspace.package.rust-version"));
    let workspace: toml::Table = std::fs::read_to_string(repo().join("Cargo.toml"))
        .unwrap()
        .parse()
        .unwrap();
    let declared = workspace["workspace"]["package"]["rust-version"]
        .as_str()
        .unwrap();
    assert_eq!(
        declared.split('.').count(),
        2,
        "the flake appends .0 to a MAJOR.MINOR rust-version: {declared}"
    );
    assert!(flake.contains(r#"rustVersion = "${cargoToml.workspace.package.rust-version}.0";"#));
}
