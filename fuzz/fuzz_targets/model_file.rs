//! The model-file loader (JSON parse, validation, quantised model validation).
//! The property lives in `kml_learn::robustness`, where unit tests replay the
//! kept inputs.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| kml_learn::robustness::check_model_file(data));
