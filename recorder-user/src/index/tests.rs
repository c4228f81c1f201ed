use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::*;
use crate::index::SearchCursor;
use crate::writer::metadata::{
    rfc3339, DropCounters, ParticipantMeta, RecordingMetadata, RecordingState, WavMeta,
};

struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> Self {
        use std::sync::atomic::{AtomicU32, Ordering};
        static N: AtomicU32 = AtomicU32::new(0);
        let p = std::env::temp_dir().join(format!(
            "recorder-index-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = fs::remove_dir_all(&p);
        fs::create_dir_all(&p).unwrap();
        Self(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

fn at(s: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(1_700_000_000 + s)
}

fn meta(id: &str, uuid: &str, start: u64, end: Option<u64>, aor: &str) -> RecordingMetadata {
    RecordingMetadata {
        id: id.into(),
        sip_call_id: format!("{id}@sbc"),
        call_uuid: Some(uuid.into()),
        call_uuid_source: Some("extensiondata".into()),
        connection_id: Some(format!("conn-{id}")),
        extra_ids: vec![],
        host: "site-a".into(),
        state: if end.is_some() {
            RecordingState::Complete
        } else {
            RecordingState::Active
        },
        end_reason: end.map(|_| "bye".into()),
        end_detail: None,
        interaction: None,
        previous: None,
        started_at: rfc3339(at(start)),
        ended_at: end.map(|e| rfc3339(at(e))),
        updated_at: rfc3339(at(start)),
        media_received: true,
        participants: vec![ParticipantMeta {
            id: "p".into(),
            name: Some("Agent".into()),
            aor: Some(aor.into()),
            ..Default::default()
        }],
        streams: vec![],
        metadata_versions: vec![],
        wav: WavMeta::default(),
        dropped: DropCounters::default(),
        notes: vec![],
    }
}

/// Writes metadata.json files into a spool, as the writer would.
fn spool_with(dir: &Path, metas: &[RecordingMetadata]) -> PathBuf {
    let spool = dir.join("spool");
    for m in metas {
        let d = spool.join(&m.id);
        fs::create_dir_all(&d).unwrap();
        m.write(&d).unwrap();
    }
    spool
}

fn ids(v: &[IndexedRecording]) -> Vec<&str> {
    v.iter().map(|r| r.id.as_str()).collect()
}

#[test]
fn three_recordings_of_one_call_uuid_in_order() {
    let t = TempDir::new("uuid");
    let spool = spool_with(&t.0, &[]);
    let mut index = SqliteIndex::open(&t.0.join("i.db"), &spool).unwrap();
    // Inserted out of order; a fourth recording belongs to another interaction.
    index
        .upsert_from_metadata(&meta("r2", "U", 100, Some(200), "sip:b@x"))
        .unwrap();
    index
        .upsert_from_metadata(&meta("r3", "U", 300, None, "sip:c@x"))
        .unwrap();
    index
        .upsert_from_metadata(&meta("r1", "U", 0, Some(100), "sip:a@x"))
        .unwrap();
    index
        .upsert_from_metadata(&meta("other", "V", 50, Some(60), "sip:a@x"))
        .unwrap();
    let rows = index.by_call_uuid("U").unwrap();
    assert_eq!(ids(&rows), ["r1", "r2", "r3"]);
    assert_eq!(rows[0].started_at, at(0));
    assert_eq!(rows[0].ended_at, Some(at(100)));
    assert_eq!(rows[2].ended_at, None);
    assert_eq!(rows[2].state, "active");
    assert_eq!(rows[1].connection_id.as_deref(), Some("conn-r2"));
    assert_eq!(rows[1].path, spool.join("r2"));
    assert_eq!(rows[1].host, "site-a");
    assert_eq!(rows[1].participants[0].aor.as_deref(), Some("sip:b@x"));
    // An update replaces, it does not duplicate.
    index
        .upsert_from_metadata(&meta("r3", "U", 300, Some(400), "sip:c@x"))
        .unwrap();
    let rows = index.by_call_uuid("U").unwrap();
    assert_eq!(rows.len(), 3);
    assert_eq!(rows[2].state, "complete");
    assert_eq!(rows[2].participants.len(), 1);
}

#[test]
fn by_participant_and_time_range() {
    let t = TempDir::new("query");
    let spool = spool_with(&t.0, &[]);
    let mut index = SqliteIndex::open(&t.0.join("i.db"), &spool).unwrap();
    index
        .upsert_from_metadata(&meta("r1", "U", 0, Some(100), "sip:Alice@Example.com"))
        .unwrap();
    index
        .upsert_from_metadata(&meta("r2", "U", 150, Some(200), "sip:bob@example.com"))
        .unwrap();
    index
        .upsert_from_metadata(&meta("r3", "W", 500, None, "alice@example.com"))
        .unwrap();
    assert_eq!(
        ids(&index.by_participant_aor("sip:alice@example.com").unwrap()),
        ["r1", "r3"]
    );
    assert_eq!(
        ids(&index.by_participant_aor("bob@example.com").unwrap()),
        ["r2"]
    );
    assert!(index
        .by_participant_aor("carol@example.com")
        .unwrap()
        .is_empty());
    assert_eq!(
        ids(&index.by_time_range(at(90), at(160)).unwrap()),
        ["r1", "r2"]
    );
    assert_eq!(
        ids(&index.by_time_range(at(101), at(149)).unwrap()),
        Vec::<&str>::new()
    );
    // Active recordings run until now.
    assert_eq!(
        ids(&index.by_time_range(at(10_000), at(20_000)).unwrap()),
        ["r3"]
    );
    index.remove("r1").unwrap();
    assert_eq!(
        ids(&index.by_participant_aor("alice@example.com").unwrap()),
        ["r3"]
    );
    assert!(index.get("r1").unwrap().is_none());
    assert_eq!(index.get("r2").unwrap().unwrap().sip_call_id, "r2@sbc");
}

#[test]
fn deleted_index_is_rebuilt_from_the_spool() {
    let t = TempDir::new("rebuild");
    let metas = [
        meta("b", "U", 100, Some(200), "sip:b@x"),
        meta("a", "U", 0, Some(100), "sip:a@x"),
        meta("c", "U", 300, Some(350), "sip:c@x"),
    ];
    let spool = spool_with(&t.0, &metas);
    fs::create_dir_all(spool.join("not-a-recording")).unwrap();
    let db = t.0.join("i.db");
    {
        let index = SqliteIndex::open(&db, &spool).unwrap();
        assert_eq!(ids(&index.by_call_uuid("U").unwrap()), ["a", "b", "c"]);
    }
    fs::remove_file(&db).unwrap();
    let index = SqliteIndex::open(&db, &spool).unwrap();
    let rows = index.by_call_uuid("U").unwrap();
    assert_eq!(ids(&rows), ["a", "b", "c"]);
    assert_eq!(rows[1].participants[0].aor.as_deref(), Some("sip:b@x"));
}

#[test]
fn corrupt_index_is_moved_aside_and_rebuilt() {
    let t = TempDir::new("corrupt");
    let spool = spool_with(&t.0, &[meta("a", "U", 0, Some(1), "sip:a@x")]);
    let db = t.0.join("i.db");
    fs::write(&db, vec![0xA5u8; 8192]).unwrap();
    let index = SqliteIndex::open(&db, &spool).unwrap();
    assert_eq!(ids(&index.by_call_uuid("U").unwrap()), ["a"]);
    assert!(db.with_extension("corrupt").exists());
}

#[test]
fn reopen_keeps_rows_and_schema_version() {
    let t = TempDir::new("reopen");
    let spool = spool_with(&t.0, &[]);
    let db = t.0.join("i.db");
    {
        let mut index = SqliteIndex::open(&db, &spool).unwrap();
        index
            .upsert_from_metadata(&meta("x", "U", 0, None, "sip:x@y"))
            .unwrap();
    }
    let index = SqliteIndex::open(&db, &spool).unwrap();
    // Not rebuilt (the spool is empty): the row survived.
    assert_eq!(ids(&index.by_call_uuid("U").unwrap()), ["x"]);
    let v: i64 = index
        .conn
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .unwrap();
    assert_eq!(v as usize, MIGRATIONS.len());
}

#[test]
fn search_combines_filters_newest_first_with_a_cursor() {
    let t = TempDir::new("search");
    let spool = spool_with(&t.0, &[]);
    let mut index = SqliteIndex::open(&t.0.join("i.db"), &spool).unwrap();
    for (id, uuid, start, end, aor) in [
        ("r1", "U", 0, Some(100), "sip:alice@x"),
        ("r2", "U", 100, Some(200), "sip:bob@x"),
        ("r3", "U", 200, None, "sip:alice@x"),
        ("r4", "V", 200, Some(300), "sip:alice@x"),
        ("r5", "V", 400, Some(500), "sip:bob@x"),
    ] {
        index
            .upsert_from_metadata(&meta(id, uuid, start, end, aor))
            .unwrap();
    }
    let all = |q: Search| ids(&index.search(&Search { limit: 10, ..q }).unwrap()).join(",");
    assert_eq!(all(Search::default()), "r5,r4,r3,r2,r1");
    let uuid = |u: &str| Some(u.to_string());
    assert_eq!(
        all(Search {
            call_uuid: uuid("U"),
            ..Default::default()
        }),
        "r3,r2,r1"
    );
    assert_eq!(
        all(Search {
            call_uuid: uuid("U"),
            aor: uuid("Alice@X"),
            ..Default::default()
        }),
        "r3,r1"
    );
    assert_eq!(
        all(Search {
            since: Some(at(150)),
            until: Some(at(300)),
            ..Default::default()
        }),
        "r4,r3,r2"
    );
    assert_eq!(
        all(Search {
            state: uuid("active"),
            ..Default::default()
        }),
        "r3"
    );
    // By AOR or by name (every participant of these rows is named Agent).
    assert_eq!(
        all(Search {
            participant: uuid("BOB@x"),
            ..Default::default()
        }),
        "r5,r2"
    );
    assert_eq!(
        all(Search {
            participant: uuid("agent"),
            call_uuid: uuid("V"),
            ..Default::default()
        }),
        "r5,r4"
    );
    assert_eq!(
        all(Search {
            participant: uuid("Age"),
            ..Default::default()
        }),
        ""
    );
    // Pages of two: r4 and r3 share a start time, the id orders them and the cursor keeps it.
    let mut pages = Vec::new();
    let mut after = None;
    loop {
        let page = index
            .search(&Search {
                limit: 2,
                after: after.clone(),
                ..Default::default()
            })
            .unwrap();
        if page.is_empty() {
            break;
        }
        after = page.last().map(SearchCursor::after);
        pages.push(ids(&page).join(","));
    }
    assert_eq!(pages, ["r5,r4", "r3,r2", "r1"]);
}

#[test]
fn hosts_public_urls_are_kept_and_replaced() {
    let t = TempDir::new("urls");
    let spool = spool_with(&t.0, &[]);
    let mut index = SqliteIndex::open(&t.0.join("i.db"), &spool).unwrap();
    assert!(IndexStore::public_urls(&mut index).unwrap().is_empty());
    IndexStore::set_public_url(&mut index, "blue", "http://blue:8080").unwrap();
    IndexStore::set_public_url(&mut index, "purple", "https://purple:8443").unwrap();
    IndexStore::set_public_url(&mut index, "blue", "https://blue:8443").unwrap();
    let urls = IndexStore::public_urls(&mut index).unwrap();
    assert_eq!(urls.len(), 2);
    assert_eq!(urls["blue"], "https://blue:8443");
    assert_eq!(urls["purple"], "https://purple:8443");
}

#[test]
fn a_link_counts_rows_written_and_rows_still_in_the_batch() {
    let t = TempDir::new("link");
    let spool = spool_with(&t.0, &[]);
    let mut index = crate::index::Index::open(&t.0.join("i.db"), &spool).unwrap();
    index
        .upsert_from_metadata(&meta("r1", "U", 0, Some(100), "sip:a@x"))
        .unwrap();
    // r2 is in the same transaction as r3 (not written yet): r3 continues r1's interaction
    // after r2. A later recording (r9) and another CallUUID's do not count.
    let mut r2 = meta("r2", "U", 100, None, "sip:b@x");
    r2.interaction = Some("r1".into());
    let r9 = meta("r9", "U", 900, None, "sip:c@x");
    let other = meta("o", "V", 150, None, "sip:c@x");
    let r3 = meta("r3", "U", 300, None, "sip:c@x");
    let link = index
        .link_for_with(&r3, [&r2, &r9, &other].into_iter())
        .unwrap();
    assert_eq!(link, Some(("r1".to_string(), "r2".to_string())));
    // Written alone, the first one links nothing; with only the index, r3 follows r1.
    assert_eq!(
        index
            .link_for(&meta("r1", "U", 0, None, "sip:a@x"))
            .unwrap(),
        None
    );
    assert_eq!(
        index.link_for(&r3).unwrap(),
        Some(("r1".to_string(), "r1".to_string()))
    );
    // One transaction for all of them, then the index alone gives the same answer.
    index.upsert_many(&[&r2, &r9, &other]).unwrap();
    assert_eq!(
        index.link_for(&r3).unwrap(),
        Some(("r1".to_string(), "r2".to_string()))
    );
}
