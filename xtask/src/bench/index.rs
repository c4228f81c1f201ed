//! Index search speed: `index_bench` (tests crate) fills an SQLite and a PostgreSQL index with
//! synthetic recordings (1 000 000 rows; 100 000 with `--quick`) and times the HTTP API's
//! searches by CallUUID, by participant AOR and by time range. The goal: 50 ms at the 99th
//! percentile for each.

use std::{fmt::Write, path::Path, process::Command};

use anyhow::{bail, Context, Result};
use serde_json::Value;

use crate::{cargo, run as run_cmd, workspace_root};

/// p99 each search must stay under.
pub const GOAL_MS: f64 = 50.0;

pub fn run(quick: bool, out_dir: &Path, commands: &mut Vec<String>) -> Result<Value> {
    run_cmd(cargo(None).args([
        "build",
        "--release",
        "--package",
        "tests",
        "--bin",
        "index_bench",
    ]))?;
    let rows = if quick { 100_000 } else { 1_000_000 };
    let bin = workspace_root().join("target/release/index_bench");
    let line = format!("{} {rows} both", bin.display());
    commands.push(line.clone());
    eprintln!("bench: {line}");
    let out = Command::new(&bin)
        .args([rows.to_string().as_str(), "both"])
        .output()
        .with_context(|| format!("running {}", bin.display()))?;
    if !out.status.success() {
        bail!(
            "index_bench failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let v: Value = serde_json::from_slice(&out.stdout).context("index_bench's JSON")?;
    std::fs::write(
        out_dir.join("index.json"),
        serde_json::to_string_pretty(&v)?,
    )?;
    Ok(v)
}

pub fn markdown(v: &Value) -> Result<String> {
    let mut md = String::new();
    writeln!(md, "## Index search (HTTP API searches, 50 a page)\n")?;
    if let Some(e) = v["error"].as_str() {
        writeln!(md, "The index bench failed: {e}\n")?;
        return Ok(md);
    }
    writeln!(
        md,
        "| backend | rows | fill (s) | search | p50 (ms) | p99 (ms) | max (ms) | p99 under {GOAL_MS} ms |"
    )?;
    writeln!(md, "| --- | ---: | ---: | --- | ---: | ---: | ---: | --- |")?;
    for backend in ["sqlite", "postgres"] {
        let b = &v[backend];
        if b.is_null() {
            continue;
        }
        for search in [
            "by_call_uuid",
            "by_customer_aor",
            "by_agent_aor",
            "by_time_range",
        ] {
            let s = &b[search];
            let f = |k: &str| s[k].as_f64().unwrap_or(f64::NAN);
            writeln!(
                md,
                "| {backend} | {} | {:.0} | {search} | {:.2} | {:.2} | {:.2} | {} |",
                b["rows"],
                b["fill_secs"].as_f64().unwrap_or(f64::NAN),
                f("p50_ms"),
                f("p99_ms"),
                f("max_ms"),
                if f("p99_ms") <= GOAL_MS {
                    "yes"
                } else {
                    "**no**"
                }
            )?;
        }
    }
    writeln!(md)?;
    Ok(md)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_says_which_search_misses_the_goal() {
        let s = |p99: f64| serde_json::json!({ "p50_ms": 1.0, "p99_ms": p99, "max_ms": p99 });
        let v = serde_json::json!({
            "sqlite": { "rows": 1000000, "fill_secs": 100.0, "by_call_uuid": s(0.5),
                "by_customer_aor": s(0.2), "by_agent_aor": s(3.0), "by_time_range": s(75.0) },
        });
        let md = markdown(&v).unwrap();
        assert!(
            md.contains("| sqlite | 1000000 | 100 | by_call_uuid | 1.00 | 0.50 | 0.50 | yes |"),
            "{md}"
        );
        assert!(
            md.contains("by_time_range | 1.00 | 75.00 | 75.00 | **no** |"),
            "{md}"
        );
        assert!(!md.contains("postgres"));
    }
}
