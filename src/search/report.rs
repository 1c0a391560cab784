//! What a calibration run leaves behind for people and machines: a table of every
//! pair tried, a JSON report, an SVG heatmap of the layer distance matrix with the
//! accepted pairs marked, and the GGUF metadata that stores the map.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use crate::gguf::Value;
use crate::kvplan::{
    self, ShareMap, KEY_CORPUS_SHA256, KEY_MEAN_COSINE, KEY_MEAN_KLD, KEY_SAMPLE_COUNT,
    KEY_STRATEGY, KEY_THRESHOLD, KEY_TOKENS_PER_SAMPLE,
};
use crate::search::result::SearchResult;

/// The `kvsharer.*` metadata for a search result (see `shared/KVSHARER.md`).
pub fn metadata(r: &SearchResult) -> Vec<(String, Value)> {
    let mut kv = kvplan::to_metadata(&r.map);
    kv.extend([
        (KEY_THRESHOLD.to_string(), Value::F32(r.threshold)),
        (KEY_MEAN_COSINE.to_string(), Value::F32(r.mean_cosine)),
        (KEY_SAMPLE_COUNT.to_string(), Value::U32(r.samples as u32)),
        (
            KEY_TOKENS_PER_SAMPLE.to_string(),
            Value::U32(r.tokens_per_sample as u32),
        ),
        (
            KEY_CORPUS_SHA256.to_string(),
            Value::String(r.corpus_sha256.clone()),
        ),
        (
            KEY_STRATEGY.to_string(),
            Value::String(r.strategy.name().to_string()),
        ),
    ]);
    if let Some(kld) = r.mean_kld {
        kv.push((KEY_MEAN_KLD.to_string(), Value::F32(kld)));
    }
    kv
}

/// One line with both objectives of the chosen map, whichever the search used.
pub fn objectives_line(r: &SearchResult) -> String {
    let kld = r
        .mean_kld
        .map_or("not measured".to_string(), |k| format!("{k:.5}"));
    format!(
        "strategy {} (objective {}) | calibration: mean cosine {:.4}, mean KLD {kld}",
        r.strategy.name(),
        r.objective.name(),
        r.mean_cosine
    )
}

/// Every pair tried, one line each.
pub fn trials_table(r: &SearchResult) -> String {
    let mut s = String::new();
    let with_kld = r.trials.iter().any(|t| t.kld.is_some());
    let _ = writeln!(
        s,
        "  #  layer <- source (resolved)   score    cosine  {}kept",
        if with_kld { "    KLD    step  " } else { "" }
    );
    for (n, t) in r.trials.iter().enumerate() {
        let extra = if with_kld {
            format!(
                "{:>9.5}  {:>4}  ",
                t.kld.unwrap_or(f32::NAN),
                t.step.map_or("-".to_string(), |k| k.to_string())
            )
        } else {
            String::new()
        };
        let _ = writeln!(
            s,
            "{:>3}  {:>5} <- {:<6} ({:>3})      {:>8.3}  {:>7.4}  {extra}{}",
            n + 1,
            t.layer,
            t.source,
            t.resolved_source,
            t.score,
            t.cosine,
            if t.kept { "yes" } else { "no" }
        );
    }
    let _ = writeln!(s, "{}", objectives_line(r));
    s
}

/// Writes `report.json` and `distances.svg` into `dir` (created if needed).
pub fn write_report_dir(r: &SearchResult, dir: &Path) -> std::io::Result<(PathBuf, PathBuf)> {
    std::fs::create_dir_all(dir)?;
    let json = dir.join("report.json");
    let svg = dir.join("distances.svg");
    write_atomic(&json, serde_json::to_string_pretty(r)?.as_bytes())?;
    let svg_text = heatmap_svg(&r.scores, &r.map).replacen(
        "</svg>",
        &format!(
            "<text x=\"48\" y=\"32\" font-size=\"11\">{} | map {}</text>\n</svg>",
            objectives_line(r),
            r.map.to_string().replace('<', "&lt;")
        ),
        1,
    );
    write_atomic(&svg, svg_text.as_bytes())?;
    Ok((json, svg))
}

pub(crate) fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let mut tmp = tempfile::NamedTempFile::new_in(dir)?;
    std::io::Write::write_all(&mut tmp, bytes)?;
    tmp.persist(path).map_err(|e| e.error)?;
    Ok(())
}

/// Reads a map back from a report written by `write_report_dir` (`share --map`).
pub fn read_report_map(path: &Path, n_layers: usize) -> Result<ShareMap, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let v: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| format!("{} is not valid JSON: {e}", path.display()))?;
    let src = v
        .get("map")
        .and_then(|m| m.get("source"))
        .and_then(|s| s.as_array())
        .ok_or_else(|| format!("{} has no map.source array", path.display()))?;
    let mut sources = Vec::with_capacity(src.len());
    for x in src {
        let n = x
            .as_u64()
            .ok_or_else(|| format!("{}: map.source holds a non-integer ({x})", path.display()))?;
        sources.push(n as usize);
    }
    ShareMap::for_model(sources, n_layers).map_err(|e| format!("{}: {e}", path.display()))
}

/// The L x L score matrix (lower triangle) as coloured cells, accepted pairs outlined.
pub fn heatmap_svg(scores: &[Vec<f32>], map: &ShareMap) -> String {
    let n = scores.len();
    let cell = 18usize;
    let margin = 48usize;
    let size = margin + n * cell + 140;
    let (mut lo, mut hi) = (f32::INFINITY, f32::NEG_INFINITY);
    for (i, row) in scores.iter().enumerate() {
        for &v in &row[..i] {
            lo = lo.min(v);
            hi = hi.max(v);
        }
    }
    let span = if hi > lo { hi - lo } else { 1.0 };
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{size}" height="{}" font-family="sans-serif" font-size="10">"#,
        margin + n * cell + 40
    );
    let _ = writeln!(s, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let _ = writeln!(
        s,
        r#"<text x="{margin}" y="16" font-size="12">KV distance between layers (row i reads column j); outlined: shared pairs</text>"#
    );
    for (i, row) in scores.iter().enumerate() {
        for (j, &v) in row.iter().enumerate().take(i) {
            let t = (v - lo) / span;
            let (r, g, b) = viridis(t);
            let _ = writeln!(
                s,
                r#"<rect x="{}" y="{}" width="{cell}" height="{cell}" fill="rgb({r},{g},{b})"><title>{i} vs {j}: {v:.3}</title></rect>"#,
                margin + j * cell,
                margin + i * cell
            );
        }
    }
    for (i, j) in map.pairs() {
        let _ = writeln!(
            s,
            r#"<rect x="{}" y="{}" width="{cell}" height="{cell}" fill="none" stroke="red" stroke-width="2.5"/>"#,
            margin + j * cell,
            margin + i * cell
        );
    }
    for k in 0..n {
        if n <= 40 || k % 2 == 0 {
            let _ = writeln!(
                s,
                r#"<text x="{}" y="{}" text-anchor="end">{k}</text><text x="{}" y="{}" text-anchor="middle">{k}</text>"#,
                margin - 4,
                margin + k * cell + cell / 2 + 4,
                margin + k * cell + cell / 2,
                margin + n * cell + 14
            );
        }
    }
    let lx = margin + n * cell + 30;
    for step in 0..=10 {
        let t = step as f32 / 10.0;
        let (r, g, b) = viridis(t);
        let y = margin + (10 - step) * 14;
        let _ = writeln!(
            s,
            r#"<rect x="{lx}" y="{y}" width="16" height="14" fill="rgb({r},{g},{b})"/><text x="{}" y="{}">{:.2}</text>"#,
            lx + 22,
            y + 11,
            lo + t * span
        );
    }
    s.push_str("</svg>\n");
    s
}

/// A compact approximation of matplotlib's viridis colour map.
fn viridis(t: f32) -> (u8, u8, u8) {
    const STOPS: [(f32, f32, f32); 5] = [
        (68.0, 1.0, 84.0),
        (59.0, 82.0, 139.0),
        (33.0, 145.0, 140.0),
        (94.0, 201.0, 98.0),
        (253.0, 231.0, 37.0),
    ];
    let t = t.clamp(0.0, 1.0) * 4.0;
    let k = (t.floor() as usize).min(3);
    let f = t - k as f32;
    let (a, b) = (STOPS[k], STOPS[k + 1]);
    let mix = |x: f32, y: f32| (x + (y - x) * f).round() as u8;
    (mix(a.0, b.0), mix(a.1, b.1), mix(a.2, b.2))
}

/// What `kvsharer plan` leaves behind: the plan, what it costs, and the walk it
/// came from.
#[derive(serde::Serialize)]
pub struct PlanReport<'a> {
    pub budget: f64,
    pub fraction: f64,
    pub bytes_per_token: usize,
    pub f16_bytes_per_token: usize,
    pub predicted_kld: f64,
    /// The plan's KLD measured on the calibration set (`None` when not measured).
    pub measured_kld: Option<f64>,
    /// Per layer: `[k_from, v_from]`, `[k_type, v_type]` of the slots read.
    pub layers: Vec<PlanRow>,
    pub steps: &'a [String],
    /// The shares that read through a fitted adapter.
    pub adapted: &'a [crate::search::adapter::AdapterPair],
    pub walk: &'a [crate::search::planner::WalkPoint],
    pub costs: &'a crate::search::planner::MoveCosts,
}

#[derive(serde::Serialize)]
pub struct PlanRow {
    pub layer: usize,
    pub k_from: usize,
    pub v_from: usize,
    pub k_type: &'static str,
    pub v_type: &'static str,
}

impl PlanRow {
    pub fn of(plan: &crate::kvplan::KvPlan) -> Vec<PlanRow> {
        plan.rows()
            .into_iter()
            .enumerate()
            .map(|(layer, (k_from, v_from, k, v))| PlanRow {
                layer,
                k_from,
                v_from,
                k_type: k.name(),
                v_type: v.name(),
            })
            .collect()
    }
}

/// Writes `plan.json` and `plan.svg` (the walk: KV bytes against predicted KLD,
/// the chosen plan marked) into `dir`.
pub fn write_plan_report(r: &PlanReport<'_>, dir: &Path) -> std::io::Result<(PathBuf, PathBuf)> {
    std::fs::create_dir_all(dir)?;
    let json = dir.join("plan.json");
    let svg = dir.join("plan.svg");
    write_atomic(&json, serde_json::to_string_pretty(r)?.as_bytes())?;
    write_atomic(&svg, walk_svg(r).as_bytes())?;
    Ok((json, svg))
}

/// The greedy walk as a line: x = KV bytes (% of f16), y = predicted KLD (log).
fn walk_svg(r: &PlanReport<'_>) -> String {
    let (w, h, pad) = (640.0, 400.0, 56.0);
    let floor = 1e-4f64;
    let top = r
        .walk
        .iter()
        .map(|p| p.predicted_kld)
        .fold(r.predicted_kld, f64::max)
        .max(floor * 10.0);
    let (ly0, ly1) = (floor.log10(), top.log10().ceil());
    let x = |f: f64| pad + (1.0 - f) * (w - 2.0 * pad);
    let y = |k: f64| h - pad - (k.max(floor).log10() - ly0) / (ly1 - ly0) * (h - 2.0 * pad);
    let mut s = format!(
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="11">
<rect width="100%" height="100%" fill="white"/>
<text x="{pad}" y="20" font-size="13">KV plan walk: bytes vs predicted calibration KLD (log)</text>
<line x1="{pad}" y1="{yb}" x2="{xr}" y2="{yb}" stroke="black"/>
<line x1="{pad}" y1="{pad}" x2="{pad}" y2="{yb}" stroke="black"/>
"#,
        yb = h - pad,
        xr = w - pad
    );
    for pct in [100, 75, 50, 25, 0] {
        let px = x(pct as f64 / 100.0);
        let _ = writeln!(
            s,
            r#"<text x="{px:.1}" y="{:.1}" text-anchor="middle">{pct}%</text>"#,
            h - pad + 16.0
        );
    }
    let mut e = ly0 as i32;
    while e as f64 <= ly1 {
        let py = y(10f64.powi(e));
        let _ = writeln!(
            s,
            r#"<text x="{:.1}" y="{:.1}" text-anchor="end">1e{e}</text><line x1="{pad}" y1="{py:.1}" x2="{:.1}" y2="{py:.1}" stroke="lightgray"/>"#,
            pad - 4.0,
            py + 4.0,
            w - pad
        );
        e += 1;
    }
    let points: Vec<String> = r
        .walk
        .iter()
        .map(|p| format!("{:.1},{:.1}", x(p.fraction), y(p.predicted_kld)))
        .collect();
    let _ = writeln!(
        s,
        r#"<polyline points="{}" fill="none" stroke="steelblue" stroke-width="1.5"/>"#,
        points.join(" ")
    );
    let (cx, cy) = (x(r.fraction), y(r.predicted_kld));
    let _ = writeln!(
        s,
        r#"<circle cx="{cx:.1}" cy="{cy:.1}" r="5" fill="crimson"/><text x="{:.1}" y="{:.1}">plan: {:.1}% of f16, predicted KLD {:.4}</text>"#,
        cx + 8.0,
        cy - 8.0,
        r.fraction * 100.0,
        r.predicted_kld
    );
    let _ = writeln!(
        s,
        r#"<text x="{}" y="{}" text-anchor="middle">KV bytes, % of the unshared f16 cache</text>"#,
        w / 2.0,
        h - 12.0
    );
    s.push_str("</svg>\n");
    s
}
