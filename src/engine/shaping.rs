//! Decoding controls applied to one step's logits on the host, before mistral.rs picks a
//! token: OpenAI's `logit_bias`, and seeded sampling. mistral.rs 0.8.1 draws every sequence's
//! random numbers from one engine-wide generator, so the same seed would give different text
//! depending on what else runs; a seeded request therefore samples here, from a uniform
//! number derived from (seed, position) alone, and hands mistral.rs a one-hot distribution
//! that its greedy step takes as it is. The same number serves a step that is sampled twice
//! (a grammar refusing the first pick), so the text depends on the seed and prompt alone.

use super::Sampling;
use super::json_close::Closer;

/// Temperatures below this are greedy (as in mistral.rs).
const GREEDY_BELOW: f64 = 1e-7;

/// Seeded sampling's parameters.
#[derive(Debug, Clone, PartialEq)]
pub struct Seeded {
    pub seed: u64,
    pub temperature: f64,
    pub top_p: Option<f64>,
    pub top_k: Option<usize>,
}

/// What one request needs done to its logits each step.
#[derive(Debug)]
pub struct Shaper {
    pub bias: Vec<(u32, f32)>,
    pub seeded: Option<Seeded>,
    /// JSON mode's closing as the budget runs out.
    pub closer: Option<Closer>,
}

impl Shaper {
    /// `None` when the request needs nothing beyond mistral.rs' own sampling.
    pub fn for_request(s: &Sampling, closer: Option<Closer>) -> Option<Shaper> {
        let seeded = match s.decoding.seed {
            Some(seed) if s.temperature >= GREEDY_BELOW => Some(Seeded {
                seed,
                temperature: s.temperature,
                top_p: s.top_p,
                top_k: s.top_k,
            }),
            _ => None,
        };
        (seeded.is_some() || !s.decoding.logit_bias.is_empty() || closer.is_some()).then(|| {
            Shaper {
                bias: s.decoding.logit_bias.clone(),
                seeded,
                closer,
            }
        })
    }

    /// Biases `logits`, steers a JSON answer closed when its budget runs out, and, when
    /// seeded, leaves only the sampled token possible (0 for it, -inf for every other).
    /// `context` is the sequence so far (prompt and generated tokens).
    pub fn apply(&self, logits: &mut [f32], context: &[u32]) {
        let position = context.len();
        for &(id, bias) in &self.bias {
            if let Some(l) = logits.get_mut(id as usize) {
                *l += bias;
            }
        }
        if let Some(c) = &self.closer {
            c.apply(logits, context);
        }
        if let Some(s) = &self.seeded
            && let Some(chosen) = pick(logits, s, position)
        {
            logits.fill(f32::NEG_INFINITY);
            logits[chosen] = 0.0;
        }
    }
}

/// SplitMix64's output function.
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// A uniform number in [0, 1) fixed by the seed and the position.
fn uniform(seed: u64, position: usize) -> f64 {
    let bits = mix(seed ^ mix(position as u64));
    (bits >> 11) as f64 / (1u64 << 53) as f64
}

/// Samples from softmax(logits / temperature) cut to the top-k, then to the smallest set
/// whose probability reaches top-p. `None` if no token has a finite logit.
fn pick(logits: &[f32], s: &Seeded, position: usize) -> Option<usize> {
    let max = logits
        .iter()
        .copied()
        .filter(|l| l.is_finite())
        .fold(f32::NEG_INFINITY, f32::max);
    if !max.is_finite() {
        return None;
    }
    let mut probs: Vec<(usize, f64)> = logits
        .iter()
        .enumerate()
        .filter(|(_, l)| l.is_finite())
        .map(|(i, &l)| (i, (f64::from(l - max) / s.temperature).exp()))
        .collect();
    // Likeliest first; equal probabilities by id, so the order never depends on the sort.
    probs.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    if let Some(k) = s.top_k.filter(|&k| k > 0) {
        probs.truncate(k);
    }
    let total: f64 = probs.iter().map(|p| p.1).sum();
    if let Some(p) = s.top_p.filter(|&p| p < 1.0) {
        let mut kept = 0.0;
        let keep = probs
            .iter()
            .take_while(|q| {
                let before = kept;
                kept += q.1 / total;
                before < p
            })
            .count();
        probs.truncate(keep.max(1));
    }
    let total: f64 = probs.iter().map(|p| p.1).sum();
    let target = uniform(s.seed, position) * total;
    let mut acc = 0.0;
    for &(id, p) in &probs {
        acc += p;
        if target < acc {
            return Some(id);
        }
    }
    probs.last().map(|p| p.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seeded(seed: u64) -> Seeded {
        Seeded {
            seed,
            temperature: 1.0,
            top_p: None,
            top_k: None,
        }
    }

    #[test]
    fn the_same_seed_and_position_pick_the_same_token() {
        let logits: Vec<f32> = (0..64).map(|i| (i % 7) as f32 * 0.3).collect();
        for pos in 0..50 {
            assert_eq!(
                pick(&logits, &seeded(7), pos),
                pick(&logits, &seeded(7), pos)
            );
        }
        let a: Vec<_> = (0..50).map(|p| pick(&logits, &seeded(7), p)).collect();
        let b: Vec<_> = (0..50).map(|p| pick(&logits, &seeded(8), p)).collect();
        assert_ne!(a, b, "another seed gives other picks");
    }

    #[test]
    fn picks_follow_the_softmax() {
        // Token 1 has e^2 ≈ 7.39 times token 0's probability; tokens 2.. are impossible.
        let mut logits = vec![0.0f32, 2.0];
        logits.extend([f32::NEG_INFINITY; 6]);
        let n = 20_000;
        let ones = (0..n)
            .filter(|&p| pick(&logits, &seeded(3), p) == Some(1))
            .count();
        let expected = 2f64.exp() / (1.0 + 2f64.exp());
        let got = ones as f64 / n as f64;
        assert!((got - expected).abs() < 0.02, "{got} vs {expected}");
    }

    #[test]
    fn top_k_and_top_p_cut_the_tail() {
        let logits = vec![3.0f32, 2.9, 0.0, -1.0];
        let mut s = seeded(1);
        s.top_k = Some(2);
        assert!((0..500).all(|p| matches!(pick(&logits, &s, p), Some(0 | 1))));
        s.top_k = None;
        s.top_p = Some(0.01);
        assert!((0..500).all(|p| pick(&logits, &s, p) == Some(0)));
    }

    #[test]
    fn bias_then_one_hot() {
        let shaper = Shaper {
            bias: vec![(2, 100.0), (99, 5.0)],
            seeded: Some(seeded(5)),
            closer: None,
        };
        let mut logits = vec![1.0f32, 1.0, 1.0, 1.0];
        shaper.apply(&mut logits, &[0; 10]);
        assert_eq!(logits[2], 0.0, "a +100 bias makes token 2 certain");
        assert!(logits.iter().filter(|l| l.is_finite()).count() == 1);
    }
}
