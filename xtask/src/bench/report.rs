//! The bench's report: `report.md` and `report.json` from every part's results, the data
//! path's ratios against the contenders, and the loss chart (`loss.png`).

use std::{collections::HashMap, fmt::Write as _, path::Path, time::Duration};

use anyhow::Result;
use serde_json::{json, Value};

use super::{index, media, sh, sip, Contender, Datapath, Plan, Sample};

/// Highest offered rate (measured pps) with zero loss among a contender's samples for `flows`.
fn zero_loss_rate(samples: &[Sample], flows: u32) -> Option<f64> {
    samples
        .iter()
        .filter(|s| s.flows == flows && s.lost == 0)
        .map(|s| s.offered_pps)
        .fold(None, |acc, r| Some(acc.map_or(r, |a: f64| a.max(r))))
}

/// CPU per million packets at the highest nominal rate where both contenders lost nothing
/// (falling back to the lowest rate), for `flows`.
fn cpu_ratio(a: &[Sample], b: &[Sample], flows: u32) -> Option<(f64, String)> {
    cpu_ratio_above(a, b, &[], flows)
}

/// Like [`cpu_ratio`], each side's CPU per packet less the ceiling's at the same rate (when
/// measured): what recording costs on top of receiving the packet, which every contender pays
/// and which on veth is most of tcpdump's total.
fn cpu_ratio_above(
    a: &[Sample],
    b: &[Sample],
    ceiling: &[Sample],
    flows: u32,
) -> Option<(f64, String)> {
    let pairs: Vec<(&Sample, &Sample)> = a
        .iter()
        .filter(|s| s.flows == flows)
        .filter_map(|s| {
            b.iter()
                .find(|t| t.flows == flows && t.nominal_pps == s.nominal_pps)
                .map(|t| (s, t))
        })
        .collect();
    let pick = pairs
        .iter()
        .filter(|(s, t)| s.lost == 0 && t.lost == 0 && s.nominal_pps.is_some())
        .max_by_key(|(s, _)| s.nominal_pps)
        .or_else(|| pairs.first())?;
    let (s, t) = pick;
    let base = ceiling
        .iter()
        .find(|c| c.flows == flows && c.nominal_pps == s.nominal_pps)
        .and_then(Sample::cpu_per_mpkt)
        .unwrap_or(0.0);
    let denominator = t.cpu_per_mpkt()? - base;
    (denominator > 0.0).then(|| {
        (
            (s.cpu_per_mpkt().unwrap_or(0.0) - base).max(0.0) / denominator,
            rate_label(s.nominal_pps),
        )
    })
}

pub(super) fn rate_label(r: Option<u64>) -> String {
    r.map_or("max".into(), |r| format!("{}k", r / 1000))
}

/// The results of the parts other than the data path (None: not run).
pub(super) struct Parts<'a> {
    pub sip: Option<&'a Value>,
    pub media: Option<&'a Value>,
    pub index: Option<&'a Value>,
    pub faults: Option<&'a Value>,
}

/// Writes `report.md`, `report.json` and `loss.png` into `out_dir`.
pub(super) fn write(
    out_dir: &Path,
    quick: bool,
    dp: Option<&Datapath>,
    parts: Parts,
    commands: &[String],
    elapsed: Duration,
) -> Result<()> {
    let Parts {
        sip,
        media,
        index,
        faults,
    } = parts;
    let empty = Datapath {
        plan: Plan {
            flows: Vec::new(),
            rates: Vec::new(),
            min_packets: 0,
            max_packets: 0,
            secs_per_run: 0,
        },
        samples: HashMap::new(),
        rewrite: Sample::default(),
        profiles: Vec::new(),
        failures: Vec::new(),
    };
    let has_dp = dp.is_some();
    let Datapath {
        plan,
        samples,
        rewrite,
        profiles,
        failures,
    } = dp.unwrap_or(&empty);
    let get = |c: Contender| samples.get(&c).map(Vec::as_slice).unwrap_or(&[]);
    let mut per_flows = Vec::new();
    let (mut ceil_ratio, mut tcp_ratio, mut sock_ratio): (Option<f64>, Option<f64>, Option<f64>) =
        (None, None, None);
    let min = |acc: Option<f64>, v: Option<f64>| match (acc, v) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    };
    let max = |acc: Option<f64>, v: Option<f64>| match (acc, v) {
        (Some(a), Some(b)) => Some(a.max(b)),
        (a, b) => a.or(b),
    };
    for &f in &plan.flows {
        let zl: HashMap<&str, Option<f64>> = Contender::ALL
            .iter()
            .map(|&c| (c.key(), zero_loss_rate(get(c), f)))
            .collect();
        let cr = match (zl["recorder"], zl["ceiling"]) {
            (Some(r), Some(c)) if c > 0.0 => Some(r / c),
            (None, Some(_)) => Some(0.0),
            _ => None,
        };
        let tr = cpu_ratio(get(Contender::Recorder), get(Contender::Tcpdump), f);
        let sr = cpu_ratio(get(Contender::Recorder), get(Contender::Socket), f);
        let above = |b: Contender| {
            cpu_ratio_above(get(Contender::Recorder), get(b), get(Contender::Ceiling), f)
                .map(|x| x.0)
        };
        ceil_ratio = min(ceil_ratio, cr);
        tcp_ratio = max(tcp_ratio, tr.as_ref().map(|x| x.0));
        sock_ratio = max(sock_ratio, sr.as_ref().map(|x| x.0));
        per_flows.push(json!({
            "flows": f, "zero_loss_pps": zl, "ceiling_ratio": cr,
            "cpu_ratio_tcpdump": tr.as_ref().map(|x| x.0), "cpu_ratio_tcpdump_at": tr.map(|x| x.1),
            "cpu_ratio_socket": sr.as_ref().map(|x| x.0), "cpu_ratio_socket_at": sr.map(|x| x.1),
            "cpu_ratio_tcpdump_above_ceiling": above(Contender::Tcpdump),
            "cpu_ratio_socket_above_ceiling": above(Contender::Socket),
        }));
    }
    let machine = machine_info();
    let rec_flows = *plan.flows.iter().max().unwrap_or(&0);
    let held = get(Contender::Recorder)
        .iter()
        .find(|s| s.flows == rec_flows)
        .map(|s| {
            json!({
                "recordings": s.flows.div_ceil(2), "flows": s.flows,
                "setup_rss_kib": s.extra["setup_rss_kib"],
                "rss_kib_per_recording": s.extra["setup_rss_kib"].as_f64().map(|r| r / (s.flows.div_ceil(2)) as f64),
            })
        });
    let tables: serde_json::Map<String, Value> = Contender::ALL
        .iter()
        .map(|&c| {
            (
                c.key().to_string(),
                Value::Array(get(c).iter().map(Sample::to_json).collect()),
            )
        })
        .collect();
    let rewrite_in_xdp = rewrite
        .offered
        .saturating_sub(rewrite.extra["xdp"]["captured"].as_u64().unwrap_or(0));
    let sip_fig = |k: &str| sip.map_or(Value::Null, |s| s[k].clone());
    // Flat-out runs whose trafgen had to be retried with a smaller TX_RING (see Net::measure).
    let all_samples = || {
        Contender::ALL
            .iter()
            .flat_map(|&c| get(c).iter().map(move |s| (c, s)))
            .chain(std::iter::once((Contender::Recorder, rewrite)))
    };
    let tx_ring_retries: Vec<String> = all_samples()
        .filter_map(|(c, s)| {
            let t = &s.extra["trafgen_tx_ring"];
            let failed = t["failed_before"].as_array().filter(|f| !f.is_empty())?;
            Some(format!(
                "{} flows={}: {} (then sent with -S {}KiB)",
                c.key(),
                s.flows,
                failed
                    .iter()
                    .filter_map(Value::as_str)
                    .collect::<Vec<_>>()
                    .join("; "),
                t["ring_kib"]
            ))
        })
        .collect();
    let tx_ring_sizes: Vec<String> = {
        let mut v: Vec<String> = all_samples()
            .filter_map(|(_, s)| {
                let k = &s.extra["trafgen_tx_ring"]["ring_kib"];
                (!k.is_null()).then(|| k.to_string().trim_matches('"').to_string())
            })
            .collect();
        v.sort();
        v.dedup();
        v
    };
    let doc = json!({
        "ceiling_ratio": ceil_ratio,
        "cpu_ratio_tcpdump": tcp_ratio,
        "cpu_ratio_socket": sock_ratio,
        "rewrite_lost_packets": has_dp.then_some(rewrite.lost),
        // Of those, lost before the ring (the flow-map rewrite itself); the rest is writer queue.
        "rewrite_lost_in_xdp": has_dp.then_some(rewrite_in_xdp),
        "max_concurrent_sessions": sip_fig("max_concurrent_sessions"),
        "sessions_per_second": sip_fig("sessions_per_second"),
        // Largest call count (2 PCMU streams each) recorded with nothing lost.
        "calls_with_media_zero_loss": media.map_or(Value::Null, |m| m["zero_loss_calls"].clone()),
        "sip": sip,
        "media": media,
        "index": index,
        "faults": faults,
        "datapath_sessions_held": held,
        "rewrite": has_dp.then(|| rewrite.to_json()),
        "profiles": has_dp.then_some(profiles),
        "per_flow_count": per_flows,
        "contenders": tables,
        "quick": quick,
        "elapsed_s": elapsed.as_secs_f64(),
        "machine": machine,
        "commands": commands,
        "failed_runs": failures,
        "trafgen_tx_ring": {
            "ring_kib_used": tx_ring_sizes, "retried_runs": tx_ring_retries,
            "note": "flat-out runs (TX_RING): a run whose trafgen failed with `Flushing TX_RING failed: Resource temporarily unavailable` is run again (fresh receiver) with a smaller ring (-S 256, 128, 64, 32 KiB), kept for the following flat-out runs",
        },
    });
    std::fs::write(
        out_dir.join("report.json"),
        serde_json::to_string_pretty(&doc)?,
    )?;

    let mut md = String::new();
    writeln!(
        md,
        "# Recorder benchmark ({})\n",
        if quick { "quick" } else { "full" }
    )?;
    writeln!(
        md,
        "Machine: {}\n",
        machine["summary"].as_str().unwrap_or("")
    )?;
    writeln!(
        md,
        "Run took {:.0} s. Ratios are against baselines measured in this run.\n",
        elapsed.as_secs_f64()
    )?;
    if has_dp {
        writeln!(md, "## Summary\n")?;
        let f2 = |v: Option<f64>| v.map_or("n/a".to_string(), |v| format!("{v:.2}"));
        writeln!(md, "| flows | ceiling 0-loss pps | recorder 0-loss pps | tcpdump 0-loss pps | socket 0-loss pps | recorder/ceiling | rec CPU / tcpdump | rec CPU / socket | same, above ceiling: / tcpdump | / socket |")?;
        writeln!(md, "|---|---|---|---|---|---|---|---|---|---|")?;
        for p in &per_flows {
            let z = |k: &str| {
                p["zero_loss_pps"][k]
                    .as_f64()
                    .map_or("none".into(), |v| format!("{v:.0}"))
            };
            writeln!(
                md,
                "| {} | {} | {} | {} | {} | {} | {} (at {}) | {} (at {}) | {} | {} |",
                p["flows"],
                z("ceiling"),
                z("recorder"),
                z("tcpdump"),
                z("socket"),
                f2(p["ceiling_ratio"].as_f64()),
                f2(p["cpu_ratio_tcpdump"].as_f64()),
                p["cpu_ratio_tcpdump_at"].as_str().unwrap_or("-"),
                f2(p["cpu_ratio_socket"].as_f64()),
                p["cpu_ratio_socket_at"].as_str().unwrap_or("-"),
                f2(p["cpu_ratio_tcpdump_above_ceiling"].as_f64()),
                f2(p["cpu_ratio_socket_above_ceiling"].as_f64()),
            )?;
        }
        writeln!(md, "\n\"Above ceiling\": each side's CPU per packet less the no-op ceiling's at the same rate, i.e. the cost of recording on top of receiving the packet (on veth the receive path alone is most of tcpdump's total). The top-level ratios below are the plain ones.")?;
        writeln!(md, "\nTop level (worst over flow counts): ceiling_ratio {}, cpu_ratio_tcpdump {}, cpu_ratio_socket {}; rewrite_lost_packets {} (of which before the ring, i.e. by the rewrites: {}; {} rewrites during a run of {} packets to {} flows at {} ({:.0} pps offered), the recorder's highest loss-free rate for that flow count in this run).\n",
        f2(ceil_ratio), f2(tcp_ratio), f2(sock_ratio), rewrite.lost,
        rewrite.offered.saturating_sub(rewrite.extra["xdp"]["captured"].as_u64().unwrap_or(0)),
        rewrite.extra["rewrites_done"], rewrite.offered, rewrite.flows,
        rate_label(rewrite.nominal_pps), rewrite.offered_pps)?;
        if !tx_ring_sizes.is_empty() {
            writeln!(md, "Flat-out runs (trafgen TX_RING, no `-b`) used ring sizes (KiB): {}. With a receiver attached, trafgen's default 512 KiB ring keeps more frames in flight than the packet socket's send buffer allows (wmem_default; trafgen cannot raise it inside a network namespace) and trafgen aborts on the EAGAIN of its non-blocking flush (`Flushing TX_RING failed: Resource temporarily unavailable`). Such a run is run again from scratch with a smaller ring (`-S`), which is then kept.{}\n",
                tx_ring_sizes.join(", "),
                if tx_ring_retries.is_empty() { " No run needed a retry.".to_string() } else { format!(" Retried: {}.", tx_ring_retries.join("; ")) })?;
        }
        writeln!(md, "## Every run\n")?;
        writeln!(md, "| contender | flows | rate | offered | offered pps | rx at if | sender drops | written | lost | loss % | seq gaps (flows) | CPU1 s (whole CPU) | proc s | napi s | CPU s / Mpkt (proc+napi) | RSS KiB |")?;
        writeln!(
            md,
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
        )?;
        for c in Contender::ALL {
            for s in get(c) {
                writeln!(
                md,
                "| {} | {} | {} | {} | {:.0} | {} | {} | {} | {} | {:.3} | {} ({}) | {:.2} | {:.2} | {:.2} | {} | {} |",
                c.key(), s.flows, rate_label(s.nominal_pps), s.offered, s.offered_pps, s.rx_if,
                s.sender_tx_dropped, if c == Contender::Ceiling { "-".into() } else { s.written.to_string() },
                s.lost, s.loss_pct(), s.gap_events, s.flows_with_gaps, s.cpu1_s, s.proc_cpu_s,
                s.napi_cpu_s, s.cpu_per_mpkt().map_or("-".into(), |v| format!("{v:.2}")), s.rss_kib
            )?;
            }
        }
        writeln!(md, "\nRecorder XDP counters per run are in report.json (`contenders.recorder[].detail.xdp`).\n")?;
        for p in profiles {
            writeln!(
                md,
                "## Profile: recorder, {} flows, trafgen flat out ({} pps offered, {} lost)\n",
                p["flows"], p["offered_pps"], p["lost"]
            )?;
            writeln!(md, "`perf record -F 999 -C 1 -g` on the receiving CPU during the traffic ({}); share of CPU 1's samples:\n", p["perf_data"].as_str().unwrap_or("-"))?;
            for t in p["threads_pct"].as_array().into_iter().flatten().take(6) {
                writeln!(
                    md,
                    "* {}: {:.1} %",
                    t["thread"].as_str().unwrap_or("?"),
                    t["pct"].as_f64().unwrap_or(0.0)
                )?;
            }
            writeln!(
                md,
                "\nHottest symbols (self time, thread and symbol):\n\n```"
            )?;
            for sym in p["top_symbols"].as_array().into_iter().flatten().take(20) {
                writeln!(
                    md,
                    "{:6.2}%  {}",
                    sym["pct"].as_f64().unwrap_or(0.0),
                    sym["comm_symbol"].as_str().unwrap_or("")
                )?;
            }
            writeln!(md, "```\n")?;
        }
    }
    if let Some(sip) = sip {
        md.push_str(&sip::markdown(sip)?);
    }
    if let Some(media) = media {
        md.push_str(&media::markdown(media)?);
    }
    if let Some(index) = index {
        md.push_str(&index::markdown(index)?);
    }
    if let Some(faults) = faults {
        md.push_str(&media::faults::markdown(faults));
    }
    if !failures.is_empty() {
        writeln!(md, "## Failed runs\n")?;
        for f in failures {
            writeln!(md, "* {f}")?;
        }
        writeln!(md)?;
    }
    writeln!(md, "## Commands\n")?;
    for c in commands {
        writeln!(md, "    {c}")?;
    }
    std::fs::write(out_dir.join("report.md"), md)?;
    if has_dp {
        chart(&out_dir.join("loss.png"), samples, &plan.flows)?;
    }
    eprintln!(
        "bench: wrote {}/report.md, report.json, loss.png",
        out_dir.display()
    );
    Ok(())
}

fn machine_info() -> Value {
    let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
    let kernel = read("/proc/sys/kernel/osrelease").trim().to_string();
    let cpuinfo = read("/proc/cpuinfo");
    let model = cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split(':').nth(1))
        .unwrap_or("")
        .trim()
        .to_string();
    let cpus = cpuinfo
        .lines()
        .filter(|l| l.starts_with("processor"))
        .count();
    let mem = read("/proc/meminfo")
        .lines()
        .next()
        .unwrap_or("")
        .to_string();
    let loadavg = read("/proc/loadavg").trim().to_string();
    let trafgen = sh(&["trafgen", "-v"])
        .unwrap_or_default()
        .lines()
        .next()
        .unwrap_or("")
        .to_string();
    json!({
        "kernel": kernel, "cpu_model": model, "cpus": cpus, "memory": mem, "trafgen": trafgen, "loadavg_at_end": loadavg,
        "summary": format!("{cpus} x {model}, kernel {kernel}, {mem}, load average at end {loadavg}; veth pair between two netns, trafgen on CPU 0, receiver + threaded NAPI on CPU 1"),
    })
}

fn chart(path: &Path, samples: &HashMap<Contender, Vec<Sample>>, flows: &[u32]) -> Result<()> {
    use plotters::prelude::*;
    let font = ["/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf"]
        .iter()
        .find_map(|p| std::fs::read(p).ok());
    let has_font = match font {
        Some(bytes) => plotters::style::register_font(
            "sans-serif",
            FontStyle::Normal,
            Box::leak(bytes.into_boxed_slice()),
        )
        .is_ok(),
        None => false,
    };
    // The largest flow count every contender has runs for (the hardest case they all ran).
    let f = flows
        .iter()
        .rev()
        .find(|&&f| {
            Contender::ALL.iter().all(|c| {
                samples
                    .get(c)
                    .is_some_and(|v| v.iter().any(|s| s.flows == f))
            })
        })
        .or(flows.last())
        .copied()
        .unwrap_or(1);
    let series: Vec<(Contender, Vec<(f64, f64)>)> = Contender::ALL
        .iter()
        .map(|&c| {
            let mut pts: Vec<(f64, f64)> = samples
                .get(&c)
                .map(|v| {
                    v.iter()
                        .filter(|s| s.flows == f)
                        .map(|s| (s.offered_pps / 1000.0, s.loss_pct()))
                        .collect()
                })
                .unwrap_or_default();
            pts.sort_by(|a, b| a.0.total_cmp(&b.0));
            (c, pts)
        })
        .collect();
    let xmax = series
        .iter()
        .flat_map(|(_, p)| p.iter().map(|x| x.0))
        .fold(1.0, f64::max)
        * 1.1;
    let ymax = series
        .iter()
        .flat_map(|(_, p)| p.iter().map(|x| x.1))
        .fold(1.0, f64::max)
        * 1.1;
    let root = BitMapBackend::new(path, (1000, 650)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut builder = ChartBuilder::on(&root);
    builder.margin(20);
    if has_font {
        builder
            .caption(
                format!("Loss vs offered rate ({f} flows)"),
                ("sans-serif", 24),
            )
            .x_label_area_size(45)
            .y_label_area_size(60);
    }
    let mut chart = builder.build_cartesian_2d(0.0..xmax, 0.0..ymax)?;
    if has_font {
        chart
            .configure_mesh()
            .x_desc("offered rate (kpps, measured)")
            .y_desc("loss (%)")
            .draw()?;
    } else {
        chart
            .configure_mesh()
            .disable_x_mesh()
            .disable_y_mesh()
            .draw()?;
    }
    let colors = [BLACK, RED, BLUE, GREEN];
    for ((c, pts), color) in series.into_iter().zip(colors) {
        let s = chart.draw_series(LineSeries::new(pts.clone(), color.stroke_width(2)))?;
        if has_font {
            s.label(c.name())
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
        }
        chart.draw_series(pts.into_iter().map(|p| Circle::new(p, 4, color.filled())))?;
    }
    if has_font {
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .position(SeriesLabelPosition::UpperLeft)
            .draw()?;
    }
    root.present()?;
    Ok(())
}
