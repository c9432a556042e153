//! Field ownership (`metadata.managedFields`) and server-side apply.
//!
//! Every write records which manager set which leaf fields. An apply sets the fields in its
//! configuration; a field another manager owns with a *different* value is a conflict (409,
//! cause `FieldManagerConflict`) unless forced, while the same value is shared ownership. Fields
//! the applier owned before and no longer mentions are removed when nobody else owns them.

use std::collections::BTreeSet;

use serde_json::{json, Map, Value};

use super::patch::merge_key;
use super::store::ApiError;

/// One step of a field path: a map field, or a list item identified by its merge key.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum Step {
    Field(String),
    /// The list item whose merge-key field `.0` equals the JSON value `.1`.
    Key(String, String),
}

type FieldPath = Vec<Step>;
type FieldSet = BTreeSet<FieldPath>;

/// Metadata fields the server owns; they never take part in ownership.
const SYSTEM_METADATA: &[&str] = &[
    "name",
    "namespace",
    "uid",
    "resourceVersion",
    "generation",
    "creationTimestamp",
    "managedFields",
    "selfLink",
    "deletionTimestamp",
];

fn names(path: &FieldPath) -> Vec<String> {
    path.iter()
        .filter_map(|s| match s {
            Step::Field(f) => Some(f.clone()),
            Step::Key(..) => None,
        })
        .collect()
}

/// The leaf fields set in `obj`, skipping server-owned fields and, when `with_status` is false,
/// the status.
fn leaves(obj: &Value, with_status: bool) -> FieldSet {
    let mut out = FieldSet::new();
    if let Value::Object(m) = obj {
        for (k, v) in m {
            if k == "apiVersion" || k == "kind" || (k == "status" && !with_status) {
                continue;
            }
            if k == "metadata" {
                if let Value::Object(meta) = v {
                    for (mk, mv) in meta {
                        if SYSTEM_METADATA.contains(&mk.as_str()) {
                            continue;
                        }
                        let mut p = vec![Step::Field("metadata".into()), Step::Field(mk.clone())];
                        walk(mv, &mut p, &mut out);
                    }
                }
                continue;
            }
            let mut p = vec![Step::Field(k.clone())];
            walk(v, &mut p, &mut out);
        }
    }
    out
}

fn walk(v: &Value, path: &mut FieldPath, out: &mut FieldSet) {
    match v {
        Value::Object(m) if !m.is_empty() => {
            for (k, child) in m {
                path.push(Step::Field(k.clone()));
                walk(child, path, out);
                path.pop();
            }
        }
        Value::Array(items) => {
            let key = merge_key(&names(path));
            match key {
                Some(key) if items.iter().all(|i| i.get(key).is_some()) => {
                    for item in items {
                        let kv = item.get(key).map(Value::to_string).unwrap_or_default();
                        path.push(Step::Key(key.to_string(), kv));
                        walk(item, path, out);
                        path.pop();
                    }
                }
                // Lists without a merge key are atomic: owned as a whole.
                _ => {
                    out.insert(path.clone());
                }
            }
        }
        _ => {
            out.insert(path.clone());
        }
    }
}

fn get_at<'a>(obj: &'a Value, path: &[Step]) -> Option<&'a Value> {
    let mut cur = obj;
    for step in path {
        cur = match step {
            Step::Field(f) => cur.get(f)?,
            Step::Key(k, v) => cur
                .as_array()?
                .iter()
                .find(|i| i.get(k).map(Value::to_string).as_deref() == Some(v.as_str()))?,
        };
    }
    Some(cur)
}

fn set_at(obj: &mut Value, path: &[Step], value: Value) {
    let Some((first, rest)) = path.split_first() else {
        *obj = value;
        return;
    };
    match first {
        Step::Field(f) => {
            if !obj.is_object() {
                *obj = Value::Object(Map::new());
            }
            if let Value::Object(m) = obj {
                let child = m.entry(f.clone()).or_insert(Value::Null);
                set_at(child, rest, value);
            }
        }
        Step::Key(k, v) => {
            if !obj.is_array() {
                *obj = Value::Array(Vec::new());
            }
            if let Value::Array(items) = obj {
                let pos = items
                    .iter()
                    .position(|i| i.get(k).map(Value::to_string).as_deref() == Some(v.as_str()));
                let idx = match pos {
                    Some(i) => i,
                    None => {
                        let key_value: Value = serde_json::from_str(v).unwrap_or(Value::Null);
                        let mut item = Map::new();
                        item.insert(k.clone(), key_value);
                        items.push(Value::Object(item));
                        items.len() - 1
                    }
                };
                set_at(&mut items[idx], rest, value);
            }
        }
    }
}

/// Remove a leaf and any maps or keyed items it leaves empty (save their key).
fn remove_at(obj: &mut Value, path: &[Step]) {
    let Some((first, rest)) = path.split_first() else {
        return;
    };
    match (first, obj) {
        (Step::Field(f), Value::Object(m)) => {
            if rest.is_empty() {
                m.remove(f);
            } else if let Some(child) = m.get_mut(f) {
                remove_at(child, rest);
                let empty = match child {
                    Value::Object(cm) => cm.is_empty(),
                    Value::Array(a) => a.is_empty(),
                    _ => false,
                };
                if empty {
                    m.remove(f);
                }
            }
        }
        (Step::Key(k, v), Value::Array(items)) => {
            if let Some(i) = items
                .iter()
                .position(|i| i.get(k).map(Value::to_string).as_deref() == Some(v.as_str()))
            {
                if rest.is_empty() {
                    items.remove(i);
                } else {
                    remove_at(&mut items[i], rest);
                    if items[i].as_object().is_some_and(|m| m.len() <= 1) {
                        items.remove(i);
                    }
                }
            }
        }
        _ => {}
    }
}

/// `.spec.template.spec.containers[name="web"].image`, as the API server prints field paths.
fn display(path: &FieldPath) -> String {
    let mut s = String::new();
    for step in path {
        match step {
            Step::Field(f) => {
                s.push('.');
                s.push_str(f);
            }
            Step::Key(k, v) => s.push_str(&format!("[{k}={v}]")),
        }
    }
    s
}

/// Encode a field set as `fieldsV1` (`{"f:spec": {"f:replicas": {}}}`).
fn to_fields_v1(set: &FieldSet) -> Value {
    let mut root = Map::new();
    for path in set {
        let mut cur = &mut root;
        for step in path {
            let name = match step {
                Step::Field(f) => format!("f:{f}"),
                Step::Key(k, v) => format!("k:{{\"{k}\":{v}}}"),
            };
            let entry = cur.entry(name).or_insert_with(|| json!({}));
            if let Step::Key(..) = step {
                if let Value::Object(m) = entry {
                    m.entry(".").or_insert_with(|| json!({}));
                }
            }
            cur = match entry {
                Value::Object(m) => m,
                _ => break,
            };
        }
    }
    Value::Object(root)
}

fn from_fields_v1(v: &Value) -> FieldSet {
    fn rec(v: &Value, path: &mut FieldPath, out: &mut FieldSet) {
        let Value::Object(m) = v else { return };
        let children: Vec<_> = m.iter().filter(|(k, _)| k.as_str() != ".").collect();
        if children.is_empty() {
            if !path.is_empty() {
                out.insert(path.clone());
            }
            return;
        }
        for (k, child) in children {
            let step = if let Some(f) = k.strip_prefix("f:") {
                Step::Field(f.to_string())
            } else if let Some(kv) = k.strip_prefix("k:") {
                let parsed: Value = serde_json::from_str(kv).unwrap_or(Value::Null);
                match parsed.as_object().and_then(|o| o.iter().next()) {
                    Some((key, val)) => Step::Key(key.clone(), val.to_string()),
                    None => continue,
                }
            } else {
                continue;
            };
            path.push(step);
            rec(child, path, out);
            path.pop();
        }
    }
    let mut out = FieldSet::new();
    rec(v, &mut Vec::new(), &mut out);
    out
}

struct Manager {
    name: String,
    operation: String,
    api_version: String,
    fields: FieldSet,
}

fn read_managers(obj: &Value) -> Vec<Manager> {
    obj["metadata"]["managedFields"]
        .as_array()
        .map(|entries| {
            entries
                .iter()
                .map(|e| Manager {
                    name: e["manager"].as_str().unwrap_or_default().to_string(),
                    operation: e["operation"].as_str().unwrap_or("Update").to_string(),
                    api_version: e["apiVersion"].as_str().unwrap_or_default().to_string(),
                    fields: from_fields_v1(&e["fieldsV1"]),
                })
                .collect()
        })
        .unwrap_or_default()
}

fn write_managers(obj: &mut Value, managers: Vec<Manager>, now: &str) {
    let entries: Vec<Value> = managers
        .into_iter()
        .filter(|m| !m.fields.is_empty())
        .map(|m| {
            json!({
                "manager": m.name,
                "operation": m.operation,
                "apiVersion": m.api_version,
                "time": now,
                "fieldsType": "FieldsV1",
                "fieldsV1": to_fields_v1(&m.fields),
            })
        })
        .collect();
    if let Value::Object(meta) = &mut obj["metadata"] {
        if entries.is_empty() {
            meta.remove("managedFields");
        } else {
            meta.insert("managedFields".into(), Value::Array(entries));
        }
    }
}

/// Record ownership for a non-apply write (create, update, patch): the fields that `new` sets
/// differently from `old` now belong to `manager`; fields that disappeared belong to nobody.
pub fn track_update(
    old: Option<&Value>,
    new: &mut Value,
    manager: &str,
    api_version: &str,
    now: &str,
) {
    let old_leaves = old.map(|o| leaves(o, false)).unwrap_or_default();
    let new_leaves = leaves(new, false);
    let mut managers = old.map(read_managers).unwrap_or_default();
    let changed: FieldSet = new_leaves
        .iter()
        .filter(|p| !old_leaves.contains(*p) || old.and_then(|o| get_at(o, p)) != get_at(new, p))
        .cloned()
        .collect();
    for m in &mut managers {
        m.fields
            .retain(|p| new_leaves.contains(p) && !changed.contains(p));
    }
    if !changed.is_empty() {
        match managers
            .iter_mut()
            .find(|m| m.name == manager && m.operation == "Update")
        {
            Some(m) => m.fields.extend(changed),
            None => managers.push(Manager {
                name: manager.to_string(),
                operation: "Update".into(),
                api_version: api_version.to_string(),
                fields: changed,
            }),
        }
    }
    write_managers(new, managers, now);
}

/// Server-side apply of `config` by `manager` onto `live` (or onto an empty object when the
/// object does not exist yet).
pub fn apply(
    live: Option<&Value>,
    config: &Value,
    manager: &str,
    force: bool,
    api_version: &str,
    now: &str,
) -> Result<Value, ApiError> {
    let mut obj = live.cloned().unwrap_or_else(
        || json!({"apiVersion": config["apiVersion"], "kind": config["kind"], "metadata": {}}),
    );
    let mut managers = live.map(read_managers).unwrap_or_default();
    let applied = leaves(config, false);

    let mut conflicts = Vec::new();
    for path in &applied {
        let want = get_at(config, path);
        if get_at(&obj, path) == want {
            continue;
        }
        for m in &managers {
            if (m.name != manager || m.operation != "Apply") && m.fields.contains(path) {
                conflicts.push((m.name.clone(), m.api_version.clone(), display(path)));
            }
        }
    }
    if !conflicts.is_empty() && !force {
        let kind = config["kind"].as_str().unwrap_or_default();
        let name = config["metadata"]["name"].as_str().unwrap_or_default();
        let causes: Vec<Value> = conflicts
            .iter()
            .map(|(m, av, field)| {
                json!({"reason": "FieldManagerConflict",
                       "message": format!("conflict with \"{m}\" using {av}"),
                       "field": field})
            })
            .collect();
        let message = format!(
            "Apply failed with {} conflict{}: {}",
            conflicts.len(),
            if conflicts.len() == 1 { "" } else { "s" },
            conflicts
                .iter()
                .map(|(m, av, f)| format!("conflict with \"{m}\" using {av}: {f}"))
                .collect::<Vec<_>>()
                .join("\n")
        );
        let mut err = ApiError::new(409, "Conflict", message);
        err.details = Some(json!({"name": name, "kind": kind.to_lowercase(), "causes": causes}));
        return Err(err);
    }

    // Values the applier sets; a forced apply takes the fields away from their other owners.
    for path in &applied {
        if let Some(v) = get_at(config, path) {
            let v = v.clone();
            set_at(&mut obj, path, v);
        }
        if force {
            for m in &mut managers {
                if m.name != manager || m.operation != "Apply" {
                    m.fields.remove(path);
                }
            }
        }
    }
    // Fields this manager applied before and no longer mentions go, unless someone else holds them.
    let previous: FieldSet = managers
        .iter()
        .find(|m| m.name == manager && m.operation == "Apply")
        .map(|m| m.fields.clone())
        .unwrap_or_default();
    for path in previous.difference(&applied) {
        let held = managers
            .iter()
            .any(|m| (m.name != manager || m.operation != "Apply") && m.fields.contains(path));
        if !held {
            remove_at(&mut obj, path);
        }
    }
    managers.retain(|m| !(m.name == manager && m.operation == "Apply"));
    managers.push(Manager {
        name: manager.to_string(),
        operation: "Apply".into(),
        api_version: api_version.to_string(),
        fields: applied,
    });
    // Name and namespace come from the configuration (validated by the caller).
    for k in ["name", "namespace"] {
        if let Some(v) = config["metadata"].get(k) {
            obj["metadata"][k] = v.clone();
        }
    }
    write_managers(&mut obj, managers, now);
    Ok(obj)
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: &str = "2026-01-01T00:00:00Z";

    fn lease(holder: &str) -> Value {
        json!({"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
               "metadata": {"name": "leader", "namespace": "default"},
               "spec": {"holderIdentity": holder, "leaseDurationSeconds": 15}})
    }

    #[test]
    fn a_different_value_owned_by_another_manager_conflicts() {
        let a = apply(None, &lease("a"), "a", false, "coordination.k8s.io/v1", NOW).expect("a");
        let err = apply(
            Some(&a),
            &lease("b"),
            "b",
            false,
            "coordination.k8s.io/v1",
            NOW,
        )
        .expect_err("conflict");
        assert_eq!(err.code, 409);
        let causes = &err.details.expect("details")["causes"];
        assert_eq!(causes[0]["reason"], "FieldManagerConflict");
        assert_eq!(causes[0]["field"], ".spec.holderIdentity");
        // Same value: shared ownership, no conflict.
        let shared = apply(
            Some(&a),
            &lease("a"),
            "b",
            false,
            "coordination.k8s.io/v1",
            NOW,
        )
        .expect("shared");
        assert_eq!(
            shared["metadata"]["managedFields"].as_array().map(Vec::len),
            Some(2)
        );
        // Forced: b takes the field.
        let forced = apply(
            Some(&a),
            &lease("b"),
            "b",
            true,
            "coordination.k8s.io/v1",
            NOW,
        )
        .expect("force");
        assert_eq!(forced["spec"]["holderIdentity"], "b");
        let again = apply(
            Some(&forced),
            &lease("c"),
            "b",
            false,
            "coordination.k8s.io/v1",
            NOW,
        )
        .expect("b owns it now");
        assert_eq!(again["spec"]["holderIdentity"], "c");
    }

    #[test]
    fn fields_dropped_from_the_configuration_are_removed() {
        let mut cfg = lease("a");
        cfg["metadata"]["labels"] = json!({"x": "1"});
        let one = apply(None, &cfg, "a", false, "v", NOW).expect("first");
        assert_eq!(one["metadata"]["labels"]["x"], "1");
        let two = apply(Some(&one), &lease("a"), "a", false, "v", NOW).expect("second");
        assert!(two["metadata"].get("labels").is_none(), "{two}");
    }

    #[test]
    fn update_takes_ownership_and_keyed_lists_round_trip() {
        let dep = json!({"apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": "web"},
            "spec": {"template": {"spec": {"containers": [{"name": "web", "image": "web:1"}]}}}});
        let applied = apply(None, &dep, "ci", false, "apps/v1", NOW).expect("apply");
        let mut changed = applied.clone();
        changed["spec"]["template"]["spec"]["containers"][0]["image"] = json!("web:2");
        track_update(Some(&applied), &mut changed, "kubectl-set", "apps/v1", NOW);
        let err = apply(Some(&changed), &dep, "ci", false, "apps/v1", NOW).expect_err("conflict");
        assert!(
            err.message
                .contains(".spec.template.spec.containers[name=\"web\"].image"),
            "{}",
            err.message
        );
        let fields = from_fields_v1(&to_fields_v1(&leaves(&dep, false)));
        assert_eq!(fields, leaves(&dep, false));
    }
}
