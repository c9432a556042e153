//! Discovery (`/version`, `/api`, `/apis`, per group/version resource lists) and the OpenAPI v3
//! documents kubectl reads to learn that the server validates fields itself.

use serde_json::{json, Value};

use super::resources::{group_versions, ResourceType, RESOURCES};

pub const KUBE_VERSION: &str = "v1.32.0";

pub fn version() -> Value {
    json!({
        "major": "1",
        "minor": "32",
        "gitVersion": format!("{KUBE_VERSION}+depwatch-sim"),
        "gitCommit": "0000000000000000000000000000000000000000",
        "gitTreeState": "clean",
        "buildDate": "2026-01-01T00:00:00Z",
        "goVersion": "go1.23.0",
        "compiler": "gc",
        "platform": "linux/amd64"
    })
}

pub fn core_versions(server: &str) -> Value {
    json!({
        "kind": "APIVersions",
        "versions": ["v1"],
        "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": server}]
    })
}

pub fn groups() -> Value {
    let groups: Vec<Value> = group_versions()
        .into_iter()
        .filter(|(g, _, _)| !g.is_empty())
        .map(|(g, v, _)| {
            let gv = json!({"groupVersion": format!("{g}/{v}"), "version": v});
            json!({"name": g, "versions": [gv.clone()], "preferredVersion": gv})
        })
        .collect();
    json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": groups})
}

pub fn group(name: &str) -> Option<Value> {
    group_versions()
        .into_iter()
        .find(|(g, _, _)| *g == name)
        .map(|(g, v, _)| {
            let gv = json!({"groupVersion": format!("{g}/{v}"), "version": v});
            json!({"kind": "APIGroup", "apiVersion": "v1", "name": g,
                   "versions": [gv.clone()], "preferredVersion": gv})
        })
}

fn verbs() -> Value {
    json!([
        "create",
        "delete",
        "deletecollection",
        "get",
        "list",
        "patch",
        "update",
        "watch"
    ])
}

pub fn resource_list(group: &str, version: &str) -> Option<Value> {
    let (g, v, kinds) = group_versions()
        .into_iter()
        .find(|(g, v, _)| *g == group && *v == version)?;
    let mut resources = Vec::new();
    for r in kinds {
        resources.push(json!({
            "name": r.plural,
            "singularName": r.singular,
            "namespaced": r.namespaced,
            "kind": r.kind,
            "verbs": verbs(),
            "shortNames": r.short_names,
            "storageVersionHash": "",
        }));
        if r.status_subresource {
            resources.push(json!({
                "name": format!("{}/status", r.plural),
                "singularName": "",
                "namespaced": r.namespaced,
                "kind": r.kind,
                "verbs": ["get", "patch", "update"],
            }));
        }
        if super::resources::has_scale(r) {
            resources.push(json!({
                "name": format!("{}/scale", r.plural),
                "singularName": "",
                "namespaced": r.namespaced,
                "group": "autoscaling",
                "version": "v1",
                "kind": "Scale",
                "verbs": ["get", "patch", "update"],
            }));
        }
    }
    let gv = if g.is_empty() {
        v.to_string()
    } else {
        format!("{g}/{v}")
    };
    Some(
        json!({"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": gv, "resources": resources}),
    )
}

fn gv_key(group: &str, version: &str) -> String {
    if group.is_empty() {
        format!("api/{version}")
    } else {
        format!("apis/{group}/{version}")
    }
}

/// `/openapi/v3`: where each group/version's document lives.
pub fn openapi_index() -> Value {
    let mut paths = serde_json::Map::new();
    for (g, v, _) in group_versions() {
        let key = gv_key(g, v);
        paths.insert(
            key.clone(),
            json!({"serverRelativeURL": format!("/openapi/v3/{key}?hash=depwatch-sim-1")}),
        );
    }
    json!({"paths": paths})
}

fn gvk(r: &ResourceType) -> Value {
    json!({"group": r.group, "version": r.version, "kind": r.kind})
}

fn operation(r: &ResourceType, verb: &str, with_field_validation: bool) -> Value {
    let mut params = vec![
        json!({"name": "dryRun", "in": "query", "schema": {"type": "string", "uniqueItems": true}}),
        json!({"name": "fieldManager", "in": "query", "schema": {"type": "string", "uniqueItems": true}}),
    ];
    if with_field_validation {
        params.push(json!({"name": "fieldValidation", "in": "query",
                           "schema": {"type": "string", "uniqueItems": true}}));
    }
    json!({
        "operationId": format!("{verb}{}", r.kind),
        "parameters": params,
        "responses": {"200": {"description": "OK", "content": {"application/json": {
            "schema": {"$ref": format!("#/components/schemas/{}", schema_name(r))}}}}},
        "x-kubernetes-action": verb,
        "x-kubernetes-group-version-kind": gvk(r),
    })
}

fn schema_name(r: &ResourceType) -> String {
    let group = if r.group.is_empty() { "core" } else { r.group };
    format!("io.k8s.sim.{group}.{}.{}", r.version, r.kind)
}

/// The OpenAPI v3 document of one group/version: every PATCH and POST operation accepts
/// `fieldValidation`, which is how kubectl decides to leave validation to the server, and every
/// kind has a permissive schema tagged with its group/version/kind.
pub fn openapi_group(path: &str) -> Option<Value> {
    let (group, version) = if let Some(v) = path.strip_prefix("api/") {
        ("", v)
    } else {
        let rest = path.strip_prefix("apis/")?;
        rest.split_once('/')?
    };
    let kinds: Vec<&ResourceType> = RESOURCES
        .iter()
        .filter(|r| r.group == group && r.version == version)
        .collect();
    if kinds.is_empty() {
        return None;
    }
    let mut paths = serde_json::Map::new();
    let mut schemas = serde_json::Map::new();
    for r in kinds {
        let prefix = format!("/{}", gv_key(group, version));
        let (collection, item) = if r.namespaced {
            (
                format!("{prefix}/namespaces/{{namespace}}/{}", r.plural),
                format!("{prefix}/namespaces/{{namespace}}/{}/{{name}}", r.plural),
            )
        } else {
            (
                format!("{prefix}/{}", r.plural),
                format!("{prefix}/{}/{{name}}", r.plural),
            )
        };
        paths.insert(
            collection,
            json!({"get": operation(r, "list", false), "post": operation(r, "post", true)}),
        );
        paths.insert(
            item,
            json!({
                "get": operation(r, "get", false),
                "put": operation(r, "put", true),
                "patch": operation(r, "patch", true),
                "delete": operation(r, "delete", false),
            }),
        );
        schemas.insert(
            schema_name(r),
            json!({
                "type": "object",
                "description": format!("{} (schema left open by the simulated cluster)", r.kind),
                "x-kubernetes-preserve-unknown-fields": true,
                "x-kubernetes-group-version-kind": [gvk(r)],
            }),
        );
    }
    Some(json!({
        "openapi": "3.0.0",
        "info": {"title": "Kubernetes", "version": KUBE_VERSION},
        "paths": paths,
        "components": {"schemas": schemas},
    }))
}
