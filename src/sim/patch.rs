//! The four patch content types with the API server's semantics: JSON patch (RFC 6902),
//! JSON merge patch (RFC 7386), strategic merge patch (lists merged by their patch merge key,
//! with `$patch`, `$setElementOrder`, `$retainKeys` and `$deleteFromPrimitiveList` directives) and,
//! in [`super::apply`], server-side apply.

use serde_json::{Map, Value};

use super::store::ApiError;

/// The patch merge key of a list field, from the Kubernetes API's `patchMergeKey` tags.
/// `path` is the field names from the object root (list positions left out).
pub fn merge_key(path: &[String]) -> Option<&'static str> {
    let field = path.last()?.as_str();
    let parent = path.len().checked_sub(2).map(|i| path[i].as_str());
    Some(match field {
        "containers" | "initContainers" | "ephemeralContainers" => "name",
        "env" | "volumes" | "imagePullSecrets" | "resourceClaims" => "name",
        "volumeMounts" => "mountPath",
        "volumeDevices" => "devicePath",
        "conditions" => "type",
        "ownerReferences" => "uid",
        "hostAliases" => "ip",
        "topologySpreadConstraints" => "topologyKey",
        "ports" => match parent {
            Some("containers") | Some("initContainers") | Some("ephemeralContainers") => {
                "containerPort"
            }
            _ => "port",
        },
        _ => return None,
    })
}

/// Primitive lists whose patch strategy is `merge` (union) rather than replace.
fn merges_primitives(path: &[String]) -> bool {
    matches!(path.last().map(String::as_str), Some("finalizers"))
}

pub fn json_patch(target: &Value, patch_body: &[u8]) -> Result<Value, ApiError> {
    let patch: json_patch::Patch = serde_json::from_slice(patch_body)
        .map_err(|e| ApiError::bad_request(format!("invalid JSON patch: {e}")))?;
    let mut doc = target.clone();
    json_patch::patch(&mut doc, &patch).map_err(|e| {
        ApiError::new(
            422,
            "Invalid",
            format!("the JSON patch could not be applied: {e}"),
        )
    })?;
    Ok(doc)
}

pub fn merge_patch(target: &Value, patch_body: &[u8]) -> Result<Value, ApiError> {
    let patch: Value = serde_json::from_slice(patch_body)
        .map_err(|e| ApiError::bad_request(format!("invalid JSON merge patch: {e}")))?;
    let mut doc = target.clone();
    json_patch::merge(&mut doc, &patch);
    Ok(doc)
}

pub fn strategic_merge_patch(target: &Value, patch_body: &[u8]) -> Result<Value, ApiError> {
    let patch: Value = serde_json::from_slice(patch_body)
        .map_err(|e| ApiError::bad_request(format!("invalid strategic merge patch: {e}")))?;
    let Value::Object(patch) = patch else {
        return Err(ApiError::bad_request(
            "a strategic merge patch must be a JSON object",
        ));
    };
    let mut doc = target.clone();
    let Value::Object(map) = &mut doc else {
        return Err(ApiError::bad_request(
            "the target object is not a JSON object",
        ));
    };
    merge_map(map, &patch, &mut Vec::new())?;
    Ok(doc)
}

fn merge_map(
    target: &mut Map<String, Value>,
    patch: &Map<String, Value>,
    path: &mut Vec<String>,
) -> Result<(), ApiError> {
    match patch.get("$patch").and_then(Value::as_str) {
        Some("replace") => {
            target.clear();
            for (k, v) in patch {
                if k != "$patch" {
                    target.insert(k.clone(), strip_directives(v));
                }
            }
            return Ok(());
        }
        Some("delete") => {
            target.clear();
            return Ok(());
        }
        Some("merge") | None => {}
        Some(other) => {
            return Err(ApiError::bad_request(format!(
                "unknown patch type {other:?} in strategic merge patch"
            )))
        }
    }
    if let Some(keep) = patch.get("$retainKeys").and_then(Value::as_array) {
        let keep: Vec<&str> = keep.iter().filter_map(Value::as_str).collect();
        target.retain(|k, _| keep.contains(&k.as_str()));
    }
    for (k, v) in patch {
        if k == "$patch" || k == "$retainKeys" || k.starts_with("$setElementOrder/") {
            continue;
        }
        if let Some(field) = k.strip_prefix("$deleteFromPrimitiveList/") {
            if let (Some(Value::Array(items)), Some(remove)) = (target.get_mut(field), v.as_array())
            {
                items.retain(|i| !remove.contains(i));
            }
            continue;
        }
        path.push(k.clone());
        match v {
            Value::Null => {
                target.remove(k);
            }
            Value::Object(pm) => {
                if pm.get("$patch").and_then(Value::as_str) == Some("delete") {
                    target.remove(k);
                } else {
                    match target.get_mut(k) {
                        Some(Value::Object(tm)) => merge_map(tm, pm, path)?,
                        _ => {
                            let mut fresh = Map::new();
                            merge_map(&mut fresh, pm, path)?;
                            target.insert(k.clone(), Value::Object(fresh));
                        }
                    }
                }
            }
            Value::Array(pa) => {
                let order = patch
                    .get(&format!("$setElementOrder/{k}"))
                    .and_then(Value::as_array);
                let existing = match target.remove(k) {
                    Some(Value::Array(a)) => a,
                    _ => Vec::new(),
                };
                let merged = merge_list(existing, pa, order, path)?;
                target.insert(k.clone(), Value::Array(merged));
            }
            scalar => {
                target.insert(k.clone(), scalar.clone());
            }
        }
        path.pop();
    }
    // `$setElementOrder` without a list in the patch still reorders the existing list.
    for (k, v) in patch {
        if let Some(field) = k.strip_prefix("$setElementOrder/") {
            if patch.contains_key(field) {
                continue;
            }
            path.push(field.to_string());
            if let (Some(Value::Array(items)), Some(order)) = (target.get_mut(field), v.as_array())
            {
                let taken = std::mem::take(items);
                *items = reorder(taken, order, merge_key(path));
            }
            path.pop();
        }
    }
    Ok(())
}

fn strip_directives(v: &Value) -> Value {
    match v {
        Value::Object(m) => Value::Object(
            m.iter()
                .filter(|(k, _)| !k.starts_with('$'))
                .map(|(k, v)| (k.clone(), strip_directives(v)))
                .collect(),
        ),
        Value::Array(a) => Value::Array(a.iter().map(strip_directives).collect()),
        other => other.clone(),
    }
}

fn same_key(a: &Value, b: &Value, key: &str) -> bool {
    match (a.get(key), b.get(key)) {
        (Some(x), Some(y)) => x == y,
        _ => false,
    }
}

fn merge_list(
    mut existing: Vec<Value>,
    patch: &[Value],
    order: Option<&Vec<Value>>,
    path: &mut Vec<String>,
) -> Result<Vec<Value>, ApiError> {
    // `[{"$patch": "replace"}, ...]` replaces the whole list.
    if patch
        .iter()
        .any(|p| p.get("$patch").and_then(Value::as_str) == Some("replace"))
    {
        return Ok(patch
            .iter()
            .filter(|p| p.get("$patch").is_none())
            .map(strip_directives)
            .collect());
    }
    let key = merge_key(path);
    let Some(key) = key else {
        if merges_primitives(path) {
            for p in patch {
                if !existing.contains(p) {
                    existing.push(p.clone());
                }
            }
            return Ok(existing);
        }
        // No merge key: the patch's list replaces the old one, as for atomic lists.
        return Ok(patch.iter().map(strip_directives).collect());
    };
    for p in patch {
        let Value::Object(pm) = p else {
            return Err(ApiError::bad_request(format!(
                "strategic merge patch: items of {} must be objects keyed by {key}",
                path.join(".")
            )));
        };
        let pos = existing.iter().position(|e| same_key(e, p, key));
        if pm.get("$patch").and_then(Value::as_str) == Some("delete") {
            if let Some(i) = pos {
                existing.remove(i);
            }
            continue;
        }
        match pos {
            Some(i) => {
                if let Value::Object(em) = &mut existing[i] {
                    merge_map(em, pm, path)?;
                }
            }
            None => {
                let mut fresh = Map::new();
                merge_map(&mut fresh, pm, path)?;
                existing.push(Value::Object(fresh));
            }
        }
    }
    Ok(match order {
        Some(order) => reorder(existing, order, Some(key)),
        None => existing,
    })
}

/// Put items in the order `$setElementOrder` gives; items it does not name keep their
/// relative order after the named ones.
fn reorder(items: Vec<Value>, order: &[Value], key: Option<&str>) -> Vec<Value> {
    let mut rest = items;
    let mut out = Vec::with_capacity(rest.len());
    for o in order {
        let pos = match key {
            Some(k) => rest.iter().position(|e| same_key(e, o, k)),
            None => rest.iter().position(|e| e == o),
        };
        if let Some(i) = pos {
            out.push(rest.remove(i));
        }
    }
    out.extend(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn deployment() -> Value {
        json!({
            "metadata": {"name": "web", "labels": {"app": "web"}, "finalizers": ["a"]},
            "spec": {"template": {"spec": {"containers": [
                {"name": "web", "image": "web:1", "ports": [{"containerPort": 80}],
                 "env": [{"name": "A", "value": "1"}, {"name": "B", "value": "2"}]},
                {"name": "sidecar", "image": "side:1"}
            ]}}}
        })
    }

    fn smp(patch: Value) -> Value {
        strategic_merge_patch(&deployment(), patch.to_string().as_bytes()).expect("patch applies")
    }

    // Cases follow the Kubernetes documentation "Update API Objects in Place Using kubectl
    // patch" and the strategic-merge-patch design document.
    #[test]
    fn containers_merge_by_name() {
        let out = smp(json!({"spec": {"template": {"spec": {"containers": [
            {"name": "web", "image": "web:2"}]}}}}));
        let cs = &out["spec"]["template"]["spec"]["containers"];
        assert_eq!(cs[0]["image"], "web:2");
        assert_eq!(
            cs[0]["ports"][0]["containerPort"], 80,
            "untouched fields stay"
        );
        assert_eq!(cs[1]["image"], "side:1", "the sidecar keeps its image");
    }

    #[test]
    fn new_list_items_are_appended_and_set_element_order_orders_them() {
        let out = smp(json!({"spec": {"template": {"spec": {
            "$setElementOrder/containers": [{"name": "log"}, {"name": "web"}, {"name": "sidecar"}],
            "containers": [{"name": "log", "image": "log:1"}]}}}}));
        let names: Vec<&str> = out["spec"]["template"]["spec"]["containers"]
            .as_array()
            .expect("list")
            .iter()
            .map(|c| c["name"].as_str().expect("name"))
            .collect();
        assert_eq!(names, ["log", "web", "sidecar"]);
    }

    #[test]
    fn delete_and_replace_directives() {
        let out = smp(json!({"spec": {"template": {"spec": {"containers": [
            {"name": "sidecar", "$patch": "delete"}]}}}}));
        assert_eq!(
            out["spec"]["template"]["spec"]["containers"]
                .as_array()
                .map(Vec::len),
            Some(1)
        );
        let out = smp(json!({"spec": {"template": {"spec": {"containers": [
            {"$patch": "replace"}, {"name": "only", "image": "o:1"}]}}}}));
        assert_eq!(
            out["spec"]["template"]["spec"]["containers"],
            json!([{"name": "only", "image": "o:1"}])
        );
        let out = smp(json!({"metadata": {"labels": {"$patch": "replace", "new": "x"}}}));
        assert_eq!(out["metadata"]["labels"], json!({"new": "x"}));
    }

    #[test]
    fn null_deletes_and_nested_env_merges() {
        let out = smp(json!({"metadata": {"labels": {"app": null}},
            "spec": {"template": {"spec": {"containers": [
            {"name": "web", "env": [{"name": "B", "value": "3"}, {"name": "C", "value": "4"}]}]}}}}));
        assert_eq!(out["metadata"]["labels"], json!({}));
        assert_eq!(
            out["spec"]["template"]["spec"]["containers"][0]["env"],
            json!([{"name": "A", "value": "1"}, {"name": "B", "value": "3"}, {"name": "C", "value": "4"}])
        );
    }

    #[test]
    fn primitive_merge_lists_and_delete_from_primitive_list() {
        let out = smp(json!({"metadata": {"finalizers": ["b"]}}));
        assert_eq!(out["metadata"]["finalizers"], json!(["a", "b"]));
        let out = smp(json!({"metadata": {"$deleteFromPrimitiveList/finalizers": ["a"]}}));
        assert_eq!(out["metadata"]["finalizers"], json!([]));
    }

    #[test]
    fn merge_patch_replaces_lists_and_json_patch_edits_paths() {
        let out = merge_patch(
            &deployment(),
            br#"{"spec":{"template":{"spec":{"containers":[{"name":"web","image":"web:3"}]}}}}"#,
        )
        .expect("merge patch");
        assert_eq!(
            out["spec"]["template"]["spec"]["containers"]
                .as_array()
                .map(Vec::len),
            Some(1),
            "merge patch replaces the whole list"
        );
        let out = json_patch(
            &deployment(),
            br#"[{"op":"replace","path":"/spec/template/spec/containers/1/image","value":"side:2"},
                 {"op":"test","path":"/metadata/name","value":"web"}]"#,
        )
        .expect("json patch");
        assert_eq!(
            out["spec"]["template"]["spec"]["containers"][1]["image"],
            "side:2"
        );
        let err = json_patch(
            &deployment(),
            br#"[{"op":"test","path":"/metadata/name","value":"api"}]"#,
        )
        .expect_err("failed test op");
        assert_eq!(err.code, 422);
    }
}
