//! CLIP's byte-level BPE tokenizer, id-for-id with transformers' *slow* `CLIPTokenizer`, the
//! class diffusers loads for SD1/SD2/SDXL text encoders.
//!
//! The `tokenizers` crate does the byte-level BPE, but the text normalisation is done here in
//! plain Rust because the fast tokenizer's normaliser (NFC + collapse whitespace + per-char
//! lowercase) disagrees with the slow one on control/format chars, CJK ideographs and Greek final
//! sigma (see `tools/fixtures/tokenizer_ids.py`, which prints every fast/slow difference).
//! For the same reason a `tokenizer.json` next to vocab.json is deliberately ignored.

use std::collections::HashMap;
use std::io::Read;
use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};
use tokenizers::models::bpe::{Merges, Vocab, BPE};
use tokenizers::normalizers::BertNormalizer;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{AddedToken, NormalizedString, Normalizer, SplitDelimiterBehavior, Tokenizer};

const BOS: &str = "<|startoftext|>";
const EOS: &str = "<|endoftext|>";
/// CLIP keeps only this many merges: 512 byte tokens + merges + 2 specials = 49408 ids.
const NUM_MERGES: usize = 49152 - 256 - 2;
/// CLIP's word pattern. `(?i)` because transformers compiles it with re.IGNORECASE, which
/// (even on lowercased text) makes `'ſ` one piece like `'s`.
const PATTERN: &str =
    r"(?i)<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+";
/// OpenAI's merge list (from the open_clip_torch wheel), for checkpoints without a tokenizer folder.
static EMBEDDED_BPE: &[u8] =
    include_bytes!(concat!(env!("CARGO_MANIFEST_DIR"), "/assets/bpe_simple_vocab_16e6.txt.gz"));

pub struct ClipTokenizer {
    inner: Tokenizer,
    bos: u32,
    eos: u32,
}

impl ClipTokenizer {
    /// From a diffusers `tokenizer/` folder holding vocab.json + merges.txt.
    pub fn from_folder(dir: &Path) -> Result<Self> {
        let read = |name: &str| -> Result<String> {
            let path = dir.join(name);
            if !path.is_file() {
                bail!(
                    "{}: missing — a diffusers tokenizer folder needs vocab.json and merges.txt",
                    path.display()
                );
            }
            std::fs::read_to_string(&path).with_context(|| format!("{}: cannot read", path.display()))
        };
        let vocab: HashMap<String, u32> = serde_json::from_str(&read("vocab.json")?).with_context(|| {
            format!("{}: expected a JSON object of token → id", dir.join("vocab.json").display())
        })?;
        let merges = parse_merges(&read("merges.txt")?)
            .with_context(|| format!("{}: not a BPE merges file", dir.join("merges.txt").display()))?;
        Self::new(vocab.into_iter().collect(), merges)
            .with_context(|| format!("{}: vocab.json and merges.txt do not fit together", dir.display()))
    }

    /// The standard CLIP vocabulary compiled into the binary, for single-file checkpoints.
    pub fn embedded() -> Result<Self> {
        let (vocab, merges) = embedded_tables()?;
        let vocab = vocab.into_iter().zip(0u32..).collect();
        Self::new(vocab, merges).context("embedded CLIP vocabulary")
    }

    /// `[bos, first max_len-2 tokens, eos, pad...]`, exactly `max_len` long — what
    /// `tokenizer(text, padding="max_length", max_length=max_len, truncation=True)` returns.
    /// `pad_id` is eos (49407) for SD1's tokenizer and 0 ("!") for SD2 / SDXL's tokenizer_2.
    pub fn encode(&self, text: &str, max_len: usize, pad_id: u32) -> Result<Vec<u32>> {
        if max_len < 2 {
            bail!("max_len {max_len} leaves no room for the bos and eos tokens");
        }
        let raw = self.encode_raw(text)?;
        let mut ids = Vec::with_capacity(max_len);
        ids.push(self.bos);
        ids.extend(raw.iter().take(max_len - 2));
        ids.push(self.eos);
        ids.resize(max_len, pad_id);
        Ok(ids)
    }

    /// Token ids without bos/eos, padding or truncation (for long-prompt chunking).
    pub fn encode_raw(&self, text: &str) -> Result<Vec<u32>> {
        let encoding =
            self.inner.encode(normalize(text)?, false).map_err(|e| anyhow!("tokenizing {text:?}: {e}"))?;
        Ok(encoding.get_ids().to_vec())
    }

    /// The vocabulary's whole words of plain lowercase letters (tokens ending in `</w>`), sorted:
    /// each encodes as one token.
    pub fn words(&self) -> Vec<String> {
        let mut w: Vec<String> = (self.inner.get_vocab(false).into_keys())
            .filter_map(|t| t.strip_suffix("</w>").map(str::to_string))
            .filter(|w| w.len() >= 3 && w.bytes().all(|b| b.is_ascii_lowercase()))
            .collect();
        w.sort();
        w
    }

    pub fn bos_id(&self) -> u32 {
        self.bos
    }

    pub fn eos_id(&self) -> u32 {
        self.eos
    }

    fn new(vocab: Vocab, merges: Merges) -> Result<Self> {
        let id = |t: &str| vocab.get(t).copied().ok_or_else(|| anyhow!("vocabulary has no {t} token"));
        let (bos, eos) = (id(BOS)?, id(EOS)?);
        let bpe = BPE::builder()
            .vocab_and_merges(vocab, merges)
            .end_of_word_suffix("</w>".into())
            .unk_token(EOS.into()) // the slow tokenizer's unk; unreachable with a consistent vocab
            .build()
            .map_err(|e| anyhow!("building the BPE model: {e}"))?;
        // Keep the pattern's matches and drop the rest (= Python's re.findall), then map each
        // UTF-8 byte to GPT-2's printable stand-in char, as the vocab is written in those.
        let split = Split::new(SplitPattern::Regex(PATTERN.into()), SplitDelimiterBehavior::Removed, true)
            .map_err(|e| anyhow!("compiling CLIP's word pattern: {e}"))?;
        let byte_level = ByteLevel::new(false, false, false);
        let mut inner = Tokenizer::new(bpe);
        inner.with_pre_tokenizer(Some(Sequence::new(vec![split.into(), byte_level.into()])));
        // Specials typed in a prompt map to their ids, as in the slow tokenizer (whose BPE cache
        // is seeded with them); `normalize` has lowercased them already, so "<|ENDOFTEXT|>" too.
        inner
            .add_special_tokens([AddedToken::from(BOS, true), AddedToken::from(EOS, true)])
            .map_err(|e| anyhow!("adding CLIP's special tokens: {e}"))?;
        Ok(Self { inner, bos, eos })
    }
}

/// transformers' `BasicTokenizer(strip_accents=False, do_split_on_punc=False)`, which the slow
/// CLIPTokenizer (transformers 4.x) uses when ftfy is not installed. With ftfy, or under
/// transformers 5 (whose CLIPTokenizer is the fast one), only CJK/Cf/Greek edge cases differ.
fn normalize(text: &str) -> Result<String> {
    // Drop NUL, U+FFFD and control/format/private chars (Cc Cf Co: e.g. zero-width joiners, soft
    // hyphens), turn any whitespace into ' '. BertNormalizer's clean_text is the same rule.
    let mut cleaned = NormalizedString::from(text);
    BertNormalizer::new(true, false, Some(false), false)
        .normalize(&mut cleaned)
        .map_err(|e| anyhow!("normalizing {text:?}: {e}"))?;
    // Every CJK ideograph becomes its own word, so each gets its own `</w>`. (BertNormalizer
    // can do this too, but its table has a typo at U+2B820 that Python's does not.)
    let mut spaced = String::with_capacity(cleaned.get().len());
    for c in cleaned.get().chars() {
        if is_cjk_ideograph(c) {
            spaced.extend([' ', c, ' ']);
        } else {
            spaced.push(c);
        }
    }
    let mut nfc = NormalizedString::from(spaced);
    nfc.nfc();
    // Whole-string lowercase (not per char) so Greek final sigma becomes 'ς' as Python's does.
    let words: Vec<&str> = nfc.get().split_whitespace().collect();
    Ok(words.join(" ").to_lowercase())
}

/// The CJK blocks of transformers' `BasicTokenizer._is_chinese_char`.
fn is_cjk_ideograph(c: char) -> bool {
    matches!(c as u32,
        0x4E00..=0x9FFF | 0x3400..=0x4DBF | 0x20000..=0x2A6DF | 0x2A700..=0x2B73F
        | 0x2B740..=0x2B81F | 0x2B820..=0x2CEAF | 0xF900..=0xFAFF | 0x2F800..=0x2FA1F)
}

/// Merge pairs as the slow tokenizer reads merges.txt: skip the first (header) line, keep at most
/// NUM_MERGES lines. Also reads the raw gz text, whose first line is a header too.
fn parse_merges(text: &str) -> Result<Merges> {
    let lines = text.trim().split('\n').enumerate().skip(1).take(NUM_MERGES);
    lines
        .map(|(n, line)| match line.split_whitespace().collect::<Vec<_>>()[..] {
            [a, b] => Ok((a.to_string(), b.to_string())),
            _ => bail!("line {}: expected two space-separated tokens, got {line:?}", n + 1),
        })
        .collect()
}

/// OpenAI CLIP's `SimpleTokenizer` tables: vocab = 256 byte chars, the same with `</w>`, one
/// token per merge, then the two specials; ids are positions in that list.
fn embedded_tables() -> Result<(Vec<String>, Merges)> {
    let mut text = String::new();
    flate2::read::GzDecoder::new(EMBEDDED_BPE)
        .read_to_string(&mut text)
        .context("embedded CLIP vocabulary: not gzipped UTF-8 text")?;
    let merges = parse_merges(&text).context("embedded CLIP vocabulary")?;
    // GPT-2's bytes_to_unicode, in its dict order: printable Latin-1 bytes stand for themselves,
    // the 68 others (controls, space, NBSP, soft hyphen) become U+0100.. in byte order.
    let printable = |b: &u32| matches!(b, 0x21..=0x7E | 0xA1..=0xAC | 0xAE..=0xFF);
    let bytes: Vec<String> = (0..256u32)
        .filter(printable)
        .chain(256..256 + 68)
        .filter_map(char::from_u32)
        .map(String::from)
        .collect();
    let vocab = bytes
        .iter()
        .cloned()
        .chain(bytes.iter().map(|b| format!("{b}</w>")))
        .chain(merges.iter().map(|(a, b)| format!("{a}{b}")))
        .chain([BOS.to_string(), EOS.to_string()])
        .collect();
    Ok((vocab, merges))
}

#[cfg(test)]
mod tests {
    use super::*;

    const SD1_PAD: u32 = 49407;

    /// (prompt, 77 ids, raw ids) recorded from transformers' slow CLIPTokenizer by
    /// tools/fixtures/tokenizer_ids.py.
    fn fixture() -> Vec<(String, Vec<u32>, Vec<u32>)> {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/tokenizer_ids.json");
        let json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        let ids = |v: &serde_json::Value| -> Vec<u32> {
            v.as_array().unwrap().iter().map(|i| i.as_u64().unwrap() as u32).collect()
        };
        json.as_array()
            .unwrap()
            .iter()
            .map(|c| (c["prompt"].as_str().unwrap().to_string(), ids(&c["ids"]), ids(&c["raw"])))
            .collect()
    }

    /// A scratch folder unique to this test process and name, emptied first.
    fn scratch_dir(name: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("sdlora-tokenizer-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn a_photo_of_a_cat() {
        let tok = ClipTokenizer::embedded().unwrap();
        let mut expected = vec![49406, 320, 1125, 539, 320, 2368, 49407];
        expected.resize(77, SD1_PAD);
        assert_eq!(tok.encode("a photo of a cat", 77, SD1_PAD).unwrap(), expected);
        expected[7..].fill(0); // SD2 / SDXL tokenizer_2 pad with "!"
        assert_eq!(tok.encode("a photo of a cat", 77, 0).unwrap(), expected);
        assert_eq!((tok.bos_id(), tok.eos_id()), (49406, 49407));
        assert_eq!(tok.encode_raw("a photo of a cat").unwrap(), expected[1..6]);
    }

    #[test]
    fn matches_transformers_slow_tokenizer() {
        let tok = ClipTokenizer::embedded().unwrap();
        let cases = fixture();
        assert!(cases.len() >= 15);
        for (prompt, ids, raw) in &cases {
            assert_eq!(&tok.encode_raw(prompt).unwrap(), raw, "raw ids of {prompt:?}");
            assert_eq!(&tok.encode(prompt, 77, SD1_PAD).unwrap(), ids, "ids of {prompt:?}");
        }
        // The fixture's long prompt is truncated to bos + 75 tokens + eos.
        let (_, ids, raw) = cases.iter().find(|c| c.2.len() > 75).unwrap();
        assert_eq!(ids[1..76], raw[..75]);
        assert_eq!(ids[76], 49407);
    }

    #[test]
    fn from_folder_matches_embedded() {
        let dir = scratch_dir("folder");
        let (vocab, merges) = embedded_tables().unwrap();
        let vocab: serde_json::Map<String, serde_json::Value> =
            vocab.into_iter().zip(0u32..).map(|(t, i)| (t, i.into())).collect();
        std::fs::write(dir.join("vocab.json"), serde_json::to_string(&vocab).unwrap()).unwrap();
        let merges_txt: String = merges.iter().map(|(a, b)| format!("{a} {b}\n")).collect();
        std::fs::write(dir.join("merges.txt"), format!("#version: 0.2\n{merges_txt}")).unwrap();

        let (folder, embedded) =
            (ClipTokenizer::from_folder(&dir).unwrap(), ClipTokenizer::embedded().unwrap());
        assert_eq!((folder.bos_id(), folder.eos_id()), (49406, 49407));
        for (prompt, ids, _) in fixture() {
            assert_eq!(folder.encode(&prompt, 77, SD1_PAD).unwrap(), ids, "{prompt:?}");
            assert_eq!(folder.encode_raw(&prompt).unwrap(), embedded.encode_raw(&prompt).unwrap());
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn missing_vocab_json_names_the_path() {
        let dir = scratch_dir("missing");
        std::fs::write(dir.join("merges.txt"), "#version: 0.2\na b\n").unwrap();
        let err = ClipTokenizer::from_folder(&dir).err().expect("vocab.json is missing").to_string();
        assert!(err.contains(&dir.join("vocab.json").display().to_string()), "{err}");
        assert!(err.contains("needs vocab.json and merges.txt"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn short_max_len() {
        let tok = ClipTokenizer::embedded().unwrap();
        assert_eq!(tok.encode("a photo of a cat", 3, 0).unwrap(), [49406, 320, 49407]);
        assert!(tok.encode("a cat", 1, 0).is_err());
    }
}
