//! A short, seeded run of every fuzz target (`sdlora::fuzz`): its seeds, what the fuzzers found
//! (tests/fixtures/fuzz/), then mutations of the seeds.
//! The long coverage-guided runs are libFuzzer's (`fuzz/`, FUZZING.md); this keeps the targets
//! compiling, their seeds valid and the bugs they found fixed.
use rand::{Rng, SeedableRng};

/// Mutations in the style of libFuzzer's: bit flips, interesting bytes and integers, inserted,
/// deleted and duplicated ranges, truncation, splices with another seed, and numbers in text
/// (JSON offsets, TOML values) replaced by extreme ones.
fn mutate(rng: &mut impl Rng, input: &[u8], seeds: &[Vec<u8>]) -> Vec<u8> {
    let mut v = input.to_vec();
    for _ in 0..rng.random_range(1..=4) {
        let n = v.len();
        let at = if n == 0 { 0 } else { rng.random_range(0..n) };
        match rng.random_range(0..9) {
            0 if n > 0 => v[at] ^= 1 << rng.random_range(0..8),
            1 if n > 0 => {
                v[at] = *[0u8, 0xff, 0x7f, 0x80, b'"', b'{', b'[', b',', b'9', b'\n', b'.']
                    .get(rng.random_range(0..11))
                    .unwrap()
            }
            2 => v.insert(at, rng.random()),
            3 if n > 0 => {
                let end = (at + rng.random_range(1..=16)).min(n);
                v.drain(at..end);
            }
            4 => v.truncate(at),
            5 if n > 0 => {
                let end = (at + rng.random_range(1..=32)).min(n);
                let piece = v[at..end].to_vec();
                let to = rng.random_range(0..=n);
                v.splice(to..to, piece);
            }
            6 => {
                let other = &seeds[rng.random_range(0..seeds.len())];
                let from = if other.is_empty() { 0 } else { rng.random_range(0..other.len()) };
                v.truncate(at);
                v.extend_from_slice(&other[from..]);
            }
            7 if n >= 8 => {
                let x: u64 = *[0, 1, u64::MAX, 1 << 31, 1 << 40, n as u64, (n as u64).wrapping_sub(9)]
                    .get(rng.random_range(0..7))
                    .unwrap();
                let at = if rng.random_bool(0.5) { 0 } else { rng.random_range(0..=n - 8) };
                v[at..at + 8].copy_from_slice(&x.to_le_bytes());
            }
            _ => {
                if let Some(d) = v.iter().skip(at).position(|b| b.is_ascii_digit()).map(|p| p + at) {
                    let end = d + v[d..].iter().take_while(|b| b.is_ascii_digit()).count();
                    let x = [0u64, 1, 7, 255, 65536, u32::MAX as u64, u64::MAX][rng.random_range(0..7)];
                    v.splice(d..end, x.to_string().into_bytes());
                }
            }
        }
    }
    v
}

/// Inputs the fuzzers found crashing, kept in tests/fixtures/fuzz/<target>/ and replayed.
fn findings(target: &str) -> Vec<Vec<u8>> {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/fuzz").join(target);
    std::fs::read_dir(dir).map_or(vec![], |d| d.map(|e| std::fs::read(e.unwrap().path()).unwrap()).collect())
}

#[test]
fn every_fuzz_target_survives_its_seeds_and_their_mutations() {
    assert!(!findings("safetensors").is_empty(), "the findings are not where this test looks");
    for t in sdlora::fuzz::TARGETS {
        let seeds = (t.seeds)();
        assert!(!seeds.is_empty(), "{}: no seeds", t.name);
        let mut rng = rand::rngs::StdRng::seed_from_u64(0x5d10a);
        let mut inputs = seeds.clone();
        inputs.extend(findings(t.name));
        for i in 0..1500 {
            inputs.push(mutate(&mut rng, &seeds[i % seeds.len()], &seeds));
        }
        for input in &inputs {
            let r = std::panic::catch_unwind(|| (t.run)(input));
            assert!(r.is_ok(), "fuzz target {} panicked on {:?}", t.name, String::from_utf8_lossy(input));
        }
    }
}

/// The seeds are the real thing, not inputs every reader refuses at once.
#[test]
fn fuzz_seeds_are_accepted_by_their_readers() {
    for s in sdlora::fuzz::seeds::safetensors() {
        sdlora::model::header::check_bytes(&s, "seed").unwrap();
    }
    for s in sdlora::fuzz::seeds::lora() {
        let f = sdlora::lora::format::parse(&s, "seed").unwrap();
        let (_, entries) = sdlora::lora::ops::standard_entries(&f, "seed").unwrap();
        assert!(!entries.is_empty() || !f.embeddings.is_empty());
    }
    let toml = String::from_utf8(sdlora::fuzz::seeds::config()[0].clone()).unwrap();
    let args = sdlora::train::config::TrainArgs::default();
    let cfg = sdlora::train::config::TrainConfig::resolve_text(&args, Some(&toml)).unwrap();
    assert_eq!((cfg.steps, cfg.rank), (10, 8));
}

/// What reading the targets' code found: an alpha with no value (indexed an empty vector), down
/// and up weights whose ranks disagree.
#[test]
fn lora_modules_that_do_not_fit_together_are_refused() {
    use candle_core::{Device, Tensor};
    let k = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q";
    let t = |shape: &[usize]| Tensor::ones(shape, candle_core::DType::F32, &Device::Cpu).unwrap();
    let file = |alpha: &[usize], up: &[usize]| {
        let v = vec![
            (format!("{k}.lora_down.weight"), t(&[2, 320])),
            (format!("{k}.lora_up.weight"), t(up)),
            (format!("{k}.alpha"), t(alpha)),
        ];
        sdlora::model::weights::serialize(&v, &Default::default()).unwrap()
    };
    let err = |b: Vec<u8>| format!("{:#}", sdlora::lora::format::parse(&b, "x.safetensors").err().unwrap());
    assert!(err(file(&[0], &[320, 2])).contains("holds 0 values, an alpha is one"));
    assert!(err(file(&[], &[320, 3])).contains("do not make a low-rank pair"));
    assert!(sdlora::lora::format::parse(&file(&[], &[320, 2]), "x").is_ok());
}
