//! The kernel's integer inference on any model its validation accepts.
//! The property lives in `kml_learn::robustness`, where unit tests replay the
//! kept inputs.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| kml_learn::robustness::check_integer_inference(data));
