//! `--plot FILE.svg`: one picture of a reconnect-test run.
//!
//! The SVG has two panels under the run's title:
//!
//! - **Top: guest throughput over time.** A blue step line of requests/s, each step the average
//!   rate between two consecutive progress lines from the guest (so a step's width is the sampling
//!   interval, and an outage shows as a step down towards zero). A red vertical line marks each
//!   SIGKILL sent to the backend, a green one each moment the VMM reported the backend back; the
//!   gap between a red line and the next green one is the outage the guest rode out. Throughput
//!   that returns to its old level after each green line is what a healthy run looks like; a
//!   red line with no green after it is a backend that never came back.
//! - **Bottom: histogram of recovery times.** How many outages (y, "kills") lasted how many
//!   milliseconds (x), about 20 bins wide over the longest outage; the caption gives the count,
//!   median and maximum. A long tail or a second hump is a slow reconnect path worth a look.
//!
//! Text is laid out by plotters' built-in size estimate (no `ttf` feature, so no system font
//! libraries); the viewer renders it with its own sans-serif font.

use std::path::Path;

use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

/// What a run saw over time (seconds since the harness started the VMM).
#[derive(Debug, Clone, Default)]
pub struct Timeline {
    /// (seconds, requests the guest had completed so far): cumulative, non-decreasing, from the
    /// guest's progress lines.
    pub progress: Vec<(f64, u64)>,
    /// When each SIGKILL was sent.
    pub kills: Vec<f64>,
    /// (seconds when the VMM reported the backend back, that outage's length in ms).
    pub recoveries: Vec<(f64, u64)>,
}

const SIZE: (u32, u32) = (1000, 700);
/// Height of the throughput panel; the histogram gets the rest below the title.
const TOP_PANEL_PX: u32 = 400;
const HIST_BINS: u64 = 20;
/// Timestamps beyond this (about 30,000 years) are garbage, not a run; dropping them keeps axis
/// spans finite (`f64::MAX - -f64::MAX` is infinite and would turn every coordinate into NaN).
const MAX_SECONDS: f64 = 1e12;

// Fixed colours, so a reader (and the tests) can tell the marks apart.
const THROUGHPUT_COLOR: RGBColor = RGBColor(31, 119, 180);
const KILL_COLOR: RGBColor = RGBColor(214, 39, 40);
const RECOVERY_COLOR: RGBColor = RGBColor(44, 160, 44);
const HIST_COLOR: RGBColor = RGBColor(100, 100, 160);
const NOTE_COLOR: RGBColor = RGBColor(110, 110, 110);

const FONT: &str = "sans-serif";

/// Writes the SVG: top panel guest throughput (requests/s) over time, with a vertical mark at each
/// kill (red) and each recovery (green); bottom panel a histogram of recovery times (ms). `title`
/// goes on top (e.g. the backend's name and the seed).
pub fn write_svg(path: &Path, title: &str, timeline: &Timeline) -> Result<(), String> {
    let svg = render(title, timeline).map_err(|e| format!("plot {}: {e}", path.display()))?;
    std::fs::write(path, svg).map_err(|e| format!("writing plot {}: {e}", path.display()))
}

/// Renders into memory first so that a drawing failure never leaves a half-written file, and so
/// that I/O errors come from `std::fs` with their usual wording.
fn render(title: &str, timeline: &Timeline) -> Result<String, String> {
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, SIZE).into_drawing_area();
        root.fill(&WHITE).map_err(err)?;
        let body = root.titled(title, (FONT, 22)).map_err(err)?;
        let (top, bottom) = body.split_vertically(TOP_PANEL_PX);
        draw_throughput(&top, timeline)?;
        draw_histogram(&bottom, timeline)?;
        root.present().map_err(err)?;
    }
    Ok(svg)
}

fn err<E: std::fmt::Display>(e: E) -> String {
    e.to_string()
}

fn usable_time(t: f64) -> bool {
    t.is_finite() && t.abs() <= MAX_SECONDS
}

/// (start, end, requests/s) for each pair of consecutive progress samples. Pairs that go back or
/// stand still in time, or whose request count drops (a broken counter, not a slow guest), are
/// skipped rather than drawn as a made-up rate.
fn rates(progress: &[(f64, u64)]) -> Vec<(f64, f64, f64)> {
    progress
        .windows(2)
        .filter_map(|w| {
            let ((t0, r0), (t1, r1)) = (w[0], w[1]);
            if !usable_time(t0) || !usable_time(t1) || t1 <= t0 {
                return None;
            }
            let rate = r1.checked_sub(r0)? as f64 / (t1 - t0);
            rate.is_finite().then_some((t0, t1, rate))
        })
        .collect()
}

/// An axis range that plotters can map: finite and of non-zero width.
fn axis(lo: f64, hi: f64) -> (f64, f64) {
    if !lo.is_finite() || !hi.is_finite() || hi < lo {
        return (0.0, 1.0);
    }
    if hi - lo > 0.0 && (hi - lo).is_finite() {
        return (lo, hi);
    }
    // All-equal values: open a window of one unit (or a relative one, where one unit would be lost
    // in f64 rounding).
    // Starting at 0 stays at 0: negative seconds or milliseconds would only confuse.
    let pad = (hi.abs() * 0.05).max(1.0);
    let lo = if lo >= 0.0 {
        (lo - pad).max(0.0)
    } else {
        lo - pad
    };
    (lo, hi + pad)
}

/// Headroom above the highest rate, so the legend box in the top right corner sits above the
/// data, unless that would overflow to infinity.
fn headroom(max: f64) -> f64 {
    let padded = max * 1.3;
    if padded.is_finite() {
        padded
    } else {
        max
    }
}

/// Tick labels that stay short across the whole f64 range.
fn fmt_num(v: &f64) -> String {
    let v = *v;
    if !v.is_finite() {
        return "?".into();
    }
    let a = v.abs();
    if a >= 1e6 || (a > 0.0 && a < 1e-3) {
        return format!("{v:.2e}");
    }
    let s = format!("{v:.3}");
    let s = s.trim_end_matches('0').trim_end_matches('.');
    if s == "-0" {
        "0".into()
    } else {
        s.into()
    }
}

/// A grey note in the middle of an empty plot, so an empty panel reads as "nothing happened"
/// rather than as a broken picture.
fn note<DB: DrawingBackend>(plot: &DrawingArea<DB, Shift>, text: &str) -> Result<(), String> {
    let (w, h) = plot.dim_in_pixel();
    let style = TextStyle::from((FONT, 18).into_font())
        .color(&NOTE_COLOR)
        .pos(Pos::new(HPos::Center, VPos::Center));
    let at = ((w / 2) as i32, (h / 2) as i32);
    plot.draw(&Text::new(text, at, style)).map_err(err)
}

fn draw_throughput<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    timeline: &Timeline,
) -> Result<(), String> {
    let steps = rates(&timeline.progress);
    let kills: Vec<f64> = timeline
        .kills
        .iter()
        .copied()
        .filter(|&t| usable_time(t))
        .collect();
    let recoveries: Vec<f64> = timeline
        .recoveries
        .iter()
        .map(|&(t, _)| t)
        .filter(|&t| usable_time(t))
        .collect();

    // The x axis covers every event, starting at the VMM's start (0) unless something is earlier.
    let times = timeline
        .progress
        .iter()
        .map(|&(t, _)| t)
        .filter(|&t| usable_time(t))
        .chain(kills.iter().copied())
        .chain(recoveries.iter().copied());
    let (lo, hi) = times.fold((0.0_f64, f64::NEG_INFINITY), |(lo, hi), t| {
        (lo.min(t), hi.max(t))
    });
    let (x0, x1) = axis(lo, if hi.is_finite() { hi } else { lo });
    let max_rate = steps.iter().map(|s| s.2).fold(0.0_f64, f64::max);
    let (_, y1) = axis(0.0, headroom(max_rate));

    let unrecovered = timeline
        .kills
        .len()
        .saturating_sub(timeline.recoveries.len());
    let mut caption = format!(
        "guest throughput: {} kills, {} recoveries",
        timeline.kills.len(),
        timeline.recoveries.len()
    );
    if unrecovered > 0 {
        caption.push_str(&format!(", {unrecovered} without a recovery"));
    }

    let mut chart = ChartBuilder::on(area)
        .caption(caption, (FONT, 18))
        .margin(10)
        .x_label_area_size(45)
        .y_label_area_size(70)
        .build_cartesian_2d(x0..x1, 0.0..y1)
        .map_err(err)?;
    chart
        .configure_mesh()
        .x_desc("seconds since start")
        .y_desc("guest requests/s")
        .axis_desc_style((FONT, 16))
        .label_style((FONT, 13))
        .x_label_formatter(&fmt_num)
        .y_label_formatter(&fmt_num)
        .draw()
        .map_err(err)?;

    let mut labelled = false;
    if steps.is_empty() {
        note(
            &chart.plotting_area().strip_coord_spec(),
            "no throughput: fewer than two usable progress samples",
        )?;
    } else {
        // A step per sampling interval: the rate is an average over it, so a line between
        // midpoints would suggest detail the samples don't have.
        let points = steps
            .iter()
            .flat_map(|&(t0, t1, rate)| [(t0, rate), (t1, rate)]);
        chart
            .draw_series(LineSeries::new(points, THROUGHPUT_COLOR.stroke_width(2)))
            .map_err(err)?
            .label("throughput")
            .legend(|(x, y)| {
                PathElement::new([(x, y), (x + 20, y)], THROUGHPUT_COLOR.stroke_width(2))
            });
        labelled = true;
    }

    for (times, color, label) in [
        (&kills, KILL_COLOR, "SIGKILL"),
        (&recoveries, RECOVERY_COLOR, "backend back"),
    ] {
        if times.is_empty() {
            continue;
        }
        chart
            .draw_series(
                times
                    .iter()
                    .map(|&t| PathElement::new([(t, 0.0), (t, y1)], color.stroke_width(1))),
            )
            .map_err(err)?
            .label(label)
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 20, y)], color.stroke_width(2)));
        labelled = true;
    }

    // plotters draws an empty legend box when nothing is labelled.
    if labelled {
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperRight)
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK.mix(0.5))
            .label_font((FONT, 14))
            .draw()
            .map_err(err)?;
    }
    Ok(())
}

/// Bin width in ms: about `HIST_BINS` bins up to the longest outage, never under 1 ms.
fn bin_width(max_ms: u64) -> u64 {
    max_ms.div_ceil(HIST_BINS).max(1)
}

fn draw_histogram<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    timeline: &Timeline,
) -> Result<(), String> {
    let mut ms: Vec<u64> = timeline.recoveries.iter().map(|&(_, ms)| ms).collect();
    ms.sort_unstable();

    let (caption, counts, width) = match ms.last() {
        None => ("recovery time: none recorded".to_string(), Vec::new(), 1),
        Some(&max) => {
            let width = bin_width(max);
            // `max / width` is at most HIST_BINS, so this stays small even for u64::MAX.
            let mut counts = vec![0_u64; (max / width) as usize + 1];
            for &v in &ms {
                counts[(v / width) as usize] += 1;
            }
            let median = ms[(ms.len() - 1) / 2]; // the lower one for an even count
            let caption = format!(
                "recovery time: {} outages, median {median} ms, max {max} ms ({width} ms bins)",
                ms.len()
            );
            (caption, counts, width)
        }
    };

    // Bin edges in f64: `bins * width` can exceed u64 when outages are near u64::MAX ms.
    let edge = |i: usize| i as f64 * width as f64;
    // One empty bin past the last, so the longest outage's bar doesn't sit on the frame.
    let (x0, x1) = axis(0.0, edge(counts.len() + 1));
    let y1 = counts.iter().copied().max().unwrap_or(0).saturating_add(1);

    let mut chart = ChartBuilder::on(area)
        .caption(caption, (FONT, 18))
        .margin(10)
        .x_label_area_size(45)
        .y_label_area_size(70)
        .build_cartesian_2d(x0..x1, 0_u64..y1)
        .map_err(err)?;
    chart
        .configure_mesh()
        .x_desc("recovery time (ms)")
        .y_desc("kills")
        .axis_desc_style((FONT, 16))
        .label_style((FONT, 13))
        .x_label_formatter(&fmt_num)
        // A count axis: integer ticks only, at most one per kill.
        .y_labels(y1.min(10) as usize + 1)
        .draw()
        .map_err(err)?;

    if counts.is_empty() {
        note(
            &chart.plotting_area().strip_coord_spec(),
            "no recoveries recorded",
        )?;
        return Ok(());
    }
    chart
        .draw_series(
            counts
                .iter()
                .enumerate()
                .filter(|(_, &c)| c > 0)
                .map(|(i, &c)| {
                    Rectangle::new([(edge(i), 0), (edge(i + 1), c)], HIST_COLOR.filled())
                }),
        )
        .map_err(err)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 30 s of ~5000 requests/s sampled every 250 ms, three kills whose outages stall progress.
    fn realistic() -> Timeline {
        let outages = [(5.0, 300_u64), (12.0, 450), (20.0, 280)];
        let mut progress = Vec::new();
        let mut done = 0_u64;
        for i in 0..=120_u32 {
            let t = f64::from(i) * 0.25;
            let stalled = outages
                .iter()
                .any(|&(k, ms)| t > k && t <= k + ms as f64 / 1000.0 + 0.25);
            if i > 0 && !stalled {
                done += 1250 + u64::from(i % 7) * 10;
            }
            progress.push((t, done));
        }
        Timeline {
            progress,
            kills: outages.iter().map(|&(k, _)| k).collect(),
            recoveries: outages
                .iter()
                .map(|&(k, ms)| (k + ms as f64 / 1000.0, ms))
                .collect(),
        }
    }

    fn temp_path(name: &str) -> std::path::PathBuf {
        std::env::temp_dir().join(format!("vmm-plot-{}-{name}.svg", std::process::id()))
    }

    /// What `write_svg` put in a file of its own (removed again).
    fn written(name: &str, title: &str, timeline: &Timeline) -> String {
        let path = temp_path(name);
        write_svg(&path, title, timeline).expect("write_svg");
        let svg = std::fs::read_to_string(&path).expect("read back");
        let _ = std::fs::remove_file(&path);
        svg
    }

    fn polylines_in(svg: &str, color: RGBColor) -> usize {
        let stroke = format!("stroke=\"#{:02X}{:02X}{:02X}\"", color.0, color.1, color.2);
        svg.split('<')
            .filter(|tag| tag.starts_with("polyline") && tag.contains(&stroke))
            .count()
    }

    fn filled_rects_in(svg: &str, color: RGBColor) -> usize {
        let fill = format!("fill=\"#{:02X}{:02X}{:02X}\"", color.0, color.1, color.2);
        svg.split('<')
            .filter(|tag| tag.starts_with("rect") && tag.contains(&fill))
            .count()
    }

    /// The trimmed contents of every `<text>` element.
    fn texts(svg: &str) -> Vec<String> {
        svg.split("<text")
            .skip(1)
            .filter_map(|t| {
                let body = &t[t.find('>')? + 1..];
                Some(body[..body.find("</text>")?].trim().to_string())
            })
            .collect()
    }

    fn assert_well_formed(svg: &str) {
        assert!(svg.trim_start().starts_with("<svg"), "no <svg> root");
        assert!(svg.trim_end().ends_with("</svg>"), "SVG not closed");
        // A NaN or infinite coordinate would make the viewer drop the element.
        for bad in ["NaN", "inf"] {
            assert!(!svg.contains(bad), "SVG contains {bad}");
        }
    }

    #[test]
    fn realistic_run_has_labels_marks_and_bars() {
        let timeline = realistic();
        let svg = written("realistic", "blk-backend seed=42", &timeline);

        assert_well_formed(&svg);
        let texts = texts(&svg);
        for label in [
            "blk-backend seed=42",
            "seconds since start",
            "guest requests/s",
            "recovery time (ms)",
            "kills",
            "SIGKILL",
            "backend back",
        ] {
            assert!(
                texts.iter().any(|t| t == label),
                "no <text> {label:?} in {texts:?}"
            );
        }
        // One line per kill and per recovery, plus one legend sample each.
        assert_eq!(polylines_in(&svg, KILL_COLOR), timeline.kills.len() + 1);
        assert_eq!(
            polylines_in(&svg, RECOVERY_COLOR),
            timeline.recoveries.len() + 1
        );
        assert_eq!(polylines_in(&svg, THROUGHPUT_COLOR), 2);
        // 280, 300 and 450 ms in 23 ms bins: three distinct bins.
        assert_eq!(filled_rects_in(&svg, HIST_COLOR), 3);
        assert!(svg.contains("median 300 ms, max 450 ms"));
        assert!(!svg.contains("no throughput"));
    }

    #[test]
    fn empty_timeline_is_a_valid_svg_with_notes() {
        let svg = written("empty", "empty", &Timeline::default());

        assert_well_formed(&svg);
        let texts = texts(&svg);
        for label in [
            "no throughput: fewer than two usable progress samples",
            "no recoveries recorded",
            "seconds since start",
            "recovery time (ms)",
        ] {
            assert!(
                texts.iter().any(|t| t == label),
                "no <text> {label:?} in {texts:?}"
            );
        }
        assert_eq!(polylines_in(&svg, KILL_COLOR), 0);
        assert_eq!(filled_rects_in(&svg, HIST_COLOR), 0);
    }

    #[test]
    fn degenerate_inputs_render() {
        let cases = [
            Timeline {
                progress: vec![(1.0, 10)],
                ..Timeline::default()
            },
            Timeline {
                progress: vec![(2.0, 10), (2.0, 20), (2.0, 30)],
                kills: vec![2.0, 2.0],
                recoveries: vec![(2.0, 0), (2.0, 0)],
            },
            Timeline {
                progress: vec![(f64::NAN, 1), (f64::INFINITY, 2), (0.0, 0), (1.0, u64::MAX)],
                kills: vec![f64::NAN, f64::NEG_INFINITY, f64::MAX, -f64::MAX],
                recoveries: vec![(f64::NAN, u64::MAX), (f64::INFINITY, 0)],
            },
            Timeline {
                // Backwards in time and a counter that drops: both skipped.
                progress: vec![(5.0, 100), (4.0, 200), (6.0, 50), (7.0, 60)],
                kills: vec![-3.0, 1e11],
                recoveries: vec![(1e11 + 1.0, u64::MAX - 1), (1.0, 1)],
            },
            Timeline {
                // Tiny interval: a rate near f64 overflow.
                progress: vec![(0.0, 0), (1e-300, u64::MAX)],
                kills: vec![0.0; 1000],
                recoveries: vec![(0.0, 7); 1000],
            },
        ];
        for (i, timeline) in cases.iter().enumerate() {
            let svg = render("degenerate <&> \"title\"", timeline)
                .unwrap_or_else(|e| panic!("case {i}: {e}"));
            assert_well_formed(&svg);
            assert!(svg.contains("&lt;&amp;&gt;"), "case {i}: title not escaped");
        }
    }

    #[test]
    fn rates_skip_bad_intervals() {
        let r = rates(&[
            (0.0, 0),
            (0.5, 100),      // 200/s
            (0.5, 150),      // zero dt: skipped
            (0.25, 160),     // backwards: skipped
            (1.25, 100),     // count dropped: skipped
            (2.25, 400),     // 300/s
            (f64::NAN, 500), // NaN: skipped (both pairs)
            (3.25, 600),
        ]);
        assert_eq!(r, vec![(0.0, 0.5, 200.0), (1.25, 2.25, 300.0)]);
        assert!(rates(&[]).is_empty());
        assert!(rates(&[(1.0, 1)]).is_empty());
    }

    #[test]
    fn bin_width_is_about_twenty_bins_and_at_least_1ms() {
        assert_eq!(bin_width(0), 1);
        assert_eq!(bin_width(19), 1);
        assert_eq!(bin_width(400), 20);
        assert_eq!(bin_width(401), 21);
        assert!(u64::MAX / bin_width(u64::MAX) <= HIST_BINS);
    }

    #[test]
    fn unwritable_path_is_an_error_naming_it() {
        let path = Path::new("/nonexistent-dir-for-vmm-plot/out.svg");
        let e = write_svg(path, "x", &realistic()).expect_err("should fail");
        assert!(e.contains("/nonexistent-dir-for-vmm-plot/out.svg"), "{e}");
        assert!(!e.contains('\n'), "{e}");
    }

    #[test]
    fn tick_labels_stay_short() {
        assert_eq!(fmt_num(&0.0), "0");
        assert_eq!(fmt_num(&2.5), "2.5");
        assert_eq!(fmt_num(&5000.0), "5000");
        assert_eq!(fmt_num(&-0.0001), "-1.00e-4");
        assert_eq!(fmt_num(&1.8e19), "1.80e19");
        assert_eq!(fmt_num(&f64::NAN), "?");
    }
}
