//! Evaluation of a model on a dataset, in both its forms: the float model and the
//! integer model exactly as the kernel runs it.

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
}

impl Evaluation {
    /// The data held only misses or only met deadlines: no score means anything.
    pub fn one_class(&self) -> bool {
        let c = &self.quantized.confusion;
        c.actual_misses() == 0 || c.actual_met() == 0
    }
}

pub fn evaluate(float: &FloatModel, quantized: &QuantizedModel, data: &Dataset) -> Evaluation {
    let mut float_cm = ConfusionMatrix::default();
    let mut quant_cm = ConfusionMatrix::default();
    let mut agree = 0u64;
    let (mut float_reg, mut quant_reg) = (Vec::new(), Vec::new());
    let mut margins = Vec::with_capacity(data.len());
    for ((x, missed), delay) in data
        .features()
        .iter()
        .zip(data.missed())
        .zip(data.delays_us())
    {
        let f = float.at_risk(x);
        let q = quantized.infer(x).at_risk;
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
    Evaluation {
        data: data.describe(),
        float: float_cm.summary(),
        quantized: quant_cm.summary(),
        float_regression: regression(float_reg),
        quantized_regression: regression(quant_reg),
        quantized_auc: crate::metrics::auc(&margins, &data.missed().collect::<Vec<_>>()),
        agreement: if data.is_empty() {
            1.0
        } else {
            agree as f64 / data.len() as f64
        },
    }
}
