//! `aspen doc ...`: Automerge documents kept in the cluster.
//!
//! Reads fetch the document (snapshot plus pending changes) and build the JSON view, heads
//! and history locally; edits are made locally against the fetched document and committed as
//! one Automerge change, so edits made concurrently through other nodes merge.

use std::io::Read;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use aspen_client::{Client, Consistency, DocChanged};
use aspen_crdt::limits::{MAX_CHANGES_PER_REQUEST, MAX_REQUEST_BYTES};
use aspen_crdt::patch::{PatchOp, PathElem};
use aspen_crdt::view;
use clap::Subcommand;
use serde_json::json;

use crate::cli::{ClientArgs, Output};

#[derive(Subcommand, Debug)]
pub enum DocCommand {
    /// Create an empty document, or one holding the JSON object given with --json.
    Create {
        name: String,
        /// Initial content: a JSON object (or @FILE, or - for stdin).
        #[arg(long)]
        json: Option<String>,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Print a document as JSON (with -o json: also its heads).
    Get {
        name: String,
        /// Serve from the contacted node's local state (faster, may be stale).
        #[arg(long)]
        serializable: bool,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Print a document's heads (hashes of its latest changes).
    Heads {
        name: String,
        #[arg(long)]
        serializable: bool,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Print every change of a document, in causal order.
    History {
        name: String,
        #[arg(long)]
        serializable: bool,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Set PATH to a JSON VALUE, as one change. PATH is dot-separated; numeric steps are list
    /// indices (`items.0.done`). For keys containing dots, use `doc patch`.
    Set {
        name: String,
        path: String,
        /// A JSON value (`'"text"'`, `42`, `'{"a": [1, 2]}'`).
        value: String,
        #[arg(long)]
        message: Option<String>,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Apply a JSON patch (an array of set/insert/delete/increment operations) as one change:
    /// `[{"op": "set", "path": ["title"], "value": "x"}, {"op": "insert", "path": ["items", 0],
    /// "value": 1}, {"op": "increment", "path": ["n"], "by": 1}, {"op": "delete", "path":
    /// ["old"]}]`.
    Patch {
        name: String,
        /// The patch (or @FILE, or - for stdin).
        patch: String,
        #[arg(long)]
        message: Option<String>,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Commit Automerge changes made by any Automerge implementation: each FILE holds one
    /// raw change, or a whole saved document (all its changes are applied).
    Apply {
        name: String,
        #[arg(required = true)]
        files: Vec<PathBuf>,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Write a document in Automerge's saved format (readable by any Automerge
    /// implementation) to FILE (- for stdout).
    Save {
        name: String,
        file: PathBuf,
        #[arg(long)]
        serializable: bool,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// List documents in name order.
    List {
        /// Start after this name.
        #[arg(long)]
        after: Option<String>,
        /// At most N documents (0: all).
        #[arg(long, default_value_t = 0)]
        limit: usize,
        #[arg(long)]
        serializable: bool,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Delete a document and everything it holds.
    Delete {
        name: String,
        #[command(flatten)]
        client: ClientArgs,
    },
}

impl DocCommand {
    fn client_args(&self) -> &ClientArgs {
        match self {
            DocCommand::Create { client, .. }
            | DocCommand::Get { client, .. }
            | DocCommand::Heads { client, .. }
            | DocCommand::History { client, .. }
            | DocCommand::Set { client, .. }
            | DocCommand::Patch { client, .. }
            | DocCommand::Apply { client, .. }
            | DocCommand::Save { client, .. }
            | DocCommand::List { client, .. }
            | DocCommand::Delete { client, .. } => client,
        }
    }
}

pub async fn doc(cmd: DocCommand) -> Result<()> {
    let c = cmd.client_args().client().await?;
    let result = doc_with(&c, cmd).await;
    c.close().await;
    result
}

/// Text argument, `@FILE`, or `-` (stdin).
fn text_arg(arg: &str) -> Result<String> {
    if arg == "-" {
        let mut s = String::new();
        std::io::stdin()
            .read_to_string(&mut s)
            .context("reading stdin")?;
        Ok(s)
    } else if let Some(path) = arg.strip_prefix('@') {
        std::fs::read_to_string(path).with_context(|| format!("reading {path}"))
    } else {
        Ok(arg.to_string())
    }
}

fn consistency(serializable: bool) -> Consistency {
    Consistency::serializable_if(serializable)
}

fn print_changed(r: Option<DocChanged>, output: Output) {
    let (added, heads) = match &r {
        Some(r) => (
            r.added.iter().map(|h| h.to_string()).collect::<Vec<_>>(),
            r.heads.iter().map(|h| h.to_string()).collect::<Vec<_>>(),
        ),
        None => (Vec::new(), Vec::new()),
    };
    match output {
        Output::Json => println!("{}", json!({ "added": added, "heads": heads })),
        Output::Text if r.is_none() => println!("no change"),
        Output::Text => {
            println!("added {} change(s)", added.len());
            for h in heads {
                println!("head {h}");
            }
        }
    }
}

/// `items.0.done` -> ["items", 0, "done"].
fn parse_path(path: &str) -> Result<Vec<PathElem>> {
    if path.is_empty() {
        bail!("the path is empty");
    }
    Ok(path
        .split('.')
        .map(|step| match step.parse::<usize>() {
            Ok(i) => PathElem::Index(i),
            Err(_) => PathElem::Key(step.to_string()),
        })
        .collect())
}

/// The raw changes in FILE: one change, or every change of a saved document.
fn changes_in(path: &PathBuf) -> Result<Vec<Vec<u8>>> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    aspen_crdt::changes_in(&bytes).map_err(|e| {
        anyhow::anyhow!(
            "{} is neither an Automerge change nor a saved document: {e}",
            path.display()
        )
    })
}

async fn doc_with(c: &Client, cmd: DocCommand) -> Result<()> {
    match cmd {
        DocCommand::Create { name, json, client } => {
            let initial = match json {
                Some(j) => {
                    let text = text_arg(&j)?;
                    let value: serde_json::Value =
                        serde_json::from_str(&text).context("--json is not valid JSON")?;
                    Some(aspen_crdt::patch::set_root(&value)?)
                }
                None => None,
            };
            c.doc_create(&name).await?;
            let changed = match initial {
                Some(ops) if !ops.is_empty() => c.doc_patch(&name, &ops, None).await?,
                _ => None,
            };
            match client.output {
                Output::Json => println!(
                    "{}",
                    json!({ "name": name, "heads": changed.map(|r| r.heads.iter().map(|h| h.to_string()).collect::<Vec<_>>()).unwrap_or_default() })
                ),
                Output::Text => println!("created {name}"),
            }
        }
        DocCommand::Get {
            name,
            serializable,
            client,
        } => {
            let doc = c.doc_get(&name, consistency(serializable)).await?;
            let value = view::to_json(&doc);
            match client.output {
                Output::Json => println!(
                    "{}",
                    json!({ "name": name, "heads": view::heads(&doc), "doc": value })
                ),
                Output::Text => println!("{}", serde_json::to_string_pretty(&value)?),
            }
        }
        DocCommand::Heads {
            name,
            serializable,
            client,
        } => {
            let doc = c.doc_get(&name, consistency(serializable)).await?;
            let heads = view::heads(&doc);
            match client.output {
                Output::Json => println!("{}", json!(heads)),
                Output::Text => heads.iter().for_each(|h| println!("{h}")),
            }
        }
        DocCommand::History {
            name,
            serializable,
            client,
        } => {
            let doc = c.doc_get(&name, consistency(serializable)).await?;
            let history = view::history(&doc);
            match client.output {
                Output::Json => println!("{}", serde_json::to_string(&history)?),
                Output::Text => {
                    for h in history {
                        println!(
                            "{} actor {} seq {} ops {}{}",
                            h.hash,
                            h.actor,
                            h.seq,
                            h.ops,
                            h.message.map(|m| format!(" {m:?}")).unwrap_or_default()
                        );
                    }
                }
            }
        }
        DocCommand::Set {
            name,
            path,
            value,
            message,
            client,
        } => {
            let value: serde_json::Value = serde_json::from_str(&value).with_context(|| {
                format!("VALUE is not JSON (a string needs quotes: '\"{value}\"')")
            })?;
            let ops = [PatchOp::Set {
                path: parse_path(&path)?,
                value,
            }];
            print_changed(c.doc_patch(&name, &ops, message).await?, client.output);
        }
        DocCommand::Patch {
            name,
            patch,
            message,
            client,
        } => {
            let ops = aspen_crdt::patch::parse(&text_arg(&patch)?)?;
            print_changed(c.doc_patch(&name, &ops, message).await?, client.output);
        }
        DocCommand::Apply {
            name,
            files,
            client,
        } => {
            let mut changes = Vec::new();
            for f in &files {
                changes.extend(changes_in(f)?);
            }
            // In requests within the per-request bounds, in order (dependencies first).
            let mut added = Vec::new();
            let mut heads = Vec::new();
            let mut batch: Vec<Vec<u8>> = Vec::new();
            let mut batch_bytes = 0;
            let total = changes.len();
            for (i, change) in changes.into_iter().enumerate() {
                batch_bytes += change.len();
                batch.push(change);
                let last = i + 1 == total;
                if last
                    || batch.len() == MAX_CHANGES_PER_REQUEST
                    || batch_bytes >= MAX_REQUEST_BYTES / 2
                {
                    let r = c.doc_apply(&name, std::mem::take(&mut batch)).await?;
                    added.extend(r.added);
                    heads = r.heads;
                    batch_bytes = 0;
                }
            }
            print_changed(Some(DocChanged { added, heads }), client.output);
        }
        DocCommand::Save {
            name,
            file,
            serializable,
            client,
        } => {
            let doc = c.doc_get(&name, consistency(serializable)).await?;
            let bytes = doc.save();
            if file.as_os_str() == "-" {
                use std::io::Write;
                std::io::stdout().write_all(&bytes)?;
            } else {
                std::fs::write(&file, &bytes)
                    .with_context(|| format!("writing {}", file.display()))?;
                match client.output {
                    Output::Json => println!(
                        "{}",
                        json!({ "file": file, "bytes": bytes.len(), "heads": view::heads(&doc) })
                    ),
                    Output::Text => println!("wrote {} bytes to {}", bytes.len(), file.display()),
                }
            }
        }
        DocCommand::List {
            after,
            limit,
            serializable,
            client,
        } => {
            let mut docs = Vec::new();
            let mut after = after;
            loop {
                let want = if limit == 0 {
                    1000
                } else {
                    (limit - docs.len()).min(1000)
                };
                let (page, more) = c
                    .doc_list(after.clone(), want as u32, consistency(serializable))
                    .await?;
                after = page.last().map(|d| d.name.clone()).or(after);
                docs.extend(page);
                if !more || (limit != 0 && docs.len() >= limit) {
                    break;
                }
            }
            match client.output {
                Output::Json => println!(
                    "{}",
                    serde_json::Value::Array(
                        docs.iter()
                            .map(|d| json!({ "name": d.name, "created_at_ms": d.created_at_ms }))
                            .collect()
                    )
                ),
                Output::Text => docs.iter().for_each(|d| println!("{}", d.name)),
            }
        }
        DocCommand::Delete { name, client } => {
            c.doc_delete(&name).await?;
            match client.output {
                Output::Json => println!("{}", json!({ "deleted": name })),
                Output::Text => println!("deleted {name}"),
            }
        }
    }
    Ok(())
}
