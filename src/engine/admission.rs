//! Admission: the sequence slots and the bounded FIFO queue in front of them. A request takes
//! a free slot at once, or waits its turn (tokio's semaphore hands permits out in arrival
//! order) while the queue has room and the wait stays under its limit; otherwise it is
//! refused with `Overloaded` (429 with Retry-After). A waiter whose client leaves is dropped
//! with its future and leaves the queue. Never unbounded: at most `max_waiting` wait.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::time::{Duration, Instant};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::EngineError;
use crate::metrics::Metrics;

/// How many requests may wait for a slot, and for how long.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueLimits {
    /// 0 refuses at once when every slot is busy.
    pub max_waiting: usize,
    pub max_wait: Duration,
}

/// The slots and the queue.
pub struct Admission {
    slots: Arc<Semaphore>,
    total: usize,
    waiting: Arc<AtomicUsize>,
    /// Slots handed out so far: a change means work since the last look.
    admitted: AtomicU64,
    limits: QueueLimits,
    metrics: Arc<Metrics>,
}

/// A place in the queue, given back when dropped (admitted, timed out, or abandoned).
struct Place(Arc<AtomicUsize>, Arc<Metrics>);

impl Drop for Place {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Relaxed);
        self.1.queued.fetch_sub(1, Relaxed);
    }
}

impl Admission {
    pub fn new(slots: usize, limits: QueueLimits, metrics: Arc<Metrics>) -> Self {
        Self {
            slots: Arc::new(Semaphore::new(slots)),
            total: slots,
            waiting: Arc::new(AtomicUsize::new(0)),
            admitted: AtomicU64::new(0),
            limits,
            metrics,
        }
    }

    pub fn slots(&self) -> usize {
        self.total
    }

    pub fn free(&self) -> usize {
        self.slots.available_permits()
    }

    pub fn running(&self) -> usize {
        self.total - self.free()
    }

    pub fn waiting(&self) -> usize {
        self.waiting.load(Relaxed)
    }

    pub fn admitted(&self) -> u64 {
        self.admitted.load(Relaxed)
    }

    /// No sequence running and none waiting.
    pub fn idle(&self) -> bool {
        self.running() == 0 && self.waiting() == 0
    }

    fn refuse(&self) -> EngineError {
        self.metrics.rejected.fetch_add(1, Relaxed);
        EngineError::Overloaded(self.total)
    }

    /// A slot, now or after waiting in line; held until the sequence ends.
    pub async fn admit(&self) -> Result<OwnedSemaphorePermit, EngineError> {
        // Permits go to waiters first, so this succeeds only when nobody is waiting.
        if let Ok(permit) = self.slots.clone().try_acquire_owned() {
            self.admitted.fetch_add(1, Relaxed);
            self.metrics.queue_wait.observe(0.0);
            return Ok(permit);
        }
        if self.waiting.fetch_add(1, Relaxed) >= self.limits.max_waiting {
            self.waiting.fetch_sub(1, Relaxed);
            return Err(self.refuse());
        }
        self.metrics.queued.fetch_add(1, Relaxed);
        let _place = Place(self.waiting.clone(), self.metrics.clone());
        let since = Instant::now();
        match tokio::time::timeout(self.limits.max_wait, self.slots.clone().acquire_owned()).await {
            Ok(Ok(permit)) => {
                self.admitted.fetch_add(1, Relaxed);
                self.metrics
                    .queue_wait
                    .observe(since.elapsed().as_secs_f64());
                Ok(permit)
            }
            Ok(Err(_)) => Err(EngineError::Internal(
                "the sequence slots were closed".into(),
            )),
            Err(_) => Err(self.refuse()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn admission(slots: usize, max_waiting: usize, wait_ms: u64) -> Admission {
        let limits = QueueLimits {
            max_waiting,
            max_wait: Duration::from_millis(wait_ms),
        };
        Admission::new(slots, limits, Arc::new(Metrics::default()))
    }

    #[tokio::test]
    async fn waiters_are_admitted_in_arrival_order() {
        let a = Arc::new(admission(1, 8, 5_000));
        let first = a.admit().await.unwrap();
        let order = Arc::new(std::sync::Mutex::new(Vec::new()));
        let mut tasks = Vec::new();
        for i in 0..4 {
            let (a2, order) = (a.clone(), order.clone());
            tasks.push(tokio::spawn(async move {
                let p = a2.admit().await.unwrap();
                order.lock().unwrap().push(i);
                tokio::time::sleep(Duration::from_millis(5)).await;
                drop(p);
            }));
            // Each waiter joins the queue before the next one is spawned.
            while a.waiting() < i + 1 {
                tokio::task::yield_now().await;
            }
        }
        drop(first);
        for t in tasks {
            t.await.unwrap();
        }
        assert_eq!(*order.lock().unwrap(), vec![0, 1, 2, 3]);
        assert_eq!(a.waiting(), 0);
    }

    #[tokio::test]
    async fn a_full_queue_refuses_at_once_and_a_long_wait_times_out() {
        let a = Arc::new(admission(1, 1, 50));
        let _held = a.admit().await.unwrap();
        let a2 = a.clone();
        let waiter = tokio::spawn(async move { a2.admit().await.map(|_| ()) });
        while a.waiting() < 1 {
            tokio::task::yield_now().await;
        }
        let started = Instant::now();
        assert!(matches!(a.admit().await, Err(EngineError::Overloaded(1))));
        assert!(
            started.elapsed() < Duration::from_millis(40),
            "refused at once"
        );
        assert!(matches!(
            waiter.await.unwrap(),
            Err(EngineError::Overloaded(1))
        ));
        assert_eq!(a.waiting(), 0);
        assert_eq!(a.metrics.rejected.load(Relaxed), 2);
    }

    #[tokio::test]
    async fn an_abandoned_waiter_leaves_the_queue() {
        let a = Arc::new(admission(1, 4, 5_000));
        let held = a.admit().await.unwrap();
        let a2 = a.clone();
        let waiter = tokio::spawn(async move { a2.admit().await.map(|_| ()) });
        while a.waiting() < 1 {
            tokio::task::yield_now().await;
        }
        waiter.abort();
        let _ = waiter.await;
        assert_eq!(a.waiting(), 0);
        assert_eq!(a.metrics.queued.load(Relaxed), 0);
        drop(held);
        assert_eq!(a.free(), 1, "the slot is not lost to the abandoned waiter");
    }
}
