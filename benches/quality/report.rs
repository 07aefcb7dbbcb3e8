//! Turning runs into numbers and markdown tables.

use std::fmt::Write as _;
use std::time::Duration;

use crate::sim::{Outcome, Run, Scenario};

/// What the report compares the recommended default against.
pub(crate) struct Targets<'a> {
    /// The balancer the crate recommends by default.
    pub(crate) default: &'a str,
    /// Balancers whose best p99 the default must come within 5% of.
    pub(crate) references: &'a [&'a str],
    /// The balancer whose fail-fast errors the default must cut to a tenth or less.
    pub(crate) baseline: &'a str,
}

/// One balancer's results in one scenario, over all seeds.
#[derive(Debug)]
pub(crate) struct Summary {
    pub(crate) balancer: &'static str,
    pub(crate) p50: Duration,
    pub(crate) p99: Duration,
    pub(crate) p999: Duration,
    pub(crate) p99_per_seed: Vec<Duration>,
    /// Error responses and timeouts.
    pub(crate) errors: u64,
    pub(crate) requests: u64,
    /// Share of calls each backend received.
    pub(crate) shares: Vec<f64>,
    /// Real (wall-clock) time the runs took.
    pub(crate) real: Duration,
}

impl Summary {
    /// Pools the outcomes of all seeds (as one longer run) for the percentiles.
    pub(crate) fn new(balancer: &'static str, runs: &[Run], real: Duration) -> Self {
        let mut pooled: Vec<Duration> = runs.iter().flat_map(latencies).collect();
        pooled.sort_unstable();
        let p99_per_seed = runs
            .iter()
            .map(|r| {
                let mut own = latencies(r);
                own.sort_unstable();
                percentile(&own, 0.99)
            })
            .collect();
        let calls: Vec<u64> = (0..runs[0].calls.len())
            .map(|i| runs.iter().map(|r| r.calls[i]).sum())
            .collect();
        let total_calls = calls.iter().sum::<u64>().max(1) as f64;
        Self {
            balancer,
            p50: percentile(&pooled, 0.5),
            p99: percentile(&pooled, 0.99),
            p999: percentile(&pooled, 0.999),
            p99_per_seed,
            errors: runs
                .iter()
                .flat_map(|r| &r.outcomes)
                .filter(|o| !matches!(o, Outcome::Ok(_)))
                .count() as u64,
            requests: runs.iter().map(|r| r.outcomes.len() as u64).sum(),
            shares: calls.iter().map(|&c| c as f64 / total_calls).collect(),
            real,
        }
    }
}

/// Latencies the client waited for: responses, and timeouts at the time waited. Fast errors
/// have no latency worth ranking; they count in `errors` only.
fn latencies(run: &Run) -> Vec<Duration> {
    run.outcomes
        .iter()
        .filter_map(|o| match *o {
            Outcome::Ok(latency) | Outcome::TimedOut(latency) => Some(latency),
            Outcome::Failed => None,
        })
        .collect()
}

/// Nearest-rank percentile of sorted samples.
fn percentile(sorted: &[Duration], q: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = (q * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// Milliseconds with precision that suits the size.
fn ms(d: Duration) -> String {
    let ms = d.as_secs_f64() * 1e3;
    match ms {
        ms if ms < 10.0 => format!("{ms:.2}"),
        ms if ms < 1000.0 => format!("{ms:.1}"),
        ms => format!("{ms:.0}"),
    }
}

/// The per-scenario table.
pub(crate) fn scenario_table(number: usize, scenario: &Scenario, results: &[Summary]) -> String {
    let mut out = format!(
        "### {number}. `{}`: {}\n\n\
         | balancer | p50 ms | p99 ms | p99.9 ms | p99 per seed | errors | calls per backend % |\n\
         |---|--:|--:|--:|---|--:|---|\n",
        scenario.name, scenario.about
    );
    for s in results {
        let per_seed: Vec<String> = s.p99_per_seed.iter().map(|&d| ms(d)).collect();
        let shares: Vec<String> = s
            .shares
            .iter()
            .map(|x| format!("{:.1}", x * 100.0))
            .collect();
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} | {} ({:.2}%) | {} |",
            s.balancer,
            ms(s.p50),
            ms(s.p99),
            ms(s.p999),
            per_seed.join(" / "),
            s.errors,
            s.errors as f64 * 100.0 / s.requests.max(1) as f64,
            shares.join(" / "),
        );
    }
    out
}

/// A latency figure of a summary (p99, p99.9).
type Metric = fn(&Summary) -> Duration;

/// The best (lowest) value of `metric` among the reference balancers present.
fn best_reference<'a>(
    results: &'a [Summary],
    targets: &Targets<'_>,
    metric: Metric,
) -> Option<&'a Summary> {
    results
        .iter()
        .filter(|s| targets.references.contains(&s.balancer))
        .min_by_key(|s| metric(s))
}

/// "p99 by scenario × balancer", each cell with its ratio to the best reference.
pub(crate) fn p99_summary(all: &[(Scenario, Vec<Summary>)], targets: &Targets<'_>) -> String {
    let names: Vec<&str> = all[0].1.iter().map(|s| s.balancer).collect();
    let mut out = format!(
        "## p99 by scenario × balancer\n\n\
         p99 in ms; in parentheses, the ratio to the best of the references ({}) in that \
         scenario.\n\n| scenario | {} | best reference |\n|---|{}---|\n",
        targets.references.join(", "),
        names.join(" | "),
        "--:|".repeat(names.len()),
    );
    for (scenario, results) in all {
        let best = best_reference(results, targets, |s| s.p99);
        let cells: Vec<String> = results
            .iter()
            .map(|s| match best {
                Some(b) => format!("{} ({:.2}×)", ms(s.p99), ratio(s.p99, b.p99)),
                None => ms(s.p99),
            })
            .collect();
        let best = best.map_or("–".to_string(), |b| {
            format!("{} {}", b.balancer, ms(b.p99))
        });
        let _ = writeln!(
            out,
            "| {} | {} | {best} |",
            scenario.name,
            cells.join(" | ")
        );
    }
    out
}

/// "errors by scenario × balancer", for the scenarios that have any.
pub(crate) fn error_summary(all: &[(Scenario, Vec<Summary>)]) -> String {
    let names: Vec<&str> = all[0].1.iter().map(|s| s.balancer).collect();
    let mut out = format!(
        "## Errors by scenario × balancer\n\n\
         Error responses plus client timeouts, summed over seeds.\n\n| scenario | {} |\n|---|{}\n",
        names.join(" | "),
        "--:|".repeat(names.len()),
    );
    for (scenario, results) in all.iter().filter(|(_, r)| r.iter().any(|s| s.errors > 0)) {
        let cells: Vec<String> = results.iter().map(|s| s.errors.to_string()).collect();
        let _ = writeln!(out, "| {} | {} |", scenario.name, cells.join(" | "));
    }
    out
}

/// The targets for the recommended default, scenario by scenario.
pub(crate) fn target_check(all: &[(Scenario, Vec<Summary>)], targets: &Targets<'_>) -> String {
    let mut out = format!(
        "## Target check for `{}`\n\n\
         Targets: p99 and p99.9 each within 5% of the best of {} in every scenario; errors in \
         `fail-fast` at most a tenth of `{}`'s. Reported, not asserted.\n\n",
        targets.default,
        targets.references.join(", "),
        targets.baseline,
    );
    if !all[0].1.iter().any(|s| s.balancer == targets.default) {
        let _ = writeln!(
            out,
            "`{}` is not in this run (set `QUALITY_DEFAULT` to one of the balancers above).",
            targets.default
        );
        return out;
    }
    out.push_str("| check | default | reference | ratio | met |\n|---|--:|---|--:|:-:|\n");
    let mut missed = Vec::new();
    let metrics: [(&str, Metric); 2] = [("p99", |s| s.p99), ("p99.9", |s| s.p999)];
    for (scenario, results) in all {
        let find = |name: &str| results.iter().find(|s| s.balancer == name);
        let ours = find(targets.default).expect("the default ran in every scenario");
        for (label, metric) in metrics {
            if let Some(best) = best_reference(results, targets, metric) {
                let r = ratio(metric(ours), metric(best));
                if r > 1.05 {
                    missed.push(format!("`{}` {label}", scenario.name));
                }
                let _ = writeln!(
                    out,
                    "| `{}` {label} | {} | {} {} | {r:.2} | {} |",
                    scenario.name,
                    ms(metric(ours)),
                    best.balancer,
                    ms(metric(best)),
                    mark(r <= 1.05),
                );
            }
        }
        if scenario.name == "fail-fast" {
            if let Some(base) = find(targets.baseline) {
                let r = ours.errors as f64 / base.errors.max(1) as f64;
                if r > 0.1 {
                    missed.push("`fail-fast` errors".to_string());
                }
                let _ = writeln!(
                    out,
                    "| `fail-fast` errors | {} | {} {} | {r:.3} | {} |",
                    ours.errors,
                    base.balancer,
                    base.errors,
                    mark(r <= 0.1),
                );
            }
        }
    }
    let _ = if missed.is_empty() {
        writeln!(out, "\nEvery target met.")
    } else {
        writeln!(out, "\nMissed: {}.", missed.join(", "))
    };
    out
}

/// Real time per balancer over the whole run, to extrapolate to more balancers.
pub(crate) fn timing(all: &[(Scenario, Vec<Summary>)]) -> String {
    let mut out = String::from("| balancer | real time s |\n|---|--:|\n");
    for (i, s) in all[0].1.iter().enumerate() {
        let total: Duration = all.iter().map(|(_, r)| r[i].real).sum();
        let _ = writeln!(out, "| {} | {:.1} |", s.balancer, total.as_secs_f64());
    }
    out
}

fn ratio(a: Duration, b: Duration) -> f64 {
    a.as_secs_f64() / b.as_secs_f64().max(f64::MIN_POSITIVE)
}

fn mark(met: bool) -> &'static str {
    if met {
        "✔"
    } else {
        "✘"
    }
}
