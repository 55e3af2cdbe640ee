//! The order of training: every random choice is a pure function of (seed, step), so a resumed
//! run draws exactly what the uninterrupted run would have.
use crate::data::buckets::Bucket;
use crate::data::prepare::Sample;
use candle_core::{Device, Result, Tensor};
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};

pub type StepRng = rand::rngs::StdRng;

/// A generator seeded by (seed, purpose, index).
pub fn rng_for(seed: u64, purpose: &str, index: u64) -> StepRng {
    use std::hash::{Hash, Hasher};
    // DefaultHasher is SipHash-1-3 with fixed keys: stable for a given Rust toolchain.
    let mut h = std::collections::hash_map::DefaultHasher::new();
    (seed, purpose, index).hash(&mut h);
    StepRng::seed_from_u64(h.finish())
}

/// Standard-normal tensor from `rng` (Box–Muller, f32).
pub fn randn(rng: &mut impl Rng, shape: &[usize], device: &Device) -> Result<Tensor> {
    let n: usize = shape.iter().product();
    let mut v = Vec::with_capacity(n + 1);
    while v.len() < n {
        let (u1, u2): (f64, f64) = (rng.random::<f64>().max(1e-300), rng.random());
        let r = (-2.0 * u1.ln()).sqrt();
        v.push((r * (std::f64::consts::TAU * u2).cos()) as f32);
        v.push((r * (std::f64::consts::TAU * u2).sin()) as f32);
    }
    v.truncate(n);
    Tensor::from_vec(v, shape, device)
}

/// Batches of sample indices for one epoch: sample i `keys[i].1` times, shuffled, grouped by
/// bucket `keys[i].0` (a batch never mixes buckets), batches shuffled.
pub fn epoch_batches(keys: &[(Bucket, usize)], batch: usize, seed: u64, epoch: u64) -> Vec<Vec<usize>> {
    let mut rng = rng_for(seed, "epoch", epoch);
    let mut order: Vec<usize> =
        keys.iter().enumerate().flat_map(|(i, k)| std::iter::repeat_n(i, k.1)).collect();
    order.shuffle(&mut rng);
    let mut buckets: Vec<(Bucket, Vec<usize>)> = vec![];
    for i in order {
        let b = keys[i].0;
        match buckets.iter_mut().find(|(k, _)| *k == b) {
            Some((_, v)) => v.push(i),
            None => buckets.push((b, vec![i])),
        }
    }
    let mut out: Vec<Vec<usize>> = buckets
        .into_iter()
        .flat_map(|(_, v)| v.chunks(batch).map(|c| c.to_vec()).collect::<Vec<_>>())
        .collect();
    out.shuffle(&mut rng);
    out
}

/// Walks epochs lazily: the `k`-th micro-batch of the run.
pub struct BatchOrder {
    keys: Vec<(Bucket, usize)>,
    batch: usize,
    seed: u64,
    epochs: Vec<Vec<Vec<usize>>>,
}

impl BatchOrder {
    /// `repeats[item]` of each sample's source image.
    pub fn new(samples: &[Sample], repeats: &[usize], batch: usize, seed: u64) -> Self {
        let keys = samples.iter().map(|s| (s.bucket, repeats[s.item])).collect();
        Self { keys, batch, seed, epochs: vec![] }
    }

    /// Micro-batches in an epoch (the same in every epoch: the buckets' sizes do not change).
    pub fn epoch_len(&mut self) -> usize {
        self.get(0);
        self.epochs[0].len()
    }

    pub fn get(&mut self, mut k: usize) -> (usize, Vec<usize>) {
        let mut e = 0;
        loop {
            while self.epochs.len() <= e {
                let ep = self.epochs.len() as u64;
                self.epochs.push(epoch_batches(&self.keys, self.batch, self.seed, ep));
            }
            let n = self.epochs[e].len();
            if k < n {
                return (e, self.epochs[e][k].clone());
            }
            k -= n;
            e += 1;
        }
    }
}

/// Caption augmentation: dropout to "", comma-tag shuffle keeping the first `keep` tags.
pub fn augment_caption(
    caption: &str,
    rng: &mut impl Rng,
    dropout: f64,
    shuffle: bool,
    keep: usize,
) -> String {
    if dropout > 0.0 && rng.random::<f64>() < dropout {
        return String::new();
    }
    if !shuffle {
        return caption.to_string();
    }
    let mut tags: Vec<&str> = caption.split(',').map(str::trim).filter(|t| !t.is_empty()).collect();
    let k = keep.min(tags.len());
    tags[k..].shuffle(rng);
    tags.join(", ")
}

/// `caption` with each whole-word `trigger` replaced by `class` (differential output
/// preservation), or None when the trigger is not in it. Tags left empty ("…, , …") are dropped,
/// so taking a trailing tag out leaves no dangling comma for the text encoder to read.
pub fn replace_trigger(caption: &str, trigger: &str, class: &str) -> Option<String> {
    let word = |c: char| c.is_alphanumeric() || c == '_';
    let (mut out, mut last, mut found) = (String::new(), 0, false);
    for (at, m) in caption.match_indices(trigger.trim()) {
        let end = at + m.len();
        let alone = !caption[..at].chars().next_back().is_some_and(word)
            && !caption[end..].chars().next().is_some_and(word);
        if alone && at >= last {
            out.push_str(&caption[last..at]);
            out.push_str(class);
            last = end;
            found = true;
        }
    }
    out.push_str(&caption[last..]);
    if !found {
        return None;
    }
    let tags: Vec<String> = out
        .split(',')
        .map(|t| t.split_whitespace().collect::<Vec<_>>().join(" "))
        .filter(|t| !t.is_empty())
        .collect();
    Some(tags.join(", "))
}

/// The preservation caption of `caption` (`--dop-trigger`): the trigger replaced by one of the
/// `|`-separated alternatives of `classes`, drawn from `rng` when there are several.
pub fn dop_caption(caption: &str, trigger: &str, classes: &str, rng: &mut impl Rng) -> Option<String> {
    let alternatives: Vec<&str> = classes.split('|').collect();
    let class = match alternatives.len() {
        1 => alternatives[0],
        k => alternatives[rng.random_range(0..k)],
    };
    replace_trigger(caption, trigger, class)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trigger_is_replaced_as_a_whole_word_and_empty_tags_go() {
        let r = |c, t, k| replace_trigger(c, t, k);
        assert_eq!(
            r("a red ring on a blue background, checkered", "checkered", ""),
            Some("a red ring on a blue background".into())
        );
        assert_eq!(r("photo of sks dog, grass", "sks dog", "dog"), Some("photo of dog, grass".into()));
        assert_eq!(r("sks, sks dog", "sks", "a"), Some("a, a dog".into()));
        // inside other words it is left alone
        assert_eq!(r("a catalog of cats", "cat", "dog"), None);
        assert_eq!(r("cat, catalog", "cat", ""), Some("catalog".into()));
        assert_eq!(r("", "cat", "dog"), None);
        let mut rng = rng_for(1, "t", 0);
        let c = "a red ring, checkered";
        let drawn: std::collections::BTreeSet<String> =
            (0..50).filter_map(|_| dop_caption(c, "checkered", "|striped|dotted", &mut rng)).collect();
        let want = ["a red ring", "a red ring, dotted", "a red ring, striped"];
        assert_eq!(drawn.iter().map(String::as_str).collect::<Vec<_>>(), want);
        assert_eq!(dop_caption(c, "checkered", "dotted", &mut rng).as_deref(), Some(want[1]));
    }

    #[test]
    fn tag_shuffle_keeps_leading_tags_and_all_tags() {
        let mut rng = rng_for(1, "t", 0);
        let c = "sks dog, red collar, grass, sunny, park";
        let mut seen_change = false;
        for _ in 0..20 {
            let s = augment_caption(c, &mut rng, 0.0, true, 1);
            assert!(s.starts_with("sks dog, "));
            let mut a: Vec<&str> = s.split(", ").collect();
            let mut b: Vec<&str> = c.split(", ").collect();
            seen_change |= a != b;
            a.sort();
            b.sort();
            assert_eq!(a, b);
        }
        assert!(seen_change);
        assert_eq!(augment_caption(c, &mut rng, 1.0, true, 1), "");
    }
}
