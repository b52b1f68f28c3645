//! SAFE: Selective Adapter FrEezing (paper Sec. 4.1-4.2), tensor-free part.
//!
//! * [`cka`]: importance score of an adapter, `1 - CKA(adapted activations, original activations)`
//!   (Eq. 2-3), computed from streamed moments so memory is O(d^2) instead of O(n^2).
//! * [`warmup`]: detects the end of the warm-up stage (footnote 1: every score changed by < 5%).
//! * [`schedule`]: the cubic threshold schedule of Eq. 4.
//! * [`controller`]: the per-epoch state machine that picks freezing candidates at `t_w` and
//!   freezes them as the threshold rises; serde-serializable so it survives checkpoints.
//!
//! Everything here is plain `f64` so it can be tested exactly; the trainer feeds it numbers.

pub mod cka;
pub mod controller;
pub mod schedule;
pub mod warmup;

pub use cka::{cka_from_norms, importance, linear_cka_gram, CkaNorms};
pub use controller::{
    EpochDecision, Measure, MonitorPoint, Phase, SafeConfig, SafeController, TauTarget,
};
pub use schedule::cubic_threshold;
pub use warmup::WarmupDetector;

/// Deserializers that read `null` back as `NaN`.
///
/// Why: `serde_json` writes non-finite `f64` as `null` but refuses to read `null` into `f64`, so a
/// checkpoint holding a NaN score (e.g. an adapter whose CKA was undefined) would save but never
/// load. Serialization needs no help; only these `deserialize_with` functions are used.
/// (`±inf` therefore comes back as `NaN`; both mean "no usable score" to the controller.)
pub(crate) mod nan_serde {
    use serde::{Deserialize, Deserializer};

    #[derive(Deserialize)]
    #[serde(transparent)]
    struct Nullable(Option<f64>);

    impl Nullable {
        fn get(self) -> f64 {
            self.0.unwrap_or(f64::NAN)
        }
    }

    pub fn vec<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<f64>, D::Error> {
        let v = Vec::<Nullable>::deserialize(d)?;
        Ok(v.into_iter().map(Nullable::get).collect())
    }

    pub fn opt_vec<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Vec<f64>>, D::Error> {
        let v = Option::<Vec<Nullable>>::deserialize(d)?;
        Ok(v.map(|v| v.into_iter().map(Nullable::get).collect()))
    }

    pub fn vec_vec<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<Vec<f64>>, D::Error> {
        let v = Vec::<Vec<Nullable>>::deserialize(d)?;
        Ok(v.into_iter()
            .map(|r| r.into_iter().map(Nullable::get).collect())
            .collect())
    }
}
