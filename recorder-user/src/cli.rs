//! Human-readable rendering of control API answers for the `recorder` CLI.

use std::fmt::Write;

use serde_json::Value;

use crate::control::Request;

fn s(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// A plain text table: header row, then rows, columns padded to their widest cell.
fn table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let line = |cells: Vec<String>, out: &mut String| {
        let padded: Vec<String> = cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        let _ = writeln!(out, "{}", padded.join("  ").trim_end());
    };
    line(headers.iter().map(|h| h.to_string()).collect(), &mut out);
    for row in rows {
        line(row.clone(), &mut out);
    }
    if rows.is_empty() {
        out.push_str("(none)\n");
    }
    out
}

fn participants(v: &Value) -> String {
    v.as_array()
        .map(|ps| {
            ps.iter()
                .map(|p| {
                    p["name"]
                        .as_str()
                        .or(p["aor"].as_str())
                        .unwrap_or("?")
                        .to_string()
                })
                .collect::<Vec<_>>()
                .join(", ")
        })
        .unwrap_or_default()
}

/// `bye (Reason header)`: why a recording ended, with the detail that came with it.
fn reason(r: &Value) -> String {
    match r["end_detail"].as_str() {
        Some(d) => format!("{} ({d})", s(&r["end_reason"])),
        None => s(&r["end_reason"]),
    }
}

fn time(v: &Value) -> Option<std::time::SystemTime> {
    crate::writer::metadata::parse_rfc3339(v.as_str()?)
}

/// The interaction: every recording of the CallUUID in start order, with site, who was on
/// the call when, why each ended, and the gaps between recordings.
fn timeline(this: &Value, rows: &[Value]) -> String {
    let mut out = String::new();
    let uuid = rows.first().map(|r| s(&r["call_uuid"])).unwrap_or_default();
    let _ = writeln!(out, "\ninteraction {uuid}: {} recording(s)", rows.len());
    let mut last_end: Option<std::time::SystemTime> = None;
    for (n, r) in rows.iter().enumerate() {
        let start = time(&r["started_at"]);
        if let (Some(end), Some(start)) = (last_end, start) {
            match start.duration_since(end) {
                Ok(gap) => {
                    let _ = writeln!(out, "  gap {:.1} s (not recorded)", gap.as_secs_f64());
                }
                Err(e) => {
                    let _ = writeln!(out, "  overlap {:.1} s", e.duration().as_secs_f64());
                }
            }
        }
        let _ = writeln!(
            out,
            "  {}. {}{}  site {}  {} .. {}  ended: {}",
            n + 1,
            s(&r["id"]),
            if &r["id"] == this { " (this)" } else { "" },
            s(&r["host"]),
            s(&r["started_at"]),
            s(&r["ended_at"]),
            reason(r),
        );
        for p in r["participants"].as_array().into_iter().flatten() {
            // No leave time: on the call until this recording ended.
            let left = match &p["left_at"] {
                Value::Null => "at the end".to_string(),
                v => s(v),
            };
            let _ = writeln!(
                out,
                "       {} <{}> joined {} left {left}",
                s(&p["name"]),
                s(&p["aor"]),
                s(&p["joined_at"]),
            );
        }
        last_end = match (last_end, time(&r["ended_at"])) {
            (Some(a), Some(b)) => Some(a.max(b)),
            (_, b) => b,
        };
    }
    out
}

/// Renders the data of a successful answer to `request`.
pub fn render(request: &Request, data: &Value) -> String {
    match request {
        Request::Status => {
            let mut out = String::new();
            let _ = writeln!(
                out,
                "recorder {}  host {}  up {} s",
                s(&data["version"]),
                s(&data["host"]),
                s(&data["uptime_secs"])
            );
            for i in data["interfaces"].as_array().into_iter().flatten() {
                let _ = writeln!(out, "interface {}  XDP {}", s(&i["name"]), s(&i["mode"]));
            }
            let sip = &data["sip"];
            let taking = match (sip["draining"] == true, sip["refusing"].as_str()) {
                (true, _) => "draining (new sessions get 503, live ones go on)".to_string(),
                (false, Some(reason)) => format!("refusing new sessions: {reason}"),
                (false, None) => "taking new sessions".to_string(),
            };
            let _ = writeln!(
                out,
                "sessions active {}  {taking}",
                s(&sip["sessions_active"])
            );
            if let Some(xdp) = data["xdp"].as_object() {
                let counters: Vec<String> = xdp.iter().map(|(k, v)| format!("{k}={v}")).collect();
                let _ = writeln!(out, "xdp {}", counters.join(" "));
            }
            let spool = &data["spool"];
            let _ = writeln!(
                out,
                "spool {}  free {} of {} bytes",
                s(&spool["path"]),
                s(&spool["free_bytes"]),
                s(&spool["total_bytes"])
            );
            let restart = &data["restart"];
            if !restart.is_null() {
                let pinned = match restart["pinned_in"].as_str() {
                    Some(dir) => format!("pinned in {dir}"),
                    None => "not pinned".into(),
                };
                let adopted = if restart["adopted"] == true {
                    format!(
                        ", adopted from the previous daemon ({} sessions carried on)",
                        s(&restart["carried_on_sessions"])
                    )
                } else {
                    String::new()
                };
                let on_exit = match restart["on_exit"].as_str() {
                    Some("hand_over") => "hand live recordings over to the next start",
                    _ => "finish live recordings and detach",
                };
                let _ = writeln!(out, "capture {pinned}{adopted}; on exit: {on_exit}");
            }
            out
        }
        Request::Sessions => {
            let rows: Vec<Vec<String>> = data
                .as_array()
                .into_iter()
                .flatten()
                .map(|x| {
                    vec![
                        s(&x["id"]),
                        s(&x["call_ids"]["call_uuid"]),
                        participants(&x["participants"]),
                        x["streams"]
                            .as_array()
                            .map(|a| a.len())
                            .unwrap_or(0)
                            .to_string(),
                        s(&x["packets"]),
                        s(&x["lost"]),
                        s(&x["auth_failures"]),
                        s(&x["ring_drops"]),
                        s(&x["duration_secs"]),
                        s(&x["started_at"]),
                    ]
                })
                .collect();
            table(
                &[
                    "ID",
                    "CALL UUID",
                    "PARTICIPANTS",
                    "STREAMS",
                    "PACKETS",
                    "LOST",
                    "AUTH FAIL",
                    "DROPS",
                    "SECS",
                    "STARTED",
                ],
                &rows,
            )
        }
        Request::Flows => {
            let rows: Vec<Vec<String>> = data
                .as_array()
                .into_iter()
                .flatten()
                .map(|f| {
                    vec![
                        s(&f["flow_id"]),
                        s(&f["local"]),
                        s(&f["action"]),
                        s(&f["generation"]),
                        s(&f["packets"]),
                        s(&f["bytes"]),
                        s(&f["ring_drops"]),
                    ]
                })
                .collect();
            table(
                &[
                    "FLOW",
                    "LOCAL",
                    "ACTION",
                    "GEN",
                    "PACKETS",
                    "BYTES",
                    "RING DROPS",
                ],
                &rows,
            )
        }
        Request::Stop { id } => format!("stopped {id}\n"),
        Request::Drain { .. } => {
            let state = if data["draining"] == true {
                "draining: new sessions get 503, live ones go on"
            } else {
                "taking new sessions"
            };
            let mut out = format!("{state}; sessions active {}\n", s(&data["sessions_active"]));
            if let Some(reason) = data["refusing"].as_str() {
                let _ = writeln!(out, "refusing new sessions: {reason}");
            }
            out
        }
        Request::Recordings { .. } => {
            let rows: Vec<Vec<String>> = data
                .as_array()
                .into_iter()
                .flatten()
                .map(|r| {
                    vec![
                        s(&r["id"]),
                        s(&r["call_uuid"]),
                        s(&r["started_at"]),
                        s(&r["ended_at"]),
                        s(&r["state"]),
                        reason(r),
                        s(&r["host"]),
                        participants(&r["participants"]),
                        s(&r["previous"]),
                    ]
                })
                .collect();
            table(
                &[
                    "ID",
                    "CALL UUID",
                    "STARTED",
                    "ENDED",
                    "STATE",
                    "REASON",
                    "SITE",
                    "PARTICIPANTS",
                    "PREVIOUS",
                ],
                &rows,
            )
        }
        Request::Show { .. } => {
            let mut out = String::new();
            for key in [
                "id",
                "sip_call_id",
                "call_uuid",
                "state",
                "end_reason",
                "started_at",
                "ended_at",
            ] {
                let _ = writeln!(out, "{key:<12} {}", s(&data[key]));
            }
            for p in data["participants"].as_array().into_iter().flatten() {
                let _ = writeln!(
                    out,
                    "participant  {} <{}> joined {} left {}",
                    s(&p["name"]),
                    s(&p["aor"]),
                    s(&p["joined_at"]),
                    s(&p["left_at"])
                );
            }
            if let Some(detail) = data["end_detail"].as_str() {
                let _ = writeln!(out, "{:<12} {detail}", "end_detail");
            }
            for key in ["host", "interaction", "previous"] {
                if !data[key].is_null() {
                    let _ = writeln!(out, "{key:<12} {}", s(&data[key]));
                }
            }
            for st in data["streams"].as_array().into_iter().flatten() {
                let _ = writeln!(
                    out,
                    "stream {:<4} {} port {} packets {} lost {}",
                    s(&st["label"]),
                    s(&st["codec"]),
                    s(&st["local_port"]),
                    s(&st["packets"]),
                    s(&st["lost"])
                );
            }
            if let Some(rows) = data["timeline"].as_array() {
                out.push_str(&timeline(&data["id"], rows));
            }
            out
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn show_prints_the_interaction_timeline_with_sites_reasons_and_gaps() {
        let row = |id: &str, host: &str, from: &str, to: &str, detail: Option<&str>, who: &str| {
            json!({
                "id": id, "call_uuid": "U", "host": host, "started_at": from, "ended_at": to,
                "end_reason": "bye", "end_detail": detail,
                "participants": [{"name": who, "aor": "sip:a@x", "joined_at": from, "left_at": null}],
            })
        };
        let data = json!({
            "id": "r2", "call_uuid": "U", "state": "complete",
            "timeline": [
                row("r1", "blue", "2026-11-24T10:00:00Z", "2026-11-24T10:01:00Z",
                    Some("SIP;cause=200;text=\"REFER\""), "Agent D2"),
                row("r2", "purple", "2026-11-24T10:01:12.5Z", "2026-11-24T10:03:00Z", None, "Agent D3"),
            ],
        });
        let text = render(&Request::Show { id: "r2".into() }, &data);
        let expect = [
            "interaction U: 2 recording(s)",
            "1. r1  site blue  2026-11-24T10:00:00Z .. 2026-11-24T10:01:00Z  ended: bye (SIP;cause=200;text=\"REFER\")",
            "Agent D2 <sip:a@x> joined 2026-11-24T10:00:00Z left at the end",
            "gap 12.5 s (not recorded)",
            "2. r2 (this)  site purple",
            "Agent D3 <sip:a@x>",
        ];
        let mut at = 0;
        for line in expect {
            let found = text[at..]
                .find(line)
                .unwrap_or_else(|| panic!("{line:?} after offset {at} in:\n{text}"));
            at += found + line.len();
        }
    }
}
