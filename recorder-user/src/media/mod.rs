//! Media the writer decodes: SDES-keyed SRTP (RFC 3711, RFC 4568) and audio codecs.
//!
//! Everything here works on memory only: the writer's packet stage calls it, and that stage
//! never touches the filesystem.

pub mod codec;
pub mod g729;
pub mod resample;
pub mod sdes;
pub mod srtp;

/// Replaces the SDES keys of the streams in a serialized session summary by their suite name
/// (`srtp_suite`): the control API shows what protects a stream, never its key.
pub fn redact_keys(summary: &mut serde_json::Value) {
    let Some(streams) = summary
        .get_mut("streams")
        .and_then(serde_json::Value::as_array_mut)
    else {
        return;
    };
    for stream in streams
        .iter_mut()
        .filter_map(serde_json::Value::as_object_mut)
    {
        let suite = stream
            .remove("sdes")
            .and_then(|c| c.get("suite").cloned())
            .unwrap_or(serde_json::Value::Null);
        stream.insert("srtp_suite".into(), suite);
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn redact_keys_leaves_the_suite_only() {
        let mut v = serde_json::json!({"streams": [
            {"label": "1", "sdes": {"suite": "AES_CM_128_HMAC_SHA1_80",
                                    "keys": [{"key_salt": "c2VjcmV0"}]}},
            {"label": "2", "sdes": null}
        ]});
        super::redact_keys(&mut v);
        let text = v.to_string();
        assert!(
            !text.contains("c2VjcmV0") && !text.contains("key_salt"),
            "{text}"
        );
        assert_eq!(v["streams"][0]["srtp_suite"], "AES_CM_128_HMAC_SHA1_80");
        assert!(v["streams"][1]["srtp_suite"].is_null());
    }
}
