//! The learn stage: from live records to a better model.
//!
//! [`online`] decides (a pure state machine, unit-tested: when to retrain, whether a
//! candidate replaces the active model, probation and rollback, drift);
//! [`candidate`] trains and scores a candidate off the run loop; [`models`] finds
//! the model files the agent can start from. The serving model's threshold is
//! calibrated live by `kml_learn::calibrate::LiveCalibration`.

pub mod candidate;
pub mod models;
pub mod online;
