//! A small JSON patch language, turned into one Automerge change.
//!
//! A patch is a JSON array of operations; a path is an array of map keys (strings) and list
//! indices (numbers), starting at the document's root:
//!
//! ```json
//! [{"op": "set", "path": ["title"], "value": "Shopping"},
//!  {"op": "set", "path": ["items"], "value": []},
//!  {"op": "insert", "path": ["items", 0], "value": {"name": "milk", "done": false}},
//!  {"op": "increment", "path": ["visits"], "by": 1},
//!  {"op": "delete", "path": ["draft"]}]
//! ```
//!
//! `set` writes a map key or replaces a list element; `insert` adds a list element at an
//! index (up to the list's length); `increment` adds to a counter (creating it if the map key
//! is absent); `delete` removes a map key or list element. JSON objects and arrays become
//! Automerge maps and lists, strings become strings, numbers integers (or floats). The patch
//! applies as one change, made against the document as it is: concurrent patches merge as
//! Automerge merges.

use automerge::transaction::{CommitOptions, Transactable, Transaction};
use automerge::{Automerge, ObjId, ObjType, Prop, ReadDoc, ScalarValue, Value};
use serde::Deserialize;

use crate::DocError;

/// Most operations one patch may hold.
pub const MAX_PATCH_OPS: usize = 1024;

/// One step of a path: a map key or a list index.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(untagged)]
pub enum PathElem {
    Index(usize),
    Key(String),
}

/// One patch operation.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(tag = "op", rename_all = "lowercase", deny_unknown_fields)]
pub enum PatchOp {
    Set {
        path: Vec<PathElem>,
        value: serde_json::Value,
    },
    Insert {
        path: Vec<PathElem>,
        value: serde_json::Value,
    },
    Delete {
        path: Vec<PathElem>,
    },
    Increment {
        path: Vec<PathElem>,
        by: i64,
    },
}

/// Parses a patch: a JSON array of operations.
pub fn parse(json: &str) -> Result<Vec<PatchOp>, DocError> {
    let ops: Vec<PatchOp> = serde_json::from_str(json).map_err(|e| DocError::BadPatch {
        index: 0,
        reason: format!("not a patch (a JSON array of operations): {e}"),
    })?;
    if ops.len() > MAX_PATCH_OPS {
        return Err(DocError::BadPatch {
            index: MAX_PATCH_OPS,
            reason: format!("{} operations, the limit is {MAX_PATCH_OPS}", ops.len()),
        });
    }
    Ok(ops)
}

/// A patch that sets every key of the JSON object `value` at the root (`doc put` of a whole
/// document).
pub fn set_root(value: &serde_json::Value) -> Result<Vec<PatchOp>, DocError> {
    let serde_json::Value::Object(map) = value else {
        return Err(DocError::BadPatch {
            index: 0,
            reason: "a document's root must be a JSON object".into(),
        });
    };
    Ok(map
        .iter()
        .map(|(k, v)| PatchOp::Set {
            path: vec![PathElem::Key(k.clone())],
            value: v.clone(),
        })
        .collect())
}

/// Applies `ops` to `doc` as one change and returns its raw bytes; `None` if the patch
/// changed nothing. On error the document is left as it was.
pub fn apply(
    doc: &mut Automerge,
    ops: &[PatchOp],
    message: Option<String>,
    time_secs: i64,
) -> Result<Option<Vec<u8>>, DocError> {
    let mut tx = doc.transaction();
    for (index, op) in ops.iter().enumerate() {
        if let Err(reason) = apply_op(&mut tx, op) {
            tx.rollback();
            return Err(DocError::BadPatch { index, reason });
        }
    }
    let (hash, _) = tx.commit_with(CommitOptions {
        message,
        time: Some(time_secs),
    });
    Ok(hash
        .and_then(|h| doc.get_change_by_hash(&h))
        .map(|c| c.raw_bytes().to_vec()))
}

/// The object a path's parent names, and the last step as an Automerge property.
fn locate(tx: &Transaction, path: &[PathElem]) -> Result<(ObjId, ObjType, Prop), String> {
    let Some((last, parents)) = path.split_last() else {
        return Err("the path is empty (the root itself cannot be replaced)".into());
    };
    let mut obj = automerge::ROOT;
    for (depth, elem) in parents.iter().enumerate() {
        let prop = prop_of(elem);
        match tx.get(&obj, prop).map_err(|e| e.to_string())? {
            Some((Value::Object(_), id)) => obj = id,
            Some(_) => return Err(format!("path step {depth} is not a map or list")),
            None => return Err(format!("path step {depth} ({}) does not exist", show(elem))),
        }
    }
    let kind = tx.object_type(&obj).map_err(|e| e.to_string())?;
    match (kind, last) {
        (ObjType::Map | ObjType::Table, PathElem::Key(_)) | (ObjType::List, PathElem::Index(_)) => {
            Ok((obj, kind, prop_of(last)))
        }
        (ObjType::Text, _) => Err("text objects cannot be edited by this patch form".into()),
        (_, PathElem::Key(k)) => Err(format!("{k:?} is a map key, but its parent is a list")),
        (_, PathElem::Index(i)) => Err(format!("{i} is a list index, but its parent is a map")),
    }
}

fn prop_of(elem: &PathElem) -> Prop {
    match elem {
        PathElem::Index(i) => Prop::Seq(*i),
        PathElem::Key(k) => Prop::Map(k.clone()),
    }
}

fn show(elem: &PathElem) -> String {
    match elem {
        PathElem::Index(i) => i.to_string(),
        PathElem::Key(k) => format!("{k:?}"),
    }
}

fn apply_op(tx: &mut Transaction, op: &PatchOp) -> Result<(), String> {
    match op {
        PatchOp::Set { path, value } => {
            let (obj, kind, prop) = locate(tx, path)?;
            if let Prop::Seq(i) = prop {
                let len = tx.length(&obj);
                if i >= len {
                    return Err(format!("index {i} is past the list's end ({len} elements)"));
                }
            }
            let _ = kind;
            write_value(tx, &obj, prop, value, false)
        }
        PatchOp::Insert { path, value } => {
            let (obj, kind, prop) = locate(tx, path)?;
            let Prop::Seq(i) = prop else {
                return Err(format!("insert needs a list index, {kind:?} has keys"));
            };
            let len = tx.length(&obj);
            if i > len {
                return Err(format!("index {i} is past the list's end ({len} elements)"));
            }
            write_value(tx, &obj, prop, value, true)
        }
        PatchOp::Delete { path } => {
            let (obj, _, prop) = locate(tx, path)?;
            if tx
                .get(&obj, prop.clone())
                .map_err(|e| e.to_string())?
                .is_none()
            {
                return Err("nothing to delete there".into());
            }
            tx.delete(&obj, prop).map_err(|e| e.to_string())
        }
        PatchOp::Increment { path, by } => {
            let (obj, _, prop) = locate(tx, path)?;
            match tx.get(&obj, prop.clone()).map_err(|e| e.to_string())? {
                Some((Value::Scalar(s), _)) if matches!(s.as_ref(), ScalarValue::Counter(_)) => {
                    tx.increment(&obj, prop, *by).map_err(|e| e.to_string())
                }
                Some(_) => Err("only counters can be incremented".into()),
                None if matches!(prop, Prop::Map(_)) => tx
                    .put(&obj, prop, ScalarValue::counter(*by))
                    .map_err(|e| e.to_string()),
                None => Err("no list element there".into()),
            }
        }
    }
}

/// Writes a JSON value at `prop` of `obj` (inserting it, for a list insert).
fn write_value(
    tx: &mut Transaction,
    obj: &ObjId,
    prop: Prop,
    value: &serde_json::Value,
    insert: bool,
) -> Result<(), String> {
    let err = |e: automerge::AutomergeError| e.to_string();
    let object = match value {
        serde_json::Value::Array(_) => Some(ObjType::List),
        serde_json::Value::Object(_) => Some(ObjType::Map),
        _ => None,
    };
    let child = match (object, &prop, insert) {
        (Some(kind), Prop::Seq(i), true) => Some(tx.insert_object(obj, *i, kind).map_err(err)?),
        (Some(kind), _, _) => Some(tx.put_object(obj, prop.clone(), kind).map_err(err)?),
        (None, Prop::Seq(i), true) => {
            tx.insert(obj, *i, scalar(value)).map_err(err)?;
            None
        }
        (None, _, _) => {
            tx.put(obj, prop.clone(), scalar(value)).map_err(err)?;
            None
        }
    };
    match (value, child) {
        (serde_json::Value::Array(items), Some(list)) => {
            for (i, item) in items.iter().enumerate() {
                write_value(tx, &list, Prop::Seq(i), item, true)?;
            }
        }
        (serde_json::Value::Object(map), Some(child)) => {
            for (k, v) in map {
                write_value(tx, &child, Prop::Map(k.clone()), v, false)?;
            }
        }
        _ => {}
    }
    Ok(())
}

fn scalar(value: &serde_json::Value) -> ScalarValue {
    match value {
        serde_json::Value::Null => ScalarValue::Null,
        serde_json::Value::Bool(b) => ScalarValue::Boolean(*b),
        serde_json::Value::Number(n) => match (n.as_i64(), n.as_u64()) {
            (Some(i), _) => ScalarValue::Int(i),
            (None, Some(u)) => ScalarValue::Uint(u),
            _ => ScalarValue::F64(n.as_f64().unwrap_or(f64::NAN)),
        },
        serde_json::Value::String(s) => ScalarValue::Str(s.as_str().into()),
        serde_json::Value::Array(_) | serde_json::Value::Object(_) => {
            unreachable!("objects are written by write_value")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::view::to_json;
    use serde_json::json;

    fn patched(doc: &mut Automerge, patch: serde_json::Value) -> Result<Option<Vec<u8>>, DocError> {
        let ops = parse(&patch.to_string())?;
        apply(doc, &ops, None, 0)
    }

    #[test]
    fn patches_build_the_json_they_describe() {
        let mut doc = Automerge::new();
        patched(
            &mut doc,
            json!([
                {"op": "set", "path": ["title"], "value": "Shopping"},
                {"op": "set", "path": ["items"], "value": [{"name": "milk"}]},
                {"op": "insert", "path": ["items", 0], "value": {"name": "eggs", "n": 12}},
                {"op": "insert", "path": ["items", 2], "value": "bread"},
                {"op": "set", "path": ["items", 1, "done"], "value": true},
                {"op": "increment", "path": ["visits"], "by": 2},
                {"op": "increment", "path": ["visits"], "by": 3},
                {"op": "set", "path": ["draft"], "value": null},
                {"op": "delete", "path": ["draft"]},
                {"op": "set", "path": ["ratio"], "value": 0.5}
            ]),
        )
        .unwrap()
        .expect("a change");
        assert_eq!(
            to_json(&doc),
            json!({
                "title": "Shopping",
                "items": [{"name": "eggs", "n": 12}, {"name": "milk", "done": true}, "bread"],
                "visits": 5,
                "ratio": 0.5
            })
        );
        assert_eq!(doc.get_changes(&[]).len(), 1, "one patch, one change");
    }

    #[test]
    fn bad_patches_are_typed_errors_and_change_nothing() {
        let mut doc = Automerge::new();
        patched(
            &mut doc,
            json!([{"op": "set", "path": ["list"], "value": [1]}]),
        )
        .unwrap();
        let before = doc.get_heads();
        for (patch, index) in [
            (json!([{"op": "set", "path": [], "value": 1}]), 0),
            (
                json!([{"op": "set", "path": ["a"], "value": 1}, {"op": "set", "path": ["missing", "x"], "value": 1}]),
                1,
            ),
            (json!([{"op": "set", "path": ["list", 5], "value": 1}]), 0),
            (
                json!([{"op": "insert", "path": ["list", 2], "value": 1}]),
                0,
            ),
            (json!([{"op": "insert", "path": ["a"], "value": 1}]), 0),
            (json!([{"op": "set", "path": ["list", "k"], "value": 1}]), 0),
            (json!([{"op": "delete", "path": ["nothing"]}]), 0),
            (json!([{"op": "increment", "path": ["list"], "by": 1}]), 0),
        ] {
            match patched(&mut doc, patch.clone()) {
                Err(DocError::BadPatch { index: i, .. }) => assert_eq!(i, index, "{patch}"),
                other => panic!("{patch}: {other:?}"),
            }
            assert_eq!(doc.get_heads(), before, "{patch} left a change behind");
        }
        assert_eq!(to_json(&doc), json!({"list": [1]}));
        for garbage in [
            "",
            "{}",
            "[{\"op\": \"frobnicate\"}]",
            "[{\"op\": \"set\", \"path\": [\"a\"]}]",
            "[{\"op\": \"delete\", \"path\": [\"a\"], \"extra\": 1}]",
            "[{\"op\": \"set\", \"path\": [true], \"value\": 1}]",
        ] {
            assert!(
                matches!(parse(garbage), Err(DocError::BadPatch { .. })),
                "{garbage}"
            );
        }
    }
}
