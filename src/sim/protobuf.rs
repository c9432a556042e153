//! Decoding of the Kubernetes protobuf envelope for the typed creates kubectl sends
//! (`kubectl create namespace` posts `application/vnd.kubernetes.protobuf` and does not retry
//! with JSON). Only the wire format and the few messages kubectl's typed creates use are read:
//! the `runtime.Unknown` envelope, `ObjectMeta`, Namespace, ConfigMap, Secret, ServiceAccount,
//! the SelfSubjectAccessReview `kubectl auth can-i` sends, and the Deployment of `kubectl create
//! deployment` (replicas, selector, template labels, containers' names, images and ports).

use serde_json::{json, Map, Value};

const MAGIC: &[u8] = b"k8s\0";

#[derive(Debug)]
enum Field<'a> {
    Varint(u64),
    Bytes(&'a [u8]),
    Fixed,
}

fn varint(buf: &[u8], pos: &mut usize) -> Result<u64, String> {
    let mut out = 0u64;
    for shift in (0..64).step_by(7) {
        let b = *buf.get(*pos).ok_or("truncated varint")?;
        *pos += 1;
        out |= u64::from(b & 0x7f) << shift;
        if b & 0x80 == 0 {
            return Ok(out);
        }
    }
    Err("varint too long".into())
}

/// Split a message into (field number, value) pairs.
fn fields(buf: &[u8]) -> Result<Vec<(u64, Field<'_>)>, String> {
    let mut pos = 0;
    let mut out = Vec::new();
    while pos < buf.len() {
        let tag = varint(buf, &mut pos)?;
        let (num, wire) = (tag >> 3, tag & 7);
        let f = match wire {
            0 => Field::Varint(varint(buf, &mut pos)?),
            1 => {
                pos += 8;
                Field::Fixed
            }
            2 => {
                let len = varint(buf, &mut pos)? as usize;
                let end = pos.checked_add(len).ok_or("length overflow")?;
                let b = buf.get(pos..end).ok_or("truncated field")?;
                pos = end;
                Field::Bytes(b)
            }
            5 => {
                pos += 4;
                Field::Fixed
            }
            w => return Err(format!("unsupported wire type {w}")),
        };
        out.push((num, f));
    }
    Ok(out)
}

fn string(b: &[u8]) -> Result<String, String> {
    String::from_utf8(b.to_vec()).map_err(|_| "invalid UTF-8 in string field".to_string())
}

fn map_entry(b: &[u8], value_as_base64: bool) -> Result<(String, Value), String> {
    let mut k = String::new();
    let mut v = Value::String(String::new());
    for (num, f) in fields(b)? {
        if let Field::Bytes(x) = f {
            match num {
                1 => k = string(x)?,
                2 if value_as_base64 => {
                    use base64::Engine;
                    v = Value::String(base64::engine::general_purpose::STANDARD.encode(x))
                }
                2 => v = Value::String(string(x)?),
                _ => {}
            }
        }
    }
    Ok((k, v))
}

fn object_meta(b: &[u8]) -> Result<Value, String> {
    let mut m = Map::new();
    let mut labels = Map::new();
    let mut annotations = Map::new();
    for (num, f) in fields(b)? {
        if let Field::Bytes(x) = f {
            match num {
                1 => {
                    m.insert("name".into(), json!(string(x)?));
                }
                2 => {
                    m.insert("generateName".into(), json!(string(x)?));
                }
                3 => {
                    m.insert("namespace".into(), json!(string(x)?));
                }
                11 => {
                    let (k, v) = map_entry(x, false)?;
                    labels.insert(k, v);
                }
                12 => {
                    let (k, v) = map_entry(x, false)?;
                    annotations.insert(k, v);
                }
                _ => {}
            }
        }
    }
    if !labels.is_empty() {
        m.insert("labels".into(), Value::Object(labels));
    }
    if !annotations.is_empty() {
        m.insert("annotations".into(), Value::Object(annotations));
    }
    Ok(Value::Object(m))
}

/// A LabelSelector's `matchLabels`.
fn label_selector(b: &[u8]) -> Result<Value, String> {
    let mut labels = Map::new();
    for (num, f) in fields(b)? {
        if let (1, Field::Bytes(x)) = (num, f) {
            let (k, v) = map_entry(x, false)?;
            labels.insert(k, v);
        }
    }
    Ok(json!({"matchLabels": labels}))
}

/// A Container: its name, image, command, args and container ports.
fn container(b: &[u8]) -> Result<Value, String> {
    let mut c = Map::new();
    let mut command = Vec::new();
    let mut args = Vec::new();
    let mut ports = Vec::new();
    for (num, f) in fields(b)? {
        let Field::Bytes(x) = f else { continue };
        match num {
            1 => {
                c.insert("name".into(), json!(string(x)?));
            }
            2 => {
                c.insert("image".into(), json!(string(x)?));
            }
            3 => command.push(json!(string(x)?)),
            4 => args.push(json!(string(x)?)),
            6 => {
                let mut port = Map::new();
                for (n, f) in fields(x)? {
                    match (n, f) {
                        (1, Field::Bytes(v)) => {
                            port.insert("name".into(), json!(string(v)?));
                        }
                        (3, Field::Varint(v)) => {
                            port.insert("containerPort".into(), json!(v));
                        }
                        (4, Field::Bytes(v)) => {
                            port.insert("protocol".into(), json!(string(v)?));
                        }
                        _ => {}
                    }
                }
                ports.push(Value::Object(port));
            }
            _ => {}
        }
    }
    for (key, list) in [("command", command), ("args", args), ("ports", ports)] {
        if !list.is_empty() {
            c.insert(key.into(), Value::Array(list));
        }
    }
    Ok(Value::Object(c))
}

/// A DeploymentSpec: replicas, selector, and the pod template's labels and containers.
fn deployment_spec(b: &[u8]) -> Result<Value, String> {
    let mut spec = Map::new();
    for (num, f) in fields(b)? {
        match (num, f) {
            (1, Field::Varint(v)) => {
                spec.insert("replicas".into(), json!(v));
            }
            (2, Field::Bytes(x)) => {
                spec.insert("selector".into(), label_selector(x)?);
            }
            (3, Field::Bytes(template)) => {
                spec.insert("template".into(), pod_template(template)?);
            }
            _ => {}
        }
    }
    Ok(Value::Object(spec))
}

/// A PodTemplateSpec: labels and the pod's containers and restart policy.
fn pod_template(b: &[u8]) -> Result<Value, String> {
    let mut t = Map::new();
    for (n, f) in fields(b)? {
        match (n, f) {
            (1, Field::Bytes(x)) => {
                t.insert("metadata".into(), object_meta(x)?);
            }
            (2, Field::Bytes(pod)) => {
                let mut spec = Map::new();
                let mut containers = Vec::new();
                for (pn, f) in fields(pod)? {
                    match (pn, f) {
                        (2, Field::Bytes(x)) => containers.push(container(x)?),
                        (3, Field::Bytes(x)) => {
                            spec.insert("restartPolicy".into(), json!(string(x)?));
                        }
                        _ => {}
                    }
                }
                spec.insert("containers".into(), Value::Array(containers));
                t.insert("spec".into(), Value::Object(spec));
            }
            _ => {}
        }
    }
    Ok(Value::Object(t))
}

/// A JobSpec (`kubectl create job`): its pod template.
fn job_spec(b: &[u8]) -> Result<Value, String> {
    let mut spec = Map::new();
    for (num, f) in fields(b)? {
        if let (6, Field::Bytes(x)) = (num, f) {
            spec.insert("template".into(), pod_template(x)?);
        }
    }
    Ok(Value::Object(spec))
}

/// A CronJobSpec (`kubectl create cronjob`): schedule, suspension and the job template.
fn cronjob_spec(b: &[u8]) -> Result<Value, String> {
    let mut spec = Map::new();
    for (num, f) in fields(b)? {
        match (num, f) {
            (1, Field::Bytes(x)) => {
                spec.insert("schedule".into(), json!(string(x)?));
            }
            (4, Field::Varint(v)) => {
                spec.insert("suspend".into(), json!(v != 0));
            }
            (5, Field::Bytes(x)) => {
                let mut t = Map::new();
                for (n, f) in fields(x)? {
                    match (n, f) {
                        (1, Field::Bytes(m)) => {
                            t.insert("metadata".into(), object_meta(m)?);
                        }
                        (2, Field::Bytes(s)) => {
                            t.insert("spec".into(), job_spec(s)?);
                        }
                        _ => {}
                    }
                }
                spec.insert("jobTemplate".into(), Value::Object(t));
            }
            (8, Field::Bytes(x)) => {
                spec.insert("timeZone".into(), json!(string(x)?));
            }
            _ => {}
        }
    }
    Ok(Value::Object(spec))
}

/// A SelfSubjectAccessReviewSpec: the resource (or non-resource) attributes asked about.
fn review_spec(b: &[u8]) -> Result<Value, String> {
    let mut spec = Map::new();
    for (num, f) in fields(b)? {
        let Field::Bytes(x) = f else { continue };
        let names: &[&str] = match num {
            1 => &[
                "namespace",
                "verb",
                "group",
                "version",
                "resource",
                "subresource",
                "name",
            ],
            2 => &["path", "verb"],
            _ => continue,
        };
        let mut attrs = Map::new();
        for (n, f) in fields(x)? {
            let name = usize::try_from(n)
                .ok()
                .and_then(|n| n.checked_sub(1))
                .and_then(|i| names.get(i));
            if let (Some(name), Field::Bytes(v)) = (name, f) {
                attrs.insert((*name).into(), json!(string(v)?));
            }
        }
        let key = if num == 1 {
            "resourceAttributes"
        } else {
            "nonResourceAttributes"
        };
        spec.insert(key.into(), Value::Object(attrs));
    }
    Ok(Value::Object(spec))
}

/// Decode a protobuf-encoded object into its JSON form.
pub fn decode(body: &[u8]) -> Result<Value, String> {
    let rest = body
        .strip_prefix(MAGIC)
        .ok_or("protobuf body does not start with the k8s magic prefix")?;
    let (mut api_version, mut kind, mut raw) = (String::new(), String::new(), &[][..]);
    for (num, f) in fields(rest)? {
        match (num, f) {
            (1, Field::Bytes(tm)) => {
                for (n, f) in fields(tm)? {
                    match (n, f) {
                        (1, Field::Bytes(x)) => api_version = string(x)?,
                        (2, Field::Bytes(x)) => kind = string(x)?,
                        _ => {}
                    }
                }
            }
            (2, Field::Bytes(x)) => raw = x,
            _ => {}
        }
    }
    let mut obj = json!({"apiVersion": api_version, "kind": kind, "metadata": {}});
    let mut data = Map::new();
    let mut binary = Map::new();
    let mut finalizers = Vec::new();
    for (num, f) in fields(raw)? {
        match (kind.as_str(), num, f) {
            (_, 1, Field::Bytes(x)) => obj["metadata"] = object_meta(x)?,
            ("Namespace", 2, Field::Bytes(spec)) => {
                for (n, f) in fields(spec)? {
                    if let (1, Field::Bytes(x)) = (n, f) {
                        finalizers.push(json!(string(x)?));
                    }
                }
            }
            ("ConfigMap", 2, Field::Bytes(x)) => {
                let (k, v) = map_entry(x, false)?;
                data.insert(k, v);
            }
            ("ConfigMap", 3, Field::Bytes(x)) | ("Secret", 2, Field::Bytes(x)) => {
                let (k, v) = map_entry(x, true)?;
                binary.insert(k, v);
            }
            ("Secret", 3, Field::Bytes(x)) => obj["type"] = json!(string(x)?),
            ("SelfSubjectAccessReview", 2, Field::Bytes(x)) => obj["spec"] = review_spec(x)?,
            ("Deployment", 2, Field::Bytes(x)) => obj["spec"] = deployment_spec(x)?,
            ("Job", 2, Field::Bytes(x)) => obj["spec"] = job_spec(x)?,
            ("CronJob", 2, Field::Bytes(x)) => obj["spec"] = cronjob_spec(x)?,
            ("Secret", 4, Field::Bytes(x)) | ("ConfigMap", 4, Field::Bytes(x)) => {
                let (k, v) = map_entry(x, false)?;
                data.insert(k, v);
            }
            (
                "Namespace" | "ConfigMap" | "Secret" | "ServiceAccount" | "SelfSubjectAccessReview"
                | "Deployment" | "Job" | "CronJob",
                _,
                _,
            ) => {}
            (other, _, _) => {
                return Err(format!(
                    "protobuf bodies of kind {other} are not supported by the simulated cluster; send JSON"
                ))
            }
        }
    }
    match kind.as_str() {
        "Namespace" if !finalizers.is_empty() => obj["spec"] = json!({"finalizers": finalizers}),
        "ConfigMap" => {
            if !data.is_empty() {
                obj["data"] = Value::Object(data);
            }
            if !binary.is_empty() {
                obj["binaryData"] = Value::Object(binary);
            }
        }
        "Secret" => {
            if !binary.is_empty() {
                obj["data"] = Value::Object(binary);
            }
            if !data.is_empty() {
                obj["stringData"] = Value::Object(data);
            }
        }
        _ => {}
    }
    Ok(obj)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ld(num: u8, payload: &[u8]) -> Vec<u8> {
        let mut v = vec![(num << 3) | 2, payload.len() as u8];
        v.extend_from_slice(payload);
        v
    }

    #[test]
    fn decodes_a_namespace_as_kubectl_sends_it() {
        let mut label = ld(1, b"team");
        label.extend(ld(2, b"payments"));
        let mut meta = ld(1, b"prod");
        meta.extend(ld(11, &label));
        let ns = ld(1, &meta);
        let mut tm = ld(1, b"v1");
        tm.extend(ld(2, b"Namespace"));
        let mut body = MAGIC.to_vec();
        body.extend(ld(1, &tm));
        body.extend(ld(2, &ns));
        let obj = decode(&body).expect("decodes");
        assert_eq!(obj["kind"], "Namespace");
        assert_eq!(obj["metadata"]["name"], "prod");
        assert_eq!(obj["metadata"]["labels"]["team"], "payments");
        assert!(decode(b"nope").is_err());
    }

    #[test]
    fn decodes_the_review_kubectl_auth_can_i_sends() {
        let mut attrs = ld(1, b"prod");
        attrs.extend(ld(2, b"patch"));
        attrs.extend(ld(3, b"apps"));
        attrs.extend(ld(5, b"deployments"));
        let spec = ld(1, &attrs);
        let review = ld(2, &spec);
        let mut tm = ld(1, b"authorization.k8s.io/v1");
        tm.extend(ld(2, b"SelfSubjectAccessReview"));
        let mut body = MAGIC.to_vec();
        body.extend(ld(1, &tm));
        body.extend(ld(2, &review));
        let obj = decode(&body).expect("decodes");
        let a = &obj["spec"]["resourceAttributes"];
        assert_eq!(
            (&a["namespace"], &a["verb"], &a["group"], &a["resource"]),
            (
                &json!("prod"),
                &json!("patch"),
                &json!("apps"),
                &json!("deployments")
            )
        );
        // A field number 0 is malformed, not a panic.
        let mut bad = MAGIC.to_vec();
        bad.extend(ld(1, &tm));
        bad.extend(ld(2, &ld(2, &ld(1, &[2, 1, b'x']))));
        let _ = decode(&bad);
    }
}
