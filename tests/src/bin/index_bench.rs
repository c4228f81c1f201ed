//! Index search speed for `cargo xtask bench`: fills an index with synthetic recordings and
//! times the HTTP API's searches (`Index::search`, newest first, 50 a page) by CallUUID, by a
//! participant's AOR (customers with a few recordings each, agents with hundreds) and by a
//! one-hour time range.
//!
//! `index_bench <rows> <sqlite|postgres|both>` prints one JSON object: per backend the rows,
//! the fill time and, per search, p50/p99/max in milliseconds over 200 searches each.
//! The PostgreSQL server is a throwaway one (tests::postgres).

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use rand::{rngs::StdRng, Rng, SeedableRng};
use recorder::{
    index::{Index, IndexLocation, Search},
    writer::metadata::{
        rfc3339, DropCounters, ParticipantMeta, RecordingMetadata, RecordingState, WavMeta,
    },
};
use serde_json::{json, Value};
use tests::{daemon::scratch_dir, postgres::Postgres};

const CUSTOMERS: u64 = 200_000;
const AGENTS: u64 = 2_000;
/// Three recordings (segments) per interaction.
const SEGMENTS: u64 = 3;
/// A recording starts every 3 s: 1 000 000 rows span about 35 days.
const SPACING_SECS: u64 = 3;
const SEARCHES: usize = 200;
const BATCH: usize = 10_000;

fn base() -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(1_780_000_000)
}

fn customer(n: u64) -> String {
    format!("sip:+49{n:09}@carrier.example")
}

fn agent(n: u64) -> String {
    format!("sip:{}@cc.example", 7000 + n)
}

fn recording(i: u64, rng: &mut StdRng) -> RecordingMetadata {
    let started = base() + Duration::from_secs(i * SPACING_SECS);
    let ended = started + Duration::from_secs(rng.gen_range(30..600));
    let participant = |id: &str, name: &str, aor: String| ParticipantMeta {
        id: id.into(),
        name: Some(name.into()),
        aor: Some(aor),
        joined_at: Some(rfc3339(started)),
        left_at: Some(rfc3339(ended)),
        ..Default::default()
    };
    RecordingMetadata {
        id: format!("{i:010}-bench"),
        sip_call_id: format!("{i}@sbc.example"),
        call_uuid: Some(format!("U{:012}", i / SEGMENTS)),
        call_uuid_source: Some("extensiondata".into()),
        connection_id: None,
        extra_ids: vec![],
        host: "bench".into(),
        interaction: None,
        previous: None,
        state: RecordingState::Complete,
        end_reason: Some("bye".into()),
        end_detail: None,
        started_at: rfc3339(started),
        ended_at: Some(rfc3339(ended)),
        updated_at: rfc3339(ended),
        media_received: true,
        participants: vec![
            participant("c", "Customer", customer(rng.gen_range(0..CUSTOMERS))),
            participant("a", "Agent", agent(rng.gen_range(0..AGENTS))),
        ],
        streams: vec![],
        metadata_versions: vec![],
        wav: WavMeta::default(),
        dropped: DropCounters::default(),
        notes: vec![],
    }
}

fn percentiles(mut ms: Vec<f64>) -> Value {
    ms.sort_by(f64::total_cmp);
    let at = |q: f64| ms[((ms.len() - 1) as f64 * q).round() as usize];
    json!({ "p50_ms": at(0.5), "p99_ms": at(0.99), "max_ms": at(1.0), "searches": ms.len() })
}

fn measure(index: &mut Index, rows: u64, make: impl Fn(&mut StdRng) -> Search) -> Result<Value> {
    let mut rng = StdRng::seed_from_u64(7);
    let mut ms = Vec::with_capacity(SEARCHES);
    let mut found = 0;
    for _ in 0..SEARCHES {
        let q = make(&mut rng);
        let t = Instant::now();
        found += index.search(&q)?.len();
        ms.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    if found == 0 && rows > 0 {
        bail!("no search found anything");
    }
    let mut v = percentiles(ms);
    v["rows_found"] = json!(found);
    Ok(v)
}

fn run(location: &IndexLocation, rows: u64) -> Result<Value> {
    let spool = scratch_dir("index-bench");
    let mut index = Index::open_location(location, &spool, "bench").context("opening")?;
    let mut rng = StdRng::seed_from_u64(1);
    let fill = Instant::now();
    let mut batch = Vec::with_capacity(BATCH);
    for i in 0..rows {
        batch.push(recording(i, &mut rng));
        if batch.len() == BATCH || i + 1 == rows {
            index.upsert_many(&batch.iter().collect::<Vec<_>>())?;
            batch.clear();
        }
    }
    let fill_secs = fill.elapsed().as_secs_f64();
    let page = |q: Search| Search { limit: 51, ..q };
    let span = rows * SPACING_SECS;
    let result = json!({
        "rows": rows,
        "fill_secs": fill_secs,
        "by_call_uuid": measure(&mut index, rows, |r| page(Search {
            call_uuid: Some(format!("U{:012}", r.gen_range(0..rows.div_ceil(SEGMENTS)))),
            ..Default::default()
        }))?,
        "by_customer_aor": measure(&mut index, rows, |r| page(Search {
            aor: Some(customer(r.gen_range(0..CUSTOMERS))),
            ..Default::default()
        }))?,
        "by_agent_aor": measure(&mut index, rows, |r| page(Search {
            aor: Some(agent(r.gen_range(0..AGENTS))),
            ..Default::default()
        }))?,
        "by_time_range": measure(&mut index, rows, |r| {
            let from = base() + Duration::from_secs(r.gen_range(0..span.max(1)));
            page(Search {
                since: Some(from),
                until: Some(from + Duration::from_secs(3600)),
                ..Default::default()
            })
        })?,
    });
    drop(index);
    let _ = std::fs::remove_dir_all(&spool);
    Ok(result)
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let (Some(rows), Some(backend)) = (args.get(1), args.get(2)) else {
        bail!("usage: index_bench <rows> <sqlite|postgres|both>");
    };
    let rows: u64 = rows.parse().context("rows")?;
    let mut out = serde_json::Map::new();
    if backend == "sqlite" || backend == "both" {
        let dir = scratch_dir("index-bench-db");
        let location = IndexLocation::Sqlite(dir.join("index.sqlite"));
        out.insert("sqlite".into(), run(&location, rows)?);
        let _ = std::fs::remove_dir_all(&dir);
    }
    if backend == "postgres" || backend == "both" {
        let pg = Postgres::start();
        out.insert(
            "postgres".into(),
            run(&IndexLocation::Postgres(pg.url()), rows)?,
        );
    }
    println!("{}", Value::Object(out));
    Ok(())
}
