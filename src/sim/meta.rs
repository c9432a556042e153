//! Small helpers over object metadata shared by the API handlers and the controllers.

use rand::Rng;
use serde_json::Value;

/// RFC 3339 time with second precision, as the API server writes timestamps.
pub fn now() -> String {
    jiff::Timestamp::now()
        .round(jiff::Unit::Second)
        .unwrap_or_else(|_| jiff::Timestamp::now())
        .to_string()
}

/// A random RFC 4122 version-4 UID.
pub fn uid() -> String {
    let b: [u8; 16] = rand::rng().random();
    format!(
        "{:02x}{:02x}{:02x}{:02x}-{:02x}{:02x}-4{:01x}{:02x}-{:01x}{:01x}{:02x}-{:02x}{:02x}{:02x}{:02x}{:02x}{:02x}",
        b[0], b[1], b[2], b[3], b[4], b[5], b[6] & 0x0f, b[7], 8 | (b[8] & 0x3), b[8] >> 4, b[9],
        b[10], b[11], b[12], b[13], b[14], b[15]
    )
}

/// Random suffix in the alphabet Kubernetes uses for generated names.
pub fn suffix(len: usize) -> String {
    const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    let mut rng = rand::rng();
    (0..len)
        .map(|_| ALPHABET[rng.random_range(0..ALPHABET.len())] as char)
        .collect()
}

pub fn name(obj: &Value) -> &str {
    obj["metadata"]["name"].as_str().unwrap_or_default()
}

pub fn namespace(obj: &Value) -> &str {
    obj["metadata"]["namespace"].as_str().unwrap_or_default()
}

pub fn uid_of(obj: &Value) -> &str {
    obj["metadata"]["uid"].as_str().unwrap_or_default()
}

/// The UID of the object's controlling owner, if any.
pub fn controller_uid(obj: &Value) -> Option<&str> {
    obj["metadata"]["ownerReferences"]
        .as_array()?
        .iter()
        .find(|o| o["controller"].as_bool() == Some(true))
        .and_then(|o| o["uid"].as_str())
}

/// RFC 1123 DNS subdomain: what most object names must be.
pub fn valid_subdomain(s: &str) -> bool {
    !s.is_empty() && s.len() <= 253 && s.split('.').all(valid_label_part)
}

/// RFC 1123 DNS label: namespace names and similar.
pub fn valid_label(s: &str) -> bool {
    s.len() <= 63 && valid_label_part(s)
}

fn valid_label_part(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

/// JSON with object keys sorted, so equal objects hash equally whatever their key order.
pub fn canonical(v: &Value) -> String {
    fn sort(v: &Value) -> Value {
        match v {
            Value::Object(m) => {
                let mut keys: Vec<&String> = m.keys().collect();
                keys.sort();
                Value::Object(keys.into_iter().map(|k| (k.clone(), sort(&m[k]))).collect())
            }
            Value::Array(a) => Value::Array(a.iter().map(sort).collect()),
            other => other.clone(),
        }
    }
    sort(v).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_uids() {
        assert!(valid_subdomain("web.example-1"));
        assert!(!valid_subdomain("Web"));
        assert!(!valid_label("a.b"));
        assert!(valid_label("prod"));
        let u = uid();
        assert_eq!(u.len(), 36);
        assert_ne!(u, uid());
        assert_eq!(suffix(5).len(), 5);
    }
}
