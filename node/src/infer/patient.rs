//! Waiting out a step that lacks answers: when some token of a step keeps fewer than `k_min` of its top-k
//! experts (the others got no answer, [`mana_kernels::KernelError::TooFewExperts`]), the client says so,
//! pauses (100 ms, doubling up to 2 s) and runs the step again, since the model left its cache as it was
//! before the step. It gives up, with that error, once the session's wait ([`super::InferConfig::wait`])
//! has passed since the step first stalled. Each stall is counted in [`super::CallStats::stalled`].

use std::time::{Duration, Instant};

use mana_kernels::KernelError;
use mana_kernels::generate::LanguageModel;
use mana_kernels::model::ModelError;

use super::remote::NetworkExperts;

/// The first pause before a stalled step runs again.
pub const FIRST_STALL_PAUSE: Duration = Duration::from_millis(100);
/// The longest pause between two tries of a stalled step.
pub const MAX_STALL_PAUSE: Duration = Duration::from_secs(2);

/// A model whose experts are called through `experts`, with every step that stalls for want of answers run
/// again for up to `wait` (blocking: it sleeps on the calling thread, as generation does).
pub struct Patient<L> {
    inner: L,
    experts: NetworkExperts,
    wait: Duration,
}

impl<L: LanguageModel> Patient<L> {
    /// `inner` (a model whose absent experts `experts`, or a clone of it, runs), waiting up to `wait` for
    /// a stalled step.
    pub fn new(inner: L, experts: NetworkExperts, wait: Duration) -> Self {
        Self {
            inner,
            experts,
            wait,
        }
    }
}

impl<L: LanguageModel> LanguageModel for Patient<L> {
    fn vocab_size(&self) -> usize {
        self.inner.vocab_size()
    }

    fn context(&self) -> usize {
        self.inner.context()
    }

    fn has_mtp(&self) -> bool {
        self.inner.has_mtp()
    }

    fn logits(
        &mut self,
        window: &[u32],
        rows: usize,
        main_out: &mut [f32],
        mut mtp_out: Option<&mut [f32]>,
    ) -> Result<(), ModelError> {
        let mut deadline = None;
        let mut pause = FIRST_STALL_PAUSE;
        loop {
            let result = self
                .inner
                .logits(window, rows, main_out, mtp_out.as_deref_mut());
            let Err(ModelError::Kernel(err @ KernelError::TooFewExperts { .. })) = &result else {
                return result;
            };
            let now = Instant::now();
            let deadline = *deadline.get_or_insert(now + self.wait);
            if now >= deadline {
                tracing::warn!(%err, waited = ?self.wait, "expert answers still missing; giving up the step");
                return result;
            }
            self.experts.note_stall();
            let nap = pause.min(deadline - now);
            tracing::warn!(%err, pause = ?nap, "too few experts answered; waiting, then running the step again");
            std::thread::sleep(nap);
            pause = (pause * 2).min(MAX_STALL_PAUSE);
        }
    }
}
