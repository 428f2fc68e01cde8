//! Results: one row per figure, one column per path, the tunnel's advantage over each
//! peer, the budgets, printed as a table and written as JSON.

use std::collections::BTreeMap;
use std::fmt::Write;

use serde::Serialize;

#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Better {
    Higher,
    Lower,
}

#[derive(Debug, Clone, Serialize)]
pub struct Row {
    pub figure: String,
    pub unit: String,
    pub better: Better,
    /// Path name → value (the median of its rounds); `None` when the path could not
    /// be measured.
    pub values: BTreeMap<String, Option<f64>>,
    /// Path name → the value of each round, in the order measured (empty for a
    /// figure measured once).
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub rounds: BTreeMap<String, Vec<f64>>,
    /// For each tunnel path, its advantage over each other path: above 1 is better.
    pub advantage: BTreeMap<String, BTreeMap<String, f64>>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Budget {
    pub goal: String,
    pub measured: String,
    pub met: Option<bool>,
}

#[derive(Debug, Default, Serialize)]
pub struct Report {
    pub machine: BTreeMap<String, String>,
    pub quick: bool,
    pub paths: Vec<String>,
    /// Paths that could not be measured, and why.
    pub missing: BTreeMap<String, String>,
    pub rows: Vec<Row>,
    /// Figures of the tunnel alone (preload costs, memory), name → value with its unit.
    pub tunnel_only: BTreeMap<String, (f64, String)>,
    pub budgets: Vec<Budget>,
}

pub const TUNNEL_PATHS: [&str; 2] = ["tunnel-run", "tunnel forward"];

impl Report {
    pub fn add(
        &mut self,
        figure: &str,
        unit: &str,
        better: Better,
        values: BTreeMap<String, Option<f64>>,
    ) {
        let mut advantage = BTreeMap::new();
        for ours in TUNNEL_PATHS {
            let Some(Some(mine)) = values.get(ours) else {
                continue;
            };
            let mut against = BTreeMap::new();
            for (peer, value) in &values {
                if TUNNEL_PATHS.contains(&peer.as_str()) {
                    continue;
                }
                if let Some(theirs) = value.filter(|v| *v > 0.0) {
                    let ratio = match better {
                        Better::Higher => mine / theirs,
                        Better::Lower => theirs / mine,
                    };
                    against.insert(peer.clone(), ratio);
                }
            }
            advantage.insert(ours.to_string(), against);
        }
        self.rows.push(Row {
            figure: figure.to_string(),
            unit: unit.to_string(),
            better,
            values,
            rounds: BTreeMap::new(),
            advantage,
        });
    }

    /// Adds a figure measured in several rounds: each path's value is the median of
    /// the rounds it completed (a round that failed leaves it out); a path that failed
    /// every round has none.
    pub fn add_rounds(
        &mut self,
        figure: &str,
        unit: &str,
        better: Better,
        rounds: BTreeMap<String, Vec<Option<f64>>>,
    ) {
        let measured: BTreeMap<String, Vec<f64>> = rounds
            .into_iter()
            .map(|(path, values)| (path, values.into_iter().flatten().collect()))
            .collect();
        let values = measured
            .iter()
            .map(|(path, values)| (path.clone(), median(values)))
            .collect();
        self.add(figure, unit, better, values);
        if let Some(row) = self.rows.last_mut() {
            row.rounds = measured.into_iter().filter(|(_, v)| v.len() > 1).collect();
        }
    }

    pub fn value(&self, figure: &str, path: &str) -> Option<f64> {
        self.rows
            .iter()
            .find(|r| r.figure == figure)
            .and_then(|r| r.values.get(path).copied().flatten())
    }

    pub fn budget(&mut self, goal: &str, measured: String, met: Option<bool>) {
        self.budgets.push(Budget {
            goal: goal.to_string(),
            measured,
            met,
        });
    }

    /// The report as a Markdown table (the README carries it).
    pub fn table(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "machine: {}",
            self.machine
                .iter()
                .map(|(k, v)| format!("{k} {v}"))
                .collect::<Vec<_>>()
                .join(", ")
        );
        let _ = writeln!(
            out,
            "mode: {}\n",
            if self.quick { "--quick" } else { "full" }
        );
        let _ = write!(out, "| figure | unit |");
        for p in &self.paths {
            let _ = write!(out, " {p} |");
        }
        let _ = writeln!(out, " tunnel-run's advantage |");
        let _ = write!(out, "|---|---|");
        for _ in &self.paths {
            let _ = write!(out, "---:|");
        }
        let _ = writeln!(out, "---|");
        for row in &self.rows {
            let _ = write!(
                out,
                "| {} | {} ({} is better) |",
                row.figure,
                row.unit,
                match row.better {
                    Better::Higher => "higher",
                    Better::Lower => "lower",
                }
            );
            for p in &self.paths {
                let cell = match row.values.get(p) {
                    Some(Some(v)) => format_value(*v),
                    Some(None) => "failed".into(),
                    None if self.missing.contains_key(p) => "missing".into(),
                    None => "–".into(),
                };
                let _ = write!(out, " {cell} |");
            }
            let advantage = row
                .advantage
                .get("tunnel-run")
                .map(|a| {
                    a.iter()
                        .map(|(peer, r)| format!("{r:.2}× {peer}"))
                        .collect::<Vec<_>>()
                        .join(", ")
                })
                .unwrap_or_default();
            let _ = writeln!(out, " {advantage} |");
        }
        if !self.tunnel_only.is_empty() {
            let _ = writeln!(out, "\n| tunnel alone | value |\n|---|---:|");
            for (name, (value, unit)) in &self.tunnel_only {
                let _ = writeln!(out, "| {name} | {} {unit} |", format_value(*value));
            }
        }
        if !self.missing.is_empty() {
            let _ = writeln!(out, "\nnot measured:");
            for (path, why) in &self.missing {
                let _ = writeln!(out, "- {path}: {why}");
            }
        }
        let _ = writeln!(out, "\n| budget | measured | met |\n|---|---|---|");
        for b in &self.budgets {
            let met = match b.met {
                Some(true) => "yes",
                Some(false) => "**no**",
                None => "not measured",
            };
            let _ = writeln!(out, "| {} | {} | {met} |", b.goal, b.measured);
        }
        out
    }
}

/// The middle value (the mean of the middle two for an even count).
pub fn median(values: &[f64]) -> Option<f64> {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let mid = sorted.len() / 2;
    match sorted.len() {
        0 => None,
        n if n % 2 == 1 => Some(sorted[mid]),
        _ => Some((sorted[mid - 1] + sorted[mid]) / 2.0),
    }
}

fn format_value(v: f64) -> String {
    if v >= 100.0 {
        format!("{v:.0}")
    } else if v >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn advantage_is_above_one_when_the_tunnel_is_better() {
        let mut report = Report::default();
        let values = |tunnel: f64, peer: f64| {
            BTreeMap::from([
                ("tunnel-run".to_string(), Some(tunnel)),
                ("ssh -L".to_string(), Some(peer)),
                ("socat".to_string(), None),
            ])
        };
        report.add("throughput", "Mbit/s", Better::Higher, values(300.0, 100.0));
        report.add("latency", "µs", Better::Lower, values(50.0, 100.0));
        for row in &report.rows {
            let against = &row.advantage["tunnel-run"];
            assert!(
                (against["ssh -L"]
                    - if row.better == Better::Higher {
                        3.0
                    } else {
                        2.0
                    })
                .abs()
                    < 1e-9
            );
            assert!(
                !against.contains_key("socat"),
                "an unmeasured peer has no ratio"
            );
        }
        assert!(report.table().contains("3.00× ssh -L"));
    }

    #[test]
    fn rounds_report_their_median_and_keep_every_value() {
        let mut report = Report::default();
        report.add_rounds(
            "throughput",
            "Mbit/s",
            Better::Higher,
            BTreeMap::from([
                (
                    "tunnel-run".to_string(),
                    vec![Some(5.0), Some(1.0), Some(3.0)],
                ),
                ("ssh -L".to_string(), vec![Some(2.0), None, Some(4.0)]),
                ("socat".to_string(), vec![None, None, None]),
            ]),
        );
        let row = &report.rows[0];
        assert_eq!(row.values["tunnel-run"], Some(3.0));
        assert_eq!(
            row.values["ssh -L"],
            Some(3.0),
            "a failed round is left out"
        );
        assert_eq!(row.values["socat"], None, "every round failed");
        assert_eq!(row.rounds["tunnel-run"], vec![5.0, 1.0, 3.0]);
        assert_eq!(row.advantage["tunnel-run"]["ssh -L"], 1.0);
        assert_eq!(median(&[]), None);
        assert_eq!(median(&[4.0, 1.0]), Some(2.5));
    }
}
