//! `cargo xtask fuzz [--seconds N] [TARGET]`: the cargo-fuzz (libFuzzer) targets in `fuzz/`,
//! one at a time, each for N seconds, on the nightly toolchain.
//!
//! Each target starts from its committed seeds (`fuzz/seeds/<target>`) and grows a working
//! corpus in `fuzz/corpus/<target>` (ignored by git; kept between runs, so a longer local run
//! carries on where the last stopped). libFuzzer writes crashing inputs to
//! `fuzz/artifacts/<target>/`; the full output of a run is in `fuzz/logs/<target>.log`.

use std::{
    fs,
    io::{BufRead, BufReader, Write},
    path::{Path, PathBuf},
    process::Stdio,
    time::Instant,
};

use anyhow::{bail, Context, Result};

use crate::{cargo, run, workspace_root};

/// Every target, in the order they run. Each is `fuzz/fuzz_targets/<name>.rs`.
pub const TARGETS: &[&str] = &[
    "sip_framing",
    "sip_message",
    "sdp_offer_answer",
    "multipart_body",
    "metadata",
    "rtp_rtcp",
    "srtp",
    "ring_record",
    "handover_file",
    "config_file",
    "control_request",
];

/// What libFuzzer's last status line said.
#[derive(Debug, Default)]
struct Outcome {
    execs: u64,
    cov: u64,
    ft: u64,
    corpus: u64,
}

fn fuzz_dir() -> PathBuf {
    workspace_root().join("fuzz")
}

/// Runs `target` (every target when `None`) for `seconds` each; fails listing the targets that
/// crashed, after running all of them.
pub fn fuzz(seconds: u64, target: Option<&str>) -> Result<()> {
    let targets: Vec<&str> = match target {
        Some(t) if TARGETS.contains(&t) => vec![t],
        Some(t) => bail!(
            "no fuzz target {t:?}; the targets are {}",
            TARGETS.join(", ")
        ),
        None => TARGETS.to_vec(),
    };
    // One build of every target up front: each run then starts fuzzing at once.
    run(cargo(Some("nightly"))
        .args(["fuzz", "build", "--fuzz-dir"])
        .arg(fuzz_dir()))
    .context("building the fuzz targets (`cargo xtask setup` installs cargo-fuzz)")?;
    let logs = fuzz_dir().join("logs");
    fs::create_dir_all(&logs)?;
    let mut crashed = Vec::new();
    let mut table = String::from("target              execs        cov     ft  corpus  result\n");
    for t in &targets {
        let started = Instant::now();
        let log = logs.join(format!("{t}.log"));
        let (ok, outcome) = run_target(t, seconds, &log)?;
        let result = if ok { "ok" } else { "CRASH" };
        table += &format!(
            "{t:<18} {:>7} {:>9} {:>6} {:>7}  {result} ({:.0} s)\n",
            outcome.execs,
            outcome.cov,
            outcome.ft,
            outcome.corpus,
            started.elapsed().as_secs_f64()
        );
        if !ok {
            crashed.push(*t);
            eprintln!("xtask fuzz: {t} failed; the end of {}:", log.display());
            let text = fs::read_to_string(&log).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            for line in &lines[lines.len().saturating_sub(60)..] {
                eprintln!("    {line}");
            }
        }
    }
    print!("{table}");
    if !crashed.is_empty() {
        bail!(
            "fuzz targets failed: {} (inputs in fuzz/artifacts/<target>/; `cargo +nightly fuzz \
             run --fuzz-dir fuzz <target> <input>` replays one)",
            crashed.join(", ")
        );
    }
    Ok(())
}

/// One libFuzzer process (a single job: the machine is shared), its output to `log`.
fn run_target(target: &str, seconds: u64, log: &Path) -> Result<(bool, Outcome)> {
    let corpus = fuzz_dir().join("corpus").join(target);
    let seeds = fuzz_dir().join("seeds").join(target);
    fs::create_dir_all(&corpus)?;
    fs::create_dir_all(&seeds)?;
    println!("xtask fuzz: {target} for {seconds} s");
    let mut cmd = cargo(Some("nightly"));
    cmd.args(["fuzz", "run", "--fuzz-dir"])
        .arg(fuzz_dir())
        .arg(target)
        // New inputs go to the first directory; the seeds stay as committed.
        .arg(&corpus)
        .arg(&seeds)
        .arg("--")
        .arg(format!("-max_total_time={seconds}"))
        // An input that runs this long is a bug like a crash (the config target once found a
        // log filter that took 74 s); libFuzzer's default allows 20 minutes.
        .arg("-timeout=30")
        // The totals (`stat::number_of_executed_units`) after the last status line.
        .arg("-print_final_stats=1")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd
        .spawn()
        .with_context(|| format!("failed to start {cmd:?}"))?;
    let mut file = fs::File::create(log).with_context(|| format!("creating {}", log.display()))?;
    // libFuzzer reports on stderr; stdout only carries what the target prints.
    let stdout = child.stdout.take().expect("piped");
    let out_thread = std::thread::spawn(move || {
        BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
            .collect::<Vec<_>>()
    });
    let mut outcome = Outcome::default();
    for line in BufReader::new(child.stderr.take().expect("piped"))
        .lines()
        .map_while(Result::ok)
    {
        writeln!(file, "{line}")?;
        if let Some(o) = parse_status(&line) {
            outcome = o;
        }
    }
    for line in out_thread.join().unwrap_or_default() {
        writeln!(file, "{line}")?;
    }
    let status = child.wait()?;
    Ok((status.success(), outcome))
}

/// A libFuzzer status line: `#1234\tNEW    cov: 56 ft: 78 corp: 9/1011b ...`.
fn parse_status(line: &str) -> Option<Outcome> {
    let rest = line.strip_prefix('#')?;
    let mut words = rest.split_whitespace();
    let execs = words.next()?.parse().ok()?;
    let mut outcome = Outcome {
        execs,
        ..Outcome::default()
    };
    let words: Vec<&str> = words.collect();
    for pair in words.windows(2) {
        match pair[0] {
            "cov:" => outcome.cov = pair[1].parse().ok()?,
            "ft:" => outcome.ft = pair[1].parse().ok()?,
            "corp:" => outcome.corpus = pair[1].split('/').next()?.parse().ok()?,
            _ => {}
        }
    }
    Some(outcome)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_libfuzzer_status_lines() {
        let o = parse_status(
            "#181452\tDONE   cov: 1630 ft: 5313 corp: 512/131Kb lim: 4096 exec/s: 6048 rss: 489Mb",
        )
        .unwrap();
        assert_eq!((o.execs, o.cov, o.ft, o.corpus), (181452, 1630, 5313, 512));
        assert!(parse_status("INFO: Seed: 1234").is_none());
        assert!(parse_status("#include").is_none());
    }

    #[test]
    fn every_target_has_a_source_and_seeds() {
        for t in TARGETS {
            let dir = fuzz_dir();
            assert!(dir.join(format!("fuzz_targets/{t}.rs")).exists(), "{t}");
            let seeds = fs::read_dir(dir.join("seeds").join(t))
                .map(|d| d.count())
                .unwrap_or(0);
            assert!(seeds > 0, "no seeds for {t}");
        }
    }
}
