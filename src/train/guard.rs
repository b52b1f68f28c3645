//! Stops a run that has diverged: a non-finite training loss ends it with an error at once, before
//! its optimizer step, so the output folder keeps the last good checkpoint and best adapter (the
//! writers refuse NaN tensors too: `io::peft::save`, `checkpoint::save`).

use anyhow::Result;

/// An error when a micro-batch's `loss` is NaN or infinite, naming the epoch and the optimizer
/// step (both 1-based).
pub fn ensure_finite_loss(loss: f64, epoch: usize, step: usize) -> Result<()> {
    anyhow::ensure!(
        loss.is_finite(),
        "training diverged: the loss is {loss} at epoch {epoch}, step {step}; the run stopped \
         there, keeping the last good checkpoint and best adapter (try a lower --lr, or \
         --resume with one)"
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_finite_losses_pass() {
        for ok in [0.0, 1e30, -3.5] {
            ensure_finite_loss(ok, 1, 1).unwrap();
        }
        for (bad, shown) in [
            (f64::NAN, "NaN"),
            (f64::INFINITY, "inf"),
            (f64::NEG_INFINITY, "-inf"),
        ] {
            let e = ensure_finite_loss(bad, 2, 5).unwrap_err().to_string();
            assert!(
                e.contains(&format!("loss is {shown} ")) && e.contains("epoch 2, step 5"),
                "{e}"
            );
        }
    }
}
