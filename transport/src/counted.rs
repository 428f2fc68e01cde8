//! One guard for every "how many are there now" counter: counted in when made, counted
//! out when dropped, however the task that holds it ends (return, error, panic,
//! cancellation).

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

/// One unit of `count` for as long as it lives.
#[derive(Debug)]
pub struct Counted(Arc<AtomicUsize>);

impl Counted {
    pub fn enter(count: &Arc<AtomicUsize>) -> Counted {
        count.fetch_add(1, Ordering::Relaxed);
        Counted(count.clone())
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_in_and_out_even_through_a_panic() {
        let count = Arc::new(AtomicUsize::new(0));
        let held = Counted::enter(&count);
        let also = Counted::enter(&count);
        assert_eq!(count.load(Ordering::Relaxed), 2);
        drop(held);
        let panicked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || {
            let _also = also;
            panic!("a task that fails");
        }));
        assert!(panicked.is_err());
        assert_eq!(count.load(Ordering::Relaxed), 0);
    }
}
