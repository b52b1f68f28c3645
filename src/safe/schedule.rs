//! Cubic threshold schedule of the freezing stage (paper Eq. 4, after Zhang et al., 2022).

/// Eq. 4, with 1-based epochs `t`:
/// `tau_t = 0` for `t < t_w`; `tau_T - tau_T (1 - (t - t_w)/(t_f - t_w))^3` for `t_w <= t < t_f`;
/// `tau_T` for `t >= t_f`.
///
/// Kept exact, so `tau_{t_w} = 0` and nothing can freeze at the epoch warm-up ends; freezing
/// starts at `t_w + 1`. The threshold rises fast first and flattens near `t_f`, freezing most
/// candidates early. If `t_f <= t_w` the ramp is empty and `tau_T` applies from `t_w` on.
pub fn cubic_threshold(t: usize, t_w: usize, t_f: usize, tau_final: f64) -> f64 {
    if t < t_w {
        0.0
    } else if t >= t_f {
        tau_final
    } else {
        let progress = (t - t_w) as f64 / (t_f - t_w) as f64;
        tau_final - tau_final * (1.0 - progress).powi(3)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_points() {
        let tau = 0.2;
        assert_eq!(cubic_threshold(0, 3, 7, tau), 0.0);
        assert_eq!(cubic_threshold(2, 3, 7, tau), 0.0);
        assert_eq!(cubic_threshold(3, 3, 7, tau), 0.0); // t = t_w
                                                        // Midpoint t = 5: (1 - 1/2)^3 = 1/8.
        assert!((cubic_threshold(5, 3, 7, tau) - tau * (1.0 - 0.125)).abs() < 1e-15);
        // t = 4: 1 - (3/4)^3 = 37/64.
        assert!((cubic_threshold(4, 3, 7, tau) - tau * 37.0 / 64.0).abs() < 1e-15);
        assert_eq!(cubic_threshold(7, 3, 7, tau), tau); // t = t_f
        assert_eq!(cubic_threshold(100, 3, 7, tau), tau);
    }

    #[test]
    fn monotone_non_decreasing() {
        for (t_w, t_f) in [(1, 2), (2, 10), (3, 4), (5, 30)] {
            let mut prev = f64::NEG_INFINITY;
            for t in 0..40 {
                let v = cubic_threshold(t, t_w, t_f, 0.3);
                assert!(v >= prev && (0.0..=0.3).contains(&v), "t={t} v={v}");
                prev = v;
            }
        }
    }

    #[test]
    fn empty_ramp() {
        assert_eq!(cubic_threshold(2, 3, 3, 0.5), 0.0);
        assert_eq!(cubic_threshold(3, 3, 3, 0.5), 0.5);
        assert_eq!(cubic_threshold(3, 3, 1, 0.5), 0.5);
        assert_eq!(cubic_threshold(9, 3, 1, 0.5), 0.5);
    }
}
