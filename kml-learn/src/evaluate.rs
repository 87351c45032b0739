//! Evaluation of a model on a dataset, in both its forms: the float model and the
//! integer model exactly as the kernel runs it.

use kml_ebpf_common::{
    label::{jiffies_late, on_the_tick},
    RequestRecord,
};
use serde::{Deserialize, Serialize};

use crate::{
    dataset::{DataDescription, Dataset},
    float_model::FloatModel,
    metrics::{ClassificationMetrics, ConfusionMatrix, RegressionMetrics},
    quantize::QuantizedModel,
};

/// Scores of one model on one dataset.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Evaluation {
    pub data: DataDescription,
    /// Float model's verdicts.
    pub float: ClassificationMetrics,
    /// Integer model's verdicts (what the kernel decides).
    pub quantized: ClassificationMetrics,
    /// Regressions only: the predicted dispatch delay.
    pub float_regression: Option<RegressionMetrics>,
    pub quantized_regression: Option<RegressionMetrics>,
    /// Share of requests on which the two forms give the same verdict.
    pub agreement: f64,
    /// Area under the ROC curve of the integer model's margin (its ranking of the
    /// requests); `None` when the data holds one class only ("one class").
    #[serde(default)]
    pub quantized_auc: Option<f64>,
    /// The integer model's balanced accuracy at the best single threshold for this
    /// data, in hindsight ([`crate::metrics::best_balanced_accuracy`]): what its
    /// ranking is worth here once the threshold fits the workload; `None` for one
    /// class.
    #[serde(default)]
    pub quantized_best_balanced_accuracy: Option<f64>,
    /// The integer model on and off the tick band; `None` when no record carries
    /// the jiffies the band is judged by.
    #[serde(default)]
    pub tick_band: Option<TickBand>,
}

/// The integer model's verdicts split by the tick band
/// ([`kml_ebpf_common::label::on_the_tick`]: dispatched in the deadline's own jiffy
/// or the next). In the band the label turns on which side of one timer tick the
/// dispatch fell, which nothing known at insert can place: the share of the errors
/// made there, and the scores outside it, say how much of a model's shortfall is
/// the tick's.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TickBand {
    /// Share of the requests in the band.
    pub share: f64,
    /// Share of the integer model's wrong verdicts made in the band.
    pub error_share: f64,
    /// The integer model's verdicts in the band.
    pub inside: ConfusionMatrix,
    /// Its verdicts on the requests outside the band.
    pub outside: ClassificationMetrics,
}

/// A [`TickBand`] counted one verdict at a time (a run's records, batch by batch).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct TickBandCount {
    inside: ConfusionMatrix,
    outside: ConfusionMatrix,
    judged_by_jiffies: bool,
}

impl TickBandCount {
    /// One verdict (at risk or not) on the finished request `r`.
    pub fn add(&mut self, at_risk: bool, r: &RequestRecord) {
        self.judged_by_jiffies |= jiffies_late(r).is_some();
        let side = if on_the_tick(r) {
            &mut self.inside
        } else {
            &mut self.outside
        };
        side.add(at_risk, r.deadline_missed());
    }

    /// The band so far; `None` until a request carries the jiffies it is judged by.
    pub fn band(&self) -> Option<TickBand> {
        let (inside, outside) = (self.inside, self.outside);
        let errors = |c: &ConfusionMatrix| c.false_miss + c.false_met;
        let share = |n: u64, of: u64| if of == 0 { 0.0 } else { n as f64 / of as f64 };
        self.judged_by_jiffies.then(|| TickBand {
            share: share(inside.total(), inside.total() + outside.total()),
            error_share: share(errors(&inside), errors(&inside) + errors(&outside)),
            inside,
            outside: outside.summary(),
        })
    }
}

impl TickBand {
    /// The integer model's verdict (at risk or not) on each request, split by the
    /// band; `None` when no request carries the jiffies it is judged by.
    pub fn of<'a>(verdicts: impl IntoIterator<Item = (bool, &'a RequestRecord)>) -> Option<Self> {
        let mut count = TickBandCount::default();
        for (at_risk, r) in verdicts {
            count.add(at_risk, r);
        }
        count.band()
    }

    /// Balanced accuracy of a model right on every request outside the band and as
    /// good as this one in it: what sharpening the model's view of the queue can
    /// reach at best while the band stays as hard as it is for this model.
    pub fn ceiling(&self) -> f64 {
        let o = &self.outside.confusion;
        let mut c = self.inside;
        c.true_miss += o.actual_misses();
        c.true_met += o.actual_met();
        c.balanced_accuracy()
    }

    /// Only misses or only met deadlines outside the band: its score means nothing.
    pub fn outside_one_class(&self) -> bool {
        self.outside.confusion.one_class()
    }
}

impl Evaluation {
    /// The data held only misses or only met deadlines: no score means anything.
    pub fn one_class(&self) -> bool {
        self.quantized.confusion.one_class()
    }
}

pub fn evaluate(float: &FloatModel, quantized: &QuantizedModel, data: &Dataset) -> Evaluation {
    let mut float_cm = ConfusionMatrix::default();
    let mut quant_cm = ConfusionMatrix::default();
    let mut agree = 0u64;
    let (mut float_reg, mut quant_reg) = (Vec::new(), Vec::new());
    let mut margins = Vec::with_capacity(data.len());
    let mut band = TickBandCount::default();
    for (((x, missed), delay), r) in data
        .features()
        .iter()
        .zip(data.missed())
        .zip(data.delays_us())
        .zip(data.records())
    {
        let f = float.at_risk(x);
        let q = quantized.infer(x).at_risk;
        band.add(q, r);
        margins.push(quantized.margin(x) as f64);
        float_cm.add(f, missed);
        quant_cm.add(q, missed);
        agree += (f == q) as u64;
        if let Some(p) = float.predicted_delay_us(x) {
            float_reg.push((p, delay));
        }
        if let Some(p) = quantized.predicted_delay_us(x) {
            quant_reg.push((p, delay));
        }
    }
    let regression =
        |pairs: Vec<(f64, f64)>| (!pairs.is_empty()).then(|| RegressionMetrics::from_pairs(pairs));
    let labels: Vec<bool> = data.missed().collect();
    Evaluation {
        data: data.describe(),
        float: float_cm.summary(),
        quantized: quant_cm.summary(),
        float_regression: regression(float_reg),
        quantized_regression: regression(quant_reg),
        quantized_auc: crate::metrics::auc(&margins, &labels),
        quantized_best_balanced_accuracy: crate::metrics::best_balanced_accuracy(&margins, &labels),
        tick_band: band.band(),
        agreement: if data.is_empty() {
            1.0
        } else {
            agree as f64 / data.len() as f64
        },
    }
}

/// The band in words: `eval`'s last line, and `run`'s closing verdicts.
impl std::fmt::Display for TickBand {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "tick band (dispatched in the deadline's jiffy or the next): {:.1}% of requests, {:.1}% of the integer model's errors, {:.1}% accurate there; balanced accuracy outside it: ",
            100.0 * self.share,
            100.0 * self.error_share,
            100.0 * self.inside.accuracy(),
        )?;
        if self.outside_one_class() {
            write!(f, "one class")?;
        } else {
            write!(f, "{:.2}%", 100.0 * self.outside.balanced_accuracy)?;
        }
        write!(
            f,
            "; right on every request outside it: {:.2}%",
            100.0 * self.ceiling()
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A request dispatched `late` jiffies after its `fifo_time` (no jiffies: None).
    fn req(late: Option<i64>) -> RequestRecord {
        let (fifo, issue) = match late {
            Some(l) => (1_000, (1_000 + l) as u64),
            None => (0, 0),
        };
        RequestRecord {
            insert_ns: 100,
            issue_ns: 200,
            complete_ns: 300,
            deadline_ns: 1_000,
            insert_jiffies: 990,
            issue_jiffies: issue,
            fifo_time: fifo,
            ..Default::default()
        }
    }

    #[test]
    fn the_tick_band_takes_the_errors_made_within_a_tick_of_the_deadline() {
        let recs = [
            (true, req(Some(0))),   // in the band, met, flagged: wrong
            (false, req(Some(1))),  // in the band, missed by a jiffy, not flagged: wrong
            (true, req(Some(1))),   // in the band, missed, flagged: right
            (true, req(Some(3))),   // outside, missed, flagged: right
            (false, req(Some(-2))), // outside, met, not flagged: right
            (true, req(Some(-1))),  // outside, met, flagged: wrong
            (false, req(None)),     // no jiffies: outside, judged in ns (met): right
        ];
        let band = TickBand::of(recs.iter().map(|(v, r)| (*v, r))).unwrap();
        let mut count = TickBandCount::default();
        for (v, r) in &recs[..3] {
            count.add(*v, r);
        }
        let first = count;
        for (v, r) in &recs[3..] {
            count.add(*v, r);
        }
        assert_eq!(count.band(), Some(band));
        assert_ne!(first.band(), Some(band));
        assert_eq!(band.share, 3.0 / 7.0);
        assert_eq!(band.error_share, 2.0 / 3.0);
        assert_eq!(
            (
                band.inside.false_miss,
                band.inside.false_met,
                band.inside.true_miss
            ),
            (1, 1, 1)
        );
        let out = band.outside.confusion;
        assert_eq!(
            (out.true_miss, out.true_met, out.false_miss, out.false_met),
            (1, 2, 1, 0)
        );
        assert!(!band.outside_one_class());
        // Right outside, as it is in the band: misses 1 of 2 in the band + 1 outside
        // caught, met 0 of 1 in the band + 3 outside kept.
        assert!((band.ceiling() - (2.0 / 3.0 + 3.0 / 4.0) / 2.0).abs() < 1e-12);
        // Outside: misses all caught, 2 of 3 met kept.
        assert!((band.outside.balanced_accuracy - (1.0 + 2.0 / 3.0) / 2.0).abs() < 1e-12);
    }

    #[test]
    fn no_jiffies_no_band() {
        let recs = [(true, req(None)), (false, req(None))];
        assert_eq!(TickBand::of(recs.iter().map(|(v, r)| (*v, r))), None);
        assert_eq!(TickBand::of(std::iter::empty()), None);
        // Counted one at a time, as a run does: the same band.
        let mut count = TickBandCount::default();
        assert_eq!(count.band(), None);
        for (v, r) in &recs {
            count.add(*v, r);
        }
        assert_eq!(count.band(), None);
        // Only the band's side has both classes: the outside is one class.
        let recs = [
            (true, req(Some(1))),
            (false, req(Some(0))),
            (false, req(Some(-3))),
        ];
        let band = TickBand::of(recs.iter().map(|(v, r)| (*v, r))).unwrap();
        assert!(band.outside_one_class());
        assert_eq!(band.error_share, 0.0);
    }
}
