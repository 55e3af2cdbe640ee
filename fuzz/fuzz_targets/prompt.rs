#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| sdlora::fuzz::prompt(data));
