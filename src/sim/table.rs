//! `meta.k8s.io/v1` Table rendering, which `kubectl get` asks for so that it can print the
//! server's columns (READY, UP-TO-DATE, AVAILABLE for Deployments).

use serde_json::{json, Value};

use super::resources::ResourceType;

/// Whether an `Accept` header asks for a Table.
pub fn wants_table(accept: &str) -> bool {
    accept
        .split(',')
        .any(|part| part.contains("as=Table") && part.contains("g=meta.k8s.io"))
}

fn col(name: &str, kind: &str, priority: u8, description: &str) -> Value {
    json!({"name": name, "type": kind, "format": if name == "Name" { "name" } else { "" },
           "description": description, "priority": priority})
}

/// A short age as kubectl prints it (`45s`, `3m`, `2h`, `5d`).
pub fn age(created: &str) -> String {
    let Ok(t) = created.parse::<jiff::Timestamp>() else {
        return "<unknown>".into();
    };
    let secs = (jiff::Timestamp::now().as_second() - t.as_second()).max(0);
    match secs {
        s if s < 120 => format!("{s}s"),
        s if s < 3600 * 2 => format!("{}m", s / 60),
        s if s < 86400 * 2 => format!("{}h", s / 3600),
        s => format!("{}d", s / 86400),
    }
}

fn n(v: &Value) -> i64 {
    v.as_i64().unwrap_or(0)
}

/// A field of each container in an object's pod template, comma-separated.
fn template_join(o: &Value, field: &str) -> String {
    o["spec"]["template"]["spec"]["containers"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|c| c[field].as_str())
        .collect::<Vec<_>>()
        .join(",")
}

/// Renders one object's row cells.
type Cells = fn(&Value) -> Vec<Value>;

fn columns_and_cells(rt: &ResourceType) -> (Vec<Value>, Cells) {
    match (rt.group, rt.plural) {
        ("apps", "deployments") => (
            vec![
                col("Name", "string", 0, "Name must be unique within a namespace."),
                col("Ready", "string", 0, "Number of the pod with ready state"),
                col("Up-to-date", "integer", 0, "Total number of non-terminated pods targeted by this deployment that have the desired template spec."),
                col("Available", "integer", 0, "Total number of available pods (ready for at least minReadySeconds) targeted by this deployment."),
                col("Age", "string", 0, "CreationTimestamp is a timestamp representing the server time when this object was created."),
                col("Containers", "string", 1, "Names of each container in the template."),
                col("Images", "string", 1, "Images referenced by each container in the template."),
                col("Selector", "string", 1, "Label selector for pods."),
            ],
            |o| {
                let cs = o["spec"]["template"]["spec"]["containers"].as_array().cloned().unwrap_or_default();
                let join = |f: &str| cs.iter().filter_map(|c| c[f].as_str()).collect::<Vec<_>>().join(",");
                let sel = o["spec"]["selector"]["matchLabels"].as_object().map(|m| {
                    m.iter().map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or_default())).collect::<Vec<_>>().join(",")
                }).unwrap_or_default();
                vec![
                    o["metadata"]["name"].clone(),
                    json!(format!("{}/{}", n(&o["status"]["readyReplicas"]), o["spec"]["replicas"].as_i64().unwrap_or(1))),
                    json!(n(&o["status"]["updatedReplicas"])),
                    json!(n(&o["status"]["availableReplicas"])),
                    json!(age(o["metadata"]["creationTimestamp"].as_str().unwrap_or_default())),
                    json!(join("name")),
                    json!(join("image")),
                    json!(sel),
                ]
            },
        ),
        ("apps", "replicasets") => (
            vec![
                col("Name", "string", 0, "Name"),
                col("Desired", "integer", 0, "Number of desired pods."),
                col("Current", "integer", 0, "The most recently observed number of replicas."),
                col("Ready", "integer", 0, "The number of ready replicas for this replica set."),
                col("Age", "string", 0, "CreationTimestamp"),
            ],
            |o| vec![
                o["metadata"]["name"].clone(),
                json!(n(&o["spec"]["replicas"])),
                json!(n(&o["status"]["replicas"])),
                json!(n(&o["status"]["readyReplicas"])),
                json!(age(o["metadata"]["creationTimestamp"].as_str().unwrap_or_default())),
            ],
        ),
        ("", "pods") => (
            vec![
                col("Name", "string", 0, "Name"),
                col("Ready", "string", 0, "The aggregate readiness state of this pod for accepting traffic."),
                col("Status", "string", 0, "The aggregate status of the containers in this pod."),
                col("Restarts", "string", 0, "The number of times the containers in this pod have been restarted."),
                col("Age", "string", 0, "CreationTimestamp"),
                col("IP", "string", 1, "IP address allocated to the pod."),
                col("Node", "string", 1, "Name of the Node this pod runs on."),
            ],
            |o| {
                let cs = o["status"]["containerStatuses"].as_array().cloned().unwrap_or_default();
                let total = o["spec"]["containers"].as_array().map(Vec::len).unwrap_or(0);
                let ready = cs.iter().filter(|c| c["ready"] == true).count();
                let restarts: i64 = cs.iter().map(|c| n(&c["restartCount"])).sum();
                let reason = cs
                    .iter()
                    .find_map(|c| c["state"]["waiting"]["reason"].as_str())
                    .or_else(|| o["status"]["phase"].as_str())
                    .unwrap_or("Unknown");
                vec![
                    o["metadata"]["name"].clone(),
                    json!(format!("{ready}/{total}")),
                    json!(reason),
                    json!(restarts.to_string()),
                    json!(age(o["metadata"]["creationTimestamp"].as_str().unwrap_or_default())),
                    json!(o["status"]["podIP"].as_str().unwrap_or("<none>")),
                    json!(o["spec"]["nodeName"].as_str().unwrap_or("<none>")),
                ]
            },
        ),
        ("apps", "statefulsets") => (
            vec![
                col("Name", "string", 0, "Name"),
                col("Ready", "string", 0, "Number of the pod with ready state"),
                col("Age", "string", 0, "CreationTimestamp"),
                col("Containers", "string", 1, "Names of each container in the template."),
                col("Images", "string", 1, "Images referenced by each container in the template."),
            ],
            |o| vec![
                o["metadata"]["name"].clone(),
                json!(format!("{}/{}", n(&o["status"]["readyReplicas"]), o["spec"]["replicas"].as_i64().unwrap_or(1))),
                json!(age(o["metadata"]["creationTimestamp"].as_str().unwrap_or_default())),
                json!(template_join(o, "name")),
                json!(template_join(o, "image")),
            ],
        ),
        ("apps", "daemonsets") => (
            vec![
                col("Name", "string", 0, "Name"),
                col("Desired", "integer", 0, "The total number of nodes that should be running the daemon pod."),
                col("Current", "integer", 0, "The number of nodes that are running at least 1 daemon pod and are supposed to run the daemon pod."),
                col("Ready", "integer", 0, "The number of nodes that should be running the daemon pod and have one or more of the daemon pod running and ready."),
                col("Up-to-date", "integer", 0, "The total number of nodes that are running updated daemon pod"),
                col("Available", "integer", 0, "The number of nodes that should be running the daemon pod and have one or more of the daemon pod running and available."),
                col("Node Selector", "string", 0, "NodeSelector is a selector which must be true for the pod to fit on a node."),
                col("Age", "string", 0, "CreationTimestamp"),
                col("Containers", "string", 1, "Names of each container in the template."),
                col("Images", "string", 1, "Images referenced by each container in the template."),
            ],
            |o| {
                let sel = o["spec"]["template"]["spec"]["nodeSelector"].as_object().map(|m| {
                    m.iter().map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or_default())).collect::<Vec<_>>().join(",")
                }).filter(|s| !s.is_empty()).unwrap_or_else(|| "<none>".into());
                let st = &o["status"];
                vec![
                    o["metadata"]["name"].clone(),
                    json!(n(&st["desiredNumberScheduled"])),
                    json!(n(&st["currentNumberScheduled"])),
                    json!(n(&st["numberReady"])),
                    json!(n(&st["updatedNumberScheduled"])),
                    json!(n(&st["numberAvailable"])),
                    json!(sel),
                    json!(age(o["metadata"]["creationTimestamp"].as_str().unwrap_or_default())),
                    json!(template_join(o, "name")),
                    json!(template_join(o, "image")),
                ]
            },
        ),
        ("apps", "controllerrevisions") => (
            vec![
                col("Name", "string", 0, "Name"),
                col("Controller", "string", 0, "Controller of the object"),
                col("Revision", "integer", 0, "Revision indicates the revision of the state represented by Data."),
                col("Age", "string", 0, "CreationTimestamp"),
            ],
            |o| {
                let owner = o["metadata"]["ownerReferences"].as_array().and_then(|rs| {
                    rs.iter().find(|r| r["controller"] == true)
                }).map(|r| {
                    let group = r["apiVersion"].as_str().unwrap_or_default().split('/').next().unwrap_or_default();
                    format!("{}.{group}/{}", r["kind"].as_str().unwrap_or_default().to_lowercase(), r["name"].as_str().unwrap_or_default())
                }).unwrap_or_else(|| "<none>".into());
                vec![
                    o["metadata"]["name"].clone(),
                    json!(owner),
                    json!(n(&o["revision"])),
                    json!(age(o["metadata"]["creationTimestamp"].as_str().unwrap_or_default())),
                ]
            },
        ),
        ("", "nodes") => (
            vec![
                col("Name", "string", 0, "Name"),
                col("Status", "string", 0, "The status of the node"),
                col("Roles", "string", 0, "The roles of the node"),
                col("Age", "string", 0, "CreationTimestamp"),
                col("Version", "string", 0, "Kubelet Version reported by the node."),
                col("Internal-IP", "string", 1, "List of addresses reachable to the node."),
                col("OS-Image", "string", 1, "OS Image reported by the node from /etc/os-release."),
            ],
            |o| {
                let ready = o["status"]["conditions"].as_array().into_iter().flatten()
                    .any(|c| c["type"] == "Ready" && c["status"] == "True");
                let ip = o["status"]["addresses"].as_array().into_iter().flatten()
                    .find(|a| a["type"] == "InternalIP").and_then(|a| a["address"].as_str()).unwrap_or("<none>");
                vec![
                    o["metadata"]["name"].clone(),
                    json!(if ready { "Ready" } else { "NotReady" }),
                    json!("<none>"),
                    json!(age(o["metadata"]["creationTimestamp"].as_str().unwrap_or_default())),
                    o["status"]["nodeInfo"]["kubeletVersion"].clone(),
                    json!(ip),
                    o["status"]["nodeInfo"]["osImage"].clone(),
                ]
            },
        ),
        ("", "namespaces") => (
            vec![
                col("Name", "string", 0, "Name"),
                col("Status", "string", 0, "The status of the namespace"),
                col("Age", "string", 0, "CreationTimestamp"),
            ],
            |o| vec![
                o["metadata"]["name"].clone(),
                o["status"]["phase"].clone(),
                json!(age(o["metadata"]["creationTimestamp"].as_str().unwrap_or_default())),
            ],
        ),
        _ => (
            vec![
                col("Name", "string", 0, "Name"),
                col("Age", "string", 0, "CreationTimestamp"),
            ],
            |o| vec![
                o["metadata"]["name"].clone(),
                json!(age(o["metadata"]["creationTimestamp"].as_str().unwrap_or_default())),
            ],
        ),
    }
}

/// Render objects as a Table; `include` is the request's `includeObject` (None, Metadata, Object).
/// A Table of `items`; `metadata` is the list's (resourceVersion, and `continue` when paged).
pub fn render(rt: &ResourceType, items: &[Value], metadata: Value, include: &str) -> Value {
    let (columns, cells) = columns_and_cells(rt);
    let rows: Vec<Value> = items
        .iter()
        .map(|o| {
            let mut row = json!({"cells": cells(o)});
            match include {
                "None" => {}
                "Object" => row["object"] = o.clone(),
                _ => {
                    row["object"] = json!({
                        "kind": "PartialObjectMetadata",
                        "apiVersion": "meta.k8s.io/v1",
                        "metadata": o["metadata"].clone(),
                    })
                }
            }
            row
        })
        .collect();
    json!({
        "kind": "Table",
        "apiVersion": "meta.k8s.io/v1",
        "metadata": metadata,
        "columnDefinitions": columns,
        "rows": rows,
    })
}
