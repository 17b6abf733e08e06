//! Staged rollouts: a manifest may ask that only a percentage of hosts take
//! its image. Each host decides alone, from a stable hash of its machine
//! identity and the image's sha256, so the same hosts stay in the wave as the
//! percentage grows (the threshold only rises), each image picks a fresh,
//! evenly spread set of canaries, and no coordination service is needed.

use crate::digest::Sha256Digest;

/// The host's bucket for this image, 0..10000 (hundredths of a percent).
pub fn bucket(machine_id: &str, image: &Sha256Digest) -> u32 {
    let mut input = Vec::with_capacity(machine_id.len() + 1 + 32);
    input.extend_from_slice(machine_id.trim().as_bytes());
    input.push(0);
    input.extend_from_slice(&image.0);
    let d = Sha256Digest::of_bytes(&input);
    (u64::from_le_bytes(d.0[..8].try_into().expect("8 bytes")) % 10_000) as u32
}

/// Whether the host is in a wave of `percent` (0..=100) for this image.
pub fn in_wave(machine_id: &str, image: &Sha256Digest, percent: u8) -> bool {
    bucket(machine_id, image) < u32::from(percent.min(100)) * 100
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `n` identities shaped like systemd machine-ids (32 random hex digits).
    fn ids_n(n: u32) -> Vec<String> {
        // The first 32 hex digits of a digest (formatted as one number: quicker in a debug build).
        (0..n)
            .map(|i| {
                let d = Sha256Digest::of_bytes(format!("host-{i}").as_bytes());
                format!("{:032x}", u128::from_be_bytes(d.0[..16].try_into().unwrap()))
            })
            .collect()
    }

    fn ids() -> Vec<String> {
        ids_n(10_000)
    }

    /// Each host decides independently, so over n hosts the share is binomial:
    /// its standard deviation is sqrt(p(1-p)/n) (0.5 points at 50% over
    /// 10,000 hosts, 0.1 at 1%). The bound is 4 standard deviations computed
    /// for each percentage (18 shares are checked, so 3 would be crossed by
    /// chance a few times in a hundred samples; this fixed one crosses it at
    /// 5%: 5.66 against 5 ± 0.65), so a 1% wave that selects nobody (10
    /// deviations off) fails as surely as a biased 50% one; at 0% and 100% it
    /// is exact.
    ///
    /// `wave(percent)` says, for each host, whether it is in that wave.
    fn check_shares(n: usize, wave: impl Fn(u8) -> Vec<bool>) {
        let mut previous: Vec<bool> = vec![false; n];
        for percent in [0u8, 1, 5, 10, 25, 50, 75, 99, 100] {
            let now = wave(percent);
            assert_eq!(now.len(), n);
            let share = now.iter().filter(|&&b| b).count() as f64 / n as f64 * 100.0;
            let p = f64::from(percent) / 100.0;
            let tolerance = 4.0 * (p * (1.0 - p) / n as f64).sqrt() * 100.0;
            assert!(
                (share - percent as f64).abs() <= tolerance,
                "{percent}%: {share:.3}% of {n} hosts in the wave (allowed: {percent} ± {tolerance:.3})"
            );
            for (i, (&was, &is)) in previous.iter().zip(&now).enumerate() {
                assert!(!was || is, "host {i} left the wave when it grew to {percent}%");
            }
            previous = now;
        }
        assert!(previous.iter().all(|&b| b), "100% must include everyone");
    }

    #[test]
    fn shares_are_even_and_waves_only_grow() {
        let image = Sha256Digest::of_bytes(b"image v7");
        let ids = ids();
        check_shares(ids.len(), |percent| ids.iter().map(|id| in_wave(id, &image, percent)).collect());
        // The tighter bound of 200,000 hosts, on each host's bucket computed
        // once (in_wave is the comparison checked above).
        let buckets: Vec<u32> = ids_n(200_000).iter().map(|id| bucket(id, &image)).collect();
        check_shares(buckets.len(), |percent| buckets.iter().map(|&b| b < u32::from(percent) * 100).collect());
    }

    #[test]
    fn each_image_picks_other_canaries() {
        let ids = ids();
        let (a, b) = (Sha256Digest::of_bytes(b"a"), Sha256Digest::of_bytes(b"b"));
        let both = ids.iter().filter(|id| in_wave(id, &a, 10) && in_wave(id, &b, 10)).count();
        // Independent 10% waves overlap in about 1% of hosts.
        assert!((50..=200).contains(&both), "{both} hosts in both waves");
        assert_eq!(bucket(" abc\n", &a), bucket("abc", &a), "machine-id whitespace is ignored");
    }
}
