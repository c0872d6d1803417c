#![no_main]
// The check lives in kmsfs::fuzzing, shared with tests/fuzz_corpus.rs.
libfuzzer_sys::fuzz_target!(|data: &[u8]| kmsfs::fuzzing::intent(data));
